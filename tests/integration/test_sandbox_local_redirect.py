"""Local backend: a sandbox cannot redirect ccbridge's writes (or reads) into another sandbox
or out of its home by swapping symlinks in while an injection runs.

The attacker owns everything inside its home. A thread exchanges (renameat2 RENAME_EXCHANGE,
atomic) a real entry of the attacker's home with a symlink to the victim's — or to a directory
outside every sandbox — in a tight loop, while the attacker's sandbox is re-injected through
the same calls the service makes (`writer.write_credentials` → `update_files`). Every
re-injection may succeed or be refused; none may touch, read or merge anything outside the
attacker's home.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from services.sandbox import domain
from services.sandbox.adapters.backends.base import Target
from services.sandbox.adapters.backends.local import LocalBackend
from services.sandbox.errors import BackendError
from services.sandbox.writer import write_credentials
from shared.events import TokenBundle

RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276}
ROUNDS = 1000
MIN_OK = 10
"""Re-injections go on past ROUNDS until this many succeeded: the write path was exercised."""
VICTIM_MARKER = "victim-settings-marker-7f3a9c"
VICTIM_CONFIG_MARKER = "victim-config-marker-51d0e2"


def _renameat2() -> Callable[[int, bytes, int, bytes, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
        return func
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        pytest.skip(f"no renameat2 in the libc and no known syscall number on {platform.machine()}")
    syscall = libc.syscall
    syscall.restype = ctypes.c_long

    def via_syscall(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> int:
        return int(syscall(ctypes.c_long(number), ctypes.c_int(olddir), ctypes.c_char_p(old),
                           ctypes.c_int(newdir), ctypes.c_char_p(new), ctypes.c_uint(flags)))

    return via_syscall


class Exchanger:
    """Atomically exchanges two names inside one directory (RENAME_EXCHANGE)."""

    def __init__(self, probe_dir: Path) -> None:
        self._call = _renameat2()
        (probe_dir / "a").mkdir()
        (probe_dir / "b").symlink_to("a")
        try:
            self(probe_dir, "a", "b")
        except OSError as exc:
            pytest.skip(f"the kernel refuses renameat2(RENAME_EXCHANGE) here: {errno.errorcode.get(exc.errno or 0)}")
        assert (probe_dir / "a").is_symlink() and not (probe_dir / "b").is_symlink()

    def at(self, dir_fd: int, a: str, b: str) -> None:
        if self._call(dir_fd, a.encode(), dir_fd, b.encode(), RENAME_EXCHANGE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def __call__(self, directory: Path, a: str, b: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.at(fd, a, b)
        finally:
            os.close(fd)


def bundle(token: str) -> TokenBundle:
    return TokenBundle(access_token=token, refresh_token=f"{token}-refresh", expires_at=1_900_000_000_000,
                       scopes=["user:inference", "user:profile"])


async def inject(backend: LocalBackend, sandbox_id: str, tokens: TokenBundle, *, first: bool = False,
                 seen: list[Mapping[PurePosixPath, bytes | None]] | None = None) -> None:
    """What the service does for sandbox.created (`first`) or a re-injection (a known sandbox)."""
    target = Target(event_id="e" * 16, sandbox_id=sandbox_id, backend="local")
    async with backend.open(target, must_exist=not first) as sandbox:
        layout = domain.resolve_layout(sandbox.home, None, env_file=domain.DEFAULT_ENV_FILE)
        await write_credentials(Spy(sandbox, seen) if seen is not None else sandbox, layout, "file", tokens)


@dataclass
class Spy:
    """The sandbox as the writer sees it, recording what `update_files` read (the build input)."""

    inner: Any
    seen: list[Mapping[PurePosixPath, bytes | None]]

    @property
    def home(self) -> PurePosixPath:
        return self.inner.home

    async def update_files(self, paths, build):
        def spying(found):
            self.seen.append(dict(found))
            return build(found)

        return await self.inner.update_files(paths, spying)


def snapshot(path: Path) -> tuple[bytes, int, int, int]:
    info = path.lstat()
    return path.read_bytes(), info.st_ino, info.st_mtime_ns, stat.S_IMODE(info.st_mode)


def regular_files(top: Path) -> Iterator[Path]:
    """Every regular file below `top`, never following a symlink."""
    for dirpath, _dirs, names in os.walk(top, followlinks=False):
        for name in names:
            path = Path(dirpath) / name
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def temp_files(*tops: Path) -> list[str]:
    return [str(Path(d) / n) for top in tops for d, dirs, names in os.walk(top) for n in [*dirs, *names]
            if "ccbridge-tmp" in n]


@dataclass
class World:
    root: Path
    victim: Path
    attacker: Path
    outside: Path
    backend: LocalBackend
    exchange: Exchanger


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    exchange = Exchanger(tmp_path)
    root = tmp_path / "root"
    backend = LocalBackend(root, durable=False)
    await inject(backend, "victim", bundle("victim-token"), first=True)
    await inject(backend, "attacker", bundle("attacker-token-0"), first=True)
    victim, attacker = root / "victim", root / "attacker"
    # the victim's own settings: keys ccbridge must never copy anywhere
    (victim / ".claude/settings.json").write_text(
        f'{{"skipDangerousModePermissionPrompt": true, "{VICTIM_MARKER}": 1}}\n')
    (victim / ".claude.json").write_text(
        f'{{"hasCompletedOnboarding": true, "bypassPermissionsModeAccepted": true, "{VICTIM_CONFIG_MARKER}": 1}}\n')
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(outside, 0o755)
    (outside / "keep.txt").write_text("not ccbridge's\n")
    yield World(root, victim, attacker, outside, backend, exchange)
    await backend.aclose()


def victim_state(world: World) -> dict[str, Any]:
    files = [".claude/.credentials.json", ".claude/settings.json", ".claude.json"]
    state: dict[str, Any] = {name: snapshot(world.victim / name) for name in files}
    state["dirs"] = {str(p): stat.S_IMODE(p.lstat().st_mode) for p in (world.victim, world.victim / ".claude")}
    state["listing"] = sorted(str(p.relative_to(world.victim)) for p in world.victim.rglob("*"))
    return state


def outside_state(world: World) -> tuple[int, list[str], bytes]:
    return (stat.S_IMODE(world.outside.lstat().st_mode), sorted(os.listdir(world.outside)),
            (world.outside / "keep.txt").read_bytes())


class Swapper(threading.Thread):
    """The attacker: exchanges `name` and `swap` (a symlink to `link_to`) in `directory`, for
    each pair, in a tight loop. When a rename of ccbridge's replaced the swapped-in link by a
    file (harmless: a rename replaces the link, not its target), it plants a new link."""

    def __init__(self, exchange: Exchanger, pairs: list[tuple[Path, str, str, str]]) -> None:
        super().__init__(daemon=True)
        self.exchange, self.pairs = exchange, pairs
        self.stop = threading.Event()
        self.swaps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        fds = {directory: os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
               for directory in dict.fromkeys(directory for directory, *_ in self.pairs)}
        try:
            while not self.stop.is_set():
                for directory, name, swap, link_to in self.pairs:
                    fd = fds[directory]
                    self.exchange.at(fd, name, swap)
                    self.swaps += 1
                    if not stat.S_ISLNK(os.lstat(swap, dir_fd=fd).st_mode) and not stat.S_ISLNK(
                            os.lstat(name, dir_fd=fd).st_mode):
                        os.unlink(swap, dir_fd=fd)  # ccbridge replaced our link: plant another one
                        os.symlink(link_to, swap, dir_fd=fd)
            for directory, name, swap, _ in self.pairs:  # leave the real entry in place
                if stat.S_ISLNK(os.lstat(name, dir_fd=fds[directory]).st_mode):
                    self.exchange.at(fds[directory], name, swap)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            for fd in fds.values():
                os.close(fd)


def fingerprint(world: World) -> tuple[Any, ...]:
    """Cheap per-round check: the victim's files and the outside directory, by lstat."""
    paths = [world.victim / ".claude/.credentials.json", world.victim / ".claude/settings.json",
             world.victim / ".claude.json", world.victim / ".claude", world.outside]
    infos = [p.lstat() for p in paths]
    return tuple((i.st_ino, i.st_mtime_ns, i.st_mode) for i in infos)


async def race(world: World, pairs: list[tuple[Path, str, str, str]], *, rounds: int = ROUNDS) -> dict[str, Any]:
    """Re-inject the attacker `rounds` times (a new token each time; more until MIN_OK of them
    succeeded) while `pairs` are swapped. Counts the outcomes, and the first round after which
    the victim or the outside directory had changed (0: never)."""
    for directory, _name, swap, link_to in pairs:
        os.symlink(link_to, directory / swap)
    swapper = Swapper(world.exchange, pairs)
    outcomes: dict[str, Any] = {"ok": 0, "refused": 0, "unexpected": 0, "first_breach": 0}
    seen: list[Mapping[PurePosixPath, bytes | None]] = []
    clean = fingerprint(world)
    fds = len(os.listdir("/proc/self/fd"))
    swapper.start()
    deadline = time.monotonic() + 15
    try:
        i = 0
        while i < rounds or outcomes["ok"] < MIN_OK:
            i += 1
            try:
                await inject(world.backend, "attacker", bundle(f"attacker-token-{i}"), seen=seen)
                outcomes["ok"] += 1
            except BackendError:  # PathOutsideSandbox is one
                outcomes["refused"] += 1
            except Exception as exc:  # noqa: BLE001 - not the service's error: counted, asserted on
                outcomes["unexpected"] += 1
                outcomes.setdefault("first_unexpected", repr(exc))
            if not outcomes["first_breach"] and fingerprint(world) != clean:
                outcomes["first_breach"] = i
            if time.monotonic() > deadline:
                break
    finally:
        swapper.stop.set()
        swapper.join(5)
    assert swapper.error is None, swapper.error
    outcomes["leaked_fds"] = len(os.listdir("/proc/self/fd")) - fds
    outcomes["swaps"] = swapper.swaps
    outcomes["rounds"] = outcomes["ok"] + outcomes["refused"] + outcomes["unexpected"]
    outcomes["victim_reads"] = sum(  # injections whose merge input held the victim's content
        any(content is not None and (VICTIM_MARKER.encode() in content or VICTIM_CONFIG_MARKER.encode() in content)
            for content in found.values())
        for found in seen)
    print(outcomes)
    return outcomes


def assert_confined(world: World, outcomes: dict[str, Any], before: dict[str, Any],
                    outside_before: tuple[int, list[str], bytes]) -> None:
    assert outcomes["rounds"] >= ROUNDS and outcomes["swaps"] > ROUNDS, outcomes
    assert outcomes["first_breach"] == 0, outcomes
    assert victim_state(world) == before, "the victim's sandbox changed"
    for path in regular_files(world.victim):
        assert b"attacker-token" not in path.read_bytes(), f"attacker token in {path}"
    for path in regular_files(world.attacker):
        content = path.read_bytes()
        assert VICTIM_MARKER.encode() not in content and VICTIM_CONFIG_MARKER.encode() not in content, path
        assert b"victim-token" not in content, path
    assert outside_state(world) == outside_before, "a directory outside every sandbox changed"
    assert temp_files(world.root, world.outside) == []
    assert outcomes["victim_reads"] == 0, "the victim's files were read for the attacker's merge"
    assert outcomes["unexpected"] == 0, outcomes  # only the service's own errors
    assert outcomes["leaked_fds"] == 0, outcomes
    assert outcomes["ok"] >= MIN_OK, outcomes  # not refused wholesale: the attacker's own sandbox still works


async def test_swapping_claude_dir_for_a_link_to_another_sandbox(world: World) -> None:
    before, outside_before = victim_state(world), outside_state(world)
    outcomes = await race(world, [(world.attacker, ".claude", ".claude-swap", str(world.victim / ".claude"))])
    assert_confined(world, outcomes, before, outside_before)


async def test_swapping_merged_files_for_links_to_another_sandbox(world: World) -> None:
    before, outside_before = victim_state(world), outside_state(world)
    pairs = [
        (world.attacker, ".claude.json", ".claude.json-swap", str(world.victim / ".claude.json")),
        (world.attacker / ".claude", "settings.json", "settings.json-swap", str(world.victim / ".claude/settings.json")),
        (world.attacker / ".claude", ".credentials.json", "creds-swap", str(world.victim / ".claude/.credentials.json")),
    ]
    outcomes = await race(world, pairs)
    assert_confined(world, outcomes, before, outside_before)


async def test_swapping_claude_dir_for_a_link_outside_every_sandbox(world: World) -> None:
    before, outside_before = victim_state(world), outside_state(world)
    outcomes = await race(world, [(world.attacker, ".claude", ".claude-swap", str(world.outside))])
    assert_confined(world, outcomes, before, outside_before)
