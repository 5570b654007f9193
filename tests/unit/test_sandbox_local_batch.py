"""Local backend, batched path (`update_files`: one worker-thread call per injection;
`write_files` / `read_files` are it only writing or only reading): same guarantees as the
one-file calls — exact modes, atomic replace, no temp files left, stale temp copies discarded,
confinement to the home, unchanged files not rewritten."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.sandbox.adapters.backends.local import LocalBackend, LocalSandbox
from services.sandbox.errors import BackendError, PathOutsideSandbox
from shared.events import SandboxCreated
from tests.local_fs import leftovers, mode_of, read_files, write_files

CREDS = PurePosixPath(".claude/.credentials.json")
CONFIG = PurePosixPath(".claude.json")


async def test_write_files_creates_dirs_and_files_with_exact_modes(home: Path) -> None:
    old = os.umask(0o077)
    try:
        sandbox = LocalSandbox(home)
        written = await write_files(
            sandbox, [(PurePosixPath(".claude"), 0o700)], [(CREDS, b'{"a":1}', 0o600), (CONFIG, b"{}", 0o644)]
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
    await write_files(sandbox, [(PurePosixPath(".claude"), 0o700)], [(CREDS, b"same", 0o600)])
    inode = (home / ".claude/.credentials.json").stat().st_ino
    found: list[Mapping[PurePosixPath, bytes | None]] = []
    _, written = await sandbox.update_files(
        [CREDS, CONFIG], lambda seen: (found.append(seen), ([], [(CREDS, b"same", 0o600), (CONFIG, b"{}", 0o600)]))[1])
    assert found == [{CREDS: b"same", CONFIG: None}]
    assert written == [CONFIG]
    assert (home / ".claude/.credentials.json").stat().st_ino == inode


async def test_a_loosened_mode_is_restored_even_when_the_bytes_are_unchanged(home: Path) -> None:
    """The sandbox's user made its credentials file world-readable: the next write of the same
    bytes puts the file back to 0600 (a fresh file, renamed over the loosened one)."""
    sandbox = LocalSandbox(home)
    await write_files(sandbox, [(PurePosixPath(".claude"), 0o700)], [(CREDS, b"same", 0o600)])
    (home / ".claude/.credentials.json").chmod(0o644)
    _, written = await sandbox.update_files([CREDS], lambda seen: ([], [(CREDS, b"same", 0o600)]))
    assert written == [CREDS]
    assert mode_of(home / ".claude/.credentials.json") == 0o600
    (home / ".claude/.credentials.json").chmod(0o644)  # and through the path that reads nothing first
    assert await write_files(sandbox, [], [(CREDS, b"same", 0o600)]) == [CREDS]
    assert mode_of(home / ".claude/.credentials.json") == 0o600


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
    await write_files(LocalSandbox(home), [], [(CREDS, b"new", 0o600)])
    assert not stale.exists() and young.exists()
    assert (home / ".claude/.credentials.json").read_bytes() == b"new"


async def test_write_files_refuses_paths_outside_and_leaves_nothing(home: Path, tmp_path: Path) -> None:
    sandbox = LocalSandbox(home)
    (home / "out").symlink_to(tmp_path)
    with pytest.raises(PathOutsideSandbox):
        await write_files(sandbox, [], [(PurePosixPath("ok.json"), b"1", 0o600), (PurePosixPath("out/x"), b"2", 0o600)])
    with pytest.raises(PathOutsideSandbox):
        await read_files(sandbox, [PurePosixPath("../../etc/passwd")])
    assert not (home / "ok.json").exists()  # nothing renamed before every path was checked
    assert leftovers(home) == [] and not (tmp_path / "x").exists()


# --- durable flag: fsync only when asked ---------------------------------------------------


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Replace `os.fsync` by a recorder (no disk flush): ("dir" | "file", real path) per call."""
    calls: list[tuple[str, str]] = []

    def fake_fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append((kind, os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "fsync", fake_fsync)
    return calls


def count_to_thread(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every hop to a worker thread (the backend's I/O thread or the default pool)."""
    calls: list[object] = []
    real = LocalSandbox._in_thread

    async def counting(self: LocalSandbox, func):
        calls.append(func)
        return await real(self, func)

    monkeypatch.setattr(LocalSandbox, "_in_thread", counting)
    return calls


async def test_not_durable_never_fsyncs(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_fsyncs(monkeypatch)
    old = os.umask(0o077)
    try:
        sandbox = LocalSandbox(home, durable=False)
        await write_files(
            sandbox, [(PurePosixPath(".claude"), 0o700)], [(CREDS, b'{"a":1}', 0o600), (CONFIG, b"{}", 0o644)]
        )
        await sandbox.update_files(
            [CREDS, CONFIG], lambda found: ([], [(CREDS, b'{"a":2}', 0o600), (CONFIG, b"{}", 0o644)])
        )
        await sandbox.write_file(PurePosixPath("single.json"), b"1", 0o640)
    finally:
        os.umask(old)
    assert calls == []
    assert (home / ".claude/.credentials.json").read_bytes() == b'{"a":2}'
    assert (home / ".claude.json").read_bytes() == b"{}"
    assert mode_of(home / ".claude") == 0o700
    assert mode_of(home / ".claude/.credentials.json") == 0o600
    assert mode_of(home / ".claude.json") == 0o644
    assert mode_of(home / "single.json") == 0o640
    assert leftovers(home) == [] and leftovers(home / ".claude") == []


async def test_durable_fsyncs_every_written_file_and_its_directory(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_fsyncs(monkeypatch)
    sandbox = LocalSandbox(home, durable=True)
    real_home = os.path.realpath(home)
    written = await write_files(
        sandbox, [(PurePosixPath(".claude"), 0o700)], [(CREDS, b'{"a":1}', 0o600), (CONFIG, b"{}", 0o644)]
    )
    assert written == [CREDS, CONFIG]
    # the new directory's entry first (in its parent, the home)
    assert calls[0] == ("dir", real_home)
    # then each temp file, before its rename (it had its temp name then)
    file_syncs = [path for kind, path in calls[1:3] if kind == "file"]
    assert len(file_syncs) == 2 and [kind for kind, _ in calls].count("file") == 2
    assert all(Path(path).name.endswith(".ccbridge-tmp") for path in file_syncs)
    # then each touched directory exactly once, after the renames
    assert all(kind == "dir" for kind, _ in calls[3:])
    assert sorted(path for _, path in calls[3:]) == sorted([real_home, os.path.join(real_home, ".claude")])

    calls.clear()  # update_files: only the changed file, only its directory
    _, written = await sandbox.update_files(
        [CREDS, CONFIG], lambda found: ([], [(CREDS, b'{"a":2}', 0o600), (CONFIG, b"{}", 0o644)])
    )
    assert written == [CREDS]
    assert [kind for kind, _ in calls] == ["file", "dir"]
    assert calls[1][1] == os.path.join(real_home, ".claude")
    assert (home / ".claude/.credentials.json").read_bytes() == b'{"a":2}'
    assert mode_of(home / ".claude/.credentials.json") == 0o600
    assert leftovers(home) == [] and leftovers(home / ".claude") == []

    calls.clear()  # nothing changed: nothing to sync
    assert await write_files(sandbox, [], [(CONFIG, b"{}", 0o644)]) == []
    assert calls == []


async def test_backend_durable_flag_reaches_its_sandboxes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_fsyncs(monkeypatch)
    async with LocalBackend(tmp_path / "fast", durable=False).open(
        SandboxCreated(user_id="u", sandbox_id="sbx-1")
    ) as sandbox:
        await write_files(sandbox, [], [(CONFIG, b"{}", 0o600)])
    assert calls == []
    async with LocalBackend(tmp_path / "safe", durable=True).open(
        SandboxCreated(user_id="u", sandbox_id="sbx-1")
    ) as sandbox:
        await write_files(sandbox, [], [(CONFIG, b"{}", 0o600)])
    # the new home's entry in the root, the temp file, the home after the rename
    assert [kind for kind, _ in calls] == ["dir", "file", "dir"]
    assert calls[0][1] == os.path.realpath(tmp_path / "safe")


async def test_sandboxes_written_at_the_same_time_share_one_io_call_and_fail_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend hands the file work of the sandboxes of the moment to its I/O thread in ONE
    call; a sandbox whose write is refused (a path outside its home) fails alone."""
    backend = LocalBackend(tmp_path / "root", durable=False)
    calls: list[int] = []
    run_in_executor = asyncio.get_running_loop().run_in_executor

    def counting(executor: object, fn: object, *args: object) -> object:
        calls.append(1)
        return run_in_executor(executor, fn, *args)

    monkeypatch.setattr(asyncio.get_running_loop(), "run_in_executor", counting)

    async def write(sandbox_id: str, path: PurePosixPath) -> list[PurePosixPath]:
        async with backend.open(SandboxCreated(user_id="u", sandbox_id=sandbox_id)) as sandbox:
            return await write_files(sandbox, [], [(path, b"{}", 0o600)])

    results = await asyncio.gather(write("sbx-1", CONFIG), write("sbx-2", PurePosixPath("../escape.json")),
                                   write("sbx-3", CONFIG), return_exceptions=True)
    assert results[0] == [CONFIG] and results[2] == [CONFIG]
    assert isinstance(results[1], PathOutsideSandbox)
    assert calls == [1]
    assert (tmp_path / "root" / "sbx-1" / ".claude.json").read_bytes() == b"{}"
    assert not (tmp_path / "root" / "escape.json").exists()
    backend.close()


# --- confinement: what a read of any path answers, by the rules ------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A home with dirs, a file, and symlinks pointing inside, outside, and in a loop."""
    home = tmp_path / "root" / "sbx-1"
    (home / "a" / "b").mkdir(parents=True)
    (home / "f").write_text("file")
    (home / "a" / "b" / "g").write_text("file g")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_text("outside")
    (home / "in").symlink_to("a")  # relative, inside
    (home / "a" / "up").symlink_to("..")  # back to the home
    (home / "abs").symlink_to(home / "a" / "b")  # absolute, inside
    (home / "round").symlink_to("../sbx-1/a")  # leaves and re-enters the home
    (home / "out").symlink_to(tmp_path / "outside")
    (home / "loop").symlink_to("loop")
    return home


REFUSED, FINAL = "refused", "final error"


def expected_read(home: Path, path: str) -> object:
    """What `read_file(path)` must answer: REFUSED (PathOutsideSandbox) for a path outside the
    home, a `..`, or a symlink anywhere on the way (wherever it points); FINAL (a final
    BackendError) through a file or for a directory; else the file's bytes, None when absent."""
    real_home = os.path.realpath(home)
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/"):
        prefix = real_home.split("/")[1:]
        if parts[: len(prefix)] != prefix:
            return REFUSED
        parts = parts[len(prefix) :]
    if ".." in parts:
        return REFUSED
    current = Path(real_home)
    for index, part in enumerate(parts):
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode):
            return REFUSED
        if index < len(parts) - 1 and not stat.S_ISDIR(info.st_mode):
            return FINAL
    if not parts or current.is_dir():
        return FINAL
    return current.read_bytes()


async def answer(sandbox: LocalSandbox, path: str) -> object:
    try:
        return await sandbox.read_file(PurePosixPath(path) if path else path)
    except PathOutsideSandbox:
        return REFUSED
    except BackendError as exc:
        assert exc.retryable is False, exc
        return FINAL


PATHS = [
    "",
    ".",
    "a",
    "a/b/g",
    "a/b/missing/deeper",
    "missing/x/y",
    "f",
    "f/x",  # through a regular file
    "a/../f",
    "a/b/../../a/./b",
    "missing/../a",
    "in/b/g",
    "in/b/../b",
    "a/up/a/up/f",
    "abs/g",
    "round/b",
    "loop",
    "loop/x",
    "..",
    "../sbx-1/a",
    "../sbx-10",
    "a/../../sbx-1x/f",
    "out",
    "out/x",
    "a/up/out/x",
    "/etc/passwd",
    "/",
]


@pytest.mark.parametrize("path", PATHS)
async def test_reads_follow_the_confinement_rules(tree: Path, path: str) -> None:
    assert await answer(LocalSandbox(tree), path) == expected_read(tree, path), path


async def test_reads_of_absolute_paths_inside_the_home(tree: Path) -> None:
    sandbox = LocalSandbox(tree)
    for rel in ("a/b/g", "in/b", "a/../f", "missing/y", "a//b/./g", "out/x"):
        path = f"{tree}/{rel}"
        assert await answer(sandbox, path) == expected_read(tree, path), path
    assert await sandbox.read_file(PurePosixPath(f"{tree}/a/b/g")) == b"file g"
    with pytest.raises(PathOutsideSandbox):
        await sandbox.read_file(PurePosixPath(f"{tree}x/a"))  # a sibling whose name merely starts with the home's
    with pytest.raises(PathOutsideSandbox):
        await sandbox.read_file(PurePosixPath(f"{tree}/../sbx-1/f"))


async def test_a_home_given_through_a_symlink_is_refused(tree: Path, tmp_path: Path) -> None:
    alias = tmp_path / "root" / "alias"
    alias.symlink_to(tree)
    sandbox = LocalSandbox(alias)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.read_file(PurePosixPath("f"))
    with pytest.raises(PathOutsideSandbox):
        await write_files(sandbox, [], [(PurePosixPath("new.json"), b"1", 0o600)])
    assert not (tree / "new.json").exists()


NAMES = st.sampled_from(["a", "b", "f", "g", "in", "up", "abs", "round", "out", "loop", "missing", "..", ".", ""])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(NAMES, max_size=7), absolute=st.booleans())
def test_reads_follow_the_confinement_rules_for_generated_paths(tree: Path, parts: list[str], absolute: bool) -> None:
    """`tree` is only read, so sharing it across examples is fine."""
    path = "/".join(parts)
    if absolute:
        path = f"{tree}/{path}"
    assert asyncio.run(answer(LocalSandbox(tree), path)) == expected_read(tree, path), path


async def test_symlinked_claude_dir_pointing_outside_is_refused(home: Path, outside: Path) -> None:
    sandbox = LocalSandbox(home)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.read_file(CREDS)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.update_files([CONFIG], lambda found: ([], [(CONFIG, b"{}", 0o600), (CREDS, b"t", 0o600)]))
    with pytest.raises(PathOutsideSandbox):
        await sandbox.update_files([CREDS], lambda found: ([], []))  # reading through it too
    assert list(outside.iterdir()) == []
    assert not (home / ".claude.json").exists() and leftovers(home) == []


async def test_an_overlong_name_is_a_final_error(home: Path) -> None:
    long = "x" * 300
    for call in (LocalSandbox(home).read_file(PurePosixPath(f"{long}/y")),
                 LocalSandbox(home).write_file(PurePosixPath(long), b"1", 0o600)):
        with pytest.raises(BackendError) as info:
            await call
        assert info.value.retryable is False and "ENAMETOOLONG" in info.value.detail


# --- update_files: one worker-thread call per injection -------------------------------------


async def test_update_files_is_one_thread_call_reading_what_is_on_disk(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (home / ".claude").mkdir(mode=0o700)
    (home / ".claude/.credentials.json").write_bytes(b"old-token")
    (home / ".claude.json").write_bytes(b"{}")
    keep_inode = (home / ".claude.json").stat().st_ino
    creds_inode = (home / ".claude/.credentials.json").stat().st_ino
    settings_path = PurePosixPath(".claude/settings.json")
    seen: list[dict[PurePosixPath, bytes | None]] = []

    def build(found: Mapping[PurePosixPath, bytes | None]):
        seen.append(dict(found))
        return (
            [(PurePosixPath(".claude"), 0o700)],
            [(CREDS, b"new-token", 0o600), (CONFIG, b"{}", 0o644), (settings_path, b"s", 0o644)],
        )

    threads = count_to_thread(monkeypatch)
    built, written = await LocalSandbox(home, durable=False).update_files([CREDS, CONFIG, settings_path], build)
    assert len(threads) == 1
    assert seen == [{CREDS: b"old-token", CONFIG: b"{}", settings_path: None}]
    assert built == [(CREDS, b"new-token", 0o600), (CONFIG, b"{}", 0o644), (settings_path, b"s", 0o644)]
    assert written == [CREDS, settings_path]
    assert (home / ".claude.json").stat().st_ino == keep_inode  # unchanged: not rewritten
    assert (home / ".claude/.credentials.json").stat().st_ino != creds_inode  # replaced, not edited
    assert (home / ".claude/.credentials.json").read_bytes() == b"new-token"
    assert mode_of(home / ".claude/.credentials.json") == 0o600
    assert (home / ".claude/settings.json").read_bytes() == b"s"
    assert leftovers(home) == [] and leftovers(home / ".claude") == []


async def test_update_files_build_failure_writes_nothing(home: Path) -> None:
    (home / ".claude.json").write_bytes(b"{}")

    def build(found: Mapping[PurePosixPath, bytes | None]):
        raise ValueError("bad credentials")

    with pytest.raises(ValueError, match="bad credentials"):
        await LocalSandbox(home).update_files([CONFIG], build)
    assert (home / ".claude.json").read_bytes() == b"{}"
    assert sorted(p.name for p in home.iterdir()) == [".claude.json"]


async def test_first_operation_after_open_creates_the_home_without_an_extra_thread_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sandboxes"
    threads = count_to_thread(monkeypatch)
    async with LocalBackend(root, durable=False).open(SandboxCreated(user_id="u", sandbox_id="sbx-9")) as sandbox:
        assert threads == [] and not (root / "sbx-9").exists()  # open itself does no I/O
        seen: list[dict[PurePosixPath, bytes | None]] = []

        def build(found: Mapping[PurePosixPath, bytes | None]):
            seen.append(dict(found))
            return [(PurePosixPath(".claude"), 0o700)], [(CREDS, b"t", 0o600)]

        _, written = await sandbox.update_files([CREDS], build)
        assert len(threads) == 1
        assert seen == [{CREDS: None}]
        assert written == [CREDS]
        # later calls still work and do not re-create anything
        assert await read_files(sandbox, [CREDS]) == {CREDS: b"t"}
    home = root / "sbx-9"
    assert home.is_dir() and mode_of(home) == 0o700
    assert (home / ".claude/.credentials.json").read_bytes() == b"t"
    assert mode_of(home / ".claude/.credentials.json") == 0o600


@pytest.mark.parametrize("first", ["update_files", "read_file", "write_file", "make_dir"])
async def test_every_first_operation_creates_the_home(tmp_path: Path, first: str) -> None:
    root = tmp_path / "sandboxes"
    async with LocalBackend(root, durable=False).open(SandboxCreated(user_id="u", sandbox_id="sbx-3")) as sandbox:
        if first == "update_files":
            await sandbox.update_files([CONFIG], lambda found: ([], []))
        elif first == "read_file":
            assert await sandbox.read_file(CONFIG) is None
        elif first == "write_file":
            await sandbox.write_file(CONFIG, b"{}", 0o600)
        else:
            await sandbox.make_dir(PurePosixPath(".claude"), 0o700)
    assert (root / "sbx-3").is_dir() and mode_of(root / "sbx-3") == 0o700


# --- stale temp copies: one scan per directory, only the targets' own old copies ------------


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


async def test_write_files_discards_only_old_copies_of_its_targets(home: Path) -> None:
    (home / ".claude").mkdir()
    claude = home / ".claude"
    old_creds = claude / "..credentials.json.0123456789ab.ccbridge-tmp"
    young_creds = claude / "..credentials.json.ba9876543210.ccbridge-tmp"
    old_settings = claude / ".settings.json.0123456789ab.ccbridge-tmp"  # another file's copy
    old_prefix = claude / "..credentials.json.bak.0123456789ab.ccbridge-tmp"  # of ".credentials.json.bak"
    old_config = home / "..claude.json.00112233aabb.ccbridge-tmp"
    old_dir = home / "..claude.json.aabb00112233.ccbridge-tmp"  # a directory with a temp's name: not ours
    for path in (old_creds, young_creds, old_settings, old_prefix, old_config):
        path.write_text("secret copy")
    old_dir.mkdir()
    for path in (old_creds, old_settings, old_prefix, old_config, old_dir):
        age(path, 60)
    await write_files(LocalSandbox(home), [], [(CREDS, b"c", 0o600), (CONFIG, b"{}", 0o600)])
    assert not old_creds.exists() and not old_config.exists()
    assert young_creds.exists() and old_settings.exists() and old_prefix.exists() and old_dir.is_dir()


async def test_stale_temps_are_listed_once_per_directory(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "d").mkdir()
    temp = home / "d" / ".x.0123456789ab.ccbridge-tmp"
    temp.write_text("copy")
    age(temp, 60)
    scans: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(path):
        scans.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    files = [(PurePosixPath(name), b"1", 0o600) for name in ("d/x", "d/y", "d/z", "top")]
    await write_files(LocalSandbox(home, durable=False), [], files)
    assert len(scans) == 2  # the home and d
    assert not temp.exists()


async def test_concurrent_first_operations_all_wait_for_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdir = os.mkdir

    def slow_mkdir(*args: object, **kwargs: object) -> None:
        time.sleep(0.05)  # the other first operation arrives while the home is being made
        real_mkdir(*args, **kwargs)

    monkeypatch.setattr(os, "mkdir", slow_mkdir)
    # the default thread pool (no backend executor): the two calls really run at once
    sandbox = LocalSandbox(tmp_path / "root" / "sbx-1", durable=False, create=True)
    await asyncio.gather(
        sandbox.write_file(PurePosixPath("a"), b"1", 0o600), sandbox.write_file(PurePosixPath("b"), b"2", 0o600)
    )
    home = tmp_path / "root" / "sbx-1"
    assert (home / "a").read_bytes() == b"1" and (home / "b").read_bytes() == b"2"
    assert mode_of(home) == 0o700


async def test_a_home_created_by_this_injection_is_not_read_or_scanned_but_an_existing_one_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[object] = []
    scans: list[object] = []
    real_open, real_scandir = os.open, os.scandir

    def counting_open(path, flags, *args, **kwargs):
        if not flags & (os.O_WRONLY | os.O_RDWR | os.O_DIRECTORY):  # a file opened for reading
            reads.append(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or real_scandir(path))
    backend = LocalBackend(tmp_path / "root", durable=False)
    seen: list[dict[PurePosixPath, bytes | None]] = []

    def build(found: Mapping[PurePosixPath, bytes | None]):
        seen.append(dict(found))
        return [(PurePosixPath(".claude"), 0o700)], [(CREDS, b"t", 0o600), (CONFIG, b"{}", 0o600)]

    event = SandboxCreated(user_id="u", sandbox_id="sbx-1")
    async with backend.open(event) as sandbox:
        _, written = await sandbox.update_files([CREDS, CONFIG], build)
    assert written == [CREDS, CONFIG] and seen[-1] == {CREDS: None, CONFIG: None}
    assert reads == [] and scans == []  # made just now: nothing to read, no stale temps

    home = tmp_path / "root" / "sbx-1"
    stale = home / f".{CONFIG.name}.0123456789ab.ccbridge-tmp"
    stale.write_text("old copy")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    async with backend.open(event) as sandbox:  # the same sandbox again: it holds files now
        _, written = await sandbox.update_files([CREDS, CONFIG], build)
    assert seen[-1] == {CREDS: b"t", CONFIG: b"{}"} and written == []
    assert len(reads) == 2 and len(scans) == 2 and not stale.exists()
