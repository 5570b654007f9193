"""The vault's SQLAlchemy store on a real SQLite file and a real PostgreSQL (own schema per test):
encryption at rest, upsert/versioning, idempotency, ordering guards, crypto-shred, the refresh
lease, retention, concurrency and outage errors."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url

from services.vault.adapters.models import AuditRow, ConnectionRow, ProcessedEventRow, SealedSecretRow
from services.vault.adapters.store import SqlStore, translate_error
from services.vault.domain import AuditEntry, Connection, Credentials, IssuedLogin
from services.vault.errors import (
    ConcurrencyConflict,
    DecryptionFailed,
    RetiredKeyId,
    StoreUnavailable,
    UnknownKeyId,
)
from services.vault.keyring import Keyring
from services.vault.trust import TrustedRequesters
from services.vault.use_cases import Vault
from shared.events import TokensRevoked
from shared.sealing import KeyPair
from tests.vault_fixtures import (
    VaultDb,
    canary,
    issued_event,
    make_vault,
    new_user,
)

TABLES = ("connections", "sealed_secrets", "processed_events", "revocations", "audit_log")


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
    await store.migrate()
    keyring, vault_key = Keyring.generate(), KeyPair.generate()
    vault = make_vault(store, keyring=keyring, keypair=vault_key, trusted=TrustedRequesters.of([]))
    try:
        yield Env(db, store, keyring, vault_key, vault)
    finally:
        await store.dispose()


async def _rows_as_text(store: SqlStore) -> str:
    """Every column of every row of every table, as the database renders them."""
    async with store.engine.connect() as conn:
        texts = []
        for table in TABLES:
            if store.dialect == "postgresql":
                result = await conn.execute(text(f'SELECT t::text FROM "{store.schema}"."{table}" t'))
                texts += [row[0] for row in result]
            else:
                result = await conn.execute(text(f'SELECT * FROM "{table}"'))
                texts += [repr(tuple(row)) for row in result]
        return "\n".join(texts)


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
        secret = (await conn.execute(select(SealedSecretRow.__table__).where(SealedSecretRow.user_id == user))).one()
        audit = (await conn.execute(select(AuditRow.__table__).where(AuditRow.user_id == user))).all()
    assert (row.version, row.kind, bool(row.refreshable)) == (1, "oauth", True)
    assert row.scopes == ["user:inference", "user:profile"] and row.account["email"] == "person@example.com"
    assert secret.kek_id == env.keyring.active_kek_id and secret.version == 1
    assert len(secret.nonce) == 12 and len(secret.wrapped_data_key) == 12 + 32 + 16
    assert [a.action for a in audit] == ["tokens_stored"] and audit[0].event_id == event.event_id

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
    monkeypatch.setattr(store_module.SqlConnectionRepository, "add_many", broken_add)  # the batched path
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
        src = (await conn.execute(select(SealedSecretRow.__table__).where(SealedSecretRow.user_id == victim))).one()
        await conn.execute(
            update(SealedSecretRow.__table__)
            .where(SealedSecretRow.user_id == attacker)
            .values(wrapped_data_key=src.wrapped_data_key, nonce=src.nonce, ciphertext=src.ciphertext)
        )

    async with env.store.unit_of_work(env.keyring) as uow:
        with pytest.raises(DecryptionFailed):
            await uow.connections.get(attacker)
        assert await uow.connections.get(victim) is not None
    with pytest.raises(DecryptionFailed):  # the grant read path checks the same binding
        await _read_connection(env, attacker)


async def test_row_with_unknown_kek_id(env: Env) -> None:
    user = new_user()
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=canary()))
    async with env.store.unit_of_work(Keyring.generate()) as uow:
        with pytest.raises(UnknownKeyId):
            await uow.connections.get(user)
    with pytest.raises(UnknownKeyId):
        await _read_connection(Env(env.db, env.store, Keyring.generate(), env.vault_key, env.vault), user)


async def _read_connection(env: Env, user: str) -> Any:
    connections, _ = await env.store.read_for_release([(user, None)], env.keyring)
    found = connections.get(user)
    if isinstance(found, Exception):
        raise found
    return found


async def test_the_release_read_path_sees_what_a_unit_of_work_sees(env: Env) -> None:
    """`read_for_release` (one worker-thread call on SQLite) returns the same decrypted
    connection as the repository, follows updates and revocations, and never writes."""
    user, access = new_user(), canary("access")
    assert await _read_connection(env, user) is None
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=access,
                                                     refresh_token=canary("refresh")))
    read = await _read_connection(env, user)
    async with env.store.unit_of_work(env.keyring) as uow:
        via_uow = await uow.connections.get(user)
    assert read is not None and via_uow is not None and read.credentials.access_token == access
    for field in dataclasses.fields(read):  # Connection compares by identity (eq=False)
        assert getattr(read, field.name) == getattr(via_uow, field.name), field.name
    newer = canary("access")
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=newer))
    read = await _read_connection(env, user)
    assert read is not None and (read.version, read.credentials.access_token) == (2, newer)
    await env.vault.revoke(TokensRevoked(user_id=user))
    assert await _read_connection(env, user) is None


async def test_concurrent_change_is_a_retryable_conflict(env: Env) -> None:
    user = new_user()
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=canary()))

    theirs_token = canary("theirs")

    def reconnect(connection: Connection, token: str) -> None:
        connection.reconnect(IssuedLogin(kind="oauth", credentials=Credentials(token), scopes=("user:inference",),
                                         expires_at=1, refresh_token_expires_at=None, account=None),
                             now=datetime.now(UTC))

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


async def test_migrate_is_idempotent_and_sqlite_uses_wal(env: Env) -> None:
    await env.store.migrate()
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
        await store.migrate()
    finally:
        await store.dispose()
    assert path.exists()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def assert_database_down(url: str) -> None:
    """Migrating, storing a login and pinging all say "the database is down" (StoreUnavailable,
    retryable, names the database: the delivery policy holds the message behind its breaker)."""
    store = SqlStore.from_url(url)
    vault = make_vault(store, keyring=Keyring.generate(), keypair=KeyPair.generate(), trusted=TrustedRequesters.of([]))
    try:
        with pytest.raises(StoreUnavailable):
            await store.migrate()
        with pytest.raises(StoreUnavailable) as info:
            await vault.store_issued_tokens(
                issued_event(vault._keypair.recipient, user_id=new_user(), access_token=canary())
            )
        assert info.value.retryable and info.value.dependency == "database"
        assert await store.ping() is False
        assert "postgres@" not in repr(store)
    finally:
        await store.dispose()


async def test_unreachable_database_is_store_unavailable() -> None:
    await assert_database_down(f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/nothing")


class RefusingPostgres:
    """A loopback server that answers every PostgreSQL connection the way a server that is
    starting up, shutting down or being stopped does: no SSL, then an ErrorResponse (FATAL,
    `sqlstate`) instead of authentication, then it hangs up."""

    def __init__(self, sqlstate: str, message: str) -> None:
        fields = [b"SFATAL", b"VFATAL", b"C" + sqlstate.encode(), b"M" + message.encode()]
        payload = b"".join(f + b"\0" for f in fields) + b"\0"
        self._refusal = b"E" + (len(payload) + 4).to_bytes(4, "big") + payload
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = int.from_bytes(await reader.readexactly(4), "big")
                body = await reader.readexactly(length - 4)
                if body[:4] in (b"\x04\xd2\x16\x2f", b"\x04\xd2\x16\x30"):  # SSLRequest, GSSENCRequest
                    writer.write(b"N")
                    await writer.drain()
                    continue
                writer.write(self._refusal)  # the StartupMessage
                await writer.drain()
                break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("57P03", "the database system is starting up"),  # also: shutting down, in recovery mode
        ("57P01", "terminating connection due to administrator command"),
        ("53300", "sorry, too many clients already"),
    ],
)
async def test_a_database_starting_or_stopping_is_store_unavailable(sqlstate: str, message: str) -> None:
    """A restarting PostgreSQL refuses connections with these for a while (seconds; minutes of
    crash recovery): an outage like any other — held behind the breaker, never a poison message,
    never an `internal` answer, never rotated tokens lost by the refresher."""
    async with RefusingPostgres(sqlstate, message) as url:
        await assert_database_down(url)


def test_translate_error_maps_driver_errors() -> None:
    from sqlalchemy import exc

    assert isinstance(translate_error(exc.IntegrityError("s", {}, Exception())), ConcurrencyConflict)
    assert isinstance(translate_error(exc.OperationalError("s", {}, Exception())), StoreUnavailable)
    assert isinstance(translate_error(ConnectionRefusedError()), StoreUnavailable)
    assert translate_error(ValueError("bug")) is None
    assert translate_error(exc.ProgrammingError("s", {}, Exception())) is None

    class PgError(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(sqlstate)
            self.sqlstate = sqlstate

    for unavailable in ("57P03", "57P01", "08006", "53300"):
        assert isinstance(translate_error(exc.DBAPIError("s", {}, PgError(unavailable))), StoreUnavailable)
    assert translate_error(exc.DBAPIError("s", {}, PgError("42P01"))) is None  # a bug (undefined table): loud


def test_invalid_schema_name_is_refused() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("postgresql+asyncpg://u@127.0.0.1/db")
    with pytest.raises(ValueError):
        SqlStore(engine, schema='x"; DROP TABLE y; --')


# --- production behaviour ------------------------------------------------------------------
async def test_record_under_a_retired_kek_fails_loudly(env: Env) -> None:
    user = new_user()
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=canary()))
    old = env.keyring.active_kek_id
    retired = env.keyring.with_new_key().retire(old)
    async with env.store.unit_of_work(retired) as uow:
        with pytest.raises(RetiredKeyId) as info:
            await uow.connections.get(user)
    assert info.value.kek_id == old and info.value.reason == "retired_key_id"
    assert old in str(info.value) and "retired" in str(info.value)


async def test_an_older_login_arriving_late_does_not_overwrite_a_newer_one(env: Env) -> None:
    user, old_token, new_token = new_user(), canary("old"), canary("new")
    t0 = datetime.now(UTC)
    older = issued_event(env.vault_key.recipient, user_id=user, access_token=old_token).model_copy(
        update={"occurred_at": t0})
    newer = issued_event(env.vault_key.recipient, user_id=user, access_token=new_token).model_copy(
        update={"occurred_at": t0 + timedelta(seconds=5)})

    assert (await env.vault.store_issued_tokens(newer)).version == 1
    late = await env.vault.store_issued_tokens(older)

    assert (late.outcome, late.duplicate, late.version) == ("stale", False, 1)
    async with env.store.unit_of_work(env.keyring) as uow:
        conn = await uow.connections.get(user)
        audit = await uow.audit.list(user_id=user)
    assert conn is not None and conn.credentials.access_token == new_token and conn.version == 1
    assert (audit[0].entry.action, audit[0].entry.reason) == ("tokens_ignored", "older_than_current_login")
    assert (await env.vault.store_issued_tokens(older)).duplicate  # marked processed: not retried


async def test_revoke_crypto_shreds_and_a_late_issue_cannot_resurrect(env: Env) -> None:
    user, token = new_user(), canary("revoked")
    t0 = datetime.now(UTC) - timedelta(seconds=60)  # times in the past: the vault clamps future ones to now
    issued = issued_event(env.vault_key.recipient, user_id=user, access_token=token).model_copy(
        update={"occurred_at": t0})
    await env.vault.store_issued_tokens(issued)
    async with env.store.engine.connect() as conn:
        wrapped = (await conn.execute(select(SealedSecretRow.wrapped_data_key).where(
            SealedSecretRow.user_id == user))).scalar_one()

    revoked = TokensRevoked(user_id=user, reason="user_request", occurred_at=t0 + timedelta(seconds=10))
    outcome = await env.vault.revoke(revoked)
    assert (outcome.outcome, outcome.version) == ("revoked", 1)
    assert (await env.vault.revoke(revoked)).outcome == "duplicate"

    async with env.store.engine.connect() as conn:
        for table in (ConnectionRow, SealedSecretRow):
            assert not (await conn.execute(select(table.__table__).where(table.user_id == user))).all()
        if env.db.is_sqlite:
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    if env.db.is_sqlite:  # secure_delete: the wrapped data key is gone from the file, not just unlinked
        raw = _sqlite_file_bytes(env.db.url)
        assert user.encode() in raw  # the audit log still names the user ...
        assert wrapped not in raw  # ... but the data key is shredded

    # a tokens.issued from before the revocation, delivered late, is ignored ...
    delayed = issued_event(env.vault_key.recipient, user_id=user, access_token=canary()).model_copy(
        update={"occurred_at": t0 + timedelta(seconds=5)})
    assert (await env.vault.store_issued_tokens(delayed)).outcome == "revoked"
    async with env.store.unit_of_work(env.keyring) as uow:
        assert await uow.connections.get(user) is None
    # ... a new login after it is not
    fresh = issued_event(env.vault_key.recipient, user_id=user, access_token=canary()).model_copy(
        update={"occurred_at": t0 + timedelta(seconds=20)})
    assert (await env.vault.store_issued_tokens(fresh)).outcome == "stored"

    async with env.store.unit_of_work(env.keyring) as uow:
        actions = [(r.entry.action, r.entry.outcome) for r in await uow.audit.list(user_id=user)]
    assert actions[::-1] == [("tokens_stored", "ok"), ("revoked", "revoked"), ("tokens_ignored", "ignored"),
                             ("tokens_stored", "ok")]
    nobody = await env.vault.revoke(TokensRevoked(user_id=new_user()))
    assert nobody.outcome == "not_connected"


async def test_a_new_login_replaces_a_row_that_cannot_be_decrypted(env: Env) -> None:
    user, token = new_user(), canary("replacement")
    await env.vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=canary()))
    lost_kek = env.keyring.active_kek_id
    other = Keyring.generate()  # the old KEK is gone (lost, or retired without a rewrap)
    vault = make_vault(env.store, keyring=other, keypair=env.vault_key, trusted=TrustedRequesters.of([]))

    outcome = await vault.store_issued_tokens(issued_event(env.vault_key.recipient, user_id=user, access_token=token))

    assert (outcome.outcome, outcome.version) == ("replaced_undecryptable", 2)
    async with env.store.unit_of_work(other) as uow:
        conn = await uow.connections.get(user)
        audit = await uow.audit.list(user_id=user, action="undecryptable_replaced")
    assert conn is not None and conn.credentials.access_token == token and conn.version == 2
    assert [(r.entry.reason, r.entry.kek_id) for r in audit] == [("unknown_key_id", lost_kek)]


async def _connect_due(env: Env, user: str, *, expires_in_ms: int = 1_000) -> int:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    event = issued_event(env.vault_key.recipient, user_id=user, access_token=canary(), refresh_token=canary("r"),
                         expires_at=now_ms + expires_in_ms)
    return (await env.vault.store_issued_tokens(event)).version or 0


async def test_replicas_racing_for_the_refresh_lease_have_exactly_one_winner(env: Env) -> None:
    user = new_user()
    version = await _connect_due(env, user)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    contenders = [SqlStore.from_url(env.db.url, schema=env.db.schema) for _ in range(5)]

    async def claim(i: int) -> bool:
        async with contenders[i].unit_of_work(env.keyring) as uow:
            won = await uow.connections.claim_lease(user, version, f"replica-{i}", now_ms, now_ms + 60_000)
            await uow.commit()
            return won

    try:
        results = await asyncio.gather(*(claim(i) for i in range(5)))
    finally:
        for store in contenders:
            await store.dispose()
    assert sorted(results) == [False, False, False, False, True]
    # what a lease then allows (due, save, release, backoff) is in test_vault_repository_contract.py


async def test_retention_removes_only_old_processed_events_and_tombstones(env: Env) -> None:
    old_id, new_id, old_user, new_user_ = f"old-{uuid.uuid4().hex}", f"new-{uuid.uuid4().hex}", new_user(), new_user()
    long_ago = datetime.now(UTC) - timedelta(days=40)
    async with env.store.unit_of_work(env.keyring) as uow:
        assert await uow.processed_events.mark_processed(old_id, "tokens.issued")
        assert await uow.processed_events.mark_processed(new_id, "tokens.issued")
        await uow.revocations.record(old_user, long_ago, None)
        await uow.revocations.record(new_user_, datetime.now(UTC), None)
        await uow.audit.add(AuditEntry(actor="test", action="ancient", user_id=old_user), long_ago)
        await uow.commit()
    async with env.store.engine.begin() as conn:
        await conn.execute(update(ProcessedEventRow.__table__).where(ProcessedEventRow.event_id == old_id)
                           .values(processed_at=long_ago))

    removed = await env.vault.housekeeping(processed_retention_s=35 * 86400, audit_retention_s=30 * 86400)

    assert removed["processed_events"] >= 1 and removed["revocations"] >= 1 and removed["audit"] >= 1
    async with env.store.unit_of_work(env.keyring) as uow:
        assert await uow.processed_events.mark_processed(old_id, "tokens.issued")  # forgotten
        assert not await uow.processed_events.mark_processed(new_id, "tokens.issued")  # still known
        assert await uow.revocations.revoked_at(old_user) is None
        assert await uow.revocations.revoked_at(new_user_) is not None
        assert not await uow.audit.list(action="ancient")


async def test_the_sqlite_file_and_its_wal_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    """vault.db holds every sealed secret and the audit log: 0600, and so are -wal / -shm (SQLite
    gives them the database file's mode); an existing world-readable file is tightened."""
    import os
    import stat

    db_file = tmp_path / "new" / "vault.db"
    store = SqlStore.from_url(f"sqlite+aiosqlite:///{db_file}")
    try:
        await store.migrate()
        vault = make_vault(store, keyring=Keyring.generate(), keypair=KeyPair.generate(),
                           trusted=TrustedRequesters.of([]))
        await vault.store_issued_tokens(issued_event(vault._keypair.recipient, user_id=new_user(), access_token=canary()))
        files = [p for p in db_file.parent.iterdir() if p.name.startswith("vault.db")]
        assert {p.name for p in files} >= {"vault.db", "vault.db-wal", "vault.db-shm"}
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
        assert stat.S_IMODE(db_file.parent.stat().st_mode) == 0o700
    finally:
        await store.dispose()
    old = tmp_path / "old.db"
    old.touch()
    os.chmod(old, 0o644)
    again = SqlStore.from_url(f"sqlite+aiosqlite:///{old}")
    await again.dispose()
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


# --- tokens.issued in batches: one transaction per batch ----------------------------------------
async def test_a_batch_is_stored_in_one_transaction_with_each_event_decided_as_alone(env: Env) -> None:
    """New people, a person who logs in twice in the batch (the newer login wins: version 2), a
    duplicate inside the batch, an event processed before, a login older than the one held, one
    from before a revocation, and a row that no longer decrypts — one transaction, each event
    with the outcome it would have had on its own."""
    recipient = env.vault_key.recipient
    t0 = datetime.now(UTC) - timedelta(seconds=120)
    fresh, twice, held, revoked_user = new_user(), new_user(), new_user(), new_user()

    def at(seconds: int) -> dict[str, datetime]:
        return {"occurred_at": t0 + timedelta(seconds=seconds)}

    already = issued_event(recipient, user_id=new_user(), access_token=canary())
    await env.vault.store_issued_tokens(already)
    await env.vault.store_issued_tokens(issued_event(recipient, user_id=held, access_token=canary())
                                        .model_copy(update=at(50)))
    await env.vault.revoke(TokensRevoked(user_id=revoked_user, **at(40)))
    unreadable = new_user()
    other = Keyring.generate()
    await make_vault(env.store, keyring=other, keypair=env.vault_key, trusted=TrustedRequesters.of([])
                     ).store_issued_tokens(issued_event(recipient, user_id=unreadable, access_token=canary()))

    first_login, second_login = canary("first"), canary("second")
    events = [
        issued_event(recipient, user_id=fresh, access_token=canary()),
        issued_event(recipient, user_id=twice, access_token=first_login).model_copy(update=at(10)),
        issued_event(recipient, user_id=twice, access_token=second_login).model_copy(update=at(20)),
        already,
        issued_event(recipient, user_id=held, access_token=canary()).model_copy(update=at(30)),  # older than held
        issued_event(recipient, user_id=revoked_user, access_token=canary()).model_copy(update=at(30)),
        issued_event(recipient, user_id=unreadable, access_token=canary()),
    ]
    events.insert(2, events[0])  # the same event twice in one batch
    async with env.store.engine.connect() as conn:
        before = (await conn.execute(select(ProcessedEventRow.event_id))).scalars().all()
    outcomes = await env.vault.store_issued_batch([env.vault.prepare_issued(e) for e in events])

    assert [(o.outcome, o.version) for o in outcomes] == [
        ("stored", 1), ("stored", 1), ("duplicate", None), ("stored", 2), ("duplicate", None),
        ("stale", 1), ("revoked", None), ("replaced_undecryptable", 2)]
    async with env.store.unit_of_work(env.keyring) as uow:
        conn = await uow.connections.get(twice)
        assert conn is not None and conn.version == 2 and conn.credentials.access_token == second_login
        assert (await uow.connections.get(fresh)).version == 1
        assert (await uow.connections.get(unreadable)).version == 2
        assert await uow.connections.get(revoked_user) is None
        actions = {user: [r.entry.action for r in await uow.audit.list(user_id=user)][::-1]
                   for user in (fresh, twice, held, revoked_user, unreadable)}
    assert actions == {fresh: ["tokens_stored"], twice: ["tokens_stored", "tokens_stored"],
                       held: ["tokens_stored", "tokens_ignored"], revoked_user: ["revoked", "tokens_ignored"],
                       unreadable: ["tokens_stored", "undecryptable_replaced"]}
    async with env.store.engine.connect() as conn:
        after = (await conn.execute(select(ProcessedEventRow.event_id))).scalars().all()
    assert len(after) - len(before) == len({e.event_id for e in events}) - 1  # `already` was there
    # redelivered, the whole batch is duplicates
    again = await env.vault.store_issued_batch([env.vault.prepare_issued(e) for e in events])
    assert {o.outcome for o in again} == {"duplicate"}


async def test_a_batch_that_fails_is_retried_event_by_event(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conflict on one event of a batch (not an outage) does not fail the others: each is tried
    again alone; only the one that keeps failing gets the error."""
    from services.vault.adapters import store as store_module

    recipient = env.vault_key.recipient
    good, bad = new_user(), new_user()
    original = store_module.SqlConnectionRepository.add_many

    async def add_many(self: Any, connections: Any) -> None:
        if any(c.user_id == bad for c in connections):
            raise ConcurrencyConflict("somebody else was first")
        await original(self, connections)

    monkeypatch.setattr(store_module.SqlConnectionRepository, "add_many", add_many)
    events = [issued_event(recipient, user_id=good, access_token=canary()),
              issued_event(recipient, user_id=bad, access_token=canary())]
    outcomes = await env.vault.store_issued_batch([env.vault.prepare_issued(e) for e in events])
    assert getattr(outcomes[0], "outcome", None) == "stored"
    assert isinstance(outcomes[1], ConcurrencyConflict)
    async with env.store.unit_of_work(env.keyring) as uow:
        assert await uow.connections.get(good) is not None and await uow.connections.get(bad) is None
    monkeypatch.undo()
    assert (await env.vault.store_issued_tokens(events[1])).outcome == "stored"  # the redelivery


async def test_a_database_outage_fails_the_whole_batch_and_marks_nothing(env: Env, monkeypatch: pytest.MonkeyPatch
                                                                         ) -> None:
    from services.vault.adapters import store as store_module

    async def down(self: Any, *args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("simulated")

    monkeypatch.setattr(store_module.SqlAuditLog, "add_many", down)
    events = [issued_event(env.vault_key.recipient, user_id=new_user(), access_token=canary()) for _ in range(3)]
    with pytest.raises(StoreUnavailable):
        await env.vault.store_issued_batch([env.vault.prepare_issued(e) for e in events])
    monkeypatch.undo()
    outcomes = await env.vault.store_issued_batch([env.vault.prepare_issued(e) for e in events])
    assert [o.outcome for o in outcomes] == ["stored"] * 3


async def test_release_times_are_recorded_in_one_statement_newest_wins(env: Env) -> None:
    from services.vault.domain import SandboxLease

    user = new_user()
    leases = [SandboxLease(user_id=user, sandbox_id=f"sbx-{i}", jti=f"j{i}", mode="access_only", issued_at=1,
                           expires_at=10**13) for i in range(3)]
    async with env.store.unit_of_work(env.keyring) as uow:
        for lease in leases:
            await uow.sandbox_leases.save(lease)
        await uow.commit()
    async with env.store.unit_of_work(env.keyring) as uow:
        await uow.sandbox_leases.record_releases([(user, "sbx-0", 500), (user, "sbx-1", 700), (user, "sbx-9", 1)])
        await uow.commit()
    async with env.store.unit_of_work(env.keyring) as uow:  # an older time never overwrites a newer one
        await uow.sandbox_leases.record_releases([(user, "sbx-0", 400), (user, "sbx-1", 800)])
        await uow.commit()
    async with env.store.unit_of_work(env.keyring) as uow:
        found = {s: (await uow.sandbox_leases.get(user, s)).last_released_at
                 for s in ("sbx-0", "sbx-1", "sbx-2")}
    assert found == {"sbx-0": 500, "sbx-1": 800, "sbx-2": None}
