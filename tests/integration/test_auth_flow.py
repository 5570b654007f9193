"""The auth service for real: AuthService under uvicorn on a free port, a real nats-server with
JetStream, the OAuth stand-in over HTTP, httpx as the platform/browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from ccbridge.embedded_nats import EmbeddedNats
from services.auth.app import AuthParts, AuthService, CannotListen
from services.auth.callers import mint_caller_token
from shared import subjects
from shared.broker import settle
from shared.events import TokenBundle, TokensIssued
from shared.sealing import KeyPair, load_or_create_keypair, open_tokens
from standins.oauth import OAuthStandin
from tests.auth_fixtures import (
    JWT_SECRET,
    PROBLEM,
    assert_problem,
    bearer,
    begin,
    exchange,
    new_user,
    settings_for,
)


@pytest.fixture
async def auth(nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair) -> AsyncIterator[AuthService]:
    async with AuthService(settings_for(nats_url, tmp_path, standin, vault_key)) as service:
        yield service


@dataclass
class IssuedWatch:
    messages: asyncio.Queue

    async def for_user(self, user: str, timeout: float = 10.0) -> tuple[TokensIssued, dict[str, str]]:
        async def wait() -> tuple[TokensIssued, dict[str, str]]:
            while True:
                msg = await self.messages.get()
                event = TokensIssued.model_validate_json(msg.data)
                if event.user_id == user:
                    return event, dict(msg.headers or {})

        return await asyncio.wait_for(wait(), timeout)


@pytest.fixture
async def issued(nc: Client, auth: AuthService) -> AsyncIterator[IssuedWatch]:
    """tokens.issued as a JetStream consumer sees it (auth has provisioned the stream)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg) -> None:
        await queue.put(msg)

    sub = await nc.jetstream().subscribe(
        subjects.TOKENS_ISSUED,
        cb=on_msg,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    yield IssuedWatch(queue)
    await sub.unsubscribe()


# --- the happy path ----------------------------------------------------------------------
async def test_login_exchange_publishes_a_sealed_bundle_for_the_vault(
    auth: AuthService, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient, issued: IssuedWatch
) -> None:
    user = new_user()
    before_ms = int(datetime.now(UTC).timestamp() * 1000)
    pasted = await begin(http, auth.base_url, user)
    response = await exchange(http, auth.base_url, user, pasted)

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "connected"
    assert set(body) == {"status", "expires_at", "scopes"}
    assert "user:inference" in body["scopes"]
    issued_tokens = list(standin.state.access_tokens)
    assert len(issued_tokens) == 1
    assert issued_tokens[0] not in response.text
    assert "sk-ant-" not in response.text

    event, headers = await issued.for_user(user)
    assert headers[subjects.MSG_ID_HEADER] == event.event_id
    bundle = TokenBundle.model_validate_json(
        open_tokens(event, vault_key)
    )
    assert bundle.access_token == issued_tokens[0]
    assert bundle.refresh_token in standin.state.refresh_tokens  # the live one
    assert bundle.expires_at == event.expires_at
    assert before_ms + 28_800_000 <= bundle.expires_at <= before_ms + 28_800_000 + 60_000
    assert bundle.scopes == event.scopes == body["scopes"]
    assert event.refresh_token_expires_at is not None and event.refresh_token_expires_at > bundle.expires_at
    assert event.account is not None
    assert event.account.account_uuid == standin.state.account["uuid"]
    assert event.account.organization_name == standin.state.organization["name"]
    # the 202's expiry is the bundle's expiry
    assert int(datetime.fromisoformat(body["expires_at"]).timestamp() * 1000) == bundle.expires_at
    stats = standin.state.stats
    assert stats["token:authorization_code"] == 1 and stats["token:authorization_code:ok"] == 1


async def test_code_and_state_apart_with_whitespace(
    auth: AuthService, http: httpx.AsyncClient, issued: IssuedWatch
) -> None:
    user = new_user()
    code, _, state = (await begin(http, auth.base_url, user)).partition("#")
    response = await http.post(
        f"{auth.base_url}/v1/claude-code/exchange", headers=bearer(user), json={"code": f"  {code}\n", "state": state}
    )
    assert response.status_code == 202, response.text
    event, _ = await issued.for_user(user)
    assert event.user_id == user


# --- refusals ------------------------------------------------------------------------------
async def test_reusing_a_code_is_400(auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    assert (await exchange(http, auth.base_url, user, pasted)).status_code == 202
    assert_problem(await exchange(http, auth.base_url, user, pasted), 400, "invalid-state")
    assert standin.state.stats["token:authorization_code"] == 1  # the replay never reached the server


async def test_another_caller_gets_403_and_the_owner_still_succeeds(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    owner, intruder = new_user(), new_user()
    pasted = await begin(http, auth.base_url, owner)
    assert_problem(await exchange(http, auth.base_url, intruder, pasted), 403, "forbidden-state")
    assert standin.state.stats["token:authorization_code"] == 0
    assert (await exchange(http, auth.base_url, owner, pasted)).status_code == 202


@pytest.mark.parametrize("path", ["/v1/claude-code/login", "/v1/claude-code/exchange"])
async def test_missing_or_invalid_jwt_is_401(auth: AuthService, http: httpx.AsyncClient, path: str) -> None:
    url = auth.base_url + path
    for headers in (
        {},
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Bearer " + mint_caller_token("wrong-secret-" + "w" * 32, "u")},
        {"Authorization": "Bearer " + mint_caller_token(JWT_SECRET, "u", ttl_s=-3600)},
        {"Authorization": "Basic dTpw"},
    ):
        response = await http.post(url, headers=headers, json={"code": "a#b"})
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_garbage_is_a_4xx_problem(auth: AuthService, http: httpx.AsyncClient) -> None:
    url = f"{auth.base_url}/v1/claude-code/exchange"
    user = new_user()
    cases = [
        {"content": b"\x00\xff garbage"},
        {"content": b"{\"code\":"},
        {"json": {"code": None}},
        {"json": {"state": "only"}},
        {"json": [1, 2, 3]},
        {"json": {"code": "no-hash-and-no-state"}},
        {"json": {"code": "a#b#c"}},
        {"json": {"code": "x" * 10_000}},
        {"json": {"code": "code#" + "s" * 40}},  # well-formed but never issued
        {"content": b"code=a%23b", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
    ]
    for case in cases:
        headers = {**bearer(user), **case.pop("headers", {})}
        response = await http.post(url, headers=headers, **case)
        assert 400 <= response.status_code < 500, (case, response.text)
        assert response.headers["content-type"].startswith(PROBLEM)
    assert_problem(await http.get(f"{auth.base_url}/v1/claude-code/nothing"), 404)
    assert_problem(await http.delete(f"{auth.base_url}/v1/claude-code/login"), 405)


async def test_expired_login_is_400(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    now = [datetime.now(UTC)]
    settings = settings_for(nats_url, tmp_path, standin, vault_key)
    async with AuthService(settings, parts=AuthParts(clock=lambda: now[0])) as service:
        user = new_user()
        pasted = await begin(http, service.base_url, user)
        now[0] += timedelta(minutes=11)
        body = assert_problem(await exchange(http, service.base_url, user, pasted), 400, "invalid-state")
        assert "expired" in body["detail"]
    assert standin.state.stats["token:authorization_code"] == 0


# --- the token endpoint misbehaving ----------------------------------------------------------
async def test_rate_limit_is_503_with_retry_after_and_the_paste_still_works_later(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient, issued: IssuedWatch
) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    standin.state.fail_next(429, headers={"Retry-After": "17"})
    response = await exchange(http, auth.base_url, user, pasted)
    assert_problem(response, 503, "upstream-rate-limited")
    assert response.headers["retry-after"] == "17"
    retried = await exchange(http, auth.base_url, user, pasted)
    assert retried.status_code == 202, retried.text
    await issued.for_user(user)


async def test_server_error_is_502(auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    standin.state.fail_next(500, body="<html>internal error sk-ant-oat01-bodyleak</html>")
    response = await exchange(http, auth.base_url, user, pasted)
    assert_problem(response, 502, "upstream-error")
    assert "bodyleak" not in response.text


async def test_a_mistyped_code_keeps_the_login_for_another_paste(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    """invalid_grant for a code the server never issued (a typo): 400 invalid-code that says how
    many pastes are left, and the right code then connects. Three refusals use the login up."""
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    code, _, state = pasted.partition("#")
    response = await exchange(http, auth.base_url, user, f"{code}x#{state}")  # a code the server never issued
    body = assert_problem(response, 400, "invalid-code")
    assert body["attempts_left"] == 2 and "2 tries left" in body["detail"]
    assert (await exchange(http, auth.base_url, user, pasted)).status_code == 202
    assert_problem(await exchange(http, auth.base_url, user, pasted), 400, "invalid-state")  # single use

    other = await begin(http, auth.base_url, user)
    code, _, state = other.partition("#")
    left = [assert_problem(await exchange(http, auth.base_url, user, f"{code}{n}#{state}"), 400, "invalid-code")
            ["attempts_left"] for n in range(3)]
    assert left == [2, 1, 0]
    assert_problem(await exchange(http, auth.base_url, user, other), 400, "invalid-state")


async def test_a_refusal_other_than_invalid_grant_consumes_the_login(
    auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    standin.state.fail_next(400, body={"error": "invalid_request", "error_description": "Invalid request format"})
    body = assert_problem(await exchange(http, auth.base_url, user, pasted), 400, "invalid-code")
    assert "attempts_left" not in body and "used up" in body["detail"]
    assert_problem(await exchange(http, auth.base_url, user, pasted), 400, "invalid-state")


async def test_non_token_answer_is_502(auth: AuthService, standin: OAuthStandin, http: httpx.AsyncClient) -> None:
    user = new_user()
    pasted = await begin(http, auth.base_url, user)
    standin.state.fail_next(200, body={"hello": "world"})
    assert_problem(await exchange(http, auth.base_url, user, pasted), 502, "upstream-bad-response")


async def test_unreachable_is_502_and_silent_server_is_504(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (kernel backlog) but never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens here any more
    try:
        for token_url, status, slug in (
            (f"http://127.0.0.1:{closed_port}/v1/oauth/token", 502, "upstream-error"),
            (f"http://127.0.0.1:{silent.getsockname()[1]}/v1/oauth/token", 504, "upstream-timeout"),
        ):
            settings = settings_for(
                nats_url, tmp_path, standin, vault_key, oauth_token_url=token_url, oauth_token_urls=token_url,
                oauth_http_timeout=0.5,
            )
            async with AuthService(settings) as service:
                user = new_user()
                pasted = await begin(http, service.base_url, user)
                assert_problem(await exchange(http, service.base_url, user, pasted), status, slug)
    finally:
        silent.close()


# --- keys ---------------------------------------------------------------------------------
async def test_vault_key_read_lazily_from_the_keys_dir(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, http: httpx.AsyncClient, nc: Client
) -> None:
    settings = settings_for(nats_url, tmp_path, standin, None)
    async with AuthService(settings) as service:
        not_ready = await http.get(f"{service.base_url}/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["checks"] == {"bus": True, "vault_key": False, "grant_key": True}
        user = new_user()
        pasted = await begin(http, service.base_url, user)
        assert_problem(await exchange(http, service.base_url, user, pasted), 503, "vault-key-unavailable")
        assert standin.state.stats["token:authorization_code"] == 0  # nothing spent

        vault = load_or_create_keypair(settings.keys_dir, "vault")  # the vault starts later
        assert (await http.get(f"{service.base_url}/readyz")).status_code == 200

        sub = await nc.jetstream().subscribe(
            subjects.TOKENS_ISSUED, ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        )
        try:
            assert (await exchange(http, service.base_url, user, pasted)).status_code == 202
            while True:
                msg = await sub.next_msg(timeout=10)
                event = TokensIssued.model_validate_json(msg.data)
                if event.user_id == user:
                    break
        finally:
            await sub.unsubscribe()
        bundle = TokenBundle.model_validate_json(
            open_tokens(event, vault)
        )
        assert bundle.access_token in standin.state.access_tokens


async def test_dev_jwt_secret_is_created_private_and_used(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    settings = settings_for(nats_url, tmp_path, standin, vault_key, jwt_secret=None)
    async with AuthService(settings) as service:
        secret_file = settings.keys_dir / "auth-jwt.secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) >= 32
        ok = await http.post(f"{service.base_url}/v1/claude-code/login", headers=bearer("u", secret))
        assert ok.status_code == 201
        assert_problem(await http.post(f"{service.base_url}/v1/claude-code/login", headers=bearer("u")), 401)
    async with AuthService(settings) as again:  # the same secret on restart
        assert secret_file.read_text().strip() == secret
        assert (await http.post(f"{again.base_url}/v1/claude-code/login", headers=bearer("u", secret))).status_code == 201


# --- replicas, bus, ops ----------------------------------------------------------------------
async def test_two_replicas_share_pending_logins(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    async with (
        AuthService(settings_for(nats_url, tmp_path / "a", standin, vault_key)) as a,
        AuthService(settings_for(nats_url, tmp_path / "b", standin, vault_key)) as b,
    ):
        user = new_user()
        pasted = await begin(http, a.base_url, user)
        first, second = await asyncio.gather(
            exchange(http, b.base_url, user, pasted), exchange(http, a.base_url, user, pasted)
        )
        assert sorted([first.status_code, second.status_code]) == [202, 400]
    assert standin.state.stats["token:authorization_code"] == 1


async def test_readiness_follows_the_bus(
    embedded_nats: EmbeddedNats, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    async with AuthService(settings_for(embedded_nats.url, tmp_path, standin, vault_key)) as service:
        assert (await http.get(f"{service.base_url}/readyz")).status_code == 200
        embedded_nats.kill()
        for _ in range(100):
            ready = await http.get(f"{service.base_url}/readyz")
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 503
        assert ready.json()["checks"]["bus"] is False
        assert (await http.get(f"{service.base_url}/healthz")).status_code == 200
        login = await http.post(f"{service.base_url}/v1/claude-code/login", headers=bearer(new_user()))
        assert login.status_code == 503  # the store is on the bus: a problem, not a hang or a 500
        assert login.headers["content-type"].startswith(PROBLEM)


async def test_ops_endpoints(auth: AuthService, http: httpx.AsyncClient) -> None:
    assert (await http.get(f"{auth.base_url}/healthz")).json() == {"status": "ok"}
    assert (await http.get(f"{auth.base_url}/readyz")).json() == {
        "status": "ready", "checks": {"bus": True, "vault_key": True, "grant_key": True}
    }
    user = new_user()
    assert (await exchange(http, auth.base_url, user, await begin(http, auth.base_url, user))).status_code == 202
    metrics = (await http.get(f"{auth.base_url}/metrics")).text
    assert "ccbridge_auth_logins_started_total 1.0" in metrics
    assert 'ccbridge_auth_exchanges_total{outcome="connected"} 1.0' in metrics
    spec = (await http.get(f"{auth.base_url}/openapi.json")).json()
    assert "/v1/claude-code/exchange" in spec["paths"]
    assert (await http.get(f"{auth.base_url}/docs")).status_code == 200


async def test_stop_releases_the_port(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    service = AuthService(settings_for(nats_url, tmp_path, standin, vault_key))
    await service.start()
    url = f"{service.base_url}/healthz"
    assert (await http.get(url)).status_code == 200
    await service.stop()
    with pytest.raises(httpx.TransportError):
        await http.get(url)


async def test_start_fails_loudly_when_the_port_is_taken(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        service = AuthService(settings_for(nats_url, tmp_path, standin, vault_key, port=taken.getsockname()[1]))
        with pytest.raises(CannotListen, match="address already in use"):
            await service.start()
        await service.stop()  # harmless after a failed start
    finally:
        taken.close()


# --- the canary -----------------------------------------------------------------------------
async def test_canary_token_never_leaves_sealed(
    nats_url: str,
    tmp_path: Path,
    vault_key: KeyPair,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    canary = f"sk-ant-oat01-CANARY{secrets.token_hex(16)}"
    refresh_canary = f"sk-ant-ort01-CANARY{secrets.token_hex(16)}"
    caplog.set_level(logging.DEBUG)
    seen: list[bytes] = []
    spy = await nats.connect(nats_url)

    async def capture(msg) -> None:
        seen.append(msg.subject.encode() + b" " + json.dumps(msg.headers or {}).encode() + b" " + msg.data)

    await spy.subscribe(">", cb=capture)
    await settle(spy)
    try:
        async with (
            OAuthStandin(
                port=0, access_token_factory=lambda: canary, refresh_token_factory=lambda: refresh_canary
            ) as standin,
            AuthService(settings_for(nats_url, tmp_path, standin, vault_key, log_level="DEBUG")) as service,
        ):
            user = new_user()
            pasted = await begin(http, service.base_url, user)
            response = await exchange(http, service.base_url, user, pasted)
            assert response.status_code == 202, response.text
            # a failing exchange logs too: it must not leak either
            standin.state.fail_next(500, body=f"oops {canary}")
            again = await begin(http, service.base_url, user)
            assert (await exchange(http, service.base_url, user, again)).status_code == 502
            await spy.flush()
            await asyncio.sleep(0.3)
    finally:
        await spy.close()

    out, err = capfd.readouterr()
    log_text = "\n".join(f"{r.name} {r.getMessage()} {r.args!r} {r.__dict__!r}" for r in caplog.records)
    assert any(b"tokens.issued" in m and user.encode() in m for m in seen), "the spy saw no tokens.issued"
    assert any(b"$KV." in m for m in seen), "the spy did not see the pending-login bucket"
    assert "token endpoint answered" in out + err + log_text, "nothing was logged: the scan proves nothing"
    for secret in (canary, refresh_canary):
        assert secret not in response.text
        assert not [m[:80] for m in seen if secret.encode() in m], "canary on the bus"
        assert secret not in log_text, "canary in a log record"
        assert secret not in out and secret not in err, "canary on stdout/stderr"
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), f"canary in {path}"
    # The code travels only in request bodies on the service side; the test's own browser client
    # (httpx/httpcore loggers) legitimately logs the redirect URL that carries it.
    service_logs = "\n".join(
        f"{r.name} {r.getMessage()} {r.__dict__!r}" for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))
    )
    for code in (pasted.split("#")[0], again.split("#")[0]):
        assert code not in service_logs + out + err, "an authorization code was logged"


# --- the process entry point -----------------------------------------------------------------
async def test_python_m_services_auth_serves_and_stops_on_sigterm(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, http: httpx.AsyncClient
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from ccbridge.embedded_nats import free_port

    port = free_port()
    load_or_create_keypair(tmp_path / "keys", "vault")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "OAUTH_", "VAULT_"))},
        "NATS_URL": nats_url,
        "CCBRIDGE_DATA_DIR": str(tmp_path),
        "AUTH_PORT": str(port),
        "OAUTH_AUTHORIZE_URL": standin.authorize_url,
        "OAUTH_TOKEN_URL": standin.token_url,
        "OAUTH_TOKEN_URLS": standin.token_url,
        "OAUTH_REDIRECT_URI": standin.callback_url,
        "LOG_FORMAT": "json",
    }
    log_path = tmp_path / "auth.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.auth"], env=env, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    try:
        for _ in range(300):
            assert proc.poll() is None, log_path.read_text()
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        else:
            pytest.fail("auth did not become ready: " + log_path.read_text()[-2000:])
        secret = (tmp_path / "keys" / "auth-jwt.secret").read_text().strip()
        user = new_user()
        pasted = await begin(http, f"http://127.0.0.1:{port}", user, secret)
        assert (await exchange(http, f"http://127.0.0.1:{port}", user, pasted, secret)).status_code == 202
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "login completed" in events and "auth service stopped" in events
    assert next(line for line in lines if line.get("event") == "login completed")["service"] == "auth"


async def test_auth_started_before_the_bus_waits_for_it(
    tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    from ccbridge.embedded_nats import free_port

    server = EmbeddedNats(tmp_path / "nats", port=free_port())
    service = AuthService(settings_for(server.url, tmp_path, standin, vault_key))
    starting = asyncio.create_task(service.start())
    try:
        while service.port is None or service._server is None or not service._server.started:
            assert not starting.done(), starting
            await asyncio.sleep(0.02)
        assert (await http.get(f"{service.base_url}/healthz")).status_code == 200
        assert (await http.get(f"{service.base_url}/readyz")).status_code == 503
        assert_problem(await http.post(f"{service.base_url}/v1/claude-code/login", headers=bearer("u")), 503, "starting")
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(starting, 30)
        assert (await http.get(f"{service.base_url}/readyz")).status_code == 200
        user = new_user()
        assert (await exchange(http, service.base_url, user, await begin(http, service.base_url, user))).status_code == 202
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await service.stop()
        server.stop()


async def test_create_app_lifespan_wires_and_releases_everything(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair
) -> None:
    """For hosts that run the app under their own ASGI server: the lifespan does the wiring."""
    from services.auth.app import create_app
    from shared.broker import make_broker

    settings = settings_for(nats_url, tmp_path, standin, vault_key)
    broker = make_broker(settings, name="auth-lifespan-test")
    app = create_app(settings, broker=broker)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
        assert (await client.get("/readyz")).status_code == 503
        async with app.router.lifespan_context(app):
            assert (await client.get("/readyz")).status_code == 200
            started = await client.post("/v1/claude-code/login", headers=bearer(new_user()))
            assert started.status_code == 201
        assert app.state.components is None
        assert app.state.runtime.bus_connected() is False
        assert_problem(await client.post("/v1/claude-code/login", headers=bearer(new_user())), 503, "starting")
