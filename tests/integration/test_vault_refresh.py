"""The central refresher end to end: a running vault (real NATS, real SQLite / PostgreSQL) and
the OAuth stand-in over real HTTP, which rotates refresh tokens like the real server and kills
the old one. Short access-token lifetimes make refreshes due within the test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.js.api import DeliverPolicy

from services.vault.app import VaultService
from services.vault.settings import VaultSettings
from shared import subjects
from shared.broker import make_broker, publish_event
from shared.events import (
    ConnectionStatusReply,
    ConnectionStatusRequest,
    CredentialsReply,
    TokensLoginExpiring,
    TokensReconnectRequired,
    TokensRefreshed,
    TokensRevoked,
)
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.vault_fixtures import (
    VaultDb,
    canary_factory,
    credentials_request,
    eventually,
    issued_from_login,
    new_user,
    open_reply,
    standin_login,
    vault_settings,
)


@dataclass
class Rig:
    service: VaultService
    settings: VaultSettings
    oauth: OAuthStandin
    requester: KeyPair
    nc: nats.NATS

    async def connect(self, user: str) -> dict[str, Any]:
        grant = await standin_login(self.oauth)
        async with make_broker(self.settings, name="test-publisher") as publisher:
            await publisher.connect()
            await publish_event(publisher, subjects.TOKENS_ISSUED,
                                issued_from_login(self.service.keypair.recipient, user, grant))
        return grant

    async def connection(self, user: str) -> Any:
        async with self.service.unit_of_work() as uow:
            return await uow.connections.get(user)

    async def ask(self, user: str, mode: str = "file") -> CredentialsReply:
        request = credentials_request(self.requester, user_id=user, mode=mode)
        msg = await self.nc.request(subjects.VAULT_CREDENTIALS_GET, request.model_dump_json().encode(), timeout=10)
        return CredentialsReply.model_validate_json(msg.data)

    async def status(self, user: str) -> ConnectionStatusReply:
        msg = await self.nc.request(subjects.VAULT_CONNECTIONS_STATUS,
                                    ConnectionStatusRequest(user_id=user).model_dump_json().encode(), timeout=10)
        return ConnectionStatusReply.model_validate_json(msg.data)

    async def events(self, subject: str) -> Any:
        return await self.nc.jetstream().subscribe(subject, stream=subjects.TOKENS_STREAM.name,
                                                   deliver_policy=DeliverPolicy.NEW)

    def stat(self, name: str) -> int:
        return self.oauth.state.stats[name]


@pytest.fixture
async def rig(tmp_path: Path, nats_url: str, db: VaultDb, nc: nats.NATS, request: pytest.FixtureRequest
              ) -> AsyncIterator[Rig]:
    options = getattr(request, "param", {})
    oauth_options = {"access_token_lifetime": 4, **options.get("oauth", {})}
    async with OAuthStandin(port=0, access_token_factory=canary_factory("at"),
                            refresh_token_factory=canary_factory("rt"), **oauth_options) as oauth:
        requester = KeyPair.generate()
        settings = vault_settings(
            tmp_path, nats_url, db,
            OAUTH_TOKEN_URL=oauth.token_url,
            VAULT_REFRESH_ENABLED=True,
            VAULT_REFRESH_INTERVAL_S=0.2,
            VAULT_REFRESH_MARGIN_S=3,
            VAULT_REFRESH_TIMEOUT_S=5,
            VAULT_REFRESH_LEASE_S=10,
            VAULT_REFRESH_BACKOFF_BASE_S=0.2,
            VAULT_REFRESH_BACKOFF_MAX_S=0.6,
            VAULT_TRUSTED_REQUESTER_KEYS=requester.recipient.public_b64,
            **options.get("env", {}),
        )
        async with VaultService(settings) as service:
            yield Rig(service, settings, oauth, requester, nc)


async def _next_events(sub: Any, user: str, count: int) -> list[Any]:
    got: list[Any] = []

    async def probe() -> bool:
        try:
            msg = await sub.next_msg(timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            return len(got) >= count
        body = json.loads(msg.data)
        if body.get("user_id") == user:
            got.append(body)
        return len(got) >= count

    await eventually(probe, f"{count} events for {user}")
    return got


async def _stop_refresher(rig: Rig) -> None:
    """Stop rotating (a round in flight completes) so the numbers below hold still."""
    assert rig.service.refresher is not None
    await rig.service.refresher.stop()


async def test_refreshes_rotate_and_the_vault_keeps_the_live_token(rig: Rig) -> None:
    user = new_user()
    refreshed = await rig.events(subjects.TOKENS_REFRESHED)
    try:
        grant = await rig.connect(user)
        events = [TokensRefreshed.model_validate(e) for e in await _next_events(refreshed, user, 2)]
    finally:
        await refreshed.unsubscribe()
    await _stop_refresher(rig)

    assert [e.version for e in events] == [2, 3]  # one event per rotation, in order
    connection = await rig.connection(user)
    assert connection.state == "connected" and connection.version >= 3
    # the refresh token the vault holds is the live one at the server; the first one is dead
    assert connection.credentials.refresh_token in rig.oauth.state.refresh_tokens
    assert grant["refresh_token"] not in rig.oauth.state.refresh_tokens
    assert rig.stat("token:refresh_token") == rig.stat("token:refresh_token:ok") == connection.version - 1
    bundle = open_reply(await rig.ask(user), rig.requester, user_id=user)
    assert rig.oauth.state.access_token_valid(bundle.access_token)
    assert bundle.refresh_token == connection.credentials.refresh_token
    for event in events:  # the event carries no token
        assert bundle.access_token not in event.model_dump_json()
        assert connection.credentials.refresh_token not in event.model_dump_json()
    async with rig.service.unit_of_work() as uow:
        actions = [r.entry.action for r in await uow.audit.list(user_id=user, limit=10)]
    assert actions.count("refreshed") == connection.version - 1
    assert rig.service.metrics.value("ccbridge_vault_refreshes_total", outcome="ok") == connection.version - 1


async def test_invalid_grant_means_reconnect_required(rig: Rig) -> None:
    user = new_user()
    await _stop_refresher(rig)
    reconnect = await rig.events(subjects.TOKENS_RECONNECT_REQUIRED)
    try:
        grant = await rig.connect(user)
        await eventually(lambda: rig.connection(user), "the connection")
        # another holder refreshes the same token first: the vault's copy is now dead
        async with httpx.AsyncClient() as http:
            stolen = await http.post(rig.oauth.token_url, json={
                "grant_type": "refresh_token", "refresh_token": grant["refresh_token"],
                "client_id": rig.oauth.state.client_id})
        assert stolen.status_code == 200
        before = rig.stat("token:refresh_token")
        assert rig.service.refresher is not None
        rig.service.refresher.start(0.2)
        [event] = await _next_events(reconnect, user, 1)
        for _ in range(3):
            await rig.service.refresher.run_once()
    finally:
        await reconnect.unsubscribe()

    assert TokensReconnectRequired.model_validate(event).reason == "invalid_grant"
    assert (await rig.connection(user)).state == "reconnect_required"
    reply = await rig.ask(user)
    assert (reply.ok, reply.error) == (False, "reconnect_required")
    status = await rig.status(user)
    assert (status.connected, status.state) == (True, "reconnect_required")
    assert rig.stat("token:refresh_token") == before + 1  # tried once, never again with a dead token
    assert rig.service.metrics.value("ccbridge_vault_refreshes_total", outcome="invalid_grant") == 1


async def test_rate_limits_and_server_errors_back_off_then_heal(rig: Rig) -> None:
    user = new_user()
    await _stop_refresher(rig)
    refreshed = await rig.events(subjects.TOKENS_REFRESHED)
    try:
        await rig.connect(user)
        await eventually(lambda: rig.connection(user), "the connection")
        rig.oauth.state.fail_next(429, times=1, headers={"Retry-After": "1"})
        rig.oauth.state.fail_next(503, times=1)
        assert rig.service.refresher is not None
        rig.service.refresher.start(0.2)

        async def failing() -> bool:
            conn = await rig.connection(user)
            return conn is not None and conn.state == "refresh_failed"

        await eventually(failing, "state refresh_failed while the server refuses")
        [event] = await _next_events(refreshed, user, 1)
    finally:
        await refreshed.unsubscribe()
    await _stop_refresher(rig)

    connection = await rig.connection(user)
    assert (connection.state, connection.refresh_failures) == ("connected", 0)
    assert event["version"] == 4  # stored (1), 429 (2), 503 (3), refreshed (4)
    assert rig.stat("token:injected_failure") == 2
    assert rig.stat("token:refresh_token") == rig.stat("token:refresh_token:ok") + 2
    async with rig.service.unit_of_work() as uow:
        audit = [(r.entry.action, r.entry.reason) for r in await uow.audit.list(user_id=user, limit=20)][::-1]
    assert audit[:4] == [("tokens_stored", None), ("refresh_failed", "rate_limited"),
                         ("refresh_failed", "upstream_error"), ("refreshed", None)]
    metrics = rig.service.metrics
    assert metrics.value("ccbridge_vault_refreshes_total", outcome="rate_limited") == 1
    assert metrics.value("ccbridge_vault_refreshes_total", outcome="upstream_error") == 1


@pytest.mark.parametrize(
    "rig", [{"oauth": {"access_token_lifetime": 3600, "refresh_token_lifetime": 3600},
             "env": {"VAULT_LOGIN_WARNING_S": 7200}}], indirect=True,
)
async def test_login_expiry_warning_is_published_once(rig: Rig) -> None:
    user = new_user()
    expiring = await rig.events(subjects.TOKENS_LOGIN_EXPIRING)
    try:
        await rig.connect(user)
        [event] = await _next_events(expiring, user, 1)
        await _stop_refresher(rig)
        assert rig.service.refresher is not None
        for _ in range(3):
            await rig.service.refresher.run_once()
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            while True:  # drain: anything else for this user would be a second warning
                msg = await expiring.next_msg(timeout=0.5)
                assert json.loads(msg.data).get("user_id") != user, "second warning"
    finally:
        await expiring.unsubscribe()
    warning = TokensLoginExpiring.model_validate(event)
    connection = await rig.connection(user)
    assert warning.expires_at == connection.refresh_token_expires_at and warning.state == "connected"
    assert rig.stat("token:refresh_token") == 0  # the access token is far from expiry


async def test_disconnect_revokes_the_login_at_the_oauth_server(rig: Rig) -> None:
    """tokens.revoked: the vault shreds its copy, then revokes the login at the OAuth server with
    exactly what `claude auth logout` sends — so a refresh token that left the vault (file mode)
    is dead too."""
    user = new_user()
    grant = await rig.connect(user)
    await eventually(lambda: rig.connection(user), "the vault to store the login")
    await _stop_refresher(rig)
    live = (await rig.connection(user)).credentials.refresh_token
    async with make_broker(rig.settings, name="test-publisher") as publisher:
        await publisher.connect()
        await publish_event(publisher, subjects.TOKENS_REVOKED, TokensRevoked(user_id=user))

    async def revoked() -> bool:
        return bool(rig.oauth.state.revocations)

    await eventually(revoked, "the revoke call at the stand-in")
    assert rig.oauth.state.revocations == [
        {"token": live, "token_type_hint": "refresh_token", "client_id": rig.settings.oauth_client_id}]
    assert live not in rig.oauth.state.refresh_tokens  # the login is dead at the server
    assert grant["refresh_token"] not in rig.oauth.state.refresh_tokens
    assert await rig.connection(user) is None

    async def audited() -> bool:
        async with rig.service.unit_of_work() as uow:
            return ("provider_revoke", "ok") in [(r.entry.action, r.entry.outcome)
                                                 for r in await uow.audit.list(user_id=user)]

    await eventually(audited, "the provider revocation in the audit log")  # written after the call returns
