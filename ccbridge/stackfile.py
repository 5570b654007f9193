"""`<CCBRIDGE_DATA_DIR>/stack.json`: where the stack `ccbridge up` runs can be found.

`ccbridge up` writes it (mode 0600: it holds NATS passwords) once the stack is ready and removes
it when it stops cleanly. CLI verbs and `ccbridge.client.CcbridgeClient` read it when `NATS_URL`
(and, for auth, `CCBRIDGE_AUTH_URL`) is unset. A file whose `pid` is no longer alive (a supervisor
that was killed) is stale and ignored.

    {
      "format": 1,
      "pid": 4242,                                   # the `ccbridge up` process
      "started_at": "2026-12-06T16:00:00+00:00",
      "data_dir": "/abs/var",
      "nats_url": "nats://ops:<password>@127.0.0.1:40299",      # the operators' user
      "nats_urls": {"ops": "nats://ops:…@…", "platform": "nats://platform:…@…"},
      "nats_embedded": true,
      "auth_url": "http://127.0.0.1:8000",
      "vault_metrics_port": 41234, "sandbox_metrics_port": 41235,   # /metrics /healthz /readyz
      "database_url": "sqlite+aiosqlite:////abs/var/vault.db",
      "local_sandbox_root": "/abs/var/sandboxes",
      "logs": "/abs/var/logs",
      "standin_oauth_url": "http://127.0.0.1:40111"  # only under `ccbridge up --standin-oauth`
    }

This module imports nothing heavy: every CLI verb reads it before doing anything else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccbridge.files import write_private

FILE_NAME = "stack.json"
FORMAT = 1
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"  # shared.settings.ServiceSettings' default
DEFAULT_AUTH_URL = "http://127.0.0.1:8000"


def data_dir() -> Path:
    """`CCBRIDGE_DATA_DIR`, else `./var` — the same rule as `ccbridge up` and the services."""
    return Path(os.environ.get("CCBRIDGE_DATA_DIR") or "./var")


def path(directory: Path | None = None) -> Path:
    return Path(directory if directory is not None else data_dir()) / FILE_NAME


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def write(directory: Path, info: dict[str, Any]) -> Path:
    """Write stack.json atomically, 0600 from its first byte."""
    target = path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_private(target, json.dumps({"format": FORMAT, **info}, indent=2) + "\n")
    return target


def remove(directory: Path, *, pid: int) -> None:
    """Remove stack.json if it is the one process `pid` wrote (a newer stack's file stays)."""
    target = path(directory)
    try:
        if json.loads(target.read_text()).get("pid") == pid:
            target.unlink()
    except (OSError, ValueError):
        pass


def read_raw(directory: Path | None = None) -> dict[str, Any] | None:
    try:
        doc = json.loads(path(directory).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _is_ccbridge(pid: int) -> bool:
    """False when /proc says `pid` is some other program (its number was reused, e.g. after a
    reboot); True when it is ccbridge or when there is no /proc to ask (macOS)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"ccbridge" in cmdline


def read_live(directory: Path | None = None) -> dict[str, Any] | None:
    """The stack.json of a running `ccbridge up`, or None (missing, unreadable, or stale: its
    process is gone, or its pid now belongs to another program)."""
    doc = read_raw(directory)
    if doc is None or not pid_alive(doc.get("pid")) or not _is_ccbridge(doc["pid"]):
        return None
    return doc


@dataclass(frozen=True)
class Resolved:
    value: str
    source: str
    """Where the value came from, for messages: an env var's name, the stack.json path, or "default"."""

    def hint(self) -> str:
        if self.source == "default":
            return f"the default; no running `ccbridge up` in {data_dir()} (no live {FILE_NAME})"
        return f"from {self.source}"


def nats_url(user: str, directory: Path | None = None) -> Resolved:
    """`NATS_URL` if set; else NATS user `user`'s URL on the running stack (`platform` for the
    platform's verbs, `ops` for the operators'); else the default."""
    if env := os.environ.get("NATS_URL", "").strip():
        return Resolved(env, "NATS_URL")
    if doc := read_live(directory):
        urls = doc.get("nats_urls") or {}
        url = urls.get(user) or doc.get("nats_url")
        if isinstance(url, str) and url:
            return Resolved(url, str(path(directory)))
    return Resolved(DEFAULT_NATS_URL, "default")


def auth_url(directory: Path | None = None) -> Resolved:
    """`CCBRIDGE_AUTH_URL` if set; else the running stack's auth; else the default."""
    if env := os.environ.get("CCBRIDGE_AUTH_URL", "").strip():
        return Resolved(env.rstrip("/"), "CCBRIDGE_AUTH_URL")
    if (doc := read_live(directory)) and isinstance(doc.get("auth_url"), str):
        return Resolved(doc["auth_url"].rstrip("/"), str(path(directory)))
    return Resolved(DEFAULT_AUTH_URL, "default")


def database_url(directory: Path | None = None) -> Resolved:
    """`DATABASE_URL` if set; else the running stack's; else SQLite in the data dir — what
    `ccbridge up` gives the vault."""
    if env := os.environ.get("DATABASE_URL", "").strip():
        return Resolved(env, "DATABASE_URL")
    if (doc := read_live(directory)) and isinstance(doc.get("database_url"), str):
        return Resolved(doc["database_url"], str(path(directory)))
    root = Path(directory if directory is not None else data_dir()).resolve()
    return Resolved(f"sqlite+aiosqlite:///{root / 'vault.db'}", "default")


__all__ = ["FILE_NAME", "Resolved", "auth_url", "data_dir", "database_url", "nats_url", "path", "pid_alive",
           "read_live", "read_raw", "remove", "write"]
