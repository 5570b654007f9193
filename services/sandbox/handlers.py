"""Bus entry points: thin FastStream subscribers that turn a message into one use-case call
and its outcome into ack / nack(delay) / term.

Five durable pull consumers (explicit acks, manual ack policy), shared by all replicas:
- `sandbox.created` → `CredentialInjector.handle`;
- `tokens.refreshed` → `LiveSandboxes.on_refreshed`; `tokens.revoked` → `on_revoked`;
- `grants.ended` → `on_grant_ended` (scrub the sandbox whose lease is over);
- `sandbox.destroyed` → `on_destroyed`.

Outcomes: done → ack (after the result events are published); `Retry` → nack with the delay
(exponential backoff); exhausted → the use case has dead-lettered the message and published
the failed event(s) → term. If even that report fails (bus trouble), nack: JetStream
redelivers (its cap is SANDBOX_MAX_DELIVER + SANDBOX_REPORT_GRACE) and the report is retried.
While a message is worked on, `in_progress` is sent every ack_wait/3 so a slow backend does
not make JetStream hand the message to another replica.

Payloads that fail validation reach `on_invalid_event` (an ExceptionMiddleware handler): dead
letter at once (+ a `sandbox.credentials.failed` with reason `invalid_event` when a
sandbox.created still names a user and a sandbox), then ack so the consumer moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from faststream import AckPolicy, ExceptionMiddleware
from faststream.nats import NatsBroker, NatsMessage, PullSub
from pydantic import ValidationError

from shared import broker as bus
from shared import subjects
from shared.events import (
    GrantEnded,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxDestroyed,
    TokensRefreshed,
    TokensRevoked,
)
from shared.events import derived_event_id
from shared.logging import get_logger
from services.sandbox.adapters.bus import (
    CREATED,
    DESTROYED,
    GRANT_ENDED,
    REFRESHED,
    REVOKED,
    ConsumerSpec,
    consumer_config,
)
from services.sandbox.injector import CredentialInjector, Failed, Retry
from services.sandbox.live import Exhausted, LiveSandboxes
from services.sandbox.settings import SandboxSettings

log = get_logger("ccbridge.sandbox.handlers")

PULL_TIMEOUT_S = 1.0


def delivery_count(message: Any) -> int:
    """How many times JetStream has delivered this message (1 on first delivery)."""
    try:
        return max(1, int(message.raw_message.metadata.num_delivered))
    except Exception:  # noqa: BLE001 - not a JetStream message (tests): first delivery
        return 1


@contextlib.asynccontextmanager
async def working(msg: NatsMessage, ack_wait: float) -> AsyncIterator[None]:
    """Tell JetStream we are still on it (`+WPI`) every ack_wait/3 while the body runs.

    A timer, not a task per message: most messages are done long before the first beat."""
    interval = max(0.2, ack_wait / 3)
    loop = asyncio.get_running_loop()
    beats: set[asyncio.Task[None]] = set()

    async def in_progress() -> None:
        with contextlib.suppress(Exception):
            await msg.in_progress()

    def beat() -> None:
        nonlocal timer
        task = loop.create_task(in_progress())
        beats.add(task)
        task.add_done_callback(beats.discard)
        timer = loop.call_later(interval, beat)

    timer = loop.call_later(interval, beat)
    try:
        yield
    finally:
        timer.cancel()
        for task in list(beats):
            task.cancel()


def consumer_max_deliver(settings: SandboxSettings) -> int:
    return settings.max_deliver + settings.report_grace


def register_handlers(
    broker: NatsBroker, injector: CredentialInjector, live: LiveSandboxes, settings: SandboxSettings
) -> None:
    def subscribe(spec: ConsumerSpec, stream: Any, title: str, description: str) -> Any:
        return broker.subscriber(
            spec.subject,
            stream=stream,
            durable=spec.durable,
            pull_sub=PullSub(batch_size=settings.concurrency, timeout=PULL_TIMEOUT_S),
            # Up to `concurrency` messages in flight, each settled on its own: a slow one (a
            # vault round trip, a slow backend) no longer holds up the rest of a fetched batch.
            max_workers=settings.concurrency,
            config=consumer_config(spec, max_deliver=consumer_max_deliver(settings), ack_wait=settings.ack_wait),
            ack_policy=AckPolicy.MANUAL,
            title=title,
            description=description,
        )

    async def report_failed(msg: NatsMessage, what: str, delivery: int, delay: float) -> None:
        log.exception("sandbox.report_failed", what=what, delivery=delivery)
        await msg.nack(delay=delay)

    async def run_live(what: str, msg: NatsMessage, use_case: Callable[[int, int | None], Awaitable[Any]]) -> None:
        """A live-sandbox use case (re-inject, scrub) under the heartbeat, then ack / nack / term."""
        delivery = delivery_count(msg)
        try:
            async with working(msg, settings.ack_wait):
                outcome = await use_case(delivery, bus.stream_sequence(msg))
        except Exception:  # noqa: BLE001 - could not even report: let JetStream redeliver
            await report_failed(msg, what, delivery, live.retry_policy.delay(delivery))
            return
        await _settle_live(msg, outcome)

    @subscribe(CREATED, bus.SANDBOX, "sandbox.created → inject credentials",
               "Injects the person's Claude Code credentials into the new sandbox.")
    async def on_sandbox_created(event: SandboxCreated, msg: bus.Message) -> None:
        delivery = delivery_count(msg)
        try:
            async with working(msg, settings.ack_wait):
                outcome = await injector.handle(event, delivery=delivery, body=msg.body,
                                                copy_seq=bus.stream_sequence(msg))
        except Exception:  # noqa: BLE001 - could not even report: let JetStream redeliver
            await report_failed(msg, f"sandbox.created {event.event_id}", delivery,
                                injector.retry_policy.delay(delivery))
            return
        if isinstance(outcome, Retry):
            await msg.nack(delay=outcome.delay)
        elif isinstance(outcome, Failed) and outcome.exhausted:
            await msg.reject()  # dead-lettered and reported: terminate
        else:
            await msg.ack()

    @subscribe(REFRESHED, bus.TOKENS, "tokens.refreshed → re-inject into live sandboxes",
               "Writes the refreshed credentials into every live sandbox of the person.")
    async def on_tokens_refreshed(event: TokensRefreshed, msg: bus.Message) -> None:
        await run_live(f"tokens.refreshed {event.event_id}", msg, lambda delivery, copy_seq: live.on_refreshed(
            event, delivery=delivery, body=msg.body, copy_seq=copy_seq))

    @subscribe(REVOKED, bus.TOKENS, "tokens.revoked → scrub live sandboxes",
               "Removes the person's credential files from every live sandbox and reports it.")
    async def on_tokens_revoked(event: TokensRevoked, msg: bus.Message) -> None:
        await run_live(f"tokens.revoked {event.event_id}", msg, lambda delivery, copy_seq: live.on_revoked(
            event, delivery=delivery, body=msg.body, copy_seq=copy_seq))

    @subscribe(GRANT_ENDED, bus.TOKENS, "grants.ended → scrub the sandbox whose lease is over",
               "Removes the person's credential files from that one sandbox (lease expired or ended).")
    async def on_grant_ended(event: GrantEnded, msg: bus.Message) -> None:
        await run_live(f"grants.ended {event.event_id}", msg, lambda delivery, copy_seq: live.on_grant_ended(
            event, delivery=delivery, body=msg.body, copy_seq=copy_seq))

    @subscribe(DESTROYED, bus.SANDBOX, "sandbox.destroyed → forget the sandbox",
               "Stops tracking the sandbox (no more re-injection or scrub).")
    async def on_sandbox_destroyed(event: SandboxDestroyed, msg: bus.Message) -> None:
        delivery = delivery_count(msg)
        try:
            await live.on_destroyed(event)
        except Exception:  # noqa: BLE001 - the registry is the bus: retry
            await report_failed(msg, f"sandbox.destroyed {event.event_id}", delivery,
                                live.retry_policy.delay(delivery))
            return
        await msg.ack()


async def _settle_live(msg: NatsMessage, outcome: Any) -> None:
    if isinstance(outcome, Retry):
        await msg.nack(delay=outcome.delay)
    elif isinstance(outcome, Exhausted):
        await msg.reject()
    else:
        await msg.ack()


def _validation_summary(exc: ValidationError) -> str:
    """Which fields failed and how, never their values."""
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['type']}" for err in exc.errors()[:5]]
    return "; ".join(parts)


def salvage_failure(body: bytes, detail: str) -> SandboxCredentialsFailed | None:
    """A failed event for an invalid sandbox.created, if it still names a user and a sandbox."""
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

    async def on_invalid_event(exc: ValidationError, message: bus.Message) -> None:
        raw = getattr(message, "raw_message", None)
        subject = getattr(raw, "subject", None) or subjects.SANDBOX_CREATED
        body: bytes = message.body
        detail = f"invalid {subject} payload: {_validation_summary(exc)}"
        log.warning("sandbox.invalid_event", subject=subject, detail=detail)
        digest = hashlib.sha256(body).hexdigest()[:32]
        await bus.dead_letter(broker, subject, body, f"invalid_event: {detail}", message_id=digest,
                              copy_seq=bus.stream_sequence(message))
        if subject == subjects.SANDBOX_CREATED:
            failed = salvage_failure(body, detail)
            if failed is not None:
                await bus.publish_event(broker, subjects.SANDBOX_CREDENTIALS_FAILED, failed)
        await message.ack()

    return ExceptionMiddleware(handlers={ValidationError: on_invalid_event})
