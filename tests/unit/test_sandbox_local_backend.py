"""Local backend: atomic writes, exact modes, paths confined to the sandbox home (walked by
descriptor: a symlink or `..` on the way is refused)."""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

import pytest

from services.sandbox.adapters.backends.base import SandboxBackend, Target
from services.sandbox.adapters.backends.local import LocalBackend, LocalSandbox
from services.sandbox.errors import BackendError, PathOutsideSandbox, SandboxNotFound
from shared.events import SandboxCreated
from tests.local_fs import leftovers, mode_of, write_files


async def test_open_creates_home_under_root_and_satisfies_the_port(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "sandboxes")
    async with backend.open(SandboxCreated(user_id="u", sandbox_id="sbx-7")) as sandbox:
        assert isinstance(sandbox, SandboxBackend)
        assert Path(str(sandbox.home)) == (tmp_path / "sandboxes" / "sbx-7").resolve()
        # created by the first worker-thread call, not by a thread hop of its own
        assert await sandbox.read_file(PurePosixPath(".claude.json")) is None
    home = tmp_path / "sandboxes" / "sbx-7"
    assert home.is_dir()
    assert mode_of(home) == 0o700


async def test_write_is_atomic_with_exact_mode_and_no_temp_files(home: Path) -> None:
    old = os.umask(0o077)  # a strict umask must not change the requested bits
    try:
        sandbox = LocalSandbox(home)
        await sandbox.make_dir(PurePosixPath(".claude"), 0o700)
        await sandbox.write_file(PurePosixPath(".claude/.credentials.json"), b'{"a":1}', 0o600)
        await sandbox.write_file(PurePosixPath(".claude.json"), b"{}", 0o644)
    finally:
        os.umask(old)
    assert (home / ".claude/.credentials.json").read_bytes() == b'{"a":1}'
    assert mode_of(home / ".claude") == 0o700
    assert mode_of(home / ".claude/.credentials.json") == 0o600
    assert mode_of(home / ".claude.json") == 0o644
    assert leftovers(home) == [] and leftovers(home / ".claude") == []


async def test_rewrite_replaces_content_and_resets_mode(home: Path) -> None:
    target = home / "creds.json"
    target.write_bytes(b"old content that is longer than the new one")
    target.chmod(0o666)
    await LocalSandbox(home).write_file(PurePosixPath("creds.json"), b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o600


async def test_make_dir_tightens_an_existing_directory(home: Path) -> None:
    (home / ".claude").mkdir(mode=0o755)
    os.chmod(home / ".claude", 0o755)
    await LocalSandbox(home).make_dir(PurePosixPath(".claude"), 0o700)
    assert mode_of(home / ".claude") == 0o700


async def test_read_missing_is_none_and_read_existing_is_bytes(home: Path) -> None:
    sandbox = LocalSandbox(home)
    assert await sandbox.read_file(PurePosixPath("nope.json")) is None
    (home / "x.json").write_bytes(b"\x00\x01")
    assert await sandbox.read_file(PurePosixPath("x.json")) == b"\x00\x01"
    assert await sandbox.read_file(home.resolve() / "x.json") == b"\x00\x01"  # absolute inside is fine


async def test_failed_write_leaves_old_file_and_no_temp(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = home / "creds.json"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(BackendError) as info:
        await LocalSandbox(home).write_file(PurePosixPath("creds.json"), b"new content", 0o600)
    monkeypatch.undo()
    assert info.value.retryable is True  # EIO may pass
    assert "EIO" in info.value.detail
    assert target.read_bytes() == b"old"
    assert leftovers(home) == []


async def test_a_big_write_never_exposes_a_partial_file(home: Path) -> None:
    target = home / "big.json"
    target.write_bytes(b"old")
    payload = b"x" * (4 * 1024 * 1024)
    await LocalSandbox(home).write_file(PurePosixPath("big.json"), payload, 0o600)
    assert target.read_bytes() == payload
    assert leftovers(home) == []


@pytest.mark.parametrize(
    "path",
    ["../escape.json", "../../etc/passwd", "/etc/passwd", ".claude/../../sbx-2/x", "/",
     ".claude/../escape.json"],  # `..` is refused even where it would stay inside
)
async def test_paths_outside_the_home_are_refused(home: Path, path: str) -> None:
    sandbox = LocalSandbox(home)
    for call in (
        sandbox.read_file(PurePosixPath(path)),
        sandbox.write_file(PurePosixPath(path), b"x", 0o600),
        sandbox.make_dir(PurePosixPath(path), 0o700),
        sandbox.remove(PurePosixPath(path)),
    ):
        with pytest.raises(PathOutsideSandbox) as info:
            await call
        assert info.value.retryable is False
        assert info.value.reason == "backend_error"
    assert not (home.parent / "escape.json").exists()


async def test_symlink_out_of_the_home_is_refused(home: Path, outside: Path) -> None:
    sandbox = LocalSandbox(home)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.write_file(PurePosixPath(".claude/.credentials.json"), b"secret", 0o600)
    (home / "link.json").symlink_to(outside / "target.json")
    with pytest.raises(PathOutsideSandbox):
        await sandbox.write_file(PurePosixPath("link.json"), b"secret", 0o600)
    assert list(outside.iterdir()) == []


async def test_a_symlink_pointing_inside_the_home_is_refused_too(home: Path) -> None:
    """Only real directories are walked: a link is refused wherever it points."""
    (home / "dotfiles" / "claude").mkdir(parents=True)
    (home / "dotfiles" / "claude" / "settings.json").write_text("{}")
    (home / ".claude").symlink_to("dotfiles/claude")
    (home / "conf.json").symlink_to("dotfiles/claude/settings.json")
    sandbox = LocalSandbox(home)
    for call in (
        sandbox.read_file(PurePosixPath(".claude/settings.json")),
        sandbox.read_file(PurePosixPath("conf.json")),
        sandbox.write_file(PurePosixPath(".claude/.credentials.json"), b"t", 0o600),
        sandbox.write_file(PurePosixPath("conf.json"), b"t", 0o600),
        sandbox.make_dir(PurePosixPath(".claude"), 0o700),
        sandbox.remove(PurePosixPath(".claude/settings.json")),
    ):
        with pytest.raises(PathOutsideSandbox):
            await call
    assert sorted(p.name for p in (home / "dotfiles" / "claude").iterdir()) == ["settings.json"]
    assert (home / ".claude").is_symlink() and (home / "conf.json").is_symlink()


async def test_home_itself_cannot_be_replaced_or_removed(home: Path) -> None:
    sandbox = LocalSandbox(home)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.write_file(PurePosixPath("."), b"x", 0o600)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.remove(PurePosixPath("."))
    assert home.is_dir()


async def test_remove_file_dir_and_missing(home: Path) -> None:
    sandbox = LocalSandbox(home)
    (home / "f").write_text("x")
    (home / "d" / "e").mkdir(parents=True)
    (home / "d" / "e" / "g").write_text("y")
    await sandbox.remove(PurePosixPath("f"))
    await sandbox.remove(PurePosixPath("d"))
    await sandbox.remove(PurePosixPath("missing"))
    assert sorted(p.name for p in home.iterdir()) == []


async def test_io_errors_become_typed_backend_errors(home: Path) -> None:
    (home / "afile").write_text("x")
    sandbox = LocalSandbox(home)
    with pytest.raises(BackendError) as info:
        await sandbox.write_file(PurePosixPath("afile/child.json"), b"x", 0o600)
    assert info.value.retryable is False  # ENOTDIR will not fix itself
    with pytest.raises(BackendError) as info:
        await sandbox.read_file(PurePosixPath("."))
    assert info.value.retryable is False  # EISDIR


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_permission_error_is_retryable(home: Path) -> None:
    locked = home / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(BackendError) as info:
            await LocalSandbox(home).write_file(PurePosixPath("locked/x"), b"x", 0o600)
        assert info.value.retryable is True
    finally:
        locked.chmod(0o700)


async def test_home_is_a_direct_child_of_root_and_never_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sbx-2").mkdir(parents=True)
    backend = LocalBackend(root)
    assert backend.home_dir("sbx-1") == root.resolve() / "sbx-1"
    for bad in ("..", ".", "a/b", "../x", "/etc", ""):
        with pytest.raises(PathOutsideSandbox):
            backend.home_dir(bad)
    # a home that is a symlink (to anywhere, even another sandbox) is refused when opened
    for name, to in (("evil", tmp_path), ("alias", root / "sbx-2")):
        (root / name).symlink_to(to)
        async with backend.open(SandboxCreated(user_id="u", sandbox_id=name)) as sandbox:
            with pytest.raises(PathOutsideSandbox):
                await sandbox.write_file(PurePosixPath("x.json"), b"x", 0o600)
            with pytest.raises(PathOutsideSandbox):
                await sandbox.read_file(PurePosixPath("x.json"))
        with pytest.raises(PathOutsideSandbox):
            async with backend.open(Target(event_id="e" * 8, sandbox_id=name, backend="local"), must_exist=True):
                pass
    assert list((root / "sbx-2").iterdir()) == [] and not (tmp_path / "x.json").exists()
    backend.close()


async def test_a_root_given_through_a_symlink_is_fine(home: Path, tmp_path: Path) -> None:
    """The root is the operator's: its path may hold symlinks; the home is its real path."""
    (tmp_path / "alias").symlink_to(home.parent)
    sandbox = LocalSandbox(tmp_path / "alias" / home.name)
    assert sandbox.home == PurePosixPath(os.path.realpath(home))
    await sandbox.write_file(PurePosixPath("a.json"), b"1", 0o600)
    assert await sandbox.read_file(sandbox.home / "a.json") == b"1"
    assert (home / "a.json").read_bytes() == b"1"


async def test_stale_temp_copies_are_discarded_and_removed_with_their_file(home: Path) -> None:
    """A SIGKILL between write and rename leaves `.<name>.<hex>.ccbridge-tmp` (possibly a full
    credentials copy): the next injection discards it, a scrub removes it with the file."""
    sandbox = LocalSandbox(home)
    (home / ".claude").mkdir()
    creds = home / ".claude/.credentials.json"
    stale = home / ".claude/..credentials.json.0123456789ab.ccbridge-tmp"
    fresh = home / ".claude/..credentials.json.ba9876543210.ccbridge-tmp"
    other = home / ".claude/.settings.json.0123456789ab.ccbridge-tmp"
    for path in (stale, fresh, other):
        path.write_text("secret copy")
    old = os.stat(stale).st_mtime - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    await write_files(sandbox, [], [(PurePosixPath(".claude/.credentials.json"), b"{}", 0o600)])
    assert not stale.exists() and fresh.exists() and other.exists()  # a live writer's copy is young
    assert creds.read_bytes() == b"{}"
    await sandbox.remove(PurePosixPath(".claude/.credentials.json"))
    assert not creds.exists() and not fresh.exists()
    assert other.exists()  # only the removed file's copies


async def test_open_of_a_known_sandbox_does_not_recreate_a_missing_home(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "sandboxes")
    with pytest.raises(SandboxNotFound):
        async with backend.open(Target(event_id="e" * 8, sandbox_id="gone", backend="local"), must_exist=True):
            pass
    assert not (tmp_path / "sandboxes" / "gone").exists()
    (tmp_path / "sandboxes").mkdir()
    (tmp_path / "sandboxes" / "afile").write_text("not a home")
    with pytest.raises(SandboxNotFound):
        async with backend.open(Target(event_id="e" * 8, sandbox_id="afile", backend="local"), must_exist=True):
            pass
    (tmp_path / "sandboxes" / "there").mkdir()
    async with backend.open(Target(event_id="e" * 8, sandbox_id="there", backend="local"),
                            must_exist=True) as sandbox:
        assert await sandbox.read_file(PurePosixPath(".claude.json")) is None
    await backend.aclose()


async def test_close_stops_the_io_thread(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "sandboxes")
    async with backend.open(SandboxCreated(user_id="u", sandbox_id="sbx-1")) as sandbox:
        await sandbox.write_file(PurePosixPath("a"), b"1", 0o600)
    threads = list(backend._executor._threads)  # this backend's own I/O thread
    assert [t.name.startswith("ccbridge-local-io") and t.is_alive() for t in threads] == [True]
    await backend.aclose()
    assert not any(t.is_alive() for t in threads)
    backend.close()  # idempotent
    with pytest.raises(RuntimeError):
        async with backend.open(SandboxCreated(user_id="u", sandbox_id="sbx-1")) as sandbox:
            await sandbox.read_file(PurePosixPath("a"))
