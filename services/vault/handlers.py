"""Bus entry points: parse, call one use case, map the result or error. Nothing else.

- `tokens.issued`, `tokens.revoked`, `grants.issued`, `grants.revoked`: durable JetStream pull
  consumers settled by the one delivery policy (shared/delivery.py, docs/delivery.md) — each
  message on its own, also where its work is batched (`tokens.issued`: the messages of one
  fetch are stored in one transaction, `Vault.store_issued_tokens`):
  done / duplicate → ack; poison (bad schema, unopenable box, a forged grant) → dead letter +
  audit + term; database unavailable → held behind its breaker (never redelivered, never lost);
  other retryable errors → nack with backoff; a bug → nack with backoff, dead letter after
  VAULT_POISON_AFTER deliveries.
- `vault.credentials.get`: core request/reply in queue group `vault`. Always answers:
  bad JSON / schema → `invalid_request`, database down or over the latency budget →
  `unavailable` (retry), unexpected failure → `internal`.
- `vault.connections.status`, `vault.grants.list`: core request/reply in queue group `vault`;
  metadata only. If the database is down they do not answer (the asker's timeout says "vault
  unavailable").
"""

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from faststream import AckPolicy, ExceptionMiddleware
from faststream.nats import ConsumerConfig, NatsRouter, PullSub
from faststream.nats.annotations import NatsBroker, NatsMessage
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from services.vault.errors import StoreUnavailable, VaultError
from services.vault.settings import VaultSettings
from services.vault.use_cases import Vault, reply_error
from shared import broker as bus
from shared import subjects
from shared.broker import BrokerDeadLetters
from shared.delivery import Backoff, Delivery, DeliveryPolicy
from shared.events import (
    AnyCredentialsReply,
    AnyCredentialsRequest,
    ConnectionStatusReply,
    ConnectionStatusRequest,
    CredentialsBatchReply,
    CredentialsBatchRequest,
    CredentialsReply,
    GrantIssued,
    GrantRevoked,
    GrantsListReply,
    GrantsListRequest,
    TokensIssued,
    TokensRevoked,
)
from shared.logging import get_logger

log = get_logger(__name__)
DATABASE = StoreUnavailable.dependency

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


def delivery_policy(settings: VaultSettings, vault: Vault, broker: NatsBroker) -> DeliveryPolicy:
    """The vault's shape of the one delivery policy (shared/delivery.py): the database is the
    dependency (held behind the breaker the credential path shares, for ever: an outage must
    not lose an event); poison is dead-lettered at once (nobody else to tell); a bug is
    dead-lettered after VAULT_POISON_AFTER deliveries."""
    return DeliveryPolicy(
        breakers=vault.breakers,
        dead_letters=BrokerDeadLetters(broker),
        window_s=0,
        poison_after=settings.poison_after,
        keep_final=True,
        backoff=Backoff(1.0, settings.retry_max_delay_s),
        ack_wait_s=settings.ack_wait_s,
    )


# --- tokens.issued / tokens.revoked ---------------------------------------------------
def _malformed_handler(vault: Vault, default_subject: str) -> Any:
    """Dead letter for a payload that fails validation, on whichever subject of the router it came."""
    async def on_malformed(exc: ValidationError, message: bus.Message, broker: bus.Broker) -> None:
        # Never log the error itself: pydantic quotes the input.
        delivery = Delivery.of(message)
        subject = delivery.subject or default_subject
        await bus.dead_letter(broker, subject, delivery.body, "invalid_event: schema",
                              message_id=delivery.dead_letter_id(), copy_seq=delivery.stream_seq)
        if subject == subjects.TOKENS_ISSUED:
            vault.metrics.issued("dead_lettered")
        log.warning(f"{subject} dead-lettered", reason="invalid_event", nats_msg_id=delivery.message_id)
        await vault.record_dead_letter(subject, "invalid_event: schema", event_id=delivery.message_id,
                                       user_id=_user_id_of(message))
        await message.ack()

    return on_malformed


class Consumer:
    """One of the vault's durable consumers: its use case run under the delivery policy, its
    failures logged (the error's class only: messages may quote inputs), counted and audited."""

    def __init__(self, vault: Vault, policy: DeliveryPolicy, subject: str,
                 count: Callable[[str], None] | None = None) -> None:
        self._vault = vault
        self._subject = subject
        self._count = count
        self._policy = replace(policy, observe=self._observe)

    def _observe(self, outcome: str, reason: str) -> None:
        if self._count is not None and outcome in ("retried", "dead_lettered"):
            self._count(outcome)

    async def handle(self, message: NatsMessage, work: Callable[[], Awaitable[Any]], *, event_id: str,
                     user_id: str) -> Any:
        ids = {"user_id": user_id, "event_id": event_id}
        result: list[Any] = []

        async def run() -> None:
            result.append(await work())

        async def final(exc: BaseException, detail: str, exhausted: bool) -> None:
            reason = getattr(exc, "reason", "max_deliveries")
            log.warning(f"{self._subject} dead-lettered", reason=reason, error=type(exc).__name__, **ids)
            await self._vault.record_dead_letter(self._subject, reason, event_id=event_id, user_id=user_id)

        await self._policy.handle(message, run, final=final, needs=(DATABASE,))
        return result[0] if result else None


def _durable(router: NatsRouter, settings: VaultSettings, config: ConsumerConfig, title: str, description: str,
             *, batch: int | None = None) -> Any:
    """A pull consumer: FastStream fetches `batch` messages and hands them to this handler at
    once, each settled on its own by the delivery policy; the next fetch follows when all are."""
    if config.filter_subject is None:  # every vault consumer reads one subject of the stream
        raise ValueError(f"consumer {config.durable_name} names no subject")
    return router.subscriber(
        config.filter_subject,
        stream=bus.TOKENS,
        durable=config.durable_name,
        pull_sub=PullSub(batch_size=batch or settings.effective_fetch_batch, timeout=settings.fetch_timeout_s),
        config=config,
        ack_policy=AckPolicy.MANUAL,  # the delivery policy settles every message
        title=title,
        description=description,
    )


def _invalid_events(vault: Vault, default_subject: str) -> tuple[ExceptionMiddleware]:
    return (ExceptionMiddleware(handlers={ValidationError: _malformed_handler(vault, default_subject)}),)


def build_tokens_router(vault: Vault, settings: VaultSettings, policy: DeliveryPolicy) -> NatsRouter:
    router = NatsRouter(middlewares=_invalid_events(vault, subjects.TOKENS_ISSUED))
    consumer = Consumer(vault, policy, subjects.TOKENS_ISSUED, count=vault.metrics.issued)

    # The messages of one fetch reach Vault.store_issued_tokens together and are stored in one
    # transaction (shared.batching.Coalescer); each is still acked, held or dead-lettered alone.
    @_durable(router, settings, tokens_consumer_config(settings), "vault: store issued tokens",
              "Opens the sealed TokenBundle with the vault key and stores it encrypted.",
              batch=settings.issued_fetch_batch)
    async def on_tokens_issued(event: TokensIssued, message: bus.Message) -> None:
        ids = {"user_id": event.user_id, "event_id": event.event_id}
        outcome = await consumer.handle(message, lambda: vault.store_issued_tokens(event), **ids)
        if outcome is None:  # failed: settled (and counted) by the policy
            return
        vault.metrics.issued(outcome.outcome)
        if outcome.duplicate:
            log.info("tokens.issued duplicate ignored", **ids)
        elif outcome.outcome in ("stale", "revoked"):
            log.warning("tokens.issued ignored", why=outcome.outcome, **ids)
        else:
            log.info("tokens stored", version=outcome.version, outcome=outcome.outcome, **ids)

    return router


def build_revoked_router(vault: Vault, settings: VaultSettings, policy: DeliveryPolicy) -> NatsRouter:
    router = NatsRouter(middlewares=_invalid_events(vault, subjects.TOKENS_REVOKED))
    consumer = Consumer(vault, policy, subjects.TOKENS_REVOKED)

    @_durable(router, settings, revoked_consumer_config(settings), "vault: revoke a connection",
              "Crypto-shreds the user's sealed secret (wrapped data key and ciphertext) and the row.")
    async def on_tokens_revoked(event: TokensRevoked, message: bus.Message) -> None:
        ids = {"user_id": event.user_id, "event_id": event.event_id}
        outcome = await consumer.handle(message, lambda: vault.revoke(event), **ids)
        if outcome is None:
            return
        vault.metrics.revocation(outcome.outcome)
        log.info("tokens revoked" if outcome.outcome == "revoked" else "tokens.revoked handled",
                 outcome=outcome.outcome, **ids)

    return router


def build_grants_router(vault: Vault, settings: VaultSettings, policy: DeliveryPolicy) -> NatsRouter:
    leases = vault.leases
    router = NatsRouter(middlewares=_invalid_events(vault, subjects.GRANTS_ISSUED))
    issued = Consumer(vault, policy, subjects.GRANTS_ISSUED)
    revoked = Consumer(vault, policy, subjects.GRANTS_REVOKED)

    @_durable(router, settings, grants_issued_consumer_config(settings), "vault: record a newer grant",
              "Keeps the newest grant per person and sandbox: how a longer or shorter lease reaches a "
              "sandbox that is already live. A grant that does not verify is dead-lettered.")
    async def on_grant_issued(event: GrantIssued, message: bus.Message) -> None:
        outcome = await issued.handle(message, lambda: leases.record_grant(event),
                                      event_id=event.event_id, user_id=event.user_id)
        if outcome is not None:
            log.info("grants.issued handled", outcome=outcome, user_id=event.user_id, event_id=event.event_id,
                     sandbox_id=event.sandbox_id)

    @_durable(router, settings, grants_revoked_consumer_config(settings), "vault: end a lease",
              "The person ended a sandbox's lease: no credentials leave for it any more, and "
              "grants.ended tells the sandbox service to scrub it.")
    async def on_grant_revoked(event: GrantRevoked, message: bus.Message) -> None:
        outcome = await revoked.handle(message, lambda: leases.end(event),
                                       event_id=event.event_id, user_id=event.user_id)
        if outcome is not None:
            log.info("grants.revoked handled", outcome=outcome, user_id=event.user_id, event_id=event.event_id,
                     sandbox_id=event.sandbox_id)

    return router


# --- vault.credentials.get ------------------------------------------------------------
def _request_id_of(message: Any) -> str:
    """Best effort: echo the request_id of a request we could not parse."""
    try:
        value = json.loads(_body(message)).get("request_id")
    except Exception:  # noqa: BLE001 - not JSON, not an object: no id to echo
        return ""
    return value if isinstance(value, str) and 0 < len(value) <= 64 else ""


def _refusal(message: Any, error: str) -> AnyCredentialsReply:
    """A whole-request refusal in the version the asker spoke (best effort for unparsable ones)."""
    try:
        version = json.loads(_body(message)).get("schema_version")
    except Exception:  # noqa: BLE001 - not JSON, not an object: answer version 1
        version = 1
    if version == 2:
        return CredentialsBatchReply(request_id=_request_id_of(message), ok=False, error=error)
    return CredentialsReply(request_id=_request_id_of(message), ok=False, error=error)


def build_credentials_router(vault: Vault, concurrency: int = 16) -> NatsRouter:
    """`concurrency` requests are served at once (nats-py runs a plain subscription's callback
    one message at a time; a release waits on the database, so one-by-one caps the rate).
    Version 1 asks for one sandbox; version 2 for many (one database round, one sealed box)."""
    async def invalid_request(exc: ValidationError, message: bus.Message) -> AnyCredentialsReply:
        log.info("credentials request rejected", reason="invalid_request")
        vault.metrics.credential_request("invalid_request")
        return _refusal(message, "invalid_request")

    async def internal_error(exc: Exception, message: bus.Message) -> AnyCredentialsReply:
        log.error("credentials request failed", error=type(exc).__name__)
        vault.metrics.credential_request("internal")
        return _refusal(message, "internal")

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
    async def on_credentials_get(request: AnyCredentialsRequest) -> AnyCredentialsReply:
        if isinstance(request, CredentialsBatchRequest):
            return await _batch(request)
        ids = {"user_id": request.user_id, "request_id": request.request_id}
        started = time.perf_counter()
        try:
            reply = await vault.release_credentials(request)
        except VaultError as exc:
            error = reply_error(exc)
            vault.metrics.credential_request(error, time.perf_counter() - started)
            _log_refusal(exc, error, sandbox_id=request.sandbox_id, **ids)
            detail = exc.detail if error.startswith("grant_") else ""
            return CredentialsReply(request_id=request.request_id, ok=False, error=error,
                                    detail=detail[:200])
        vault.metrics.credential_request("ok", time.perf_counter() - started)
        log.debug("credentials granted", mode=request.mode, **ids)
        return reply

    async def _batch(request: CredentialsBatchRequest) -> CredentialsBatchReply:
        started = time.perf_counter()
        try:
            reply = await vault.release_batch(request)
        except VaultError as exc:  # the whole request: untrusted requester, database down, over budget
            error = reply_error(exc)
            for _ in request.items:
                vault.metrics.credential_request(error)
            _log_refusal(exc, error, request_id=request.request_id, items=len(request.items))
            return CredentialsBatchReply(request_id=request.request_id, ok=False, error=error)
        elapsed = time.perf_counter() - started
        for result in reply.items:
            vault.metrics.credential_request(result.error or "ok", elapsed)
        log.debug("credentials batch answered", request_id=request.request_id, items=len(reply.items),
                  refused=sum(not r.ok for r in reply.items))
        return reply

    return router


def _log_refusal(exc: VaultError, error: str, **fields: Any) -> None:
    level = log.error if error == "internal" else log.warning if error == "unavailable" else log.info
    level("credentials refused", reason=exc.reason, detail=exc.detail if error.startswith("grant_") else "", **fields)


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
