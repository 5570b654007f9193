"""SQLAlchemy 2 (async) repositories of the vault: connections and their sealed secrets,
processed events, revocations, the audit log and sandbox leases — one class per port of
`services.vault.ports`, all on one session (`SqlUnitOfWork` in store.py holds it).

Same statements on SQLite and PostgreSQL; credentials are encrypted by the keyring before
they reach a row (AAD: user_id and version).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Result,
    Table,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from services.vault.adapters.models import (
    AuditRow,
    ConnectionRow,
    ProcessedEventRow,
    RevocationRow,
    SandboxLeaseRow,
    SealedSecretRow,
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
from services.vault.errors import ConcurrencyConflict, DecryptionFailed, KeyringError
from services.vault.keyring import EncryptedRecord, RecordContext
from services.vault.ports import DueRefresh, RecordCipher, SecretRef


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
READ_CONNECTIONS = (
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


def connection_of_read(row: Any, cipher: RecordCipher) -> Connection:
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
        stmt = READ_CONNECTIONS.with_for_update(of=_CONNECTIONS) if for_update else READ_CONNECTIONS
        found: dict[str, tuple[ConnectionSummary, Connection | KeyringError]] = {}
        for row in (await self._session.execute(stmt, {"users": users})).all():
            self._loaded_versions[row.user_id] = row.version
            summary = ConnectionSummary(**_described(row), kek_id=row.secret_kek_id)
            try:
                found[row.user_id] = (summary, connection_of_read(row, self._cipher))
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
        return {user_id: _aware(at) for user_id, at in rows.all()}  # type: ignore[misc]  # the column is NOT NULL

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
READ_SANDBOX_LEASES = select(_SANDBOX_LEASES).where(
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


def sandbox_lease_of(row: Any) -> SandboxLease:
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
        return None if row is None else sandbox_lease_of(row)

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
        return [sandbox_lease_of(row) for row in (await self._session.execute(stmt)).scalars()]

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
        return [sandbox_lease_of(row) for row in (await self._session.execute(stmt)).scalars()]

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
