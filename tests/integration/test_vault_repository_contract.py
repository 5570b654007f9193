"""One contract for every implementation of the vault's storage ports (services/vault/ports.py):
the in-memory `FakeStore` the unit tests rely on, and `SqlStore` on SQLite and PostgreSQL.

Each test drives only the port (`store.unit_of_work(cipher)`, `read_for_release`, `ping`), so a
behaviour the use cases depend on cannot differ between the fake and the real store. The one
exception is `Backend.spoil`, which makes a stored secret undecryptable the way each backend can.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import update

from services.vault.adapters.models import SealedSecretRow
from services.vault.adapters.store import SqlStore
from services.vault.domain import Account, AuditEntry, Connection, Credentials, IssuedLogin, SandboxLease
from services.vault.errors import ConcurrencyConflict, DecryptionFailed, KeyringError
from services.vault.keyring import Keyring
from services.vault.ports import Store
from tests.conftest import postgres_url
from tests.vault_fixtures import (
    FakeStore,
    canary,
    leaked,
    new_user,
    vault_db,
)

NOW = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS


@dataclass
class Backend:
    name: str
    store: Store
    cipher: Keyring
    spoil: Callable[[str], Awaitable[None]]
    """Make the stored secret of a user undecryptable (tampered ciphertext)."""


def _as_store(store: FakeStore | SqlStore) -> Store:
    # Both implement the port; mypy disagrees only because a Protocol's attributes
    # (UnitOfWork.connections, …) are invariant.
    return cast(Store, store)


def _fake_backend(cipher: Keyring) -> Backend:
    store = FakeStore()

    async def spoil(user_id: str) -> None:
        store.undecryptable[user_id] = DecryptionFailed("record does not decrypt in this context")

    return Backend("fake", _as_store(store), cipher, spoil)


def _sql_backend(name: str, store: SqlStore, cipher: Keyring) -> Backend:
    async def spoil(user_id: str) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(update(SealedSecretRow).where(SealedSecretRow.user_id == user_id)
                               .values(ciphertext=b"\x00" * 48))

    return Backend(name, _as_store(store), cipher, spoil)


@pytest.fixture(params=["fake", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The same contract on each store; SQL databases are isolated and scanned for canaries by
    `vault_db` (a PostgreSQL schema per test, dropped after)."""
    cipher = Keyring.generate()
    if request.param == "fake":
        yield _fake_backend(cipher)
        return
    url = f"sqlite+aiosqlite:///{tmp_path / 'vault.db'}" if request.param == "sqlite" else postgres_url()
    if url is None:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 and DATABASE_URL does not name one")
    async for db in vault_db(url):
        store = SqlStore.from_url(db.url, schema=db.schema)
        await store.migrate()
        try:
            yield _sql_backend(request.param, store, cipher)
        finally:
            await store.dispose()


# --- builders -------------------------------------------------------------------------
def connection(
    user_id: str | None = None,
    *,
    expires_at: int = NOW_MS + HOUR_MS,
    kind: str = "oauth",
    refresh: bool = True,
    refresh_token_expires_at: int | None = None,
) -> Connection:
    login = IssuedLogin(
        kind=kind,
        credentials=Credentials(canary("access"), canary("refresh") if refresh else None),
        scopes=("user:inference", "user:profile"),
        expires_at=expires_at,
        refresh_token_expires_at=refresh_token_expires_at,
        account=Account(account_uuid="acc-1", email="person@example.com"),
    )
    return Connection.connect(user_id or new_user(), login, now=NOW)


async def added(backend: Backend, *connections: Connection) -> None:
    async with backend.store.unit_of_work(backend.cipher) as uow:
        for c in connections:
            await uow.connections.add(c)
        await uow.commit()


async def stored(backend: Backend, user_id: str) -> Connection | None:
    async with backend.store.unit_of_work(backend.cipher) as uow:
        return await uow.connections.get(user_id)


async def due_users(backend: Backend, now_ms: int, margin_ms: int = 10 * MINUTE_MS, limit: int = 100) -> list[str]:
    async with backend.store.unit_of_work(backend.cipher) as uow:
        return [d.user_id for d in await uow.connections.due_for_refresh(now_ms, margin_ms, limit)]


async def claim(backend: Backend, user_id: str, version: int, owner: str, now_ms: int = NOW_MS) -> bool:
    async with backend.store.unit_of_work(backend.cipher) as uow:
        won = await uow.connections.claim_lease(user_id, version, owner, now_ms, now_ms + MINUTE_MS)
        await uow.commit()
        return won


def reconnected(c: Connection, access: str) -> Connection:
    c.reconnect(IssuedLogin(kind="oauth", credentials=Credentials(access, canary("refresh")), scopes=("user:inference",),
                            expires_at=NOW_MS + 2 * HOUR_MS, refresh_token_expires_at=None, account=None),
                now=NOW + timedelta(minutes=1))
    return c


def lease(user_id: str, sandbox_id: str = "sbx-1", *, expires_at: int = NOW_MS + HOUR_MS,
          issued_at: int = NOW_MS) -> SandboxLease:
    return SandboxLease(user_id=user_id, sandbox_id=sandbox_id, jti=uuid.uuid4().hex, mode="file",
                        issued_at=issued_at, expires_at=expires_at)


async def saved(backend: Backend, *leases: SandboxLease) -> None:
    async with backend.store.unit_of_work(backend.cipher) as uow:
        for x in leases:
            await uow.sandbox_leases.save(x)
        await uow.commit()


# --- connections: round trip and transactions ------------------------------------------------
async def test_a_connection_round_trips_with_its_credentials(backend: Backend, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    caplog.set_level(logging.DEBUG)
    original = connection(refresh_token_expires_at=NOW_MS + 30 * 24 * HOUR_MS)
    await added(backend, original)

    loaded = await stored(backend, original.user_id)

    assert loaded is not None and loaded is not original
    for f in dataclasses.fields(Connection):  # Connection compares by identity (eq=False)
        assert getattr(loaded, f.name) == getattr(original, f.name), f.name
    tokens = {original.credentials.access_token, original.credentials.refresh_token or ""}
    assert not leaked(repr(loaded) + str(loaded.credentials) + repr(loaded.summary()), tokens)
    assert not leaked(caplog.text, tokens)


async def test_nothing_is_visible_before_commit(backend: Backend) -> None:
    c = connection()
    async with backend.store.unit_of_work(backend.cipher) as writer:
        await writer.connections.add(c)
        async with backend.store.unit_of_work(backend.cipher) as reader:
            assert await reader.connections.get(c.user_id) is None
            assert await reader.connections.summary(c.user_id) is None
        connections, _ = await backend.store.read_for_release([(c.user_id, None)], backend.cipher)
        assert connections == {}
        await writer.commit()

    assert (found := await stored(backend, c.user_id)) is not None and found.version == 1


async def test_a_unit_of_work_sees_its_own_writes(backend: Backend) -> None:
    c = connection()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.add(c)
        mine = await uow.connections.get(c.user_id)
        assert mine is not None and mine.credentials == c.credentials
        assert [s.user_id for s in await uow.connections.summaries()] == [c.user_id]


async def test_leaving_without_commit_discards_everything(backend: Backend) -> None:
    c, event_id = connection(), uuid.uuid4().hex
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.add(c)
        await uow.processed_events.mark_processed(event_id, "tokens.issued")
        await uow.audit.add(AuditEntry(actor="test", action="discarded", user_id=c.user_id))
        await uow.sandbox_leases.save(lease(c.user_id))
    with pytest.raises(RuntimeError):
        async with backend.store.unit_of_work(backend.cipher) as uow:
            await uow.connections.add(c)
            raise RuntimeError("boom")
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.add(c)
        await uow.rollback()
        await uow.commit()

    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.connections.get(c.user_id) is None
        assert await uow.processed_events.mark_processed(event_id, "tokens.issued")
        assert await uow.audit.list(user_id=c.user_id) == []
        assert await uow.sandbox_leases.get(c.user_id, "sbx-1") is None


async def test_adding_an_existing_connection_is_a_conflict(backend: Backend) -> None:
    c = connection()
    await added(backend, c)
    with pytest.raises(ConcurrencyConflict) as info:  # SqlStore: the IntegrityError, on leaving the block
        async with backend.store.unit_of_work(backend.cipher) as uow:
            await uow.connections.add(connection(c.user_id))
            await uow.commit()
    assert info.value.retryable
    assert (found := await stored(backend, c.user_id)) is not None
    assert found.credentials == c.credentials


# --- connections: update and delete -------------------------------------------------------------
async def test_update_re_encrypts_the_credentials_at_the_new_version(backend: Backend) -> None:
    c = connection()
    await added(backend, c)
    newer = canary("access")
    async with backend.store.unit_of_work(backend.cipher) as uow:
        current = await uow.connections.get(c.user_id)
        assert current is not None
        await uow.connections.update(reconnected(current, newer))
        await uow.commit()

    found = await stored(backend, c.user_id)
    assert found is not None and (found.version, found.credentials.access_token) == (2, newer)
    assert found.scopes == ("user:inference",) and found.account == c.account  # a reconnect keeps the account


async def test_update_against_a_stale_version_is_a_conflict(backend: Backend) -> None:
    c = connection()
    await added(backend, c)
    async with backend.store.unit_of_work(backend.cipher) as uow:
        current = await uow.connections.get(c.user_id)
        assert current is not None
        await uow.connections.update(reconnected(current, canary()))
        await uow.commit()
    stale = reconnected(connection(c.user_id), canary("stale"))  # built from version 1

    async with backend.store.unit_of_work(backend.cipher) as uow:
        with pytest.raises(ConcurrencyConflict):
            await uow.connections.update(stale, expected_version=1)

    found = await stored(backend, c.user_id)
    assert found is not None and found.version == 2 and found.credentials != stale.credentials


async def test_update_needs_the_version_it_replaces(backend: Backend) -> None:
    c = connection()
    await added(backend, c)
    async with backend.store.unit_of_work(backend.cipher) as uow:
        with pytest.raises(ValueError):  # neither read in this unit of work nor given: a bug, not a conflict
            await uow.connections.update(reconnected(connection(c.user_id), canary()))
        current = await uow.connections.get(c.user_id)
        assert current is not None
        with pytest.raises(ValueError):  # an unchanged connection
            await uow.connections.update(current)


async def test_delete_returns_the_summary_and_forgets_the_connection(backend: Backend) -> None:
    c, other = connection(), connection()
    await added(backend, c, other)
    async with backend.store.unit_of_work(backend.cipher) as uow:
        removed = await uow.connections.delete(c.user_id)
        assert await uow.connections.delete(c.user_id) is None
        assert await uow.connections.delete(new_user()) is None
        await uow.commit()

    assert removed is not None
    assert (removed.user_id, removed.version, removed.kind, removed.kek_id) == (
        c.user_id, 1, "oauth", backend.cipher.active_kek_id)
    assert await stored(backend, c.user_id) is None
    found, _ = await backend.store.read_for_release([(c.user_id, None), (other.user_id, None)], backend.cipher)
    assert list(found) == [other.user_id]
    await added(backend, connection(c.user_id))  # the user may connect again
    assert (again := await stored(backend, c.user_id)) is not None and again.version == 1


# --- connections: summaries ---------------------------------------------------------------
async def test_summaries_carry_the_kek_id_and_never_decrypt(backend: Backend) -> None:
    c = connection()
    await added(backend, c)
    await backend.spoil(c.user_id)

    async with backend.store.unit_of_work(backend.cipher) as uow:
        summary = await uow.connections.summary(c.user_id)
        listed = await uow.connections.summaries()
        with pytest.raises(KeyringError):
            await uow.connections.get(c.user_id)

    assert summary is not None and (summary.version, summary.state) == (1, "connected")
    assert summary.kek_id == backend.cipher.active_kek_id
    assert listed == [summary]


async def test_summaries_are_by_user_limited_and_filtered_by_state(backend: Backend) -> None:
    users = sorted(new_user() for _ in range(4))
    await added(backend, *(connection(u) for u in reversed(users)))
    async with backend.store.unit_of_work(backend.cipher) as uow:
        c = await uow.connections.get(users[1])
        assert c is not None
        c.require_reconnect("invalid_grant", NOW)
        await uow.connections.update(c)
        await uow.commit()

    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert [s.user_id for s in await uow.connections.summaries()] == users
        assert [s.user_id for s in await uow.connections.summaries(limit=2)] == users[:2]
        assert [s.user_id for s in await uow.connections.summaries(state="reconnect_required")] == [users[1]]
        assert [s.user_id for s in await uow.connections.summaries(state="connected", limit=2)] == [users[0], users[2]]
        assert await uow.connections.count_by_state() == {"connected": 3, "reconnect_required": 1}


# --- connections: the refresher's schedule ------------------------------------------------------
async def test_due_for_refresh_is_within_the_margin_soonest_first_and_limited(backend: Backend) -> None:
    late, soon, expired, far = (connection(expires_at=NOW_MS + m * MINUTE_MS) for m in (9, 5, -5, 11))
    await added(backend, late, soon, expired, far)

    assert await due_users(backend, NOW_MS) == [expired.user_id, soon.user_id, late.user_id]
    assert await due_users(backend, NOW_MS, limit=2) == [expired.user_id, soon.user_id]
    assert await due_users(backend, NOW_MS, margin_ms=0) == [expired.user_id]
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert [(d.user_id, d.version) for d in await uow.connections.due_for_refresh(NOW_MS, 0, 10)] == [
            (expired.user_id, 1)]


async def test_only_refreshable_connections_are_due(backend: Backend) -> None:
    setup = connection(kind="setup_token", refresh=False, expires_at=NOW_MS)
    no_refresh_token = connection(refresh=False, expires_at=NOW_MS)
    dead, switched_off, due = (connection(expires_at=NOW_MS) for _ in range(3))
    await added(backend, setup, no_refresh_token, dead, switched_off, due)
    async with backend.store.unit_of_work(backend.cipher) as uow:
        c = await uow.connections.get(dead.user_id)
        assert c is not None
        c.require_reconnect("invalid_grant", NOW)
        await uow.connections.update(c)
        await uow.connections.set_refreshable(switched_off.user_id, False)
        await uow.commit()

    assert await due_users(backend, NOW_MS) == [due.user_id]
    assert not await claim(backend, switched_off.user_id, 1, "replica-a")
    assert not await claim(backend, setup.user_id, 1, "replica-a")


async def test_the_refresh_lease_has_exactly_one_winner(backend: Backend) -> None:
    c = connection(expires_at=NOW_MS)
    await added(backend, c)

    results = await asyncio.gather(*(claim(backend, c.user_id, 1, f"replica-{i}") for i in range(4)))

    assert sorted(results) == [False, False, False, True]
    assert await due_users(backend, NOW_MS) == []  # leased: not due ...
    assert await due_users(backend, NOW_MS + MINUTE_MS + 1) == [c.user_id]  # ... until the lease expires
    assert not await claim(backend, c.user_id, 1, "replica-x", NOW_MS + MINUTE_MS)  # still live at its end
    assert await claim(backend, c.user_id, 1, "replica-x", NOW_MS + MINUTE_MS + 1)


async def test_a_lease_is_claimed_only_at_the_scanned_version(backend: Backend) -> None:
    c = connection(expires_at=NOW_MS)
    await added(backend, c)
    assert not await claim(backend, c.user_id, 2, "replica-a")
    assert not await claim(backend, new_user(), 1, "replica-a")
    assert await claim(backend, c.user_id, 1, "replica-a")


async def test_only_the_owner_releases_a_lease(backend: Backend) -> None:
    c = connection(expires_at=NOW_MS)
    await added(backend, c)
    assert await claim(backend, c.user_id, 1, "replica-a")
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.release_lease(c.user_id, "replica-b")
        await uow.commit()
    assert not await claim(backend, c.user_id, 1, "replica-b")
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.release_lease(c.user_id, "replica-a")
        await uow.commit()
    assert await claim(backend, c.user_id, 1, "replica-b")


async def test_saving_needs_the_lease_and_releases_it(backend: Backend) -> None:
    c = connection(expires_at=NOW_MS)
    await added(backend, c)
    assert await claim(backend, c.user_id, 1, "replica-a")
    async with backend.store.unit_of_work(backend.cipher) as uow:
        current = await uow.connections.get(c.user_id)
        assert current is not None
        current.refresh_failed("upstream_error", retry_at_ms=NOW_MS, now=NOW)
        with pytest.raises(ConcurrencyConflict):
            await uow.connections.update(current, expected_version=1, lease_owner="replica-b")
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.update(current, expected_version=1, lease_owner="replica-a")
        await uow.commit()

    assert await due_users(backend, NOW_MS) == [c.user_id]  # lease released by the save
    assert await claim(backend, c.user_id, 2, "replica-b")
    found = await stored(backend, c.user_id)
    assert found is not None and (found.state, found.version, found.refresh_failures) == ("refresh_failed", 2, 1)


async def test_defer_refresh_backs_off_and_releases_without_a_new_version(backend: Backend) -> None:
    c = connection(expires_at=NOW_MS)
    await added(backend, c)
    assert await claim(backend, c.user_id, 1, "replica-a")
    error = "decrypt_failed " + "x" * 80
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.defer_refresh(c.user_id, "replica-b", NOW_MS + HOUR_MS, "not mine")  # no-op
        await uow.connections.defer_refresh(c.user_id, "replica-a", NOW_MS + 5 * MINUTE_MS, error)
        await uow.commit()

    assert await due_users(backend, NOW_MS + 5 * MINUTE_MS - 1) == []
    assert await due_users(backend, NOW_MS + 5 * MINUTE_MS) == [c.user_id]
    assert await claim(backend, c.user_id, 1, "replica-b", NOW_MS + 5 * MINUTE_MS)  # released, same version
    found = await stored(backend, c.user_id)
    assert found is not None
    assert (found.version, found.refresh_failures, found.next_refresh_at, found.last_refresh_error) == (
        1, 1, NOW_MS + 5 * MINUTE_MS, error[:64])


# --- connections: login expiry warnings ---------------------------------------------------------
async def test_a_login_expiry_is_warned_once(backend: Backend) -> None:
    later, sooner, far, never = (connection(refresh_token_expires_at=NOW_MS + h * HOUR_MS) for h in (20, 10, 48, 1))
    unknown_expiry = connection(refresh_token_expires_at=None)
    await added(backend, later, sooner, far, never, unknown_expiry)
    async with backend.store.unit_of_work(backend.cipher) as uow:  # a dead login is not warned about
        c = await uow.connections.get(never.user_id)
        assert c is not None
        c.require_reconnect("invalid_grant", NOW)
        await uow.connections.update(c)
        await uow.commit()
    day = 24 * HOUR_MS
    expiry = NOW_MS + 10 * HOUR_MS

    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert [s.user_id for s in await uow.connections.due_login_warnings(NOW_MS, day, 10)] == [
            sooner.user_id, later.user_id]
        assert [s.user_id for s in await uow.connections.due_login_warnings(NOW_MS, day, 1)] == [sooner.user_id]
        assert not await uow.connections.mark_login_warned(sooner.user_id, expiry + 1)  # not its expiry
        assert not await uow.connections.mark_login_warned(new_user(), expiry)
        assert await uow.connections.mark_login_warned(sooner.user_id, expiry)
        assert not await uow.connections.mark_login_warned(sooner.user_id, expiry)
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert not await uow.connections.mark_login_warned(sooner.user_id, expiry)
        assert [s.user_id for s in await uow.connections.due_login_warnings(NOW_MS, day, 10)] == [later.user_id]
    found = await stored(backend, sooner.user_id)
    assert found is not None and found.login_warned_for == expiry


async def test_an_unmarked_login_warning_is_due_again(backend: Backend) -> None:
    expiry = NOW_MS + HOUR_MS
    c = connection(refresh_token_expires_at=expiry)
    await added(backend, c)
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.connections.mark_login_warned(c.user_id, expiry)
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.unmark_login_warned(c.user_id, expiry + 1)  # another expiry: no-op
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.connections.due_login_warnings(NOW_MS, HOUR_MS, 10) == []
        await uow.connections.unmark_login_warned(c.user_id, expiry)
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert [s.user_id for s in await uow.connections.due_login_warnings(NOW_MS, HOUR_MS, 10)] == [c.user_id]
        assert await uow.connections.mark_login_warned(c.user_id, expiry)


async def test_a_warning_sent_meanwhile_survives_a_save_from_an_earlier_read(backend: Backend) -> None:
    expiry = NOW_MS + HOUR_MS
    c = connection(expires_at=NOW_MS, refresh_token_expires_at=expiry)
    await added(backend, c)
    assert await claim(backend, c.user_id, 1, "replica-a")
    current = await stored(backend, c.user_id)  # the refresher's read, before the warning
    assert current is not None
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.connections.mark_login_warned(c.user_id, expiry)
        await uow.commit()
    current.refresh_failed("upstream_error", retry_at_ms=NOW_MS + HOUR_MS, now=NOW)
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.connections.update(current, expected_version=1, lease_owner="replica-a")
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.connections.due_login_warnings(NOW_MS, HOUR_MS, 10) == []  # warned once, not twice
    found = await stored(backend, c.user_id)
    assert found is not None and (found.version, found.login_warned_for) == (2, expiry)


# --- processed events, revocations, audit -------------------------------------------------------
async def test_an_event_is_processed_once(backend: Backend) -> None:
    event_id = uuid.uuid4().hex
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.processed_events.mark_processed(event_id, "tokens.issued")
        assert not await uow.processed_events.mark_processed(event_id, "tokens.issued")
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert not await uow.processed_events.mark_processed(event_id, "tokens.revoked")
        assert await uow.processed_events.mark_processed(uuid.uuid4().hex, "tokens.issued")


async def test_processed_events_are_forgotten_after_retention(backend: Backend) -> None:
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.processed_events.mark_processed(first, "tokens.issued")
        await uow.processed_events.mark_processed(second, "tokens.issued")
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.processed_events.delete_older_than(datetime.now(UTC) - timedelta(hours=1)) == 0
        assert await uow.processed_events.delete_older_than(datetime.now(UTC) + timedelta(hours=1)) == 2
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.processed_events.mark_processed(first, "tokens.issued")


async def test_the_latest_revocation_wins_and_old_ones_are_deleted(backend: Backend) -> None:
    user, old_user = new_user(), new_user()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.revocations.revoked_at(user) is None
        await uow.revocations.record(user, NOW, uuid.uuid4().hex)
        await uow.revocations.record(user, NOW - timedelta(minutes=1), None)  # earlier: ignored
        await uow.revocations.record(old_user, NOW - timedelta(days=40), None)
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.revocations.revoked_at(user) == NOW
        await uow.revocations.record(user, NOW + timedelta(seconds=1), None)
        assert await uow.revocations.delete_older_than(NOW - timedelta(days=30)) == 1
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.revocations.revoked_at(user) == NOW + timedelta(seconds=1)
        assert await uow.revocations.revoked_at(old_user) is None


async def test_the_audit_log_lists_newest_first_with_filters(backend: Backend) -> None:
    user, other = new_user(), new_user()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.audit.add(AuditEntry(actor="vault:a", action="tokens_stored", user_id=user, version=1), NOW)
        await uow.audit.add_many([
            (AuditEntry(actor="vault:a", action="refreshed", user_id=user, detail={"rotated": True}),
             NOW + timedelta(seconds=1)),
            (AuditEntry(actor="vault:a", action="refreshed", user_id=other, reason="invalid_grant"),
             NOW + timedelta(seconds=2)),
        ])
        await uow.audit.add_many([])
        await uow.commit()

    async with backend.store.unit_of_work(backend.cipher) as uow:
        mine = await uow.audit.list(user_id=user)
        refreshed = await uow.audit.list(action="refreshed")
        newest = await uow.audit.list(limit=1)
    assert [(r.entry.action, r.at) for r in mine] == [("refreshed", NOW + timedelta(seconds=1)),
                                                      ("tokens_stored", NOW)]
    assert mine[0].entry.detail == {"rotated": True} and mine[1].entry.version == 1
    assert mine[0].id > mine[1].id
    assert [r.entry.user_id for r in refreshed] == [other, user]
    assert [r.entry.user_id for r in newest] == [other]
    assert refreshed[0].entry.reason == "invalid_grant"


async def test_old_audit_entries_are_deleted(backend: Backend) -> None:
    user = new_user()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.audit.add(AuditEntry(actor="test", action="ancient", user_id=user), NOW - timedelta(days=400))
        await uow.audit.add(AuditEntry(actor="test", action="recent", user_id=user), NOW)
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.audit.delete_older_than(NOW - timedelta(days=365)) == 1
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert [r.entry.action for r in await uow.audit.list(user_id=user)] == ["recent"]


async def test_retention_deletes_roll_back_with_their_unit_of_work(backend: Backend) -> None:
    user, event_id = new_user(), uuid.uuid4().hex
    ended = lease(user)
    ended.end(NOW_MS, "grant_ended")
    ended.announced = True
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.processed_events.mark_processed(event_id, "tokens.issued")
        await uow.revocations.record(user, NOW, None)
        await uow.audit.add(AuditEntry(actor="test", action="kept", user_id=user), NOW)
        await uow.sandbox_leases.save(ended)
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.processed_events.delete_older_than(datetime.now(UTC) + timedelta(days=1)) == 1
        assert await uow.revocations.delete_older_than(NOW + timedelta(days=1)) == 1
        assert await uow.audit.delete_older_than(NOW + timedelta(days=1)) == 1
        assert await uow.sandbox_leases.delete_ended_before(NOW_MS + 1) == 1

    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert not await uow.processed_events.mark_processed(event_id, "tokens.issued")
        assert await uow.revocations.revoked_at(user) == NOW
        assert [r.entry.action for r in await uow.audit.list(user_id=user)] == ["kept"]
        assert await uow.sandbox_leases.get(user, "sbx-1") is not None


# --- sandbox leases ---------------------------------------------------------------------------
async def test_a_sandbox_lease_round_trips_and_save_replaces_it(backend: Backend) -> None:
    user = new_user()
    first = lease(user)
    await saved(backend, first)
    async with backend.store.unit_of_work(backend.cipher) as uow:
        found = await uow.sandbox_leases.get(user, "sbx-1", for_update=True)
        assert found is not None and found is not first
        assert dataclasses.asdict(found) == dataclasses.asdict(first)
        assert found.end(NOW_MS + 1, "grant_ended")
        await uow.sandbox_leases.save(found)
        await uow.commit()

    async with backend.store.unit_of_work(backend.cipher) as uow:
        replaced = await uow.sandbox_leases.get(user, "sbx-1")
        assert await uow.sandbox_leases.get(user, "sbx-2") is None
    assert replaced is not None
    assert (replaced.jti, replaced.ended_at, replaced.end_reason, replaced.announced) == (
        first.jti, NOW_MS + 1, "grant_ended", False)


async def test_record_releases_owns_last_released_at(backend: Backend) -> None:
    user = new_user()
    claimed = lease(user)
    claimed.last_released_at = NOW_MS  # whatever a caller passes, save() does not write it
    await saved(backend, claimed, lease(user, "sbx-2"))
    async with backend.store.unit_of_work(backend.cipher) as uow:
        inserted = await uow.sandbox_leases.get(user, "sbx-1")
        assert inserted is not None and inserted.last_released_at is None
        await uow.sandbox_leases.record_releases([(user, "sbx-1", NOW_MS + 5), (user, "sbx-1", NOW_MS + 3),
                                                  (user, "sbx-2", NOW_MS + 1), (user, "sbx-unknown", NOW_MS)])
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        await uow.sandbox_leases.record_releases([(user, "sbx-2", NOW_MS)])  # older: ignored
        again = await uow.sandbox_leases.get(user, "sbx-1")
        assert again is not None
        again.last_released_at = None
        await uow.sandbox_leases.save(again)  # a save keeps what record_releases wrote
        await uow.commit()

    async with backend.store.unit_of_work(backend.cipher) as uow:
        one = await uow.sandbox_leases.get(user, "sbx-1")
        two = await uow.sandbox_leases.get(user, "sbx-2")
        assert await uow.sandbox_leases.get(user, "sbx-unknown") is None
    assert one is not None and two is not None
    assert (one.last_released_at, two.last_released_at) == (NOW_MS + 5, NOW_MS + 1)


async def test_live_leases_are_a_persons_unended_unexpired_ones(backend: Backend) -> None:
    user, other = new_user(), new_user()
    later, sooner = lease(user, "sbx-later", expires_at=NOW_MS + HOUR_MS), lease(user, "sbx-sooner",
                                                                                expires_at=NOW_MS + 1)
    expired, ended = lease(user, "sbx-expired", expires_at=NOW_MS), lease(user, "sbx-ended")
    ended.end(NOW_MS - 1, "grant_ended")
    await saved(backend, later, sooner, expired, ended, lease(other, "sbx-later"))

    async with backend.store.unit_of_work(backend.cipher) as uow:
        live = await uow.sandbox_leases.live_for(user, NOW_MS)
        first = await uow.sandbox_leases.live_for(user, NOW_MS, limit=1)
    assert [x.sandbox_id for x in live] == ["sbx-sooner", "sbx-later"]
    assert [x.sandbox_id for x in first] == ["sbx-sooner"]


async def test_due_leases_are_expired_or_unannounced_ends(backend: Backend) -> None:
    user = new_user()
    live, expired = lease(user, "sbx-live"), lease(user, "sbx-expired", expires_at=NOW_MS - 10)
    unannounced, announced = lease(user, "sbx-unannounced", expires_at=NOW_MS - 20), lease(user, "sbx-announced")
    unannounced.end(NOW_MS - 30, "grant_ended")
    announced.end(NOW_MS - 30, "grant_ended")
    announced.announced = True
    await saved(backend, live, expired, unannounced, announced)

    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert [x.sandbox_id for x in await uow.sandbox_leases.due(NOW_MS, limit=10)] == [
            "sbx-unannounced", "sbx-expired"]
        assert [x.sandbox_id for x in await uow.sandbox_leases.due(NOW_MS, limit=1)] == ["sbx-unannounced"]
        await uow.sandbox_leases.mark_announced(user, "sbx-unannounced", NOW_MS - 29)  # another end: no-op
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert len(await uow.sandbox_leases.due(NOW_MS, limit=10)) == 2
        await uow.sandbox_leases.mark_announced(user, "sbx-unannounced", NOW_MS - 30)
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert [x.sandbox_id for x in await uow.sandbox_leases.due(NOW_MS, limit=10)] == ["sbx-expired"]


async def test_only_announced_ends_older_than_the_cutoff_are_deleted(backend: Backend) -> None:
    user = new_user()
    old, recent, unannounced, live = (lease(user, s) for s in ("sbx-old", "sbx-recent", "sbx-unannounced", "sbx-live"))
    for x, at in ((old, NOW_MS - HOUR_MS), (recent, NOW_MS), (unannounced, NOW_MS - HOUR_MS)):
        x.end(at, "grant_ended")
    old.announced = recent.announced = True
    await saved(backend, old, recent, unannounced, live)

    async with backend.store.unit_of_work(backend.cipher) as uow:
        assert await uow.sandbox_leases.delete_ended_before(NOW_MS) == 1
        await uow.commit()
    async with backend.store.unit_of_work(backend.cipher) as uow:
        left = [x for x in ("sbx-old", "sbx-recent", "sbx-unannounced", "sbx-live")
                if await uow.sandbox_leases.get(user, x) is not None]
    assert left == ["sbx-recent", "sbx-unannounced", "sbx-live"]


# --- the release read path ----------------------------------------------------------------
async def test_read_for_release_returns_the_wanted_connections_and_leases(backend: Backend) -> None:
    alice, bob = connection(), connection()
    await added(backend, alice, bob)
    await saved(backend, lease(alice.user_id, "sbx-a"), lease(alice.user_id, "sbx-b"), lease(bob.user_id, "sbx-b"))
    nobody = new_user()

    connections, leases = await backend.store.read_for_release(
        [(alice.user_id, "sbx-a"), (bob.user_id, "sbx-b"), (nobody, "sbx-a"), (alice.user_id, None)],
        backend.cipher)

    assert sorted(connections) == sorted([alice.user_id, bob.user_id])
    for c in (alice, bob):
        found = connections[c.user_id]
        assert isinstance(found, Connection) and found.credentials == c.credentials and found.version == 1
    assert sorted(leases) == sorted([(alice.user_id, "sbx-a"), (bob.user_id, "sbx-b")])  # not (alice, sbx-b)
    assert leases[(bob.user_id, "sbx-b")].mode == "file"
    tokens = {c.credentials.access_token for c in (alice, bob)} | {c.credentials.refresh_token or "" for c in (alice, bob)}
    assert not leaked(repr(connections) + repr(leases), tokens)


async def test_read_for_release_returns_the_error_of_an_undecryptable_row(backend: Backend) -> None:
    broken, fine = connection(), connection()
    await added(backend, broken, fine)
    await backend.spoil(broken.user_id)

    connections, _ = await backend.store.read_for_release([(broken.user_id, None), (fine.user_id, None)],
                                                          backend.cipher)

    assert isinstance(connections[broken.user_id], KeyringError)
    assert isinstance(connections[fine.user_id], Connection)


async def test_ping_answers_when_the_database_does(backend: Backend) -> None:
    assert await backend.store.ping() is True
