"""Live sandboxes on a real nats-server (JetStream KV registry shared through the bus):
tokens.refreshed re-injects, tokens.revoked scrubs and reports, sandbox.destroyed forgets;
both backends; the real Claude Code CLI reads every resulting home. Also: replicas share the
durable consumers, and the MCP registration is read by the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from nats.aio.client import Client

from services.sandbox.adapters.backends.local import LocalBackend
from services.sandbox.adapters.live_registry import open_live_bucket, record_key
from services.sandbox.app import SandboxService
from shared import subjects
from shared.events import (
    SandboxDestroyed,
    SandboxOptions,
    TokensRefreshed,
    TokensRevoked,
)
from standins.e2b import E2BStandin
from tests.grants import sandbox_created
from tests.sandbox_fixtures import (
    WAIT,
    Collector,
    FakeVault,
    claude_status,
    e2b_settings,
    make_bundle,
    publish,
    publish_created,
    pull_home,
    run_claude,
    running,
    settings_for,
    uid,
)


async def until(predicate: Any, what: str) -> None:
    """Poll an async predicate (a guard against hangs, not a timing assertion)."""
    deadline = time.monotonic() + WAIT
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Home:
    """Where a sandbox's files can be read by the CLI: the local dir, or pulled from e2b."""

    def __init__(self, backend: str, tmp_path: Path, standin: E2BStandin | None, sandbox_id: str) -> None:
        self.backend, self.tmp_path, self.standin, self.sandbox_id = backend, tmp_path, standin, sandbox_id
        self.pulls = 0

    def exists(self, name: str) -> bool:
        if self.backend == "local":
            return (self.tmp_path / "sandboxes" / self.sandbox_id / name).exists()
        assert self.standin is not None
        return self.standin.sandboxes[self.sandbox_id].host(f"/home/user/{name}").exists()

    async def for_cli(self, files: list[str]) -> Path:
        if self.backend == "local":
            return self.tmp_path / "sandboxes" / self.sandbox_id
        assert self.standin is not None
        self.pulls += 1
        present = [f for f in files if self.standin.sandboxes[self.sandbox_id].host(f).exists()]
        return await pull_home(self.standin, self.sandbox_id, present, self.tmp_path / f"pulled-{self.pulls}")


@pytest.mark.parametrize("backend", ["local", "e2b"])
async def test_refresh_reinjects_and_revoke_scrubs_every_live_sandbox(
    backend: str, nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin, claude_bin: str,
) -> None:
    user, other_user = uid("user"), uid("other")
    first, refreshed = make_bundle(), make_bundle()
    fake_vault.users[user] = first
    fake_vault.users[other_user] = make_bundle()
    if backend == "e2b":
        ids = [e2b_standin.add_sandbox().sandbox_id for _ in range(3)]
    else:
        ids = [uid("sbx") for _ in range(3)]
    mine, theirs = ids[:2], ids[2]
    settings = settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin))
    created = [sandbox_created(user_id=user, sandbox_id=sid, backend=backend,
                              options=SandboxOptions(mode="access_only")) for sid in mine]
    created.append(sandbox_created(user_id=other_user, sandbox_id=theirs, backend=backend))

    async with running(settings):
        for event in created:
            await publish_created(nc, event)
        for sid in ids:
            await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sid)

        # --- the vault refreshed the person's login: every live sandbox gets the new token
        fake_vault.users[user] = refreshed
        refresh = TokensRefreshed(user_id=user, expires_at=refreshed.expires_at, scopes=refreshed.scopes, version=2)
        await publish(nc, subjects.TOKENS_REFRESHED, refresh)
        reinjected = [await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sid, refreshed_by=refresh.event_id)
                      for sid in mine]

        # --- the person revoked: the credentials leave every live sandbox, and it is reported
        revoke = TokensRevoked(user_id=user, reason="user_request")
        await publish(nc, subjects.TOKENS_REVOKED, revoke)
        scrubbed = [await collector.event(subjects.SANDBOX_CREDENTIALS_SCRUBBED, sid) for sid in mine]

    for event in reinjected:
        assert event["cause_event_id"] in {e.event_id for e in created}
        assert event["expires_at"] == refreshed.expires_at and event["mode"] == "access_only"
    # two creations, then one fetch per sandbox for the refresh: each under its own grant
    assert len(fake_vault.requests_for(user)) == 4
    assert {r.sandbox_id for r in fake_vault.requests_for(user)[2:]} == set(mine)
    creds = "/home/user/.claude/.credentials.json" if backend == "e2b" else None
    for event, sid in zip(scrubbed, mine, strict=True):
        assert (event["cause_event_id"], event["reason"], event["sandbox_gone"]) == (revoke.event_id, "user_request",
                                                                                     False)
        assert len(event["files"]) == 1 and event["files"][0].endswith(".claude/.credentials.json")
        if creds:
            assert event["files"] == [creds]
        home = Home(backend, tmp_path, e2b_standin, sid)
        assert not home.exists(".claude/.credentials.json")
        assert home.exists(".claude.json")  # onboarding flags stay
    # the other person's sandbox was never touched
    assert collector.events(subjects.SANDBOX_CREDENTIALS_SCRUBBED, theirs) == []
    assert len(collector.events(subjects.SANDBOX_CREDENTIALS_INJECTED, theirs)) == 1
    # no token on the bus, ever (the KV records included: they flow over $KV.* subjects)
    for _, data in collector.messages:
        assert first.access_token.encode() not in data and refreshed.access_token.encode() not in data

    # the real CLI: logged out after the scrub...
    files = ["/home/user/.claude.json", "/home/user/.claude/settings.json"]
    home = await Home(backend, tmp_path, e2b_standin, mine[0]).for_cli(files)
    assert (await claude_status(claude_bin, home))["loggedIn"] is False
    # ...and the other person's sandbox still logs in
    theirs_home = Home(backend, tmp_path, e2b_standin, theirs)
    files_theirs = collector.events(subjects.SANDBOX_CREDENTIALS_INJECTED, theirs)[0]["files"]
    assert (await claude_status(claude_bin, await theirs_home.for_cli(files_theirs)))["loggedIn"] is True


async def test_refreshed_token_reaches_the_real_cli(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector, claude_bin: str,
) -> None:
    user, sid = uid("user"), uid("sbx")
    old, new = make_bundle(), make_bundle()
    fake_vault.users[user] = old
    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, sandbox_created(user_id=user, sandbox_id=sid, options=SandboxOptions(mode="env")))
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sid)
        fake_vault.users[user] = new
        refresh = TokensRefreshed(user_id=user, expires_at=new.expires_at, scopes=new.scopes, version=2)
        await publish(nc, subjects.TOKENS_REFRESHED, refresh)
        event = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sid, refreshed_by=refresh.event_id)
    home = tmp_path / "sandboxes" / sid
    env_file = (home / ".config/ccbridge/env").read_text()
    assert new.access_token in env_file and old.access_token not in env_file
    assert event["files"] == [str(home.resolve() / ".config/ccbridge/env"), str(home.resolve() / ".claude.json"),
                              str(home.resolve() / ".claude/settings.json")]
    status = await claude_status(claude_bin, home, shell_prefix=f". '{home}/.config/ccbridge/env' &&")
    assert (status["loggedIn"], status["authMethod"]) == (True, "oauth_token")


async def test_destroyed_sandbox_is_forgotten_and_a_late_created_is_refused(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user, kept, gone, never = uid("user"), uid("sbx"), uid("sbx"), uid("sbx")
    fake_vault.users[user] = make_bundle()
    async with running(settings_for(nats_url, tmp_path)) as service:
        registry = service.injector.registry
        for sid in (kept, gone):
            await publish_created(nc, sandbox_created(user_id=user, sandbox_id=sid))
            await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sid)
        await publish(nc, subjects.SANDBOX_DESTROYED, SandboxDestroyed(user_id=user, sandbox_id=gone))
        # destroyed before its sandbox.created was handled (different consumers: any order)
        await publish(nc, subjects.SANDBOX_DESTROYED, SandboxDestroyed(user_id=user, sandbox_id=never))

        async def forgotten() -> bool:
            return (await registry.get(user, gone)).destroyed and (await registry.get(user, never)).destroyed

        await until(forgotten, "the destroyed sandboxes to be forgotten")
        late = sandbox_created(user_id=user, sandbox_id=never)
        await publish_created(nc, late)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, never)

        fake_vault.users[user] = make_bundle()
        refresh = TokensRefreshed(user_id=user, expires_at=1, scopes=[], version=2)
        await publish(nc, subjects.TOKENS_REFRESHED, refresh)
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, kept, refreshed_by=refresh.event_id)
        live = {record.sandbox_id for record, _ in await registry.for_user(user)}

    assert (failed["reason"], failed["retryable"], failed["cause_event_id"]) == ("sandbox_not_found", False,
                                                                                 late.event_id)
    assert not (tmp_path / "sandboxes" / never).exists()  # nothing was written for it
    assert live == {kept}
    assert [e for e in collector.events(subjects.SANDBOX_CREDENTIALS_INJECTED, gone) if e.get("refreshed_by")] == []


async def test_created_from_before_a_revocation_is_not_injected(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    """The vault may still hold the connection when a backlogged sandbox.created arrives after
    tokens.revoked: the revocation time decides, not the order of arrival."""
    user, sid = uid("user"), uid("sbx")
    fake_vault.users[user] = make_bundle()  # the vault has not processed the revocation yet
    stale = sandbox_created(user_id=user, sandbox_id=sid, occurred_at=datetime.now(UTC) - timedelta(minutes=5))
    async with running(settings_for(nats_url, tmp_path)) as service:
        await publish(nc, subjects.TOKENS_REVOKED, TokensRevoked(user_id=user))

        async def marked() -> bool:
            return await service.injector.registry.revoked_at(user) is not None

        await until(marked, "the revocation to be recorded")
        await publish_created(nc, stale)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, sid)
        fresh = sandbox_created(user_id=user, sandbox_id=uid("sbx"))  # after the revocation: fine
        await publish_created(nc, fresh)
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, fresh.sandbox_id)
    assert (failed["reason"], failed["retryable"]) == ("not_connected", False)
    assert "revoked" in failed["detail"]
    assert fake_vault.requests_for(user) and all(r.user_id == user for r in fake_vault.requests_for(user))
    assert len(fake_vault.requests_for(user)) == 1  # only the fresh one asked the vault
    assert not (tmp_path / "sandboxes" / sid / ".claude/.credentials.json").exists()


@asynccontextmanager
async def gated_replicas(nats_url: str, tmp_path: Path) -> AsyncIterator[tuple[list[list[str]], list[SandboxService]]]:
    """Two replicas (one message at a time each). Replica A's first injection waits until B
    has done one, so the test knows for sure that both took work from the shared durable."""
    handled: list[list[str]] = [[], []]
    b_did_one = asyncio.Event()

    class Recording(LocalBackend):
        def __init__(self, root: Path, index: int) -> None:
            super().__init__(root)
            self.index = index

        @asynccontextmanager
        async def open(self, event: Any, *, must_exist: bool = False) -> AsyncIterator[Any]:
            if self.index == 0 and not handled[0]:
                await asyncio.wait_for(b_did_one.wait(), WAIT)
            async with super().open(event, must_exist=must_exist) as sandbox:
                yield sandbox
            handled[self.index].append(event.sandbox_id)
            if self.index == 1:
                b_did_one.set()

    services = []
    for index in range(2):
        settings = settings_for(nats_url, tmp_path / f"replica-{index}", concurrency=1,
                                local_sandbox_root=tmp_path / "sandboxes",
                                data_dir=tmp_path / "data")  # same key: same fingerprints
        services.append(SandboxService(settings, backend=Recording(tmp_path / "sandboxes", index)))
    for service in services:
        await service.start()
    try:
        yield handled, services
    finally:
        for service in services:
            await service.stop()


async def test_replicas_share_the_work_and_each_sandbox_is_injected_once(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user = uid("user")
    fake_vault.users[user] = make_bundle()
    events = [sandbox_created(user_id=user, sandbox_id=uid("sbx")) for _ in range(12)]
    async with gated_replicas(nats_url, tmp_path) as (handled, _):
        for event in events:
            await publish_created(nc, event)
        for event in events:
            await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, event.sandbox_id)
    assert handled[0] and handled[1]  # both replicas took messages from the one durable
    assert sorted(handled[0] + handled[1]) == sorted(e.sandbox_id for e in events)  # each exactly once


async def test_mcp_server_is_registered_where_the_real_cli_reads_it(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector, claude_bin: str,
) -> None:
    user, sid = uid("user"), uid("sbx")
    fake_vault.users[user] = make_bundle()
    home = tmp_path / "sandboxes" / sid
    home.mkdir(parents=True)
    existing = {"type": "stdio", "command": "other-server", "args": [], "env": {}}
    (home / ".claude.json").write_text(json.dumps({"mcpServers": {"mine": existing}}))
    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, sandbox_created(user_id=user, sandbox_id=sid, options=SandboxOptions(mcp=True)))
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sid)
    servers = json.loads((home / ".claude.json").read_text())["mcpServers"]
    assert servers["mine"] == existing  # kept
    # a stub npx: the CLI's health check may run it, but must not reach the npm registry
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "npx").write_text("#!/bin/sh\nexit 1\n")
    os.chmod(stub / "npx", 0o755)
    path = f"{stub}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    # the `mcp` commands run on a copy without the credentials: logged in, the CLI also asks
    # claude.ai for remote MCP connectors (network, not loopback); the registration is in .claude.json
    config_home = tmp_path / "config-only-home"
    (config_home / ".claude").mkdir(parents=True)
    shutil.copy2(home / ".claude.json", config_home / ".claude.json")
    shutil.copy2(home / ".claude/settings.json", config_home / ".claude/settings.json")
    rc, out, err = await run_claude(claude_bin, config_home, "mcp", "get", "claude-code-mcp", PATH=path)
    text = out.decode()
    assert rc == 0, err.decode()[-500:]
    assert "Scope: User config" in text
    assert "Type: stdio" in text and "Command: npx" in text
    assert "Args: -y @steipete/claude-code-mcp@1.10.12" in text  # pinned: never a moving tag
    rc, out, _ = await run_claude(claude_bin, config_home, "mcp", "list", PATH=path)
    assert "claude-code-mcp: npx -y @steipete/claude-code-mcp@1.10.12" in out.decode()
    assert "mine: other-server" in out.decode()
    assert (await claude_status(claude_bin, home))["loggedIn"] is True


async def test_live_registry_is_a_shared_kv_bucket_without_tokens(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user, sid = uid("user"), uid("sbx")
    bundle = make_bundle()
    fake_vault.users[user] = bundle
    async with running(settings_for(nats_url, tmp_path)):
        await publish_created(nc, sandbox_created(user_id=user, sandbox_id=sid))
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sid)
    # read it as any other replica (or a restarted service) would
    kv = await open_live_bucket(nc.jetstream())
    entry = await kv.get(record_key(user, sid))
    record = json.loads(entry.value)
    assert (record["user_id"], record["sandbox_id"], record["state"], record["mode"]) == (
        user, sid, "injected", "access_only")  # the default mode: the refresh token stays in the vault
    assert record["expires_at"] == bundle.expires_at and len(record["fingerprint"]) == 32
    assert bundle.access_token not in entry.value.decode() and bundle.refresh_token not in entry.value.decode()
    assert PurePosixPath(record["files"][0]).name == ".credentials.json"
