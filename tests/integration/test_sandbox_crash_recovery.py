"""Done-when of issue 6: SIGKILL the sandbox service (a real `python -m services.sandbox`
process) mid-way through 500 sandbox.created events, restart it, and every sandbox ends up
injected exactly once in effect.

Everything is real: a private nats-server, the real vault (`python -m services.vault`, SQLite)
holding tokens published as sealed `tokens.issued` events, the real sandbox service with the
local backend. SANDBOX_ACK_WAIT is short so the deliveries lost with the killed process come
back quickly.

"Exactly once in effect":
- one `sandbox.credentials.injected` per sandbox stored in JetStream (result ids derive from
  the cause, so a redelivery's re-announcement is dropped), none failed, nothing dead-lettered;
- every home holds exactly the person's credentials for its mode, 0600, and no temp copy;
- no file was ever written twice (the services log each write; a redelivered event finds the
  bytes in place or its own `injected` record);
- the live-sandbox registry holds one `injected` record per sandbox, naming its event;
- the durable consumer has nothing pending or unacknowledged.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from ccbridge.embedded_nats import EmbeddedNats
from ccbridge.stack import Stack
from services.sandbox.adapters.live_registry import open_live_bucket, record_key
from shared import subjects
from shared.broker import settle
from shared.events import (
    CredentialMode,
    CredentialsReply,
    SandboxOptions,
    TokenBundle,
)
from shared.sealing import load_or_create_keypair, read_public_key
from tests import grants
from tests.grants import sandbox_created
from tests.sandbox_fixtures import SCOPES, as_json, stored
from tests.vault_fixtures import credentials_request, issued_event, open_reply

EVENTS = 500
USERS = 20
DUPLICATES = 25  # re-sent without Nats-Msg-Id, so JetStream stores them twice
KILL_AFTER = 120
MODES: tuple[CredentialMode, ...] = ("file", "access_only", "env")
GUARD = 90.0  # against hangs only; nothing asserts on timing


async def wait_for(predicate: Any, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + GUARD
    while not await predicate():
        stack.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def log_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


async def test_sigkill_mid_way_through_500_events_then_restart_injects_each_sandbox_once(
    tmp_path: Path, embedded_nats: EmbeddedNats
) -> None:
    data = tmp_path / "data"
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'vault.db'}",
        "LOCAL_SANDBOX_ROOT": str(tmp_path / "sandboxes"),
        "VAULT_REFRESH_ENABLED": "false",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "SANDBOX_ACK_WAIT": "2",
        "SANDBOX_CONCURRENCY": "16",
        "SANDBOX_MAX_DELIVER": "20",
        "SANDBOX_RETRY_BASE_DELAY": "0.2",
        "SANDBOX_RETRY_MAX_DELAY": "1",
        "VAULT_REQUEST_TIMEOUT": "3",
        **grants.env(),
    }
    stack = Stack(data, nats_url=embedded_nats.url, env=env, services=("vault",))
    await stack.astart()  # the real vault; keys for vault and sandbox exist before it starts
    nc = await nats.connect(embedded_nats.url)
    try:
        js = nc.jetstream()
        sandbox_key = load_or_create_keypair(data / "keys", "sandbox")
        vault_key = read_public_key(data / "keys", "vault")

        # --- the people connected their accounts: sealed tokens.issued, as auth publishes them
        bundles: dict[str, TokenBundle] = {}
        for index in range(USERS):
            user = f"crash-user-{index}-{uuid.uuid4().hex[:6]}"
            bundle = TokenBundle(
                access_token=f"sk-ant-oat01-{uuid.uuid4().hex}",
                refresh_token=f"sk-ant-ort01-{uuid.uuid4().hex}",
                expires_at=int(time.time() * 1000) + 8 * 3600 * 1000,
                scopes=SCOPES,
            )
            bundles[user] = bundle
            issued = issued_event(vault_key, user_id=user, access_token=bundle.access_token,
                                  refresh_token=bundle.refresh_token, expires_at=bundle.expires_at, scopes=SCOPES)
            await js.publish(subjects.TOKENS_ISSUED, issued.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": issued.event_id}, stream=subjects.TOKENS_STREAM.name)

        async def vault_holds_everyone() -> bool:
            for user in bundles:
                request = credentials_request(sandbox_key, user_id=user)
                try:
                    msg = await nc.request(subjects.VAULT_CREDENTIALS_GET, request.model_dump_json().encode(),
                                           timeout=2)
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    return False
                reply = CredentialsReply.model_validate_json(msg.data)
                if not reply.ok or reply.sealed is None:
                    return False
                assert open_reply(reply, sandbox_key, user_id=user).access_token == bundles[user].access_token
            return True

        await wait_for(vault_holds_everyone, "the vault to store every person's tokens", stack)

        # --- results, observed live (core subscription)
        injected_seen: dict[str, dict[str, Any]] = {}
        failed_seen: list[bytes] = []

        async def on_result(msg: Msg) -> None:
            body = as_json(msg.data)
            if msg.subject == subjects.SANDBOX_CREDENTIALS_INJECTED:
                injected_seen[body["sandbox_id"]] = body
            else:
                failed_seen.append(msg.data)

        await nc.subscribe(subjects.SANDBOX_CREDENTIALS_INJECTED, cb=on_result)
        await nc.subscribe(subjects.SANDBOX_CREDENTIALS_FAILED, cb=on_result)
        await settle(nc)

        log_path = data / "logs" / "sandbox.log"

        async def started(times: int) -> bool:
            return log_path.exists() and log_path.read_text(errors="replace").count('"sandbox.started"') >= times

        stack.start_service("sandbox")
        await wait_for(lambda: started(1), "the sandbox service to start", stack)

        # --- 500 sandboxes, mixed modes and people, plus raw duplicates
        users = list(bundles)
        events = [
            sandbox_created(
                user_id=users[i % USERS],
                sandbox_id=f"crash-sbx-{i:03d}-{uuid.uuid4().hex[:6]}",
                options=SandboxOptions(mode=MODES[i % len(MODES)]),
            )
            for i in range(EVENTS)
        ]
        for event in events:
            await js.publish(subjects.SANDBOX_CREATED, event.model_dump_json().encode(),
                             headers={"Nats-Msg-Id": event.event_id}, stream=subjects.SANDBOX_STREAM.name)
        for event in events[:: EVENTS // DUPLICATES]:
            await js.publish(subjects.SANDBOX_CREATED, event.model_dump_json().encode(),
                             stream=subjects.SANDBOX_STREAM.name)

        async def some_done() -> bool:
            return len(injected_seen) >= KILL_AFTER

        await wait_for(some_done, f"{KILL_AFTER} injections", stack)
        await asyncio.to_thread(stack.kill, "sandbox")  # SIGKILL, mid-way
        done_at_kill = len(injected_seen)
        assert done_at_kill < EVENTS, "the service finished before it could be killed: nothing was tested"

        stack.start_service("sandbox")
        await wait_for(lambda: started(2), "the restarted sandbox service", stack)

        async def all_done() -> bool:
            return len(injected_seen) >= EVENTS

        await wait_for(all_done, "every sandbox to be injected after the restart", stack)

        async def consumer_idle() -> bool:
            info = await js.consumer_info(subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREATED_DURABLE)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(consumer_idle, "the durable consumer to have everything acknowledged", stack)
        kv = await open_live_bucket(js)
        records = {event.sandbox_id: json.loads((await kv.get(record_key(event.user_id, event.sandbox_id))).value)
                   for event in events}
        results = await stored(nc, subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREDENTIALS_INJECTED, lambda m: True)
        failures = await stored(nc, subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREDENTIALS_FAILED, lambda m: True)
        dead = await stored(nc, subjects.DLQ_STREAM.name, "dlq.>", lambda m: True)
    finally:
        await nc.close()
        await asyncio.to_thread(stack.stop)

    # one stored result per sandbox, answering its own event; nothing failed or dead-lettered
    by_sandbox = Counter(as_json(m.data)["sandbox_id"] for m in results)
    assert set(by_sandbox) == {e.sandbox_id for e in events}
    assert set(by_sandbox.values()) == {1}
    causes = {as_json(m.data)["sandbox_id"]: as_json(m.data)["cause_event_id"] for m in results}
    assert causes == {e.sandbox_id: e.event_id for e in events}
    assert failures == [] and failed_seen == [] and dead == []

    # every home holds exactly that person's credentials for its mode
    root = tmp_path / "sandboxes"
    for event in events:
        bundle, home = bundles[event.user_id], root / event.sandbox_id
        if event.options.mode == "env":
            secret = home / ".config/ccbridge/env"
            assert f"export CLAUDE_CODE_OAUTH_TOKEN='{bundle.access_token}'" in secret.read_text()
            assert not (home / ".claude/.credentials.json").exists()
        else:
            secret = home / ".claude/.credentials.json"
            oauth = json.loads(secret.read_text())["claudeAiOauth"]
            assert oauth["accessToken"] == bundle.access_token
            assert oauth.get("refreshToken") == (bundle.refresh_token if event.options.mode == "file" else None)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert json.loads((home / ".claude.json").read_text())["hasCompletedOnboarding"] is True
        record = records[event.sandbox_id]
        assert (record["state"], record["created_event_id"], record["mode"]) == ("injected", event.event_id,
                                                                                 event.options.mode)

    # no temp copy (of a credentials file, possibly) left behind by the kill
    assert [p.name for p in root.rglob("*ccbridge-tmp*")] == []

    # both runs did work, and no file was ever written twice
    lines = [line for line in log_lines(log_path) if line.get("event") == "sandbox.credentials_injected"]
    writes = Counter(path for line in lines for path in line.get("written", []))
    assert writes and max(writes.values()) == 1, [p for p, n in writes.items() if n > 1][:5]
    assert log_path.read_text(errors="replace").count('"sandbox.started"') == 2
    assert 0 < done_at_kill < EVENTS
    # no token material in the service logs
    text = log_path.read_text(errors="replace")
    assert not any(b.access_token in text or (b.refresh_token or "-") in text for b in bundles.values())
