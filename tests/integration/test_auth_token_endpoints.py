"""The configurable list of token endpoints over real HTTP: the next one only on 404, a code
never sent again once a server may have seen it, and every failure mapped to a problem."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.auth.app import AuthService
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.auth_fixtures import (
    assert_problem,
    begin,
    exchange,
    new_user,
    settings_for,
)


def two_endpoints(standin: OAuthStandin) -> str:
    """Two URLs for the same stand-in (the query keeps them distinct): 'current' and 'older'."""
    return f"{standin.token_url}?endpoint=current,{standin.token_url}?endpoint=older"


@pytest.fixture
async def auth(nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair):
    settings = settings_for(nats_url, tmp_path, standin, vault_key, oauth_token_url=None,
                            oauth_token_urls=two_endpoints(standin))
    async with AuthService(settings) as service:
        yield service


async def test_a_404_falls_back_to_the_next_endpoint(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    standin.state.fail_next(404, body={"type": "error", "error": {"type": "not_found_error"}})
    response = await exchange(http, auth.base_url, user, pasted)
    assert response.status_code == 202, response.text
    assert standin.state.stats["token:injected_failure"] == 1
    assert standin.state.stats["token:authorization_code:ok"] == 1


@pytest.mark.parametrize(
    ("status", "problem_status", "slug"),
    [(500, 502, "upstream-error"), (503, 502, "upstream-error"), (429, 503, "upstream-rate-limited"),
     (401, 400, "invalid-code"), (405, 502, "upstream-bad-response")],
)
async def test_other_failures_never_reach_the_next_endpoint(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient, status: int, problem_status: int, slug: str
) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    standin.state.fail_next(status, body={"error": "invalid_grant"} if status == 401 else None)
    response = await exchange(http, auth.base_url, user, pasted)
    assert_problem(response, problem_status, slug)
    assert standin.state.stats["token:authorization_code"] == 1  # one request: the code went out once
    if status == 429:
        assert response.headers["retry-after"] == "7"


async def test_every_endpoint_404_is_a_502_naming_the_setting(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    standin.state.fail_next(404, times=2, body="<html>Not Found</html>")
    body = assert_problem(await exchange(http, auth.base_url, user, pasted), 502, "upstream-bad-response")
    assert "OAUTH_TOKEN_URL" in body["detail"]
    assert standin.state.stats["token:injected_failure"] == 2

