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
- `env`: no credentials file at all. The platform must start Claude Code with the
  environment variable named in the injected event's `env` (`CLAUDE_CODE_OAUTH_TOKEN`). Only
  the NAME travels on the bus, never the value; how the platform obtains the value (its own
  sealed fetch from the vault, an e2b envVars hand-off, ...) is decided by a later issue.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from shared.events import CredentialMode, TokenBundle
from services.sandbox.errors import InvalidEvent, VaultError

DEFAULT_CONFIG_DIR = ".claude"
CREDENTIALS_FILE = ".credentials.json"
GLOBAL_CONFIG_FILE = ".claude.json"
SETTINGS_FILE = "settings.json"
OAUTH_TOKEN_ENV = "CLAUDE_CODE_OAUTH_TOKEN"
REQUIRED_SCOPE = "user:inference"

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


def resolve_layout(home: PurePosixPath, config_dir: str | None = None) -> Layout:
    """The config dir: `options.config_dir` (relative → under home, and must stay there;
    absolute → as given, the backend checks it is inside the sandbox), else `~/.claude`."""
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


def merge_flags(existing: bytes | None, flags: Mapping[str, Any]) -> bytes:
    """Set `flags`, keep every other key. Returns `existing` unchanged (byte for byte) when it
    already holds them, so an unchanged file is not rewritten."""
    data = _load_object(existing)
    if data is None:
        return _dumps(dict(flags))
    if all(key in data and data[key] == value and type(data[key]) is type(value) for key, value in flags.items()):
        assert existing is not None
        return existing
    return _dumps({**data, **flags})


def merge_global_config(existing: bytes | None) -> bytes:
    return merge_flags(existing, ONBOARDING_FLAGS)


def merge_settings(existing: bytes | None) -> bytes:
    return merge_flags(existing, SETTINGS_FLAGS)


def build_files(
    layout: Layout,
    mode: CredentialMode,
    bundle: TokenBundle | None,
    existing: Mapping[PurePosixPath, bytes | None],
) -> list[FileSpec]:
    """Every file to put into the sandbox, given the current content of the merged ones."""
    files: list[FileSpec] = []
    if mode != "env":
        files.append(FileSpec(layout.credentials_path, render_credentials(check_usable(bundle), mode)))
    for path in layout.global_config_paths:
        files.append(FileSpec(path, merge_global_config(existing.get(path))))
    files.append(FileSpec(layout.settings_path, merge_settings(existing.get(layout.settings_path))))
    return files


def env_names(mode: CredentialMode) -> dict[str, str]:
    """Env vars the platform must set: name → which credential field (never the value)."""
    return {OAUTH_TOKEN_ENV: "access_token"} if mode == "env" else {}


def retry_delay(delivery: int, *, base: float, cap: float) -> float:
    """Exponential redelivery delay: base, 2·base, 4·base, ... capped at `cap`."""
    exponent = max(0, min(delivery - 1, 30))
    return min(cap, base * (2**exponent))
