"""What goes into a sandbox, as pure functions (no I/O).

Claude Code reads (verified against CLI 2.1.197):
- `<config dir>/.credentials.json` = `{"claudeAiOauth": {"accessToken", "refreshToken",
  "expiresAt" (ms epoch), "scopes"}}`; `<config dir>` is `$CLAUDE_CONFIG_DIR`, else `~/.claude`.
  Without `refreshToken` it still logs in, as long as `scopes` holds `user:inference`.
- its global config `.claude.json` from `$CLAUDE_CONFIG_DIR` if set, else `$HOME`
  (`hasCompletedOnboarding`, `bypassPermissionsModeAccepted`): merged, other keys kept.
- `<config dir>/settings.json` (`skipDangerousModePermissionPrompt`): merged likewise.

Modes:
- `file`: the credentials file with the refresh token the vault chose to send.
- `access_only`: the credentials file without any `refreshToken` key (the sandbox can never
  refresh, so it can never race the vault's refresh and kill the login).
- `env`: no credentials file at all. The access token (the vault never sends a refresh token
  for this mode) goes into `~/<SANDBOX_ENV_FILE>` (default `~/.config/ccbridge/env`, 0600 in a
  0700 dir) as `export CLAUDE_CODE_OAUTH_TOKEN='…'` (plus `CLAUDE_CONFIG_DIR` when the event
  names a config dir). The platform starts Claude Code with that file sourced
  (`. ~/.config/ccbridge/env && claude …`). The injected event names the variable
  (`env: {"CLAUDE_CODE_OAUTH_TOKEN": "access_token"}`), never its value.

MCP (`options.mcp`): the CLI's global config gets `mcpServers["claude-code-mcp"] =
{"type": "stdio", "command": "npx", "args": ["-y", <package>], "env": {}}` — the exact shape
`claude mcp add -s user` writes; other servers are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, Literal

from services.sandbox.errors import InvalidEvent, VaultError
from shared.events import CredentialMode, TokenBundle

DEFAULT_CONFIG_DIR = ".claude"
CREDENTIALS_FILE = ".credentials.json"
GLOBAL_CONFIG_FILE = ".claude.json"
SETTINGS_FILE = "settings.json"
OAUTH_TOKEN_ENV = "CLAUDE_CODE_OAUTH_TOKEN"
REQUIRED_SCOPE = "user:inference"

DEFAULT_ENV_FILE = ".config/ccbridge/env"
MCP_SERVER_NAME = "claude-code-mcp"
# Pinned: the MCP server runs inside sandboxes that hold a Claude login; `@latest` would run
# whatever was published last (SANDBOX_MCP_PACKAGE overrides it).
DEFAULT_MCP_PACKAGE = "@steipete/claude-code-mcp@1.10.12"

FILE_MODE = 0o600
DIR_MODE = 0o700

ONBOARDING_FLAGS: Mapping[str, Any] = {"hasCompletedOnboarding": True, "bypassPermissionsModeAccepted": True}
SETTINGS_FLAGS: Mapping[str, Any] = {"skipDangerousModePermissionPrompt": True}


@dataclass(frozen=True)
class Layout:
    """Where the files go inside one sandbox (POSIX paths as the sandbox sees them)."""

    home: PurePosixPath
    config_dir: PurePosixPath
    custom_config_dir: bool = False
    env_file: PurePosixPath = PurePosixPath(DEFAULT_ENV_FILE)
    """Relative to home: where env mode puts `export CLAUDE_CODE_OAUTH_TOKEN=…`."""

    @property
    def env_path(self) -> PurePosixPath:
        return self.home / self.env_file

    def dirs(self, mode: CredentialMode) -> tuple[PurePosixPath, ...]:
        """Directories to create (0700) before writing: the config dir, and the env file's dir."""
        dirs = [self.config_dir]
        if mode == "env":
            dirs.append(self.env_path.parent)
        return tuple(dirs)

    @property
    def credentials_path(self) -> PurePosixPath:
        return self.config_dir / CREDENTIALS_FILE

    @property
    def settings_path(self) -> PurePosixPath:
        return self.config_dir / SETTINGS_FILE

    @property
    def global_config_paths(self) -> tuple[PurePosixPath, ...]:
        """`~/.claude.json`, and `$CLAUDE_CONFIG_DIR/.claude.json` too when a config dir is
        set: the CLI then reads its global config from there, not from $HOME."""
        paths = [self.home / GLOBAL_CONFIG_FILE]
        if self.custom_config_dir:
            paths.append(self.config_dir / GLOBAL_CONFIG_FILE)
        return tuple(paths)

    @property
    def merged_paths(self) -> tuple[PurePosixPath, ...]:
        """Files whose existing content is merged, not replaced."""
        return (*self.global_config_paths, self.settings_path)


@dataclass(frozen=True)
class FileSpec:
    path: PurePosixPath
    content: bytes = b""
    mode: int = FILE_MODE

    def __repr__(self) -> str:  # content may be a credentials file: never shown
        return f"FileSpec(path={str(self.path)!r}, mode={oct(self.mode)}, size={len(self.content)})"


def env_file_path(value: str) -> PurePosixPath:
    """SANDBOX_ENV_FILE as a path relative to home that cannot leave it."""
    text = value.strip()
    norm = posixpath.normpath(text) if text else ""
    if not text or text.startswith("/") or norm in {".", ""} or norm.startswith(".."):
        raise ValueError("SANDBOX_ENV_FILE must be a relative path inside the home directory")
    return PurePosixPath(norm)


def resolve_layout(
    home: PurePosixPath, config_dir: str | None = None, *, env_file: str = DEFAULT_ENV_FILE
) -> Layout:
    """The config dir: `options.config_dir` (relative → under home, and must stay there;
    absolute → as given, the backend checks it is inside the sandbox), else `~/.claude`."""
    layout = _resolve_config_dir(home, config_dir)
    return replace(layout, env_file=env_file_path(env_file))


def _resolve_config_dir(home: PurePosixPath, config_dir: str | None) -> Layout:
    if config_dir is None:
        return Layout(home=home, config_dir=home / DEFAULT_CONFIG_DIR)
    text = config_dir.strip()
    if not text or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        raise InvalidEvent("options.config_dir is empty or holds control characters")
    if text.startswith("/"):
        resolved = PurePosixPath(posixpath.normpath(text))
    else:
        joined = PurePosixPath(posixpath.normpath(posixpath.join(str(home), text)))
        if joined != home and home not in joined.parents:
            raise InvalidEvent("options.config_dir escapes the sandbox home")
        resolved = joined
    if resolved == home:
        raise InvalidEvent("options.config_dir must not be the home directory itself")
    return Layout(home=home, config_dir=resolved, custom_config_dir=True)


def _dumps(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def check_usable(bundle: TokenBundle | None) -> TokenBundle:
    """A credentials file is only worth writing for a token that can run inference."""
    if bundle is None:
        raise VaultError("the vault sent no credentials")
    if REQUIRED_SCOPE not in bundle.scopes:
        raise VaultError(f"credentials lack the {REQUIRED_SCOPE} scope")
    return bundle


def render_credentials(bundle: TokenBundle, mode: CredentialMode) -> bytes:
    """`.credentials.json` exactly as the CLI writes it; no `refreshToken` key in access_only."""
    oauth: dict[str, Any] = {"accessToken": bundle.access_token}
    if mode == "file" and bundle.refresh_token:
        oauth["refreshToken"] = bundle.refresh_token
    oauth["expiresAt"] = bundle.expires_at
    oauth["scopes"] = list(bundle.scopes)
    return _dumps({"claudeAiOauth": oauth})


def _load_object(existing: bytes | None) -> dict[str, Any] | None:
    """The existing JSON object, or None when absent or unreadable (then it is replaced)."""
    if not existing:
        return None
    try:
        data = json.loads(existing.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _same(a: Any, b: Any) -> bool:
    """Equal JSON values, and of the same types (so `1` does not pass for `true`)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def merge_flags(existing: bytes | None, flags: Mapping[str, Any]) -> bytes:
    """Set `flags`, keep every other key. Returns `existing` unchanged (byte for byte) when it
    already holds them, so an unchanged file is not rewritten. A flag whose value is a dict
    (`mcpServers`) is merged one level deep: entries of other names are kept."""
    data = _load_object(existing)
    if data is None:
        return _dumps(dict(flags))
    merged = dict(data)
    for key, value in flags.items():
        current = data.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            merged[key] = {**current, **value}
        else:
            merged[key] = value
    if all(key in data and _same(data[key], merged[key]) for key in flags):
        assert existing is not None
        return existing
    return _dumps(merged)


def mcp_server_entry(package: str = DEFAULT_MCP_PACKAGE) -> dict[str, Any]:
    """The `mcpServers` entry exactly as `claude mcp add -s user claude-code-mcp -- npx -y <pkg>`
    writes it (checked against CLI 2.1.197)."""
    return {"type": "stdio", "command": "npx", "args": ["-y", package], "env": {}}


def merge_global_config(existing: bytes | None, *, mcp_package: str | None = None) -> bytes:
    flags: dict[str, Any] = dict(ONBOARDING_FLAGS)
    if mcp_package is not None:
        flags["mcpServers"] = {MCP_SERVER_NAME: mcp_server_entry(mcp_package)}
    return merge_flags(existing, flags)


def merge_settings(existing: bytes | None) -> bytes:
    return merge_flags(existing, SETTINGS_FLAGS)


def _sh_quote(value: str) -> str:
    """Always single-quoted, so `. file` never expands anything in the value."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def render_env_file(bundle: TokenBundle, layout: Layout) -> bytes:
    """`export CLAUDE_CODE_OAUTH_TOKEN='…'` for `. <file>` in a POSIX shell (values quoted)."""
    lines = ["# written by ccbridge; source it before starting claude: . ~/" + str(layout.env_file)]
    lines.append(f"export {OAUTH_TOKEN_ENV}={_sh_quote(bundle.access_token)}")
    if layout.custom_config_dir:
        lines.append(f"export CLAUDE_CONFIG_DIR={_sh_quote(str(layout.config_dir))}")
    return ("\n".join(lines) + "\n").encode()


def build_files(
    layout: Layout,
    mode: CredentialMode,
    bundle: TokenBundle | None,
    existing: Mapping[PurePosixPath, bytes | None],
    *,
    mcp_package: str | None = None,
) -> list[FileSpec]:
    """Every file to put into the sandbox, given the current content of the merged ones.
    `mcp_package` set → register the claude-code MCP server in the CLI's global config."""
    files: list[FileSpec] = []
    usable = check_usable(bundle)
    if mode == "env":
        files.append(FileSpec(layout.env_path, render_env_file(usable, layout)))
    else:
        files.append(FileSpec(layout.credentials_path, render_credentials(usable, mode)))
    for path in layout.global_config_paths:
        files.append(FileSpec(path, merge_global_config(existing.get(path), mcp_package=mcp_package)))
    files.append(FileSpec(layout.settings_path, merge_settings(existing.get(layout.settings_path))))
    return files


def env_names(mode: CredentialMode) -> dict[str, str]:
    """Env vars the platform must set: name → which credential field (never the value)."""
    return {OAUTH_TOKEN_ENV: "access_token"} if mode == "env" else {}


# --- credentials version & live-sandbox records ----------------------------------------------
FINGERPRINT_VERSION = "1"


def fingerprint(
    key: bytes,
    *,
    mode: CredentialMode,
    bundle: TokenBundle,
    config_dir: str | None,
    env_file: str,
    mcp_package: str | None,
) -> str:
    """A keyed digest of exactly what an injection writes that depends on the credentials and
    the options (HMAC-SHA256, so the record never holds anything derived from a token without
    the service's key). Equal fingerprints → the sandbox already holds these credentials."""
    material = {
        "v": FINGERPRINT_VERSION,
        "mode": mode,
        "access": bundle.access_token,
        "refresh": bundle.refresh_token if mode == "file" else None,
        "expires_at": bundle.expires_at,
        "scopes": list(bundle.scopes),
        "config_dir": config_dir,
        "env_file": env_file,
        "mcp": mcp_package,
    }
    digest = hmac.new(key, json.dumps(material, sort_keys=True).encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


LiveState = Literal["pending", "injected", "scrubbed"]


@dataclass(frozen=True)
class LiveSandbox:
    """What the live-sandbox registry remembers about one sandbox holding one person's
    credentials. No token material: only a keyed fingerprint of what was written.

    `pending`: a sandbox.created is being handled (written before any file, so a concurrent
    revoke or refresh sees the sandbox and bumps the record, forcing the handler to redo);
    `injected`: the files are in place; `scrubbed`: tokens.revoked removed them."""

    user_id: str
    sandbox_id: str
    backend: str
    created_event_id: str
    state: LiveState = "pending"
    mode: CredentialMode = "access_only"
    home: str | None = None
    user: str | None = None
    template: str | None = None
    config_dir: str | None = None
    mcp: bool = False
    backend_sandbox_id: str | None = None
    fingerprint: str | None = None
    expires_at: int | None = None
    files: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    touched_by: str | None = None
    """The last lifecycle event (refresh / revoke) that changed the record."""
    grant: str | None = None
    """The grant the sandbox.created carried: re-injections present it to the vault again (the
    vault then applies the newest grant it knows for this sandbox)."""
    lease_expires_at: int | None = None
    """When the lease ended / ends, as the vault said at the last injection (ms epoch)."""

    def to_json(self) -> bytes:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["files"] = list(self.files)
        data["env"] = dict(self.env)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LiveSandbox:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a live-sandbox record is a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["files"] = tuple(known.get("files") or ())
        known["env"] = dict(known.get("env") or {})
        return cls(**known)

    @property
    def target_id(self) -> str:
        """The id to open in the backend (e2b: the sandbox created from the template)."""
        return self.backend_sandbox_id or self.sandbox_id
