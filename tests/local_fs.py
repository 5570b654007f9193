"""Small helpers of the local sandbox backend's tests: a home directory, exact permission bits,
temp files left behind, a `.claude` that links out of the home, the process's open descriptors.
Its fixtures (`home`, `outside`) are registered for every test by tests/conftest.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


def mode_of(path: Path) -> int:
    """Permission bits of `path` itself (a symlink is not followed)."""
    return stat.S_IMODE(path.lstat().st_mode)


def leftovers(directory: Path) -> list[str]:
    """Temp files (`*ccbridge-tmp*`) in `directory`."""
    return [p.name for p in directory.iterdir() if "ccbridge-tmp" in p.name]


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


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
