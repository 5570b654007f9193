"""SQLAlchemy 2 (async) persistence: the engine, migrations, sessions and the unit of work
(the repositories it hands out are in repositories.py).

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
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import (
    Connection as SyncConnection,
)
from sqlalchemy import (
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from services.vault.adapters.repositories import (
    READ_CONNECTIONS,
    READ_SANDBOX_LEASES,
    SqlAuditLog,
    SqlConnectionRepository,
    SqlProcessedEvents,
    SqlRevocations,
    SqlSandboxLeases,
    SqlSecretRepository,
    connection_of_read,
    sandbox_lease_of,
)
from services.vault.domain import (
    Connection,
    SandboxLease,
)
from services.vault.errors import ConcurrencyConflict, KeyringError, StoreUnavailable
from services.vault.ports import RecordCipher

log = logging.getLogger(__name__)
SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
BASELINE_REVISION = "0001"

__all__ = ["BASELINE_REVISION", "MIGRATIONS_DIR", "SqlStore", "SqlUnitOfWork", "head_revision", "translate_error"]

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
                connections[row.user_id] = connection_of_read(row, cipher)
            except KeyringError as exc:
                connections[row.user_id] = exc
        pairs = set(wanted)
        leases = {(r.user_id, r.sandbox_id): sandbox_lease_of(r) for r in lease_rows if (r.user_id, r.sandbox_id) in pairs}
        return connections, leases

    def _read_sqlite(self, users: list[str], sandboxes: list[str]) -> tuple[Any, Any]:
        assert self._sqlite_reader is not None
        with self._sqlite_reader.connect() as conn:
            return _read_release_rows(conn, users, sandboxes)


ReleaseRead = tuple[dict[str, "Connection | KeyringError"], dict[tuple[str, str], SandboxLease]]


def _read_release_rows(conn: SyncConnection, users: list[str], sandboxes: list[str]) -> tuple[Any, Any]:
    rows = conn.execute(READ_CONNECTIONS, {"users": users}).all()
    leases: Any = []
    if sandboxes:  # both sets: a few pairs more than wanted at worst, filtered by the caller
        leases = conn.execute(READ_SANDBOX_LEASES, {"users": users, "sandboxes": sandboxes}).all()
    return rows, leases
