"""The OAuth stand-in over real HTTP: authorize → callback page → token, refresh rotation,
validation and failure injection."""

from __future__ import annotations

import asyncio
import html
import re
import secrets
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from standins.oauth import REAL_CLIENT_ID, OAuthStandin, s256

PASTE = re.compile(r'<code id="paste-code">([^<]+)</code>')
SCOPES = "user:profile user:inference user:sessions:claude_code"


def authorize_query(
    standin: OAuthStandin, verifier: str, state: str, overrides: dict[str, str | None] | None = None
) -> str:
    params: dict[str, str | None] = {
        "code": "true",
        "client_id": REAL_CLIENT_ID,
        "response_type": "code",
        "redirect_uri": standin.callback_url,
        "scope": SCOPES,
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
        "state": state,
    }
    params.update(overrides or {})
    return standin.authorize_url + "?" + urlencode({k: v for k, v in params.items() if v is not None})


async def authorize(http: httpx.AsyncClient, standin: OAuthStandin, verifier: str, state: str) -> str:
    page = await http.get(authorize_query(standin, verifier, state), follow_redirects=True)
    assert page.status_code == 200
    match = PASTE.search(page.text)
    assert match, page.text
    code, _, pasted_state = html.unescape(match.group(1)).partition("#")
    assert pasted_state == state
    return code


def exchange_body(standin: OAuthStandin, code: str, verifier: str, state: str) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": standin.callback_url,
        "client_id": REAL_CLIENT_ID,
        "code_verifier": verifier,
        "state": state,
    }


async def test_authorize_redirects_with_code_and_state(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    response = await http.get(authorize_query(standin, verifier, state))
    assert response.status_code == 302
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == standin.callback_url
    query = parse_qs(location.query)
    assert query["state"] == [state]
    assert len(query["code"][0]) >= 32


async def test_full_code_flow_issues_anthropic_shaped_tokens(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    code = await authorize(http, standin, verifier, state)
    response = await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["access_token"].startswith("sk-ant-oat01-")
    assert body["refresh_token"].startswith("sk-ant-ort01-")
    assert body["expires_in"] == 28800
    assert body["refresh_token_expires_in"] > 2_500_000
    assert body["token_type"] == "Bearer"
    assert body["scope"].split() == SCOPES.split()
    assert {"uuid", "email_address"} <= set(body["account"])
    assert {"uuid", "name"} <= set(body["organization"])
    profile = await http.get(
        standin.base_url + "/api/oauth/profile", headers={"Authorization": f"Bearer {body['access_token']}"}
    )
    assert profile.status_code == 200
    assert profile.json()["account"]["uuid"] == body["account"]["uuid"]


async def test_code_is_single_use(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    code = await authorize(http, standin, verifier, state)
    first = await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))
    second = await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))
    assert first.status_code == 200
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("code_verifier", secrets.token_urlsafe(64)),
        ("redirect_uri", "http://127.0.0.1:1/elsewhere"),
        ("state", secrets.token_urlsafe(32)),
        ("client_id", "00000000-0000-0000-0000-000000000000"),
        ("code", "not-a-code-we-issued"),
    ],
)
async def test_mismatches_are_invalid_grant(
    standin: OAuthStandin, http: httpx.AsyncClient, field: str, value: str
) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    code = await authorize(http, standin, verifier, state)
    body = exchange_body(standin, code, verifier, state) | {field: value}
    response = await http.post(standin.token_url, json=body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("missing", ["state", "code_verifier", "code", "redirect_uri", "client_id"])
async def test_missing_field_is_invalid_request_format(
    standin: OAuthStandin, http: httpx.AsyncClient, missing: str
) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    code = await authorize(http, standin, verifier, state)
    body = exchange_body(standin, code, verifier, state)
    del body[missing]
    response = await http.post(standin.token_url, json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "error_description": "Invalid request format"}


async def test_token_endpoint_is_json_only(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    code = await authorize(http, standin, verifier, state)
    form = await http.post(standin.token_url, data=exchange_body(standin, code, verifier, state))
    assert form.status_code == 400
    assert form.json()["error_description"] == "Invalid request format"
    garbage = await http.post(standin.token_url, content=b"{nope", headers={"Content-Type": "application/json"})
    assert garbage.status_code == 400
    # the form attempt did not burn the code
    ok = await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))
    assert ok.status_code == 200


async def test_code_expires(http: httpx.AsyncClient) -> None:
    async with OAuthStandin(port=0, code_lifetime=0.0) as standin:
        verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
        code = await authorize(http, standin, verifier, state)
        response = await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


async def test_refresh_rotates_and_old_token_dies(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    code = await authorize(http, standin, verifier, state)
    issued = (await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))).json()
    refresh = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"], "client_id": REAL_CLIENT_ID}
    first = await http.post(standin.token_url, json=refresh | {"scope": "user:inference"})
    assert first.status_code == 200, first.text
    renewed = first.json()
    assert renewed["refresh_token"] != issued["refresh_token"]
    assert renewed["access_token"] != issued["access_token"]
    assert renewed["scope"] == "user:inference"
    replay = await http.post(standin.token_url, json=refresh)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    again = await http.post(standin.token_url, json=refresh | {"refresh_token": renewed["refresh_token"]})
    assert again.status_code == 200


async def test_refresh_cannot_widen_scope(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    code = await authorize(http, standin, verifier, state)
    issued = (await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))).json()
    refresh = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"], "client_id": REAL_CLIENT_ID}
    wider = await http.post(standin.token_url, json=refresh | {"scope": "org:create_api_key"})
    assert wider.status_code == 400
    assert wider.json()["error"] == "invalid_scope"
    assert (await http.post(standin.token_url, json=refresh)).status_code == 200  # refused request rotated nothing


@pytest.mark.parametrize(
    "override",
    [
        {"client_id": "someone-else"},
        {"code_challenge_method": "plain"},
        {"response_type": "token"},
        {"state": None},
        {"code_challenge": None},
        {"scope": "user:inference admin:everything"},
        {"redirect_uri": "not a uri"},
        {"code": None},
    ],
)
async def test_authorize_rejects_bad_queries(standin: OAuthStandin, http: httpx.AsyncClient, override: dict) -> None:
    url = authorize_query(standin, secrets.token_urlsafe(64), secrets.token_urlsafe(32), override)
    page = await http.get(url)
    assert page.status_code == 400
    assert "paste-code" not in page.text
    as_json = await http.get(url, headers={"Accept": "application/json"})
    assert as_json.status_code == 400
    assert as_json.json()["error"] == "invalid_request"


async def test_callback_page_escapes_what_it_shows(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    page = await http.get(standin.callback_url, params={"code": "<b>x</b>", "state": "s&t"})
    assert page.status_code == 200
    assert '<code id="paste-code">&lt;b&gt;x&lt;/b&gt;#s&amp;t</code>' in page.text


async def test_canary_access_token_and_failure_injection(http: httpx.AsyncClient) -> None:
    canary = f"sk-ant-oat01-CANARY{secrets.token_hex(8)}"
    async with OAuthStandin(port=0, access_token_factory=lambda: canary, access_token_lifetime=60) as standin:
        standin.state.fail_next(429, times=1)
        injected = await http.post(
            standin.base_url + "/_standin/failures", json={"status": 503, "times": 1, "body": "down"}
        )
        assert injected.json() == {"pending_failures": 2}
        verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
        code = await authorize(http, standin, verifier, state)
        body = exchange_body(standin, code, verifier, state)
        limited = await http.post(standin.token_url, json=body)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "7"
        down = await http.post(standin.token_url, json=body)
        assert (down.status_code, down.text) == (503, "down")
        ok = await http.post(standin.token_url, json=body)  # injected failures did not consume the code
        assert ok.status_code == 200
        assert ok.json()["access_token"] == canary
        assert ok.json()["expires_in"] == 60
        stats = (await http.get(standin.stats_url)).json()
    assert stats["requests"]["token:authorization_code"] == 3
    assert stats["requests"]["token:injected_failure"] == 2
    assert stats["requests"]["token:authorization_code:ok"] == 1
    assert stats["pending_failures"] == 0


async def test_an_outage_answers_the_token_and_revoke_endpoints_until_it_ends(
    standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    body = exchange_body(standin, await authorize(http, standin, verifier, state), verifier, state)
    started = await http.post(standin.base_url + "/_standin/outage",
                              json={"seconds": 30, "status": 503, "retry_after": 2})
    assert started.json()["outage_s_left"] > 0
    for _ in range(3):
        down = await http.post(standin.token_url, json=body)
        assert down.status_code == 503
        assert down.headers["retry-after"] == "2"
        assert down.json()["error"] == "server_error"
    revoke = {"token": "sk-ant-ort01-x", "token_type_hint": "refresh_token", "client_id": REAL_CLIENT_ID}
    assert (await http.post(standin.token_url + "/revoke", json=revoke)).status_code == 503
    await http.post(standin.base_url + "/_standin/outage", json={"seconds": 0})
    assert (await http.post(standin.token_url, json=body)).status_code == 200  # the code survived the outage

    standin.state.outage(0.3, status=429)  # a window ends by itself
    assert (await http.post(standin.token_url + "/revoke", json=revoke)).status_code == 429
    await asyncio.sleep(0.4)
    assert (await http.post(standin.token_url + "/revoke", json=revoke)).status_code == 200
    assert standin.state.stats["outage"] == 5
    bad = await http.post(standin.base_url + "/_standin/outage", json={"status": 503})
    assert bad.status_code == 400


async def test_other_client_id_is_configurable(http: httpx.AsyncClient) -> None:
    async with OAuthStandin(port=0, client_id="my-client") as standin:
        verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
        page = await http.get(authorize_query(standin, verifier, state, {"client_id": "my-client"}))
        assert page.status_code == 302
        real = await http.get(authorize_query(standin, verifier, state))
        assert real.status_code == 400


async def test_stop_releases_the_port(http: httpx.AsyncClient) -> None:
    standin = OAuthStandin(port=0)
    await standin.start()
    url = standin.stats_url
    assert (await http.get(url)).status_code == 200
    await standin.stop()
    with pytest.raises(httpx.TransportError):
        await http.get(url)


async def test_both_account_type_paths_authorize_and_are_counted(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    query = authorize_query(standin, verifier, state).split("?", 1)[1]
    for url in (standin.claude_ai_authorize_url, standin.console_authorize_url):
        response = await http.get(f"{url}?{query}")
        assert response.status_code == 302
    assert standin.state.stats["authorize:/cai/oauth/authorize"] == 1
    assert standin.state.stats["authorize:/oauth/authorize"] == 1
    paths = sorted(grant.authorize_path for grant in standin.state.grants.values())
    assert paths == ["/cai/oauth/authorize", "/oauth/authorize"]


async def test_seed_flow_with_the_verifier_as_state(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    """What seed-era clients did: state = verifier, so the page shows code#verifier; the exchange
    then carries the verifier as both code_verifier and state."""
    verifier = secrets.token_urlsafe(48)
    code = await authorize(http, standin, verifier, verifier)
    response = await http.post(standin.token_url, json=exchange_body(standin, code, verifier, verifier))
    assert response.status_code == 200, response.text
    assert response.json()["access_token"].startswith("sk-ant-oat01-")


async def test_create_api_key_scope_is_granted(standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    verifier, state = secrets.token_urlsafe(64), secrets.token_urlsafe(32)
    url = authorize_query(standin, verifier, state, {"scope": SCOPES + " org:create_api_key"})
    page = await http.get(url, follow_redirects=True)
    code = html.unescape(PASTE.search(page.text).group(1)).partition("#")[0]
    response = await http.post(standin.token_url, json=exchange_body(standin, code, verifier, state))
    assert "org:create_api_key" in response.json()["scope"].split()
