"""SQLAlchemy 2 (async) persistence: repositories, unit of work, the store and its migrations.

Same code on SQLite (aiosqlite, WAL) and PostgreSQL (asyncpg). Tables are in `models.py`; the
schema is created and evolved by Alembic (`services/vault/migrations/`), run by
`SqlStore.migrate()` under a lock (PostgreSQL advisory lock / SQLite `BEGIN IMMEDIATE`), so
several replicas starting at once migrate exactly once.

Credentials are encrypted by the keyring before they reach a row; `sealed_secrets` holds the
KEK id, the wrapped data key, the nonce and the ciphertext, bound (AAD) to user_id and version.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from sqlalchemy import (
    Connection as SyncConnection,
)
from sqlalchemy import (
    CursorResult,
    Result,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from services.vault.adapters.models import (
    AuditRow,
    Base,
    ConnectionRow,
    ProcessedEventRow,
    RevocationRow,
    SandboxLeaseRow,
    SealedSecretRow,
    metadata,
    utcnow,
)
from services.vault.domain import (
    Account,
    AuditEntry,
    AuditRecord,
    Connection,
    ConnectionSummary,
    Credentials,
    SandboxLease,
)
from services.vault.errors import ConcurrencyConflict, DecryptionFailed, KeyringError, StoreUnavailable
from services.vault.keyring import EncryptedRecord, RecordContext
from services.vault.ports import DueRefresh, RecordCipher, SecretRef

log = logging.getLogger(__name__)
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
BASELINE_REVISION = "0001"

__all__ = [
    "MIGRATIONS_DIR",
    "AuditRow",
    "Base",
    "ConnectionRow",
    "SandboxLeaseRow",
    "ProcessedEventRow",
    "RevocationRow",
    "SealedSecretRow",
    "SqlSandboxLeases",
    "SqlStore",
    "SqlUnitOfWork",
    "metadata",
    "translate_error",
]

# --- error translation -----------------------------------------------------------
_UNAVAILABLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # pool checkout timed out
    sa_exc.DisconnectionError,
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
)


# SQLSTATEs of a server that cannot serve anybody right now, whatever the statement: class 08
# (connection exception) and 57P01-57P03 (admin / crash shutdown, "the database system is
# starting up | shutting down | in recovery mode"), 53300 (too many connections). asyncpg
# raises them as plain PostgresErrors, which SQLAlchemy wraps as a bare DBAPIError.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")


def _sqlstate(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    value = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return value if isinstance(value, str) else ""


def translate_error(exc: BaseException) -> BaseException | None:
    """Driver errors → the vault's error tree (None: not a storage problem we know)."""
    if isinstance(exc, sa_exc.IntegrityError):
        return ConcurrencyConflict("the row changed concurrently")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StoreUnavailable("database connection lost")
    if isinstance(exc, sa_exc.DBAPIError) and _sqlstate(exc).startswith(_UNAVAILABLE_SQLSTATES):
        return StoreUnavailable(f"database unavailable (SQLSTATE {_sqlstate(exc)})")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"database unavailable ({type(exc).__name__})")
    return None


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # SQLite keeps no zone; we only ever write UTC
    return value


def _described(row: Any) -> dict[str, Any]:
    """The fields `Connection` and `ConnectionSummary` share, from a `connections` row (ORM or
    Core: same attribute names)."""
    return {
        "user_id": row.user_id,
        "kind": row.kind,
        "state": row.state,
        "scopes": tuple(row.scopes or ()),
        "expires_at": row.expires_at,
        "refresh_token_expires_at": row.refresh_token_expires_at,
        "account": Account.from_dict(row.account),
        "version": row.version,
        "created_at": _aware(row.created_at),
        "issued_at": _aware(row.issued_at),
    }


def _summary(row: ConnectionRow, kek_id: str | None = None) -> ConnectionSummary:
    return ConnectionSummary(**_described(row), kek_id=kek_id)


def _record(secret: SealedSecretRow) -> EncryptedRecord:
    return EncryptedRecord(
        kek_id=secret.kek_id, wrapped_data_key=secret.wrapped_data_key, nonce=secret.nonce, ciphertext=secret.ciphertext
    )


# Core statements over the mapped tables (a mapped class's __table__ is typed as a plain FromClause).
_CONNECTIONS = cast(Table, ConnectionRow.__table__)
_SECRETS = cast(Table, SealedSecretRow.__table__)
_READ_CONNECTIONS = (
    select(
        _CONNECTIONS,
        _SECRETS.c.version.label("secret_version"),
        _SECRETS.c.kek_id.label("secret_kek_id"),
        _SECRETS.c.wrapped_data_key.label("secret_wrapped_data_key"),
        _SECRETS.c.nonce.label("secret_nonce"),
        _SECRETS.c.ciphertext.label("secret_ciphertext"),
    )
    .outerjoin(_SECRETS, _SECRETS.c.user_id == _CONNECTIONS.c.user_id)
    .where(_CONNECTIONS.c.user_id.in_(bindparam("users", expanding=True)))
)


_UPDATE_CONNECTION = (
    update(_CONNECTIONS)
    .where(_CONNECTIONS.c.user_id == bindparam("b_user_id"), _CONNECTIONS.c.version == bindparam("b_expected"))
    .values({name: bindparam(name) for name in (
        "kind", "state", "scopes", "expires_at", "refresh_token_expires_at", "account", "version", "issued_at",
        "refreshable", "refresh_failures", "next_refresh_at", "last_refresh_error", "refreshed_at",
        "updated_at")} | {"lease_owner": None, "lease_until": None})
)
_SECRET_FIELDS = ("version", "kek_id", "wrapped_data_key", "nonce", "ciphertext", "updated_at")


def _upsert_secret(dialect: str) -> Any:
    stmt = _dialect_insert(dialect)(_SECRETS)
    return stmt.on_conflict_do_update(index_elements=[_SECRETS.c.user_id],
                                      set_={name: stmt.excluded[name] for name in _SECRET_FIELDS})


def _connection_of_read(row: Any, cipher: RecordCipher) -> Connection:
    secret = None
    if row.secret_kek_id is not None:
        secret = (row.secret_version, EncryptedRecord(kek_id=row.secret_kek_id,
                                                      wrapped_data_key=row.secret_wrapped_data_key,
                                                      nonce=row.secret_nonce, ciphertext=row.secret_ciphertext))
    return _connection(row, secret, cipher)


# --- repositories ------------------------------------------------------------------
class SqlConnectionRepository:
    def __init__(self, session: AsyncSession, cipher: RecordCipher, dialect: str = "sqlite") -> None:
        self._session = session
        self._cipher = cipher
        self._dialect = dialect
        self._loaded_versions: dict[str, int] = {}  # optimistic concurrency: version we read

    async def get(self, user_id: str, *, for_update: bool = False) -> Connection | None:
        stmt = (
            select(ConnectionRow, SealedSecretRow)
            .outerjoin(SealedSecretRow, SealedSecretRow.user_id == ConnectionRow.user_id)
            .where(ConnectionRow.user_id == user_id)
        )
        if for_update:
            stmt = stmt.with_for_update(of=ConnectionRow)  # PostgreSQL row lock; SQLite's write lock covers it
        found = (await self._session.execute(stmt)).one_or_none()
        if found is None:
            return None
        row, secret = found
        self._loaded_versions[row.user_id] = row.version
        return self._to_domain(row, secret)

    async def summary(self, user_id: str, *, for_update: bool = False) -> ConnectionSummary | None:
        stmt = (
            select(ConnectionRow, SealedSecretRow.kek_id)
            .outerjoin(SealedSecretRow, SealedSecretRow.user_id == ConnectionRow.user_id)
            .where(ConnectionRow.user_id == user_id)
        )
        if for_update:
            stmt = stmt.with_for_update(of=ConnectionRow)
        found = (await self._session.execute(stmt)).one_or_none()
        if found is None:
            return None
        row, kek_id = found
        self._loaded_versions[row.user_id] = row.version
        return _summary(row, kek_id)

    async def summaries(self, *, limit: int = 1000, state: str | None = None) -> list[ConnectionSummary]:
        """Connections without their secrets (never decrypts), by user id."""
        stmt = (
            select(ConnectionRow, SealedSecretRow.kek_id)
            .outerjoin(SealedSecretRow, SealedSecretRow.user_id == ConnectionRow.user_id)
            .order_by(ConnectionRow.user_id)
            .limit(limit)
        )
        if state is not None:
            stmt = stmt.where(ConnectionRow.state == state)
        return [_summary(row, kek_id) for row, kek_id in (await self._session.execute(stmt)).all()]

    async def get_many(self, user_ids: Sequence[str], *, for_update: bool = False
                       ) -> dict[str, tuple[ConnectionSummary, Connection | KeyringError]]:
        """One Core statement for all of them (`user_id IN (…)`), no ORM entities."""
        users = sorted(set(user_ids))
        if not users:
            return {}
        stmt = _READ_CONNECTIONS.with_for_update(of=_CONNECTIONS) if for_update else _READ_CONNECTIONS
        found: dict[str, tuple[ConnectionSummary, Connection | KeyringError]] = {}
        for row in (await self._session.execute(stmt, {"users": users})).all():
            self._loaded_versions[row.user_id] = row.version
            summary = ConnectionSummary(**_described(row), kek_id=row.secret_kek_id)
            try:
                found[row.user_id] = (summary, _connection_of_read(row, self._cipher))
            except KeyringError as exc:
                found[row.user_id] = (summary, exc)
        return found

    async def add(self, connection: Connection) -> None:
        values, secret = self._to_values(connection)
        await self._session.execute(insert(ConnectionRow).values(**values))
        await self._session.execute(insert(SealedSecretRow).values(**secret))
        self._loaded_versions[connection.user_id] = connection.version

    async def add_many(self, connections: Sequence[Connection]) -> None:
        if not connections:
            return
        rows = [self._to_values(c) for c in connections]
        await self._session.execute(insert(_CONNECTIONS), [values for values, _ in rows])
        await self._session.execute(insert(_SECRETS), [secret for _, secret in rows])
        for c in connections:
            self._loaded_versions[c.user_id] = c.version

    async def update_many(self, changes: Sequence[tuple[Connection, int]]) -> None:
        """Executemany UPDATEs guarded by the version read (the rows are locked by
        `get_many(for_update=True)` on PostgreSQL, by SQLite's write lock there); the secrets
        are upserted (a row that lost its secret gets one, as `update` does)."""
        if not changes:
            return
        connection_rows: list[dict[str, Any]] = []
        secret_rows: list[dict[str, Any]] = []
        for connection, expected in changes:
            if connection.version <= expected:
                raise ValueError("update_many() needs changed connections (version must grow)")
            values, secret = self._to_values(connection)
            values.pop("created_at")
            values.pop("login_warned_for")  # mark_login_warned's alone (see update)
            values["b_user_id"] = values.pop("user_id")
            values["b_expected"] = expected
            connection_rows.append(values)
            secret_rows.append(secret)
        result = await self._session.execute(_UPDATE_CONNECTION, connection_rows)
        if self._dialect == "sqlite" and _affected(result) != len(changes):  # asyncpg cannot count executemany
            raise ConcurrencyConflict("a connection changed concurrently")
        await self._session.execute(_upsert_secret(self._dialect), secret_rows)
        for connection, _ in changes:
            self._loaded_versions[connection.user_id] = connection.version

    async def update(
        self, connection: Connection, *, expected_version: int | None = None, lease_owner: str | None = None
    ) -> None:
        loaded = expected_version if expected_version is not None else self._loaded_versions.get(connection.user_id)
        if loaded is None:
            raise ValueError("update() a connection that was not read in this unit of work")
        if connection.version <= loaded:
            raise ValueError("update() needs a changed connection (version must grow)")
        values, secret = self._to_values(connection)
        values.pop("user_id")
        values.pop("created_at")
        # The warning mark is not versioned: a save from an earlier read (the refresher's) must
        # not undo a warning sent meanwhile. Only mark/unmark_login_warned write it.
        values.pop("login_warned_for")
        conditions = [ConnectionRow.user_id == connection.user_id, ConnectionRow.version == loaded]
        if lease_owner is not None:
            conditions.append(ConnectionRow.lease_owner == lease_owner)
        result = await self._session.execute(
            update(ConnectionRow).where(*conditions).values(**values, lease_owner=None, lease_until=None)
        )
        if _affected(result) != 1:
            raise ConcurrencyConflict(f"connection of {connection.user_id} changed concurrently")
        secret.pop("user_id")
        result = await self._session.execute(
            update(SealedSecretRow).where(SealedSecretRow.user_id == connection.user_id).values(**secret)
        )
        if _affected(result) != 1:  # a row that lost its secret (should not happen): give it one
            await self._session.execute(insert(SealedSecretRow).values(user_id=connection.user_id, **secret))
        self._loaded_versions[connection.user_id] = connection.version

    async def delete(self, user_id: str) -> ConnectionSummary | None:
        current = await self.summary(user_id, for_update=True)
        if current is None:
            return None
        await self._session.execute(delete(SealedSecretRow).where(SealedSecretRow.user_id == user_id))
        await self._session.execute(delete(ConnectionRow).where(ConnectionRow.user_id == user_id))
        self._loaded_versions.pop(user_id, None)
        return current

    # --- refresher schedule --------------------------------------------------------
    async def due_for_refresh(self, now_ms: int, margin_ms: int, limit: int) -> list[DueRefresh]:
        stmt = (
            select(ConnectionRow.user_id, ConnectionRow.version)
            .where(
                ConnectionRow.refreshable.is_(True),
                ConnectionRow.state != "reconnect_required",
                ConnectionRow.expires_at <= now_ms + margin_ms,
                or_(ConnectionRow.next_refresh_at.is_(None), ConnectionRow.next_refresh_at <= now_ms),
                or_(ConnectionRow.lease_until.is_(None), ConnectionRow.lease_until < now_ms),
            )
            .order_by(ConnectionRow.expires_at)
            .limit(limit)
        )
        return [DueRefresh(user_id, version) for user_id, version in (await self._session.execute(stmt)).all()]

    async def claim_lease(self, user_id: str, version: int, owner: str, now_ms: int, until_ms: int) -> bool:
        result = await self._session.execute(
            update(ConnectionRow)
            .where(
                ConnectionRow.user_id == user_id,
                ConnectionRow.version == version,
                ConnectionRow.refreshable.is_(True),
                or_(ConnectionRow.lease_until.is_(None), ConnectionRow.lease_until < now_ms),
            )
            .values(lease_owner=owner, lease_until=until_ms)
        )
        return _affected(result) == 1

    async def release_lease(self, user_id: str, owner: str) -> None:
        await self._session.execute(
            update(ConnectionRow)
            .where(ConnectionRow.user_id == user_id, ConnectionRow.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        )

    async def defer_refresh(self, user_id: str, owner: str, next_refresh_at: int, error: str) -> None:
        await self._session.execute(
            update(ConnectionRow)
            .where(ConnectionRow.user_id == user_id, ConnectionRow.lease_owner == owner)
            .values(
                lease_owner=None,
                lease_until=None,
                next_refresh_at=next_refresh_at,
                last_refresh_error=error[:64],
                refresh_failures=ConnectionRow.refresh_failures + 1,
            )
        )

    async def set_refreshable(self, user_id: str, refreshable: bool) -> None:
        await self._session.execute(
            update(ConnectionRow).where(ConnectionRow.user_id == user_id).values(refreshable=refreshable)
        )

    async def due_login_warnings(self, now_ms: int, warn_before_ms: int, limit: int) -> list[ConnectionSummary]:
        stmt = (
            select(ConnectionRow)
            .where(
                ConnectionRow.refresh_token_expires_at.is_not(None),
                ConnectionRow.state != "reconnect_required",
                ConnectionRow.refresh_token_expires_at <= now_ms + warn_before_ms,
                or_(
                    ConnectionRow.login_warned_for.is_(None),
                    ConnectionRow.login_warned_for != ConnectionRow.refresh_token_expires_at,
                ),
            )
            .order_by(ConnectionRow.refresh_token_expires_at)
            .limit(limit)
        )
        return [_summary(row) for row in (await self._session.execute(stmt)).scalars()]

    async def mark_login_warned(self, user_id: str, refresh_token_expires_at: int) -> bool:
        result = await self._session.execute(
            update(ConnectionRow)
            .where(
                ConnectionRow.user_id == user_id,
                ConnectionRow.refresh_token_expires_at == refresh_token_expires_at,
                or_(
                    ConnectionRow.login_warned_for.is_(None),
                    ConnectionRow.login_warned_for != refresh_token_expires_at,
                ),
            )
            .values(login_warned_for=refresh_token_expires_at)
        )
        return _affected(result) == 1

    async def unmark_login_warned(self, user_id: str, refresh_token_expires_at: int) -> None:
        await self._session.execute(
            update(ConnectionRow)
            .where(ConnectionRow.user_id == user_id, ConnectionRow.login_warned_for == refresh_token_expires_at)
            .values(login_warned_for=None)
        )

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._session.execute(select(ConnectionRow.state, func.count()).group_by(ConnectionRow.state))
        return {state: count for state, count in rows.all()}

    # --- mapping -----------------------------------------------------------------
    def _to_values(self, c: Connection) -> tuple[dict[str, Any], dict[str, Any]]:
        sealed = self._cipher.encrypt(c.credentials.to_bytes(), RecordContext(c.user_id, c.version))
        now = utcnow()
        connection = {
            "user_id": c.user_id,
            "kind": c.kind,
            "state": c.state,
            "scopes": list(c.scopes),
            "expires_at": c.expires_at,
            "refresh_token_expires_at": c.refresh_token_expires_at,
            "account": c.account.to_dict() if c.account else None,
            "version": c.version,
            "issued_at": c.issued_at,
            "refreshable": c.refreshable,
            "refresh_failures": c.refresh_failures,
            "next_refresh_at": c.next_refresh_at,
            "last_refresh_error": c.last_refresh_error,
            "refreshed_at": c.refreshed_at,
            "login_warned_for": c.login_warned_for,
            "created_at": c.created_at or now,
            "updated_at": c.updated_at or now,
        }
        secret = {
            "user_id": c.user_id,
            "version": c.version,
            "kek_id": sealed.kek_id,
            "wrapped_data_key": sealed.wrapped_data_key,
            "nonce": sealed.nonce,
            "ciphertext": sealed.ciphertext,
            "updated_at": now,
        }
        return connection, secret

    def _to_domain(self, row: ConnectionRow, secret: SealedSecretRow | None) -> Connection:
        return _connection(row, None if secret is None else (secret.version, _record(secret)), self._cipher)


def _connection(row: Any, secret: tuple[int, EncryptedRecord] | None, cipher: RecordCipher) -> Connection:
    """The domain object of a `connections` row (ORM or Core: same attribute names) and its
    sealed secret (version, record), decrypted."""
    if secret is None or secret[0] != row.version:
        raise DecryptionFailed("the sealed secret is missing or belongs to another version")
    plaintext = cipher.decrypt(secret[1], RecordContext(row.user_id, row.version))
    try:
        credentials = Credentials.from_bytes(plaintext)
    except (ValueError, KeyError, TypeError):
        raise DecryptionFailed("decrypted record is not a credentials document") from None
    return Connection(
        **_described(row),
        credentials=credentials,
        updated_at=_aware(row.updated_at),
        refresh_failures=row.refresh_failures or 0,
        next_refresh_at=row.next_refresh_at,
        last_refresh_error=row.last_refresh_error,
        refreshed_at=_aware(row.refreshed_at),
        login_warned_for=row.login_warned_for,
    )


class SqlSecretRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def not_under(self, kek_id: str, *, after_user: str | None, limit: int) -> list[SecretRef]:
        stmt = select(SealedSecretRow.user_id, SealedSecretRow.version, SealedSecretRow.kek_id).where(
            SealedSecretRow.kek_id != kek_id
        )
        if after_user is not None:
            stmt = stmt.where(SealedSecretRow.user_id > after_user)
        stmt = stmt.order_by(SealedSecretRow.user_id).limit(limit)
        return [SecretRef(u, v, k) for u, v, k in (await self._session.execute(stmt)).all()]

    async def rewrap(self, ref: SecretRef, cipher: RecordCipher) -> bool:
        row = (
            await self._session.execute(
                select(SealedSecretRow).where(
                    SealedSecretRow.user_id == ref.user_id,
                    SealedSecretRow.version == ref.version,
                    SealedSecretRow.kek_id == ref.kek_id,
                )
            )
        ).scalar_one_or_none()
        if row is None:
            return False
        rewrapped = cipher.rewrap(_record(row), RecordContext(ref.user_id, ref.version))
        if rewrapped.kek_id == ref.kek_id:
            return False
        result = await self._session.execute(
            update(SealedSecretRow)
            .where(
                SealedSecretRow.user_id == ref.user_id,
                SealedSecretRow.version == ref.version,
                SealedSecretRow.kek_id == ref.kek_id,
            )
            .values(kek_id=rewrapped.kek_id, wrapped_data_key=rewrapped.wrapped_data_key, updated_at=utcnow())
        )
        return _affected(result) == 1

    async def count_by_kek(self) -> dict[str, int]:
        rows = await self._session.execute(
            select(SealedSecretRow.kek_id, func.count()).group_by(SealedSecretRow.kek_id)
        )
        return {kek_id: count for kek_id, count in rows.all()}


def _dialect_insert(dialect: str) -> Any:
    """The dialect's INSERT (both have ON CONFLICT DO NOTHING / DO UPDATE)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql
        return postgresql.insert
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite
        return sqlite.insert
    raise NotImplementedError(f"unsupported database dialect {dialect!r}")  # pragma: no cover - two supported


def _affected(result: Result[Any]) -> int:
    """Rows an INSERT/UPDATE/DELETE touched (its result is a CursorResult at runtime)."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


class SqlProcessedEvents:
    def __init__(self, session: AsyncSession, dialect: str) -> None:
        self._session = session
        self._dialect = dialect

    async def mark_processed(self, event_id: str, subject: str) -> bool:
        stmt = (
            _dialect_insert(self._dialect)(ProcessedEventRow)
            .values(event_id=event_id, subject=subject, processed_at=utcnow())
            .on_conflict_do_nothing(index_elements=[ProcessedEventRow.event_id])
            .returning(ProcessedEventRow.event_id)
        )
        inserted = (await self._session.execute(stmt)).scalar_one_or_none()
        return inserted is not None

    async def mark_many(self, event_ids: Sequence[str], subject: str) -> set[str]:
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return set()
        now = utcnow()
        stmt = (
            _dialect_insert(self._dialect)(ProcessedEventRow)
            .values([{"event_id": e, "subject": subject, "processed_at": now} for e in ids])
            .on_conflict_do_nothing(index_elements=[ProcessedEventRow.event_id])
            .returning(ProcessedEventRow.event_id)
        )
        return set((await self._session.execute(stmt)).scalars())

    async def delete_older_than(self, cutoff: datetime, *, batch: int = 5000) -> int:
        doomed = select(ProcessedEventRow.event_id).where(ProcessedEventRow.processed_at < cutoff).limit(batch)
        result = await self._session.execute(
            delete(ProcessedEventRow).where(ProcessedEventRow.event_id.in_(doomed.scalar_subquery()))
        )
        return _affected(result)


class SqlRevocations:
    def __init__(self, session: AsyncSession, dialect: str) -> None:
        self._session = session
        self._dialect = dialect

    async def revoked_at(self, user_id: str) -> datetime | None:
        value = (
            await self._session.execute(select(RevocationRow.revoked_at).where(RevocationRow.user_id == user_id))
        ).scalar_one_or_none()
        return _aware(value)

    async def revoked_at_many(self, user_ids: Sequence[str]) -> dict[str, datetime]:
        users = sorted(set(user_ids))
        if not users:
            return {}
        rows = await self._session.execute(
            select(RevocationRow.user_id, RevocationRow.revoked_at).where(RevocationRow.user_id.in_(users)))
        return {user_id: _aware(at) for user_id, at in rows.all()}  # type: ignore[misc]

    async def record(self, user_id: str, at: datetime, event_id: str | None) -> None:
        stmt = _dialect_insert(self._dialect)(RevocationRow).values(user_id=user_id, revoked_at=at, event_id=event_id)
        stmt = stmt.on_conflict_do_update(
            index_elements=[RevocationRow.user_id],
            set_={"revoked_at": stmt.excluded.revoked_at, "event_id": stmt.excluded.event_id},
            where=RevocationRow.revoked_at < stmt.excluded.revoked_at,
        )
        await self._session.execute(stmt)

    async def delete_older_than(self, cutoff: datetime) -> int:
        result = await self._session.execute(delete(RevocationRow).where(RevocationRow.revoked_at < cutoff))
        return _affected(result)


class SqlAuditLog:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @staticmethod
    def _values(entry: AuditEntry, at: datetime) -> dict[str, Any]:
        return {
            "at": at,
            "actor": entry.actor,
            "action": entry.action,
            "outcome": entry.outcome,
            "user_id": entry.user_id,
            "reason": entry.reason,
            "event_id": entry.event_id,
            "kek_id": entry.kek_id,
            "version": entry.version,
            "detail": dict(entry.detail) if entry.detail is not None else None,
        }

    async def add(self, entry: AuditEntry, at: datetime | None = None) -> None:
        await self._session.execute(insert(AuditRow).values(**self._values(entry, at or utcnow())))

    async def add_many(self, entries: Sequence[tuple[AuditEntry, datetime]]) -> None:
        if entries:
            await self._session.execute(insert(AuditRow), [self._values(e, at) for e, at in entries])

    async def list(self, *, user_id: str | None = None, action: str | None = None, limit: int = 100) -> list[AuditRecord]:
        stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(AuditRow.user_id == user_id)
        if action is not None:
            stmt = stmt.where(AuditRow.action == action)
        records = []
        for row in (await self._session.execute(stmt)).scalars():
            entry = AuditEntry(
                actor=row.actor,
                action=row.action,
                outcome=row.outcome,
                user_id=row.user_id,
                reason=row.reason,
                event_id=row.event_id,
                kek_id=row.kek_id,
                version=row.version,
                detail=row.detail,
            )
            records.append(AuditRecord(id=row.id, at=_aware(row.at) or row.at, entry=entry))
        return records

    async def delete_older_than(self, cutoff: datetime) -> int:
        result = await self._session.execute(delete(AuditRow).where(AuditRow.at < cutoff))
        return _affected(result)


_SANDBOX_LEASES = cast(Table, SandboxLeaseRow.__table__)
_LEASE_FIELDS = ("user_id", "sandbox_id", "jti", "mode", "issued_at", "expires_at", "ended_at", "end_reason",
                 "announced", "last_released_at")
_READ_SANDBOX_LEASES = select(_SANDBOX_LEASES).where(
    _SANDBOX_LEASES.c.user_id.in_(bindparam("users", expanding=True)),
    _SANDBOX_LEASES.c.sandbox_id.in_(bindparam("sandboxes", expanding=True)),
)


_ROW = SandboxLeaseRow
_RECORD_RELEASE = (
    update(_SANDBOX_LEASES)
    .where(_SANDBOX_LEASES.c.user_id == bindparam("b_user"), _SANDBOX_LEASES.c.sandbox_id == bindparam("b_sandbox"),
           or_(_SANDBOX_LEASES.c.last_released_at.is_(None), _SANDBOX_LEASES.c.last_released_at < bindparam("b_at")))
    .values(last_released_at=bindparam("b_at"))
)


def _sandbox_lease(row: Any) -> SandboxLease:
    return SandboxLease(**{name: getattr(row, name) for name in _LEASE_FIELDS})


class SqlSandboxLeases:
    """Leases (the newest grant per person and sandbox). Writes are upserts of the whole row:
    the use cases decide with the domain's rules, under the row lock of `get(for_update=True)`."""

    def __init__(self, session: AsyncSession, dialect: str) -> None:
        self._session = session
        self._dialect = dialect

    async def get(self, user_id: str, sandbox_id: str, *, for_update: bool = False) -> SandboxLease | None:
        stmt = select(_ROW).where(_ROW.user_id == user_id, _ROW.sandbox_id == sandbox_id)
        if for_update:
            stmt = stmt.with_for_update()
        row = (await self._session.execute(stmt)).scalar_one_or_none()
        return None if row is None else _sandbox_lease(row)

    async def save(self, lease: SandboxLease) -> None:
        # last_released_at is never written here, on insert either: record_releases owns it
        values = {name: getattr(lease, name) for name in _LEASE_FIELDS if name != "last_released_at"}
        stmt = _dialect_insert(self._dialect)(SandboxLeaseRow).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[SandboxLeaseRow.user_id, SandboxLeaseRow.sandbox_id],
            set_={name: stmt.excluded[name] for name in values if name not in ("user_id", "sandbox_id")},
        )
        await self._session.execute(stmt)

    async def live_for(self, user_id: str, now_ms: int, *, limit: int = 1000) -> list[SandboxLease]:
        stmt = (
            select(SandboxLeaseRow)
            .where(_ROW.user_id == user_id, _ROW.ended_at.is_(None), _ROW.expires_at > now_ms)
            .order_by(SandboxLeaseRow.expires_at)
            .limit(limit)
        )
        return [_sandbox_lease(row) for row in (await self._session.execute(stmt)).scalars()]

    async def due(self, now_ms: int, *, limit: int) -> list[SandboxLease]:
        """Leases past their expiry that have not ended yet, and ended ones not announced yet."""
        stmt = (
            select(SandboxLeaseRow)
            .where(or_(
                (SandboxLeaseRow.ended_at.is_(None)) & (SandboxLeaseRow.expires_at <= now_ms),
                (SandboxLeaseRow.ended_at.is_not(None)) & (SandboxLeaseRow.announced.is_(False)),
            ))
            .order_by(SandboxLeaseRow.expires_at)
            .limit(limit)
        )
        return [_sandbox_lease(row) for row in (await self._session.execute(stmt)).scalars()]

    async def mark_announced(self, user_id: str, sandbox_id: str, ended_at: int) -> None:
        await self._session.execute(
            update(SandboxLeaseRow)
            .where(_ROW.user_id == user_id, _ROW.sandbox_id == sandbox_id, _ROW.ended_at == ended_at)
            .values(announced=True)
        )

    async def record_releases(self, releases: Sequence[tuple[str, str, int]]) -> None:
        """(user, sandbox, at) — the last time credentials left for each sandbox (newest wins).
        One executemany of a Core UPDATE (no ORM session synchronisation per row)."""
        if releases:
            await self._session.execute(_RECORD_RELEASE, [{"b_user": u, "b_sandbox": s, "b_at": at}
                                                          for u, s, at in releases])

    async def delete_ended_before(self, cutoff_ms: int) -> int:
        result = await self._session.execute(
            delete(SandboxLeaseRow).where(SandboxLeaseRow.ended_at < cutoff_ms, SandboxLeaseRow.announced.is_(True))
        )
        return _affected(result)


# --- unit of work ----------------------------------------------------------------
class SqlUnitOfWork:
    """`async with store.unit_of_work(cipher) as uow: ...; await uow.commit()`.

    One session, one transaction. Leaving without commit rolls back. Driver errors raised
    anywhere inside the block come out as `StoreUnavailable` / `ConcurrencyConflict`."""

    connections: SqlConnectionRepository
    secrets: SqlSecretRepository
    processed_events: SqlProcessedEvents
    revocations: SqlRevocations
    audit: SqlAuditLog
    sandbox_leases: SqlSandboxLeases

    def __init__(self, sessions: async_sessionmaker[AsyncSession], cipher: RecordCipher, *, dialect: str) -> None:
        self._sessions = sessions
        self._cipher = cipher
        self._dialect = dialect
        self._session: AsyncSession | None = None

    async def __aenter__(self) -> Self:
        self._session = self._sessions()
        self.connections = SqlConnectionRepository(self._session, self._cipher, self._dialect)
        self.secrets = SqlSecretRepository(self._session)
        self.processed_events = SqlProcessedEvents(self._session, self._dialect)
        self.revocations = SqlRevocations(self._session, self._dialect)
        self.audit = SqlAuditLog(self._session)
        self.sandbox_leases = SqlSandboxLeases(self._session, self._dialect)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session, self._session = self._session, None
        assert session is not None
        try:
            await session.rollback()  # no-op after commit
        except Exception:
            log.debug("rollback failed", exc_info=True)
        finally:
            try:
                await session.close()
            except Exception:
                log.debug("session close failed", exc_info=True)
        if exc is not None and (mapped := translate_error(exc)) is not None:
            raise mapped from exc

    async def commit(self) -> None:
        assert self._session is not None, "commit() outside `async with`"
        await self._session.commit()

    async def rollback(self) -> None:
        assert self._session is not None, "rollback() outside `async with`"
        await self._session.rollback()


# --- the store: engine, migrations, sessions ------------------------------------------
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")  # deleted secrets are zeroed, not left in free pages
    finally:
        cursor.close()


def _sqlite_reader_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA query_only=ON")  # this engine only ever reads
    finally:
        cursor.close()


def _sqlite_migration_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control from pysqlite (it would not wrap DDL in a transaction) and
    # turn FK enforcement off: SQLite's copy-and-move ALTER must not cascade deletes.
    # WAL is already on (_switch_sqlite_to_wal ran first).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=OFF")
    finally:
        cursor.close()


def _sqlite_begin_immediate(conn: SyncConnection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock first: concurrent migrators queue here


def _switch_sqlite_to_wal(url: Any, deadline_s: float = 60.0) -> None:
    """Put a SQLite file in WAL mode (persistent), before any migrator takes the write lock.
    Leaving rollback-journal mode needs the file to itself: SQLite answers "database is locked"
    at once, without its busy handler, while another connection writes — so retry here."""
    engine = create_engine(url.set(drivername="sqlite"), poolclass=NullPool, connect_args={"timeout": 5})
    deadline = time.monotonic() + deadline_s
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
                return
            except sa_exc.OperationalError as exc:
                if "locked" not in str(exc.orig) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a worker thread: the event loop keeps running
    finally:
        engine.dispose()


# Alembic keeps the running command's context in module globals (`alembic.context`, `op`):
# two commands interleaved on one event loop (several stores migrating at once) would run
# each other's scripts on the wrong connection. One command per event loop at a time (a
# service runs one loop); across processes the database's own lock (advisory lock /
# BEGIN IMMEDIATE) serialises them.
_ALEMBIC_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _alembic_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    if (lock := _ALEMBIC_LOCKS.get(loop)) is None:
        lock = _ALEMBIC_LOCKS[loop] = asyncio.Lock()
    return lock


SQLITE_FILE_MODE = 0o600


def prepare_sqlite_file(url: str) -> None:
    """A SQLite database file (and its -wal/-shm, which SQLite creates with the database file's
    own permissions) readable by its owner only: it holds every sealed secret and the audit
    log. Creates the directory (0700) and the file (0600) if missing; tightens existing ones.
    No-op for memory and other databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    path = Path(database).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), SQLITE_FILE_MODE))
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, SQLITE_FILE_MODE)
        except FileNotFoundError:
            continue


def alembic_config(connection: SyncConnection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


class SqlStore:
    """Engine + session factory for one database. `schema` (PostgreSQL only) puts the tables
    in that schema instead of the connection's default one."""

    def __init__(self, engine: AsyncEngine, *, schema: str | None = None) -> None:
        self.dialect = engine.dialect.name
        if schema is not None and not SCHEMA_NAME.match(schema):
            raise ValueError("schema names must match [A-Za-z_][A-Za-z0-9_]{0,62}")
        self.schema = schema if self.dialect == "postgresql" else None
        self._base_engine = engine
        if self.schema:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        self._sqlite_reader: Engine | None = None
        self._in_wal = False
        if self.dialect == "sqlite":  # no connection is made until the first read
            self._sqlite_reader = create_engine(
                engine.url.set(drivername="sqlite"), hide_parameters=True, connect_args={"timeout": 10}
            )
            event.listen(self._sqlite_reader, "connect", _sqlite_reader_pragmas)

    @classmethod
    def from_url(
        cls, url: str, *, schema: str | None = None, echo: bool = False, pool_timeout_s: float = 5.0
    ) -> SqlStore:
        prepare_sqlite_file(url)
        backend = make_url(url).get_backend_name()
        # hide_parameters: bound values (ciphertext, ids) never appear in driver error messages.
        # SQLite is a file: nothing to ping; a server connection may have been dropped.
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": backend != "sqlite", "hide_parameters": True}
        if backend == "sqlite":
            kwargs["connect_args"] = {"timeout": 10}
        else:
            kwargs["pool_timeout"] = pool_timeout_s
            kwargs["connect_args"] = {"timeout": pool_timeout_s, "command_timeout": 30}
        engine = create_async_engine(url, **kwargs)
        if backend == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return cls(engine, schema=schema)

    def __repr__(self) -> str:  # the URL may carry a password: never show it
        return f"SqlStore(dialect={self.dialect!r}, schema={self.schema!r})"

    # --- migrations ------------------------------------------------------------------
    def _migration_engine(self) -> AsyncEngine:
        url = self._base_engine.url
        if self.dialect == "sqlite":
            engine = create_async_engine(url, poolclass=NullPool, hide_parameters=True, connect_args={"timeout": 60})
            event.listen(engine.sync_engine, "connect", _sqlite_migration_connect)
            event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
            return engine
        return create_async_engine(url, poolclass=NullPool, hide_parameters=True)

    def _prepare(self, conn: SyncConnection) -> None:
        if self.dialect == "postgresql":
            # One migrator per database+schema at a time; the others wait, then find it done.
            key = f"ccbridge-vault-migrate:{self.schema or ''}"
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})
            if self.schema:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                conn.exec_driver_sql(f'SET LOCAL search_path TO "{self.schema}"')

    def _upgrade_sync(self, conn: SyncConnection, revision: str) -> None:
        from alembic import command

        with conn.begin():
            self._prepare(conn)
            config = alembic_config(conn)
            inspector = inspect(conn)
            if inspector.has_table("connections") and not inspector.has_table("alembic_version"):
                # A database the walking skeleton created with create_all(): adopt it.
                log.warning("adopting a pre-Alembic vault database at revision %s", BASELINE_REVISION)
                command.stamp(config, BASELINE_REVISION)
            command.upgrade(config, revision)

    def _downgrade_sync(self, conn: SyncConnection, revision: str) -> None:
        from alembic import command

        with conn.begin():
            self._prepare(conn)
            command.downgrade(alembic_config(conn), revision)

    def _current_sync(self, conn: SyncConnection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with conn.begin():
            self._prepare(conn)
            return MigrationContext.configure(conn).get_current_revision()

    async def _run_migration(self, fn: Any, *args: Any) -> Any:
        engine = self._migration_engine()
        try:
            async with _alembic_lock():
                if self.dialect == "sqlite" and not self._in_wal:  # persistent: once per store
                    await asyncio.to_thread(_switch_sqlite_to_wal, engine.url)
                    self._in_wal = True
                async with engine.connect() as conn:
                    return await conn.run_sync(fn, *args)
        except BaseException as exc:
            if (mapped := translate_error(exc)) is not None:
                raise mapped from exc
            raise
        finally:
            await engine.dispose()

    async def migrate(self, revision: str = "head") -> None:
        """Bring the schema to `revision` (Alembic), safely from several processes at once."""
        await self._run_migration(self._upgrade_sync, revision)

    async def downgrade(self, revision: str) -> None:
        await self._run_migration(self._downgrade_sync, revision)

    async def current_revision(self) -> str | None:
        return await self._run_migration(self._current_sync)

    async def create_all(self) -> None:
        """Kept for callers of the walking skeleton: the schema now comes from migrations."""
        await self.migrate()

    # --- sessions ----------------------------------------------------------------------
    def unit_of_work(self, cipher: RecordCipher) -> SqlUnitOfWork:
        return SqlUnitOfWork(self._sessions, cipher, dialect=self.dialect)

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._sqlite_reader is not None:
            self._sqlite_reader.dispose()

    # --- the release read path -------------------------------------------------------
    async def read_for_release(
        self, wanted: Sequence[tuple[str, str | None]], cipher: RecordCipher
    ) -> ReleaseRead:
        """The connections (decrypted; a `KeyringError` in place of one that does not decrypt)
        and sandbox leases of (user, sandbox) pairs, for one credentials request of any size:
        read-only statements outside a unit of work — `user_id IN (…)`, one round for the whole
        batch. On SQLite they run on a plain pysqlite connection in ONE worker-thread call
        (aiosqlite would hop threads ~6 times per statement: 0.27 ms instead of 1.3 ms a read)."""
        users = sorted({user for user, _ in wanted})
        sandboxes = sorted({sbx for _, sbx in wanted if sbx is not None})
        try:
            if self.dialect == "sqlite":
                rows, lease_rows = await asyncio.to_thread(self._read_sqlite, users, sandboxes)
            else:
                async with self.engine.connect() as conn:
                    rows, lease_rows = await conn.run_sync(_read_release_rows, users, sandboxes)
        except Exception as exc:
            if (mapped := translate_error(exc)) is not None:
                raise mapped from exc
            raise
        connections: dict[str, Connection | KeyringError] = {}
        for row in rows:
            try:
                connections[row.user_id] = _connection_of_read(row, cipher)
            except KeyringError as exc:
                connections[row.user_id] = exc
        pairs = set(wanted)
        leases = {(r.user_id, r.sandbox_id): _sandbox_lease(r) for r in lease_rows if (r.user_id, r.sandbox_id) in pairs}
        return connections, leases

    def _read_sqlite(self, users: list[str], sandboxes: list[str]) -> tuple[Any, Any]:
        assert self._sqlite_reader is not None
        with self._sqlite_reader.connect() as conn:
            return _read_release_rows(conn, users, sandboxes)


ReleaseRead = tuple[dict[str, "Connection | KeyringError"], dict[tuple[str, str], SandboxLease]]


def _read_release_rows(conn: SyncConnection, users: list[str], sandboxes: list[str]) -> tuple[Any, Any]:
    rows = conn.execute(_READ_CONNECTIONS, {"users": users}).all()
    leases: Any = []
    if sandboxes:  # both sets: a few pairs more than wanted at worst, filtered by the caller
        leases = conn.execute(_READ_SANDBOX_LEASES, {"users": users, "sandboxes": sandboxes}).all()
    return rows, leases
