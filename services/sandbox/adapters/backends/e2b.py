"""e2b backend through the real `e2b` SDK (2.x, `AsyncSandbox`).

Opening: `AsyncSandbox.connect(sandbox_id)` for a sandbox the platform already created (a
paused one is resumed); `AsyncSandbox.create(template=…)` when sandbox.created names a
`template` (`""` → E2B_TEMPLATE), with an `Idempotency-Key` derived from the event id so a
redelivered event never creates a second sandbox. A sandbox the platform created is never
killed here; one this service created is killed (`discard`) only when its injection failed for
good, since nobody else knows its id.

Who acts as whom in the sandbox (read from envd's source, e2b-dev/infra `packages/envd`): envd
runs as root. Its file API — `files.read`, `files.write`, `files.make_dir`, `files.remove` — does
its work AS ROOT: it follows symbolic links, checks no permission of the `user` named in the
request, and merely chowns what it creates (and a file it overwrites) to that user. Only
`commands.run(user=…)` runs with the user's uid, so only there does the kernel check anything.
envd also logs every process's command line and environment (debug level, shipped to e2b's log
collector), but only the byte counts of stdout and nothing of an upload's content.

The sandbox user is untrusted (agent code runs as that user) and owns the home: anything under
it may be a link they planted, swapped at any moment. So:
- nothing here runs as root, and envd's file API is never pointed at a path under the home. A
  `~/.claude` planted as a link to `/etc` or `/root` gets the user nothing they could not do
  themselves; config dirs that are links are refused anyway.
- every read, mkdir, chmod, rename and remove is a `commands.run` AS THE USER;
- file content travels in ONE multipart `files.write_files` to fresh names in `/tmp`
  (`/tmp/.ccbridge-stage-<128 random bits>-<n>`): `/tmp` is root-owned and sticky (checked
  before every upload), the name cannot be guessed, and a file envd creates there belongs to
  root until envd chowns it — so the user can neither plant a link at that name beforehand nor
  swap the file under envd. Token bytes never appear in a command line or an environment.
  Trade-off: envd creates files 0644 and has no mode parameter, so for the one round trip
  between the upload and the move another local account of the sandbox could read the staged
  copy (the sandbox user may: the credentials are theirs). The move step removes every staged
  copy whatever happens (`trap … EXIT`), a failed upload is cleaned up best-effort, and copies
  a crash left behind are swept (older than 2 minutes) by the next read or scrub.

One injection (`update_files`, what `writer.write_credentials` uses) is at most 4 round trips:
1. `connect` (or `create`);
2. one command as the user that sweeps stale staged copies, reports `/tmp`'s owner and mode, and
   prints each file to merge (`~/.claude.json`, `~/.claude/settings.json`) base64-encoded between
   per-call random markers — absent, unreadable and not-a-regular-file are told apart, and at
   most `MAX_MERGE_BYTES` are read (the content is hostile input);
3. one multipart upload of every file whose bytes changed, to its staging name;
4. one command as the user (umask 077) that, per directory: refuses a symbolic link, creates it
   (`mkdir -p -m 700`) if missing, requires that the user owns it, `chmod 700`; per file: when
   the target already holds the same bytes (`cmp`) drops the staged copy, else `chmod 600` it,
   moves it next to the target (`.<name>.ccbridge-tmp`, same directory) and renames it over the
   target (`mv -f`, atomic: readers see the old or the new file); then prints each directory's
   mode, owner and type and each file's mode, owner, size and sha256. The service checks those
   against what it built; a mismatch is a retryable `BackendError` (a final one when the
   sandbox said permission denied), so no read-back is needed.
`read_file`, `make_dir`, `write_file` (2 round trips) and `remove` (`rm -f --` of the file and its
temp name, as the user) use the same steps. A config dir the template created as root (the user
cannot make it 0700 or write into it) fails for good with a message saying the template must give
the user its home (deploy/e2b/README.md). Tools the commands use: bash, coreutils (`head`, `base64`,
`stat`, `mkdir`, `chmod`, `mv`, `rm`, `sha256sum`), `cmp` (diffutils) and `find` (findutils) —
all in any Debian/Ubuntu-based template.

SDK errors map onto the service's error tree (`map_e2b_error`): the sandbox does not exist or
is not running → `SandboxNotFound` (final); timeouts, rate limits, busy/unreachable, transport
errors → `BackendUnavailable` (retried); bad API key → `BackendUnavailable` (final); envd 5xx →
`BackendError` (retried); permission denied and other 4xx → `BackendError` (final).
Rate limits, a busy e2b and the API's (connect/create/kill) timeouts, transport errors and 5xx
name the dependency "e2b": the delivery policy then pauses injection through a breaker
instead of spending each message's retries. One sandbox's envd failing is that sandbox's
problem alone (its user may cause it on purpose) and never pauses anybody else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
import re
import secrets
import shlex
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import httpx
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    ServiceBusyException,
    TemplateException,
    TimeoutException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry
from pydantic import SecretStr

from services.sandbox.adapters.backends.base import Build, DirSpec, FileSpec, SandboxTarget
from services.sandbox.errors import BackendError, BackendUnavailable, SandboxError, SandboxNotFound
from shared.logging import get_logger

log = get_logger("ccbridge.sandbox.e2b")

DEPENDENCY = "e2b"  # the breaker name of e2b's API and envd (shared.delivery)
DEFAULT_USER = "user"
STAGE_DIR = PurePosixPath("/tmp")
STAGE_PREFIX = ".ccbridge-stage-"
MAX_MERGE_BYTES = 2 * 1024 * 1024
"""A file read to be merged (`~/.claude.json`, settings) larger than this fails the injection
for good instead of being loaded: its content is the sandbox user's, i.e. hostile input."""
SWEEP_MINUTES = 2
_TMP_SUFFIX = ".ccbridge-tmp"
_OUTPUT_CAP = 64 * 1024
_DENIED = ("permission denied", "operation not permitted", "read-only file system")
_STATUS = re.compile(r"^\s*(\d{3})\s*:")


@dataclass(frozen=True)
class E2BConfig:
    api_key: SecretStr | None = None
    domain: str = "e2b.app"
    api_url: str | None = None
    sandbox_url: str | None = None
    template: str = "base"
    request_timeout: float = 30.0
    sandbox_timeout: int = 3600
    request_retries: int = 2

    def __repr__(self) -> str:
        return (
            f"E2BConfig(domain={self.domain!r}, api_url={self.api_url!r}, sandbox_url={self.sandbox_url!r}, "
            f"template={self.template!r}, api_key={'set' if self.api_key else 'unset'})"
        )

    def api_params(self) -> dict[str, Any]:
        """The SDK's ApiParams: explicit values beat the SDK's own env lookups."""
        assert self.api_key is not None
        params: dict[str, Any] = {
            "api_key": self.api_key.get_secret_value(),
            "domain": self.domain,
            "request_timeout": self.request_timeout,
            "retries": self.request_retries,
        }
        if self.api_url:
            params["api_url"] = self.api_url
        if self.sandbox_url:
            params["sandbox_url"] = self.sandbox_url
        return params


def idempotency_key(event_id: str) -> str:
    """The SDK wants 1–255 of [a-z0-9-]: a UUID5 of the cause event, stable across redeliveries."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ccbridge:e2b-create:{event_id}"))


def _status_of(exc: Exception) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    match = _STATUS.match(str(exc))
    return int(match.group(1)) if match else None


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def map_e2b_error(exc: BaseException, action: str, *, control_plane: bool = False) -> SandboxError:
    """One SDK (or transport) exception → the service's error, retryable or final.

    `control_plane`: the call went to e2b's API (connect, create, kill), not to one sandbox's
    envd. Only there do a timeout, a broken connection or a 5xx say "e2b is down" (the
    dependency whose breaker pauses every injection); from envd they are that one sandbox's
    problem — whose own user may be causing them on purpose."""
    if isinstance(exc, SandboxError):
        return exc
    what = f"e2b {action}: {_brief(exc)}"
    outage = DEPENDENCY if control_plane else None
    # order matters: several of these subclass each other
    if isinstance(exc, (SandboxNotFoundException, SandboxNotRunningException)):
        return SandboxNotFound(what)
    if isinstance(exc, NotFoundException) and not isinstance(exc, FileNotFoundException):
        return SandboxNotFound(what)
    if isinstance(exc, AuthenticationException):
        return BackendUnavailable(what, retryable=False)
    # this one sandbox's envd does not answer (paused, killed, or its own user stopped envd)
    if isinstance(exc, SandboxUnreachableException):
        return BackendUnavailable(what, retryable=True)
    # e2b rate-limits or is busy: pause what needs it (a breaker), do not spend retries
    if isinstance(exc, (RateLimitException, ServiceBusyException)):
        return BackendUnavailable(what, retryable=True, dependency=DEPENDENCY)
    if isinstance(exc, (TimeoutException, httpx.TimeoutException, httpx.TransportError, TimeoutError,
                        ConnectionError, OSError)):
        return BackendUnavailable(what, retryable=True, dependency=outage)
    if isinstance(exc, CommandExitException):
        stderr = str(getattr(exc, "stderr", "") or "")
        # a racing writer moved our temp file away / a full disk: worth another delivery
        retryable = any(text in stderr.lower() for text in ("no space", "no such file"))
        return BackendError(f"e2b {action}: exit {exc.exit_code}: {stderr.strip()[:200]}", retryable=retryable)
    if isinstance(exc, NotEnoughSpaceException):
        return BackendError(what, retryable=True)
    if isinstance(exc, (InvalidArgumentException, TemplateException, FileNotFoundException)):
        return BackendError(what, retryable=False)
    if isinstance(exc, SandboxException):
        status = _status_of(exc)
        text = str(exc).upper()
        if status == 403 or "PERMISSION_DENIED" in text or "PERMISSION DENIED" in text:
            return BackendError(f"e2b {action}: permission denied ({_brief(exc)})", retryable=False)
        if status is not None and 400 <= status < 500:
            return BackendError(what, retryable=False)
        if outage:  # 5xx, INTERNAL, UNKNOWN, ... from the API
            return BackendUnavailable(what, retryable=True, dependency=outage)
        return BackendError(what, retryable=True)
    return BackendError(what, retryable=True)


# --- the scripts the sandbox runs (as the user) ----------------------------------------------------
def _q(value: object) -> str:
    return shlex.quote(str(value))


def staged_name(token: str, index: int) -> PurePosixPath:
    return STAGE_DIR / f"{STAGE_PREFIX}{token}-{index}"


def _sweep_line(user: str) -> str:
    """Staged copies a crash left behind: the user's own, older than a live injection's."""
    return (f"find {STAGE_DIR} -maxdepth 1 -type f -user {_q(user)} -name {_q(STAGE_PREFIX + '*')} "
            f"-mmin +{SWEEP_MINUTES} -delete")


def read_script(tag: str, user: str, paths: Sequence[PurePosixPath]) -> str:
    """Step 2: sweep, report /tmp (`<tag> t <uid> <mode> <type>`), print each file between
    `<tag> f <i>` and `<tag> e <i>` (base64, at most MAX_MERGE_BYTES + 1 bytes); `<tag> x <i>`:
    not a regular file; `<tag> u <i>`: unreadable; no marker: absent."""
    lines = ["umask 077", _sweep_line(user), f"stat -c {_q(tag + ' t %u %a %F')} -- {STAGE_DIR}"]
    for index, path in enumerate(paths):
        p = _q(path)
        lines += [
            f"test -e {p} && test ! -f {p} && echo {tag} x {index}",
            f"test -f {p} && test ! -r {p} && echo {tag} u {index}",
            f"test -f {p} && test -r {p} && echo {tag} f {index} && head -c {MAX_MERGE_BYTES + 1} -- {p} | base64",
            f"echo {tag} e {index}",
        ]
    return "\n".join(lines)


def put_script(tag: str, dirs: Sequence[DirSpec],
               files: Sequence[tuple[PurePosixPath, PurePosixPath, int]]) -> str:
    """Step 4 (see the module docstring). `files`: (target, staged copy, mode). Exit 3: a
    directory is a symbolic link; 4: cannot create or chmod a directory; 5: a directory is not
    the user's; 6: a staged copy could not be moved into place."""
    lines = ["umask 077"]
    if files:
        lines.append("trap " + _q("rm -f -- " + " ".join(_q(staged) for _, staged, _ in files)) + " EXIT")
    for index, (directory, mode) in enumerate(dirs):
        d = _q(directory)
        lines += [
            f"echo {tag} d {index}",
            f"test -L {d} && exit 3",
            f"mkdir -p -m {mode:o} -- {d} || exit 4",
            f"stat -c {_q(f'{tag} do {index} %U %a %F')} -- {d}",
            f"test -O {d} || exit 5",
            f"chmod {mode:o} -- {d} || exit 4",
        ]
    for index, (target, staged, mode) in enumerate(files):
        t, s, tmp = _q(target), _q(staged), _q(tmp_name(target))
        lines += [
            f"test -f {t} && cmp -s -- {s} {t} && rm -f -- {s} && chmod {mode:o} -- {t} && echo {tag} s {index}",
            (f"test -e {s} && echo {tag} n {index} && chmod {mode:o} -- {s} && rm -f -- {tmp} "
             f"&& mv -f -- {s} {tmp} && mv -f -- {tmp} {t}"),
            f"test -e {s} && exit 6",
        ]
    lines.append(f"echo {tag} v")
    for index, (directory, _) in enumerate(dirs):
        lines.append(f"stat -c {_q(f'{tag} vd {index} %a %U %F')} -- {_q(directory)}")
    for index, (target, _, _) in enumerate(files):
        lines.append(f"stat -L -c {_q(f'{tag} vf {index} %a %U %s %F')} -- {_q(target)} && sha256sum -- {_q(target)}")
    return "\n".join(lines)


def tmp_name(target: PurePosixPath) -> PurePosixPath:
    """The fixed name a file is renamed from, next to it: a move an interruption left half done
    is redone (or removed by `remove`) under the same name."""
    return target.parent / f".{target.name}{_TMP_SUFFIX}"


def _permission_denied(text: str) -> bool:
    lowered = text.lower()
    return any(phrase in lowered for phrase in _DENIED)


@dataclass
class _Output:
    code: int
    out: str
    err: str

    def tagged(self, tag: str) -> list[list[str]]:
        """The lines this call printed itself (a login shell's noise carries no tag)."""
        return [line.split()[1:] for line in self.out.splitlines() if line.startswith(tag + " ")]

    def brief_err(self) -> str:
        return " ".join(self.err.split())[:300]


class _Capped:
    """on_stdout/on_stderr sink that refuses more than `limit` characters (a hostile login
    profile may print without end: the service must not hold it all)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.overflow = False

    def __call__(self, chunk: str) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflow = True
            raise _TooMuchOutput()
        self.parts.append(chunk)

    def text(self) -> str:
        return "".join(self.parts)


class _TooMuchOutput(Exception):
    pass


class E2BSandbox:
    """One open e2b sandbox as a `SandboxBackend` (with the batched `update_files`)."""

    def __init__(
        self, sandbox: AsyncSandbox, *, home: PurePosixPath, user: str, request_timeout: float, created: bool
    ) -> None:
        self._sbx = sandbox
        self._home = home
        self._user = user
        self._timeout = request_timeout
        self._created = created
        self._staging_checked = False

    @property
    def home(self) -> PurePosixPath:
        return self._home

    @property
    def backend_sandbox_id(self) -> str | None:
        """The sandboxID e2b gave a sandbox created here from a template."""
        return str(self._sbx.sandbox_id) if self._created else None

    def _abs(self, path: PurePosixPath) -> PurePosixPath:
        target = path if path.is_absolute() else self._home / path
        target = PurePosixPath(posixpath.normpath(str(target)))
        if "\x00" in str(target) or "\n" in str(target):
            raise BackendError(f"e2b: refusing path {str(target)[:80]!r}", retryable=False)
        return target

    # --- transport ----------------------------------------------------------------------------
    async def _exec(self, script: str, action: str, *, out_limit: int = _OUTPUT_CAP) -> _Output:
        """Run `script` as the user (bash -l -c); a non-zero exit is returned, not raised."""
        out, err = _Capped(out_limit), _Capped(_OUTPUT_CAP)
        try:
            await self._sbx.commands.run(
                script, user=self._user, timeout=self._timeout, request_timeout=self._timeout,
                on_stdout=out, on_stderr=err, retain_output=False,
            )
        except CommandExitException as exc:
            if out.overflow or err.overflow:
                raise self._too_much(action) from None
            return _Output(int(exc.exit_code), out.text(), err.text())
        except Exception as exc:  # noqa: BLE001 - mapped to the service's tree
            if out.overflow or err.overflow:
                raise self._too_much(action) from None
            raise map_e2b_error(exc, action) from None
        if out.overflow or err.overflow:
            raise self._too_much(action)
        return _Output(0, out.text(), err.text())

    @staticmethod
    def _too_much(action: str) -> BackendError:
        return BackendError(f"e2b {action}: the sandbox printed more than expected (a login profile?)",
                            retryable=False)

    async def _stage(self, items: Sequence[tuple[PurePosixPath, bytes]], action: str) -> None:
        """Step 3: one multipart upload of every staged copy (envd writes them as root, chowned to
        the user, into the root-owned sticky /tmp under names nobody can guess)."""
        entries: list[WriteEntry] = [{"path": str(staged), "data": data} for staged, data in items]
        try:
            await self._sbx.files.write_files(entries, user=self._user, request_timeout=self._timeout,
                                              use_octet_stream=False)
        except Exception as exc:  # noqa: BLE001 - mapped to the service's tree
            raise map_e2b_error(exc, action) from None

    async def _discard_staged(self, staged: Sequence[PurePosixPath]) -> None:
        try:
            await self._exec("rm -f -- " + " ".join(_q(path) for path in staged), "discard staged copies")
        except SandboxError:
            log.warning("sandbox.e2b_staged_left", count=len(staged))

    # --- step 2: read -------------------------------------------------------------------------
    async def _read_all(self, paths: Sequence[PurePosixPath], *, staging: bool = True,
                        ) -> dict[PurePosixPath, bytes | None]:
        """Step 2. `staging`: an upload follows, so /tmp must be fit to stage in."""
        tag = _new_tag()
        limit = len(paths) * (MAX_MERGE_BYTES * 4 // 3 + MAX_MERGE_BYTES // 38 + 64) + _OUTPUT_CAP
        result = await self._exec(read_script(tag, self._user, paths), "read", out_limit=limit)
        if result.code:
            raise self._failed("read", result)
        if staging:
            self._check_stage_dir(result.tagged(tag))
            self._staging_checked = True
        found: dict[PurePosixPath, bytes | None] = dict.fromkeys(paths)
        collecting: int | None = None
        chunks: list[str] = []
        for line in result.out.splitlines():
            words = line.split()
            if words[:1] == [tag] and len(words) == 3 and words[2].isdigit():
                kind, index = words[1], int(words[2])
                if not 0 <= index < len(paths):
                    continue
                path = paths[index]
                if kind == "x":
                    raise BackendError(f"e2b read {path}: exists but is not a regular file", retryable=False)
                if kind == "u":
                    raise BackendError(f"e2b read {path}: the sandbox user cannot read it", retryable=False)
                if kind == "f":
                    collecting, chunks = index, []
                elif kind == "e" and collecting == index:
                    found[path] = self._decode(path, chunks)
                    collecting = None
            elif collecting is not None:
                chunks.append(line.strip())
        return found

    @staticmethod
    def _decode(path: PurePosixPath, chunks: list[str]) -> bytes:
        try:
            data = base64.b64decode("".join(chunks), validate=True)
        except (binascii.Error, ValueError):
            raise BackendError(f"e2b read {path}: unreadable answer from the sandbox", retryable=True) from None
        if len(data) > MAX_MERGE_BYTES:
            raise BackendError(f"e2b read {path}: larger than {MAX_MERGE_BYTES} bytes, not merged", retryable=False)
        return data

    @staticmethod
    def _check_stage_dir(tagged: list[list[str]]) -> None:
        facts = next((words[1:] for words in tagged if words[:1] == ["t"]), None)
        try:
            ok = facts is not None and facts[0] == "0" and int(facts[1], 8) & 0o1000 and facts[2] == "directory"
        except (IndexError, ValueError):
            ok = False
        if not ok:
            raise BackendError(
                f"e2b: {STAGE_DIR} in the sandbox must be a root-owned sticky directory to stage files "
                f"(found {' '.join(facts or ['nothing'])!r})", retryable=False)

    # --- steps 3 and 4: write ------------------------------------------------------------------
    async def _put(self, dirs: Sequence[DirSpec],
                   files: Sequence[FileSpec]) -> set[PurePosixPath]:
        """Stage `files` (one upload) and move them into place with `dirs` ensured (one command);
        verified. Returns the targets actually replaced."""
        token = secrets.token_hex(16)
        staged = [staged_name(token, index) for index in range(len(files))]
        if files and not self._staging_checked:
            await self._read_all([])  # never upload before /tmp was seen root-owned and sticky
        if files:
            try:
                await self._stage([(name, data) for name, (_, data, _) in zip(staged, files, strict=True)],
                                  f"write {files[0][0]}")
            except SandboxError:
                await self._discard_staged(staged)  # a timed-out upload may still have landed
                raise
        tag = _new_tag()
        plan = [(target, name, mode) for name, (target, _, mode) in zip(staged, files, strict=True)]
        action = f"write {files[0][0]}" if files else f"make_dir {dirs[0][0]}"
        try:
            result = await self._exec(put_script(tag, dirs, plan), action)
        except SandboxError:
            if files:
                await self._discard_staged(staged)
            raise
        return self._verify(tag, result, dirs, files, action)

    def _verify(self, tag: str, result: _Output, dirs: Sequence[DirSpec],
                files: Sequence[FileSpec], action: str) -> set[PurePosixPath]:
        tagged = result.tagged(tag)
        if dirs and result.code in (3, 4, 5):
            index = max((int(w[1]) for w in tagged if w[:1] == ["d"] and w[1:2] and w[1].isdigit()), default=0)
            directory = dirs[min(index, len(dirs) - 1)][0]
            facts = next((" ".join(w[2:]) for w in tagged if w[:2] == ["do", str(index)]), "")
            if result.code == 3:
                raise BackendError(f"e2b {action}: refusing {directory}: it is a symbolic link", retryable=False)
            if result.code == 5 or _permission_denied(result.err):
                raise BackendError(
                    f"e2b {action}: permission denied: {directory} is not the sandbox user's to write "
                    f"({facts or result.brief_err()}): the template must give {self._user!r} its home and "
                    f"config dir (deploy/e2b/README.md)", retryable=False)
            raise BackendError(f"e2b {action}: cannot create {directory}: {result.brief_err()}",
                               retryable=not _retry_is_pointless(result.err))
        if result.code:
            raise self._failed(action, result)
        replaced = {files[int(w[1])][0] for w in tagged if w[:1] == ["n"] and w[1:2] and w[1].isdigit()
                    and int(w[1]) < len(files)}
        lines = result.out.splitlines()
        seen_dirs: dict[int, list[str]] = {}
        seen_files: dict[int, tuple[list[str], str]] = {}
        for position, line in enumerate(lines):
            words = line.split()
            if words[:1] != [tag] or len(words) < 3 or not words[2].isdigit():
                continue
            if words[1] == "vd":
                seen_dirs[int(words[2])] = words[3:]
            elif words[1] == "vf":
                after = lines[position + 1].split() if position + 1 < len(lines) else []
                seen_files[int(words[2])] = (words[3:], after[0].lstrip("\\") if after else "")
        problems: list[str] = []
        for index, (directory, mode) in enumerate(dirs):
            seen = seen_dirs.get(index)
            if seen is None or seen[:2] != [format(mode, "o"), self._user] or seen[2:] != ["directory"]:
                problems.append(f"{directory}: {' '.join(seen or ['missing'])} (want {mode:o} {self._user} directory)")
        for index, (target, data, mode) in enumerate(files):
            stat, digest = seen_files.get(index, ([], ""))
            want = [format(mode, "o"), self._user, str(len(data))]
            if stat[:3] != want or stat[3:4] != ["regular"] or digest != hashlib.sha256(data).hexdigest():
                problems.append(f"{target}: {' '.join(stat[:3]) or 'missing'} (want {' '.join(want)}, and its sha256)")
        if problems:
            final = _permission_denied(result.err)
            detail = "; ".join(problems)[:400]
            if result.err.strip():
                detail += f"; stderr: {result.brief_err()}"
            raise BackendError(f"e2b {action}: the sandbox does not hold what was written: {detail}", retryable=not final)
        return replaced

    @staticmethod
    def _failed(action: str, result: _Output) -> BackendError:
        denied = "permission denied: " if _permission_denied(result.err) else ""
        return BackendError(f"e2b {action}: {denied}exit {result.code}: {result.brief_err()}",
                            retryable=not _retry_is_pointless(result.err))

    # --- the SandboxBackend port ---------------------------------------------------------------
    async def update_files(
        self, paths: Sequence[PurePosixPath], build: Build
    ) -> tuple[list[FileSpec], list[PurePosixPath]]:
        """Read `paths` (one command), `build(what was read) -> (dirs, files)`, then write the
        files whose bytes changed and ensure the dirs (one upload + one command). Returns (the
        files built, the paths written) — like `LocalSandbox.update_files`."""
        absolute = {path: self._abs(path) for path in paths}
        contents = await self._read_all(list(dict.fromkeys(absolute.values())))
        found = {path: contents[absolute[path]] for path in paths}
        dirs, built = build(found)
        files = list(built)
        known = {absolute[path]: found[path] for path in paths}
        changed = [(self._abs(path), data, mode) for path, data, mode in files
                   if self._abs(path) not in known or known[self._abs(path)] != data]
        replaced = await self._put([(self._abs(path), mode) for path, mode in dirs], changed)
        return files, [path for path, _, _ in files if self._abs(path) in replaced]

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        target = self._abs(path)
        return (await self._read_all([target], staging=False))[target]

    async def write_file(self, path: PurePosixPath, data: bytes, mode: int) -> None:
        await self._put([], [(self._abs(path), data, mode)])

    async def make_dir(self, path: PurePosixPath, mode: int) -> None:
        await self._put([(self._abs(path), mode)], [])

    async def remove(self, path: PurePosixPath) -> None:
        """`rm -f --` the file and its temp name, as the user (a directory is refused), and sweep
        staged copies a crash left."""
        target = self._abs(path)
        if target == self._home or target == PurePosixPath("/"):
            raise BackendError(f"refusing to remove {target}", retryable=False)
        script = f"{_sweep_line(self._user)}\nrm -f -- {_q(target)} {_q(tmp_name(target))}"
        result = await self._exec(script, f"remove {target}")
        if result.code:
            raise self._failed(f"remove {target}", result)


def _new_tag() -> str:
    return "ccb" + secrets.token_hex(8)


def _retry_is_pointless(stderr: str) -> bool:
    lowered = stderr.lower()
    return _permission_denied(stderr) or "command not found" in lowered or "is a directory" in lowered


class E2BBackend:
    """`BackendProvider` for `backend: "e2b"`."""

    kind = "e2b"

    def __init__(self, config: E2BConfig) -> None:
        self.config = config

    @staticmethod
    def user_of(target: SandboxTarget) -> str:
        return target.user or DEFAULT_USER

    @classmethod
    def home_of(cls, target: SandboxTarget) -> PurePosixPath:
        user = cls.user_of(target)
        if target.home:
            return PurePosixPath(target.home)
        return PurePosixPath("/root") if user == "root" else PurePosixPath("/home") / user

    async def aclose(self) -> None:
        """Nothing to release: the SDK opens its connections per call."""

    async def discard(self, sandbox_id: str) -> None:
        """Kill a sandbox this service created from a template whose injection finally failed
        (nobody else knows its id). Best effort: errors are the caller's to log."""
        if self.config.api_key is None:
            return
        try:
            await AsyncSandbox.kill(sandbox_id, **self.config.api_params())
        except Exception as exc:  # noqa: BLE001 - every SDK failure is mapped to the service's own error
            raise map_e2b_error(exc, "kill", control_plane=True) from None
        log.info("sandbox.e2b_discarded", e2b_sandbox_id=sandbox_id)

    @asynccontextmanager
    async def open(self, target: SandboxTarget, *, must_exist: bool = False) -> AsyncIterator[E2BSandbox]:
        """Connect to the sandbox (or create it from `template`). `must_exist` changes nothing:
        connecting to a sandbox that is gone raises `SandboxNotFound` either way."""
        config = self.config
        if config.api_key is None or not config.api_key.get_secret_value():
            raise BackendUnavailable("the e2b backend needs E2B_API_KEY", retryable=False)
        home = self.home_of(target)
        if not home.is_absolute():
            raise BackendError(f"home {home} is not an absolute path", retryable=False)
        params = config.api_params()
        created = target.template is not None
        try:
            if created:
                sandbox = await AsyncSandbox.create(
                    template=target.template or config.template,
                    timeout=config.sandbox_timeout,
                    metadata={"ccbridge_sandbox_id": target.sandbox_id},
                    idempotency_key=idempotency_key(target.event_id),
                    **params,
                )
                log.info("sandbox.e2b_created", sandbox_id=target.sandbox_id, e2b_sandbox_id=sandbox.sandbox_id)
            else:
                sandbox = await AsyncSandbox.connect(target.sandbox_id, **params)
        except Exception as exc:  # noqa: BLE001 - every SDK failure is mapped to the service's own error
            raise map_e2b_error(exc, "create" if created else "connect", control_plane=True) from None
        yield E2BSandbox(
            sandbox, home=home, user=self.user_of(target), request_timeout=config.request_timeout, created=created
        )
