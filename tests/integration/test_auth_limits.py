"""Abuse limits over real HTTP: per-caller rate limits, the request body limit, and the cap on
pending logins (held in NATS KV, so it holds across replicas)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from services.auth.app import AuthService
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.auth_fixtures import (
    JWT_SECRET,
    AuthProcess,
    assert_problem,
    bearer,
    begin,
    clean_env,
    exchange,
    new_user,
    settings_for,
)


async def test_login_and_exchange_are_rate_limited_per_caller(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    settings = settings_for(nats_url, tmp_path, standin, vault_key, rate_limit_per_minute=1, rate_limit_burst=3,
                            max_pending_logins=50)
    async with AuthService(settings) as auth:
        url = f"{auth.base_url}/v1/claude-code/login"
        user = new_user()
        assert [(await http.post(url, headers=bearer(user))).status_code for _ in range(3)] == [201, 201, 201]
        limited = await http.post(url, headers=bearer(user))
        body = assert_problem(limited, 429, "rate-limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60 and body["detail"]
        assert (await http.post(url, headers=bearer(new_user()))).status_code == 201  # others are not affected

        # exchange (and the other connect routes) have their own bucket
        paste = {"code": "not-issued-code#" + "s" * 43}
        codes = [(await http.post(f"{auth.base_url}/v1/claude-code/exchange", headers=bearer(user), json=paste))
                 .status_code for _ in range(3)]
        assert codes == [400, 400, 400]
        for path, body_json in (
            ("/v1/claude-code/exchange", paste),
            ("/v1/claude-code/token", {"token": "sk-ant-oat01-" + "x" * 40}),
            ("/user-settings/mcp/claude-code", {"authorization_code": "c#" + "v" * 43}),
        ):
            assert_problem(await http.post(auth.base_url + path, headers=bearer(user), json=body_json), 429,
                           "rate-limited")
        assert standin.state.stats["token:authorization_code"] == 0
        # status and disconnect are not connect attempts
        assert (await http.delete(f"{auth.base_url}/v1/claude-code", headers=bearer(user))).status_code == 202
        metrics = (await http.get(f"{auth.base_url}/metrics")).text
        assert 'ccbridge_auth_rejections_total{reason="rate_limited"} 4.0' in metrics


async def test_request_bodies_are_limited(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    async with AuthService(settings_for(nats_url, tmp_path, standin, vault_key, max_body_bytes=2048)) as auth:
        url = f"{auth.base_url}/v1/claude-code/exchange"
        user = new_user()
        big = await http.post(url, headers=bearer(user), json={"code": "x" * 3000})
        body = assert_problem(big, 413, "payload-too-large")
        assert "2048" in body["detail"] and "xxxx" not in big.text

        async def chunked():
            for _ in range(8):
                yield b" " * 512

        streamed = await http.post(url, headers={**bearer(user), "Content-Type": "application/json"}, content=chunked())
        assert_problem(streamed, 413, "payload-too-large")
        for path in ("/v1/claude-code/login", "/v1/claude-code/token", "/user-settings/mcp/claude-code"):
            assert_problem(await http.post(auth.base_url + path, headers=bearer(user), content=b"{" * 5000), 413)
        small = await http.post(url, headers=bearer(user), json={"code": "x" * 1000})
        assert small.status_code == 400  # under the limit: an ordinary answer
        assert (await http.get(f"{auth.base_url}/healthz")).status_code == 200  # the server is fine


async def test_pending_logins_are_capped_per_caller_across_replicas(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    async with (
        AuthService(settings_for(nats_url, tmp_path / "a", standin, vault_key, max_pending_logins=2)) as a,
        AuthService(settings_for(nats_url, tmp_path / "b", standin, vault_key, max_pending_logins=2)) as b,
    ):
        user = new_user()
        first = await begin(http, a.base_url, user)
        await begin(http, b.base_url, user)
        capped = await http.post(f"{a.base_url}/v1/claude-code/login", headers=bearer(user))
        body = assert_problem(capped, 429, "too-many-pending-logins")
        assert 500 <= int(capped.headers["retry-after"]) <= 600 and body["detail"]
        assert_problem(await http.post(f"{b.base_url}/v1/claude-code/login", headers=bearer(user)), 429,
                       "too-many-pending-logins")
        assert (await http.post(f"{b.base_url}/v1/claude-code/login", headers=bearer(new_user()))).status_code == 201

        assert (await exchange(http, b.base_url, user, first)).status_code == 202  # one done: room for another
        assert (await http.post(f"{a.base_url}/v1/claude-code/login", headers=bearer(user))).status_code == 201


async def test_racing_logins_never_exceed_the_cap(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    async with (
        AuthService(settings_for(nats_url, tmp_path / "a", standin, vault_key, max_pending_logins=3)) as a,
        AuthService(settings_for(nats_url, tmp_path / "b", standin, vault_key, max_pending_logins=3)) as b,
    ):
        user = new_user()
        results = await asyncio.gather(*(
            http.post(f"{(a, b)[i % 2].base_url}/v1/claude-code/login", headers=bearer(user)) for i in range(8)
        ))
        codes = sorted(r.status_code for r in results)
        assert codes.count(201) == 3, codes
        assert all(code in (201, 429) for code in codes), [r.text for r in results]


def test_an_oversized_body_always_gets_its_413(nats_url: str, tmp_path: Path) -> None:
    """A paste far over the limit, to the real process over real sockets: the client must read the
    413 every time, never a reset connection (the service drains the body before it answers)."""
    from ccbridge.embedded_nats import free_port
    from shared.sealing import load_or_create_keypair

    load_or_create_keypair(tmp_path / "keys", "vault")
    env = clean_env(NATS_URL=nats_url, CCBRIDGE_DATA_DIR=str(tmp_path), AUTH_PORT=str(free_port()),
                    LOG_FORMAT="json", AUTH_JWT_SECRET=JWT_SECRET)
    with AuthProcess(env, tmp_path / "auth.log") as auth:
        url = f"{auth.base_url}/v1/claude-code/exchange"
        outcomes: list[object] = []

        def post(client: httpx.Client, size: int) -> None:
            try:
                response = client.post(url, headers=bearer(new_user()), json={"code": "x" * size})
            except httpx.TransportError as exc:
                outcomes.append(type(exc).__name__)
                return
            outcomes.append(response.status_code)
            assert_problem(response, 413, "payload-too-large")

        for _ in range(30):  # a new connection each time, as a browser paste would
            with httpx.Client(timeout=20) as client:
                post(client, 200_000)
        with httpx.Client(timeout=20) as client:  # one kept-alive connection, bigger bodies
            for _ in range(10):
                post(client, 2_000_000)
        assert outcomes == [413] * 40, outcomes
        with httpx.Client(timeout=20) as client:  # expect: 100-continue gets its answer before sending
            response = client.post(url, headers={**bearer(new_user()), "Expect": "100-continue"}, json={"code": "x"})
            assert response.status_code == 400
        assert httpx.get(f"{auth.base_url}/healthz").status_code == 200
    refused = [line for line in auth.lines() if line.get("event") == "request body refused"]
    assert len(refused) == 40 and all(line["drained"] for line in refused)
