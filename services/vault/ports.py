"""Ports the use cases talk to. `adapters/store.py` implements the storage ones with
SQLAlchemy, `adapters/oauth.py` the token endpoint, `adapters/bus.py` the publisher; unit tests
use small in-memory fakes (tests/vault_fixtures.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

from services.vault.domain import AuditEntry, AuditRecord, Connection, ConnectionSummary, SandboxLease
from services.vault.errors import KeyringError
from services.vault.keyring import EncryptedRecord, RecordContext
from shared.events import Event


class RecordCipher(Protocol):
    """What the store needs from a keyring (`Keyring` or the live, reloading `LiveKeyring`)."""

    @property
    def active_kek_id(self) -> str: ...

    def encrypt(self, plaintext: bytes, context: RecordContext) -> EncryptedRecord: ...

    def decrypt(self, record: EncryptedRecord, context: RecordContext) -> bytes: ...

    def rewrap(self, record: EncryptedRecord, context: RecordContext) -> EncryptedRecord: ...


@dataclass(frozen=True)
class DueRefresh:
    user_id: str
    version: int


@dataclass(frozen=True)
class SecretRef:
    """Which record a rotation pass must re-wrap (no secret in here)."""

    user_id: str
    version: int
    kek_id: str


class ConnectionRepository(Protocol):
    async def get(self, user_id: str, *, for_update: bool = False) -> Connection | None:
        """The user's connection, decrypted (KeyringError if it cannot be); `for_update` locks
        the row until commit (PostgreSQL; SQLite serialises writers anyway)."""

    async def summary(self, user_id: str, *, for_update: bool = False) -> ConnectionSummary | None:
        """The connection without its secret (never decrypts). Counts as "read" for `update`."""

    async def summaries(self, *, limit: int = 1000, state: str | None = None) -> list[ConnectionSummary]:
        """Connections without their secrets, for operators (never decrypts)."""

    async def get_many(self, user_ids: Sequence[str], *, for_update: bool = False
                       ) -> dict[str, tuple[ConnectionSummary, Connection | KeyringError]]:
        """The connections of several users in ONE statement: for each one that exists, its
        summary and the connection decrypted — or the `KeyringError` it does not decrypt with.
        Each counts as "read" for `update`; `for_update` locks the rows until commit."""

    async def add(self, connection: Connection) -> None:
        """Insert a connection that does not exist yet (`ConcurrencyConflict` if it does)."""

    async def add_many(self, connections: Sequence[Connection]) -> None:
        """`add` for several at once (one statement per table)."""

    async def update_many(self, changes: Sequence[tuple[Connection, int]]) -> None:
        """`update(connection, expected_version=...)` for several (one statement per table);
        `ConcurrencyConflict` if any row changed since it was read (where the driver can tell)."""

    async def update(
        self, connection: Connection, *, expected_version: int | None = None, lease_owner: str | None = None
    ) -> None:
        """Persist changes (re-encrypting at the new version); `ConcurrencyConflict` if somebody
        else changed it since it was read — or, with `lease_owner`, if that lease was lost.
        Always releases the refresh lease."""

    async def delete(self, user_id: str) -> ConnectionSummary | None:
        """Crypto-shred: the sealed secret (and with it the only copy of the wrapped data key)
        and the connection row are deleted. Returns what was there."""

    # --- the refresher's schedule (no version bump, no decryption) -----------------------
    async def due_for_refresh(self, now_ms: int, margin_ms: int, limit: int) -> list[DueRefresh]:
        """Refreshable connections whose access token expires within the margin, whose
        backoff has passed and whose lease (if any) has expired, soonest first."""

    async def claim_lease(self, user_id: str, version: int, owner: str, now_ms: int, until_ms: int) -> bool:
        """Compare-and-set: take the refresh lease if the row is still at `version` and nobody
        holds a live lease. True for exactly one claimant."""

    async def release_lease(self, user_id: str, owner: str) -> None: ...

    async def defer_refresh(self, user_id: str, owner: str, next_refresh_at: int, error: str) -> None:
        """Release the lease and push the next attempt back, without changing the version."""

    async def set_refreshable(self, user_id: str, refreshable: bool) -> None: ...

    async def due_login_warnings(self, now_ms: int, warn_before_ms: int, limit: int) -> list[ConnectionSummary]:
        """Usable connections whose login lapses within `warn_before_ms` and that were not
        warned for that expiry yet."""

    async def mark_login_warned(self, user_id: str, refresh_token_expires_at: int) -> bool:
        """Compare-and-set; True for exactly one replica."""

    async def unmark_login_warned(self, user_id: str, refresh_token_expires_at: int) -> None: ...

    async def count_by_state(self) -> dict[str, int]: ...


class SecretRepository(Protocol):
    """The sealed secrets as key rotation sees them."""

    async def not_under(self, kek_id: str, *, after_user: str | None, limit: int) -> list[SecretRef]: ...

    async def rewrap(self, ref: SecretRef, cipher: RecordCipher) -> bool:
        """Re-wrap one data key under the cipher's active KEK; False if the row changed meanwhile."""

    async def count_by_kek(self) -> dict[str, int]: ...


class ProcessedEvents(Protocol):
    async def mark_processed(self, event_id: str, subject: str) -> bool:
        """Record `event_id`; False if it was processed before (then do nothing)."""

    async def mark_many(self, event_ids: Sequence[str], subject: str) -> set[str]:
        """Record several (distinct) ids in one statement; returns those not processed before."""

    async def delete_older_than(self, cutoff: datetime) -> int: ...


class Revocations(Protocol):
    async def revoked_at(self, user_id: str) -> datetime | None: ...

    async def revoked_at_many(self, user_ids: Sequence[str]) -> dict[str, datetime]:
        """The last revocation of each of these users that has one (one statement)."""

    async def record(self, user_id: str, at: datetime, event_id: str | None) -> None:
        """Remember the latest revocation of `user_id` (an earlier one never overwrites)."""

    async def delete_older_than(self, cutoff: datetime) -> int: ...


class AuditLog(Protocol):
    async def add(self, entry: AuditEntry, at: datetime | None = None) -> None: ...

    async def add_many(self, entries: Sequence[tuple[AuditEntry, datetime]]) -> None: ...

    async def list(
        self, *, user_id: str | None = None, action: str | None = None, limit: int = 100
    ) -> list[AuditRecord]: ...

    async def delete_older_than(self, cutoff: datetime) -> int: ...


class SandboxLeases(Protocol):
    """The newest grant per (person, sandbox) and whether its lease ended (domain.SandboxLease)."""

    async def get(self, user_id: str, sandbox_id: str, *, for_update: bool = False) -> SandboxLease | None: ...

    async def save(self, lease: SandboxLease) -> None:
        """Insert or replace the lease (its `last_released_at` is kept: `record_releases` owns it)."""

    async def live_for(self, user_id: str, now_ms: int, *, limit: int = 1000) -> list[SandboxLease]: ...

    async def due(self, now_ms: int, *, limit: int) -> list[SandboxLease]:
        """Unended leases past their expiry, and ended leases whose end is not announced yet."""

    async def mark_announced(self, user_id: str, sandbox_id: str, ended_at: int) -> None: ...

    async def record_releases(self, releases: Sequence[tuple[str, str, int]]) -> None:
        """(user, sandbox, at ms): when credentials last left for each sandbox (newest wins)."""

    async def delete_ended_before(self, cutoff_ms: int) -> int: ...


class UnitOfWork(Protocol):
    """One transaction. Leaving the block without `commit()` rolls back."""

    # Read-only to the use cases (properties, so an adapter's own repository types satisfy them).
    @property
    def connections(self) -> ConnectionRepository: ...
    @property
    def secrets(self) -> SecretRepository: ...
    @property
    def processed_events(self) -> ProcessedEvents: ...
    @property
    def revocations(self) -> Revocations: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def sandbox_leases(self) -> SandboxLeases: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class AuditSink(Protocol):
    """Where the use cases hand high-volume audit facts (credential grants and refusals, when
    credentials last left for a sandbox): written off the request path, best effort."""

    def submit(self, entry: AuditEntry, at: datetime | None = None) -> None: ...

    def submit_release(self, user_id: str, sandbox_id: str, at_ms: int) -> None:
        """When credentials last left for a sandbox (shown by GET /v1/claude-code/grants)."""


class Store(Protocol):
    """The database as the composition root sees it."""

    async def migrate(self) -> None: ...

    def unit_of_work(self, cipher: RecordCipher) -> UnitOfWork: ...

    async def read_for_release(
        self, wanted: Sequence[tuple[str, str | None]], cipher: RecordCipher
    ) -> tuple[dict[str, Connection | KeyringError], dict[tuple[str, str], SandboxLease]]:
        """The connections (decrypted, or the `KeyringError` of one that does not decrypt) of the
        wanted users and the leases of the wanted (user, sandbox) pairs, read-only, outside a
        unit of work, in one round (the hot path of vault.credentials.get)."""

    async def ping(self) -> bool: ...

    async def dispose(self) -> None: ...


# --- outside world ----------------------------------------------------------------------
@dataclass(frozen=True)
class TokenResponse:
    """The token endpoint's answer to a refresh, as it came (seconds, space-separated scope)."""

    access_token: str
    refresh_token: str | None
    expires_in: int
    scope: str | None = None
    refresh_token_expires_in: int | None = None
    account: dict[str, object] | None = None
    organization: dict[str, object] | None = None

    def __repr__(self) -> str:
        return f"TokenResponse(expires_in={self.expires_in}, rotated={self.refresh_token is not None})"


class TokenEndpoint(Protocol):
    async def refresh(self, refresh_token: str, scopes: Sequence[str]) -> TokenResponse:
        """`RefreshRejected` for invalid_grant, `RefreshTransient` for anything worth retrying."""

    async def revoke(self, refresh_token: str) -> None:
        """Revoke the login at the provider (what `claude auth logout` does). `RefreshTransient`
        for anything worth retrying; `RefreshRejected` when the provider refuses for good."""


class EventPublisher(Protocol):
    async def publish(self, subject: str, event: Event) -> None: ...
