"""Every way a person connects, over real HTTP: account types, `org:create_api_key`, the
seed-compatible `code#verifier`, a `claude setup-token` token; then status (asked of a vault
stand-in over real NATS request/reply) and disconnect (`tokens.revoked` on JetStream)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

import httpx
import nats
import pytest

from services.auth.app import AuthService
from services.auth.domain import s256_challenge
from shared import subjects
from shared.events import TokenBundle, TokensRevoked
from shared.sealing import KeyPair, open_tokens
from standins.oauth import REAL_CLIENT_ID, OAuthStandin
from tests.auth_fixtures import (
    PROBLEM,
    VaultResponder,
    assert_problem,
    bearer,
    begin,
    exchange,
    follow_authorize,
    new_user,
    settings_for,
)

SCOPES = "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload"


@pytest.fixture
async def auth(nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair) -> AsyncIterator[AuthService]:
    async with AuthService(settings_for(nats_url, tmp_path, standin, vault_key, vault_timeout=0.5)) as service:
        yield service


def open_bundle(event, key: KeyPair) -> TokenBundle:
    return TokenBundle.model_validate_json(
        open_tokens(event, key)
    )


# --- account type and optional scope ---------------------------------------------------------
async def test_account_types_use_their_authorize_urls(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    user = new_user()
    default = await http.post(f"{auth.base_url}/v1/claude-code/login", headers=bearer(user))
    console = await http.post(
        f"{auth.base_url}/v1/claude-code/login", headers=bearer(user), json={"account_type": "console"}
    )
    assert default.json()["authorize_url"].startswith(standin.claude_ai_authorize_url + "?")
    assert console.json()["authorize_url"].startswith(standin.console_authorize_url + "?")
    pasted = await follow_authorize(http, console.json()["authorize_url"])
    assert standin.state.stats["authorize:/oauth/authorize"] == 1
    assert standin.state.stats["authorize:/cai/oauth/authorize"] == 0
    assert (await exchange(http, auth.base_url, user, pasted)).status_code == 202
    assert_problem(
        await http.post(f"{auth.base_url}/v1/claude-code/login", headers=bearer(user), json={"account_type": "team"}),
        422, "invalid-request",
    )


async def test_create_api_key_scope_is_requested_and_granted(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient, vault_responder: VaultResponder,
    vault_key: KeyPair,
) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user, body={"create_api_key": True})
    grant = next(iter(standin.state.grants.values()))
    assert "org:create_api_key" in grant.scopes
    done = await exchange(http, auth.base_url, user, pasted)
    assert done.status_code == 202 and "org:create_api_key" in done.json()["scopes"]
    await vault_responder.wait_for(lambda: any(e.user_id == user for e in vault_responder.issued))
    event = next(e for e in vault_responder.issued if e.user_id == user)
    assert "org:create_api_key" in event.scopes and "org:create_api_key" in open_bundle(event, vault_key).scopes

    other = new_user()
    plain = await http.post(f"{auth.base_url}/v1/claude-code/login", headers=bearer(other))
    assert "org%3Acreate_api_key" not in plain.json()["authorize_url"]


# --- the seed-compatible path ------------------------------------------------------------------
async def legacy_client_authorizes(http: httpx.AsyncClient, standin: OAuthStandin) -> tuple[str, str]:
    """A seed-era client: its own PKCE verifier, also used as `state`; the page shows code#verifier."""
    verifier = secrets.token_urlsafe(48)
    query = urlencode({
        "code": "true", "client_id": REAL_CLIENT_ID, "response_type": "code", "redirect_uri": standin.callback_url,
        "scope": SCOPES, "code_challenge": s256_challenge(verifier), "code_challenge_method": "S256",
        "state": verifier,
    })
    pasted = await follow_authorize(http, f"{standin.claude_ai_authorize_url}?{query}")
    assert pasted.endswith("#" + verifier)
    return pasted, verifier


async def test_legacy_code_verifier_connects(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient, vault_responder: VaultResponder,
    vault_key: KeyPair,
) -> None:
    user = new_user()
    pasted, _ = await legacy_client_authorizes(http, standin)
    url = f"{auth.base_url}/user-settings/mcp/claude-code"
    response = await http.post(url, headers=bearer(user), json={"authorization_code": pasted})
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}
    assert "sk-ant" not in response.text
    await vault_responder.wait_for(lambda: any(e.user_id == user for e in vault_responder.issued))
    event = next(e for e in vault_responder.issued if e.user_id == user)
    bundle = open_bundle(event, vault_key)
    assert bundle.access_token in standin.state.access_tokens and bundle.refresh_token in standin.state.refresh_tokens
    assert event.kind == "oauth" and event.scopes == SCOPES.split()

    # The same code again: the server refuses it (single use) → 400, and we sent it only once more.
    again = await http.post(url, headers=bearer(user), json={"authorization_code": pasted})
    assert_problem(again, 400, "invalid-code")
    assert standin.state.stats["token:authorization_code"] == 2


async def test_legacy_refusals(auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    url = f"{auth.base_url}/user-settings/mcp/claude-code"
    pasted, verifier = await legacy_client_authorizes(http, standin)
    code = pasted.split("#")[0]
    assert_problem(await http.post(url, json={"authorization_code": pasted}), 401, "unauthorized")
    user = new_user()
    for bad in (code, f"{code}#short", f"{code}#{verifier}#x", ""):
        response = await http.post(url, headers=bearer(user), json={"authorization_code": bad})
        assert response.status_code in (400, 422), response.text
        assert response.headers["content-type"].startswith(PROBLEM)
        assert code not in response.text
    assert standin.state.stats["token:authorization_code"] == 0  # nothing malformed went out
    wrong = await http.post(url, headers=bearer(user), json={"authorization_code": f"{code}#{'w' * 50}"})
    assert_problem(wrong, 400, "invalid-code")  # the stand-in checked PKCE and refused


# --- setup tokens ------------------------------------------------------------------------------
async def test_setup_token_becomes_an_access_only_connection(
    auth: AuthService, http: httpx.AsyncClient, vault_responder: VaultResponder, vault_key: KeyPair
) -> None:
    user = new_user()
    token = "sk-ant-oat01-" + secrets.token_urlsafe(70)
    before = datetime.now(UTC)
    response = await http.post(f"{auth.base_url}/v1/claude-code/token", headers=bearer(user), json={"token": f" {token}\n"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "connected" and body["scopes"] == ["user:inference"]
    days = (datetime.fromisoformat(body["expires_at"]) - before).total_seconds() / 86400
    assert 364.9 < days < 365.1
    assert token not in response.text

    await vault_responder.wait_for(lambda: any(e.user_id == user for e in vault_responder.issued))
    event = next(e for e in vault_responder.issued if e.user_id == user)
    assert event.kind == "setup_token" and event.scopes == ["user:inference"]
    assert event.refresh_token_expires_at is None and token not in event.model_dump_json()
    bundle = open_bundle(event, vault_key)
    assert (bundle.access_token, bundle.refresh_token) == (token, None)

    status = (await http.get(f"{auth.base_url}/v1/claude-code/status", headers=bearer(user))).json()
    assert status["connected"] is True and status["kind"] == "setup_token" and status["scopes"] == ["user:inference"]


@pytest.mark.parametrize(
    ("token", "hint"),
    [("sk-ant-ort01-" + "r" * 60, "refresh token"), ("sk-ant-api03-" + "k" * 60, "API key"),
     ("not-a-token-at-all-xxxxxxxx", "setup-token")],
)
async def test_wrong_setup_tokens_are_400_without_echo(
    auth: AuthService, http: httpx.AsyncClient, vault_responder: VaultResponder, token: str, hint: str
) -> None:
    user = new_user()
    response = await http.post(f"{auth.base_url}/v1/claude-code/token", headers=bearer(user), json={"token": token})
    body = assert_problem(response, 400, "invalid-token-format")
    assert hint in body["detail"] and token not in response.text
    assert not any(e.user_id == user for e in vault_responder.issued)
    short = await http.post(f"{auth.base_url}/v1/claude-code/token", headers=bearer(user), json={"token": "sk-ant"})
    assert_problem(short, 422, "invalid-request")
    assert "sk-ant" not in short.text


# --- status and disconnect -----------------------------------------------------------------------
async def test_status_follows_the_vault_and_disconnect_publishes_tokens_revoked(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient, vault_responder: VaultResponder,
    nats_url: str,
) -> None:
    user = new_user()
    status_url = f"{auth.base_url}/v1/claude-code/status"
    first = (await http.get(status_url, headers=bearer(user))).json()
    assert first["connected"] is False and first["state"] == "not_connected"

    assert (await exchange(http, auth.base_url, user, await begin(http, auth.base_url, user))).status_code == 202
    await vault_responder.wait_for(lambda: user in vault_responder.connections)
    status = (await http.get(status_url, headers=bearer(user))).json()
    assert status["connected"] is True and status["state"] == "connected" and status["kind"] == "oauth"
    assert status["account"]["email"] == standin.state.account["email_address"]
    assert status["account"]["organization_name"] == standin.state.organization["name"]
    assert "user:inference" in status["scopes"] and status["version"] == 1
    expires = datetime.fromisoformat(status["expires_at"])
    login_expires = datetime.fromisoformat(status["login_expires_at"])
    assert 7.9 < (expires - datetime.now(UTC)).total_seconds() / 3600 <= 8.0
    assert 29.9 < (login_expires - datetime.now(UTC)).total_seconds() / 86400 <= 30.0
    assert vault_responder.requests[-1].user_id == user  # the request carried the caller, nothing more

    for state in ("refresh_failed", "reconnect_required"):
        vault_responder.set(user, state=state, kind="oauth", scopes=["user:inference"], expires_at=0, version=2)
        seen = (await http.get(status_url, headers=bearer(user))).json()
        assert seen["state"] == state and seen["connected"] is True

    deleted = await http.delete(f"{auth.base_url}/v1/claude-code", headers=bearer(user))
    assert deleted.status_code == 202 and deleted.json()["status"] == "revoked"
    event_id = deleted.json()["event_id"]
    await vault_responder.wait_for(lambda: any(e.event_id == event_id for e in vault_responder.revoked))
    nc = await nats.connect(nats_url)
    try:
        stored = await nc.jetstream().get_last_msg(subjects.TOKENS_STREAM.name, subjects.TOKENS_REVOKED)
    finally:
        await nc.close()
    event = TokensRevoked.model_validate_json(stored.data)
    assert (event.event_id, event.user_id, event.reason) == (event_id, user, "user_request")
    assert stored.headers[subjects.MSG_ID_HEADER] == event_id
    after = (await http.get(status_url, headers=bearer(user))).json()
    assert after["state"] == "not_connected"
    again = await http.delete(f"{auth.base_url}/v1/claude-code", headers=bearer(user))
    assert again.status_code == 202 and again.json()["event_id"] != event_id  # idempotent for the caller


async def test_status_without_a_vault_is_503(auth: AuthService, http: httpx.AsyncClient) -> None:
    response = await http.get(f"{auth.base_url}/v1/claude-code/status", headers=bearer(new_user()))
    body = assert_problem(response, 503, "vault-unavailable")
    assert response.headers["retry-after"] and "status" in body["detail"]


@pytest.mark.parametrize(("mode", "status", "slug"), [("silent", 503, "vault-unavailable"), ("garbage", 502, "vault-bad-reply")])
async def test_status_with_a_misbehaving_vault(
    auth: AuthService, http: httpx.AsyncClient, nats_url: str, mode: str, status: int, slug: str
) -> None:
    async with VaultResponder(nats_url, mode=mode):
        started = time.monotonic()
        response = await http.get(f"{auth.base_url}/v1/claude-code/status", headers=bearer(new_user()))
        assert_problem(response, status, slug)
        assert time.monotonic() - started < 10  # bounded by AUTH_VAULT_TIMEOUT, never a hang


# --- who needs a caller token ----------------------------------------------------------------------
async def test_every_route_but_ops_docs_and_page_needs_a_caller(auth: AuthService, http: httpx.AsyncClient) -> None:
    protected = [
        ("POST", "/v1/claude-code/login"), ("POST", "/v1/claude-code/exchange"), ("POST", "/v1/claude-code/token"),
        ("GET", "/v1/claude-code/status"), ("DELETE", "/v1/claude-code"), ("POST", "/user-settings/mcp/claude-code"),
    ]
    for method, path in protected:
        response = await http.request(method, auth.base_url + path, json={})
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    spec = (await http.get(f"{auth.base_url}/openapi.json")).json()
    for method, path in protected:
        assert spec["paths"][path][method.lower()].get("security"), (method, path)
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/connect", "/connect/assets/connect.js"):
        response = await http.get(auth.base_url + path)
        assert response.status_code == 200, (path, response.status_code)
