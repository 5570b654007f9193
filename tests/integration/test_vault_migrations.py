"""Alembic migrations of the vault on a real SQLite file and a real PostgreSQL (own schema):
the migrated schema is exactly the models, concurrent starts migrate once, a walking-skeleton
database (create_all, no alembic_version) is adopted with its data, downgrade/upgrade keeps
data, and `ccbridge vault migrate` works."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from typer.testing import CliRunner

from services.vault.adapters.models import metadata
from services.vault.adapters.store import SqlStore, head_revision
from services.vault.domain import Credentials
from services.vault.keyring import Keyring, RecordContext
from tests.vault_fixtures import VaultDb, canary, new_user


def _store(db: VaultDb) -> SqlStore:
    return SqlStore.from_url(db.url, schema=db.schema)


@asynccontextmanager
async def _raw(store: SqlStore) -> AsyncIterator[Any]:
    """A transaction for plain SQL text, in the test's own PostgreSQL schema."""
    async with store.engine.begin() as conn:
        if store.schema:
            await conn.exec_driver_sql(f'SET LOCAL search_path TO "{store.schema}"')
        yield conn


async def _diff(store: SqlStore) -> list:
    def compare(conn):
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    async with store.engine.connect() as conn:
        if store.schema:
            await conn.exec_driver_sql(f'SET search_path TO "{store.schema}"')
        return await conn.run_sync(compare)


async def test_concurrent_migrations_reach_head_once_and_match_the_models(db: VaultDb) -> None:
    stores = [_store(db) for _ in range(3)]  # three stores of one process starting at the same time
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        assert await stores[0].current_revision() == head_revision()
        assert await _diff(stores[0]) == []  # the schema the migrations build is exactly the models
        await stores[1].migrate()  # idempotent
        assert await stores[1].current_revision() == head_revision()
    finally:
        for store in stores:
            await store.dispose()


async def test_replica_processes_migrating_at_once_all_reach_head(db: VaultDb, tmp_path: Path) -> None:
    """Replicas are processes: each runs Alembic with the database's lock as the only referee."""
    env = {**os.environ, "DATABASE_URL": db.url, "CCBRIDGE_DATA_DIR": str(tmp_path / "data")}
    if db.schema:
        env["VAULT_DATABASE_SCHEMA"] = db.schema
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ccbridge.cli", "vault", "migrate",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [(await proc.communicate())[0].decode() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert all(f"→ {head_revision()}" in out for out in outputs), outputs
    store = _store(db)
    try:
        assert await store.current_revision() == head_revision()
        assert await _diff(store) == []
    finally:
        await store.dispose()


async def _legacy_row(store: SqlStore, keyring: Keyring, user: str, token: str) -> None:
    """A connection as the walking skeleton stored it: the sealed secret inline."""
    record = keyring.encrypt(Credentials(token, "refresh-" + token).to_bytes(), RecordContext(user, 3))
    now = datetime.now(UTC)
    async with _raw(store) as conn:
        await conn.execute(
            text(
                "INSERT INTO connections (user_id, kind, state, scopes, expires_at, refresh_token_expires_at, "
                "account, version, kek_id, wrapped_data_key, nonce, ciphertext, created_at, updated_at) VALUES "
                "(:u, 'oauth', 'connected', :scopes, 1893456000000, NULL, NULL, 3, :kek, :w, :n, :c, :t, :t)"
            ),
            {"u": user, "scopes": json.dumps(["user:inference"]), "kek": record.kek_id, "w": record.wrapped_data_key,
             "n": record.nonce, "c": record.ciphertext, "t": now},
        )


async def test_a_walking_skeleton_database_is_adopted_with_its_data(db: VaultDb) -> None:
    store = _store(db)
    keyring = Keyring.generate()
    user, token = new_user(), canary("legacy")
    try:
        await store.migrate("0001")  # exactly the skeleton's create_all() schema ...
        async with _raw(store) as conn:  # ... without Alembic's bookkeeping
            await conn.execute(text("DROP TABLE alembic_version"))
        assert await store.current_revision() is None
        await _legacy_row(store, keyring, user, token)

        await store.migrate()

        assert await store.current_revision() == head_revision()
        assert await _diff(store) == []
        async with store.unit_of_work(keyring) as uow:
            conn = await uow.connections.get(user)
            due = await uow.connections.due_for_refresh(2_000_000_000_000, 0, 10)
        assert conn is not None and conn.version == 3
        assert (conn.credentials.access_token, conn.credentials.refresh_token) == (token, "refresh-" + token)
        assert user in [d.user_id for d in due]  # oauth rows of the skeleton are refreshable
    finally:
        await store.dispose()


async def test_downgrade_and_upgrade_keep_the_data(db: VaultDb) -> None:
    store = _store(db)
    keyring = Keyring.generate()
    user, token = new_user(), canary("roundtrip")
    try:
        await store.migrate("0001")
        await _legacy_row(store, keyring, user, token)
        await store.migrate()
        await store.downgrade("0001")
        assert await store.current_revision() == "0001"
        async with _raw(store) as conn:
            row = (await conn.execute(text("SELECT kek_id, version FROM connections WHERE user_id = :u"),
                                      {"u": user})).one()
        assert (row.kek_id, row.version) == (keyring.active_kek_id, 3)
        await store.migrate()
        async with store.unit_of_work(keyring) as uow:
            conn = await uow.connections.get(user)
        assert conn is not None and conn.credentials.access_token == token
    finally:
        await store.dispose()


def test_ccbridge_vault_migrate(tmp_path: Path, monkeypatch) -> None:
    from ccbridge.cli import app

    path = tmp_path / "cli" / "vault.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{path}")
    monkeypatch.setenv("CCBRIDGE_DATA_DIR", str(tmp_path / "data"))
    first = CliRunner().invoke(app, ["vault", "migrate"])
    assert first.exit_code == 0, first.output
    assert f"empty → {head_revision()}" in first.output
    again = CliRunner().invoke(app, ["vault", "migrate"])
    assert again.exit_code == 0 and f"{head_revision()} → {head_revision()}" in again.output
    assert path.exists()


async def test_a_new_sqlite_file_switches_to_wal_while_another_connection_writes(tmp_path: Path) -> None:
    """SQLite refuses to leave rollback-journal mode while another connection writes, at once and
    without its busy handler; the migration waits that writer out instead of failing."""
    import sqlite3

    from sqlalchemy.engine import make_url

    from services.vault.adapters.store import _switch_sqlite_to_wal

    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE early (x)")
    switching = asyncio.create_task(asyncio.to_thread(_switch_sqlite_to_wal, make_url(f"sqlite+aiosqlite:///{path}")))
    await asyncio.sleep(0.3)
    assert not switching.done()  # still waiting for the writer, not failed
    writer.execute("COMMIT")
    await asyncio.wait_for(switching, 10)
    writer.close()
    with closing(sqlite3.connect(path)) as reader:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert reader.execute("SELECT count(*) FROM early").fetchone() == (0,)  # the writer's work is kept
