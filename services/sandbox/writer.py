"""Putting credentials into one open sandbox, and taking them out again — shared by the
sandbox.created use case and the live-sandbox use cases (re-inject, scrub)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath

from services.sandbox import domain
from services.sandbox.adapters.backends.base import SandboxBackend
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
    """Create the dirs (0700), then write each file (0600) whose bytes differ from what is there.
    A backend with `update_files` (local: one worker-thread call; e2b: one read, one upload,
    one command) does it in one call, any other with one call per file operation."""
    update_files = getattr(sandbox, "update_files", None)
    if update_files is not None:
        dirs = [(directory, domain.DIR_MODE) for directory in layout.dirs(mode)]

        def build(found: Mapping[PurePosixPath, bytes | None]) -> tuple[
                list[tuple[PurePosixPath, int]], list[tuple[PurePosixPath, bytes, int]]]:
            specs = domain.build_files(layout, mode, bundle, dict(found), mcp_package=mcp_package)
            return dirs, [(spec.path, spec.content, spec.mode) for spec in specs]

        built, done = await update_files(list(layout.merged_paths), build)
        return Written(tuple(str(path) for path, _, _ in built), tuple(str(path) for path in done))
    existing: dict[PurePosixPath, bytes | None] = {}
    for path in layout.merged_paths:
        existing[path] = await sandbox.read_file(path)
    files = domain.build_files(layout, mode, bundle, existing, mcp_package=mcp_package)
    for directory in layout.dirs(mode):
        await sandbox.make_dir(directory, domain.DIR_MODE)
    written: list[str] = []
    for spec in files:
        current = existing[spec.path] if spec.path in existing else await sandbox.read_file(spec.path)
        if current == spec.content:
            continue
        await sandbox.write_file(spec.path, spec.content, spec.mode)
        written.append(str(spec.path))
    return Written(tuple(str(spec.path) for spec in files), tuple(written))


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
