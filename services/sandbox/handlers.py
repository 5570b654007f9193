"""Bus entry points: thin FastStream subscribers that hand one use-case call to the one delivery
policy (`shared.delivery`), which settles the message: ack; hold while the vault or e2b is down
(a breaker per dependency: the consumer then pulls nothing new); nack with backoff; or, once
the retry window (SANDBOX_RETRY_WINDOW_S) has run out or at once for a final error, dead letter
+ the use case's failure report + terminate.

Five durable pull consumers (explicit acks, manual ack policy), shared by all replicas:
- `sandbox.created` → `CredentialInjector.run`, reported by `report_failed`;
- `tokens.refreshed` → `LiveSandboxes.on_refreshed`; `tokens.revoked` → `on_revoked`;
- `grants.ended` → `on_grant_ended` (scrub the sandbox whose lease is over);
- `sandbox.destroyed` → `on_destroyed`.

Payloads that fail validation reach `on_invalid_event` (an ExceptionMiddleware handler): dead
letter at once (+ a `sandbox.credentials.failed` with reason `invalid_event` when a
sandbox.created still names a user and a sandbox), then ack so the consumer moves on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

from faststream import AckPolicy, ExceptionMiddleware
from faststream.nats import NatsBroker, PullSub
from pydantic import ValidationError

from services.sandbox.adapters.bus import (
    CREATED,
    DESTROYED,
    GRANT_ENDED,
    REFRESHED,
    REVOKED,
    ConsumerSpec,
    consumer_config,
)
from services.sandbox.injector import Injected
from services.sandbox.live import LiveSandboxes
from services.sandbox.settings import SandboxSettings
from shared import broker as bus
from shared import subjects
from shared.delivery import Delivery, DeliveryPolicy
from shared.events import (
    GrantEnded,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxDestroyed,
    TokensRefreshed,
    TokensRevoked,
    derived_event_id,
)
from shared.logging import get_logger

log = get_logger("ccbridge.sandbox.handlers")

PULL_TIMEOUT_S = 1.0


class InjectsCredentials(Protocol):
    """What the sandbox.created subscriber drives: `CredentialInjector`, or it decorated
    (`metrics.MeteredInjector`)."""

    def needs(self, event: SandboxCreated) -> tuple[str, ...]: ...

    async def run(self, event: SandboxCreated) -> Injected: ...

    async def report_failed(self, event: SandboxCreated, error: BaseException, detail: str,
                            exhausted: bool) -> SandboxCredentialsFailed: ...


def register_handlers(
    broker: NatsBroker, injector: InjectsCredentials, live: LiveSandboxes, policy: DeliveryPolicy,
    settings: SandboxSettings,
) -> None:
    def subscribe(spec: ConsumerSpec, stream: Any, title: str, description: str) -> Any:
        return broker.subscriber(
            spec.subject,
            stream=stream,
            durable=spec.durable,
            pull_sub=PullSub(batch_size=settings.concurrency, timeout=PULL_TIMEOUT_S),
            # Up to `concurrency` messages in flight, each settled on its own: a slow one (a
            # vault round trip, a slow backend) does not hold up the rest of a fetched batch;
            # while all of them are held (a dependency down) nothing new is pulled.
            max_workers=settings.concurrency,
            config=consumer_config(spec, ack_wait=settings.ack_wait),
            ack_policy=AckPolicy.MANUAL,
            title=title,
            description=description,
        )

    @subscribe(CREATED, bus.SANDBOX, "sandbox.created → inject credentials",
               "Injects the person's Claude Code credentials into the new sandbox.")
    async def on_sandbox_created(event: SandboxCreated, msg: bus.Message) -> None:
        async def final(error: BaseException, detail: str, exhausted: bool) -> None:
            await injector.report_failed(event, error, detail, exhausted)

        await policy.handle(msg, lambda: injector.run(event), final=final, needs=injector.needs(event))

    @subscribe(REFRESHED, bus.TOKENS, "tokens.refreshed → re-inject into live sandboxes",
               "Writes the refreshed credentials into every live sandbox of the person.")
    async def on_tokens_refreshed(event: TokensRefreshed, msg: bus.Message) -> None:
        await policy.handle(msg, lambda: live.on_refreshed(event), final=_report(live, event))

    @subscribe(REVOKED, bus.TOKENS, "tokens.revoked → scrub live sandboxes",
               "Removes the person's credential files from every live sandbox and reports it.")
    async def on_tokens_revoked(event: TokensRevoked, msg: bus.Message) -> None:
        await policy.handle(msg, lambda: live.on_revoked(event), final=_report(live, event))

    @subscribe(GRANT_ENDED, bus.TOKENS, "grants.ended → scrub the sandbox whose lease is over",
               "Removes the person's credential files from that one sandbox (lease expired or ended).")
    async def on_grant_ended(event: GrantEnded, msg: bus.Message) -> None:
        await policy.handle(msg, lambda: live.on_grant_ended(event), final=_report(live, event))

    @subscribe(DESTROYED, bus.SANDBOX, "sandbox.destroyed → forget the sandbox",
               "Stops tracking the sandbox (no more re-injection or scrub).")
    async def on_sandbox_destroyed(event: SandboxDestroyed, msg: bus.Message) -> None:
        await policy.handle(msg, lambda: live.on_destroyed(event), final=_report(live, event))


def _report(live: LiveSandboxes, event: Any) -> Any:
    async def final(error: BaseException, detail: str, exhausted: bool) -> None:
        await live.report_failed(event, error, detail, exhausted)

    return final


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
        subject = message.raw_message.subject or subjects.SANDBOX_CREATED
        body: bytes = message.body
        detail = f"invalid {subject} payload: {_validation_summary(exc)}"
        log.warning("sandbox.invalid_event", subject=subject, detail=detail)
        delivery = Delivery.of(message)
        await bus.dead_letter(broker, subject, body, f"invalid_event: {detail}",
                              message_id=delivery.dead_letter_id(), copy_seq=delivery.stream_seq)
        if subject == subjects.SANDBOX_CREATED:
            failed = salvage_failure(body, detail)
            if failed is not None:
                await bus.publish_event(broker, subjects.SANDBOX_CREDENTIALS_FAILED, failed)
        await message.ack()

    return ExceptionMiddleware(handlers={ValidationError: on_invalid_event})
