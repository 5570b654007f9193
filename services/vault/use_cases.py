"""The vault's use cases. They talk to ports (unit of work, publisher) and to the sealing
contract; the bus entry points in `handlers.py` only parse, call one of these, and map the
result. The refresher lives in `refresher.py`, key rotation in `tools.py`.

Idempotency: `tokens.issued` and `tokens.revoked` are processed at most once per `event_id` —
the id is recorded in `processed_events` in the same transaction as the change, so a
redelivery (or a duplicate that slipped past JetStream's window) changes nothing.

Ordering: a `tokens.issued` older than the login the vault holds (`occurred_at` < the stored
`issued_at`), or older than the user's last revocation, is ignored (and audited): consumers of
different subjects run independently, so "revoke, then a delayed issue" must not resurrect
tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from services.vault.domain import (
    Account,
    AuditEntry,
    Connection,
    ConnectionSummary,
    Credentials,
    IssuedLogin,
    SandboxLease,
    login_supersedes,
)
from services.vault.errors import (
    GrantInvalid,
    InvalidEvent,
    KeyringError,
    NotConnected,
    RefreshRejected,
    RefreshTransient,
    RequestTimeout,
    StoreUnavailable,
    UnopenableBox,
    VaultError,
)
from services.vault.leases import Leases
from services.vault.metrics import VaultMetrics
from services.vault.ports import AuditSink, TokenEndpoint, UnitOfWork
from services.vault.trust import TrustStore
from shared import subjects
from shared.batching import Coalescer
from shared.delivery import Breakers
from shared.events import (
    AccountInfo,
    ConnectionStatusReply,
    ConnectionStatusRequest,
    CredentialsBatchReply,
    CredentialsBatchRequest,
    CredentialsItem,
    CredentialsItemResult,
    CredentialsReply,
    CredentialsRequest,
    ReleasedItem,
    ReleasedItems,
    TokenBundle,
    TokensIssued,
    TokensRevoked,
    utcnow,
)
from shared.grants import GrantClaims
from shared.logging import get_logger
from shared.sealing import KeyPair, Recipient, SealingError, open_tokens, reply_binding, seal

log = get_logger(__name__)

ReadForRelease = Callable[
    [Sequence[tuple[str, str | None]]],
    Awaitable[tuple[dict[str, "Connection | KeyringError"], dict[tuple[str, str], SandboxLease]]],
]


@dataclass(frozen=True)
class StoreOutcome:
    duplicate: bool
    version: int | None = None
    outcome: str = "stored"  # stored | replaced_undecryptable | duplicate | stale | revoked


@dataclass(frozen=True)
class PreparedIssue:
    """A `tokens.issued` whose box opened: what storing it needs (never logged: tokens inside)."""

    event: TokensIssued
    login: IssuedLogin
    now: datetime

    @property
    def issued_at(self) -> datetime:
        return self.login.issued_at or self.now


@dataclass(frozen=True)
class RevokeOutcome:
    outcome: str  # revoked | not_connected | duplicate
    version: int | None = None


class Vault:
    """Holds the key material (loaded once, at start) and runs the use cases."""

    def __init__(
        self,
        *,
        unit_of_work: Callable[[], UnitOfWork],
        keypair: KeyPair,
        trusted: TrustStore,
        clock: Callable[[], datetime] = utcnow,
        actor: str = "vault",
        metrics: VaultMetrics | None = None,
        audit: AuditSink,
        request_timeout_s: float | None = None,
        audit_grants: bool = True,
        read_for_release: ReadForRelease,
        leases: Leases,
        token_endpoint: TokenEndpoint | None = None,
        revoke_attempts: int = 3,
        revoke_backoff_s: float = 1.0,
        breakers: Breakers | None = None,
        issued_batch: int = 64,
    ) -> None:
        """`read_for_release`: the store's read-only lookup of a connection and a sandbox lease
        (the hot path). `token_endpoint`: where disconnecting revokes the login (None: nowhere)."""
        self._uow = unit_of_work
        self._read_for_release = read_for_release
        self.leases = leases
        self._token_endpoint = token_endpoint
        self._revoke_attempts = revoke_attempts
        self._revoke_backoff = revoke_backoff_s
        self.breakers = breakers or Breakers()
        self._keypair = keypair
        self._trusted = trusted if isinstance(trusted, TrustStore) else TrustStore.fixed(trusted)
        self._clock = clock
        self.actor = actor
        self.metrics = metrics or VaultMetrics()
        self.audit_sink = audit
        self._request_timeout = request_timeout_s
        self._audit_grants = audit_grants
        self._failure_audited: dict[tuple[str, str], float] = {}
        self._issued: Coalescer[PreparedIssue, StoreOutcome] = Coalescer(
            self.store_issued_batch, max_batch=issued_batch, gather_rounds=2, name="vault-tokens-issued")

    def __repr__(self) -> str:
        return f"Vault(key_id={self._keypair.key_id!r}, trusted_requesters={len(self._trusted)})"

    @property
    def trust(self) -> TrustStore:
        return self._trusted

    # --- audit helpers ----------------------------------------------------------------
    async def audit(self, entry: AuditEntry) -> None:
        """Write one entry in its own transaction; a failure is logged, never raised."""
        try:
            with self.metrics.store_timer("audit"):
                async with self._uow() as uow:
                    await uow.audit.add(entry, self._clock())
                    await uow.commit()
        except Exception as exc:  # noqa: BLE001 - auditing must not break the caller's error path
            log.error("audit entry not written", action=entry.action, user_id=entry.user_id, error=type(exc).__name__)

    def _buffered(self, entry: AuditEntry) -> None:
        self.audit_sink.submit(entry, self._clock())

    async def record_keyring_failure(
        self, user_id: str, exc: KeyringError, *, action: str, kek_id: str | None = None, version: int | None = None
    ) -> None:
        """A record that does not decrypt is never silent: error log, metric, audit entry (at
        most one per user and reason per minute, so a hot loop cannot flood the log)."""
        self.metrics.decrypt_failure(exc.reason)
        kek_id = kek_id or getattr(exc, "kek_id", None)
        log.error("credentials record does not decrypt", user_id=user_id, reason=exc.reason, kek_id=kek_id,
                  action=action)
        key = (user_id, exc.reason)
        now = time.monotonic()
        if now - self._failure_audited.get(key, -3600.0) < 60.0:
            return
        self._failure_audited[key] = now
        if len(self._failure_audited) > 10_000:
            self._failure_audited.clear()
        await self.audit(
            AuditEntry(actor=self.actor, action=action, outcome="error", user_id=user_id, reason=exc.reason,
                       kek_id=kek_id, version=version)
        )

    async def record_dead_letter(self, subject: str, reason: str, *, event_id: str | None, user_id: str | None) -> None:
        await self.audit(
            AuditEntry(actor=f"event:{subject}", action="dead_lettered", outcome="error", user_id=user_id,
                       reason=reason, event_id=event_id)
        )

    # --- tokens.issued ----------------------------------------------------------
    def open_bundle(self, event: TokensIssued) -> TokenBundle:
        try:
            plaintext = open_tokens(event, self._keypair)
        except SealingError as exc:
            raise UnopenableBox(str(exc)) from None
        try:
            return TokenBundle.model_validate_json(plaintext)
        except ValidationError:
            # `from None`: the validation error quotes its input, i.e. the tokens.
            raise InvalidEvent("sealed payload is not a TokenBundle") from None

    async def store_issued_tokens(self, event: TokensIssued) -> StoreOutcome:
        """Open the sealed bundle (a box that does not open fails this event alone), then store it
        with the other `tokens.issued` in hand: one transaction per batch (`store_issued_batch`);
        at light load a batch of one, at once."""
        return await self._issued.submit(self.prepare_issued(event))

    def prepare_issued(self, event: TokensIssued) -> PreparedIssue:
        bundle = self.open_bundle(event)
        now = self._clock()
        issued_at = min(event.occurred_at, now)  # a publisher's clock cannot date a login in the future
        # Values inside the sealed box are authenticated; the plaintext event fields are not.
        login = IssuedLogin(
            kind=event.kind,
            credentials=Credentials(access_token=bundle.access_token, refresh_token=bundle.refresh_token),
            scopes=tuple(bundle.scopes or event.scopes),
            expires_at=bundle.expires_at,
            refresh_token_expires_at=event.refresh_token_expires_at,
            account=Account(**event.account.model_dump()) if event.account else None,
            issued_at=issued_at,
        )
        return PreparedIssue(event, login, now)

    async def store_issued_batch(self, items: Sequence[PreparedIssue]) -> list[StoreOutcome | BaseException]:
        """Store several prepared `tokens.issued` in ONE transaction: their ids recorded in one
        statement, the people's revocations and connections read in one statement each, the new
        and changed connections and the audit entries written in one statement per table.

        Per event, the rules of a single one hold (in order: a duplicate id — also twice in this
        batch — does nothing; a login older than a revocation or than the login held is ignored
        and audited; an unreadable row is replaced). If the batch fails for any reason but the
        database being unavailable (a row that changed concurrently, a bug), each event is tried
        again alone, so one failing event never holds back the others; `StoreUnavailable` is the
        whole batch's (every event is held)."""
        try:
            return list(await self._store_issued_together(items))
        except StoreUnavailable:
            raise
        except Exception:
            if len(items) == 1:
                raise
            log.warning("tokens.issued batch failed: storing its events one by one", events=len(items))
        outcomes: list[StoreOutcome | BaseException] = []
        for item in items:
            try:
                outcomes.extend(await self._store_issued_together([item]))
            except StoreUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - this event's own failure, settled by its handler
                outcomes.append(exc)
        return outcomes

    async def _store_issued_together(self, items: Sequence[PreparedIssue]) -> list[StoreOutcome]:
        actor = f"event:{subjects.TOKENS_ISSUED}"
        outcomes: list[StoreOutcome | None] = [None] * len(items)
        with self.metrics.store_timer("store_issued"):
            async with self._uow() as uow:
                # first statement: takes SQLite's write lock, so nothing read below changes before commit
                fresh = await uow.processed_events.mark_many([i.event.event_id for i in items], subjects.TOKENS_ISSUED)
                todo: list[int] = []
                for index, item in enumerate(items):
                    if item.event.event_id in fresh:
                        fresh.discard(item.event.event_id)  # a second copy in this batch is a duplicate
                        todo.append(index)
                    else:
                        outcomes[index] = StoreOutcome(duplicate=True, outcome="duplicate")
                if not todo:
                    return [o for o in outcomes if o is not None]
                users = list(dict.fromkeys(items[i].event.user_id for i in todo))
                revoked = await uow.revocations.revoked_at_many(users)
                current = await uow.connections.get_many(users, for_update=True)
                read_version = {user: summary.version for user, (summary, _) in current.items()}
                added: dict[str, Connection] = {}
                changed: dict[str, Connection] = {}
                audit: list[tuple[AuditEntry, datetime]] = []

                def entry(event: TokensIssued, action: str, outcome: str = "ok", **facts: Any
                          ) -> tuple[AuditEntry, datetime]:
                    return (AuditEntry(actor=actor, action=action, outcome=outcome, user_id=event.user_id,
                                       event_id=event.event_id, **facts), self._clock())

                for index in todo:
                    item = items[index]
                    event, login, issued_at = item.event, item.login, item.issued_at

                    revoked_at = revoked.get(event.user_id)
                    if revoked_at is not None and issued_at <= revoked_at:
                        audit.append(entry(event, "tokens_ignored", "ignored", reason="revoked_after_issue"))
                        outcomes[index] = StoreOutcome(duplicate=False, outcome="revoked")
                        continue
                    found = current.get(event.user_id)
                    if found is None:
                        connection = Connection.connect(event.user_id, login, now=item.now)
                        added[event.user_id] = connection
                        outcome = "stored"
                    else:
                        summary, existing = found
                        if not login_supersedes(issued_at, summary.issued_at):
                            audit.append(entry(event, "tokens_ignored", "ignored", reason="older_than_current_login",
                                               version=summary.version))
                            outcomes[index] = StoreOutcome(duplicate=False, version=summary.version, outcome="stale")
                            continue
                        if isinstance(existing, KeyringError):
                            # The row can never be read again (retired/unknown KEK, tampering): a new
                            # login replaces it — the old sealed secret is overwritten (crypto-shred).
                            connection = Connection.connect(event.user_id, login, now=item.now,
                                                            version=summary.version + 1)
                            audit.append(entry(event, "undecryptable_replaced", reason=existing.reason,
                                               kek_id=summary.kek_id, version=connection.version))
                            self.metrics.decrypt_failure(existing.reason)
                            outcome = "replaced_undecryptable"
                        else:
                            existing.reconnect(login, now=item.now)
                            connection = existing
                            outcome = "stored"
                        (added if event.user_id in added else changed)[event.user_id] = connection
                    current[event.user_id] = (connection.summary(), connection)
                    if outcome == "stored":
                        audit.append(entry(event, "tokens_stored", version=connection.version,
                                           detail={"kind": connection.kind}))
                    outcomes[index] = StoreOutcome(duplicate=False, version=connection.version, outcome=outcome)
                await uow.connections.add_many(list(added.values()))
                await uow.connections.update_many([(c, read_version[user]) for user, c in changed.items()])
                await uow.audit.add_many(audit)
                await uow.commit()
        return [o for o in outcomes if o is not None]

    # --- tokens.revoked ---------------------------------------------------------------
    async def revoke(self, event: TokensRevoked, *, actor: str | None = None) -> RevokeOutcome:
        """Crypto-shred: the sealed secret (the only copy of the wrapped data key) and the
        connection row are deleted in one transaction, with a tombstone and an audit entry;
        then the login is revoked at the OAuth server (as `claude auth logout` does), so a
        refresh token that ever left the vault (`file` mode) dies too.

        The tombstone's time is the event's, but never later than now: a publisher's clock
        must not lock the person out of logins they make after it."""
        actor = actor or f"event:{subjects.TOKENS_REVOKED}"
        refresh_token: str | None = None
        with self.metrics.store_timer("revoke"):
            async with self._uow() as uow:
                if not await uow.processed_events.mark_processed(event.event_id, subjects.TOKENS_REVOKED):
                    return RevokeOutcome("duplicate")
                try:
                    existing = await uow.connections.get(event.user_id, for_update=True)
                except KeyringError:  # unreadable: nothing to revoke with, shred it all the same
                    existing = None
                if existing is not None and existing.can_refresh:
                    refresh_token = existing.credentials.refresh_token
                removed: ConnectionSummary | None = await uow.connections.delete(event.user_id)
                await uow.revocations.record(event.user_id, min(event.occurred_at, self._clock()), event.event_id)
                outcome = "revoked" if removed is not None else "not_connected"
                await uow.audit.add(
                    AuditEntry(
                        actor=actor,
                        action="revoked",
                        outcome=outcome,
                        user_id=event.user_id,
                        reason=event.reason,
                        event_id=event.event_id,
                        kek_id=removed.kek_id if removed else None,
                        version=removed.version if removed else None,
                    ),
                    self._clock(),
                )
                await uow.commit()
        if removed is not None:
            await self._revoke_at_provider(event, refresh_token, actor=actor)
        return RevokeOutcome(outcome, removed.version if removed else None)

    async def _revoke_at_provider(self, event: TokensRevoked, refresh_token: str | None, *, actor: str) -> None:
        """`POST <token URL>/revoke`, retried with backoff; the outcome is audited. The vault's
        copy is already gone, so a provider that stays down leaves only a login nobody holds
        (by default the refresh token never left the vault), which lapses on its own."""
        if self._token_endpoint is None:
            return
        if refresh_token is None:
            self.metrics.provider_revocation("no_refresh_token")
            return
        outcome, detail = "failed", ""
        for attempt in range(1, self._revoke_attempts + 1):
            try:
                await self._token_endpoint.revoke(refresh_token)
            except RefreshTransient as exc:
                detail = exc.detail
                if attempt < self._revoke_attempts:
                    await asyncio.sleep(self._revoke_backoff * 2 ** (attempt - 1))
                continue
            except RefreshRejected as exc:
                outcome, detail = "already_invalid", exc.detail
            else:
                outcome, detail = "revoked", ""
            break
        self.metrics.provider_revocation(outcome)
        level = log.warning if outcome == "failed" else log.info
        level("login revoked at the OAuth server" if outcome != "failed" else "login not revoked at the OAuth server",
              user_id=event.user_id, outcome=outcome, event_id=event.event_id)
        await self.audit(AuditEntry(actor=actor, action="provider_revoke", user_id=event.user_id,
                                    outcome="ok" if outcome != "failed" else "error", reason=detail[:200] or outcome,
                                    event_id=event.event_id))

    # --- vault.connections.status ------------------------------------------------------
    async def connection_status(self, request: ConnectionStatusRequest) -> ConnectionStatusReply:
        """What the vault holds for a person, without decrypting anything."""
        with self.metrics.store_timer("status"):
            async with self._uow() as uow:
                summary = await uow.connections.summary(request.user_id)
        if summary is None:
            return ConnectionStatusReply(connected=False)
        return ConnectionStatusReply(
            connected=True,
            state=summary.state,
            kind=summary.kind,
            scopes=list(summary.scopes),
            expires_at=summary.expires_at,
            refresh_token_expires_at=summary.refresh_token_expires_at,
            account=AccountInfo(**summary.account.to_dict()) if summary.account else None,
            version=summary.version,
        )

    # --- housekeeping ---------------------------------------------------------------------
    async def housekeeping(
        self, *, processed_retention_s: float, audit_retention_s: float = 0.0, lease_retention_s: float = 0.0
    ) -> dict[str, int]:
        """Retention: processed event ids and revocation tombstones older than
        `processed_retention_s`, audit entries older than `audit_retention_s` (0 = keep), ended
        sandbox leases older than `lease_retention_s` (0 = keep); refreshes the
        connections-by-state gauge. Idempotent: every replica may run it."""
        now = self._clock()
        cutoff = now - timedelta(seconds=processed_retention_s)
        removed = {"processed_events": 0, "revocations": 0, "audit": 0, "sandbox_leases": 0}
        while True:  # in batches, so one huge backlog never holds a long transaction
            async with self._uow() as uow:
                deleted = await uow.processed_events.delete_older_than(cutoff)
                await uow.commit()
            removed["processed_events"] += deleted
            if deleted < 5000:
                break
        async with self._uow() as uow:
            removed["revocations"] = await uow.revocations.delete_older_than(cutoff)
            if audit_retention_s > 0:
                removed["audit"] = await uow.audit.delete_older_than(now - timedelta(seconds=audit_retention_s))
            if lease_retention_s > 0:
                removed["sandbox_leases"] = await uow.sandbox_leases.delete_ended_before(
                    int((now.timestamp() - lease_retention_s) * 1000))
            counts = await uow.connections.count_by_state()
            await uow.commit()
        self.metrics.set_connections(counts)
        return removed

    # --- vault.credentials.get ----------------------------------------------------
    async def release_credentials(self, request: CredentialsRequest) -> CredentialsReply:
        """Version 1 (one sandbox): seal the user's tokens to a trusted requester for a granted
        sandbox, within the latency budget (`RequestTimeout` after VAULT_REQUEST_TIMEOUT_S).
        Raises the item's error (the handler maps it onto the reply)."""
        recipient, [outcome] = await self._within_budget(request, [_item_of(request)])
        if outcome.error is not None:
            raise outcome.error
        assert outcome.bundle is not None
        sealed = seal(outcome.bundle.model_dump_json().encode(), recipient, subject=subjects.VAULT_CREDENTIALS_GET,
                      message_id=request.request_id, bind=reply_binding(request.user_id, request.sandbox_id))
        return CredentialsReply(request_id=request.request_id, ok=True, sealed=sealed,
                                expires_at=outcome.bundle.expires_at, scopes=list(outcome.bundle.scopes),
                                lease_expires_at=outcome.lease_expires_at)

    async def release_batch(self, request: CredentialsBatchRequest) -> CredentialsBatchReply:
        """Version 2 (many sandboxes): one database round for all, one box sealed to the
        requester with every released bundle, one result per item. Raises only for the whole
        request (untrusted requester, over the latency budget, database down)."""
        recipient, outcomes = await self._within_budget(request, request.items)
        released = [ReleasedItem(request_id=o.item.request_id, user_id=o.item.user_id, sandbox_id=o.item.sandbox_id,
                                 bundle=o.bundle) for o in outcomes if o.bundle is not None]
        sealed = None
        if released:
            sealed = seal(ReleasedItems(items=released).model_dump_json().encode(), recipient,
                          subject=subjects.VAULT_CREDENTIALS_GET, message_id=request.request_id)
        return CredentialsBatchReply(request_id=request.request_id, ok=True, sealed=sealed,
                                     items=[o.result() for o in outcomes])

    async def _within_budget(
        self, request: CredentialsRequest | CredentialsBatchRequest, items: Sequence[CredentialsItem]
    ) -> tuple[Recipient, list[ItemOutcome]]:
        try:
            recipient = self._trusted.recipient(request.requester_public_key, request.requester_key_id)
        except VaultError as exc:
            if exc.reason == "unauthorized_requester":
                for item in items:
                    self._refused(item, exc, request.requester_key_id)
            raise
        if self._request_timeout is None:
            return recipient, await self._release(items, recipient)
        try:
            async with asyncio.timeout(self._request_timeout):
                return recipient, await self._release(items, recipient)
        except TimeoutError:
            raise RequestTimeout(f"no answer within {self._request_timeout}s") from None

    def _refused(self, item: CredentialsItem, exc: VaultError, requester: str) -> None:
        if self._audit_grants:
            self._buffered(AuditEntry(actor=f"requester:{requester[:64]}", action="credentials_refused",
                                      outcome="error", user_id=item.user_id, reason=exc.reason,
                                      detail={"sandbox_id": item.sandbox_id, "why": exc.detail[:120]}))

    async def _release(self, items: Sequence[CredentialsItem], recipient: Recipient) -> list[ItemOutcome]:
        """Nothing is read or sealed for an item before its grant checks out; the connections and
        leases of all the others are read in one round, new leases written in one transaction."""
        outcomes = [ItemOutcome(item) for item in items]
        claims: dict[int, GrantClaims] = {}
        for index, outcome in enumerate(outcomes):
            try:
                found = self.leases.claims_of(outcome.item)
            except VaultError as exc:
                outcome.error = exc
                self._refused(outcome.item, exc, recipient.key_id)
                continue
            if found is not None:
                claims[index] = found
        live = [o for o in outcomes if o.error is None]
        if not live:
            return outcomes
        wanted = [(o.item.user_id, o.item.sandbox_id if index in claims else None)
                  for index, o in enumerate(outcomes) if o.error is None]
        database = self.breakers["database"]
        if not database.try_admit():  # down a moment ago: answer at once, one probe at a time finds it back
            raise StoreUnavailable("the vault's database is unavailable")
        try:
            with self.metrics.store_timer("release"):
                connections, leases = await self._read_for_release(wanted)
        except StoreUnavailable:
            database.failed()
            raise
        database.succeeded()
        if claims:
            offered = [(c, leases.get((c.sub, c.sbx))) for c in claims.values()]
            now = self.leases.now_ms()
            for index, lease in zip(claims, await self.leases.admit(offered), strict=True):
                outcome = outcomes[index]
                try:
                    if isinstance(lease, GrantInvalid):
                        raise lease
                    lease.check(outcome.item.mode, now)
                except GrantInvalid as exc:
                    outcome.error = exc
                    self._refused(outcome.item, exc, recipient.key_id)
                    continue
                outcome.lease_expires_at = lease.expires_at
        for outcome in outcomes:
            if outcome.error is None:
                await self._release_one(outcome, connections.get(outcome.item.user_id), recipient,
                                        granted=outcome.lease_expires_at is not None)
        return outcomes

    async def _release_one(self, outcome: ItemOutcome, connection: Connection | KeyringError | None,
                           recipient: Recipient, *, granted: bool) -> None:
        item = outcome.item
        try:
            if isinstance(connection, KeyringError):
                await self.record_keyring_failure(item.user_id, connection, action="credentials_decrypt_failed")
                raise connection
            if connection is None:
                raise NotConnected(f"no connection for user {item.user_id}")
            release = connection.release(item.mode)
        except VaultError as exc:
            outcome.error = exc
            return
        outcome.bundle = TokenBundle(access_token=release.credentials.access_token,
                                     refresh_token=release.credentials.refresh_token,
                                     expires_at=release.expires_at, scopes=list(release.scopes))
        if self._audit_grants:
            self._buffered(AuditEntry(actor=f"requester:{recipient.key_id}", action="credentials_granted",
                                      user_id=item.user_id, version=connection.version,
                                      detail={"mode": item.mode, "request_id": item.request_id,
                                              "sandbox_id": item.sandbox_id}))
        if granted and item.sandbox_id is not None:
            self.audit_sink.submit_release(item.user_id, item.sandbox_id, self.leases.now_ms())


def _item_of(request: CredentialsRequest) -> CredentialsItem:
    return CredentialsItem(request_id=request.request_id, user_id=request.user_id, sandbox_id=request.sandbox_id,
                           grant=request.grant, mode=request.mode)


@dataclass
class ItemOutcome:
    """What became of one item of a credentials request."""

    item: CredentialsItem
    bundle: TokenBundle | None = field(default=None, repr=False)
    error: VaultError | None = None
    lease_expires_at: int | None = None

    def result(self) -> CredentialsItemResult:
        if self.error is not None:
            error = reply_error(self.error)
            detail = self.error.detail if error.startswith("grant_") else ""
            return CredentialsItemResult(request_id=self.item.request_id, ok=False, error=error,
                                         detail=detail[:200])
        assert self.bundle is not None
        return CredentialsItemResult(request_id=self.item.request_id, ok=True, expires_at=self.bundle.expires_at,
                                     scopes=list(self.bundle.scopes), lease_expires_at=self.lease_expires_at)


# Reasons a reply may carry (shared.events.CredentialsError); others become "internal".
REPLY_ERRORS = frozenset({"not_connected", "reconnect_required", "unauthorized_requester", "invalid_request",
                          "grant_required", "grant_invalid"})
UNAVAILABLE = frozenset({"store_unavailable", "request_timeout", "concurrency_conflict"})


def reply_error(exc: VaultError) -> str:
    if exc.reason in REPLY_ERRORS:
        return exc.reason
    if exc.reason in UNAVAILABLE:
        return "unavailable"
    return "internal"


__all__ = ["ItemOutcome", "ReadForRelease", "RevokeOutcome", "StoreOutcome", "Vault", "reply_error"]
