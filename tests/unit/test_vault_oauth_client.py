"""The refresher's token-endpoint client (services.vault.adapters.oauth) on httpx's
MockTransport: the exact request the real CLI sends, and how every answer is classified."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from services.vault.adapters.oauth import HttpTokenEndpoint, parse_retry_after
from services.vault.errors import RefreshRejected, RefreshTransient

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
URL = "https://platform.claude.com/v1/oauth/token"


def _endpoint(handler: Any) -> HttpTokenEndpoint:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpTokenEndpoint(token_url=URL, client_id=CLIENT_ID, client=client)


async def test_the_request_is_exactly_the_cli_refresh() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={
            "access_token": "new-at", "refresh_token": "new-rt", "expires_in": 28800,
            "scope": "user:inference user:profile", "refresh_token_expires_in": 100,
            "account": {"uuid": "acc-1", "email_address": "p@example.com"},
            "organization": {"uuid": "org-1", "name": "Org"},
        })

    response = await _endpoint(handler).refresh("old-rt", ("user:inference", "user:profile"))

    [request] = seen
    assert (request.method, str(request.url)) == ("POST", URL)
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {
        "grant_type": "refresh_token", "refresh_token": "old-rt", "client_id": CLIENT_ID,
        "scope": "user:inference user:profile",
    }
    assert (response.access_token, response.refresh_token, response.expires_in) == ("new-at", "new-rt", 28800)
    assert response.scope == "user:inference user:profile" and response.refresh_token_expires_in == 100
    assert response.account == {"account_uuid": "acc-1", "email": "p@example.com", "organization_uuid": "org-1",
                                "organization_name": "Org"}
    assert "new-at" not in repr(response) and "new-rt" not in repr(response)


@pytest.mark.parametrize("status", [400, 401])
async def test_invalid_grant_is_rejected(status: int) -> None:
    endpoint = _endpoint(lambda r: httpx.Response(status, json={"error": "invalid_grant",
                                                                "error_description": "Invalid refresh token."}))
    with pytest.raises(RefreshRejected):
        await endpoint.refresh("rt", ("user:inference",))


@pytest.mark.parametrize(
    ("response", "outcome", "retry_after"),
    [
        (httpx.Response(429, headers={"Retry-After": "7"}, json={"error": "rate_limit_error"}), "rate_limited", 7.0),
        (httpx.Response(503, json={"error": "server_error"}), "upstream_error", None),
        (httpx.Response(500, text="<html>oops</html>"), "upstream_error", None),
        (httpx.Response(200, json={"access_token": ""}), "bad_response", None),
        (httpx.Response(200, text="not json"), "bad_response", None),
        (httpx.Response(404, json={"error": "not_found"}), "rejected", None),
        (httpx.Response(400, json={"error": "invalid_client"}), "rejected", None),
    ],
)
async def test_everything_else_is_transient(response: httpx.Response, outcome: str, retry_after: float | None) -> None:
    endpoint = _endpoint(lambda r: response)
    with pytest.raises(RefreshTransient) as info:
        await endpoint.refresh("rt-secret-value", ("user:inference",))
    assert (info.value.outcome, info.value.retry_after_s) == (outcome, retry_after)
    assert info.value.retryable and "rt-secret-value" not in str(info.value)


@pytest.mark.parametrize(("exc", "outcome"), [(httpx.ReadTimeout("slow"), "timeout"),
                                              (httpx.ConnectError("refused"), "upstream_error")])
async def test_network_failures_are_transient(exc: Exception, outcome: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(RefreshTransient) as info:
        await _endpoint(handler).refresh("rt", ())
    assert info.value.outcome == outcome


def test_retry_after_parsing() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("999999") == 3600.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 60) == 60.0
