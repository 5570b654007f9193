"""SQLAlchemy 2 (async) persistence: models, repository and unit of work.

One module holds every model on one `metadata`, so Alembic can autogenerate from it later.
Same code on SQLite (aiosqlite, WAL) and PostgreSQL (asyncpg).

Credentials are encrypted by the keyring before they reach a row; the row holds the KEK id,
the wrapped data key, the nonce and the ciphertext, bound (AAD) to user_id and version.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.vault.domain import Account, Connection, Credentials
from services.vault.errors import ConcurrencyConflict, DecryptionFailed, StoreUnavailable
from services.vault.keyring import EncryptedRecord, Keyring, RecordContext

log = logging.getLogger(__name__)
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now() -> datetime:
    return datetime.now(UTC)


class ConnectionRow(Base):
    __tablename__ = "connections"

    user_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    expires_at: Mapped[int] = mapped_column(BigInteger, doc="Access-token expiry, ms since the epoch.")
    refresh_token_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    account: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    version: Mapped[int] = mapped_column(Integer)
    kek_id: Mapped[str] = mapped_column(String(64))
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ProcessedEventRow(Base):
    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(128))
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


metadata = Base.metadata


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


def translate_error(exc: BaseException) -> BaseException | None:
    """Driver errors → the vault's error tree (None: not a storage problem we know)."""
    if isinstance(exc, sa_exc.IntegrityError):
        return ConcurrencyConflict("the row changed concurrently")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StoreUnavailable("database connection lost")
    if isinstance(exc, _UNAVAILABLE):
        return StoreUnavailable(f"database unavailable ({type(exc).__name__})")
    return None


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # SQLite keeps no zone; we only ever write UTC
    return value


# --- repository --------------------------------------------------------------------
class SqlConnectionRepository:
    def __init__(self, session: AsyncSession, keyring: Keyring) -> None:
        self._session = session
        self._keyring = keyring
        self._loaded_versions: dict[str, int] = {}  # optimistic concurrency: version we read

    async def get(self, user_id: str, *, for_update: bool = False) -> Connection | None:
        stmt = select(ConnectionRow).where(ConnectionRow.user_id == user_id)
        if for_update:
            stmt = stmt.with_for_update()  # PostgreSQL row lock; SQLite's write lock covers it
        row = (await self._session.execute(stmt)).scalar_one_or_none()
        if row is None:
            return None
        connection = self._to_domain(row)
        self._loaded_versions[connection.user_id] = connection.version
        return connection

    async def add(self, connection: Connection) -> None:
        await self._session.execute(insert(ConnectionRow).values(**self._to_values(connection)))
        self._loaded_versions[connection.user_id] = connection.version

    async def update(self, connection: Connection) -> None:
        loaded = self._loaded_versions.get(connection.user_id)
        if loaded is None:
            raise ValueError("update() a connection that was not read in this unit of work")
        if connection.version <= loaded:
            raise ValueError("update() needs a changed connection (version must grow)")
        values = self._to_values(connection)
        values.pop("user_id")
        values.pop("created_at")
        result = await self._session.execute(
            update(ConnectionRow)
            .where(ConnectionRow.user_id == connection.user_id, ConnectionRow.version == loaded)
            .values(**values)
        )
        if result.rowcount != 1:
            raise ConcurrencyConflict(f"connection of {connection.user_id} changed concurrently")
        self._loaded_versions[connection.user_id] = connection.version

    # --- mapping -----------------------------------------------------------------
    def _to_values(self, c: Connection) -> dict[str, Any]:
        sealed = self._keyring.encrypt(c.credentials.to_bytes(), RecordContext(c.user_id, c.version))
        now = _now()
        return {
            "user_id": c.user_id,
            "kind": c.kind,
            "state": c.state,
            "scopes": list(c.scopes),
            "expires_at": c.expires_at,
            "refresh_token_expires_at": c.refresh_token_expires_at,
            "account": c.account.to_dict() if c.account else None,
            "version": c.version,
            "kek_id": sealed.kek_id,
            "wrapped_data_key": sealed.wrapped_data_key,
            "nonce": sealed.nonce,
            "ciphertext": sealed.ciphertext,
            "created_at": c.created_at or now,
            "updated_at": c.updated_at or now,
        }

    def _to_domain(self, row: ConnectionRow) -> Connection:
        record = EncryptedRecord(
            kek_id=row.kek_id, wrapped_data_key=row.wrapped_data_key, nonce=row.nonce, ciphertext=row.ciphertext
        )
        plaintext = self._keyring.decrypt(record, RecordContext(row.user_id, row.version))
        try:
            credentials = Credentials.from_bytes(plaintext)
        except (ValueError, KeyError, TypeError):
            raise DecryptionFailed("decrypted record is not a credentials document") from None
        return Connection(
            user_id=row.user_id,
            kind=row.kind,  # type: ignore[arg-type]
            state=row.state,  # type: ignore[arg-type]
            credentials=credentials,
            scopes=tuple(row.scopes or ()),
            expires_at=row.expires_at,
            refresh_token_expires_at=row.refresh_token_expires_at,
            account=Account.from_dict(row.account),
            version=row.version,
            created_at=_aware(row.created_at),
            updated_at=_aware(row.updated_at),
        )


class SqlProcessedEvents:
    def __init__(self, session: AsyncSession, dialect: str) -> None:
        self._session = session
        self._dialect = dialect

    async def mark_processed(self, event_id: str, subject: str) -> bool:
        dialect = self._dialect
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:  # pragma: no cover - only the two supported databases
            raise NotImplementedError(f"unsupported database dialect {dialect!r}")
        stmt = (
            dialect_insert(ProcessedEventRow)
            .values(event_id=event_id, subject=subject, processed_at=_now())
            .on_conflict_do_nothing(index_elements=[ProcessedEventRow.event_id])
            .returning(ProcessedEventRow.event_id)
        )
        inserted = (await self._session.execute(stmt)).scalar_one_or_none()
        return inserted is not None


# --- unit of work ----------------------------------------------------------------
class SqlUnitOfWork:
    """`async with store.unit_of_work(keyring) as uow: ...; await uow.commit()`.

    One session, one transaction. Leaving without commit rolls back. Driver errors raised
    anywhere inside the block come out as `StoreUnavailable` / `ConcurrencyConflict`."""

    connections: SqlConnectionRepository
    processed_events: SqlProcessedEvents

    def __init__(self, sessions: async_sessionmaker[AsyncSession], keyring: Keyring, *, dialect: str) -> None:
        self._sessions = sessions
        self._keyring = keyring
        self._dialect = dialect
        self._session: AsyncSession | None = None

    async def __aenter__(self) -> Self:
        self._session = self._sessions()
        self.connections = SqlConnectionRepository(self._session, self._keyring)
        self.processed_events = SqlProcessedEvents(self._session, self._dialect)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session, self._session = self._session, None
        assert session is not None
        try:
            await session.rollback()  # no-op after commit
        except Exception:  # noqa: BLE001 - the connection may be gone; close() still releases it
            log.debug("rollback failed", exc_info=True)
        finally:
            try:
                await session.close()
            except Exception:  # noqa: BLE001
                log.debug("session close failed", exc_info=True)
        if exc is not None and (mapped := translate_error(exc)) is not None:
            raise mapped from exc

    async def commit(self) -> None:
        assert self._session is not None, "commit() outside `async with`"
        await self._session.commit()

    async def rollback(self) -> None:
        assert self._session is not None, "rollback() outside `async with`"
        await self._session.rollback()


# --- the store: engine, schema, sessions ------------------------------------------
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def ensure_sqlite_parent(url: str) -> None:
    """Create the directory of a SQLite file URL (no-op for memory and other databases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


class SqlStore:
    """Engine + session factory for one database. `schema` (PostgreSQL only) puts the tables
    in that schema instead of the connection's default one."""

    def __init__(self, engine: AsyncEngine, *, schema: str | None = None) -> None:
        self.dialect = engine.dialect.name
        if schema is not None and not SCHEMA_NAME.match(schema):
            raise ValueError("schema names must match [A-Za-z_][A-Za-z0-9_]{0,62}")
        self.schema = schema if self.dialect == "postgresql" else None
        if self.schema:
            engine = engine.execution_options(schema_translate_map={None: self.schema})
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)

    @classmethod
    def from_url(cls, url: str, *, schema: str | None = None, echo: bool = False) -> SqlStore:
        ensure_sqlite_parent(url)
        backend = make_url(url).get_backend_name()
        # hide_parameters: bound values (ciphertext, ids) never appear in driver error messages.
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True, "hide_parameters": True}
        if backend == "sqlite":
            kwargs["connect_args"] = {"timeout": 10}
        engine = create_async_engine(url, **kwargs)
        if backend == "sqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return cls(engine, schema=schema)

    def __repr__(self) -> str:  # the URL may carry a password: never show it
        return f"SqlStore(dialect={self.dialect!r}, schema={self.schema!r})"

    async def create_all(self) -> None:
        """Create missing tables (Alembic takes this over later)."""
        try:
            async with self.engine.begin() as conn:
                if self.schema:
                    await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                await conn.run_sync(metadata.create_all)
        except BaseException as exc:
            if (mapped := translate_error(exc)) is not None:
                raise mapped from exc
            raise

    def unit_of_work(self, keyring: Keyring) -> SqlUnitOfWork:
        return SqlUnitOfWork(self._sessions, keyring, dialect=self.dialect)

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()
