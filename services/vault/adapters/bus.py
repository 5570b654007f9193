"""The vault's publisher port over FastStream/JetStream (`shared.broker.publish_event`)."""

from __future__ import annotations

from faststream.nats import NatsBroker

from shared.broker import publish_event
from shared.events import Event


class BrokerPublisher:
    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker

    async def publish(self, subject: str, event: Event) -> None:
        await publish_event(self._broker, subject, event)
