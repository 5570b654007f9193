"""The one central refresher.

Refresh tokens rotate: whoever refreshes a token second gets `invalid_grant` and that login is
gone. So across every vault replica exactly one refresh may be in flight per connection. Each
replica runs this loop; single flight comes from a *lease taken by compare-and-set* on the
connection row (see docs/vault.md for why not row locks or a NATS lock):

1. scan (read only): refreshable connections whose access token expires within
   VAULT_REFRESH_MARGIN_S, whose backoff has passed and whose lease is free or expired;
2. claim: `UPDATE connections SET lease_owner=me, lease_until=now+lease WHERE user_id=… AND
   version=<scanned> AND (lease_until IS NULL OR lease_until < now)` — one statement, so on
   SQLite (one writer at a time) and PostgreSQL (row lock, re-check after the other commits)
   exactly one replica's UPDATE matches; the others see 0 rows and move on;
3. refresh over HTTP, outside any transaction, only while the lease has more time left than
   the HTTP timeout;
4. save with `WHERE version=<claimed> AND lease_owner=me` (releases the lease, bumps the
   version). A new login that arrived meanwhile wins: our result is dropped.

Outcomes: success → `connected`, tokens re-encrypted, `tokens.refreshed` published (no token
in it); `invalid_grant` → `reconnect_required` + `tokens.reconnect_required`; 429 / 5xx /
timeouts → `refresh_failed`, next attempt after an exponential backoff with jitter (at least
Retry-After), back to `connected` on the next success. A record that does not decrypt is
audited and retried only after the maximum backoff.

A second scan warns once per login (`tokens.login_expiring`) VAULT_LOGIN_WARNING_S before the
login lapses (refreshing does not extend a login).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from services.vault.domain import Account, AuditEntry, Connection, RefreshedTokens, refresh_backoff_s
from services.vault.errors import (
    ConcurrencyConflict,
    KeyringError,
    RefreshRejected,
    RefreshTransient,
    StoreUnavailable,
)
from services.vault.metrics import VaultMetrics
from services.vault.ports import DueRefresh, EventPublisher, TokenEndpoint, TokenResponse, UnitOfWork
from shared import subjects
from shared.delivery import Breaker
from shared.events import (
    Event,
    TokensLoginExpiring,
    TokensReconnectRequired,
    TokensRefreshed,
    derived_event_id,
    utcnow,
)
from shared.logging import get_logger

log = get_logger(__name__)


MIN_RETRY_S = 5.0


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class RefreshPolicy:
    margin_s: float = 600.0
    lease_s: float = 60.0
    http_timeout_s: float = 15.0
    batch: int = 50
    concurrency: int = 4
    backoff_base_s: float = 15.0
    backoff_max_s: float = 900.0
    login_warning_s: float = 3 * 24 * 3600.0
    save_patience_s: float = 300.0
    """How long rotated tokens are kept in memory, retrying their save, while the database is
    down: the OAuth server has already invalidated the old refresh token, so giving up logs
    the person out."""


class Refresher:
    def __init__(
        self,
        *,
        unit_of_work: Callable[[], UnitOfWork],
        endpoint: TokenEndpoint,
        publisher: EventPublisher,
        owner: str,
        policy: RefreshPolicy = RefreshPolicy(),
        clock: Callable[[], datetime] = utcnow,
        metrics: VaultMetrics | None = None,
        on_keyring_failure: Callable[[str, KeyringError], object] | None = None,
        rng: random.Random | None = None,
        database: Breaker | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._uow = unit_of_work
        self._endpoint = endpoint
        self._publisher = publisher
        self.owner = owner
        self.policy = policy
        self._clock = clock
        self.metrics = metrics or VaultMetrics()
        self._on_keyring_failure = on_keyring_failure
        self._rng = rng or random.Random()
        self._database = database  # the vault's database breaker: no rounds while it is open
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        return f"Refresher(owner={self.owner!r})"

    @property
    def actor(self) -> str:
        return f"vault:{self.owner}"

    # --- one round ------------------------------------------------------------------
    async def run_once(self) -> Counter[str]:
        """Refresh whatever is due (bounded concurrency), then send due login warnings."""
        outcomes: Counter[str] = Counter()
        now_ms = _ms(self._clock())
        with self.metrics.store_timer("refresh_scan"):
            async with self._uow() as uow:
                due = await uow.connections.due_for_refresh(now_ms, int(self.policy.margin_s * 1000), self.policy.batch)
        if due:
            gate = asyncio.Semaphore(self.policy.concurrency)

            async def one(item: DueRefresh) -> None:
                async with gate:
                    try:
                        outcomes[await self.refresh_one(item)] += 1
                    except StoreUnavailable:
                        self.metrics.refresh("store_unavailable")
                        outcomes["store_unavailable"] += 1
                    except Exception:
                        log.exception("refresh failed unexpectedly", user_id=item.user_id)
                        outcomes["error"] += 1

            await asyncio.gather(*(one(item) for item in due))
        outcomes.update(await self.warn_expiring_logins())
        return outcomes

    async def refresh_one(self, due: DueRefresh) -> str:
        policy = self.policy
        started = self._clock()
        until_ms = _ms(started) + int(policy.lease_s * 1000)
        with self.metrics.store_timer("refresh_claim"):
            async with self._uow() as uow:
                claimed = await uow.connections.claim_lease(due.user_id, due.version, self.owner, _ms(started), until_ms)
                await uow.commit()
        if not claimed:
            return "not_claimed"  # another replica has it, or it changed since the scan
        try:
            with self.metrics.store_timer("refresh_load"):
                async with self._uow() as uow:
                    connection = await uow.connections.get(due.user_id)
        except KeyringError as exc:
            await self._defer_undecryptable(due, exc)
            return "decrypt_failed"
        except BaseException:
            await self._release(due.user_id)
            raise
        if connection is None or connection.version != due.version:
            await self._release(due.user_id)
            return "changed"
        if not connection.refreshable:
            async with self._uow() as uow:  # e.g. an oauth row without refresh token (migrated)
                await uow.connections.set_refreshable(due.user_id, False)
                await uow.connections.release_lease(due.user_id, self.owner)
                await uow.commit()
            return "not_refreshable"
        if _ms(self._clock()) + int(policy.http_timeout_s * 1000) >= until_ms:
            await self._release(due.user_id)  # the call could outlive the lease: let the next round retry
            return "lease_too_short"
        assert connection.credentials.refresh_token is not None
        if connection.refresh_token_expires_at is not None and connection.refresh_token_expires_at <= _ms(self._clock()):
            # the login itself has lapsed (~30 days; refreshing never extends it): only a new one helps
            return await self._reconnect_required(connection, due, "login_expired")
        try:
            response = await self._endpoint.refresh(connection.credentials.refresh_token, connection.scopes)
        except RefreshRejected as exc:
            return await self._reconnect_required(connection, due, exc.reason)
        except RefreshTransient as exc:
            return await self._failed(connection, due, exc)
        except BaseException:
            await self._release(due.user_id)
            raise
        return await self._succeeded(connection, due, response)

    # --- outcomes -------------------------------------------------------------------
    def _tokens(self, response: TokenResponse, now: datetime) -> RefreshedTokens:
        now_ms = _ms(now)
        scopes = tuple(response.scope.split()) if response.scope and response.scope.strip() else None
        return RefreshedTokens(
            access_token=response.access_token,
            refresh_token=response.refresh_token,
            expires_at=now_ms + response.expires_in * 1000,
            scopes=scopes,
            refresh_token_expires_at=(
                now_ms + response.refresh_token_expires_in * 1000
                if response.refresh_token_expires_in is not None
                else None
            ),
            account=Account.from_dict(response.account),
        )

    async def _save(self, connection: Connection, due: DueRefresh, entry: AuditEntry) -> bool:
        try:
            with self.metrics.store_timer("refresh_save"):
                async with self._uow() as uow:
                    await uow.connections.update(connection, expected_version=due.version, lease_owner=self.owner)
                    await uow.audit.add(entry, self._clock())
                    await uow.commit()
        except ConcurrencyConflict:
            return False
        return True

    async def _succeeded(self, connection: Connection, due: DueRefresh, response: TokenResponse) -> str:
        now = self._clock()
        connection.refreshed(self._tokens(response, now), now)
        entry = AuditEntry(actor=self.actor, action="refreshed", user_id=connection.user_id,
                           version=connection.version, detail={"rotated": response.refresh_token is not None})
        if not await self._save_rotated(connection, due, entry):
            # The server has rotated the token but the row changed under us (a new login arrived,
            # or our lease was lost). A new login is newer than what we hold; a lost lease means
            # the process stalled longer than VAULT_REFRESH_LEASE_S. Either way: loud.
            self.metrics.refresh("lost_lease")
            log.error("refreshed tokens could not be saved: the connection changed meanwhile",
                      user_id=connection.user_id, version=due.version)
            await self._audit(AuditEntry(actor=self.actor, action="refresh_discarded", outcome="error",
                                         user_id=connection.user_id, reason="connection_changed",
                                         version=due.version))
            return "lost_lease"
        self.metrics.refresh("ok")
        log.info("tokens refreshed", user_id=connection.user_id, version=connection.version,
                 expires_at=connection.expires_at, rotated=response.refresh_token is not None)
        await self._publish(
            subjects.TOKENS_REFRESHED,
            TokensRefreshed(
                event_id=derived_event_id(f"{connection.user_id}:{connection.version}", "tokens.refreshed"),
                user_id=connection.user_id,
                expires_at=connection.expires_at,
                scopes=list(connection.scopes),
                version=connection.version,
            ),
        )
        return "ok"

    async def _save_rotated(self, connection: Connection, due: DueRefresh, entry: AuditEntry) -> bool:
        """`_save`, riding out a database outage for up to `save_patience_s`: the tokens in hand
        are the only valid ones. Our lease still names us, so nobody else refreshes meanwhile."""
        deadline = time.monotonic() + self.policy.save_patience_s
        delay = 0.5
        while True:
            try:
                return await self._save(connection, due, entry)
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    log.error("refreshed tokens lost: the database stayed down", user_id=connection.user_id,
                              waited_s=round(self.policy.save_patience_s))
                    raise
                log.warning("database down: keeping the refreshed tokens, retrying their save",
                            user_id=connection.user_id, retry_in_s=delay)
                await self._sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _reconnect_required(self, connection: Connection, due: DueRefresh, reason: str) -> str:
        now = self._clock()
        connection.require_reconnect(reason, now)
        entry = AuditEntry(actor=self.actor, action="reconnect_required", outcome="error",
                           user_id=connection.user_id, reason=reason, version=connection.version)
        if not await self._save(connection, due, entry):
            self.metrics.refresh("conflict")
            return "conflict"
        self.metrics.refresh("invalid_grant")
        log.warning("refresh token rejected: the person must connect again", user_id=connection.user_id,
                    reason=reason)
        await self._publish(
            subjects.TOKENS_RECONNECT_REQUIRED,
            TokensReconnectRequired(
                event_id=derived_event_id(f"{connection.user_id}:{connection.version}", "reconnect_required"),
                user_id=connection.user_id,
                reason=reason,
            ),
        )
        return "invalid_grant"

    async def _failed(self, connection: Connection, due: DueRefresh, exc: RefreshTransient) -> str:
        now = self._clock()
        delay = refresh_backoff_s(
            connection.refresh_failures + 1,
            base_s=self.policy.backoff_base_s,
            cap_s=self.policy.backoff_max_s,
            retry_after_s=exc.retry_after_s,
            rng=self._rng,
        )
        # Ride out the outage inside the margin: while the access token still lives, the next
        # try comes before it expires (at most half the time left, at least a few seconds), so a
        # minute-long OAuth outage costs the sandboxes nothing.
        left_s = (connection.expires_at - _ms(now)) / 1000
        if left_s > 0:
            delay = min(delay, max(MIN_RETRY_S, left_s / 2))
        connection.refresh_failed(exc.outcome, retry_at_ms=_ms(now) + int(delay * 1000), now=now)
        entry = AuditEntry(actor=self.actor, action="refresh_failed", outcome="error", user_id=connection.user_id,
                           reason=exc.outcome, version=connection.version,
                           detail={"failures": connection.refresh_failures, "retry_in_s": round(delay, 1)})
        if not await self._save(connection, due, entry):
            self.metrics.refresh("conflict")
            return "conflict"
        self.metrics.refresh(exc.outcome)
        log.warning("refresh failed, will retry", user_id=connection.user_id, outcome=exc.outcome,
                    failures=connection.refresh_failures, retry_in_s=round(delay, 1))
        return exc.outcome

    async def _defer_undecryptable(self, due: DueRefresh, exc: KeyringError) -> None:
        self.metrics.refresh("decrypt_failed")
        if self._on_keyring_failure is not None:
            result = self._on_keyring_failure(due.user_id, exc)
            if asyncio.iscoroutine(result):
                await result
        retry_at = _ms(self._clock()) + int(self.policy.backoff_max_s * 1000)
        try:
            async with self._uow() as uow:
                await uow.connections.defer_refresh(due.user_id, self.owner, retry_at, exc.reason)
                await uow.commit()
        except StoreUnavailable:
            log.warning("could not defer an undecryptable connection", user_id=due.user_id)

    async def _release(self, user_id: str) -> None:
        with contextlib.suppress(Exception):
            async with self._uow() as uow:
                await uow.connections.release_lease(user_id, self.owner)
                await uow.commit()

    async def _publish(self, subject: str, event: Event) -> bool:
        try:
            await self._publisher.publish(subject, event)
        except Exception as exc:  # noqa: BLE001 - the state change is committed; the event is a notice
            self.metrics.published(subject, False)
            log.error("event not published", subject=subject, user_id=event.user_id, error=type(exc).__name__)
            return False
        self.metrics.published(subject, True)
        return True

    async def _audit(self, entry: AuditEntry) -> None:
        with contextlib.suppress(Exception):
            async with self._uow() as uow:
                await uow.audit.add(entry, self._clock())
                await uow.commit()

    # --- login expiry ----------------------------------------------------------------
    async def warn_expiring_logins(self) -> Counter[str]:
        outcomes: Counter[str] = Counter()
        now_ms = _ms(self._clock())
        async with self._uow() as uow:
            due = await uow.connections.due_login_warnings(
                now_ms, int(self.policy.login_warning_s * 1000), self.policy.batch
            )
        for summary in due:
            expires_at = summary.refresh_token_expires_at
            assert expires_at is not None
            async with self._uow() as uow:
                mine = await uow.connections.mark_login_warned(summary.user_id, expires_at)
                await uow.commit()
            if not mine:
                continue  # another replica sends it
            event = TokensLoginExpiring(
                event_id=derived_event_id(f"{summary.user_id}:{expires_at}", "login_expiring"),
                user_id=summary.user_id,
                expires_at=expires_at,
                state=summary.state,
            )
            if await self._publish(subjects.TOKENS_LOGIN_EXPIRING, event):
                log.info("login expiry warning sent", user_id=summary.user_id, expires_at=expires_at)
                outcomes["login_warned"] += 1
                await self._audit(AuditEntry(actor=self.actor, action="login_expiring", user_id=summary.user_id,
                                             version=summary.version, event_id=event.event_id,
                                             detail={"expires_at": expires_at}))
            else:
                with contextlib.suppress(Exception):  # try again next round
                    async with self._uow() as uow:
                        await uow.connections.unmark_login_warned(summary.user_id, expires_at)
                        await uow.commit()
        return outcomes

    # --- the loop --------------------------------------------------------------------
    async def run_forever(self, interval_s: float) -> None:
        """Rounds until `stop()`: a round in progress is finished, not cancelled, because a
        refresh cancelled between the server's answer and our commit would lose the rotated
        refresh token (and log the person out)."""
        while not self._stopping.is_set():
            await self.round()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=interval_s * self._rng.uniform(0.8, 1.2))

    async def round(self) -> Counter[str] | None:
        """One round of `run_forever`, paused with the vault's consumers while the database
        breaker is open (one round at a time probes it); None when skipped or failed."""
        database = self._database
        if database is not None and not database.try_admit():
            log.debug("refresh round paused: database unavailable")
            return None
        try:
            outcomes = await self.run_once()
        except StoreUnavailable:
            if database is not None:
                database.failed()
            log.warning("refresh round skipped: database unavailable")
            return None
        except Exception:
            log.exception("refresh round failed")
            return None
        if database is not None and outcomes["store_unavailable"]:  # the scan answered, a save did not
            database.failed()
        elif database is not None:
            database.succeeded()
        if outcomes:
            log.debug("refresh round", **{k: v for k, v in outcomes.items()})
        return outcomes

    def start(self, interval_s: float) -> None:
        if self._task is None:
            self._stopping = asyncio.Event()
            self._task = asyncio.create_task(self.run_forever(interval_s), name="vault-refresher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.policy.http_timeout_s + 10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
