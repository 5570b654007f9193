"""Pure file builders and merge rules of the sandbox service."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest

from services.sandbox import domain
from services.sandbox.errors import InvalidEvent, VaultError
from shared.events import TokenBundle

HOME = PurePosixPath("/sandboxes/sbx-1")
ACCESS = "sk-ant-oat01-access-token-value"
REFRESH = "sk-ant-ort01-refresh-token-value"


def bundle(*, refresh: str | None = REFRESH, scopes: list[str] | None = None) -> TokenBundle:
    return TokenBundle(
        access_token=ACCESS,
        refresh_token=refresh,
        expires_at=1_900_000_000_000,
        scopes=scopes if scopes is not None else ["user:inference", "user:profile"],
    )


def files_by_path(files: list[domain.FileSpec]) -> dict[str, domain.FileSpec]:
    return {str(f.path): f for f in files}


def test_file_mode_writes_exact_credentials_document() -> None:
    files = files_by_path(domain.build_files(domain.resolve_layout(HOME), "file", bundle(), {}))
    creds = files[f"{HOME}/.claude/.credentials.json"]
    assert creds.mode == 0o600
    assert json.loads(creds.content) == {
        "claudeAiOauth": {
            "accessToken": ACCESS,
            "refreshToken": REFRESH,
            "expiresAt": 1_900_000_000_000,
            "scopes": ["user:inference", "user:profile"],
        }
    }
    assert set(files) == {
        f"{HOME}/.claude/.credentials.json",
        f"{HOME}/.claude.json",
        f"{HOME}/.claude/settings.json",
    }
    assert json.loads(files[f"{HOME}/.claude.json"].content) == {
        "hasCompletedOnboarding": True,
        "bypassPermissionsModeAccepted": True,
    }
    assert json.loads(files[f"{HOME}/.claude/settings.json"].content) == {"skipDangerousModePermissionPrompt": True}


def test_access_only_mode_has_no_refresh_token_key_even_if_the_vault_sent_one() -> None:
    files = files_by_path(domain.build_files(domain.resolve_layout(HOME), "access_only", bundle(), {}))
    oauth = json.loads(files[f"{HOME}/.claude/.credentials.json"].content)["claudeAiOauth"]
    assert "refreshToken" not in oauth
    assert oauth["accessToken"] == ACCESS
    assert REFRESH.encode() not in b"".join(f.content for f in files.values())


def test_file_mode_without_refresh_token_omits_the_key() -> None:
    files = files_by_path(domain.build_files(domain.resolve_layout(HOME), "file", bundle(refresh=None), {}))
    assert "refreshToken" not in json.loads(files[f"{HOME}/.claude/.credentials.json"].content)["claudeAiOauth"]


def test_env_mode_writes_an_env_file_instead_of_credentials() -> None:
    files = files_by_path(domain.build_files(domain.resolve_layout(HOME), "env", bundle(), {}))
    assert set(files) == {f"{HOME}/.config/ccbridge/env", f"{HOME}/.claude.json", f"{HOME}/.claude/settings.json"}
    env = files[f"{HOME}/.config/ccbridge/env"]
    assert env.mode == 0o600
    assert f"export CLAUDE_CODE_OAUTH_TOKEN='{ACCESS}'\n".encode() in env.content
    assert REFRESH.encode() not in env.content  # never the refresh token
    assert b"CLAUDE_CONFIG_DIR" not in env.content
    assert domain.env_names("env") == {"CLAUDE_CODE_OAUTH_TOKEN": "access_token"}
    assert domain.env_names("file") == {}
    assert domain.env_names("access_only") == {}


def test_env_file_quotes_the_token_and_names_a_custom_config_dir() -> None:
    odd = TokenBundle(access_token="sk-ant-oat01-it's $(rm -rf ~)", expires_at=1, scopes=["user:inference"])
    layout = domain.resolve_layout(HOME, "cfg", env_file="etc/claude.env")
    [env] = [f for f in domain.build_files(layout, "env", odd, {}) if f.path == layout.env_path]
    assert layout.env_path == HOME / "etc/claude.env"
    assert layout.dirs("env") == (HOME / "cfg", HOME / "etc")
    assert b"export CLAUDE_CODE_OAUTH_TOKEN='sk-ant-oat01-it'\"'\"'s $(rm -rf ~)'" in env.content
    assert f"export CLAUDE_CONFIG_DIR='{HOME}/cfg'".encode() in env.content


@pytest.mark.parametrize("value", ["", "/etc/env", "../env", "a/../../env", "."])
def test_env_file_setting_must_stay_in_home(value: str) -> None:
    with pytest.raises(ValueError):
        domain.env_file_path(value)


@pytest.mark.parametrize("mode", ["file", "access_only"])
def test_token_without_inference_scope_is_refused(mode: str) -> None:
    with pytest.raises(VaultError) as info:
        domain.build_files(domain.resolve_layout(HOME), mode, bundle(scopes=["user:profile"]), {})
    assert info.value.reason == "vault_error"
    assert ACCESS not in str(info.value)


@pytest.mark.parametrize("mode", ["file", "access_only", "env"])
def test_missing_bundle_is_refused_in_every_mode(mode: str) -> None:
    with pytest.raises(VaultError):
        domain.build_files(domain.resolve_layout(HOME), mode, None, {})


def test_merge_keeps_other_keys_and_sets_flags() -> None:
    existing = json.dumps(
        {"numStartups": 7, "hasCompletedOnboarding": False, "projects": {"/w": {"allowedTools": ["Bash"]}}}
    ).encode()
    merged = json.loads(domain.merge_global_config(existing))
    assert merged == {
        "numStartups": 7,
        "hasCompletedOnboarding": True,
        "bypassPermissionsModeAccepted": True,
        "projects": {"/w": {"allowedTools": ["Bash"]}},
    }


def test_settings_merge_keeps_other_keys() -> None:
    existing = json.dumps({"model": "opus", "permissions": {"allow": ["Read"]}}).encode()
    merged = json.loads(domain.merge_settings(existing))
    assert merged == {"model": "opus", "permissions": {"allow": ["Read"]}, "skipDangerousModePermissionPrompt": True}


def test_merge_returns_existing_bytes_when_nothing_changes() -> None:
    existing = b'{"bypassPermissionsModeAccepted":true,"hasCompletedOnboarding":true,"x":1}'
    assert domain.merge_global_config(existing) is existing


def test_merge_treats_truthy_non_bool_as_a_change() -> None:
    existing = b'{"hasCompletedOnboarding": 1, "bypassPermissionsModeAccepted": true}'
    merged = json.loads(domain.merge_global_config(existing))
    assert merged["hasCompletedOnboarding"] is True


@pytest.mark.parametrize(
    "existing",
    [b"", b"{not json", b"[1, 2]", b'"text"', b"null", b"\xff\xfe\x00garbage", b"[" * 100_000],
)
def test_unreadable_existing_file_is_replaced_not_crashed_on(existing: bytes) -> None:
    merged = json.loads(domain.merge_global_config(existing))
    assert merged == {"hasCompletedOnboarding": True, "bypassPermissionsModeAccepted": True}


def test_build_files_merges_with_existing_content() -> None:
    layout = domain.resolve_layout(HOME)
    existing = {
        HOME / ".claude.json": b'{"userID": "abc"}',
        HOME / ".claude/settings.json": b'{"theme": "dark"}',
    }
    files = files_by_path(domain.build_files(layout, "file", bundle(), existing))
    assert json.loads(files[f"{HOME}/.claude.json"].content)["userID"] == "abc"
    assert json.loads(files[f"{HOME}/.claude/settings.json"].content)["theme"] == "dark"


def test_relative_config_dir_goes_under_home() -> None:
    layout = domain.resolve_layout(HOME, "cfg/claude")
    files = files_by_path(domain.build_files(layout, "file", bundle(), {}))
    assert set(files) == {
        f"{HOME}/cfg/claude/.credentials.json",
        f"{HOME}/cfg/claude/settings.json",
        f"{HOME}/.claude.json",
        # the CLI reads its global config from $CLAUDE_CONFIG_DIR when that is set
        f"{HOME}/cfg/claude/.claude.json",
    }
    assert layout.merged_paths == (HOME / ".claude.json", HOME / "cfg/claude/.claude.json", HOME / "cfg/claude/settings.json")


def test_absolute_config_dir_is_kept_for_the_backend_to_check() -> None:
    layout = domain.resolve_layout(HOME, "/opt/claude/")
    assert layout.config_dir == PurePosixPath("/opt/claude")
    assert layout.credentials_path == PurePosixPath("/opt/claude/.credentials.json")


@pytest.mark.parametrize("config_dir", ["../other", "a/../../x", "", "   ", "bad\x00dir", ".", "a/.."])
def test_config_dir_escaping_home_or_empty_is_invalid(config_dir: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        domain.resolve_layout(HOME, config_dir)
    assert info.value.reason == "invalid_event"
    assert info.value.retryable is False


def test_default_layout_uses_dot_claude() -> None:
    layout = domain.resolve_layout(HOME)
    assert layout.config_dir == HOME / ".claude"
    assert layout.global_config_paths == (HOME / ".claude.json",)


def test_file_spec_repr_hides_content() -> None:
    spec = domain.build_files(domain.resolve_layout(HOME), "file", bundle(), {})[0]
    assert ACCESS not in repr(spec)
    assert ACCESS not in repr(bundle())


# --- MCP registration --------------------------------------------------------------------------
MCP_ENTRY = {"type": "stdio", "command": "npx", "args": ["-y", "@steipete/claude-code-mcp@1.10.12"], "env": {}}


def test_mcp_entry_has_the_shape_claude_mcp_add_writes() -> None:
    assert domain.mcp_server_entry() == MCP_ENTRY
    assert domain.mcp_server_entry("pkg@1.2.3")["args"] == ["-y", "pkg@1.2.3"]


def test_mcp_is_merged_next_to_other_servers_and_is_stable() -> None:
    mine = {"type": "stdio", "command": "mine", "args": [], "env": {"A": "b"}}
    existing = json.dumps({"mcpServers": {"mine": mine}, "numStartups": 4}).encode()
    merged = domain.merge_global_config(existing, mcp_package=domain.DEFAULT_MCP_PACKAGE)
    data = json.loads(merged)
    assert data["mcpServers"] == {"mine": mine, "claude-code-mcp": MCP_ENTRY}
    assert data["numStartups"] == 4 and data["hasCompletedOnboarding"] is True
    # merging again changes nothing, byte for byte (so the file is not rewritten)
    assert domain.merge_global_config(merged, mcp_package=domain.DEFAULT_MCP_PACKAGE) is merged
    # without options.mcp an existing registration is left alone
    assert json.loads(domain.merge_global_config(merged))["mcpServers"]["claude-code-mcp"] == MCP_ENTRY


def test_mcp_replaces_a_stale_entry_of_the_same_name() -> None:
    stale = json.dumps({"mcpServers": {"claude-code-mcp": {"command": "old"}}, "hasCompletedOnboarding": True,
                        "bypassPermissionsModeAccepted": True}).encode()
    assert json.loads(domain.merge_global_config(stale, mcp_package="p"))["mcpServers"]["claude-code-mcp"] == {
        "type": "stdio", "command": "npx", "args": ["-y", "p"], "env": {}}


def test_mcp_goes_into_both_global_configs_with_a_custom_config_dir() -> None:
    layout = domain.resolve_layout(HOME, "cfg")
    files = files_by_path(domain.build_files(layout, "file", bundle(), {}, mcp_package="p"))
    for path in (f"{HOME}/.claude.json", f"{HOME}/cfg/.claude.json"):
        assert "claude-code-mcp" in json.loads(files[path].content)["mcpServers"]
    assert "mcpServers" not in json.loads(files[f"{HOME}/cfg/settings.json"].content)


# --- credentials fingerprint -------------------------------------------------------------------
def fp(**kw: object) -> str:
    args: dict[str, object] = {"mode": "file", "bundle": bundle(), "config_dir": None,
                               "env_file": domain.DEFAULT_ENV_FILE, "mcp_package": None}
    args.update(kw)
    return domain.fingerprint(b"key", **args)


def test_fingerprint_changes_with_whatever_is_written_and_hides_the_token() -> None:
    base = fp()
    assert base == fp() and len(base) == 32
    assert ACCESS not in base
    other = TokenBundle(access_token="sk-ant-oat01-other", refresh_token=REFRESH, expires_at=1_900_000_000_000,
                        scopes=["user:inference", "user:profile"])
    for changed in (fp(bundle=other), fp(mode="access_only"), fp(config_dir="cfg"), fp(mcp_package="p"),
                    fp(bundle=bundle(refresh="sk-ant-ort01-new"))):
        assert changed != base
    # the refresh token does not count where it is never written
    assert fp(mode="env") == fp(mode="env", bundle=bundle(refresh="sk-ant-ort01-new"))
    assert domain.fingerprint(b"another key", mode="file", bundle=bundle(), config_dir=None,
                              env_file=domain.DEFAULT_ENV_FILE, mcp_package=None) != base


def test_live_record_round_trips_and_ignores_unknown_fields() -> None:
    record = domain.LiveSandbox(user_id="u", sandbox_id="s", backend="e2b", created_event_id="e", state="injected",
                                files=("/a",), env={"X": "y"}, backend_sandbox_id="i123")
    raw = json.loads(record.to_json())
    raw["added_later"] = 1
    again = domain.LiveSandbox.from_json(json.dumps(raw).encode())
    assert again == record and again.target_id == "i123"
    with pytest.raises(ValueError):
        domain.LiveSandbox.from_json(b"[1]")
