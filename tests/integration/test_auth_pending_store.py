"""The pending-login store on a real JetStream KV bucket: TTL, compare-and-set single use,
encryption at rest and on the wire."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client

from services.auth.adapters.pending_store import KvPendingStore, RecordCipher, open_bucket
from services.auth.domain import PendingLogin, new_state
from shared.subjects import PENDING_LOGINS_BUCKET

TTL = timedelta(seconds=600)


def a_login(user: str = "user-1") -> PendingLogin:
    now = datetime.now(UTC)
    return PendingLogin(
        state=new_state(),
        user_id=user,
        verifier=secrets.token_urlsafe(64),
        redirect_uri="https://cb.example/cb",
        client_id="client",
        scopes=("user:inference",),
        created_at=now,
        expires_at=now + TTL,
    )


async def test_bucket_is_created_once_with_the_login_ttl(nc: Client) -> None:
    js = nc.jetstream()
    first = await open_bucket(js, ttl=TTL)
    second = await open_bucket(js, ttl=TTL)
    status = await second.status()
    assert status.bucket == first._name == PENDING_LOGINS_BUCKET
    assert status.ttl == pytest.approx(600.0)


async def test_round_trip_and_single_use(nc: Client) -> None:
    store = await KvPendingStore.open(nc.jetstream(), RecordCipher(b"k" * 32), ttl=TTL)
    login = a_login()
    await store.put(login)
    stored = await store.get(login.state)
    assert stored is not None and stored.login == login and stored.revision > 0
    assert await store.consume(login.state, stored.revision) is True
    assert await store.get(login.state) is None
    assert await store.consume(login.state, stored.revision) is False


async def test_compare_and_set_lets_exactly_one_racer_win(nc: Client) -> None:
    store = await KvPendingStore.open(nc.jetstream(), RecordCipher(b"k" * 32), ttl=TTL)
    login = a_login()
    await store.put(login)
    a = await store.get(login.state)
    b = await store.get(login.state)
    assert a is not None and b is not None
    results = [await store.consume(login.state, a.revision), await store.consume(login.state, b.revision)]
    assert results == [True, False]


async def test_restore_after_consume(nc: Client) -> None:
    store = await KvPendingStore.open(nc.jetstream(), RecordCipher(b"k" * 32), ttl=TTL)
    login = a_login()
    await store.put(login)
    stored = await store.get(login.state)
    assert stored is not None
    assert await store.consume(login.state, stored.revision)
    await store.restore(login)
    again = await store.get(login.state)
    assert again is not None and again.login == login and again.revision > stored.revision
    await store.restore(login)  # idempotent
    assert await store.consume(login.state, again.revision) is True  # still the same record


async def test_records_are_encrypted_and_bound_to_their_key(nc: Client) -> None:
    js = nc.jetstream()
    store = await KvPendingStore.open(js, RecordCipher(b"k" * 32), ttl=TTL)
    login = a_login()
    await store.put(login)
    raw = await (await js.key_value(PENDING_LOGINS_BUCKET)).get(login.state)
    assert raw.value is not None
    assert login.verifier.encode() not in raw.value
    assert login.user_id.encode() not in raw.value
    other_secret = KvPendingStore(await open_bucket(js, ttl=TTL), RecordCipher(b"o" * 32))
    assert await other_secret.get(login.state) is None
    # a record copied under another key does not open there
    moved = a_login()
    await (await js.key_value(PENDING_LOGINS_BUCKET)).create(moved.state, raw.value)
    assert await store.get(moved.state) is None


async def test_unknown_and_odd_keys_are_just_absent(nc: Client) -> None:
    store = await KvPendingStore.open(nc.jetstream(), RecordCipher(b"k" * 32), ttl=TTL)
    assert await store.get(new_state()) is None
    assert await store.get("not a valid key!") is None
