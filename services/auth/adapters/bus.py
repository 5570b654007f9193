"""Publishing events with FastStream (JetStream, Nats-Msg-Id = event_id, so a retried publish
is deduplicated by the stream)."""

from __future__ import annotations

import asyncio

from faststream.nats import NatsBroker

from services.auth.errors import BusUnavailable
from shared.broker import publish_event
from shared.delivery import Backoff
from shared.events import Event
from shared.logging import get_logger

log = get_logger(__name__)


class BrokerPublisher:
    """A person is waiting on the HTTP request: a few quick tries, then one typed error (503)."""

    def __init__(self, broker: NatsBroker, *, attempts: int = 3, backoff_s: float = 0.5) -> None:
        self._broker = broker
        self._attempts = attempts
        self._backoff = Backoff(backoff_s, backoff_s * attempts)

    async def publish(self, subject: str, event: Event) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                await publish_event(self._broker, subject, event)
                return
            except Exception as exc:  # noqa: BLE001 - any bus failure is one typed error after retries
                log.warning(
                    "publish failed", subject=subject, event_id=event.event_id, attempt=attempt,
                    error_type=type(exc).__name__,
                )
                if attempt == self._attempts:
                    raise BusUnavailable() from None
                await asyncio.sleep(self._backoff.delay(attempt))
