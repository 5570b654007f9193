"""Bus adapters: publishing result events, dead letters, and the durable consumers' config.

The five consumers are durable JetStream *pull* consumers: every replica of the service
pulls from the same durable, so each message goes to one replica at a time — the JetStream
equivalent of a NATS queue group (`shared.subjects.SANDBOX_QUEUE`), with acks, redelivery and
backoff on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from faststream.nats import NatsBroker
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

from shared import broker as bus
from shared import subjects
from shared.broker import publish_event
from shared.events import Event
from shared.logging import get_logger

log = get_logger("ccbridge.sandbox.bus")


class BrokerPublisher:
    """`EventPublisher` over JetStream (Nats-Msg-Id = event_id, so republishing is harmless)."""

    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker

    async def publish(self, subject: str, event: Event) -> None:
        await publish_event(self._broker, subject, event)


class BrokerDeadLetters:
    """`DeadLetters` over `shared.broker.dead_letter` (Nats-Msg-Id `dlq-<subject>-<id>-<copy>`:
    kept once per copy of the message, see `shared.broker.dead_letter_msg_id`)."""

    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker

    async def dead_letter(self, subject: str, body: bytes, reason: str, *, message_id: str,
                          copy_seq: int | None = None) -> None:
        await bus.dead_letter(self._broker, subject, body, reason, message_id=message_id, copy_seq=copy_seq)


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


def consumer_config(spec: ConsumerSpec, *, max_deliver: int, ack_wait: float) -> ConsumerConfig:
    """`max_deliver` here is JetStream's hard cap: SANDBOX_MAX_DELIVER + SANDBOX_REPORT_GRACE
    (the service gives up — dead letter, failed event, term — at SANDBOX_MAX_DELIVER itself)."""
    return ConsumerConfig(
        name=spec.durable,
        durable_name=spec.durable,
        filter_subject=spec.subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        max_deliver=max_deliver,
        ack_wait=ack_wait,
    )


def created_consumer_config(*, max_deliver: int, ack_wait: float) -> ConsumerConfig:
    return consumer_config(CREATED, max_deliver=max_deliver, ack_wait=ack_wait)


async def ensure_consumer(broker: NatsBroker, config: ConsumerConfig, *, stream: str | None = None) -> None:
    """Create the durable consumer, or update it (max_deliver, ack_wait are editable) so a
    changed setting takes effect on a consumer that already exists."""
    js = broker.connection.jetstream()
    try:
        await js.add_consumer(stream or subjects.SANDBOX_STREAM.name, config=config)
    except BadRequestError as exc:
        log.warning("sandbox.consumer_not_updated", durable=config.durable_name, error=exc.description)
