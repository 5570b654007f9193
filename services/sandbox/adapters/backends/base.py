"""Ports of the sandbox file system.

`SandboxBackend` is one open sandbox: paths are POSIX paths as the sandbox sees them
(absolute, or relative to its `home`). `BackendProvider` opens one per `SandboxTarget` (a
`sandbox.created`, or a live-sandbox record when re-injecting / scrubbing): the local provider
maps sandbox `<id>` to `<LOCAL_SANDBOX_ROOT>/<id>`; the e2b provider connects to the e2b sandbox
(or creates one from `template`). Errors are the service's own (`services.sandbox.errors`):
`BackendError` (transient unless said otherwise), `PathOutsideSandbox`, `SandboxNotFound`,
`BackendUnavailable`.

`FileByFile` is the reference meaning of `update_files` in terms of the single-file calls; the
real backends do the same in fewer round trips (local: one worker-thread call; e2b: one read,
one upload, one command).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol, runtime_checkable

DirSpec = tuple[PurePosixPath, int]
"""A directory and its exact permission bits."""
FileSpec = tuple[PurePosixPath, bytes, int]
"""A file, its whole content and its exact permission bits."""
Found = Mapping[PurePosixPath, bytes | None]
"""What `update_files` read: each path's bytes, None when it does not exist."""
Build = Callable[[Found], tuple[Sequence[DirSpec], Sequence[FileSpec]]]
"""From what was read, the dirs to ensure and the files to hold."""


class SandboxTarget(Protocol):
    """Which sandbox to open. `shared.events.SandboxCreated` is one; `Target` another."""

    @property
    def event_id(self) -> str: ...
    @property
    def sandbox_id(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def home(self) -> str | None: ...
    @property
    def user(self) -> str | None: ...
    @property
    def template(self) -> str | None:
        """e2b: create the sandbox from this template (`""` → E2B_TEMPLATE); None → connect."""
        ...


@dataclass(frozen=True)
class Target:
    """A sandbox known from the live registry (re-injection, scrub): always connect, never create."""

    event_id: str
    sandbox_id: str
    backend: str
    home: str | None = None
    user: str | None = None
    template: str | None = None


@runtime_checkable
class SandboxBackend(Protocol):
    @property
    def home(self) -> PurePosixPath:
        """The sandbox user's home directory."""
        ...

    @property
    def backend_sandbox_id(self) -> str | None:
        """The backend's own id of a sandbox this open created (e2b: from a template), else None."""
        ...

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        ...

    async def write_file(self, path: PurePosixPath, data: bytes, mode: int) -> None:
        """Replace the file atomically (readers see the old or the new content, never a
        part) with permission bits exactly `mode`. The parent directory must exist."""
        ...

    async def make_dir(self, path: PurePosixPath, mode: int) -> None:
        """Create the directory (and missing parents); the directory ends with exactly `mode`."""
        ...

    async def remove(self, path: PurePosixPath) -> None:
        """Remove a file or directory tree; absent is fine."""
        ...

    async def update_files(
        self, paths: Sequence[PurePosixPath], build: Build
    ) -> tuple[list[FileSpec], list[PurePosixPath]]:
        """Read `paths`, `build(what was read) -> (dirs, files)`, make each dir (`make_dir`),
        then write each file (`write_file`) whose bytes differ from what is there. Returns
        (the files built, the paths written). `FileByFile.update_files` is its meaning."""
        ...


class FileByFile:
    """`SandboxBackend.update_files` done with one call per file operation — the port's
    semantics, for a backend (or a test fake) that has nothing faster."""

    async def update_files(
        self: SandboxBackend, paths: Sequence[PurePosixPath], build: Build
    ) -> tuple[list[FileSpec], list[PurePosixPath]]:
        found: dict[PurePosixPath, bytes | None] = {}
        for path in paths:
            found[path] = await self.read_file(path)
        dirs, built = build(found)
        files = list(built)
        for directory, mode in dirs:
            await self.make_dir(directory, mode)
        written: list[PurePosixPath] = []
        for path, data, mode in files:
            current = found[path] if path in found else await self.read_file(path)
            if current == data:
                continue
            await self.write_file(path, data, mode)
            written.append(path)
        return files, written


class BackendProvider(Protocol):
    kind: str
    """The `backend` value of sandbox.created this provider serves ("local" | "e2b")."""

    def open(self, target: SandboxTarget, *, must_exist: bool = False
             ) -> AbstractAsyncContextManager[SandboxBackend]:
        """The sandbox of this target, ready for file operations until the context exits.
        `must_exist`: a sandbox known from the live registry — raise `SandboxNotFound` when it
        is gone instead of setting it up anew (local: the home is not re-created)."""
        ...

    async def discard(self, sandbox_id: str) -> None:
        """Destroy a sandbox this provider created from a template (`backend_sandbox_id`) whose
        injection failed for good: nobody else knows its id. Best effort; errors are raised."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds (threads, connections) when the service stops."""
        ...
