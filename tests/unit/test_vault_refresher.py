"""The central refresher's use case with in-memory fakes: what each token-endpoint answer does
to the connection, which events go out, backoff, single flight, login-expiry warnings."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.vault.domain import Account, Connection, Credentials, IssuedLogin
from services.vault.errors import DecryptionFailed, RefreshRejected, RefreshTransient
from services.vault.ports import TokenResponse
from services.vault.refresher import Refresher, RefreshPolicy
from shared import subjects
from shared.delivery import Breaker
from shared.events import TokensLoginExpiring, TokensReconnectRequired, TokensRefreshed
from tests.vault_fixtures import FakePublisher, FakeStore, FakeTokenEndpoint, canary, new_user

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
POLICY = RefreshPolicy(margin_s=600, lease_s=60, http_timeout_s=15, backoff_base_s=10, backoff_max_s=900,
                       login_warning_s=3 * 86400)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def _connected(store: FakeStore, *, expires_in_s: float = 60, refresh: str | None = None, **extra: object) -> Connection:
    user = new_user()
    login = IssuedLogin(
        kind="oauth", credentials=Credentials(canary("a"), refresh or canary("r")),
        scopes=("user:inference", "user:profile"), expires_at=NOW_MS + int(expires_in_s * 1000),
        refresh_token_expires_at=extra.pop("refresh_token_expires_at", None),
        account=Account(email="p@example.com"),
    )
    conn = Connection.connect(user, login, now=NOW - timedelta(hours=8))
    store.connections[user] = conn
    return conn


def _refresher(store: FakeStore, endpoint: FakeTokenEndpoint, publisher: FakePublisher, clock: Clock,
               owner: str = "replica-a") -> Refresher:
    return Refresher(unit_of_work=store.unit_of_work, endpoint=endpoint, publisher=publisher, owner=owner,
                     policy=POLICY, clock=clock)


def _ok(access: str, refresh: str | None, expires_in: int = 28_800, **extra: object) -> TokenResponse:
    return TokenResponse(access_token=access, refresh_token=refresh, expires_in=expires_in, **extra)


@pytest.fixture
def parts() -> tuple[FakeStore, FakeTokenEndpoint, FakePublisher, Clock]:
    return FakeStore(), FakeTokenEndpoint(), FakePublisher(), Clock()


async def test_due_connection_is_refreshed_and_rotation_is_kept(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store)
    old_refresh = conn.credentials.refresh_token
    new_access, new_refresh = canary("a2"), canary("r2")
    endpoint.script.append(_ok(new_access, new_refresh, scope="user:inference user:profile",
                               refresh_token_expires_in=30 * 86_400))

    outcomes = await _refresher(store, endpoint, publisher, clock).run_once()

    assert outcomes["ok"] == 1
    assert endpoint.calls == [(old_refresh, ("user:inference", "user:profile"))]
    saved = store.connections[conn.user_id]
    assert saved.credentials == Credentials(new_access, new_refresh)
    assert (saved.state, saved.version, saved.expires_at) == ("connected", 2, NOW_MS + 28_800_000)
    assert saved.refresh_token_expires_at == NOW_MS + 30 * 86_400_000
    assert not store.leases  # released
    [event] = publisher.of(subjects.TOKENS_REFRESHED)
    assert isinstance(event, TokensRefreshed) and (event.user_id, event.version) == (conn.user_id, 2)
    assert new_access not in event.model_dump_json() and new_refresh not in event.model_dump_json()
    assert store.actions(conn.user_id)[-1] == "refreshed"

    # not due any more: the next round does nothing
    assert (await _refresher(store, endpoint, publisher, clock).run_once())["ok"] == 0


async def test_a_response_without_refresh_token_keeps_the_old_one(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store)
    endpoint.script.append(_ok(canary("a2"), None))
    await _refresher(store, endpoint, publisher, clock).run_once()
    assert store.connections[conn.user_id].credentials.refresh_token == conn.credentials.refresh_token


async def test_invalid_grant_requires_reconnect_and_says_so(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store)
    endpoint.script.append(RefreshRejected("invalid_grant"))

    outcomes = await _refresher(store, endpoint, publisher, clock).run_once()

    assert outcomes["invalid_grant"] == 1
    saved = store.connections[conn.user_id]
    assert (saved.state, saved.version) == ("reconnect_required", 2)
    [event] = publisher.of(subjects.TOKENS_RECONNECT_REQUIRED)
    assert isinstance(event, TokensReconnectRequired) and (event.user_id, event.reason) == (conn.user_id, "invalid_grant")
    clock.now += timedelta(hours=1)
    await _refresher(store, endpoint, publisher, clock).run_once()
    assert len(endpoint.calls) == 1  # never again with a dead token


async def test_transient_failures_back_off_then_heal(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store, expires_in_s=3600)  # plenty of life left: the server's Retry-After is honoured
    endpoint.script += [RefreshTransient("429", outcome="rate_limited", retry_after_s=120), _ok(canary("a2"), None)]
    refresher = _refresher(store, endpoint, publisher, clock)
    refresher.policy = replace(POLICY, margin_s=4000)

    assert (await refresher.run_once())["rate_limited"] == 1
    failed = store.connections[conn.user_id]
    assert (failed.state, failed.refresh_failures, failed.last_refresh_error) == ("refresh_failed", 1, "rate_limited")
    assert failed.next_refresh_at is not None and failed.next_refresh_at >= NOW_MS + 120_000  # Retry-After honoured
    assert not publisher.events

    clock.now += timedelta(seconds=60)
    await refresher.run_once()
    assert len(endpoint.calls) == 1  # still backing off
    clock.now += timedelta(seconds=900)
    assert (await refresher.run_once())["ok"] == 1
    healed = store.connections[conn.user_id]
    assert (healed.state, healed.refresh_failures, healed.version) == ("connected", 0, 3)


async def test_an_outage_is_ridden_out_inside_the_access_tokens_life(parts) -> None:
    """A 503/429 outage of the OAuth server near the access token's expiry: the next tries come
    before it expires (at most half the time left), whatever the backoff or Retry-After say, and
    never end in reconnect_required."""
    store, endpoint, publisher, clock = parts
    conn = _connected(store, expires_in_s=60)
    endpoint.script += [RefreshTransient("503", outcome="upstream_error", retry_after_s=600)] * 3
    endpoint.script.append(_ok(canary("a2"), canary("r2")))
    refresher = _refresher(store, endpoint, publisher, clock)
    tries = []
    while not (outcome := await refresher.run_once())["ok"]:
        current = store.connections[conn.user_id]
        if current.next_refresh_at is not None and (outcome["upstream_error"] or not tries):
            tries.append((current.next_refresh_at - int(clock.now.timestamp() * 1000)) / 1000)
        clock.now += timedelta(seconds=1)
        assert clock.now < NOW + timedelta(seconds=60), "the access token expired before the refresh"
    assert len(endpoint.calls) == 4 and tries[0] <= 30
    assert store.connections[conn.user_id].state == "connected"
    assert publisher.of(subjects.TOKENS_RECONNECT_REQUIRED) == []


async def test_replicas_refresh_a_connection_once(parts) -> None:
    store, endpoint, publisher, clock = parts
    conns = [_connected(store) for _ in range(5)]
    endpoint.script += [_ok(canary("a"), canary("r")) for _ in conns]
    replicas = [_refresher(store, endpoint, publisher, clock, owner=f"replica-{i}") for i in range(3)]

    await asyncio.gather(*(r.run_once() for r in replicas))

    assert sorted(call[0] for call in endpoint.calls) == sorted(c.credentials.refresh_token for c in conns)
    assert len(publisher.of(subjects.TOKENS_REFRESHED)) == 5


async def test_a_new_login_during_the_call_wins(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store)
    login_token = canary("login")

    def new_login_meanwhile() -> TokenResponse:
        fresh = store.connections[conn.user_id]
        fresh.reconnect(IssuedLogin(kind="oauth", credentials=Credentials(login_token, canary("r")),
                                    scopes=("user:inference",), expires_at=NOW_MS + 10**8,
                                    refresh_token_expires_at=None, account=None), now=NOW)
        return _ok(canary("a2"), canary("r2"))

    endpoint.script.append(new_login_meanwhile)
    outcomes = await _refresher(store, endpoint, publisher, clock).run_once()

    assert outcomes["lost_lease"] == 1
    assert store.connections[conn.user_id].credentials.access_token == login_token
    assert not publisher.of(subjects.TOKENS_REFRESHED)
    assert "refresh_discarded" in store.actions(conn.user_id)


async def test_an_undecryptable_connection_is_deferred_and_reported(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store)
    store.undecryptable[conn.user_id] = DecryptionFailed("tampered")
    reported: list[tuple[str, str]] = []
    refresher = Refresher(unit_of_work=store.unit_of_work, endpoint=endpoint, publisher=publisher, owner="r",
                          policy=POLICY, clock=clock,
                          on_keyring_failure=lambda user, exc: reported.append((user, exc.reason)))

    assert (await refresher.run_once())["decrypt_failed"] == 1
    assert reported == [(conn.user_id, "decryption_failed")] and not endpoint.calls
    assert store.connections[conn.user_id].next_refresh_at == NOW_MS + 900_000  # the maximum backoff
    assert (await refresher.run_once())["decrypt_failed"] == 0  # not retried in a hot loop


async def test_a_bus_outage_does_not_lose_the_refresh(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store)
    publisher.failing = True
    endpoint.script.append(_ok(canary("a2"), canary("r2")))
    assert (await _refresher(store, endpoint, publisher, clock).run_once())["ok"] == 1
    assert store.connections[conn.user_id].version == 2


async def test_login_expiry_warning_is_sent_once(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store, expires_in_s=86_400, refresh_token_expires_at=NOW_MS + 2 * 86_400_000)
    publisher.failing = True
    refresher = _refresher(store, endpoint, publisher, clock)
    await refresher.run_once()
    assert not publisher.events  # the bus was down: the mark was taken back ...
    publisher.failing = False
    await refresher.run_once()  # ... so it is sent now
    await refresher.run_once()
    [event] = publisher.of(subjects.TOKENS_LOGIN_EXPIRING)
    assert isinstance(event, TokensLoginExpiring)
    assert (event.user_id, event.expires_at) == (conn.user_id, NOW_MS + 2 * 86_400_000)
    assert store.actions(conn.user_id).count("login_expiring") == 1


async def test_a_lapsed_login_requires_reconnecting_without_asking_the_server(parts) -> None:
    store, endpoint, publisher, clock = parts
    conn = _connected(store, refresh_token_expires_at=NOW_MS - 1000)
    assert (await _refresher(store, endpoint, publisher, clock).run_once())["invalid_grant"] == 1
    assert endpoint.calls == []
    assert store.connections[conn.user_id].state == "reconnect_required"
    [event] = publisher.of(subjects.TOKENS_RECONNECT_REQUIRED)
    assert event.reason == "login_expired"


async def test_rotated_tokens_survive_a_database_outage_at_save_time(parts) -> None:
    """The OAuth server rotated the refresh token (the old one is dead) and then the database
    went down: the refresher keeps the new tokens and retries the save until it is back."""
    store, endpoint, publisher, clock = parts
    conn = _connected(store)
    new_refresh = canary("r2")

    def answer_then_database_down() -> TokenResponse:
        store.unavailable = True
        return _ok(canary("a2"), new_refresh)

    endpoint.script.append(answer_then_database_down)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            store.unavailable = False

    refresher = Refresher(unit_of_work=store.unit_of_work, endpoint=endpoint, publisher=publisher,
                          owner="replica-a", policy=POLICY, clock=clock, sleep=sleep)
    assert (await refresher.run_once())["ok"] == 1
    assert store.connections[conn.user_id].credentials.refresh_token == new_refresh
    assert waits == [0.5, 1.0, 2.0]
    assert len(publisher.of(subjects.TOKENS_REFRESHED)) == 1


async def test_rounds_pause_while_the_database_breaker_is_open(parts) -> None:
    store, endpoint, publisher, clock = parts
    _connected(store)
    endpoint.script.append(_ok(canary("a2"), canary("r2")))
    database = Breaker("database", probe_interval_s=3600)
    refresher = Refresher(unit_of_work=store.unit_of_work, endpoint=endpoint, publisher=publisher,
                          owner="replica-a", policy=POLICY, clock=clock, database=database)
    store.unavailable = True
    assert await refresher.round() is None and database.state == "open"  # the scan failed: opened
    store.unavailable = False
    assert await refresher.round() is None and endpoint.calls == []  # paused: no scan, no refresh
    database.succeeded()  # somebody's probe found the database back
    outcomes = await refresher.round()
    assert outcomes is not None and outcomes["ok"] == 1
