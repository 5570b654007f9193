"""Bus entry points: thin FastStream subscribers that turn a message into one use-case call
and its outcome into ack / nack(delay) / dead letter.

- `sandbox.created` (durable pull consumer, explicit acks, manual ack policy):
  Injected → ack (after the result event is published); Retry → nack with delay;
  Failed → ack (final), or dead-letter then ack when the retries ran out.
- Payloads that fail validation reach `on_invalid_event` (an ExceptionMiddleware handler):
  dead letter + a `sandbox.credentials.failed` (reason `invalid_event`) when the JSON still
  names a user and a sandbox, then ack so the consumer moves on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from faststream import AckPolicy, Context, ExceptionMiddleware
from faststream.nats import NatsBroker, NatsMessage, PullSub
from pydantic import ValidationError

from shared import broker as bus
from shared import subjects
from shared.events import SandboxCreated, SandboxCredentialsFailed, derived_event_id
from shared.logging import get_logger
from services.sandbox.adapters.bus import created_consumer_config
from services.sandbox.injector import CredentialInjector, Failed, Retry
from services.sandbox.settings import SandboxSettings

log = get_logger("ccbridge.sandbox.handlers")

PULL_TIMEOUT_S = 1.0


def delivery_count(message: Any) -> int:
    """How many times JetStream has delivered this message (1 on first delivery)."""
    try:
        return max(1, int(message.raw_message.metadata.num_delivered))
    except Exception:  # noqa: BLE001 - not a JetStream message (tests): first delivery
        return 1


def register_handlers(broker: NatsBroker, injector: CredentialInjector, settings: SandboxSettings) -> None:
    @broker.subscriber(
        subjects.SANDBOX_CREATED,
        stream=bus.SANDBOX,
        durable=subjects.SANDBOX_CREATED_DURABLE,
        pull_sub=PullSub(batch_size=settings.concurrency, timeout=PULL_TIMEOUT_S),
        config=created_consumer_config(max_deliver=settings.max_deliver, ack_wait=settings.ack_wait),
        ack_policy=AckPolicy.MANUAL,
        title="sandbox.created → inject credentials",
        description="Injects the user's Claude Code credentials into the new sandbox.",
    )
    async def on_sandbox_created(event: SandboxCreated, msg: NatsMessage) -> None:
        delivery = delivery_count(msg)
        try:
            outcome = await injector.handle(event, delivery=delivery)
        except Exception:  # noqa: BLE001 - could not even report: let JetStream redeliver
            log.exception("sandbox.report_failed", sandbox_id=event.sandbox_id, cause_event_id=event.event_id)
            await msg.nack(delay=injector.retry_policy.delay(delivery))
            return
        if isinstance(outcome, Retry):
            await msg.nack(delay=outcome.delay)
            return
        if isinstance(outcome, Failed) and outcome.exhausted:
            await bus.dead_letter(
                broker,
                subjects.SANDBOX_CREATED,
                msg.body,
                f"{outcome.error.reason}: {outcome.event.detail}",
                message_id=event.event_id,
            )
        await msg.ack()


def _validation_summary(exc: ValidationError) -> str:
    """Which fields failed and how, never their values."""
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['type']}" for err in exc.errors()[:5]]
    return "; ".join(parts)


def salvage_failure(body: bytes, detail: str) -> SandboxCredentialsFailed | None:
    """A failed event for an invalid payload, if it still names a user and a sandbox."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    user_id, sandbox_id, cause = data.get("user_id"), data.get("sandbox_id"), data.get("event_id")
    if not isinstance(user_id, str) or not isinstance(sandbox_id, str):
        return None
    if not isinstance(cause, str) or not cause or len(cause) > 64:
        cause = hashlib.sha256(body).hexdigest()[:32]
    try:
        return SandboxCredentialsFailed(
            event_id=derived_event_id(cause, "failed"),
            user_id=user_id,
            sandbox_id=sandbox_id,
            cause_event_id=cause,
            reason="invalid_event",
            detail=detail[:500],
            retryable=False,
        )
    except ValidationError:
        return None


def invalid_event_middleware(broker: NatsBroker) -> ExceptionMiddleware:
    """Dead-letters payloads that fail validation instead of redelivering them forever."""

    async def on_invalid_event(exc: ValidationError, message: Any = Context()) -> None:
        raw = getattr(message, "raw_message", None)
        subject = getattr(raw, "subject", None) or subjects.SANDBOX_CREATED
        body: bytes = message.body
        detail = f"invalid {subject} payload: {_validation_summary(exc)}"
        log.warning("sandbox.invalid_event", subject=subject, detail=detail)
        digest = hashlib.sha256(body).hexdigest()[:32]
        await bus.dead_letter(broker, subject, body, f"invalid_event: {detail}", message_id=digest)
        failed = salvage_failure(body, detail)
        if failed is not None:
            await bus.publish_event(broker, subjects.SANDBOX_CREDENTIALS_FAILED, failed)
        await message.ack()

    return ExceptionMiddleware(handlers={ValidationError: on_invalid_event})
