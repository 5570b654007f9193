"""Local backend: each way a sandbox can try to redirect ccbridge's reads and writes, set up
without a race (tests/integration/test_sandbox_local_redirect.py races them). The attacker's
sandbox is injected through the service's own calls (`write_credentials`, `scrub_credentials`);
every attack is refused or harmless, and nothing outside the attacker's home is read, written,
chmodded or removed."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from services.sandbox import domain
from services.sandbox.adapters.backends.base import Target
from services.sandbox.adapters.backends.local import (
    MAX_READ,
    LocalBackend,
    LocalSandbox,
)
from services.sandbox.errors import BackendError, PathOutsideSandbox
from services.sandbox.writer import scrub_credentials, write_credentials
from shared.events import SandboxCreated, TokenBundle
from tests.local_fs import open_fds, read_files, write_files

MARKER = b"victim-only-marker-0c4e"


def bundle(token: str) -> TokenBundle:
    return TokenBundle(access_token=token, refresh_token=f"{token}-r", expires_at=1_900_000_000_000,
                       scopes=["user:inference"])


def target(sandbox_id: str, *, known: bool = True) -> Any:
    if known:  # a re-injection or scrub of a live sandbox
        return Target(event_id="e" * 16, sandbox_id=sandbox_id, backend="local")
    return SandboxCreated(user_id="u", sandbox_id=sandbox_id)


async def inject(backend: LocalBackend, sandbox_id: str, token: str, *, known: bool = True,
                 seen: list[Mapping[PurePosixPath, bytes | None]] | None = None) -> None:
    async with backend.open(target(sandbox_id, known=known), must_exist=known) as sandbox:
        layout = domain.resolve_layout(sandbox.home, None, env_file=domain.DEFAULT_ENV_FILE)
        if seen is None:
            await write_credentials(sandbox, layout, "file", bundle(token))
            return
        real = sandbox.update_files

        async def spying(paths, build):
            return await real(paths, lambda found: (seen.append(dict(found)), build(found))[1])

        sandbox.update_files = spying
        await write_credentials(sandbox, layout, "file", bundle(token))


async def scrub(backend: LocalBackend, sandbox_id: str) -> tuple[str, ...]:
    async with backend.open(target(sandbox_id), must_exist=True) as sandbox:
        layout = domain.resolve_layout(sandbox.home, None, env_file=domain.DEFAULT_ENV_FILE)
        return await scrub_credentials(sandbox, layout)


def state(top: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    """Every entry below `top` (not following links): inode, mtime, mode, content of files."""
    found = {}
    for dirpath, dirs, names in os.walk(top, followlinks=False):
        for name in [*dirs, *names]:
            path = Path(dirpath) / name
            info = path.lstat()
            content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
            found[str(path.relative_to(top))] = (info.st_ino, info.st_mtime_ns, info.st_mode, content)
    info = top.lstat()
    found["."] = (info.st_ino, info.st_mtime_ns, info.st_mode, None)
    return found


@pytest.fixture
async def backend(tmp_path: Path) -> Any:
    backend = LocalBackend(tmp_path / "root", durable=False)
    await inject(backend, "victim", "victim-token", known=False)
    victim = tmp_path / "root" / "victim"
    (victim / ".claude/settings.json").write_bytes(b'{"skipDangerousModePermissionPrompt": true, "m": "'
                                                   + MARKER + b'"}\n')
    await inject(backend, "attacker", "attacker-token", known=False)
    yield backend
    await backend.aclose()


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    return tmp_path / "root" / "victim"


@pytest.fixture
def attacker(tmp_path: Path) -> Path:
    return tmp_path / "root" / "attacker"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside every sandbox (mode 0755) holding a file and a temp-named file."""
    path = tmp_path / "outside"
    path.mkdir()
    os.chmod(path, 0o755)
    (path / ".credentials.json").write_text("someone else's")
    (path / "..credentials.json.0123456789ab.ccbridge-tmp").write_text("someone else's too")
    (path / "settings.json").write_bytes(b'{"m": "' + MARKER + b'"}')
    (path / ".claude.json").write_bytes(b'{"m": "' + MARKER + b'"}')
    return path


def no_attacker_content(victim: Path) -> None:
    for dirpath, _, names in os.walk(victim):
        for name in names:
            assert b"attacker-token" not in (Path(dirpath) / name).read_bytes()


@pytest.mark.parametrize("known", [True, False], ids=["re-inject", "created"])
async def test_claude_dir_linked_to_another_sandbox_is_refused(
    backend: LocalBackend, victim: Path, attacker: Path, known: bool
) -> None:
    (attacker / ".claude").rename(attacker / "real-claude")
    (attacker / ".claude").symlink_to(victim / ".claude")
    before = state(victim)
    seen: list[Mapping[PurePosixPath, bytes | None]] = []
    with pytest.raises(PathOutsideSandbox):
        await inject(backend, "attacker", "attacker-token-2", known=known, seen=seen)
    assert state(victim) == before and seen == []  # nothing read for a merge, nothing written
    no_attacker_content(victim)


@pytest.mark.parametrize("name", [".claude.json", ".claude/settings.json", ".claude/.credentials.json"])
async def test_a_file_linked_outside_is_never_read_merged_or_written_through(
    backend: LocalBackend, attacker: Path, outside: Path, name: str
) -> None:
    link = attacker / name
    link.unlink()
    link.symlink_to(outside / Path(name).name)
    before = state(outside)
    seen: list[Mapping[PurePosixPath, bytes | None]] = []
    with pytest.raises(PathOutsideSandbox):
        await inject(backend, "attacker", "attacker-token-2", seen=seen)
    assert all(MARKER not in (content or b"") for found in seen for content in found.values())
    sandbox = LocalSandbox(attacker)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.read_file(PurePosixPath(name))
    with pytest.raises(PathOutsideSandbox):
        await sandbox.write_file(PurePosixPath(name), b"{}", 0o600)
    with pytest.raises(PathOutsideSandbox):
        await write_files(sandbox, [], [(PurePosixPath(name), b"{}", 0o600)])
    assert state(outside) == before
    assert link.is_symlink()  # refused, not silently replaced either
    for dirpath, _, names in os.walk(attacker):
        for file in names:
            path = Path(dirpath) / file
            assert path.is_symlink() or MARKER not in path.read_bytes()


@pytest.mark.parametrize("name", [".claude/.credentials.json", ".claude.json"])
async def test_a_fifo_does_not_block_us(backend: LocalBackend, attacker: Path, name: str) -> None:
    fifo = attacker / name
    fifo.unlink()
    os.mkfifo(fifo, 0o600)
    try:
        with pytest.raises(BackendError) as info:
            await asyncio.wait_for(inject(backend, "attacker", "attacker-token-2"), 5)
        assert info.value.retryable is False and "not a regular file" in info.value.detail
        with pytest.raises(BackendError):
            await asyncio.wait_for(LocalSandbox(attacker).read_file(PurePosixPath(name)), 5)
        assert stat.S_ISFIFO(fifo.lstat().st_mode)
        await asyncio.wait_for(LocalSandbox(attacker).remove(PurePosixPath(name)), 5)  # a scrub takes it away
        assert not os.path.lexists(fifo)
    finally:
        try:  # had we blocked opening it, a writer releases the I/O thread
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


async def test_a_huge_merged_file_is_a_final_error_and_is_not_read(
    backend: LocalBackend, attacker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = attacker / ".claude.json"
    os.truncate(huge, 8 << 30)  # sparse: 8 GiB that take no disk
    read_sizes: list[int] = []
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        read_sizes.append(size)
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(BackendError) as info:
        await inject(backend, "attacker", "attacker-token-2")
    assert info.value.retryable is False and "larger than" in info.value.detail
    assert all(size <= MAX_READ + 1 for size in read_sizes) and sum(read_sizes) < 2 * MAX_READ
    # one that grows past the limit while it is read is refused the same way
    os.truncate(huge, 0)
    (attacker / "grows").write_bytes(b"x" * (MAX_READ + 10))
    monkeypatch.setattr(os, "fstat", lambda fd, real=os.fstat: _shrunk(real(fd)))
    with pytest.raises(BackendError, match="larger than"):
        await LocalSandbox(attacker).read_file(PurePosixPath("grows"))


def _shrunk(info: os.stat_result) -> os.stat_result:
    """`info` claiming a size of 0 (a file that grew after its fstat)."""
    values = list(info)
    values[stat.ST_SIZE] = 0
    return os.stat_result(values)


async def test_a_device_file_is_not_read(backend: LocalBackend, attacker: Path) -> None:
    path = attacker / ".claude.json"
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
    except PermissionError:
        path.symlink_to("/dev/zero")  # no CAP_MKNOD here: a link to it then
    with pytest.raises(BackendError) as info:
        await asyncio.wait_for(inject(backend, "attacker", "attacker-token-2"), 5)
    assert info.value.retryable is False


async def test_a_home_replaced_by_a_symlink_is_refused(
    backend: LocalBackend, victim: Path, attacker: Path, tmp_path: Path
) -> None:
    attacker.rename(tmp_path / "attacker-real")
    attacker.symlink_to(victim)
    before = state(victim)
    for known in (True, False):
        with pytest.raises(PathOutsideSandbox):
            await inject(backend, "attacker", "attacker-token-2", known=known)
    with pytest.raises(PathOutsideSandbox):
        await scrub(backend, "attacker")
    assert state(victim) == before


async def test_scrub_through_a_symlinked_claude_never_deletes_outside(
    backend: LocalBackend, attacker: Path, outside: Path
) -> None:
    (attacker / ".claude").rename(attacker / "real-claude")
    (attacker / ".claude").symlink_to(outside)
    before = state(outside)
    with pytest.raises(PathOutsideSandbox):
        await scrub(backend, "attacker")
    sandbox = LocalSandbox(attacker)
    with pytest.raises(PathOutsideSandbox):
        await sandbox.remove(PurePosixPath(".claude/.credentials.json"))
    assert state(outside) == before
    # the link itself may go: removing it never touches what it points to
    await sandbox.remove(PurePosixPath(".claude"))
    assert not os.path.lexists(attacker / ".claude") and state(outside) == before


async def test_removing_a_tree_never_follows_the_links_in_it(
    backend: LocalBackend, attacker: Path, outside: Path
) -> None:
    tree = attacker / ".claude" / "deep"
    deep = tree
    for level in range(200):  # deeper than any recursion would like
        deep = deep / f"d{level}"
    deep.mkdir(parents=True)
    (deep / "file").write_text("x")
    (deep / "to-outside").symlink_to(outside)
    (tree / "to-outside").symlink_to(outside)
    (tree / "to-file").symlink_to(outside / ".credentials.json")
    os.mkfifo(tree / "fifo")
    before = state(outside)
    fds = open_fds()
    await LocalSandbox(attacker).remove(PurePosixPath(".claude/deep"))
    assert not os.path.lexists(tree) and state(outside) == before
    assert open_fds() == fds


async def test_make_dir_never_chmods_outside(backend: LocalBackend, attacker: Path, outside: Path) -> None:
    (attacker / ".claude").rename(attacker / "real-claude")
    (attacker / ".claude").symlink_to(outside)
    before = state(outside)
    with pytest.raises(PathOutsideSandbox):
        await LocalSandbox(attacker).make_dir(PurePosixPath(".claude"), 0o700)
    with pytest.raises(PathOutsideSandbox):
        await inject(backend, "attacker", "attacker-token-2")
    assert state(outside) == before and stat.S_IMODE(outside.lstat().st_mode) == 0o755


async def test_no_descriptor_is_leaked_by_many_injections(
    backend: LocalBackend, attacker: Path, outside: Path, tmp_path: Path
) -> None:
    """Successful, refused and failed injections and scrubs alike close every descriptor."""
    await inject(backend, "attacker", "warm-up")  # the I/O thread exists from here on
    fds = open_fds()
    outcomes = {"ok": 0, "refused": 0}
    setups = ["none", "claude-link", "fifo", "huge", "missing-home", "config-link"]
    for round_ in range(300):
        setup = setups[round_ % len(setups)]
        claude, creds, config = attacker / ".claude", attacker / ".claude/.credentials.json", attacker / ".claude.json"
        if setup == "claude-link":
            claude.rename(attacker / "real-claude")
            claude.symlink_to(outside)
        elif setup == "fifo":
            creds.unlink(missing_ok=True)  # a scrub may have taken it
            os.mkfifo(creds)
        elif setup == "huge":
            config.write_bytes(b"")
            os.truncate(config, MAX_READ + 1)
        elif setup == "missing-home":
            attacker.rename(tmp_path / "away")
        elif setup == "config-link":
            config.unlink(missing_ok=True)
            config.symlink_to(outside / ".claude.json")
        try:
            await inject(backend, "attacker", f"token-{round_}")
            if round_ % 10 == 0:
                await scrub(backend, "attacker")
            outcomes["ok"] += 1
        except BackendError:
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - SandboxNotFound is expected for a missing home
            assert setup == "missing-home", exc
            outcomes["refused"] += 1
        if setup == "claude-link":
            claude.unlink()
            (attacker / "real-claude").rename(claude)
        elif setup == "fifo":
            creds.unlink()
        elif setup in ("huge", "config-link"):
            config.unlink()
        elif setup == "missing-home":
            (tmp_path / "away").rename(attacker)
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes
    assert open_fds() == fds


async def test_no_descriptor_is_leaked_when_the_home_or_root_is_missing(tmp_path: Path) -> None:
    paths = [PurePosixPath(".claude.json"), PurePosixPath(".claude/settings.json")]
    (tmp_path / "root").mkdir()
    await read_files(LocalSandbox(tmp_path / "root" / "warm-up"), paths)
    fds = open_fds()
    for home in (tmp_path / "root" / "gone", tmp_path / "no-root" / "gone"):
        sandbox = LocalSandbox(home)  # a known sandbox: never re-created
        for _ in range(20):
            assert await read_files(sandbox, paths) == dict.fromkeys(paths)
            with pytest.raises(BackendError):
                await sandbox.update_files(paths, lambda found: ([(PurePosixPath(".claude"), 0o700)],
                                                                 [(paths[1], b"{}", 0o600)]))
            await sandbox.remove(paths[1])
        assert not home.exists()
    assert open_fds() == fds


async def test_a_linked_credentials_file_does_not_stop_the_scrub(
    backend: LocalBackend, attacker: Path, victim: Path
) -> None:
    """The sandbox replaced its credentials file by a link (to the victim's): the scrub still
    removes the env file after it, and removes the link itself, never what it points at."""
    await inject(backend, "attacker", "attacker-token")
    env_file = attacker / domain.DEFAULT_ENV_FILE
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text("export CLAUDE_CODE_OAUTH_TOKEN=attacker-token\n")
    creds = attacker / ".claude" / ".credentials.json"
    creds.unlink()
    creds.symlink_to(victim / ".claude" / ".credentials.json")
    before = state(victim)

    removed = await scrub(backend, "attacker")

    assert set(removed) == {str(creds), str(env_file)}
    assert not creds.is_symlink() and not creds.exists() and not env_file.exists()
    assert state(victim) == before
