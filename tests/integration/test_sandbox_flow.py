"""Sandbox service end to end on a real nats-server: a fake vault answering
`vault.credentials.get` on real NATS (sealed to the requester's key with shared.sealing),
the real SandboxService with the local backend, and the real Claude Code CLI reading the
injected home (`claude auth status --json`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from nats.aio.client import Client

from services.sandbox.adapters.backends.base import FileByFile
from services.sandbox.adapters.backends.local import LocalBackend
from shared import subjects
from shared.events import CredentialMode, SandboxCreated, SandboxOptions
from tests.grants import sandbox_created
from tests.sandbox_fixtures import (
    SCOPES,
    WAIT,
    Collector,
    FakeVault,
    by_sandbox,
    claude_status,
    make_bundle,
    mode_of,
    publish_created,
    running,
    settings_for,
    stored,
    uid,
)

REPO = Path(__file__).resolve().parents[2]


# --- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["file", "access_only"])
async def test_injected_home_logs_in_the_real_cli(
    mode: CredentialMode, nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault,
    collector: Collector, claude_bin: str,
) -> None:
    user, sandbox_id = uid("user"), uid("sbx")
    bundle = make_bundle()
    fake_vault.users[user] = bundle
    home = tmp_path / "sandboxes" / sandbox_id
    home.mkdir(parents=True)
    (home / ".claude.json").write_text(json.dumps({"numStartups": 3, "userID": "keep-me"}))
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id, options=SandboxOptions(mode=mode))

    async with running(settings_for(nats_url, tmp_path)) as service:
        await publish_created(nc, event)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id)

    assert injected["cause_event_id"] == event.event_id
    assert injected["user_id"] == user
    assert injected["mode"] == mode
    assert injected["expires_at"] == bundle.expires_at
    assert injected["env"] == {}
    real_home = home.resolve()
    assert set(injected["files"]) == {
        str(real_home / ".claude/.credentials.json"), str(real_home / ".claude.json"),
        str(real_home / ".claude/settings.json"),
    }
    # the request named the service's own key, which the reply was sealed to
    [request] = fake_vault.requests_for(user)
    assert request.mode == mode
    assert fake_vault.requesters == [service.key.key_id]

    assert mode_of(home / ".claude") == 0o700
    assert mode_of(home / ".claude/.credentials.json") == 0o600
    oauth = json.loads((home / ".claude/.credentials.json").read_text())["claudeAiOauth"]
    expected = {"accessToken": bundle.access_token, "expiresAt": bundle.expires_at, "scopes": SCOPES}
    if mode == "file":
        expected["refreshToken"] = bundle.refresh_token
    assert oauth == expected
    assert json.loads((home / ".claude.json").read_text()) == {
        "numStartups": 3, "userID": "keep-me", "hasCompletedOnboarding": True, "bypassPermissionsModeAccepted": True,
    }
    assert json.loads((home / ".claude/settings.json").read_text()) == {"skipDangerousModePermissionPrompt": True}
    assert [p.name for p in home.rglob("*") if "tmp" in p.name] == []
    # token material never travelled in the clear on the bus
    for _, data in collector.messages:
        assert bundle.access_token.encode() not in data

    status = await claude_status(claude_bin, home)
    assert status["loggedIn"] is True
    assert status["authMethod"] == "claude.ai"


async def test_config_dir_is_read_by_the_real_cli(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector, claude_bin: str,
) -> None:
    user, sandbox_id = uid("user"), uid("sbx")
    fake_vault.users[user] = make_bundle()
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id,
                           options=SandboxOptions(mode="access_only", config_dir="cfg/claude"))
    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, event)
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id)

    home = tmp_path / "sandboxes" / sandbox_id
    assert (home / "cfg/claude/.credentials.json").exists()
    assert (home / "cfg/claude/settings.json").exists()
    assert not (home / ".claude/.credentials.json").exists()
    assert mode_of(home / "cfg/claude") == 0o700
    status = await claude_status(claude_bin, home, CLAUDE_CONFIG_DIR=str(home / "cfg/claude"))
    assert (status["loggedIn"], status["authMethod"]) == (True, "claude.ai")
    # without the env var the CLI looks in ~/.claude and finds nothing
    assert (await claude_status(claude_bin, home))["loggedIn"] is False


async def test_env_mode_writes_no_credentials_and_names_the_variable(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector, claude_bin: str,
) -> None:
    user, sandbox_id = uid("user"), uid("sbx")
    bundle = make_bundle()
    fake_vault.users[user] = bundle
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id, options=SandboxOptions(mode="env"))
    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, event)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id)

    assert injected["env"] == {"CLAUDE_CODE_OAUTH_TOKEN": "access_token"}
    assert bundle.access_token not in json.dumps(injected)
    home = tmp_path / "sandboxes" / sandbox_id
    assert not (home / ".claude/.credentials.json").exists()
    assert json.loads((home / ".claude.json").read_text())["hasCompletedOnboarding"] is True
    assert (await claude_status(claude_bin, home))["loggedIn"] is False
    # the platform supplies the value through the named variable
    with_env = await claude_status(claude_bin, home, CLAUDE_CODE_OAUTH_TOKEN=bundle.access_token)
    assert with_env["loggedIn"] is True


async def test_user_without_connection_gets_failed_not_connected(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user, sandbox_id = uid("nobody"), uid("sbx")
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id)
    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, event)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, sandbox_id)

    assert failed["reason"] == "not_connected"
    assert failed["retryable"] is False
    assert failed["cause_event_id"] == event.event_id
    assert len(fake_vault.requests_for(user)) == 1  # final: not retried
    assert not (tmp_path / "sandboxes" / sandbox_id / ".claude/.credentials.json").exists()
    assert collector.events(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id) == []


async def test_malformed_payloads_are_dead_lettered_and_the_consumer_moves_on(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user, good_sandbox = uid("user"), uid("sbx")
    fake_vault.users[user] = make_bundle()
    bad_id = uid("evt")
    salvageable = json.dumps(
        {"event_id": bad_id, "user_id": user, "sandbox_id": "../../etc", "options": {"mode": "plaintext"}}
    ).encode()
    garbage = f"not json {uuid.uuid4().hex}".encode()
    good = sandbox_created(user_id=user, sandbox_id=good_sandbox)

    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, raw=salvageable, msg_id=bad_id)
        await publish_created(nc, raw=garbage, msg_id=None)
        await publish_created(nc, good)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, good_sandbox)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, "../../etc")
        await collector.wait(lambda m: m[1] in (salvageable, garbage), count=2)

    assert injected["cause_event_id"] == good.event_id
    assert failed["reason"] == "invalid_event"
    assert failed["cause_event_id"] == bad_id
    assert "sandbox_id" in failed["detail"] and "mode" in failed["detail"]
    # kept unchanged in the DLQ stream, with the reason in a header
    dead = await stored(nc, subjects.DLQ_STREAM.name, subjects.dead_letter_subject(subjects.SANDBOX_CREATED),
                        lambda m: m.data in (salvageable, garbage))
    assert sorted(m.data for m in dead) == sorted([salvageable, garbage])
    assert all((m.headers or {}).get("Ccbridge-Reason", "").startswith("invalid_event") for m in dead)
    assert not (tmp_path / "etc").exists()


@dataclass
class CountingBackend:
    """The real local backend, counting writes."""

    inner: LocalBackend
    writes: list[str] = field(default_factory=list)
    kind: str = "local"

    async def aclose(self) -> None:
        await self.inner.aclose()

    @asynccontextmanager
    async def open(self, event: SandboxCreated, *, must_exist: bool = False) -> AsyncIterator[Any]:
        writes = self.writes

        class Counting(FileByFile):
            def __init__(self, sandbox: Any) -> None:
                self._s = sandbox

            @property
            def home(self) -> PurePosixPath:
                return self._s.home

            @property
            def backend_sandbox_id(self) -> str | None:
                return self._s.backend_sandbox_id

            async def read_file(self, path: PurePosixPath) -> bytes | None:
                return await self._s.read_file(path)

            async def write_file(self, path: PurePosixPath, data: bytes, mode: int) -> None:
                writes.append(str(path))
                await self._s.write_file(path, data, mode)

            async def make_dir(self, path: PurePosixPath, mode: int) -> None:
                await self._s.make_dir(path, mode)

            async def remove(self, path: PurePosixPath) -> None:
                await self._s.remove(path)

        async with self.inner.open(event, must_exist=must_exist) as sandbox:
            yield Counting(sandbox)

    async def discard(self, sandbox_id: str) -> None:
        await self.inner.discard(sandbox_id)


async def test_duplicate_event_has_one_effect(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user, sandbox_id = uid("user"), uid("sbx")
    fake_vault.users[user] = make_bundle()
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id)
    settings = settings_for(nats_url, tmp_path)
    backend = CountingBackend(LocalBackend(settings.local_sandbox_root))

    async with running(settings, backend=backend):
        # the platform re-sent it without a Nats-Msg-Id, so JetStream stored both copies
        await publish_created(nc, event, msg_id=None)
        await publish_created(nc, event, msg_id=None)
        # both deliveries answered (the second publish of the same result id reaches core subscribers)
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id, count=2)

    creds = tmp_path / "sandboxes" / sandbox_id / ".claude/.credentials.json"
    assert sorted(backend.writes) == sorted(
        [str(creds.resolve()), str(creds.resolve().parent.parent / ".claude.json"),
         str(creds.resolve().parent / "settings.json")]
    )  # each file once
    injected = await stored(nc, subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREDENTIALS_INJECTED, by_sandbox(sandbox_id))
    assert len(injected) == 1  # the derived event id was deduplicated by JetStream
    assert len(fake_vault.requests_for(user)) == 1  # the duplicate was recognised by its event_id (live record)


async def test_vault_that_never_answers_is_held_then_dead_lettered_when_the_window_ends(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    """The vault is a dependency: while it does not answer the message is held (its breaker
    probing), not redelivered against a retry budget; once the retry window is over, the
    sandbox's platform hears why and the message is kept as a dead letter."""
    user, sandbox_id = uid("user"), uid("sbx")
    fake_vault.users[user] = "silent"
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id)
    settings = settings_for(nats_url, tmp_path, vault_request_timeout=0.3, retry_window=3.0)
    async with running(settings):
        # JetStream never gives up on its own (the policy decides), even on a consumer that existed
        info = await nc.jetstream().consumer_info(subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREATED_DURABLE)
        assert info.config.max_deliver == -1
        await publish_created(nc, event)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, sandbox_id)
        await collector.wait(lambda m: m[0].startswith("dlq.") and m[1] == event.model_dump_json().encode())

    assert failed["reason"] == "vault_unavailable"
    assert re.search(r"still failing after \d+ s, 1 deliveries", failed["detail"])  # held: one delivery throughout
    assert failed["retryable"] is True
    # the first failure opens the breaker; then one probe per interval (0.2 s doubling to 1 s)
    assert 3 <= len(fake_vault.requests_for(user)) <= 8
    dead = await stored(nc, subjects.DLQ_STREAM.name, subjects.dead_letter_subject(subjects.SANDBOX_CREATED),
                        lambda m: m.data == event.model_dump_json().encode())
    assert len(dead) == 1
    assert dead[0].headers["Ccbridge-Reason"].startswith("vault_unavailable")


async def test_vault_timeout_is_retried_until_it_answers(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector, claude_bin: str,
) -> None:
    user, sandbox_id = uid("user"), uid("sbx")
    fake_vault.users[user] = "silent_once"
    fake_vault.late_bundles[user] = make_bundle()
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id)
    async with running(settings_for(nats_url, tmp_path, vault_request_timeout=0.3)):
        await publish_created(nc, event)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id)

    assert injected["cause_event_id"] == event.event_id
    assert len(fake_vault.requests_for(user)) == 2
    assert collector.events(subjects.SANDBOX_CREDENTIALS_FAILED, sandbox_id) == []
    status = await claude_status(claude_bin, tmp_path / "sandboxes" / sandbox_id)
    assert status["loggedIn"] is True


async def test_reconnect_required_is_final(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user, sandbox_id = uid("user"), uid("sbx")
    fake_vault.users[user] = "reconnect_required"
    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, sandbox_created(user_id=user, sandbox_id=sandbox_id))
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, sandbox_id)
    assert (failed["reason"], failed["retryable"]) == ("reconnect_required", False)
    assert len(fake_vault.requests_for(user)) == 1


async def test_python_m_services_sandbox_serves_until_sigterm(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user, sandbox_id = uid("user"), uid("sbx")
    bundle = make_bundle()
    fake_vault.users[user] = bundle
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SANDBOX_", "LOCAL_SANDBOX", "VAULT_"))},
        "NATS_URL": nats_url,
        "CCBRIDGE_DATA_DIR": str(tmp_path / "data"),
        "LOCAL_SANDBOX_ROOT": str(tmp_path / "sandboxes"),
        "SANDBOX_DEFAULT_MODE": "access_only",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.sandbox", env=env, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[bytes] = []

    async def started() -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            lines.append(line)
            if b"sandbox.started" in line:
                return
        pytest.fail(b"".join(lines).decode(errors="replace")[-2000:])

    try:
        await asyncio.wait_for(started(), WAIT)
        event = sandbox_created(user_id=user, sandbox_id=sandbox_id)
        await publish_created(nc, event)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id)
        assert injected["mode"] == "access_only"  # SANDBOX_DEFAULT_MODE applied
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), WAIT)
        output = b"".join(lines) + rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, output.decode(errors="replace")[-2000:]
    assert b"sandbox.stopped" in output
    assert bundle.access_token.encode() not in output
    assert (tmp_path / "data" / "keys" / "sandbox.hpke.key").exists()
    assert (tmp_path / "sandboxes" / sandbox_id / ".claude/.credentials.json").exists()
