"""Putting credentials into one open sandbox, and taking them out again — shared by the
sandbox.created use case and the live-sandbox use cases (re-inject, scrub)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from services.sandbox import domain
from services.sandbox.adapters.backends.base import DirSpec, FileSpec, Found, SandboxBackend
from services.sandbox.errors import SandboxError
from shared.events import CredentialMode, TokenBundle


@dataclass(frozen=True)
class Written:
    files: tuple[str, ...]
    """Every file the injection consists of (what the injected event lists)."""
    written: tuple[str, ...]
    """The files actually (re)written this time; empty when the sandbox already held them."""


async def write_credentials(
    sandbox: SandboxBackend,
    layout: domain.Layout,
    mode: CredentialMode,
    bundle: TokenBundle,
    *,
    mcp_package: str | None = None,
) -> Written:
    """Create the dirs (0700), then write each file (0600) whose bytes differ from what is there
    — one `update_files` call (local: one worker-thread call; e2b: one read, one upload, one
    command)."""
    dirs = [(directory, domain.DIR_MODE) for directory in layout.dirs(mode)]

    def build(found: Found) -> tuple[list[DirSpec], list[FileSpec]]:
        specs = domain.build_files(layout, mode, bundle, dict(found), mcp_package=mcp_package)
        return dirs, [(spec.path, spec.content, spec.mode) for spec in specs]

    built, done = await sandbox.update_files(list(layout.merged_paths), build)
    return Written(tuple(str(path) for path, _, _ in built), tuple(str(path) for path in done))


async def scrub_credentials(sandbox: SandboxBackend, layout: domain.Layout) -> tuple[str, ...]:
    """Remove every file that can hold token material (credentials file and env file, whatever
    the mode was). Returns the ones that were there. Something the backend refuses to read (a
    link, a FIFO the sandbox put there) counts as there and is removed all the same — a scrub
    that stopped at the first file would leave the second one in place."""
    removed: list[str] = []
    for path in (layout.credentials_path, layout.env_path):
        try:
            present = await sandbox.read_file(path) is not None
        except SandboxError as exc:
            if exc.retryable:
                raise
            present = True
        if present:
            removed.append(str(path))
        await sandbox.remove(path)  # always: also takes temp copies an interrupted write left
    return tuple(removed)


class SandboxLocks:
    """Work on one sandbox is serialised inside this process (created, refresh, revoke)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    @asynccontextmanager
    async def hold(self, backend: str, sandbox_id: str) -> AsyncIterator[None]:
        key = (backend, sandbox_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        async with lock:
            yield
