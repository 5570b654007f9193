"""Ports of the sandbox file system.

`SandboxBackend` is one open sandbox: paths are POSIX paths as the sandbox sees them
(absolute, or relative to its `home`). `BackendProvider` opens one per `sandbox.created`:
the local provider maps sandbox `<id>` to `<LOCAL_SANDBOX_ROOT>/<id>`; an e2b provider would
connect to the e2b sandbox and close the connection on exit. Errors are the service's own
(`services.sandbox.errors`): `BackendError` (transient unless said otherwise),
`PathOutsideSandbox`, `SandboxNotFound`, `BackendUnavailable`.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import PurePosixPath
from typing import Protocol, runtime_checkable

from shared.events import SandboxCreated


@runtime_checkable
class SandboxBackend(Protocol):
    @property
    def home(self) -> PurePosixPath:
        """The sandbox user's home directory."""
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


class BackendProvider(Protocol):
    kind: str
    """The `backend` value of sandbox.created this provider serves ("local" | "e2b")."""

    def open(self, event: SandboxCreated) -> AbstractAsyncContextManager[SandboxBackend]:
        """The sandbox of this event, ready for file operations until the context exits."""
        ...
