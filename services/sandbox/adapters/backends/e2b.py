"""e2b backend through the real `e2b` SDK (2.x, `AsyncSandbox`).

Opening: `AsyncSandbox.connect(sandbox_id)` for a sandbox the platform already created (a
paused one is resumed); `AsyncSandbox.create(template=…)` when sandbox.created names a
`template` (`""` → E2B_TEMPLATE), with an `Idempotency-Key` derived from the event id so a
redelivered event never creates a second sandbox. A sandbox the platform created is never
killed here; one this service created is killed (`discard`) only when its injection failed for
good, since nobody else knows its id.

File operations, all as the event's `user` (default `user`, home `/home/<user>`):
- directories: `files.make_dir` (Connect `filesystem.Filesystem/MakeDir`; an existing one is
  fine), then `chown <user>: <dir> && chmod 700 <dir>` as root via `commands.run` — a dir the
  template created as root becomes the user's;
- files: `files.write` to a temp name in the same directory (multipart `POST /files`), then
  `chmod 600 <tmp> && mv -f <tmp> <file> && stat -c '%a %U' <file>` via `commands.run`: the
  target never exists with other bits or half its content, and the mode/owner come back for
  checking; then the content is read back (`files.read`) and compared;
- remove: `rm -rf -- <path>` via `commands.run`.

SDK errors map onto the service's error tree (`map_e2b_error`): the sandbox does not exist or
is not running → `SandboxNotFound` (final); timeouts, rate limits, busy/unreachable, transport
errors → `BackendUnavailable` (retried); bad API key → `BackendUnavailable` (final); envd 5xx →
`BackendError` (retried); permission denied and other 4xx → `BackendError` (final).
"""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import AsyncIterator
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
    ServiceBusyException,
    TemplateException,
    TimeoutException,
)
from pydantic import SecretStr

from shared.logging import get_logger
from services.sandbox.adapters.backends.base import SandboxTarget
from services.sandbox.errors import BackendError, BackendUnavailable, SandboxError, SandboxNotFound

log = get_logger("ccbridge.sandbox.e2b")

DEFAULT_USER = "user"
ADMIN_USER = "root"
_TMP_SUFFIX = ".ccbridge-tmp"
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


def map_e2b_error(exc: BaseException, action: str) -> SandboxError:
    """One SDK (or transport) exception → the service's error, retryable or final."""
    if isinstance(exc, SandboxError):
        return exc
    what = f"e2b {action}: {_brief(exc)}"
    # order matters: several of these subclass each other
    if isinstance(exc, (SandboxNotFoundException, SandboxNotRunningException)):
        return SandboxNotFound(what)
    if isinstance(exc, NotFoundException) and not isinstance(exc, FileNotFoundException):
        return SandboxNotFound(what)
    if isinstance(exc, AuthenticationException):
        return BackendUnavailable(what, retryable=False)
    if isinstance(exc, (RateLimitException, ServiceBusyException, TimeoutException)):
        return BackendUnavailable(what, retryable=True)
    if isinstance(exc, (httpx.TimeoutException, httpx.TransportError, TimeoutError, ConnectionError, OSError)):
        return BackendUnavailable(what, retryable=True)
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
        return BackendError(what, retryable=True)  # 5xx, INTERNAL, UNKNOWN, ...
    return BackendError(what, retryable=True)


class E2BSandbox:
    """One open e2b sandbox as a `SandboxBackend`."""

    def __init__(
        self, sandbox: AsyncSandbox, *, home: PurePosixPath, user: str, request_timeout: float, created: bool
    ) -> None:
        self._sbx = sandbox
        self._home = home
        self._user = user
        self._timeout = request_timeout
        self._created = created

    @property
    def home(self) -> PurePosixPath:
        return self._home

    @property
    def backend_sandbox_id(self) -> str | None:
        """The sandboxID e2b gave a sandbox created here from a template."""
        return str(self._sbx.sandbox_id) if self._created else None

    def _abs(self, path: PurePosixPath) -> PurePosixPath:
        return path if path.is_absolute() else self._home / path

    @staticmethod
    def tmp_of(target: PurePosixPath) -> PurePosixPath:
        """One fixed temp name per file: a write that timed out after envd stored the temp file
        leaves nothing behind once a later attempt moves it (and `remove` takes it too)."""
        return target.parent / f".{target.name}{_TMP_SUFFIX}"

    async def run(self, command: str, *, as_root: bool = False) -> str:
        user = ADMIN_USER if as_root else self._user
        try:
            result = await self._sbx.commands.run(
                command, user=user, timeout=self._timeout, request_timeout=self._timeout
            )
        except Exception as exc:  # noqa: BLE001 - mapped to the service's tree
            raise map_e2b_error(exc, f"run {command.split()[0]}") from None
        return str(result.stdout or "")

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        target = str(self._abs(path))
        try:
            data = await self._sbx.files.read(target, format="bytes", user=self._user, request_timeout=self._timeout)
        except FileNotFoundException:
            return None
        except Exception as exc:  # noqa: BLE001 - mapped to the service's tree
            raise map_e2b_error(exc, f"read {target}") from None
        return bytes(data)

    async def write_file(self, path: PurePosixPath, data: bytes, mode: int) -> None:
        target = self._abs(path)
        tmp = self.tmp_of(target)
        try:
            await self._sbx.files.write(str(tmp), data, user=self._user, request_timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001
            raise map_e2b_error(exc, f"write {target}") from None
        q_tmp, q_target = shlex.quote(str(tmp)), shlex.quote(str(target))
        try:
            out = await self.run(f"chmod {mode:o} {q_tmp} && mv -f {q_tmp} {q_target} && stat -c '%a %U' {q_target}")
        except SandboxError:
            await self._discard(tmp)
            raise
        self._check_stat(target, out, mode)
        back = await self.read_file(target)
        if back != data:
            raise BackendError(f"e2b write {target}: read-back differs from what was written", retryable=True)

    def _check_stat(self, target: PurePosixPath, out: str, mode: int) -> None:
        parts = out.split()
        if len(parts) < 2:
            raise BackendError(f"e2b write {target}: cannot check the mode ({out.strip()[:80]!r})", retryable=True)
        try:
            actual = int(parts[0], 8)
        except ValueError:
            raise BackendError(f"e2b write {target}: unreadable mode {parts[0][:20]!r}", retryable=True) from None
        if actual != mode or parts[1] != self._user:
            raise BackendError(
                f"e2b write {target}: mode {oct(actual)} owner {parts[1]!r}, expected {oct(mode)} {self._user!r}",
                retryable=False,
            )

    async def _discard(self, tmp: PurePosixPath) -> None:
        try:
            await self.run(f"rm -f -- {shlex.quote(str(tmp))}")
        except SandboxError:
            log.warning("sandbox.e2b_tmp_left", path=str(tmp))

    async def make_dir(self, path: PurePosixPath, mode: int) -> None:
        target = self._abs(path)
        try:
            await self._sbx.files.make_dir(str(target), user=self._user, request_timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001
            raise map_e2b_error(exc, f"make_dir {target}") from None
        q = shlex.quote(str(target))
        await self.run(f"chown {shlex.quote(self._user)}: {q} && chmod {mode:o} {q}", as_root=True)

    async def remove(self, path: PurePosixPath) -> None:
        target = self._abs(path)
        if target == self._home or target == PurePosixPath("/"):
            raise BackendError(f"refusing to remove {target}", retryable=False)
        await self.run(f"rm -rf -- {shlex.quote(str(target))} {shlex.quote(str(self.tmp_of(target)))}")


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

    async def discard(self, sandbox_id: str) -> None:
        """Kill a sandbox this service created from a template whose injection finally failed
        (nobody else knows its id). Best effort: errors are the caller's to log."""
        if self.config.api_key is None:
            return
        try:
            await AsyncSandbox.kill(sandbox_id, **self.config.api_params())
        except Exception as exc:  # noqa: BLE001
            raise map_e2b_error(exc, "kill") from None
        log.info("sandbox.e2b_discarded", e2b_sandbox_id=sandbox_id)

    @asynccontextmanager
    async def open(self, event: SandboxTarget) -> AsyncIterator[E2BSandbox]:
        config = self.config
        if config.api_key is None or not config.api_key.get_secret_value():
            raise BackendUnavailable("the e2b backend needs E2B_API_KEY", retryable=False)
        home = self.home_of(event)
        if not home.is_absolute():
            raise BackendError(f"home {home} is not an absolute path", retryable=False)
        params = config.api_params()
        created = event.template is not None
        try:
            if created:
                sandbox = await AsyncSandbox.create(
                    template=event.template or config.template,
                    timeout=config.sandbox_timeout,
                    metadata={"ccbridge_sandbox_id": event.sandbox_id},
                    idempotency_key=idempotency_key(event.event_id),
                    **params,
                )
                log.info("sandbox.e2b_created", sandbox_id=event.sandbox_id, e2b_sandbox_id=sandbox.sandbox_id)
            else:
                sandbox = await AsyncSandbox.connect(event.sandbox_id, **params)
        except Exception as exc:  # noqa: BLE001
            raise map_e2b_error(exc, "create" if created else "connect") from None
        yield E2BSandbox(
            sandbox, home=home, user=self.user_of(event), request_timeout=config.request_timeout, created=created
        )
