"""The e2b backend end to end with the REAL e2b SDK against the loopback stand-in
(standins/e2b.py: control plane + envd speaking the SDK's wire protocol), on a real
nats-server, with a fake vault on NATS and the real Claude Code CLI reading the files pulled
back out of the stand-in sandbox."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path, PurePosixPath

import pytest
from nats.aio.client import Client
from pydantic import SecretStr

from services.sandbox import domain
from services.sandbox.adapters.backends.base import Target
from services.sandbox.adapters.backends.e2b import E2BBackend, E2BConfig
from services.sandbox.errors import BackendError, BackendUnavailable, SandboxNotFound
from services.sandbox.writer import Written, write_credentials
from shared import subjects
from shared.events import CredentialMode, SandboxOptions
from standins.e2b import E2BStandin, StandinSandbox
from tests.grants import sandbox_created
from tests.sandbox_fixtures import (
    SCOPES,
    Collector,
    FakeVault,
    claude_status,
    e2b_settings,
    make_bundle,
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
    return E2BBackend(E2BConfig(**config))


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
    assert {user for user, _, _ in sbx.commands} == {"user"}  # never root
    assert all(code == 0 for _, _, code in sbx.commands)
    assert [p.name for p in sbx.fs.rglob("*ccbridge-tmp*")] == []
    assert list(sbx.host("/tmp").iterdir()) == []  # no staged copy left


async def test_backend_file_is_never_visible_with_other_bits(e2b_standin: E2BStandin) -> None:
    """envd creates files 0644 (in /tmp, under a name nobody can guess); the staged copy is
    chmod-ed before it is moved next to the target and renamed over it."""
    sbx = e2b_standin.add_sandbox()
    async with backend(e2b_standin).open(Target(event_id="evt-00000002", sandbox_id=sbx.sandbox_id,
                                                backend="e2b")) as sandbox:
        await sandbox.make_dir(PurePosixPath(f"{HOME}/.claude"), 0o700)
        await sandbox.write_file(PurePosixPath(CREDS), b"{}", 0o600)
    [move] = [cmd for _, cmd, _ in sbx.commands if " mv -f " in cmd]
    [staged] = {word.strip("'") for word in move.split() if word.startswith("/tmp/.ccbridge-stage-")}
    assert len(staged) > len("/tmp/.ccbridge-stage-") + 32  # 128 random bits
    assert move.index(f"chmod 600 -- {staged}") < move.index(f"mv -f -- {staged}")
    assert move.index("umask 077") == 0
    assert sbx.mode(CREDS) == 0o600 and sbx.owner(CREDS) == "user:user"


@pytest.mark.parametrize(
    ("inject", "error", "retryable", "reason"),
    [
        (lambda s: s.fail("files.write", status=500), BackendError, True, "backend_error"),
        (lambda s: s.fail("process", status=403), BackendError, False, "backend_error"),
        (lambda s: s.fail("process", status=500), BackendError, True, "backend_error"),
        (lambda s: s.fail("files.write", status=403), BackendError, False, "backend_error"),
        (lambda s: s.deny(f"{HOME}/.claude"), BackendError, False, "backend_error"),
        (lambda s: s.slow("files.write", 2.5), BackendUnavailable, True, "backend_unavailable"),
        (lambda s: s.slow("process", 2.5), BackendUnavailable, True, "backend_unavailable"),
        (lambda s: s.fail("files.write", status=429), BackendUnavailable, True, "backend_unavailable"),
    ],
    ids=["files-500", "process-403", "process-500", "files-403", "permission-denied", "files-timeout",
         "process-timeout", "rate-limited"],
)
async def test_backend_maps_envd_failures(e2b_standin: E2BStandin, inject, error, retryable, reason) -> None:
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


async def test_an_api_outage_names_e2b_as_the_dependency_that_is_down(e2b_standin: E2BStandin) -> None:
    """429 and 502 from e2b's API (the stand-in's outage switch) are e2b being down: the breaker's
    business, not one sandbox's failure; when the window ends, connect works again."""
    sbx = e2b_standin.add_sandbox()
    target = Target(event_id="evt-00000006", sandbox_id=sbx.sandbox_id, backend="e2b")
    e2b_standin.outage(30)
    for _ in range(2):  # 429, then 502
        with pytest.raises(BackendUnavailable) as down:
            async with backend(e2b_standin).open(target):
                pass
        assert (down.value.retryable, down.value.dependency) == (True, "e2b")
    assert [f.answered for f in e2b_standin.faults if f.op == "connect"] == [2]
    e2b_standin.clear_faults()
    e2b_standin.outage(0.3)  # a window ends by itself
    await asyncio.sleep(0.4)
    async with backend(e2b_standin).open(target) as sandbox:
        assert sandbox.home == PurePosixPath(HOME)


# --- a sandbox user who plants links (agent code runs as that user) ------------------------
async def inject(standin: E2BStandin, sbx: StandinSandbox, mode: CredentialMode = "file", **kwargs: object) -> Written:
    bundle = kwargs.pop("bundle", None) or make_bundle()
    async with backend(standin, **kwargs).open(Target(event_id="evt-00000009", sandbox_id=sbx.sandbox_id,
                                                      backend="e2b")) as sandbox:
        layout = domain.resolve_layout(sandbox.home)
        return await write_credentials(sandbox, layout, mode, bundle)


async def attempt(standin: E2BStandin, sbx: StandinSandbox) -> BackendError | None:
    try:
        await inject(standin, sbx)
    except BackendError as exc:
        return exc
    return None


def no_root_process(sbx: StandinSandbox) -> None:
    assert [cmd for user, cmd, _ in sbx.commands if user != "user"] == []


async def test_a_config_dir_planted_as_a_link_to_a_root_dir_gains_the_user_nothing(e2b_standin: E2BStandin) -> None:
    sbx = e2b_standin.add_sandbox()
    before = sorted(os.listdir(sbx.host("/etc")))
    sbx.symlink(f"{HOME}/.claude", "/etc")  # ~/.claude -> /etc, planted by the sandbox user

    error = await attempt(e2b_standin, sbx)

    assert (sbx.owner("/etc"), sbx.mode("/etc")) == ("root:root", 0o755)  # not handed to the user
    assert sorted(os.listdir(sbx.host("/etc"))) == before  # no credential (or temp copy) landed there
    assert sbx.owner("/etc/passwd") == "root:root"
    no_root_process(sbx)
    assert error is not None and error.retryable is False
    assert "symbolic link" in error.detail and f"{HOME}/.claude" in error.detail
    assert list(sbx.host("/tmp").iterdir()) == []  # the staged copies are gone too


async def test_a_temp_name_planted_as_a_link_is_replaced_not_followed(e2b_standin: E2BStandin) -> None:
    sbx = e2b_standin.add_sandbox()
    sbx.make(f"{HOME}/.claude", owner="user", mode=0o700)
    passwd = sbx.read("/etc/passwd")
    for name in (".credentials.json", "settings.json"):  # where the old backend put its temp copies
        sbx.symlink(f"{HOME}/.claude/.{name}.ccbridge-tmp", "/etc/passwd")

    await inject(e2b_standin, sbx)

    assert (sbx.read("/etc/passwd"), sbx.owner("/etc/passwd"), sbx.mode("/etc/passwd")) == (passwd, "root:root", 0o644)
    assert not sbx.is_link(CREDS) and sbx.owner(CREDS) == "user:user" and sbx.mode(CREDS) == 0o600
    assert json.loads(sbx.read(CREDS))["claudeAiOauth"]["scopes"] == SCOPES
    no_root_process(sbx)


async def test_a_merged_file_linked_to_a_root_file_is_not_read_as_root(e2b_standin: E2BStandin) -> None:
    sbx = e2b_standin.add_sandbox()
    sbx.put("/root/.claude.json", json.dumps({"primaryApiKey": "sk-root-only"}), owner="root", mode=0o600)
    sbx.symlink(f"{HOME}/.claude.json", "/root/.claude.json")

    await inject(e2b_standin, sbx)

    config = sbx.read(f"{HOME}/.claude.json")
    assert b"sk-root-only" not in config and json.loads(config)["hasCompletedOnboarding"] is True
    assert not sbx.is_link(f"{HOME}/.claude.json") and sbx.owner(f"{HOME}/.claude.json") == "user:user"
    assert (sbx.owner("/root/.claude.json"), sbx.mode("/root/.claude.json")) == ("root:root", 0o600)
    no_root_process(sbx)


async def test_a_config_dir_the_template_made_as_root_fails_for_good_and_says_why(e2b_standin: E2BStandin) -> None:
    sbx = e2b_standin.add_sandbox()
    sbx.make(f"{HOME}/.claude", owner="root", mode=0o755)

    error = await attempt(e2b_standin, sbx)

    assert error is not None and error.retryable is False
    assert "template" in error.detail and f"{HOME}/.claude" in error.detail
    assert (sbx.owner(f"{HOME}/.claude"), sbx.mode(f"{HOME}/.claude")) == ("root:root", 0o755)
    assert not sbx.host(CREDS).exists()
    no_root_process(sbx)


# --- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["file", "access_only", "env"])
async def test_an_injection_takes_at_most_four_round_trips(e2b_standin: E2BStandin, mode: CredentialMode) -> None:
    """connect, one read (the files to merge), one upload (every changed file), one command
    (dirs, modes, renames, and what the service verifies) — fresh home or not."""
    sbx = e2b_standin.add_sandbox()
    trips, results = [], []
    first, second = make_bundle(), make_bundle()
    for bundle in (first, second, second):  # a fresh home, new tokens, the same tokens again
        before = e2b_standin.round_trips(sbx.sandbox_id)
        results.append(await inject(e2b_standin, sbx, mode, bundle=bundle))
        trips.append(e2b_standin.round_trips(sbx.sandbox_id) - before)
    assert trips == [4, 4, 4]
    secret = ENV_FILE if mode == "env" else CREDS
    assert set(results[0].written) == {secret, f"{HOME}/.claude.json", f"{HOME}/.claude/settings.json"}
    assert results[1].written == (secret,)  # the merged files already hold the flags
    assert results[2].written == ()  # the same bytes are never rewritten
    assert sbx.mode(secret) == 0o600 and sbx.owner(secret) == "user:user"
    assert list(sbx.host("/tmp").iterdir()) == []
    no_root_process(sbx)


async def test_a_merged_file_too_large_to_merge_fails_for_good(e2b_standin: E2BStandin) -> None:
    from services.sandbox.adapters.backends.e2b import MAX_MERGE_BYTES

    sbx = e2b_standin.add_sandbox()
    sbx.put(f"{HOME}/.claude.json", b"{" + b" " * MAX_MERGE_BYTES + b"}", owner="user", mode=0o600)
    error = await attempt(e2b_standin, sbx)
    assert error is not None and error.retryable is False and "larger than" in error.detail
    assert not sbx.host(CREDS).exists()


async def test_a_merged_path_that_is_a_directory_fails_for_good(e2b_standin: E2BStandin) -> None:
    sbx = e2b_standin.add_sandbox()
    sbx.make(f"{HOME}/.claude.json", owner="user", mode=0o700)
    error = await attempt(e2b_standin, sbx)
    assert error is not None and error.retryable is False and "not a regular file" in error.detail


async def test_staged_copies_a_crash_left_are_swept(e2b_standin: E2BStandin) -> None:
    sbx = e2b_standin.add_sandbox()
    sbx.put("/tmp/.ccbridge-stage-" + "ab" * 16 + "-0", "token", owner="user", mode=0o644)
    os.utime(sbx.host("/tmp/.ccbridge-stage-" + "ab" * 16 + "-0"), (1, 1))
    await inject(e2b_standin, sbx)
    assert list(sbx.host("/tmp").iterdir()) == []


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
        assert bundle.refresh_token.encode() not in (home / ".config/ccbridge/env").read_bytes()
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

    # one sandbox's envd failing is its own problem: retried with backoff up to the cap, no pause
    assert (failed["reason"], failed["retryable"]) == ("backend_error", True)
    assert ", 3 deliveries)" in failed["detail"] and "500" in failed["detail"]
    dead = await stored(nc, subjects.DLQ_STREAM.name, "dlq.sandbox.created",
                        lambda m: m.data == event.model_dump_json().encode())
    assert len(dead) == 1 and dead[0].headers["Ccbridge-Reason"].startswith("backend_error")
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


async def test_the_round_trip_benchmark_reports_what_the_bench_reads() -> None:
    from bench.e2b_roundtrips import measure

    result = await measure(2)
    assert result["round_trips_per_injection"] <= 4
    assert result["round_trips_fresh"] <= 4 and result["round_trips_reinjection"] <= 4
    assert 0 < result["injection_ms_p50"] <= result["injection_ms_p99"]
