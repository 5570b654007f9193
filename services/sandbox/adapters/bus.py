"""Bus adapters: publishing result events and the durable consumer's configuration."""

from __future__ import annotations

from faststream.nats import NatsBroker
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

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


def created_consumer_config(*, max_deliver: int, ack_wait: float) -> ConsumerConfig:
    return ConsumerConfig(
        name=subjects.SANDBOX_CREATED_DURABLE,
        durable_name=subjects.SANDBOX_CREATED_DURABLE,
        filter_subject=subjects.SANDBOX_CREATED,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        max_deliver=max_deliver,
        ack_wait=ack_wait,
    )


async def ensure_consumer(broker: NatsBroker, config: ConsumerConfig) -> None:
    """Create the durable consumer, or update it (max_deliver, ack_wait are editable) so a
    changed setting takes effect on a consumer that already exists."""
    js = broker.connection.jetstream()
    try:
        await js.add_consumer(subjects.SANDBOX_STREAM.name, config=config)
    except BadRequestError as exc:
        log.warning("sandbox.consumer_not_updated", durable=config.durable_name, error=exc.description)
