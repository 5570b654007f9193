"""The HTTP surface over ASGI with fake adapters: status codes, problem+json, no token ever."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from services.auth.adapters.pending_store import InMemoryPendingStore
from services.auth.app import build_api, utc_now
from services.auth.callers import CallerVerifier, mint_caller_token
from services.auth.connections import ConnectionService
from services.auth.errors import InvalidCode, UpstreamBadResponse, UpstreamRateLimited
from services.auth.limits import RateLimiter
from services.auth.login import LoginPolicy, LoginService
from services.auth.metrics import AuthMetrics
from services.auth.routes import AuthComponents
from services.auth.settings import AuthSettings
from shared.events import AccountInfo, ConnectionStatusReply
from shared.sealing import KeyPair
from tests.auth_fixtures import (
    ACCESS,
    REFRESH,
    FakeOAuth,
    FakePublisher,
    FakeVaultKeys,
    FakeVaultStatus,
    a_grant,
    assert_problem,
    openapi_examples_missing,
)

SECRET = "unit-test-secret-" + "x" * 32


@pytest.fixture
def fakes() -> tuple[FakeOAuth, FakePublisher, FakeVaultKeys, FakeVaultStatus]:
    return FakeOAuth(grant=a_grant()), FakePublisher(), FakeVaultKeys(KeyPair.generate().recipient), FakeVaultStatus()


@pytest.fixture
async def api(fakes) -> AsyncIterator[httpx.AsyncClient]:
    oauth, publisher, vault, vault_status = fakes
    login = LoginService(
        policy=LoginPolicy("https://claude.example/authorize", "https://cb.example/cb", "client", ("user:inference",),
                           ttl=timedelta(minutes=10), max_pending_per_caller=50),
        pending=InMemoryPendingStore(), oauth=oauth, vault_keys=vault, publisher=publisher, clock=utc_now,
    )

    async def readiness() -> dict[str, bool]:
        return {"bus": True, "vault_key": vault.current() is not None}

    components = AuthComponents(
        login=login, callers=CallerVerifier(SECRET), readiness=readiness,
        connections=ConnectionService(vault=vault_status, publisher=publisher, clock=utc_now),
        limiter=RateLimiter(per_minute=600, burst=200),
    )
    app = build_api(AuthMetrics(), components, max_body_bytes=8192)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("internal detail sk-ant-oat01-should-not-leak")

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://auth") as client:
        yield client


def auth(user: str = "user-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_caller_token(SECRET, user)}"}


async def login_and_paste(api: httpx.AsyncClient, user: str = "user-1") -> str:
    started = await api.post("/v1/claude-code/login", headers=auth(user))
    assert started.status_code == 201, started.text
    return f"some-code#{started.json()['state']}"


async def test_login_then_exchange(api: httpx.AsyncClient) -> None:
    started = await api.post("/v1/claude-code/login", headers=auth())
    assert started.status_code == 201
    body = started.json()
    assert set(body) == {"authorize_url", "state", "expires_at"}
    assert body["authorize_url"].startswith("https://claude.example/authorize?code=true&")
    done = await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": f" code-1#{body['state']}\n"})
    assert done.status_code == 202
    assert set(done.json()) == {"status", "expires_at", "scopes"}
    assert done.json()["status"] == "connected"
    assert ACCESS not in done.text and REFRESH not in done.text


async def test_code_and_state_apart(api: httpx.AsyncClient) -> None:
    state = (await login_and_paste(api)).split("#")[1]
    done = await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": "code-1", "state": state})
    assert done.status_code == 202


@pytest.mark.parametrize("path", ["/v1/claude-code/login", "/v1/claude-code/exchange"])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
     {"Authorization": f"Bearer {mint_caller_token('another-secret-' + 'y' * 32, 'user-1')}"}],
)
async def test_unauthenticated_is_401_problem(api: httpx.AsyncClient, path: str, headers: dict) -> None:
    response = await api.post(path, headers=headers, json={"code": "a#b"})
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_reuse_is_400_invalid_state(api: httpx.AsyncClient) -> None:
    paste = await login_and_paste(api)
    assert (await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": paste})).status_code == 202
    assert_problem(await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": paste}), 400,
                   "invalid-state")


async def test_other_caller_is_403(api: httpx.AsyncClient) -> None:
    paste = await login_and_paste(api, "owner")
    assert_problem(await api.post("/v1/claude-code/exchange", headers=auth("intruder"), json={"code": paste}), 403,
                   "forbidden-state")


@pytest.mark.parametrize(
    ("error", "status", "slug"),
    [(InvalidCode(), 400, "invalid-code"), (UpstreamRateLimited(9), 503, "upstream-rate-limited"),
     (UpstreamBadResponse(), 502, "upstream-bad-response")],
)
async def test_upstream_errors_as_problems(api: httpx.AsyncClient, fakes, error, status: int, slug: str) -> None:
    fakes[0].error = error
    paste = await login_and_paste(api)
    response = await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": paste})
    assert_problem(response, status, slug)
    if status == 503:
        assert response.headers["retry-after"] == "9"


async def test_vault_key_missing_is_503_and_not_ready(api: httpx.AsyncClient, fakes) -> None:
    fakes[2].recipient = None
    paste = await login_and_paste(api)
    assert_problem(await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": paste}), 503,
                   "vault-key-unavailable")
    ready = await api.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "checks": {"bus": True, "vault_key": False}}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": b"garbage"},
        {"content": b"{\"code\": "},
        {"json": {}},
        {"json": {"code": 12}},
        {"json": {"code": ""}},
        {"json": {"code": "x" * 5000}},
        {"json": ["code"]},
        {"json": None},
        {"content": b"\xff\xfe\x00", "headers": {"Content-Type": "application/json"}},
    ],
)
async def test_garbage_bodies_are_4xx_problems(api: httpx.AsyncClient, kwargs: dict) -> None:
    headers = {**auth(), **kwargs.pop("headers", {})}
    response = await api.post("/v1/claude-code/exchange", headers=headers, **kwargs)
    assert response.status_code in (400, 422)
    body = assert_problem(response, response.status_code)
    assert all(set(err) == {"loc", "msg", "type"} for err in body.get("errors", []))
    assert "x" * 100 not in response.text  # input is never echoed


@pytest.mark.parametrize("code", ["no-state-here", "a#b#c", "#", "code with spaces#state-state-state"])
async def test_malformed_paste_is_400(api: httpx.AsyncClient, code: str) -> None:
    assert_problem(await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": code}), 400)


async def test_unknown_route_and_method_are_problems(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/nope"), 404, "not-found")
    response = await api.get("/v1/claude-code/login")
    assert_problem(response, 405, "method-not-allowed")


async def test_unexpected_error_is_a_500_problem_without_internals(api: httpx.AsyncClient) -> None:
    response = await api.get("/boom")
    body = assert_problem(response, 500, "internal")
    assert "sk-ant" not in response.text and "RuntimeError" not in response.text and "Traceback" not in response.text
    assert body["instance"] == "/boom"


async def test_ops_endpoints(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).status_code == 200
    await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": "no-state"})
    await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": "a#b"})
    paste = await login_and_paste(api)
    await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": paste})
    metrics = (await api.get("/metrics")).text
    assert "ccbridge_auth_logins_started_total 1.0" in metrics
    assert 'ccbridge_auth_exchanges_total{outcome="connected"} 1.0' in metrics
    assert 'ccbridge_auth_exchanges_total{outcome="invalid_code_format"} 1.0' in metrics
    assert 'ccbridge_auth_exchanges_total{outcome="invalid_state"} 1.0' in metrics


async def test_openapi_documents_routes_with_examples(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    assert {"/v1/claude-code/login", "/v1/claude-code/exchange", "/v1/claude-code/token", "/v1/claude-code/status",
            "/v1/claude-code", "/user-settings/mcp/claude-code", "/connect", "/healthz", "/readyz",
            "/metrics"} <= set(spec["paths"])
    assert [m for m in openapi_examples_missing(spec) if "/boom" not in m] == []
    schemas = spec["components"]["schemas"]
    assert schemas["ExchangeIn"]["examples"][0]["code"].count("#") == 1
    assert "examples" in schemas["ConnectedOut"] and "examples" in schemas["LoginStartedOut"]
    assert "401" in spec["paths"]["/v1/claude-code/exchange"]["post"]["responses"]
    assert (await api.get("/docs")).status_code == 200


async def test_not_started_is_503() -> None:
    app = build_api()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://auth") as client:
        assert_problem(await client.post("/v1/claude-code/login", headers=auth()), 503, "starting")
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200


def test_settings_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_HOST", "0.0.0.0")
    monkeypatch.setenv("AUTH_PORT", "0")
    monkeypatch.setenv("AUTH_JWT_SECRET", "z" * 40)
    monkeypatch.setenv("OAUTH_AUTHORIZE_URL", "http://a/authorize")
    monkeypatch.setenv("OAUTH_TOKEN_URL", "http://a/token")
    monkeypatch.setenv("OAUTH_REDIRECT_URI", "http://a/cb")
    monkeypatch.setenv("OAUTH_CLIENT_ID", "cid")
    monkeypatch.setenv("OAUTH_SCOPES", "  user:inference   user:profile ")
    monkeypatch.setenv("VAULT_PUBLIC_KEY", "")
    monkeypatch.setenv("OAUTH_HTTP_TIMEOUT", "2.5")
    monkeypatch.setenv("OAUTH_TOKEN_URLS", " http://b/token , http://a/token,http://c/token ")
    monkeypatch.setenv("OAUTH_CONSOLE_AUTHORIZE_URL", "http://console/authorize")
    monkeypatch.setenv("OAUTH_LEGACY_REDIRECT_URI", "http://old/cb")
    monkeypatch.setenv("AUTH_JWT_AUDIENCE", "ccbridge")
    monkeypatch.setenv("AUTH_JWT_ISSUER", "https://idp.example")
    monkeypatch.setenv("AUTH_JWKS_URL", "http://127.0.0.1:1/jwks.json")
    monkeypatch.setenv("AUTH_JWT_ALGORITHMS", "ES256, EdDSA")
    monkeypatch.setenv("AUTH_LOGIN_TTL", "300")
    monkeypatch.setenv("AUTH_MAX_PENDING_LOGINS", "2")
    monkeypatch.setenv("AUTH_RATE_LIMIT_PER_MINUTE", "6")
    monkeypatch.setenv("AUTH_RATE_LIMIT_BURST", "3")
    monkeypatch.setenv("AUTH_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("AUTH_VAULT_TIMEOUT", "0.5")
    monkeypatch.setenv("AUTH_STATE_SECRET", "k" * 40)
    monkeypatch.setenv("AUTH_CONNECT_FRAME_ANCESTORS", "https://platform.example")
    settings = AuthSettings()
    assert settings.token_urls == ("http://a/token", "http://b/token", "http://c/token")  # OAUTH_TOKEN_URL first
    assert settings.oauth_console_authorize_url == "http://console/authorize"
    assert settings.legacy_redirect_uri == "http://old/cb"
    assert (settings.jwt_audience, settings.jwt_issuer) == ("ccbridge", "https://idp.example")
    assert settings.jwks_url == "http://127.0.0.1:1/jwks.json" and settings.asymmetric_algorithms == ("ES256", "EdDSA")
    assert (settings.login_ttl_s, settings.max_pending_logins, settings.max_body_bytes) == (300, 2, 4096)
    assert (settings.rate_limit_per_minute, settings.rate_limit_burst, settings.vault_timeout) == (6.0, 3, 0.5)
    assert settings.state_secret is not None and "k" * 40 not in repr(settings)
    assert settings.connect_frame_ancestors == "https://platform.example"
    assert (settings.host, settings.port, settings.oauth_client_id) == ("0.0.0.0", 0, "cid")
    assert settings.jwt_secret is not None and settings.jwt_secret.get_secret_value() == "z" * 40
    assert "z" * 40 not in repr(settings)
    assert settings.scopes == ("user:inference", "user:profile")
    assert settings.vault_public_key is None
    assert settings.oauth_http_timeout == 2.5
    assert (settings.oauth_authorize_url, settings.oauth_token_url, settings.oauth_redirect_uri) == (
        "http://a/authorize", "http://a/token", "http://a/cb"
    )


def test_settings_defaults_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith(("AUTH_", "OAUTH_"))] + ["VAULT_PUBLIC_KEY"]:
        monkeypatch.delenv(name, raising=False)
    settings = AuthSettings()
    assert (settings.host, settings.port, settings.jwt_secret) == ("127.0.0.1", 8000, None)
    assert settings.oauth_authorize_url == "https://claude.com/cai/oauth/authorize"
    assert settings.oauth_console_authorize_url == "https://platform.claude.com/oauth/authorize"
    assert settings.oauth_token_url is None
    assert settings.token_urls == (
        "https://platform.claude.com/v1/oauth/token", "https://console.anthropic.com/v1/oauth/token"
    )
    assert settings.legacy_redirect_uri == "https://platform.claude.com/oauth/code/callback"
    assert (settings.jwt_audience, settings.jwt_issuer, settings.jwt_public_key, settings.jwks_url) == (None,) * 4
    assert (settings.login_ttl_s, settings.max_pending_logins, settings.max_body_bytes) == (600, 5, 16384)
    assert (settings.rate_limit_per_minute, settings.rate_limit_burst, settings.vault_timeout) == (20.0, 10, 3.0)
    assert settings.connect_frame_ancestors == "'self'" and settings.jwt_leeway_s == 30.0
    assert settings.oauth_redirect_uri == "https://platform.claude.com/oauth/code/callback"
    assert settings.oauth_client_id == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    assert settings.scopes == (
        "user:profile", "user:inference", "user:sessions:claude_code", "user:mcp_servers", "user:file_upload"
    )
    assert settings.oauth_http_timeout == 10.0
    from pydantic import ValidationError

    monkeypatch.setenv("AUTH_JWT_SECRET", "too-short")
    with pytest.raises(ValidationError) as caught:
        AuthSettings()
    assert "too-short" not in str(caught.value)
    monkeypatch.delenv("AUTH_JWT_SECRET")
    monkeypatch.setenv("OAUTH_SCOPES", "user:profile")
    with pytest.raises(ValidationError):
        AuthSettings()


# --- the newer routes over ASGI (the integration tests repeat them over real HTTP) --------------
async def test_status_maps_the_vault_reply(api: httpx.AsyncClient, fakes) -> None:
    vault_status = fakes[3]
    vault_status.replies["user-1"] = ConnectionStatusReply(
        connected=True, state="refresh_failed", kind="oauth", scopes=["user:inference"],
        expires_at=1_767_225_600_000, refresh_token_expires_at=1_769_817_600_000,
        account=AccountInfo(email="a@example.com", organization_name="Org"), version=3,
    )
    body = (await api.get("/v1/claude-code/status", headers=auth())).json()
    assert body["user_id"] == "user-1"
    assert body["connected"] is True and body["state"] == "refresh_failed" and body["version"] == 3
    assert body["expires_at"].startswith("2026-01-01T00:00:00") and body["login_expires_at"].startswith("2026-01-31")
    assert body["account"]["email"] == "a@example.com"
    other = (await api.get("/v1/claude-code/status", headers=auth("nobody"))).json()
    assert other == {"user_id": "nobody", "connected": False, "state": "not_connected", "kind": None, "scopes": [],
                     "expires_at": None, "login_expires_at": None, "account": None, "version": None}
    vault_status.down = True
    response = await api.get("/v1/claude-code/status", headers=auth())
    assert_problem(response, 503, "vault-unavailable")
    assert response.headers["retry-after"]


async def test_disconnect_publishes_tokens_revoked(api: httpx.AsyncClient, fakes) -> None:
    response = await api.delete("/v1/claude-code", headers=auth("leaver"))
    assert response.status_code == 202
    [(subject, event)] = fakes[1].published
    assert subject == "tokens.revoked" and event.user_id == "leaver" and event.reason == "user_request"
    assert response.json() == {"status": "revoked", "event_id": event.event_id}


async def test_body_limit_is_a_413_problem(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": "x" * 9000})
    assert_problem(response, 413, "payload-too-large")

    async def chunks():
        for _ in range(10):
            yield b" " * 1000

    streamed = await api.post(
        "/v1/claude-code/exchange", headers={**auth(), "Content-Type": "application/json"}, content=chunks()
    )
    assert_problem(streamed, 413, "payload-too-large")


async def test_connect_page_is_served_without_a_token(api: httpx.AsyncClient) -> None:
    page = await api.get("/connect")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Connect Claude Code" in page.text
    assert "frame-ancestors 'self'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    js = await api.get("/connect/assets/connect.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert_problem(await api.get("/connect/assets/..%2Fapp.py"), 404)
    assert_problem(await api.get("/connect/assets/nope.js"), 404)
