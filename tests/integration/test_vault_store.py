"""The vault's SQLAlchemy store on a real SQLite file and a real PostgreSQL (own schema per test):
encryption at rest, upsert/versioning, idempotency, concurrency and outage errors."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from services.vault.adapters.store import ConnectionRow, ProcessedEventRow, SqlStore, translate_error
from services.vault.domain import Connection, Credentials
from services.vault.errors import ConcurrencyConflict, DecryptionFailed, StoreUnavailable, UnknownKeyId
from services.vault.keyring import Keyring
from services.vault.trust import TrustedRequesters
from services.vault.use_cases import Vault
from shared.sealing import KeyPair
from tests.vault_fixtures import VaultDb, canary, issued_event, new_user, vault_db


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[VaultDb]:
    async for value in vault_db(database_url):
        yield value


@dataclass
class Env:
    db: VaultDb
    store: SqlStore
    keyring: Keyring
    vault_key: KeyPair
    vault: Vault


@pytest.fixture
async def env(db: VaultDb) -> AsyncIterator[Env]:
    store = SqlStore.from_url(db.url, schema=db.schema)
    await store.create_all()
    keyring, vault_key = Keyring.generate(), KeyPair.generate()
    vault = Vault(unit_of_work=lambda: store.unit_of_work(keyring), keypair=vault_key, trusted=TrustedRequesters.of([]))
    try:
        yield Env(db, store, keyring, vault_key, vault)
    finally:
        await store.dispose()


async def _rows_as_text(store: SqlStore) -> str:
    """Every column of every row of both tables, as the database renders them."""
    async with store.engine.connect() as conn:
        if store.dialect == "postgresql":
            schema = store.schema
            texts = []
            for table in ("connections", "processed_events"):
                result = await conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t'))
                texts += [row[0] for row in result]
            return "\n".join(texts)
        result = await conn.execute(select(ConnectionRow.__table__))
        return "\n".join(repr(tuple(row)) for row in result)


def _sqlite_file_bytes(url: str) -> bytes:
    path = Path(make_url(url).database or "")
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal"), Path(f"{path}-journal")) if p.exists())


async def test_tokens_are_encrypted_at_rest(env: Env) -> None:
    user, access, refresh = new_user(), canary("access"), canary("refresh")
    event = issued_event(env.vault_key.recipient, user_id=user, access_token=access, refresh_token=refresh)
    outcome = await env.vault.store_issued_tokens(event)
    assert (outcome.duplicate, outcome.version) == (False, 1)

    async with env.store.unit_of_work(env.keyring) as uow:
        loaded = await uow.connections.get(user)
    assert loaded is not None and loaded.credentials.access_token == access  # it is stored ...
    assert loaded.credentials.refresh_token == refresh

    async with env.store.engine.connect() as conn:
        row = (await conn.execute(select(ConnectionRow.__table__).where(ConnectionRow.user_id == user))).one()
    assert row.kek_id == env.keyring.active_kek_id and row.version == 1 and row.kind == "oauth"
    assert row.scopes == ["user:inference", "user:profile"] and row.account["email"] == "person@example.com"
    assert len(row.nonce) == 12 and len(row.wrapped_data_key) == 12 + 32 + 16

    rendered = await _rows_as_text(env.store)
    assert user in rendered  # ... we are looking at the right rows ...
    for secret in (access, refresh):  # ... and no token is in them, in any encoding
        assert secret not in rendered
        assert secret.encode().hex() not in rendered
    if env.db.is_sqlite:
        raw = _sqlite_file_bytes(env.db.url)
        assert user.encode() in raw
        assert access.encode() not in raw and refresh.encode() not in raw


async def test_upsert_versions_and_idempotency(env: Env) -> None:
    user, token_one, token_two = new_user(), canary("one"), canary("two")
    first = issued_event(env.vault_key.recipient, user_id=user, access_token=token_one)
    second = issued_event(env.vault_key.recipient, user_id=user, access_token=token_two, kind="setup_token")

    assert (await env.vault.store_issued_tokens(first)).version == 1
    again = await env.vault.store_issued_tokens(first)
    assert again.duplicate and again.version is None
    assert (await env.vault.store_issued_tokens(second)).version == 2
    assert (await env.vault.store_issued_tokens(second)).duplicate

    async with env.store.unit_of_work(env.keyring) as uow:
        conn = await uow.connections.get(user)
    assert conn is not None
    assert (conn.version, conn.kind, conn.credentials.access_token) == (2, "setup_token", token_two)
    assert conn.created_at is not None and conn.created_at.tzinfo is not None
    assert conn.updated_at is not None and conn.updated_at >= conn.created_at

    async with env.store.engine.connect() as conn_:
        events = (await conn_.execute(select(ProcessedEventRow.event_id).where(
            ProcessedEventRow.event_id.in_([first.event_id, second.event_id])))).scalars().all()
        rows = (await conn_.execute(select(ConnectionRow.user_id).where(ConnectionRow.user_id == user))).all()
    assert sorted(events) == sorted([first.event_id, second.event_id]) and len(rows) == 1


async def test_event_and_connection_commit_together(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """If storing the connection fails, the event is not marked processed (so a retry works)."""
    user = new_user()
    event = issued_event(env.vault_key.recipient, user_id=user, access_token=canary())
    from services.vault.adapters import store as store_module

    async def broken_add(self, connection) -> None:
        raise StoreUnavailable("simulated")

    monkeypatch.setattr(store_module.SqlConnectionRepository, "add", broken_add)
    with pytest.raises(StoreUnavailable):
        await env.vault.store_issued_tokens(event)
    monkeypatch.undo()

    outcome = await env.vault.store_issued_tokens(event)  # the redelivery
    assert (outcome.duplicate, outcome.version) == (False, 1)


async def test_ciphertext_moved_to_another_row_does_not_decrypt(env: Env) -> None:
    victim, attacker = new_user(), new_user()
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=victim, access_token=canary()))
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=attacker, access_token=canary()))
    async with env.store.engine.begin() as conn:
        src = (await conn.execute(select(ConnectionRow.__table__).where(ConnectionRow.user_id == victim))).one()
        await conn.execute(
            update(ConnectionRow.__table__)
            .where(ConnectionRow.user_id == attacker)
            .values(wrapped_data_key=src.wrapped_data_key, nonce=src.nonce, ciphertext=src.ciphertext)
        )

    async with env.store.unit_of_work(env.keyring) as uow:
        with pytest.raises(DecryptionFailed):
            await uow.connections.get(attacker)
        assert await uow.connections.get(victim) is not None


async def test_row_with_unknown_kek_id(env: Env) -> None:
    user = new_user()
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=canary()))
    async with env.store.unit_of_work(Keyring.generate()) as uow:
        with pytest.raises(UnknownKeyId):
            await uow.connections.get(user)


async def test_concurrent_change_is_a_retryable_conflict(env: Env) -> None:
    user = new_user()
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=canary()))

    theirs_token = canary("theirs")

    def reconnect(connection: Connection, token: str) -> None:
        connection.reconnect(kind="oauth", credentials=Credentials(token), scopes=["user:inference"],
                             expires_at=1, refresh_token_expires_at=None, account=None, now=datetime.now(UTC))

    async with env.store.unit_of_work(env.keyring) as stale:
        mine = await stale.connections.get(user)
        assert mine is not None
        # somebody else updates the same connection meanwhile
        async with env.store.unit_of_work(env.keyring) as other:
            theirs = await other.connections.get(user)
            assert theirs is not None
            reconnect(theirs, theirs_token)
            await other.connections.update(theirs)
            await other.commit()
        reconnect(mine, canary("mine"))
        with pytest.raises((ConcurrencyConflict, StoreUnavailable)) as info:
            await stale.connections.update(mine)
            await stale.commit()
    assert info.value.retryable

    async with env.store.unit_of_work(env.keyring) as uow:
        current = await uow.connections.get(user)
    assert current is not None and current.version == 2 and current.credentials.access_token == theirs_token


async def test_create_all_is_idempotent_and_sqlite_uses_wal(env: Env) -> None:
    await env.store.create_all()
    async with env.store.engine.connect() as conn:
        if env.db.is_sqlite:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        else:
            # our tables live in the test's own schema, not in public
            found = (await conn.execute(text(
                "SELECT table_schema FROM information_schema.tables WHERE table_name = 'connections' "
                "AND table_schema = :schema"), {"schema": env.db.schema})).scalars().all()
            assert found == [env.db.schema]


async def test_sqlite_parent_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "vault.db"
    store = SqlStore.from_url(f"sqlite+aiosqlite:///{path}")
    try:
        await store.create_all()
    finally:
        await store.dispose()
    assert path.exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_unreachable_database_is_store_unavailable() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/nothing"
    store = SqlStore.from_url(url)
    vault = Vault(unit_of_work=lambda: store.unit_of_work(Keyring.generate()), keypair=KeyPair.generate(),
                  trusted=TrustedRequesters.of([]))
    try:
        with pytest.raises(StoreUnavailable):
            await store.create_all()
        with pytest.raises(StoreUnavailable) as info:
            await vault.store_issued_tokens(
                issued_event(vault._keypair.recipient, user_id=new_user(), access_token=canary())
            )
        assert info.value.retryable
        assert "postgres@" not in repr(store)
    finally:
        await store.dispose()


def test_translate_error_maps_driver_errors() -> None:
    from sqlalchemy import exc

    assert isinstance(translate_error(exc.IntegrityError("s", {}, Exception())), ConcurrencyConflict)
    assert isinstance(translate_error(exc.OperationalError("s", {}, Exception())), StoreUnavailable)
    assert isinstance(translate_error(ConnectionRefusedError()), StoreUnavailable)
    assert translate_error(ValueError("bug")) is None
    assert translate_error(exc.ProgrammingError("s", {}, Exception())) is None


def test_invalid_schema_name_is_refused() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("postgresql+asyncpg://u@127.0.0.1/db")
    with pytest.raises(ValueError):
        SqlStore(engine, schema='x"; DROP TABLE y; --')
