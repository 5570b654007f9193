"""The HTTP surface over ASGI with fake adapters: status codes, problem+json, no token ever."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from services.auth.adapters.pending_store import InMemoryPendingStore
from services.auth.app import build_api, utc_now
from services.auth.callers import CallerVerifier, mint_caller_token
from services.auth.errors import PROBLEM_CONTENT_TYPE, InvalidCode, UpstreamBadResponse, UpstreamRateLimited
from services.auth.login import LoginPolicy, LoginService
from services.auth.metrics import AuthMetrics
from services.auth.routes import AuthComponents
from services.auth.settings import AuthSettings
from shared.sealing import KeyPair
from tests.unit.test_auth_login import ACCESS, REFRESH, FakeOAuth, FakePublisher, FakeVaultKeys, a_grant

SECRET = "unit-test-secret-" + "x" * 32


@pytest.fixture
def fakes() -> tuple[FakeOAuth, FakePublisher, FakeVaultKeys]:
    return FakeOAuth(grant=a_grant()), FakePublisher(), FakeVaultKeys(KeyPair.generate().recipient)


@pytest.fixture
async def api(fakes) -> AsyncIterator[httpx.AsyncClient]:  # noqa: ANN001
    oauth, publisher, vault = fakes
    login = LoginService(
        policy=LoginPolicy("https://claude.example/authorize", "https://cb.example/cb", "client", ("user:inference",),
                           ttl=timedelta(minutes=10)),
        pending=InMemoryPendingStore(), oauth=oauth, vault_keys=vault, publisher=publisher, clock=utc_now,
    )

    async def readiness() -> dict[str, bool]:
        return {"bus": True, "vault_key": vault.current() is not None}

    app = build_api(AuthMetrics(), AuthComponents(login=login, callers=CallerVerifier(SECRET), readiness=readiness))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("internal detail sk-ant-oat01-should-not-leak")

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://auth") as client:
        yield client


def auth(user: str = "user-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_caller_token(SECRET, user)}"}


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if slug:
        assert body["type"].endswith("/" + slug)
    return body


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
async def test_upstream_errors_as_problems(api: httpx.AsyncClient, fakes, error, status: int, slug: str) -> None:  # noqa: ANN001
    fakes[0].error = error
    paste = await login_and_paste(api)
    response = await api.post("/v1/claude-code/exchange", headers=auth(), json={"code": paste})
    assert_problem(response, status, slug)
    if status == 503:
        assert response.headers["retry-after"] == "9"


async def test_vault_key_missing_is_503_and_not_ready(api: httpx.AsyncClient, fakes) -> None:  # noqa: ANN001
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
    assert {"/v1/claude-code/login", "/v1/claude-code/exchange", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
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
    settings = AuthSettings()
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
    for name in ("AUTH_HOST", "AUTH_PORT", "AUTH_JWT_SECRET", "OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL",
                 "OAUTH_REDIRECT_URI", "OAUTH_CLIENT_ID", "OAUTH_SCOPES", "VAULT_PUBLIC_KEY", "OAUTH_HTTP_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    settings = AuthSettings()
    assert (settings.host, settings.port, settings.jwt_secret) == ("127.0.0.1", 8000, None)
    assert settings.oauth_authorize_url == "https://claude.com/cai/oauth/authorize"
    assert settings.oauth_token_url == "https://platform.claude.com/v1/oauth/token"
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
