"""Bus entry points: parse, call one use case, map the result or error. Nothing else.

- `tokens.issued`: durable JetStream pull consumer, explicit acks.
  stored / duplicate → ack; poison (bad schema, unopenable box) → dead letter + ack;
  database unavailable → nack with backoff (redelivered, never lost);
  unexpected error → nack with backoff, dead letter after VAULT_POISON_AFTER deliveries.
- `vault.credentials.get`: core request/reply in queue group `vault`. Always answers:
  bad JSON / schema → `invalid_request`, unexpected failure → `internal`.
"""

import json
from dataclasses import dataclass
from typing import Any

from faststream import AckPolicy, ExceptionMiddleware
from faststream.exceptions import NackMessage
from faststream.nats import ConsumerConfig, NatsRouter, PullSub
from faststream.nats.annotations import NatsBroker, NatsMessage
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from services.vault.errors import VaultError
from services.vault.settings import VaultSettings
from services.vault.use_cases import Vault
from shared import broker as bus
from shared import subjects
from shared.events import CredentialsReply, CredentialsRequest, TokensIssued
from shared.logging import get_logger

log = get_logger(__name__)

# Reasons a CredentialsReply may carry (shared.events.CredentialsError); others become "internal".
REPLY_ERRORS = frozenset({"not_connected", "reconnect_required", "unauthorized_requester", "invalid_request"})


def tokens_consumer_config(settings: VaultSettings) -> ConsumerConfig:
    """Redelivery is driven by our nacks (with delay); max_deliver stays unlimited so an
    outage of the database never drops an event — poison is dead-lettered by the handler."""
    return ConsumerConfig(
        durable_name=subjects.VAULT_TOKENS_ISSUED_DURABLE,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=JsAckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max(64, settings.fetch_batch * 4),
        filter_subject=subjects.TOKENS_ISSUED,
    )


def retry_delay(delivered: int, cap: float) -> float:
    """Backoff before the next delivery: 1, 2, 4, … seconds, capped."""
    return float(min(cap, 2 ** max(0, min(delivered - 1, 16))))


def _delivered(message: Any) -> int:
    try:
        return int(message.raw_message.metadata.num_delivered)
    except Exception:  # noqa: BLE001 - not a JetStream message (TestNatsBroker): first delivery
        return 1


def _message_id(message: Any) -> str | None:
    headers = getattr(message, "headers", None) or {}
    value = headers.get(subjects.MSG_ID_HEADER)
    return value if isinstance(value, str) and value else None


def _body(message: Any) -> bytes:
    body = getattr(message, "body", None)
    if body is None:
        body = getattr(message, "data", b"")  # a raw nats Msg (failure before parsing)
    return body if isinstance(body, bytes) else str(body).encode()


@dataclass(frozen=True)
class Failure:
    """What to do with a message whose processing failed."""

    dead_letter: bool
    reason: str
    delay_s: float = 0.0


def on_failure(exc: BaseException, delivered: int, settings: VaultSettings) -> Failure:
    """poison → dead letter now; retryable → retry with backoff, forever (an outage must not
    lose events); unknown → retry with backoff, dead letter after VAULT_POISON_AFTER deliveries."""
    delay = retry_delay(delivered, settings.retry_max_delay_s)
    if isinstance(exc, VaultError):
        if exc.retryable:
            return Failure(False, exc.reason, delay)
        return Failure(True, exc.reason)
    if delivered >= settings.poison_after:
        return Failure(True, "max_deliveries")
    return Failure(False, "internal_error", delay)


# --- tokens.issued ------------------------------------------------------------------
def build_tokens_router(vault: Vault, settings: VaultSettings) -> NatsRouter:
    async def on_malformed(exc: ValidationError, message: NatsMessage, broker: NatsBroker) -> None:
        # Never log the error itself: pydantic quotes the input.
        message_id = _message_id(message)
        await bus.dead_letter(broker, subjects.TOKENS_ISSUED, _body(message), "invalid_event: schema",
                              message_id=message_id)
        log.warning("tokens.issued dead-lettered", reason="invalid_event", nats_msg_id=message_id)

    router = NatsRouter(middlewares=(ExceptionMiddleware(handlers={ValidationError: on_malformed}),))

    @router.subscriber(
        subjects.TOKENS_ISSUED,
        stream=bus.TOKENS,
        durable=subjects.VAULT_TOKENS_ISSUED_DURABLE,
        pull_sub=PullSub(batch_size=settings.fetch_batch, timeout=settings.fetch_timeout_s),
        config=tokens_consumer_config(settings),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="vault: store issued tokens",
        description="Opens the sealed TokenBundle with the vault key and stores it encrypted.",
    )
    async def on_tokens_issued(event: TokensIssued, message: NatsMessage, broker: NatsBroker) -> None:
        ids = {"user_id": event.user_id, "event_id": event.event_id}
        try:
            outcome = await vault.store_issued_tokens(event)
        except Exception as exc:  # noqa: BLE001 - every failure is mapped by on_failure
            delivered = _delivered(message)
            failure = on_failure(exc, delivered, settings)
            error = type(exc).__name__  # the class only: messages may quote inputs
            if failure.dead_letter:
                await bus.dead_letter(broker, subjects.TOKENS_ISSUED, message.body, failure.reason,
                                      message_id=event.event_id)
                log.warning("tokens.issued dead-lettered", reason=failure.reason, error=error, **ids)
                return
            log.warning("tokens.issued will be retried", reason=failure.reason, error=error,
                        delivered=delivered, delay_s=failure.delay_s, **ids)
            raise NackMessage(delay=failure.delay_s) from None
        if outcome.duplicate:
            log.info("tokens.issued duplicate ignored", **ids)
        else:
            log.info("tokens stored", version=outcome.version, **ids)

    return router


# --- vault.credentials.get ------------------------------------------------------------
def _request_id_of(message: Any) -> str:
    """Best effort: echo the request_id of a request we could not parse."""
    try:
        value = json.loads(_body(message)).get("request_id")
    except Exception:  # noqa: BLE001 - not JSON, not an object: no id to echo
        return ""
    return value if isinstance(value, str) and 0 < len(value) <= 64 else ""


def build_credentials_router(vault: Vault) -> NatsRouter:
    async def invalid_request(exc: ValidationError, message: NatsMessage) -> CredentialsReply:
        log.info("credentials request rejected", reason="invalid_request")
        return CredentialsReply(request_id=_request_id_of(message), ok=False, error="invalid_request")

    async def internal_error(exc: Exception, message: NatsMessage) -> CredentialsReply:
        log.error("credentials request failed", error=type(exc).__name__)
        return CredentialsReply(request_id=_request_id_of(message), ok=False, error="internal")

    router = NatsRouter(
        middlewares=(
            ExceptionMiddleware(publish_handlers={ValidationError: invalid_request, Exception: internal_error}),
        )
    )

    @router.subscriber(
        subjects.VAULT_CREDENTIALS_GET,
        queue=subjects.VAULT_QUEUE,
        title="vault: credentials for a sandbox",
        description="Seals the user's tokens to the (trusted) requester key; never sends a refresh "
        "token unless mode is `file`.",
    )
    async def on_credentials_get(request: CredentialsRequest) -> CredentialsReply:
        ids = {"user_id": request.user_id, "request_id": request.request_id}
        try:
            reply = await vault.grant_credentials(request)
        except VaultError as exc:
            error = exc.reason if exc.reason in REPLY_ERRORS else "internal"
            (log.error if error == "internal" else log.info)("credentials refused", reason=exc.reason, **ids)
            return CredentialsReply(request_id=request.request_id, ok=False, error=error)  # type: ignore[arg-type]
        log.info("credentials granted", mode=request.mode, **ids)
        return reply

    return router
