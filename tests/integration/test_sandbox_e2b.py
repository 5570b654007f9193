"""The e2b backend end to end with the REAL e2b SDK against the loopback stand-in
(standins/e2b.py: control plane + envd speaking the SDK's wire protocol), on a real
nats-server, with a fake vault on NATS and the real Claude Code CLI reading the files pulled
back out of the stand-in sandbox."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest
from nats.aio.client import Client
from pydantic import SecretStr

from services.sandbox.adapters.backends.base import Target
from services.sandbox.adapters.backends.e2b import E2BBackend, E2BConfig
from services.sandbox.errors import BackendError, BackendUnavailable, SandboxNotFound
from shared import subjects
from shared.events import CredentialMode, SandboxOptions
from standins.e2b import E2BStandin
from tests.grants import sandbox_created
from tests.sandbox_fixtures import (  # noqa: F401 - fixtures
    SCOPES,
    Collector,
    FakeVault,
    claude_status,
    collector,
    e2b_settings,
    e2b_standin,
    fake_vault,
    make_bundle,
    nc,
    publish_created,
    pull_home,
    running,
    settings_for,
    stored,
    uid,
)

HOME = "/home/user"
CREDS = f"{HOME}/.claude/.credentials.json"
ENV_FILE = f"{HOME}/.config/ccbridge/env"


def backend(standin: E2BStandin, **overrides: object) -> E2BBackend:
    config = {"api_key": SecretStr(standin.api_key), "api_url": standin.api_url, "sandbox_url": standin.sandbox_url,
              "request_timeout": 1.0, "request_retries": 0, **overrides}
    return E2BBackend(E2BConfig(**config))  # type: ignore[arg-type]


# --- the backend on its own -----------------------------------------------------------------
async def test_backend_writes_0600_files_owned_by_the_user_and_reads_them_back(e2b_standin: E2BStandin) -> None:
    sbx = e2b_standin.add_sandbox()
    async with backend(e2b_standin).open(Target(event_id="evt-00000001", sandbox_id=sbx.sandbox_id,
                                                backend="e2b")) as sandbox:
        assert sandbox.home == PurePosixPath(HOME)
        assert sandbox.backend_sandbox_id is None  # connected, not created
        await sandbox.make_dir(PurePosixPath(f"{HOME}/.claude"), 0o700)
        await sandbox.make_dir(PurePosixPath(f"{HOME}/.claude"), 0o700)  # an existing dir is fine
        await sandbox.write_file(PurePosixPath(CREDS), b'{"claudeAiOauth": {}}\n', 0o600)
        await sandbox.write_file(PurePosixPath(CREDS), b'{"claudeAiOauth": {"x": 1}}\n', 0o600)  # replace
        assert await sandbox.read_file(PurePosixPath(CREDS)) == b'{"claudeAiOauth": {"x": 1}}\n'
        assert await sandbox.read_file(PurePosixPath(f"{HOME}/absent.json")) is None
        await sandbox.remove(PurePosixPath(CREDS))
        assert await sandbox.read_file(PurePosixPath(CREDS)) is None

    assert sbx.mode(f"{HOME}/.claude") == 0o700
    assert sbx.owner(f"{HOME}/.claude") == "user:user"
    commands = [(user, cmd.split()[0]) for user, cmd, _ in sbx.commands]
    assert ("root", "chown") in commands  # the dir made the user's by root
    assert ("user", "chmod") in commands  # chmod 600 before the move
    assert all(code == 0 for _, _, code in sbx.commands)
    assert [p.name for p in sbx.fs.rglob("*ccbridge-tmp*")] == []


async def test_backend_file_is_never_visible_with_other_bits(e2b_standin: E2BStandin) -> None:
    """envd creates files 0644; the temp file is chmod-ed before it is moved into place."""
    sbx = e2b_standin.add_sandbox()
    async with backend(e2b_standin).open(Target(event_id="evt-00000002", sandbox_id=sbx.sandbox_id,
                                                backend="e2b")) as sandbox:
        await sandbox.make_dir(PurePosixPath(f"{HOME}/.claude"), 0o700)
        await sandbox.write_file(PurePosixPath(CREDS), b"{}", 0o600)
    [move] = [cmd for _, cmd, _ in sbx.commands if " mv -f " in cmd]
    assert move.index("chmod 600") < move.index("mv -f")
    assert sbx.mode(CREDS) == 0o600 and sbx.owner(CREDS) == "user:user"


@pytest.mark.parametrize(
    ("inject", "error", "retryable", "reason"),
    [
        (lambda s: s.fail("files.write", status=500), BackendError, True, "backend_error"),
        (lambda s: s.fail("make_dir", status=500), BackendError, True, "backend_error"),
        (lambda s: s.fail("process", status=500), BackendError, True, "backend_error"),
        (lambda s: s.fail("files.write", status=403), BackendError, False, "backend_error"),
        (lambda s: s.deny(f"{HOME}/.claude"), BackendError, False, "backend_error"),
        (lambda s: s.slow("files.write", 2.5), BackendUnavailable, True, "backend_unavailable"),
        (lambda s: s.slow("process", 2.5), BackendUnavailable, True, "backend_unavailable"),
        (lambda s: s.fail("files.write", status=429), BackendUnavailable, True, "backend_unavailable"),
    ],
    ids=["files-500", "mkdir-500", "process-500", "files-403", "permission-denied", "files-timeout",
         "process-timeout", "rate-limited"],
)
async def test_backend_maps_envd_failures(e2b_standin: E2BStandin, inject, error, retryable, reason) -> None:  # type: ignore[no-untyped-def]
    sbx = e2b_standin.add_sandbox()
    async with backend(e2b_standin).open(Target(event_id="evt-00000003", sandbox_id=sbx.sandbox_id,
                                                backend="e2b")) as sandbox:
        inject(e2b_standin)
        with pytest.raises(error) as info:
            await sandbox.make_dir(PurePosixPath(f"{HOME}/.claude"), 0o700)
            await sandbox.write_file(PurePosixPath(CREDS), b"{}", 0o600)
    assert (info.value.retryable, info.value.reason) == (retryable, reason)
    if "permission" in info.value.detail:
        assert info.value.detail.count("permission denied") >= 1


async def test_backend_maps_control_plane_failures(e2b_standin: E2BStandin) -> None:
    missing = Target(event_id="evt-00000004", sandbox_id="i-never-made", backend="e2b")
    with pytest.raises(SandboxNotFound):
        async with backend(e2b_standin).open(missing):
            pass
    sbx = e2b_standin.add_sandbox()
    target = Target(event_id="evt-00000005", sandbox_id=sbx.sandbox_id, backend="e2b")
    with pytest.raises(BackendUnavailable) as bad_key:
        async with backend(e2b_standin, api_key=SecretStr("e2b_wrong")).open(target):
            pass
    assert bad_key.value.retryable is False
    with pytest.raises(BackendUnavailable) as no_key:
        async with backend(e2b_standin, api_key=None).open(target):
            pass
    assert no_key.value.retryable is False and "E2B_API_KEY" in no_key.value.detail
    e2b_standin.slow("connect", 2.5)
    with pytest.raises(BackendUnavailable) as slow:
        async with backend(e2b_standin).open(target):
            pass
    assert slow.value.retryable is True
    e2b_standin.kill(sbx.sandbox_id)
    with pytest.raises(SandboxNotFound):
        async with backend(e2b_standin).open(target):
            pass


# --- the service over NATS --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "mcp"), [("file", False), ("access_only", True), ("env", False)], ids=["file", "access_only+mcp", "env"]
)
async def test_every_mode_into_e2b_is_accepted_by_the_real_cli(
    mode: CredentialMode, mcp: bool, nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault,
    collector: Collector, e2b_standin: E2BStandin, claude_bin: str,
) -> None:
    user = uid("user")
    bundle = make_bundle()
    fake_vault.users[user] = bundle
    sbx = e2b_standin.add_sandbox()
    # the template already put a config there: it must survive the merge
    sbx.host(f"{HOME}/.claude.json").write_text(json.dumps({"numStartups": 2}))
    sbx.owners[f"{HOME}/.claude.json"] = "user:user"
    event = sandbox_created(user_id=user, sandbox_id=sbx.sandbox_id, backend="e2b", home=HOME, user="user",
                           options=SandboxOptions(mode=mode, mcp=mcp))

    async with running(settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin))):
        await publish_created(nc, event)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sbx.sandbox_id)

    assert (injected["backend"], injected["mode"], injected["cause_event_id"]) == ("e2b", mode, event.event_id)
    assert injected["backend_sandbox_id"] is None
    secret = ENV_FILE if mode == "env" else CREDS
    assert set(injected["files"]) == {secret, f"{HOME}/.claude.json", f"{HOME}/.claude/settings.json"}
    for path in injected["files"]:
        assert sbx.mode(path) == 0o600, path
        assert sbx.owner(path) == "user:user", path
    assert sbx.mode(f"{HOME}/.claude") == 0o700
    config = json.loads(sbx.read(f"{HOME}/.claude.json"))
    assert config["numStartups"] == 2 and config["hasCompletedOnboarding"] is True
    for _, data in collector.messages:
        assert bundle.access_token.encode() not in data

    home = await pull_home(e2b_standin, sbx.sandbox_id, injected["files"], tmp_path / "pulled-home")
    if mode == "env":
        assert injected["env"] == {"CLAUDE_CODE_OAUTH_TOKEN": "access_token"}
        assert bundle.refresh_token.encode() not in (home / ".config/ccbridge/env").read_bytes()  # type: ignore[union-attr]
        assert (await claude_status(claude_bin, home))["loggedIn"] is False
        status = await claude_status(claude_bin, home, shell_prefix=f". '{home}/.config/ccbridge/env' &&")
        assert (status["loggedIn"], status["authMethod"]) == (True, "oauth_token")
        return
    oauth = json.loads((home / ".claude/.credentials.json").read_text())["claudeAiOauth"]
    assert oauth["accessToken"] == bundle.access_token and oauth["scopes"] == SCOPES
    assert ("refreshToken" in oauth) is (mode == "file")
    status = await claude_status(claude_bin, home)
    assert (status["loggedIn"], status["authMethod"]) == (True, "claude.ai")
    if mcp:
        assert config["mcpServers"]["claude-code-mcp"] == {
            "type": "stdio", "command": "npx", "args": ["-y", "@steipete/claude-code-mcp@1.10.12"], "env": {}
        }


async def test_template_creates_one_sandbox_even_when_the_event_comes_twice(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin,
) -> None:
    user, platform_id = uid("user"), uid("sbx")
    fake_vault.users[user] = make_bundle()
    event = sandbox_created(user_id=user, sandbox_id=platform_id, backend="e2b", template="")
    settings = settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin, e2b_template="claude-base"))
    async with running(settings):
        await publish_created(nc, event, msg_id=None)
        first = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, platform_id)
        await publish_created(nc, event, msg_id=None)  # stored again (no Nats-Msg-Id)
        await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, platform_id, count=2)
        # another event for the same platform sandbox reuses the e2b sandbox created for it
        again = sandbox_created(user_id=user, sandbox_id=platform_id, backend="e2b", template="")
        await publish_created(nc, again)
        second = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, platform_id,
                                       cause_event_id=again.event_id)

    created = first["backend_sandbox_id"]
    assert created and created != platform_id
    assert second["backend_sandbox_id"] == created
    assert e2b_standin.count("POST", "/v2/sandboxes") == 1
    sbx = e2b_standin.sandboxes[created]
    assert (sbx.template, sbx.metadata) == ("claude-base", {"ccbridge_sandbox_id": platform_id})
    assert sbx.mode(CREDS) == 0o600


async def test_envd_5xx_is_retried_then_injected(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin, claude_bin: str,
) -> None:
    user = uid("user")
    fake_vault.users[user] = make_bundle()
    sbx = e2b_standin.add_sandbox()
    e2b_standin.fail("files.write", status=503, times=2, sandbox_id=sbx.sandbox_id)
    event = sandbox_created(user_id=user, sandbox_id=sbx.sandbox_id, backend="e2b")
    async with running(settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin))):
        await publish_created(nc, event)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sbx.sandbox_id)

    assert injected["cause_event_id"] == event.event_id
    assert collector.events(subjects.SANDBOX_CREDENTIALS_FAILED, sbx.sandbox_id) == []
    assert len(fake_vault.requests_for(user)) == 3  # one per delivery
    home = await pull_home(e2b_standin, sbx.sandbox_id, injected["files"], tmp_path / "home")
    assert (await claude_status(claude_bin, home))["loggedIn"] is True


async def test_envd_5xx_that_never_ends_is_dead_lettered(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin,
) -> None:
    user = uid("user")
    fake_vault.users[user] = make_bundle()
    sbx = e2b_standin.add_sandbox()
    e2b_standin.fail("files.write", status=500, times=None, sandbox_id=sbx.sandbox_id)
    event = sandbox_created(user_id=user, sandbox_id=sbx.sandbox_id, backend="e2b")
    async with running(settings_for(nats_url, tmp_path, max_deliver=3, **e2b_settings(e2b_standin))):
        await publish_created(nc, event)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, sbx.sandbox_id)
        await collector.wait(lambda m: m[0] == "dlq.sandbox.created" and m[1] == event.model_dump_json().encode())

    assert (failed["reason"], failed["retryable"]) == ("backend_error", True)
    assert "after 3 deliveries" in failed["detail"] and "500" in failed["detail"]
    dead = await stored(nc, subjects.DLQ_STREAM.name, "dlq.sandbox.created",
                        lambda m: m.data == event.model_dump_json().encode())
    assert len(dead) == 1 and dead[0].headers["Ccbridge-Reason"].startswith("backend_error")  # type: ignore[index]
    assert not sbx.host(CREDS).exists()


async def test_envd_timeout_is_retried(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin,
) -> None:
    user = uid("user")
    fake_vault.users[user] = make_bundle()
    sbx = e2b_standin.add_sandbox()
    e2b_standin.slow("process", 3.0, times=1, sandbox_id=sbx.sandbox_id)
    event = sandbox_created(user_id=user, sandbox_id=sbx.sandbox_id, backend="e2b")
    settings = settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin, e2b_request_timeout=1.0))
    async with running(settings):
        await publish_created(nc, event)
        injected = await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sbx.sandbox_id)
    assert injected["cause_event_id"] == event.event_id
    assert len(fake_vault.requests_for(user)) == 2  # the timed-out delivery, then the good one
    assert sbx.mode(CREDS) == 0o600


async def test_unknown_sandbox_fails_with_sandbox_not_found_at_once(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin,
) -> None:
    user, sandbox_id = uid("user"), uid("gone")
    fake_vault.users[user] = make_bundle()
    event = sandbox_created(user_id=user, sandbox_id=sandbox_id, backend="e2b")
    async with running(settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin))):
        await publish_created(nc, event)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, sandbox_id)
    assert (failed["reason"], failed["retryable"]) == ("sandbox_not_found", False)
    assert e2b_standin.count("POST", "/v2/sandboxes/{id}/connect", sandbox_id) == 1  # final: not retried
    assert collector.events(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id) == []


async def test_permission_denied_is_final(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin,
) -> None:
    user = uid("user")
    fake_vault.users[user] = make_bundle()
    sbx = e2b_standin.add_sandbox()
    e2b_standin.deny(f"{HOME}/.claude", sandbox_id=sbx.sandbox_id)
    event = sandbox_created(user_id=user, sandbox_id=sbx.sandbox_id, backend="e2b")
    async with running(settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin))):
        await publish_created(nc, event)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, sbx.sandbox_id)
    assert (failed["reason"], failed["retryable"]) == ("backend_error", False)
    assert "permission denied" in failed["detail"]
    assert len(fake_vault.requests_for(user)) == 1
    assert not sbx.host(CREDS).exists()


async def test_a_sandbox_created_for_an_event_that_finally_fails_is_killed(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
    e2b_standin: E2BStandin,
) -> None:
    user, platform_id = uid("user"), uid("sbx")
    fake_vault.users[user] = make_bundle()
    e2b_standin.deny(f"{HOME}/.claude")  # every sandbox, including the one about to be created
    event = sandbox_created(user_id=user, sandbox_id=platform_id, backend="e2b", template="base")
    async with running(settings_for(nats_url, tmp_path, **e2b_settings(e2b_standin))):
        await publish_created(nc, event)
        failed = await collector.event(subjects.SANDBOX_CREDENTIALS_FAILED, platform_id)
    assert (failed["reason"], failed["retryable"]) == ("backend_error", False)
    [created] = [s for s in e2b_standin.sandboxes.values() if s.metadata.get("ccbridge_sandbox_id") == platform_id]
    assert created.alive is False  # killed: nobody else knows its id
    assert e2b_standin.count("DELETE", "/sandboxes/{id}", created.sandbox_id) == 1
