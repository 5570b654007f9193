"""The token-endpoint adapter: the exact request, and every failure mapped to a typed error."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from services.auth.adapters.oauth_client import HttpOAuthClient, parse_retry_after
from services.auth.domain import CodeExchange
from services.auth.errors import (
    InvalidCode,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)

TOKEN_URL = "https://platform.example/v1/oauth/token"
REQUEST = CodeExchange(
    code="the-code", code_verifier="v" * 64, state="the-state-0123456789", redirect_uri="https://cb.example/cb",
    client_id="client-1",
)
GOOD = {
    "access_token": "sk-ant-oat01-abc",
    "refresh_token": "sk-ant-ort01-def",
    "expires_in": 28800,
    "refresh_token_expires_in": 2592000,
    "scope": "user:profile user:inference",
    "token_type": "Bearer",
    "account": {"uuid": "acc", "email_address": "a@example.com"},
    "organization": {"uuid": "org", "name": "Org"},
}


def client_answering(handler) -> HttpOAuthClient:
    return HttpOAuthClient(token_url=TOKEN_URL, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def test_request_is_what_the_real_cli_sends() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=GOOD)

    grant = await client_answering(handler).exchange_code(REQUEST)
    [request] = seen
    assert request.method == "POST" and str(request.url) == TOKEN_URL
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "redirect_uri": "https://cb.example/cb",
        "client_id": "client-1",
        "code_verifier": "v" * 64,
        "state": "the-state-0123456789",
    }
    assert grant.access_token == "sk-ant-oat01-abc" and grant.refresh_token == "sk-ant-ort01-def"
    assert grant.expires_in == 28800 and grant.refresh_token_expires_in == 2592000
    assert grant.scopes == ("user:profile", "user:inference")
    assert (grant.account_uuid, grant.email, grant.organization_uuid, grant.organization_name) == (
        "acc", "a@example.com", "org", "Org"
    )
    assert "sk-ant" not in repr(grant)


async def test_minimal_response_is_enough() -> None:
    grant = await client_answering(
        lambda r: httpx.Response(200, json={"access_token": "a", "expires_in": 60})
    ).exchange_code(REQUEST)
    assert grant.refresh_token is None and grant.scopes is None and grant.account_uuid is None


@pytest.mark.parametrize(
    ("response", "error", "status"),
    [
        (httpx.Response(400, json={"error": "invalid_grant", "error_description": "Invalid 'code'"}), InvalidCode, 400),
        (httpx.Response(401, json={"error": {"type": "authentication_error"}}), InvalidCode, 400),
        (httpx.Response(400, json={"error": "invalid_request", "error_description": "Invalid request format"}),
         InvalidCode, 400),
        (httpx.Response(403, text="<html>forbidden</html>"), InvalidCode, 400),
        (httpx.Response(429, headers={"Retry-After": "42"}), UpstreamRateLimited, 503),
        (httpx.Response(500, text="boom"), UpstreamUnavailable, 502),
        (httpx.Response(503, json={"error": "overloaded"}), UpstreamUnavailable, 502),
        (httpx.Response(404, text="not found"), UpstreamBadResponse, 502),
        (httpx.Response(302, headers={"Location": "https://elsewhere.example"}), UpstreamBadResponse, 502),
        (httpx.Response(200, text="<html>login</html>"), UpstreamBadResponse, 502),
        (httpx.Response(200, json=["a", "list"]), UpstreamBadResponse, 502),
        (httpx.Response(200, json={"refresh_token": "x", "expires_in": 60}), UpstreamBadResponse, 502),
        (httpx.Response(200, json={"access_token": "", "expires_in": 60}), UpstreamBadResponse, 502),
        (httpx.Response(200, json={"access_token": "a", "expires_in": "soon"}), UpstreamBadResponse, 502),
        (httpx.Response(200, json={"access_token": "a", "expires_in": -5}), UpstreamBadResponse, 502),
        (httpx.Response(200, json={"access_token": 123, "expires_in": 60}), UpstreamBadResponse, 502),
    ],
)
async def test_response_mapping(response: httpx.Response, error: type[UpstreamError], status: int) -> None:
    with pytest.raises(error) as caught:
        await client_answering(lambda r: response).exchange_code(REQUEST)
    assert caught.value.status == status


async def test_rate_limit_passes_retry_after_on() -> None:
    with pytest.raises(UpstreamRateLimited) as caught:
        await client_answering(lambda r: httpx.Response(429, headers={"Retry-After": "42"})).exchange_code(REQUEST)
    assert caught.value.headers["Retry-After"] == "42"


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (httpx.ConnectError("refused"), UpstreamUnavailable),
        (httpx.ConnectTimeout("slow connect"), UpstreamTimeout),
        (httpx.ReadTimeout("slow read"), UpstreamTimeout),
        (httpx.RemoteProtocolError("garbage"), UpstreamUnavailable),
    ],
)
async def test_transport_failures(exc: Exception, error: type[UpstreamError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(error) as caught:
        await client_answering(handler).exchange_code(REQUEST)
    assert caught.value.retryable
    assert caught.value.__cause__ is None  # nothing of the transport's message rides along


async def test_leaky_bodies_never_reach_the_error() -> None:
    leaked = "sk-ant-oat01-LEAKED-IN-A-BAD-RESPONSE"
    for response in (
        httpx.Response(200, json={"access_token": leaked, "expires_in": "x"}),
        httpx.Response(400, json={"error": "invalid_grant", "error_description": leaked}),
        httpx.Response(500, text=leaked),
    ):
        with pytest.raises(UpstreamError) as caught:
            await client_answering(lambda r, resp=response: resp).exchange_code(REQUEST)
        assert leaked not in str(caught.value) and leaked not in repr(caught.value.__context__ or "")
        assert caught.value.__cause__ is None


def test_retry_after_parsing() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) == 30
    assert parse_retry_after("soon") == 30
    assert parse_retry_after("0") == 1
    assert parse_retry_after("999999") == 3600
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90)), now=now.timestamp()) == 90


# --- several token endpoints: the next one only after a 404 -------------------------------------
URLS = ("https://new.example/v1/oauth/token", "https://old.example/v1/oauth/token")


def client_over(handler, urls=URLS) -> HttpOAuthClient:
    return HttpOAuthClient(token_urls=urls, client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def test_a_404_moves_on_to_the_next_endpoint() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "new.example":
            return httpx.Response(404, text="no such route")
        return httpx.Response(200, json=GOOD)

    grant = await client_over(handler).exchange_code(REQUEST)
    assert grant.access_token == GOOD["access_token"]
    assert seen == list(URLS)


@pytest.mark.parametrize(
    ("first", "error"),
    [
        (httpx.Response(400, json={"error": "invalid_grant"}), InvalidCode),
        (httpx.Response(401, json={"error": "invalid_grant"}), InvalidCode),
        (httpx.Response(429, headers={"Retry-After": "5"}), UpstreamRateLimited),
        (httpx.Response(500, text="boom"), UpstreamUnavailable),
        (httpx.Response(502, text="bad gateway"), UpstreamUnavailable),
        (httpx.Response(200, text="not json"), UpstreamBadResponse),
        (httpx.Response(405, text="method"), UpstreamBadResponse),
    ],
)
async def test_any_other_answer_never_reaches_the_next_endpoint(first: httpx.Response, error: type) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return first if request.url.host == "new.example" else httpx.Response(200, json=GOOD)

    with pytest.raises(error):
        await client_over(handler).exchange_code(REQUEST)
    assert seen == ["new.example"]  # the code was seen by a server: never sent again


@pytest.mark.parametrize("exc", [httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), httpx.ReadError("reset")])
async def test_transport_failures_are_not_retried_elsewhere(exc: Exception) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        raise exc

    with pytest.raises(UpstreamError):
        await client_over(handler).exchange_code(REQUEST)
    assert seen == ["new.example"]


async def test_all_404_is_a_bad_response_naming_the_setting() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(404)

    with pytest.raises(UpstreamBadResponse) as caught:
        await client_over(handler).exchange_code(REQUEST)
    assert seen == ["new.example", "old.example"]
    assert "OAUTH_TOKEN_URL" in caught.value.detail and caught.value.status == 502


def test_token_urls_are_deduplicated_in_order() -> None:
    client = HttpOAuthClient(token_url=URLS[1], token_urls=[URLS[0], URLS[1]])
    assert client.token_urls == (URLS[1], URLS[0])
    with pytest.raises(ValueError):
        HttpOAuthClient()


@pytest.fixture
def stdlib_logs():
    import logging

    import structlog

    from shared.logging import configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, structlog.get_config(), logging.getLogger("httpx").level)
    configure_logging("DEBUG", "json", service="auth-test")
    yield
    root.handlers[:], level, config, httpx_level = saved
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)
    structlog.configure(**config)
    structlog.contextvars.unbind_contextvars("service")


async def test_logs_carry_status_and_error_names_never_bodies(stdlib_logs, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    leak = "secret-detail-in-the-body-0123456789"

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "new.example":
            return httpx.Response(404, text=leak)
        return httpx.Response(400, json={"error": "invalid_grant", "error_description": leak})

    with pytest.raises(InvalidCode):
        await client_over(handler).exchange_code(REQUEST)
    events = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    refused = next(e for e in events if e["event"] == "token endpoint refused the grant")
    assert refused["status"] == 400 and refused["error"] == "invalid_grant"
    assert any(e["event"] == "token endpoint not found" and e["status"] == 404 for e in events)
    text = "\n".join(repr(r.__dict__) for r in caplog.records)
    assert leak not in text and "the-code" not in text and "v" * 64 not in text


@pytest.mark.parametrize(
    ("response", "oauth_error"),
    [
        (httpx.Response(400, json={"error": "invalid_grant"}), "invalid_grant"),
        (httpx.Response(400, json={"error": "invalid_request"}), "invalid_request"),
        (httpx.Response(403, text="<html>forbidden</html>"), None),
    ],
)
async def test_a_refused_code_names_the_oauth_error(response: httpx.Response, oauth_error: str | None) -> None:
    """The login use case keeps a login after invalid_grant (a typo) only: it needs the name."""
    transport = httpx.MockTransport(lambda request: response)
    client = HttpOAuthClient(token_url=TOKEN_URL, client=httpx.AsyncClient(transport=transport))
    with pytest.raises(InvalidCode) as caught:
        await client.exchange_code(REQUEST)
    assert caught.value.oauth_error == oauth_error
