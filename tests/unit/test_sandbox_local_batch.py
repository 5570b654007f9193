"""Local backend, batched path (`read_files` / `write_files`, one worker-thread call each):
same guarantees as the one-file calls — exact modes, atomic replace, no temp files left,
stale temp copies discarded, confinement to the home, unchanged files not rewritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from services.sandbox.adapters.backends.local import LocalSandbox
from services.sandbox.errors import PathOutsideSandbox

CREDS = PurePosixPath(".claude/.credentials.json")
CONFIG = PurePosixPath(".claude.json")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if "ccbridge-tmp" in p.name]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "root" / "sbx-1"
    path.mkdir(parents=True)
    return path


async def test_write_files_creates_dirs_and_files_with_exact_modes(home: Path) -> None:
    old = os.umask(0o077)
    try:
        sandbox = LocalSandbox(home)
        written = await sandbox.write_files(
            [(PurePosixPath(".claude"), 0o700)], [(CREDS, b'{"a":1}', 0o600), (CONFIG, b"{}", 0o644)]
        )
    finally:
        os.umask(old)
    assert written == [CREDS, CONFIG]
    assert (home / ".claude/.credentials.json").read_bytes() == b'{"a":1}'
    assert mode_of(home / ".claude") == 0o700
    assert mode_of(home / ".claude/.credentials.json") == 0o600
    assert mode_of(home / ".claude.json") == 0o644
    assert leftovers(home) == [] and leftovers(home / ".claude") == []


async def test_unchanged_files_are_not_rewritten(home: Path) -> None:
    sandbox = LocalSandbox(home)
    await sandbox.write_files([(PurePosixPath(".claude"), 0o700)], [(CREDS, b"same", 0o600)])
    inode = (home / ".claude/.credentials.json").stat().st_ino
    found = await sandbox.read_files([CREDS, CONFIG])
    assert found == {CREDS: b"same", CONFIG: None}
    written = await sandbox.write_files([], [(CREDS, b"same", 0o600), (CONFIG, b"{}", 0o600)], known=found)
    assert written == [CONFIG]
    assert (home / ".claude/.credentials.json").stat().st_ino == inode


async def test_write_files_discards_stale_temp_copies(home: Path) -> None:
    """A SIGKILL between write and rename leaves a temp copy of the tokens: the next batched
    write removes it (a young one may be a live writer's and is left alone)."""
    (home / ".claude").mkdir()
    stale = home / ".claude/..credentials.json.0123456789ab.ccbridge-tmp"
    young = home / ".claude/..credentials.json.ba9876543210.ccbridge-tmp"
    for path in (stale, young):
        path.write_text("secret copy")
    old = os.stat(stale).st_mtime - 60
    os.utime(stale, (old, old))
    await LocalSandbox(home).write_files([], [(CREDS, b"new", 0o600)])
    assert not stale.exists() and young.exists()
    assert (home / ".claude/.credentials.json").read_bytes() == b"new"


async def test_write_files_refuses_paths_outside_and_leaves_nothing(home: Path, tmp_path: Path) -> None:
    sandbox = LocalSandbox(home)
    (home / "out").symlink_to(tmp_path)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.write_files([], [(PurePosixPath("ok.json"), b"1", 0o600), (PurePosixPath("out/x"), b"2", 0o600)])
    with pytest.raises(PathOutsideSandbox):
        await sandbox.read_files([PurePosixPath("../../etc/passwd")])
    assert not (home / "ok.json").exists()  # nothing renamed before every path was checked
    assert leftovers(home) == [] and not (tmp_path / "x").exists()
