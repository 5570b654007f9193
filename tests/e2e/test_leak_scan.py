"""Leak scan: canary tokens through the whole flow — auth HTTP login against the OAuth stand-in,
sealed tokens.issued, the vault's store, its refresher (refresh-token rotation against the
stand-in), the sandbox service's injection and its re-injection after the refresh — then a
search for the canary everywhere ccbridge leaves traces:

- every message seen on `>` (subjects, headers, bodies: events, request/replies, KV updates,
  JetStream API traffic) from before the services start until they stop;
- every stream's stored messages, read back after the run: ccbridge's streams, the dead letter
  queue, and the KV buckets (pending logins, live sandboxes) with their history;
- every file under the data dir: SQLite database + WAL, keys, the nats-server store, sandbox
  homes — and every log (the services run at LOG_LEVEL=DEBUG), nats-server's included;
- each service process's environment (/proc/<pid>/environ) while it runs;
- the auth API's answers.

The canary is searched raw and base64-encoded (standard and URL-safe, every alignment). Only
the sandbox's `.claude/.credentials.json` may contain it (and must: positive control).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import uuid
from pathlib import Path

import httpx
import nats
import pytest

from bench import common
from ccbridge.client import CcbridgeClient
from ccbridge.demo import connect_claude_account, mint_caller_token, prepare_when_connected
from ccbridge.embedded_nats import EmbeddedNats, free_port
from ccbridge.stack import Stack
from shared import subjects
from shared.broker import settle
from shared.events import SandboxCredentialsInjected
from standins.oauth import OAuthStandin
from tests.grants import stack_grant

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MARKER = f"LEAKCANARY{secrets.token_hex(6)}"


def needles(marker: str) -> list[bytes]:
    """The marker, and its base64 forms at every alignment (a token wrapped in base64 by mistake)."""
    raw = marker.encode()
    found = [raw]
    for shift in range(3):
        padded = b"\x00" * shift + raw
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(padded)
            # drop the characters that depend on the unknown neighbouring bytes
            found.append(text[4 if shift else 0 : -4])
    return [n for n in dict.fromkeys(found) if len(n) >= 12]


NEEDLES = needles(MARKER)


def test_needles_find_base64_wrapped_tokens() -> None:
    token = f"sk-ant-oat01-{MARKER}A001".encode()
    for prefix in (b"", b"a", b"ab", b'{"access_token": "'):
        blob = prefix + token + b'", "x": 1}'
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            assert leaks_in(encode(blob)), prefix
    assert not leaks_in(base64.b64encode(b"sk-ant-oat01-LEAKCANARY000000000000A001"))


def leaks_in(data: bytes) -> bool:
    return any(n in data for n in NEEDLES)


async def dump_streams(js: nats.js.JetStreamContext) -> dict[str, list[bytes]]:
    """Every stored message of every stream (KV buckets are streams `KV_<bucket>`)."""
    out: dict[str, list[bytes]] = {}
    names = [info.config.name for info in await js.streams_info()]
    for name in names:
        info = await js.stream_info(name)
        total = info.state.messages
        msgs: list[bytes] = []
        if total:
            subject = (info.config.subjects or [">"])[0]
            sub = await js.subscribe(subject if len(info.config.subjects or []) == 1 else ">", stream=name,
                                     ordered_consumer=True)
            try:
                while len(msgs) < total:
                    try:
                        msg = await sub.next_msg(timeout=5)
                    except nats.errors.TimeoutError:
                        break
                    msgs.append(msg.subject.encode() + b" " + json.dumps(msg.headers or {}).encode() + b" " + msg.data)
            finally:
                await sub.unsubscribe()
        out[name] = msgs
    return out


async def test_canary_only_in_the_sandbox_credentials_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True)
    access_n, refresh_n = itertools.count(1), itertools.count(1)

    def access_token() -> str:
        return f"sk-ant-oat01-{MARKER}A{next(access_n):03d}{secrets.token_urlsafe(24)}"

    def refresh_token() -> str:
        return f"sk-ant-ort01-{MARKER}R{next(refresh_n):03d}{secrets.token_urlsafe(24)}"

    jwt_secret = secrets.token_urlsafe(32)
    user = f"leak-user-{uuid.uuid4().hex[:8]}"
    sandbox_id = f"leak-sbx-{uuid.uuid4().hex[:8]}"
    captured: list[bytes] = []
    api_answers: list[bytes] = []
    environs: dict[str, bytes] = {}

    async with OAuthStandin(port=0, access_token_lifetime=60, access_token_factory=access_token,
                            refresh_token_factory=refresh_token) as oauth:
        server = EmbeddedNats(data_dir / "nats", log_file=log_dir / "nats-server.log").start()
        spy = await nats.connect(server.url, name="leak-spy")

        async def capture(msg: nats.aio.msg.Msg) -> None:
            captured.append(msg.subject.encode() + b" " + json.dumps(msg.headers or {}).encode() + b" " + msg.data)

        await spy.subscribe(">", cb=capture)
        await settle(spy)
        env = common.stack_env(
            data_dir,
            AUTH_JWT_SECRET=jwt_secret,
            OAUTH_AUTHORIZE_URL=oauth.authorize_url,
            OAUTH_TOKEN_URL=oauth.token_url,
            OAUTH_REDIRECT_URI=oauth.callback_url,
            LOG_LEVEL="DEBUG",
            LOG_FORMAT="console",
            # the vault's refresher: tokens live 60 s at the stand-in, refreshed 55 s before expiry
            VAULT_REFRESH_ENABLED="true",
            VAULT_REFRESH_MARGIN_S="55",
            VAULT_REFRESH_INTERVAL_S="1",
        )
        stack = Stack(data_dir, nats_url=server.url, env=env, auth_port=free_port(), log_dir=log_dir)
        try:
            await stack.astart()
            for name, svc in stack.processes.items():
                environs[name] = Path(f"/proc/{svc.process.pid}/environ").read_bytes()
            async with httpx.AsyncClient(timeout=30) as http:
                caller = mint_caller_token(jwt_secret, user)
                connected = await connect_claude_account(http, stack.auth_url, caller)
                assert connected.status == 202, connected.body
                api_answers.append(json.dumps(connected.body).encode())
                status = await http.get(f"{stack.auth_url}/v1/claude-code/status",
                                        headers={"Authorization": f"Bearer {caller}"})
                api_answers.append(status.content)

                async with CcbridgeClient(server.url) as ccb:
                    grant = await stack_grant(stack, user, sandbox_id)
                    result = await prepare_when_connected(ccb, sandbox_id, user, timeout=30, grant=grant)
                assert isinstance(result, SandboxCredentialsInjected), result
                first_token = common.credentials_token(data_dir, sandbox_id)
                assert first_token is not None and MARKER in first_token

                # the refresher rotates the tokens; the sandbox service re-injects the live sandbox
                for _ in range(600):
                    token = common.credentials_token(data_dir, sandbox_id)
                    if token and token != first_token:
                        break
                    await asyncio.sleep(0.1)
                refreshed_token = common.credentials_token(data_dir, sandbox_id)
                assert refreshed_token != first_token, "no refresh + re-injection within 60 s"
                assert oauth.state.stats["token:refresh_token"] >= 1
                status = await http.get(f"{stack.auth_url}/v1/claude-code/status",
                                        headers={"Authorization": f"Bearer {caller}"})
                api_answers.append(status.content)

            js = spy.jetstream()
            await spy.flush()
            await asyncio.sleep(0.5)
            streams = await dump_streams(js)
        finally:
            await asyncio.to_thread(stack.stop)
            await spy.close()
            server.stop()

    credentials_file = common.sandbox_home(data_dir, sandbox_id) / ".claude" / ".credentials.json"
    assert leaks_in(credentials_file.read_bytes()), "positive control: the credentials file holds the canary"

    # --- the scan ---------------------------------------------------------------------------
    findings: list[str] = []
    # the bus, live
    subjects_seen = {m.split(b" ", 1)[0].decode(errors="replace") for m in captured}
    for expected in (subjects.TOKENS_ISSUED, subjects.TOKENS_REFRESHED, subjects.SANDBOX_CREATED,
                     subjects.SANDBOX_CREDENTIALS_INJECTED, subjects.VAULT_CREDENTIALS_GET):
        assert expected in subjects_seen, f"the spy never saw {expected}: the scan would prove nothing"
    assert any(s.startswith("$KV.") for s in subjects_seen), "no KV traffic seen"
    findings += [f"bus: {m[:100]!r}" for m in captured if leaks_in(m)]
    # the bus, stored: streams, dead letters, KV buckets with history
    assert any(name.startswith("KV_") for name in streams), sorted(streams)
    for name, msgs in streams.items():
        findings += [f"stream {name}: {m[:100]!r}" for m in msgs if leaks_in(m)]
    # files: database, WAL, keys, nats store, sandbox homes, logs
    scanned = 0
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and path != credentials_file:
            scanned += 1
            if leaks_in(path.read_bytes()):
                findings.append(f"file {path.relative_to(data_dir)}")
    assert scanned >= 10, scanned
    logs = {p.name: p.read_text(errors="replace") for p in log_dir.glob("*.log")}
    assert {"auth.log", "vault.log", "sandbox.log", "nats-server.log"} <= set(logs), sorted(logs)
    assert "debug" in logs["vault.log"].lower() and "debug" in logs["sandbox.log"].lower(), "no DEBUG logs"
    # processes and the API
    findings += [f"environ of {name}" for name, blob in environs.items() if leaks_in(blob)]
    findings += [f"auth API answer {a[:100]!r}" for a in api_answers if leaks_in(a)]

    print(f"\nleak scan: {len(captured)} bus messages, {sum(len(m) for m in streams.values())} stored "
          f"messages in {len(streams)} streams, {scanned} files, {len(logs)} logs, {len(environs)} environs: "
          f"{len(findings)} leaks")
    assert not findings, findings
