"""Small helpers of the local sandbox backend's tests: a home directory, exact permission bits,
temp files left behind, a `.claude` that links out of the home, the process's open descriptors,
and `write_files` / `read_files` — one `update_files` call that only writes, or only reads.
Its fixtures (`home`, `outside`) are registered for every test by tests/conftest.py."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pytest

from services.sandbox.adapters.backends.base import DirSpec, FileSpec, Found, SandboxBackend


def mode_of(path: Path) -> int:
    """Permission bits of `path` itself (a symlink is not followed)."""
    return stat.S_IMODE(path.lstat().st_mode)


def leftovers(directory: Path) -> list[str]:
    """Temp files (`*ccbridge-tmp*`) in `directory`."""
    return [p.name for p in directory.iterdir() if "ccbridge-tmp" in p.name]


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


async def write_files(sandbox: SandboxBackend, dirs: Sequence[DirSpec], files: Sequence[FileSpec]
                      ) -> list[PurePosixPath]:
    """`update_files` reading nothing first: make `dirs`, write each of `files` whose bytes differ
    from the disk. Returns the paths written."""
    _, written = await sandbox.update_files([], lambda found: (dirs, files))
    return written


async def read_files(sandbox: SandboxBackend, paths: Sequence[PurePosixPath]) -> dict[PurePosixPath, bytes | None]:
    """What `update_files(paths, …)` reads (it then writes nothing)."""
    seen: dict[PurePosixPath, bytes | None] = {}

    def build(found: Found) -> tuple[list[DirSpec], list[FileSpec]]:
        seen.update(found)
        return [], []

    await sandbox.update_files(paths, build)
    return seen


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty sandbox home `<tmp>/root/sbx-1`."""
    path = tmp_path / "root" / "sbx-1"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def outside(home: Path, tmp_path: Path) -> Path:
    """An empty directory outside the home that the home's `.claude` is a symlink to."""
    path = tmp_path / "outside"
    path.mkdir()
    (home / ".claude").symlink_to(path)
    return path
