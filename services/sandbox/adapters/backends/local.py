"""Local backend: sandbox `<id>` is the directory `<LOCAL_SANDBOX_ROOT>/<id>`, used as its
HOME (the event's `home`/`user` do not apply here).

Every path is resolved (symlinks included) and must stay inside that directory. Writes are
atomic: a temp file created in the same directory with the final mode, written, then
`os.replace`d over the target — a reader, or a process killed at any point, sees the old file
or the new one, never half a file. With `durable=True` (`SANDBOX_LOCAL_FSYNC`) the temp file
and then each touched directory are also fsynced, so the new file survives a host crash too;
that costs ~4 ms per injection on a VM disk and is off by default (the bus's own file store
syncs on an interval, not per message, either — docs/sandbox.md).

One injection is one worker-thread call (`update_files`): read what is there, build the new
contents, create the dirs, write what changed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import secrets
import shutil
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import TypeVar

from services.sandbox.adapters.backends.base import SandboxTarget
from services.sandbox.errors import BackendError, PathOutsideSandbox, SandboxNotFound

HOME_MODE = 0o700
T = TypeVar("T")
_TMP_SUFFIX = ".ccbridge-tmp"


def _io_error(action: str, path: PurePosixPath, exc: OSError) -> BackendError:
    # EISDIR/ENOTDIR/ELOOP won't fix themselves; disk full, EIO, ... might.
    final = exc.errno in {errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return BackendError(f"{action} {path}: {name}", retryable=not final)


def _temp_target(name: str) -> str | None:
    """The file name a temp copy `.<name>.<12 hex>.ccbridge-tmp` belongs to, else None."""
    if not (name.startswith(".") and name.endswith(_TMP_SUFFIX)):
        return None
    original, _, tag = name[1 : -len(_TMP_SUFFIX)].rpartition(".")
    if not original or len(tag) != 12 or not all(c in "0123456789abcdef" for c in tag):
        return None
    return original


def _stale_temps_in(directory: Path, names: Collection[str], *, min_age: float) -> list[Path]:
    """Temp copies of any of `names` in `directory` older than `min_age` s, from one listing."""
    now = time.time()
    found = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if _temp_target(entry.name) not in names:
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime >= min_age:
                found.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return found


def stale_temps(target: Path, *, min_age: float) -> list[Path]:
    """Temp files `atomic_write` left next to `target` (a SIGKILL between write and rename),
    older than `min_age` seconds — a live writer's temp file exists for milliseconds."""
    return _stale_temps_in(target.parent, {target.name}, min_age=min_age)


def _discard_stale_temps(targets: Sequence[Path], *, min_age: float) -> None:
    """Remove the `stale_temps` of several targets, one directory listing per directory."""
    by_dir: dict[Path, set[str]] = {}
    for target in targets:
        by_dir.setdefault(target.parent, set()).add(target.name)
    for directory, names in by_dir.items():
        for temp in _stale_temps_in(directory, names, min_age=min_age):
            temp.unlink(missing_ok=True)


# Temp-file names only need to be unique in their directory (O_EXCL refuses a taken one, and
# we pick again): a seeded PRNG spares a getrandom system call per file.
_TEMP_NAMES = random.Random(secrets.randbits(128))
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _read_bytes(real: Path) -> bytes | None:
    """The content of `real` (already resolved), None when it does not exist — with 3–4
    system calls where `Path.read_bytes` makes 6."""
    try:
        fd = os.open(real, _READ_FLAGS)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _create_temp(target: Path, mode: int, attempts: int = 8) -> tuple[Path, int]:
    """A new, exclusively created `.<name>.<12 hex>.ccbridge-tmp` beside `target`, open for writing."""
    for attempt in range(1, attempts + 1):
        tmp = target.parent / f".{target.name}.{_TEMP_NAMES.getrandbits(48):012x}{_TMP_SUFFIX}"
        try:
            return tmp, os.open(tmp, _CREATE_FLAGS, mode)
        except FileExistsError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _write_temp(target: Path, data: bytes, mode: int, *, durable: bool = True) -> Path:
    """A temp file beside `target` holding `data` with permission bits exactly `mode`
    (fsynced when `durable`)."""
    tmp, fd = _create_temp(target, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have dropped bits of `mode`
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(target: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Write `data` to `target` atomically with permission bits exactly `mode`."""
    tmp = _write_temp(target, data, mode, durable=durable)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(target.parent)


def _ensure_dir(real: Path, mode: int) -> str | None:
    """`real` (already resolved) is a directory with permission bits exactly `mode`; an
    existing one that already is costs one `lstat`. Returns "new" when it was created,
    "fixed" when an existing one was changed, None when it was fine."""
    try:
        info = os.lstat(real)
    except FileNotFoundError:
        outcome = "new"
    else:
        if stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == mode:
            return None
        outcome = "fixed"
    try:
        os.mkdir(real, mode)
    except FileExistsError:
        outcome = "fixed"  # someone made it meanwhile: it may hold anything
    except FileNotFoundError:
        real.mkdir(mode=mode, parents=True, exist_ok=True)
    # mkdir honours the umask and leaves existing dirs alone: set the bits exactly.
    os.chmod(real, mode)
    return outcome


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalSandbox:
    """One local sandbox home. Blocking file I/O runs in a worker thread.

    `prepare` (from `LocalBackend.open`) creates the home; it runs inside the first worker-thread
    call instead of costing a thread hop of its own."""

    def __init__(self, home_dir: Path, *, durable: bool = True,
                 prepare: Callable[[], bool] | None = None, executor: Executor | None = None) -> None:
        self._home_dir = Path(os.path.realpath(home_dir))
        self._home_str = str(self._home_dir)
        self._durable = durable
        self._prepare = prepare
        self._prepare_lock = threading.Lock()
        self._executor = executor

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run blocking file work in the backend's I/O thread (else the default pool)."""
        if self._executor is None:
            return await asyncio.to_thread(fn)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def home(self) -> PurePosixPath:
        return PurePosixPath(self._home_dir.as_posix())

    def _prepared(self) -> bool:
        """In the worker thread, before touching the home: create it if asked to (once; a
        concurrent first call waits for it, a failed one is tried again by the next call).
        True for the one call that has just created the home: it knows the home is empty."""
        if self._prepare is None:
            return False
        with self._prepare_lock:
            if self._prepare is None:
                return False
            created = self._prepare()
            self._prepare = None
            return bool(created)

    def resolve(self, path: PurePosixPath | str) -> Path:
        """The real host path of a sandbox path; refuses anything outside the home.

        Same answer as `os.path.realpath`, but a path below the (already real) home is walked
        from the home, one `lstat` per component, instead of from `/`; a symlink or `..` on
        the way falls back to `realpath`. (String operations: pathlib's parsing cost more
        than the system calls.)"""
        raw = str(path)
        # normalised like pathlib (no empty or "." parts): realpath mishandles "//" after a loop
        text = "/" + "/".join(p for p in raw.split("/") if p not in ("", "."))
        if not raw.startswith("/"):
            text = self._home_str + (text if text != "/" else "")
        real = self._walk_from_home(text)
        if real is None:
            real = os.path.realpath(text)
        home = self._home_str
        if real != home and not real.startswith(home + "/"):
            raise PathOutsideSandbox(f"{path} is outside the sandbox")
        return Path(real)

    def _walk_from_home(self, candidate: str) -> str | None:
        home = self._home_str
        if candidate == home:
            return home
        if not candidate.startswith(home + "/"):
            return None
        parts = [part for part in candidate[len(home) + 1 :].split("/") if part not in ("", ".")]
        if ".." in parts:
            return None
        current = home
        for index, part in enumerate(parts):
            current = f"{current}/{part}"
            try:
                info = os.lstat(current)
            except (FileNotFoundError, NotADirectoryError):
                rest = parts[index + 1 :]
                return "/".join([current, *rest]) if rest else current
            except OSError:  # ENAMETOOLONG, EACCES, ...: realpath's own rules decide
                return None
            if stat.S_ISLNK(info.st_mode):
                return None
        return current

    # --- SandboxBackend -----------------------------------------------------------
    async def read_file(self, path: PurePosixPath) -> bytes | None:
        real = self.resolve(path)

        def read() -> bytes | None:
            self._prepared()
            return _read_bytes(real)

        try:
            return await self._in_thread(read)
        except OSError as exc:
            raise _io_error("read", path, exc) from None

    async def write_file(self, path: PurePosixPath, data: bytes, mode: int) -> None:
        real = self.resolve(path)
        if real == self._home_dir:
            raise PathOutsideSandbox("cannot replace the sandbox home with a file")

        def write() -> None:
            self._prepared()
            atomic_write(real, data, mode, durable=self._durable)

        try:
            await self._in_thread(write)
        except OSError as exc:
            raise _io_error("write", path, exc) from None

    async def make_dir(self, path: PurePosixPath, mode: int) -> None:
        real = self.resolve(path)

        def make() -> None:
            self._prepared()
            if _ensure_dir(real, mode) is not None:  # `real` is already symlink-free
                self.resolve(path)  # checked before mkdir; nothing swapped in a symlink since

        try:
            await self._in_thread(make)
        except OSError as exc:
            raise _io_error("make_dir", path, exc) from None

    # --- batched: one worker-thread call for a whole injection --------------------
    def _read_all(self, paths: Sequence[PurePosixPath],
                  resolved: dict[PurePosixPath, Path] | None = None) -> dict[PurePosixPath, bytes | None]:
        found: dict[PurePosixPath, bytes | None] = {}
        for path in paths:
            real = self._resolved(path, resolved)
            try:
                found[path] = _read_bytes(real)
            except OSError as exc:
                raise _io_error("read", path, exc) from None
        return found

    def _resolved(self, path: PurePosixPath, cache: dict[PurePosixPath, Path] | None) -> Path:
        """`resolve`, remembered for the rest of one worker-thread call."""
        if cache is None:
            return self.resolve(path)
        real = cache.get(path)
        if real is None:
            real = cache[path] = self.resolve(path)
        return real

    async def read_files(self, paths: Sequence[PurePosixPath]) -> dict[PurePosixPath, bytes | None]:
        """`read_file` of several paths in one worker-thread call (paths resolved there too)."""

        def read_all() -> dict[PurePosixPath, bytes | None]:
            self._prepared()
            return self._read_all(paths)

        return await self._in_thread(read_all)

    async def write_files(
        self,
        dirs: Sequence[tuple[PurePosixPath, int]],
        files: Sequence[tuple[PurePosixPath, bytes, int]],
        *,
        known: Mapping[PurePosixPath, bytes | None] | None = None,
    ) -> list[PurePosixPath]:
        """`make_dir` each of `dirs`, then write each of `files` whose bytes differ from what is
        there (what `known` says, else read) — in one worker-thread call. Same guarantees as the
        one-file calls: every file is a temp file `os.replace`d over the target, with exactly
        its mode; stale temp copies beside a target are removed first. When durable, each
        touched directory is fsynced once, after all the renames. Returns the paths written."""

        def apply() -> list[PurePosixPath]:
            fresh = self._prepared()
            return self._apply(dirs, files, dict(known or {}), fresh_home=fresh)

        return await self._in_thread(apply)

    async def update_files(
        self,
        paths: Sequence[PurePosixPath],
        build: Callable[[Mapping[PurePosixPath, bytes | None]], tuple[
            Sequence[tuple[PurePosixPath, int]], Sequence[tuple[PurePosixPath, bytes, int]]]],
    ) -> tuple[list[tuple[PurePosixPath, bytes, int]], list[PurePosixPath]]:
        """`read_files(paths)`, `build(what was read) -> (dirs, files)`, `write_files` — all in
        ONE worker-thread call. Returns (the files built, the paths written)."""

        def run() -> tuple[list[tuple[PurePosixPath, bytes, int]], list[PurePosixPath]]:
            fresh = self._prepared()
            resolved: dict[PurePosixPath, Path] = {}
            if fresh:  # a home created just now holds nothing: confine the paths, read nothing
                existing: dict[PurePosixPath, bytes | None] = {}
                for path in paths:
                    self._resolved(path, resolved)
                    existing[path] = None
            else:
                existing = self._read_all(paths, resolved)
            dirs, built = build(existing)
            files = list(built)
            return files, self._apply(list(dirs), files, existing, resolved, fresh_home=fresh)

        return await self._in_thread(run)

    def _apply(
        self,
        dirs: Sequence[tuple[PurePosixPath, int]],
        files: Sequence[tuple[PurePosixPath, bytes, int]],
        known: Mapping[PurePosixPath, bytes | None],
        resolved: dict[PurePosixPath, Path] | None = None,
        *,
        fresh_home: bool = False,
    ) -> list[PurePosixPath]:
        written: list[PurePosixPath] = []
        created: dict[Path, None] = {}
        empty: set[Path] = {self._home_dir} if fresh_home else set()  # made now: no stale temps
        for path, mode in dirs:
            real = self.resolve(path)
            try:
                made = _ensure_dir(real, mode)
            except OSError as exc:
                raise _io_error("make_dir", path, exc) from None
            if made is not None:
                self.resolve(path)  # nothing swapped in a symlink meanwhile
                created[real.parent] = None
                if made == "new":
                    empty.add(real)
        if self._durable:  # a new directory's entry must survive a host crash too
            for parent in created:
                _fsync_dir(parent)
        targets: list[tuple[PurePosixPath, Path, bytes, int]] = []
        for path, data, mode in files:
            real = self._resolved(path, resolved)
            if real == self._home_dir:
                raise PathOutsideSandbox("cannot replace the sandbox home with a file")
            targets.append((path, real, data, mode))
        try:
            _discard_stale_temps([real for _, real, _, _ in targets if real.parent not in empty], min_age=1.0)
        except OSError as exc:
            raise _io_error("write", targets[0][0], exc) from None
        staged: list[tuple[PurePosixPath, Path, Path]] = []
        try:
            for path, real, data, mode in targets:
                try:
                    current = known[path] if path in known else _read_bytes(real)
                    if current == data:
                        continue
                    staged.append((path, real, _write_temp(real, data, mode, durable=self._durable)))
                except OSError as exc:
                    raise _io_error("write", path, exc) from None
            touched: dict[Path, None] = {}
            while staged:
                path, real, tmp = staged[0]
                try:
                    os.replace(tmp, real)
                except OSError as exc:
                    raise _io_error("write", path, exc) from None
                staged.pop(0)
                touched[real.parent] = None
                written.append(path)
            if self._durable:
                for directory in touched:
                    _fsync_dir(directory)
        finally:
            for _, _, tmp in staged:  # not renamed: never leave a copy behind
                tmp.unlink(missing_ok=True)
        return written

    async def discard_temps(self, path: PurePosixPath, *, min_age: float = 1.0) -> int:
        """Remove stale temp copies of `path` left by an interrupted write; returns how many."""
        real = self.resolve(path)

        def discard() -> int:
            self._prepared()
            removed = 0
            for temp in stale_temps(real, min_age=min_age):
                try:
                    temp.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            return removed

        try:
            return await self._in_thread(discard)
        except OSError as exc:
            raise _io_error("discard temps of", path, exc) from None

    async def remove(self, path: PurePosixPath) -> None:
        real = self.resolve(path)
        if real == self._home_dir:
            raise PathOutsideSandbox("refusing to remove the sandbox home itself")

        def rm() -> None:
            self._prepared()
            if real.is_dir() and not real.is_symlink():
                shutil.rmtree(real)
            else:
                real.unlink(missing_ok=True)
            if real.parent.is_dir():
                for temp in stale_temps(real, min_age=0.0):  # may hold a copy of the content
                    temp.unlink(missing_ok=True)

        try:
            await self._in_thread(rm)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _io_error("remove", path, exc) from None


class LocalBackend:
    """`BackendProvider` for `backend: "local"`. `durable`: fsync written files and their
    directories (`SANDBOX_LOCAL_FSYNC`). `close`/`aclose` stop its I/O thread."""

    kind = "local"

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        # One I/O thread for all local sandboxes: file work is many tiny system calls, each
        # releasing the GIL; spread over a pool, the threads and the event loop hand the GIL
        # back and forth (measured: 1.8 ms CPU per injection with the default pool, 1.1 ms
        # with one thread).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccbridge-local-io")

    def home_dir(self, sandbox_id: str) -> Path:
        """`<root>/<sandbox_id>`, checked to be a direct child of the root."""
        root = Path(os.path.realpath(self.root))
        home = Path(os.path.realpath(root / sandbox_id))
        if home.parent != root or sandbox_id in {"", ".", ".."}:
            raise PathOutsideSandbox(f"sandbox id {sandbox_id!r} does not name a directory under the root")
        return home

    @asynccontextmanager
    async def open(self, event: SandboxTarget) -> AsyncIterator[LocalSandbox]:
        home = self.home_dir(event.sandbox_id)
        if bool(getattr(event, "must_exist", False)):

            def check_home() -> None:
                if not home.is_dir():
                    raise SandboxNotFound(f"sandbox {event.sandbox_id} has no home under the local root")

            await asyncio.get_running_loop().run_in_executor(self._executor, check_home)
            yield LocalSandbox(home, durable=self.durable, executor=self._executor)
            return

        def ensure_home() -> bool:
            """True when this call created the (then empty) home."""
            try:
                try:
                    os.mkdir(home, HOME_MODE)
                except FileExistsError:
                    return False
                except FileNotFoundError:  # no root yet
                    self.root.mkdir(parents=True, exist_ok=True)
                    try:
                        os.mkdir(home, HOME_MODE)
                    except FileExistsError:
                        return False
                if self.durable:
                    _fsync_dir(home.parent)
                return True
            except OSError as exc:
                raise _io_error("create home", PurePosixPath(home.as_posix()), exc) from None

        # the home is created by the sandbox's first I/O-thread call (no extra hop)
        yield LocalSandbox(home, durable=self.durable, prepare=ensure_home, executor=self._executor)

    def close(self) -> None:
        """Stop the I/O thread (after the work already queued). Idempotent."""
        self._executor.shutdown(wait=True)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
