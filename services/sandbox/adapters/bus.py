"""Bus adapters: publishing result events, and the durable consumers' config (dead letters:
`shared.broker`).

The five consumers are durable JetStream *pull* consumers: every replica of the service
pulls from the same durable, so each message goes to one replica at a time — the JetStream
equivalent of a NATS queue group (`shared.subjects.SANDBOX_QUEUE`), with acks, redelivery and
backoff on top.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from faststream.nats import NatsBroker
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

from shared import subjects
from shared.batching import Coalescer
from shared.broker import publish_event
from shared.events import Event
from shared.logging import get_logger

log = get_logger("ccbridge.sandbox.bus")


class BrokerPublisher:
    """`EventPublisher` over JetStream (Nats-Msg-Id = event_id, so republishing is harmless).

    The result events of the injections in hand that finish at about the same time are sent
    together and their PubAcks awaited together (`shared.batching.Coalescer`); each caller
    returns once its own event is stored (its message is acked only then), or gets its own
    error. At light load an event goes out at once."""

    def __init__(self, broker: NatsBroker, *, batched: bool = True, max_batch: int = 64) -> None:
        self._broker = broker
        self._batch: Coalescer[tuple[str, Event], None] | None = (
            Coalescer(self._publish_all, max_batch=max_batch, max_in_flight=2, name="sandbox-results")
            if batched else None)

    async def _publish_all(self, items: list[tuple[str, Event]]) -> list[None | BaseException]:
        return await asyncio.gather(*(publish_event(self._broker, subject, event) for subject, event in items),
                                    return_exceptions=True)

    async def publish(self, subject: str, event: Event) -> None:
        if self._batch is None:
            await publish_event(self._broker, subject, event)
        else:
            await self._batch.submit((subject, event))


@dataclass(frozen=True)
class ConsumerSpec:
    subject: str
    durable: str
    stream: str


CREATED = ConsumerSpec(subjects.SANDBOX_CREATED, subjects.SANDBOX_CREATED_DURABLE, subjects.SANDBOX_STREAM.name)
DESTROYED = ConsumerSpec(subjects.SANDBOX_DESTROYED, subjects.SANDBOX_DESTROYED_DURABLE, subjects.SANDBOX_STREAM.name)
REFRESHED = ConsumerSpec(
    subjects.TOKENS_REFRESHED, subjects.SANDBOX_TOKENS_REFRESHED_DURABLE, subjects.TOKENS_STREAM.name
)
REVOKED = ConsumerSpec(subjects.TOKENS_REVOKED, subjects.SANDBOX_TOKENS_REVOKED_DURABLE, subjects.TOKENS_STREAM.name)
GRANT_ENDED = ConsumerSpec(subjects.GRANTS_ENDED, subjects.SANDBOX_GRANTS_ENDED_DURABLE, subjects.TOKENS_STREAM.name)
CONSUMERS = (CREATED, DESTROYED, REFRESHED, REVOKED, GRANT_ENDED)


def consumer_config(spec: ConsumerSpec, *, ack_wait: float) -> ConsumerConfig:
    """No delivery cap at JetStream: the service's delivery policy (shared.delivery) decides
    when to give up — by the retry window — and always reports and terminates the message."""
    return ConsumerConfig(
        name=spec.durable,
        durable_name=spec.durable,
        filter_subject=spec.subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        max_deliver=-1,
        ack_wait=ack_wait,
    )


async def ensure_consumer(broker: NatsBroker, config: ConsumerConfig, *, stream: str | None = None) -> None:
    """Create the durable consumer, or update it (max_deliver, ack_wait are editable) so a
    changed setting takes effect on a consumer that already exists."""
    js = broker.connection.jetstream()
    try:
        await js.add_consumer(stream or subjects.SANDBOX_STREAM.name, config=config)
    except BadRequestError as exc:
        log.warning("sandbox.consumer_not_updated", durable=config.durable_name, error=exc.description)
