"""Bus entry points: parse, call one use case, map the result or error. Nothing else.

- `tokens.issued`, `tokens.revoked`: durable JetStream pull consumers, explicit acks.
  done / duplicate → ack; poison (bad schema, unopenable box) → dead letter + audit + ack;
  database unavailable → nack with backoff (redelivered, never lost);
  unexpected error → nack with backoff, dead letter after VAULT_POISON_AFTER deliveries.
- `vault.credentials.get`: core request/reply in queue group `vault`. Always answers:
  bad JSON / schema → `invalid_request`, database down or over the latency budget →
  `unavailable` (retry), unexpected failure → `internal`.
- `vault.connections.status`, `vault.grants.list`: core request/reply in queue group `vault`;
  metadata only. If the database is down they do not answer (the asker's timeout says "vault
  unavailable").
- `grants.issued`, `grants.revoked`: durable pull consumers like tokens.*: a newer grant for a
  sandbox (recorded if it verifies; a forged one is dead-lettered), the end of a lease.
"""

import json
import time
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
from shared.events import (
    ConnectionStatusReply,
    ConnectionStatusRequest,
    CredentialsReply,
    CredentialsRequest,
    GrantIssued,
    GrantRevoked,
    GrantsListReply,
    GrantsListRequest,
    TokensIssued,
    TokensRevoked,
)
from shared.logging import get_logger

log = get_logger(__name__)

# Reasons a CredentialsReply may carry (shared.events.CredentialsError); others become "internal".
REPLY_ERRORS = frozenset({"not_connected", "reconnect_required", "unauthorized_requester", "invalid_request",
                          "grant_required", "grant_invalid"})
UNAVAILABLE = frozenset({"store_unavailable", "request_timeout", "concurrency_conflict"})


def reply_error(exc: VaultError) -> str:
    if exc.reason in REPLY_ERRORS:
        return exc.reason
    if exc.reason in UNAVAILABLE:
        return "unavailable"
    return "internal"


def consumer_config(settings: VaultSettings, durable: str, subject: str) -> ConsumerConfig:
    """Redelivery is driven by our nacks (with delay); max_deliver stays unlimited so an
    outage of the database never drops an event — poison is dead-lettered by the handler."""
    return ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=JsAckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max(64, settings.fetch_batch * 4),
        filter_subject=subject,
    )


def tokens_consumer_config(settings: VaultSettings) -> ConsumerConfig:
    return consumer_config(settings, subjects.VAULT_TOKENS_ISSUED_DURABLE, subjects.TOKENS_ISSUED)


def revoked_consumer_config(settings: VaultSettings) -> ConsumerConfig:
    return consumer_config(settings, subjects.VAULT_TOKENS_REVOKED_DURABLE, subjects.TOKENS_REVOKED)


def grants_issued_consumer_config(settings: VaultSettings) -> ConsumerConfig:
    return consumer_config(settings, subjects.VAULT_GRANTS_ISSUED_DURABLE, subjects.GRANTS_ISSUED)


def grants_revoked_consumer_config(settings: VaultSettings) -> ConsumerConfig:
    return consumer_config(settings, subjects.VAULT_GRANTS_REVOKED_DURABLE, subjects.GRANTS_REVOKED)


def durable_configs(settings: VaultSettings) -> tuple[ConsumerConfig, ...]:
    """Every durable consumer of the vault (all on CCBRIDGE_TOKENS)."""
    return (tokens_consumer_config(settings), revoked_consumer_config(settings),
            grants_issued_consumer_config(settings), grants_revoked_consumer_config(settings))


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


def _user_id_of(message: Any) -> str | None:
    """Best effort, for the audit entry of a message we could not parse."""
    try:
        value = json.loads(_body(message)).get("user_id")
    except Exception:  # noqa: BLE001 - not JSON / not an object
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 256 and value.isprintable() else None


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


# --- tokens.issued / tokens.revoked ---------------------------------------------------
def _malformed_handler(vault: Vault, default_subject: str) -> Any:
    """Dead letter for a payload that fails validation, on whichever subject of the router it came."""
    async def on_malformed(exc: ValidationError, message: bus.Message, broker: bus.Broker) -> None:
        # Never log the error itself: pydantic quotes the input.
        subject = getattr(getattr(message, "raw_message", None), "subject", None) or default_subject
        message_id = _message_id(message)
        await bus.dead_letter(broker, subject, _body(message), "invalid_event: schema", message_id=message_id,
                              copy_seq=bus.stream_sequence(message))
        if subject == subjects.TOKENS_ISSUED:
            vault.metrics.issued("dead_lettered")
        log.warning(f"{subject} dead-lettered", reason="invalid_event", nats_msg_id=message_id)
        await vault.record_dead_letter(subject, "invalid_event: schema", event_id=message_id,
                                       user_id=_user_id_of(message))

    return on_malformed


async def _on_error(
    exc: Exception, *, vault: Vault, settings: VaultSettings, subject: str, message: NatsMessage, broker: NatsBroker,
    event_id: str, user_id: str,
) -> None:
    """Dead letter (+ audit) or raise NackMessage, per `on_failure`."""
    delivered = _delivered(message)
    failure = on_failure(exc, delivered, settings)
    error = type(exc).__name__  # the class only: messages may quote inputs
    ids = {"user_id": user_id, "event_id": event_id}
    if failure.dead_letter:
        await bus.dead_letter(broker, subject, message.body, failure.reason, message_id=event_id,
                              copy_seq=bus.stream_sequence(message))
        log.warning(f"{subject} dead-lettered", reason=failure.reason, error=error, **ids)
        await vault.record_dead_letter(subject, failure.reason, event_id=event_id, user_id=user_id)
        if subject == subjects.TOKENS_ISSUED:
            vault.metrics.issued("dead_lettered")
        return
    log.warning(f"{subject} will be retried", reason=failure.reason, error=error,
                delivered=delivered, delay_s=failure.delay_s, **ids)
    if subject == subjects.TOKENS_ISSUED:
        vault.metrics.issued("retried")
    raise NackMessage(delay=failure.delay_s) from None


def build_tokens_router(vault: Vault, settings: VaultSettings) -> NatsRouter:
    router = NatsRouter(
        middlewares=(ExceptionMiddleware(handlers={ValidationError: _malformed_handler(vault, subjects.TOKENS_ISSUED)}),)
    )

    @router.subscriber(
        subjects.TOKENS_ISSUED,
        stream=bus.TOKENS,
        durable=subjects.VAULT_TOKENS_ISSUED_DURABLE,
        pull_sub=PullSub(batch_size=settings.effective_fetch_batch, timeout=settings.fetch_timeout_s),
        config=tokens_consumer_config(settings),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="vault: store issued tokens",
        description="Opens the sealed TokenBundle with the vault key and stores it encrypted.",
    )
    async def on_tokens_issued(event: TokensIssued, message: bus.Message, broker: bus.Broker) -> None:
        ids = {"user_id": event.user_id, "event_id": event.event_id}
        try:
            outcome = await vault.store_issued_tokens(event)
        except Exception as exc:  # noqa: BLE001 - every failure is mapped by on_failure
            await _on_error(exc, vault=vault, settings=settings, subject=subjects.TOKENS_ISSUED, message=message,
                            broker=broker, **ids)
            return
        vault.metrics.issued(outcome.outcome)
        if outcome.duplicate:
            log.info("tokens.issued duplicate ignored", **ids)
        elif outcome.outcome in ("stale", "revoked"):
            log.warning("tokens.issued ignored", why=outcome.outcome, **ids)
        else:
            log.info("tokens stored", version=outcome.version, outcome=outcome.outcome, **ids)

    return router


def build_revoked_router(vault: Vault, settings: VaultSettings) -> NatsRouter:
    router = NatsRouter(
        middlewares=(
            ExceptionMiddleware(handlers={ValidationError: _malformed_handler(vault, subjects.TOKENS_REVOKED)}),
        )
    )

    @router.subscriber(
        subjects.TOKENS_REVOKED,
        stream=bus.TOKENS,
        durable=subjects.VAULT_TOKENS_REVOKED_DURABLE,
        pull_sub=PullSub(batch_size=settings.effective_fetch_batch, timeout=settings.fetch_timeout_s),
        config=revoked_consumer_config(settings),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="vault: revoke a connection",
        description="Crypto-shreds the user's sealed secret (wrapped data key and ciphertext) and the row.",
    )
    async def on_tokens_revoked(event: TokensRevoked, message: bus.Message, broker: bus.Broker) -> None:
        ids = {"user_id": event.user_id, "event_id": event.event_id}
        try:
            outcome = await vault.revoke(event)
        except Exception as exc:  # noqa: BLE001 - every failure is mapped by on_failure
            await _on_error(exc, vault=vault, settings=settings, subject=subjects.TOKENS_REVOKED, message=message,
                            broker=broker, **ids)
            return
        vault.metrics.revocation(outcome.outcome)
        log.info("tokens revoked" if outcome.outcome == "revoked" else "tokens.revoked handled",
                 outcome=outcome.outcome, **ids)

    return router


def build_grants_router(vault: Vault, settings: VaultSettings) -> NatsRouter:
    leases = vault.leases
    router = NatsRouter(
        middlewares=(ExceptionMiddleware(handlers={
            ValidationError: _malformed_handler(vault, subjects.GRANTS_ISSUED),
        }),)
    )
    pull = PullSub(batch_size=settings.effective_fetch_batch, timeout=settings.fetch_timeout_s)

    @router.subscriber(
        subjects.GRANTS_ISSUED,
        stream=bus.TOKENS,
        durable=subjects.VAULT_GRANTS_ISSUED_DURABLE,
        pull_sub=pull,
        config=grants_issued_consumer_config(settings),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="vault: record a newer grant",
        description="Keeps the newest grant per person and sandbox: how a longer or shorter lease reaches a "
        "sandbox that is already live. A grant that does not verify is dead-lettered.",
    )
    async def on_grant_issued(event: GrantIssued, message: bus.Message, broker: bus.Broker) -> None:
        ids = {"user_id": event.user_id, "event_id": event.event_id, "sandbox_id": event.sandbox_id}
        try:
            outcome = await leases.record_grant(event)
        except Exception as exc:  # noqa: BLE001 - every failure is mapped by on_failure
            await _on_error(exc, vault=vault, settings=settings, subject=subjects.GRANTS_ISSUED, message=message,
                            broker=broker, event_id=event.event_id, user_id=event.user_id)
            return
        log.info("grants.issued handled", outcome=outcome, **ids)

    @router.subscriber(
        subjects.GRANTS_REVOKED,
        stream=bus.TOKENS,
        durable=subjects.VAULT_GRANTS_REVOKED_DURABLE,
        pull_sub=pull,
        config=grants_revoked_consumer_config(settings),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        title="vault: end a lease",
        description="The person ended a sandbox's lease: no credentials leave for it any more, and "
        "grants.ended tells the sandbox service to scrub it.",
    )
    async def on_grant_revoked(event: GrantRevoked, message: bus.Message, broker: bus.Broker) -> None:
        ids = {"user_id": event.user_id, "event_id": event.event_id, "sandbox_id": event.sandbox_id}
        try:
            outcome = await leases.end(event)
        except Exception as exc:  # noqa: BLE001 - every failure is mapped by on_failure
            await _on_error(exc, vault=vault, settings=settings, subject=subjects.GRANTS_REVOKED, message=message,
                            broker=broker, event_id=event.event_id, user_id=event.user_id)
            return
        log.info("grants.revoked handled", outcome=outcome, **ids)

    return router


# --- vault.credentials.get ------------------------------------------------------------
def _request_id_of(message: Any) -> str:
    """Best effort: echo the request_id of a request we could not parse."""
    try:
        value = json.loads(_body(message)).get("request_id")
    except Exception:  # noqa: BLE001 - not JSON, not an object: no id to echo
        return ""
    return value if isinstance(value, str) and 0 < len(value) <= 64 else ""


def build_credentials_router(vault: Vault, concurrency: int = 16) -> NatsRouter:
    """`concurrency` requests are served at once (nats-py runs a plain subscription's callback
    one message at a time; a grant waits on the database, so one-by-one caps the rate)."""
    async def invalid_request(exc: ValidationError, message: bus.Message) -> CredentialsReply:
        log.info("credentials request rejected", reason="invalid_request")
        vault.metrics.credential_request("invalid_request")
        return CredentialsReply(request_id=_request_id_of(message), ok=False, error="invalid_request")

    async def internal_error(exc: Exception, message: bus.Message) -> CredentialsReply:
        log.error("credentials request failed", error=type(exc).__name__)
        vault.metrics.credential_request("internal")
        return CredentialsReply(request_id=_request_id_of(message), ok=False, error="internal")

    router = NatsRouter(
        middlewares=(
            ExceptionMiddleware(publish_handlers={ValidationError: invalid_request, Exception: internal_error}),
        )
    )

    @router.subscriber(
        subjects.VAULT_CREDENTIALS_GET,
        queue=subjects.VAULT_QUEUE,
        max_workers=concurrency,
        title="vault: credentials for a sandbox",
        description="Checks the sandbox's grant, then seals the user's tokens to the (trusted) requester key; "
        "never sends a refresh token unless mode is `file` and the grant allows it.",
    )
    async def on_credentials_get(request: CredentialsRequest) -> CredentialsReply:
        ids = {"user_id": request.user_id, "request_id": request.request_id}
        started = time.perf_counter()
        try:
            reply = await vault.release_credentials(request)
        except VaultError as exc:
            error = reply_error(exc)
            vault.metrics.credential_request(error, time.perf_counter() - started)
            level = log.error if error == "internal" else log.warning if error == "unavailable" else log.info
            detail = exc.detail if error.startswith("grant_") else ""
            level("credentials refused", reason=exc.reason, detail=detail, sandbox_id=request.sandbox_id, **ids)
            return CredentialsReply(request_id=request.request_id, ok=False, error=error,  # type: ignore[arg-type]
                                    detail=detail[:200])
        vault.metrics.credential_request("ok", time.perf_counter() - started)
        log.debug("credentials granted", mode=request.mode, **ids)
        return reply

    return router


# --- vault.connections.status -------------------------------------------------------------
def build_status_router(vault: Vault) -> NatsRouter:
    router = NatsRouter()

    @router.subscriber(
        subjects.VAULT_CONNECTIONS_STATUS,
        queue=subjects.VAULT_QUEUE,
        title="vault: connection status",
        description="State, scopes and expiries of a person's connection; never a token.",
    )
    async def on_connection_status(request: ConnectionStatusRequest) -> ConnectionStatusReply:
        return await vault.connection_status(request)

    @router.subscriber(
        subjects.VAULT_GRANTS_LIST,
        queue=subjects.VAULT_QUEUE,
        title="vault: a person's live grants",
        description="The sandboxes whose lease is live: mode, expiry, last injection. Never a token.",
    )
    async def on_grants_list(request: GrantsListRequest) -> GrantsListReply:
        return await vault.leases.list_live(request)

    return router
