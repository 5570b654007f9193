"""Ports of the sandbox file system.

`SandboxBackend` is one open sandbox: paths are POSIX paths as the sandbox sees them
(absolute, or relative to its `home`). `BackendProvider` opens one per `SandboxTarget` (a
`sandbox.created`, or a live-sandbox record when re-injecting / scrubbing): the local provider
maps sandbox `<id>` to `<LOCAL_SANDBOX_ROOT>/<id>`; the e2b provider connects to the e2b sandbox
(or creates one from `template`). Errors are the service's own (`services.sandbox.errors`):
`BackendError` (transient unless said otherwise), `PathOutsideSandbox`, `SandboxNotFound`,
`BackendUnavailable`.

An open sandbox may expose `backend_sandbox_id` (the e2b sandboxID of a sandbox it created);
`backend_sandbox_id_of()` reads it with a None default, so simple fakes need not define it.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol, runtime_checkable


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
    must_exist: bool = True
    """The local backend does not create a missing home for it: the sandbox is gone."""


def backend_sandbox_id_of(sandbox: Any) -> str | None:
    value = getattr(sandbox, "backend_sandbox_id", None)
    return value if isinstance(value, str) and value else None


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

    def open(self, event: SandboxTarget) -> AbstractAsyncContextManager[SandboxBackend]:
        """The sandbox of this target, ready for file operations until the context exits."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds (threads, connections) when the service stops."""
        ...
