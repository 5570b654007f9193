"""A loopback stand-in for e2b — control plane and envd — that the REAL `e2b` Python SDK (2.x)
talks to unmodified, so the sandbox service's e2b backend is tested end to end without the
cloud. Files live in a temp dir per sandbox (`<root>/<sandbox_id>/fs/<path>`).

    async with E2BStandin(tmp_path) as e2b:
        sbx = e2b.add_sandbox()                  # a sandbox "the platform created"
        # point the SDK at it (what the sandbox service's settings do):
        #   E2B_API_URL=e2b.api_url  E2B_SANDBOX_URL=e2b.sandbox_url  E2B_API_KEY=e2b.api_key
        e2b.fail("files.write", status=500, times=2)   # failure injection
        e2b.slow("process", seconds=3)
        e2b.outage(60)                                 # the API answers 429 / 502 for a minute
        e2b.deny("/home/user/.claude")                 # permission denied under a path
        e2b.kill(sbx.sandbox_id)                       # the proxy answers "not found" from now on

How the SDK finds the stand-in (read from e2b 2.63's `ConnectionConfig`): the control plane is
`api_url` (`E2B_API_URL`, else `https://api.<E2B_DOMAIN>`); envd is `sandbox_url`
(`E2B_SANDBOX_URL`) for every sandbox when set — otherwise `https://sandbox.<domain>` or
`https://49983-<id>.<domain>`. Every envd request carries `E2b-Sandbox-Id` (and
`X-Access-Token` = the `envdAccessToken` from create/connect), exactly what e2b's own proxy
routes on, so one plain-HTTP envd endpoint serves all sandboxes. `E2B_DEBUG` is NOT used: it
skips the control plane (no connect/create to test) and pins envd to localhost:49983. Plain
`http://` makes the SDK's transport speak HTTP/1.1, which uvicorn serves.

Wire protocol (as the SDK speaks it):
- control plane: `POST /v2/sandboxes` `{"templateID","timeout","metadata","envVars",…}` +
  `X-API-KEY` (+ `Idempotency-Key`) → 201 `{"templateID","sandboxID","clientID","envdVersion",
  "envdAccessToken"}`; `POST /v2/sandboxes/{id}/connect` (SDK 2.x; `/sandboxes/{id}/connect` is
  served too) → 200 same shape, 404 `{"code":404,"message":…}` for an unknown sandbox;
  `DELETE /sandboxes/{id}` (kill) → 204 / 404.
- envd HTTP: `GET /health` → 204; `GET /files?path=&username=` → raw bytes, 404 JSON when
  missing; `POST /files?path=&username=` multipart field `file` (or `application/octet-stream`)
  → 200 `[{"name","type":"file","path"}]`.
- envd Connect RPC, JSON codec (`Connect-Protocol-Version: 1`, user in `Authorization: Basic
  base64("<user>:")`): unary `POST /filesystem.Filesystem/{MakeDir,Remove,Stat}` (`application/
  json`; errors as HTTP status + `{"code":"already_exists"|…,"message"}`); server-streaming
  `POST /process.Process/Start` (`application/connect+json`, request and response framed as
  envelopes: 1 flag byte + 4-byte big-endian length + JSON; events `{"event":{"start":{"pid"}}}`,
  `{"event":{"data":{"stdout":<base64>}}}`, `{"event":{"end":{"exitCode","exited","status"}}}`,
  then the end-stream envelope (flag 0x02) `{}` or `{"error":{"code","message"}}`).
- `process.Process/Start` runs `/bin/bash -l -c <cmd>` as the request's user; the stand-in's
  `Shell` interprets the subset of bash it models (lists, `&&`/`||`, pipes, quotes, `exit`,
  `trap … EXIT`; coreutils-like `mkdir chmod chown mv rm cat head base64 cmp sha256sum stat test
  find`, see `Shell`) with the kernel's permission checks simulated; anything it does not model
  exits 2 (syntax) or 127 (command), never a guess.

Who acts as whom — modelled on envd's source (e2b-dev/infra `packages/envd`): envd runs as
root. Its file API (`GET|POST /files`, `MakeDir`, `Remove`) works AS ROOT: it follows symbolic
links, checks no permission of the request's user, and only chowns what it creates (and a file it
overwrites) to that user (`api/upload.go` processFile, `permissions.EnsureDirs`). Processes run
with the user's uid, so there the kernel's checks apply. The stand-in does the same: symbolic
links are real (relative) host links, so the host kernel follows them exactly as the sandbox's
would (`StandinSandbox.symlink()` plants one); ownership is recorded per canonical path
(`owners`); modes are real on the host files (directories keep u+rwx on the host so the test
can get in; groups are not modelled: a non-owner gets the "other" bits). `deny()` stops
everyone, root and envd included (like a read-only mount). Every request is recorded with its
sandbox id (`requests`, `count()`, `round_trips()`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import posixpath
import secrets
import shutil
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shared.health import EmbeddedServer

DEFAULT_API_KEY = "e2b_standin_0123456789abcdef"
ROOT = "root"
DEFAULT_ENVD_VERSION = "0.5.7"
CONNECT_JSON = "application/connect+json"
END_STREAM = 0x02

_CONNECT_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "resource_exhausted": 429,
    "internal": 500,
    "unknown": 500,
    "unavailable": 503,
    "deadline_exceeded": 504,
}


class EnvdError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Fault:
    """One injected failure. `op`: create | connect | kill | files.read | files.write | make_dir |
    remove | stat | process | health | * ; `times` None = until cleared (or `until`, a
    `time.monotonic()` deadline, has passed). `statuses`: answer these in turn instead of
    `status` (an outage that alternates 429 and 502)."""

    op: str
    kind: str  # "status" | "slow"
    status: int = 500
    seconds: float = 0.0
    times: int | None = 1
    sandbox_id: str | None = None
    message: str = "injected failure"
    until: float | None = None
    statuses: tuple[int, ...] = ()
    answered: int = 0

    def matches(self, op: str, sandbox_id: str | None) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.until is not None and time.monotonic() >= self.until:
            return False
        if self.op not in ("*", op):
            return False
        return self.sandbox_id is None or self.sandbox_id == sandbox_id


@dataclass
class StandinSandbox:
    """One sandbox: its files under `fs` on the host, ownership simulated in `owners`.

    Paths in `owners` are canonical sandbox paths (every symbolic link resolved). A symbolic
    link is a real host link whose target is RELATIVE (`symlink()` writes it so), so the host
    kernel follows it to the right place inside `fs` exactly as the sandbox's kernel would —
    `host(path)` then names what the sandbox's `open(path)` would open."""

    sandbox_id: str
    root: Path
    template: str
    envd_access_token: str
    users: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    alive: bool = True
    owners: dict[str, str] = field(default_factory=dict)
    """canonical sandbox path → "user:group" (simulated ownership; unlisted → its parent's)."""
    commands: list[tuple[str, str, int]] = field(default_factory=list)
    """(user, command, exit code) of every process started."""
    denied: list[str] = field(default_factory=list)
    """Path prefixes nobody may write under (permission denied)."""

    @property
    def fs(self) -> Path:
        return self.root / "fs"

    def home_of(self, user: str) -> str:
        return self.users.get(user, f"/home/{user}")

    def uid_of(self, user: str) -> int:
        if user == ROOT:
            return 0
        others = [name for name in self.users if name != ROOT]
        return 1000 + others.index(user) if user in others else 65534

    # --- paths ------------------------------------------------------------------------------
    def host(self, path: str) -> Path:
        """The host path of an absolute sandbox path, confined to the sandbox. Opening it on the
        host follows symbolic links the way the sandbox would."""
        if not path.startswith("/"):
            raise EnvdError("invalid_argument", f"path {path!r} is not absolute")
        norm = posixpath.normpath(path)
        host = self.fs / norm.lstrip("/")
        real_root = os.path.realpath(self.fs)
        if os.path.commonpath([os.path.realpath(host), real_root]) != real_root:
            raise EnvdError("permission_denied", f"{path}: outside the sandbox")
        return host

    def at(self, canonical: str) -> Path:
        """The host path of a canonical sandbox path (use with lstat/unlink: no link is followed)."""
        return self.fs / canonical.lstrip("/")

    def real(self, path: str) -> str:
        """`path` with every symbolic link followed (realpath(3)), as a sandbox path."""
        real = os.path.realpath(self.host(path))
        rel = os.path.relpath(real, os.path.realpath(self.fs))
        return "/" if rel == "." else "/" + rel.replace(os.sep, "/")

    def entry(self, path: str) -> str:
        """The directory entry `path` names (lstat(2)): its parent resolved, its last component not."""
        norm = posixpath.normpath(path)
        if norm == "/":
            return "/"
        return posixpath.join(self.real(posixpath.dirname(norm)), posixpath.basename(norm))

    def lexists(self, path: str) -> bool:
        return os.path.lexists(self.at(self.entry(path)))

    def is_link(self, path: str) -> bool:
        return os.path.islink(self.at(self.entry(path)))

    def symlink(self, path: str, target: str, *, owner: str = "user") -> None:
        """Plant a symbolic link `path` → `target` (an absolute sandbox path), owned by `owner`
        — what `ln -s target path` run by `owner` would leave behind."""
        entry = self.entry(path)
        norm_target = posixpath.normpath(target)
        if not norm_target.startswith("/"):
            raise ValueError("give the link target as an absolute sandbox path")
        relative = os.path.relpath(self.fs / norm_target.lstrip("/"), self.at(posixpath.dirname(entry)))
        os.symlink(relative, self.at(entry))
        self.owners[entry] = f"{owner}:{owner}"

    def link_target(self, path: str) -> str:
        """The absolute sandbox path a symbolic link points at (readlink(2), made absolute)."""
        entry = self.entry(path)
        return posixpath.normpath(posixpath.join(posixpath.dirname(entry), os.readlink(self.at(entry))))

    # --- ownership & permissions -------------------------------------------------------------
    def owner(self, path: str, *, follow: bool = True) -> str:
        """"user:group" of what `path` names (of the link itself with follow=False)."""
        norm = self.real(path) if follow else self.entry(path)
        while True:
            if norm in self.owners:
                return self.owners[norm]
            if norm == "/":
                return "root:root"
            norm = posixpath.dirname(norm)

    def owner_user(self, path: str, *, follow: bool = True) -> str:
        return self.owner(path, follow=follow).split(":", 1)[0]

    def forget(self, canonical: str) -> None:
        """Drop the ownership records of `canonical` and everything under it."""
        for key in [k for k in self.owners if k == canonical or k.startswith(canonical.rstrip("/") + "/")]:
            del self.owners[key]

    def _bits(self, user: str, canonical: str) -> int:
        """The rwx bits (as 4|2|1) that apply to `user` on the entry `canonical`. Groups are not
        modelled: the owner gets the owner bits, everyone else the 'other' bits."""
        mode = stat.S_IMODE(os.lstat(self.at(canonical)).st_mode)
        return (mode >> 6) & 7 if self.owner_user(canonical, follow=False) == user else mode & 7

    def traversable(self, user: str, path: str, *, follow: bool = True) -> bool:
        """Whether `user` may search every directory on the way to what `path` names (to the
        link itself with follow=False): x on each."""
        if user == ROOT:
            return True
        parent = posixpath.dirname(self.real(path) if follow else self.entry(path))
        while True:
            if os.path.isdir(self.at(parent)) and not self._bits(user, parent) & 1:
                return False
            if parent == "/":
                return True
            parent = posixpath.dirname(parent)

    def may(self, user: str, path: str, want: int) -> bool:
        """access(2): `want` of r=4 w=2 x=1 on what `path` names, as `user` (root: always r/w)."""
        if not self.traversable(user, path):
            return False
        if not self.host(path).exists():
            return False
        if user == ROOT:
            return not want & 1 or self.host(path).is_dir() or bool(self.mode(path) & 0o111)
        return self._bits(user, self.real(path)) & want == want

    def check_denied(self, path: str) -> None:
        for candidate in {posixpath.normpath(path), self.entry(path)}:
            for prefix in self.denied:
                if candidate == prefix or candidate.startswith(prefix.rstrip("/") + "/"):
                    raise EnvdError("permission_denied", f"{path}: Permission denied")

    def check_entry(self, user: str, path: str) -> None:
        """Raise permission_denied unless `user` may create, replace, rename or remove the entry
        `path`: write+search on its directory, and the sticky-bit rule (in a sticky directory
        only the entry's owner or the directory's owner may remove or rename it)."""
        self.check_denied(path)
        if user == ROOT:
            return
        entry = self.entry(path)
        parent = posixpath.dirname(entry)
        if not os.path.isdir(self.at(parent)):
            raise EnvdError("not_found", f"{path}: No such file or directory")
        if not self.traversable(user, parent) or self._bits(user, parent) & 3 != 3:
            raise EnvdError("permission_denied", f"{path}: Permission denied")
        sticky = os.lstat(self.at(parent)).st_mode & stat.S_ISVTX
        if sticky and os.path.lexists(self.at(entry)) and user not in (
            self.owner_user(entry, follow=False), self.owner_user(parent, follow=False)
        ):
            raise EnvdError("permission_denied", f"{path}: Operation not permitted")

    # --- for tests ----------------------------------------------------------------------------
    def read(self, path: str) -> bytes:
        """The bytes of a file in this sandbox (for tests)."""
        return self.host(path).read_bytes()

    def mode(self, path: str) -> int:
        return stat.S_IMODE(self.host(path).stat().st_mode)

    def put(self, path: str, data: bytes | str = b"", *, owner: str = ROOT, mode: int = 0o644) -> None:
        """Create a file as `owner` would have (for tests: what a template or an attacker left)."""
        host = self.host(path)
        host.write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(host, mode)
        self.owners[self.real(path)] = f"{owner}:{owner}"

    def make(self, path: str, *, owner: str = ROOT, mode: int = 0o755) -> None:
        """Create a directory as `owner` would have (for tests)."""
        host = self.host(path)
        host.mkdir(parents=True, exist_ok=True)
        os.chmod(host, mode | 0o700)  # the host user (the test) must still get in
        self.owners[self.real(path)] = f"{owner}:{owner}"


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock



def envelope(payload: dict[str, Any] | bytes, flags: int = 0) -> bytes:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(data)) + data


def read_envelopes(body: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset + 5 <= len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        out.append((flags, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return out


class E2BStandin:
    """`async with E2BStandin(root) as s:` — control plane on `s.api_url`, envd on `s.sandbox_url`."""

    def __init__(
        self,
        root: Path,
        *,
        api_key: str = DEFAULT_API_KEY,
        envd_version: str = DEFAULT_ENVD_VERSION,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = Path(root)
        self.api_key = api_key
        self.envd_version = envd_version
        self.host = host
        self.sandboxes: dict[str, StandinSandbox] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, sandbox id) of every request, control plane and envd."""
        self.idempotency: dict[str, str] = {}
        self._deny_all: list[str] = []
        self._pids = itertools.count(100)
        self._servers: list[EmbeddedServer] = []
        self.api_port = 0
        self.envd_port = 0

    # --- URLs -------------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://{self.host}:{self.envd_port}"

    def sdk_options(self) -> dict[str, Any]:
        """Keyword arguments for `AsyncSandbox.connect/create` pointing at this stand-in."""
        return {"api_key": self.api_key, "api_url": self.api_url, "sandbox_url": self.sandbox_url}

    def env(self) -> dict[str, str]:
        """The environment variables (the sandbox service's settings) pointing at this stand-in."""
        return {"E2B_API_KEY": self.api_key, "E2B_API_URL": self.api_url, "E2B_SANDBOX_URL": self.sandbox_url}

    # --- sandboxes & failure injection -------------------------------------------------------
    def add_sandbox(
        self,
        sandbox_id: str | None = None,
        *,
        template: str = "base",
        users: tuple[str, ...] = ("user",),
        metadata: dict[str, str] | None = None,
        env_vars: dict[str, str] | None = None,
    ) -> StandinSandbox:
        sandbox_id = sandbox_id or "i" + secrets.token_hex(10)
        root = self.root / sandbox_id
        homes = {"root": "/root", **{u: ("/root" if u == "root" else f"/home/{u}") for u in users}}
        sbx = StandinSandbox(
            sandbox_id=sandbox_id,
            root=root,
            template=template,
            envd_access_token=secrets.token_urlsafe(24),
            users=homes,
            metadata=dict(metadata or {}),
            env_vars=dict(env_vars or {}),
            denied=list(self._deny_all),
        )
        for path, owner, mode in [("/", ROOT, 0o755), ("/home", ROOT, 0o755), ("/root", ROOT, 0o700),
                                  ("/tmp", ROOT, 0o1777), ("/etc", ROOT, 0o755)]:
            sbx.make(path, owner=owner, mode=mode)
        for user, home in homes.items():
            sbx.make(home, owner=user, mode=0o700 if user == ROOT else 0o750)
        passwd = "".join(f"{u}:x:{sbx.uid_of(u)}:{sbx.uid_of(u)}::{h}:/bin/bash\n" for u, h in homes.items())
        sbx.put("/etc/passwd", passwd, owner=ROOT, mode=0o644)
        self.sandboxes[sandbox_id] = sbx
        return sbx

    def kill(self, sandbox_id: str) -> None:
        self.sandboxes[sandbox_id].alive = False

    def fail(self, op: str, *, status: int = 500, times: int | None = 1, sandbox_id: str | None = None,
             message: str = "injected failure") -> Fault:
        fault = Fault(op=op, kind="status", status=status, times=times, sandbox_id=sandbox_id, message=message)
        self.faults.append(fault)
        return fault

    def slow(self, op: str, seconds: float, *, times: int | None = 1, sandbox_id: str | None = None) -> Fault:
        fault = Fault(op=op, kind="slow", seconds=seconds, times=times, sandbox_id=sandbox_id)
        self.faults.append(fault)
        return fault

    def outage(self, seconds: float, *, statuses: tuple[int, ...] = (429, 502),
               ops: tuple[str, ...] = ("create", "connect", "kill")) -> list[Fault]:
        """e2b's API is down for `seconds` from now: every `ops` call is answered with `statuses`
        in turn (default: rate limited, bad gateway), then everything works again by itself.
        envd (the sandboxes themselves) keeps answering. `clear_faults()` ends it early."""
        until = time.monotonic() + seconds
        faults = [Fault(op=op, kind="status", status=statuses[0], times=None, until=until, statuses=statuses,
                        message="injected outage") for op in ops]
        self.faults.extend(faults)
        return faults

    def deny(self, path_prefix: str, sandbox_id: str | None = None) -> None:
        """Permission denied for every write under `path_prefix` (in one or all sandboxes)."""
        prefix = posixpath.normpath(path_prefix)
        targets = [self.sandboxes[sandbox_id]] if sandbox_id else list(self.sandboxes.values())
        for sbx in targets:
            sbx.denied.append(prefix)
        if sandbox_id is None:
            self._deny_all.append(prefix)

    def clear_faults(self) -> None:
        self.faults.clear()

    def count(self, method: str, path: str, sandbox_id: str | None = None) -> int:
        return sum(1 for m, p, s in self.requests if m == method and p == path and (sandbox_id in (None, s)))

    def round_trips(self, sandbox_id: str) -> int:
        """Requests received for one sandbox so far, control plane (create, connect, kill) and
        envd together: each is one network round trip for the SDK."""
        return sum(1 for _, _, s in self.requests if s == sandbox_id)

    async def _apply_faults(self, op: str, sandbox_id: str | None, request: Request | None = None) -> Fault | None:
        """Sleep for matching `slow` faults; return a matching `status` fault to answer with.
        A client that gave up while we slept gets nothing done (as if the request never
        reached envd's handler)."""
        for fault in list(self.faults):
            if not fault.matches(op, sandbox_id):
                continue
            if fault.times is not None:
                fault.times -= 1
            if fault.kind == "slow":
                await asyncio.sleep(fault.seconds)
                if request is not None and await request.is_disconnected():
                    raise ClientDisconnect()
                continue
            fault.answered += 1
            if fault.statuses:
                return replace(fault, status=fault.statuses[(fault.answered - 1) % len(fault.statuses)])
            return fault
        return None

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> E2BStandin:
        self.root.mkdir(parents=True, exist_ok=True)
        for app, attr in ((self._control_app(), "api_port"), (self._envd_app(), "envd_port")):
            sock = _bind(self.host, 0)
            setattr(self, attr, sock.getsockname()[1])
            config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                    timeout_graceful_shutdown=1)
            server = EmbeddedServer(config)
            self._servers.append(server)
            await server.launch(sock, f"e2b-standin-{attr}")
        return self

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        await asyncio.gather(*(server.finish() for server in servers), return_exceptions=True)

    async def __aenter__(self) -> E2BStandin:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- control plane ----------------------------------------------------------------------
    def _sandbox_json(self, sbx: StandinSandbox) -> dict[str, Any]:
        return {
            "templateID": sbx.template,
            "sandboxID": sbx.sandbox_id,
            "clientID": "standin",
            "envdVersion": self.envd_version,
            "envdAccessToken": sbx.envd_access_token,
        }

    def _control_app(self) -> Starlette:
        def error(status: int, message: str) -> JSONResponse:
            return JSONResponse({"code": status, "message": message}, status_code=status)

        def authorised(request: Request) -> bool:
            return request.headers.get("x-api-key") == self.api_key

        async def create(request: Request) -> Response:
            self.requests.append(("POST", "/v2/sandboxes", None))
            index = len(self.requests) - 1
            if not authorised(request):
                return error(401, "Invalid API key")
            if fault := await self._apply_faults("create", None):
                return error(fault.status, fault.message)
            try:
                body = json.loads(await request.body())
            except ValueError:
                return error(400, "body is not JSON")
            template = body.get("templateID") if isinstance(body, dict) else None
            if not isinstance(template, str) or not template:
                return error(400, "templateID is required")
            key = request.headers.get("idempotency-key")
            if key and key in self.idempotency:
                self.requests[index] = ("POST", "/v2/sandboxes", self.idempotency[key])
                return JSONResponse(self._sandbox_json(self.sandboxes[self.idempotency[key]]), status_code=201)
            sbx = self.add_sandbox(
                template=template,
                metadata={str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
                env_vars={str(k): str(v) for k, v in (body.get("envVars") or {}).items()},
            )
            if key:
                self.idempotency[key] = sbx.sandbox_id
            self.requests[index] = ("POST", "/v2/sandboxes", sbx.sandbox_id)
            return JSONResponse(self._sandbox_json(sbx), status_code=201)

        async def connect(request: Request) -> Response:
            sandbox_id = request.path_params["sandbox_id"]
            self.requests.append(("POST", "/v2/sandboxes/{id}/connect", sandbox_id))
            if not authorised(request):
                return error(401, "Invalid API key")
            if fault := await self._apply_faults("connect", sandbox_id):
                return error(fault.status, fault.message)
            sbx = self.sandboxes.get(sandbox_id)
            if sbx is None or not sbx.alive:
                return error(404, f"sandbox {sandbox_id} not found")
            return JSONResponse(self._sandbox_json(sbx), status_code=200)

        async def kill(request: Request) -> Response:
            sandbox_id = request.path_params["sandbox_id"]
            self.requests.append(("DELETE", "/sandboxes/{id}", sandbox_id))
            if not authorised(request):
                return error(401, "Invalid API key")
            if fault := await self._apply_faults("kill", sandbox_id):
                return error(fault.status, fault.message)
            sbx = self.sandboxes.get(sandbox_id)
            if sbx is None or not sbx.alive:
                return error(404, f"sandbox {sandbox_id} not found")
            sbx.alive = False
            return Response(status_code=204)

        return Starlette(
            routes=[
                Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
                Route("/v2/sandboxes", create, methods=["POST"]),
                Route("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
                Route("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
            ]
        )

    # --- envd ---------------------------------------------------------------------------------
    def _sandbox_of(self, request: Request) -> StandinSandbox:
        sandbox_id = request.headers.get("e2b-sandbox-id")
        sbx = self.sandboxes.get(sandbox_id or "")
        if sbx is None or not sbx.alive:
            raise _ProxyError(502, f"The sandbox {sandbox_id} was not found")
        if request.headers.get("x-access-token") != sbx.envd_access_token:
            raise _ProxyError(401, "invalid access token")
        return sbx

    @staticmethod
    def _user_of(request: Request, sbx: StandinSandbox) -> str:
        user = request.query_params.get("username")
        header = request.headers.get("authorization", "")
        if not user and header.lower().startswith("basic "):
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                user = base64.b64decode(header[6:]).decode().split(":", 1)[0]
        user = user or "user"
        if user not in sbx.users:
            raise EnvdError("unauthenticated", f"user {user!r} does not exist")
        return user

    # envd's own file API runs as root (envd is root: e2b-dev/infra packages/envd,
    # api/upload.go processFile, permissions.EnsureDirs, services/filesystem/dir.go MakeDir):
    # it follows symbolic links, checks no permission of the request's user, and chowns what it
    # creates (and a file it overwrites) to that user. Only `deny()` stops it.
    def _ensure_dirs(self, sbx: StandinSandbox, user: str, directory: str) -> bool:
        """permissions.EnsureDirs: create the missing directories of `directory` (0755, chowned
        to `user`), following links. Returns False when it already existed."""
        norm = posixpath.normpath(directory)
        parts = [p for p in norm.split("/") if p]
        made = False
        for depth in range(len(parts) + 1):
            sub = "/" + "/".join(parts[:depth])
            host = sbx.host(sub)
            if host.exists():
                if not host.is_dir():
                    raise EnvdError("invalid_argument", f"path is a file: {sub}")
                continue
            sbx.check_denied(sub)
            host.mkdir()
            os.chmod(host, 0o755)
            sbx.owners[sbx.real(sub)] = f"{user}:{user}"
            made = True
        return made

    def _write(self, sbx: StandinSandbox, user: str, path: str, data: bytes) -> None:
        """processFile: as root — through any link — chown an existing file to `user`, then
        create/truncate and write it (a new file is 0644: envd's umask)."""
        sbx.check_denied(path)
        self._ensure_dirs(sbx, user, posixpath.dirname(posixpath.normpath(path)))
        host = sbx.host(path)
        if host.is_dir():
            raise EnvdError("invalid_argument", f"path is a directory: {path}")
        existed = host.exists()
        host.write_bytes(data)
        if not existed:
            os.chmod(host, 0o644)
        sbx.owners[sbx.real(path)] = f"{user}:{user}"

    def _envd_app(self) -> Starlette:
        async def guarded(request: Request, op: str, handler: Any) -> Response:
            sandbox_id = request.headers.get("e2b-sandbox-id")
            self.requests.append((request.method, request.url.path, sandbox_id))
            try:
                await request.body()  # read (and cache) it before any injected delay
                sbx = self._sandbox_of(request)
                if fault := await self._apply_faults(op, sbx.sandbox_id, request):
                    raise _ProxyError(fault.status, fault.message)
                return await handler(request, sbx)
            except ClientDisconnect:
                return Response(status_code=499)
            except _ProxyError as exc:
                if request.url.path.startswith(("/filesystem.", "/process.")) and exc.status != 502:
                    code = {401: "unauthenticated", 403: "permission_denied", 404: "not_found"}.get(
                        exc.status, "internal" if exc.status >= 500 else "invalid_argument"
                    )
                    return JSONResponse({"code": code, "message": exc.message}, status_code=exc.status)
                return JSONResponse({"code": exc.status, "message": exc.message}, status_code=exc.status)

        async def health(request: Request) -> Response:
            async def ok(_: Request, __: StandinSandbox) -> Response:
                return Response(status_code=204)

            return await guarded(request, "health", ok)

        async def files(request: Request) -> Response:
            op = "files.read" if request.method == "GET" else "files.write"
            return await guarded(request, op, read_file if request.method == "GET" else write_files)

        async def read_file(request: Request, sbx: StandinSandbox) -> Response:
            try:
                user = self._user_of(request, sbx)
                path = request.query_params.get("path", "")
                if not path.startswith("/"):
                    path = posixpath.join(sbx.home_of(user), path)
                host = sbx.host(path)
            except EnvdError as exc:
                return _http_error(exc)
            if not host.exists():
                return JSONResponse({"code": 404, "message": f"path '{path}' does not exist"}, status_code=404)
            if host.is_dir():
                return JSONResponse({"code": 400, "message": f"path '{path}' is a directory"}, status_code=400)
            return Response(host.read_bytes(), media_type="application/octet-stream")

        async def write_files(request: Request, sbx: StandinSandbox) -> Response:
            body = await request.body()
            content_type = request.headers.get("content-type", "")
            try:
                user = self._user_of(request, sbx)
                uploads: list[tuple[str, bytes]] = []
                query_path = request.query_params.get("path")
                if content_type.startswith("multipart/form-data"):
                    message = BytesParser(policy=HTTP).parsebytes(
                        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
                    )
                    for part in message.iter_parts():
                        if part.get_param("name", header="content-disposition") != "file":
                            continue
                        name = unquote(part.get_filename() or "")
                        payload = part.get_payload(decode=True)
                        uploads.append((query_path or name, payload if isinstance(payload, bytes) else b""))
                elif content_type.startswith("application/octet-stream") and query_path:
                    uploads.append((query_path, body))
                if not uploads:
                    raise EnvdError("invalid_argument", "no file in the request")
                entries = []
                for path, data in uploads:
                    if not path.startswith("/"):
                        path = posixpath.join(sbx.home_of(user), path)
                    self._write(sbx, user, path, data)
                    entries.append({"name": posixpath.basename(path), "type": "file", "path": path})
            except EnvdError as exc:
                return _http_error(exc)
            return JSONResponse(entries)

        async def make_dir(request: Request) -> Response:
            async def handle(req: Request, sbx: StandinSandbox) -> Response:
                try:
                    user = self._user_of(req, sbx)
                    path = _unary_path(await req.body())
                    host = sbx.host(path)
                    if host.exists():
                        if host.is_dir():
                            raise EnvdError("already_exists", f"directory already exists: {path}")
                        raise EnvdError("invalid_argument", f"path already exists but it is not a directory: {path}")
                    self._ensure_dirs(sbx, user, path)
                except EnvdError as exc:
                    return _connect_error(exc)
                return JSONResponse({"entry": _entry(sbx, path)})

            return await guarded(request, "make_dir", handle)

        async def remove(request: Request) -> Response:
            async def handle(req: Request, sbx: StandinSandbox) -> Response:
                try:  # os.RemoveAll as root: a final link is removed, not followed
                    self._user_of(req, sbx)
                    path = _unary_path(await req.body())
                    sbx.check_denied(path)
                    entry = sbx.entry(path)
                    host = sbx.at(entry)
                    if not os.path.lexists(host):  # noqa: ASYNC240 - a stand-in: one local stat per request
                        raise EnvdError("not_found", f"path {path} not found")
                    if host.is_dir() and not host.is_symlink():
                        shutil.rmtree(host)
                    else:
                        host.unlink()
                    sbx.forget(entry)
                except EnvdError as exc:
                    return _connect_error(exc)
                return JSONResponse({})

            return await guarded(request, "remove", handle)

        async def stat_(request: Request) -> Response:
            async def handle(req: Request, sbx: StandinSandbox) -> Response:
                try:
                    self._user_of(req, sbx)
                    path = _unary_path(await req.body())
                    if not sbx.host(path).exists():
                        raise EnvdError("not_found", f"path {path} not found")
                except EnvdError as exc:
                    return _connect_error(exc)
                return JSONResponse({"entry": _entry(sbx, path)})

            return await guarded(request, "stat", handle)

        async def start(request: Request) -> Response:
            sandbox_id = request.headers.get("e2b-sandbox-id")
            self.requests.append(("POST", "/process.Process/Start", sandbox_id))
            try:
                body = await request.body()
                sbx = self._sandbox_of(request)
            except ClientDisconnect:
                return Response(status_code=499)
            except _ProxyError as exc:
                return JSONResponse({"code": exc.status, "message": exc.message}, status_code=exc.status)
            frames = read_envelopes(body)
            try:
                fault = await self._apply_faults("process", sbx.sandbox_id, request)
            except ClientDisconnect:
                return Response(status_code=499)

            async def stream() -> AsyncIterator[bytes]:
                if fault is not None:
                    error_code = "internal" if fault.status >= 500 else "permission_denied"
                    yield envelope({"error": {"code": error_code, "message": fault.message}}, END_STREAM)
                    return
                try:
                    user = self._user_of(request, sbx)
                    if not frames:
                        raise EnvdError("invalid_argument", "no StartRequest")
                    start_request = json.loads(frames[0][1])
                    process = start_request.get("process") or {}
                    args = process.get("args") or []
                    command = args[-1] if process.get("cmd") == "/bin/bash" and args else " ".join(
                        [process.get("cmd", ""), *args]
                    )
                    cwd = process.get("cwd") or sbx.home_of(user)
                except (EnvdError, ValueError, AttributeError) as exc:
                    message = exc.message if isinstance(exc, EnvdError) else "bad StartRequest"
                    yield envelope({"error": {"code": "invalid_argument", "message": message}}, END_STREAM)
                    return
                yield envelope({"event": {"start": {"pid": next(self._pids)}}})
                code, out, err = Shell(self, sbx, user, cwd).run(command)
                sbx.commands.append((user, command, code))
                if out:
                    yield envelope({"event": {"data": {"stdout": base64.b64encode(out).decode()}}})
                if err:
                    yield envelope({"event": {"data": {"stderr": base64.b64encode(err).decode()}}})
                end: dict[str, Any] = {"exited": True, "status": f"exit status {code}"}
                if code:
                    end["exitCode"] = code
                    end["error"] = f"exit status {code}"
                yield envelope({"event": {"end": end}})
                yield envelope({}, END_STREAM)

            return StreamingResponse(stream(), media_type=CONNECT_JSON)

        return Starlette(
            routes=[
                Route("/health", health, methods=["GET"]),
                Route("/files", files, methods=["GET", "POST"]),
                Route("/filesystem.Filesystem/MakeDir", make_dir, methods=["POST"]),
                Route("/filesystem.Filesystem/Remove", remove, methods=["POST"]),
                Route("/filesystem.Filesystem/Stat", stat_, methods=["POST"]),
                Route("/process.Process/Start", start, methods=["POST"]),
            ]
        )


class _ProxyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _unary_path(body: bytes) -> str:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise EnvdError("invalid_argument", "request is not JSON") from None
    path = data.get("path") if isinstance(data, dict) else None
    if not isinstance(path, str) or not path.startswith("/"):
        raise EnvdError("invalid_argument", "path must be absolute")
    return path


def _entry(sbx: StandinSandbox, path: str) -> dict[str, Any]:
    host = sbx.host(path)
    kind = "FILE_TYPE_DIRECTORY" if host.is_dir() else "FILE_TYPE_FILE"
    return {"name": posixpath.basename(path) or "/", "type": kind, "path": path}


def _http_error(exc: EnvdError) -> JSONResponse:
    status = _CONNECT_STATUS.get(exc.code, 500)
    return JSONResponse({"code": status, "message": exc.message}, status_code=status)


def _connect_error(exc: EnvdError) -> JSONResponse:
    return JSONResponse({"code": exc.code, "message": exc.message}, status_code=_CONNECT_STATUS.get(exc.code, 500))


class _Unsupported(Exception):
    """Syntax the stand-in does not model: the command exits 2 instead of guessing."""


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


_OPERATORS = ("&&", "||", ";;", ">>", "<<", "|", ";", "&", "<", ">", "(", ")")
_SUPPORTED_OPERATORS = {"&&", "||", "|", ";", "\n"}
_UNQUOTED_SPECIAL = set("$`*?[]{}~")


def _tokenize(command: str) -> list[tuple[str, str]]:
    """bash's word splitting and quoting for the subset modelled: ("word", text) and ("op", op).
    Anything that would expand (`$`, backquotes, globs, braces, `~`) or redirect is refused."""
    tokens: list[tuple[str, str]] = []
    word: list[str] | None = None
    i, n = 0, len(command)

    def end() -> None:
        nonlocal word
        if word is not None:
            tokens.append(("word", "".join(word)))
            word = None

    while i < n:
        c = command[i]
        if c in " \t":
            end()
            i += 1
        elif c == "\n":
            end()
            tokens.append(("op", "\n"))
            i += 1
        elif c == "#" and word is None:
            while i < n and command[i] != "\n":
                i += 1
        elif c in "&|;<>()":
            end()
            op = next(o for o in _OPERATORS if command.startswith(o, i))
            if op not in _SUPPORTED_OPERATORS:
                raise _Unsupported(op)
            tokens.append(("op", op))
            i += len(op)
        elif c == "'":
            close = command.find("'", i + 1)
            if close < 0:
                raise ValueError("unexpected EOF while looking for matching `''")
            word = (word or []) + [command[i + 1 : close]]
            i = close + 1
        elif c == '"':
            chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unexpected EOF while looking for matching `\"'")
                ch = command[i]
                if ch == '"':
                    break
                if ch in "$`":
                    raise _Unsupported(ch)
                if ch == "\\" and i + 1 < n and command[i + 1] in '"\\\n':
                    if command[i + 1] != "\n":
                        chars.append(command[i + 1])
                    i += 2
                    continue
                chars.append(ch)
                i += 1
            word = (word or []) + chars
            i += 1
        elif c == "\\":
            if i + 1 < n and command[i + 1] != "\n":
                word = (word or []) + [command[i + 1]]
            i += 2
        elif c in _UNQUOTED_SPECIAL:
            raise _Unsupported(c)
        else:
            word = (word or []) + [c]
            i += 1
    end()
    return tokens


Pipeline = tuple[bool, list[list[str]]]
AndOr = list[tuple[str, Pipeline]]


def _parse(command: str) -> list[AndOr]:
    """program := and_or ((';' | newline) and_or)* ; and_or := pipeline (('&&'|'||') pipeline)* ;
    pipeline := ['!'] simple ('|' simple)*"""
    program: list[AndOr] = []
    current: AndOr = []
    pipeline: list[list[str]] = []
    simple: list[str] = []
    negate = False
    pending = ""  # the operator joining the next pipeline to `current`

    def close_simple(op: str) -> None:
        if not simple:
            raise ValueError(f"syntax error near unexpected token `{op.strip() or 'newline'}'")
        pipeline.append(list(simple))
        simple.clear()

    for kind, text in _tokenize(command):
        if kind == "word":
            if text == "!" and not simple and not pipeline:
                negate = not negate
                continue
            simple.append(text)
            continue
        if text == "|":
            close_simple(text)
            continue
        if text in ("&&", "||"):
            close_simple(text)
            current.append((pending, (negate, list(pipeline))))
            pipeline.clear()
            negate, pending = False, text
            continue
        # ';' or newline: end of an and-or list (an empty one is fine after a newline)
        if not simple and not pipeline:
            if pending or (text == ";" and not current):
                raise ValueError(f"syntax error near unexpected token `{text.strip() or 'newline'}'")
            continue
        close_simple(text)
        current.append((pending, (negate, list(pipeline))))
        program.append(current)
        current, pipeline, negate, pending = [], [], False, ""
    if simple or pipeline:
        close_simple("")
        current.append((pending, (negate, list(pipeline))))
    elif pending:
        raise ValueError("syntax error: unexpected end of file")
    if current:
        program.append(current)
    return program


Result = tuple[int, bytes, bytes]


class Shell:
    """The small shell behind process.Process/Start: `bash -c` for the subset it models, run as
    `user` against the sandbox's files with the kernel's permission checks simulated.

    Syntax: commands separated by `;` or newlines, `&&`/`||` lists, `|` pipelines, `!`, quotes,
    backslashes, comments. Refused (exit 2): expansions (`$`, backquotes, globs, braces, `~`),
    redirections, subshells, background jobs. Commands: true false echo exit umask trap id test
    mkdir chmod chown mv rm cat head base64 cmp sha256sum stat find; anything else exits 127.

    Permissions as Linux applies them to a process of `user` (root bypasses all but `deny()`):
    search (x) on every directory on the way, r to read, w+x on a directory to create, rename or
    remove an entry in it, the sticky-bit rule, chmod/chown only by the owner (chown to another
    user only by root). Symbolic links are followed except by `rm`, `mv`, `stat` (without -L),
    `test -L|-h`, `chown -h` and `find`."""

    def __init__(self, standin: E2BStandin, sbx: StandinSandbox, user: str, cwd: str) -> None:
        self.standin = standin
        self.sbx = sbx
        self.user = user
        self.cwd = cwd
        self.umask = 0o022
        self.exit_trap: str | None = None

    def path(self, arg: str) -> str:
        return posixpath.normpath(arg if arg.startswith("/") else posixpath.join(self.cwd, arg))

    # --- the interpreter ----------------------------------------------------------------------
    def run(self, command: str) -> Result:
        try:
            program = _parse(command)
        except _Unsupported as exc:
            return 2, b"", f"standin: unsupported shell syntax {str(exc)!r}\n".encode()
        except ValueError as exc:
            return 2, b"", f"bash: {exc}\n".encode()
        out, err = bytearray(), bytearray()
        code = 0
        try:
            for and_or in program:
                code = self._and_or(and_or, out, err)
        except _Exit as exc:
            code = exc.code
        if self.exit_trap is not None:
            trap, self.exit_trap = self.exit_trap, None
            trap_code, trap_out, trap_err = self.run(trap)
            out += trap_out
            err += trap_err
            if trap.strip().startswith("exit"):
                code = trap_code
        return code, bytes(out), bytes(err)

    def _and_or(self, and_or: AndOr, out: bytearray, err: bytearray) -> int:
        code = 0
        for op, pipeline in and_or:
            if (op == "&&" and code != 0) or (op == "||" and code == 0):
                continue
            code = self._pipeline(pipeline, out, err)
        return code

    def _pipeline(self, pipeline: Pipeline, out: bytearray, err: bytearray) -> int:
        negate, commands = pipeline
        data = b""
        code = 0
        for index, argv in enumerate(commands):
            code, stdout, stderr = self.one(argv, data)
            err += stderr
            if index == len(commands) - 1:
                out += stdout
            data = stdout
        return (0 if code else 1) if negate else code

    def one(self, argv: list[str], stdin: bytes = b"") -> Result:
        name, args = argv[0], argv[1:]
        handler = getattr(self, f"cmd_{name}", None) if name.isidentifier() else None
        if handler is None:
            return 127, b"", f"bash: {name}: command not found\n".encode()
        try:
            return handler(args, stdin)
        except _Exit:
            raise
        except EnvdError as exc:
            message = exc.message if exc.message.startswith(f"{name}:") else f"{name}: {exc.message}"
            return 1, b"", f"{message}\n".encode()
        except (OSError, ValueError, IndexError) as exc:
            return 1, b"", f"{name}: {exc}\n".encode()

    @staticmethod
    def _flags(args: list[str], allowed: str, with_value: str = "") -> tuple[dict[str, str], list[str]]:
        """getopt: `-abc`, `-m VALUE` / `-mVALUE` for options in `with_value`, `--`."""
        flags: dict[str, str] = {}
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest.extend(args[i + 1 :])
                break
            if arg.startswith("-") and len(arg) > 1:
                j = 1
                while j < len(arg):
                    ch = arg[j]
                    if ch in with_value:
                        value = arg[j + 1 :]
                        if not value:
                            i += 1
                            value = args[i]
                        flags[ch] = value
                        break
                    if ch not in allowed:
                        raise ValueError(f"invalid option -- '{ch}'")
                    flags[ch] = ""
                    j += 1
            else:
                rest.append(arg)
            i += 1
        return flags, rest

    # --- file system access as this process ---------------------------------------------------
    def _fail(self, message: str, path: str, what: str) -> EnvdError:
        return EnvdError("io", f"{message} '{path}': {what}")

    def _read(self, verb: str, arg: str) -> bytes:
        """The bytes of a file, read as this process (open(2) follows links)."""
        path = self.path(arg)
        if not self.sbx.traversable(self.user, path):
            raise self._fail(verb, arg, "Permission denied")
        host = self.sbx.host(path)
        if not host.exists():
            raise self._fail(verb, arg, "No such file or directory")
        if host.is_dir():
            raise self._fail(verb, arg, "Is a directory")
        if not self.sbx.may(self.user, path, 4):
            raise self._fail(verb, arg, "Permission denied")
        return host.read_bytes()

    def _entry_ok(self, verb: str, arg: str) -> None:
        try:
            self.sbx.check_entry(self.user, self.path(arg))
        except EnvdError as exc:
            what = "No such file or directory" if exc.code == "not_found" else (
                "Operation not permitted" if "not permitted" in exc.message else "Permission denied")
            raise self._fail(verb, arg, what) from None

    # --- builtins -----------------------------------------------------------------------------
    def cmd_true(self, args: list[str], stdin: bytes) -> Result:
        return 0, b"", b""

    def cmd_false(self, args: list[str], stdin: bytes) -> Result:
        return 1, b"", b""

    def cmd_echo(self, args: list[str], stdin: bytes) -> Result:
        return 0, (" ".join(args) + "\n").encode(), b""

    def cmd_exit(self, args: list[str], stdin: bytes) -> Result:
        raise _Exit(int(args[0]) & 0xFF if args else 0)

    def cmd_umask(self, args: list[str], stdin: bytes) -> Result:
        if not args:
            return 0, f"{self.umask:04o}\n".encode(), b""
        self.umask = int(args[0], 8) & 0o777
        return 0, b"", b""

    def cmd_trap(self, args: list[str], stdin: bytes) -> Result:
        if len(args) != 2 or args[1] not in ("EXIT", "0"):
            return 2, b"", b"trap: the stand-in models only 'trap COMMAND EXIT'\n"
        self.exit_trap = None if args[0] == "-" else args[0]
        return 0, b"", b""

    def cmd_id(self, args: list[str], stdin: bytes) -> Result:
        uid = self.sbx.uid_of(self.user)
        if args == ["-u"]:
            return 0, f"{uid}\n".encode(), b""
        if args in (["-un"], ["-nu"], ["-n", "-u"], ["-u", "-n"]):
            return 0, f"{self.user}\n".encode(), b""
        return 0, f"uid={uid}({self.user}) gid={uid}({self.user}) groups={uid}({self.user})\n".encode(), b""

    def cmd_test(self, args: list[str], stdin: bytes) -> Result:
        negate = False
        if args and args[0] == "!" and len(args) > 1:
            negate, args = True, args[1:]
        if len(args) != 2 or args[0] not in {"-e", "-f", "-d", "-L", "-h", "-O", "-r", "-w", "-x", "-s"}:
            return 2, b"", b"test: unsupported expression\n"
        op, path = args[0], self.path(args[1])
        sbx = self.sbx
        if op in ("-L", "-h"):
            ok = sbx.traversable(self.user, path, follow=False) and sbx.is_link(path)
        elif not sbx.traversable(self.user, path) or not sbx.host(path).exists():
            ok = False
        else:
            host = sbx.host(path)
            ok = {
                "-e": True,
                "-f": host.is_file(),
                "-d": host.is_dir(),
                "-s": host.stat().st_size > 0,
                "-O": sbx.owner_user(path) == self.user,
                "-r": sbx.may(self.user, path, 4),
                "-w": sbx.may(self.user, path, 2),
                "-x": sbx.may(self.user, path, 1),
            }[op]
        return (0 if ok != negate else 1), b"", b""

    # --- coreutils & co -------------------------------------------------------------------------
    def cmd_mkdir(self, args: list[str], stdin: bytes) -> Result:
        flags, paths = self._flags(args, "p", with_value="m")
        if not paths:
            return 1, b"", b"mkdir: missing operand\n"
        final_mode = int(flags["m"], 8) if "m" in flags else 0o777 & ~self.umask
        for arg in paths:
            target = self.path(arg)
            if self.sbx.host(target).is_dir():
                if "p" in flags:
                    continue
                raise self._fail("mkdir: cannot create directory", arg, "File exists")
            parts = [p for p in target.split("/") if p]
            for depth in range(1, len(parts) + 1):
                sub = "/" + "/".join(parts[:depth])
                host = self.sbx.host(sub)
                if host.is_dir():
                    continue
                if self.sbx.lexists(sub):
                    raise self._fail("mkdir: cannot create directory", arg, "File exists")
                if sub != target and "p" not in flags:
                    raise self._fail("mkdir: cannot create directory", arg, "No such file or directory")
                self._entry_ok("mkdir: cannot create directory", sub)
                host.mkdir()
                mode = final_mode if sub == target else (0o777 & ~self.umask) | 0o300
                os.chmod(host, mode | 0o700)  # the host user (the test) must still get in
                self.sbx.owners[self.sbx.real(sub)] = f"{self.user}:{self.user}"
        return 0, b"", b""

    def cmd_chmod(self, args: list[str], stdin: bytes) -> Result:
        _, rest = self._flags(args, "")
        if len(rest) < 2:
            return 1, b"", b"chmod: missing operand\n"
        mode, paths = int(rest[0], 8), rest[1:]
        for arg in paths:
            path = self.path(arg)
            if not self.sbx.traversable(self.user, path):
                raise self._fail("chmod: cannot access", arg, "Permission denied")
            host = self.sbx.host(path)
            if not host.exists():
                raise self._fail("chmod: cannot access", arg, "No such file or directory")
            if self.user != ROOT and self.sbx.owner_user(path) != self.user:
                raise self._fail("chmod: changing permissions of", arg, "Operation not permitted")
            self.sbx.check_denied(path)
            os.chmod(host, mode | (0o700 if host.is_dir() else 0))  # the host user keeps access to dirs
        return 0, b"", b""

    def cmd_chown(self, args: list[str], stdin: bytes) -> Result:
        flags, rest = self._flags(args, "h")
        if len(rest) < 2:
            return 1, b"", b"chown: missing operand\n"
        spec, paths = rest[0], rest[1:]
        owner, _, group = spec.partition(":")
        group = group or owner
        if owner not in self.sbx.users:
            return 1, b"", f"chown: invalid user: '{spec}'\n".encode()
        follow = "h" not in flags
        for arg in paths:
            path = self.path(arg)
            if not self.sbx.traversable(self.user, path, follow=follow):
                raise self._fail("chown: cannot access", arg, "Permission denied")
            exists = self.sbx.host(path).exists() if follow else self.sbx.lexists(path)
            if not exists:
                raise self._fail("chown: cannot access", arg, "No such file or directory")
            current = self.sbx.owner_user(path, follow=follow)
            if self.user != ROOT and (owner != self.user or current != self.user):
                raise self._fail("chown: changing ownership of", arg, "Operation not permitted")
            self.sbx.check_denied(path)
            key = self.sbx.real(path) if follow else self.sbx.entry(path)
            self.sbx.owners[key] = f"{owner}:{group}"
        return 0, b"", b""

    def cmd_mv(self, args: list[str], stdin: bytes) -> Result:
        _, rest = self._flags(args, "f")
        if len(rest) != 2:
            return 1, b"", b"mv: expects SOURCE DEST\n"
        sbx = self.sbx
        src, dst = self.path(rest[0]), self.path(rest[1])
        if not sbx.traversable(self.user, src, follow=False) or not sbx.lexists(src):
            raise self._fail("mv: cannot stat", rest[0], "No such file or directory")
        if sbx.host(dst).is_dir():  # into a directory (following a link to one, like mv does)
            dst = posixpath.join(sbx.real(dst), posixpath.basename(src))
        src_entry, dst_entry = sbx.entry(src), sbx.entry(dst)
        src_host, dst_host = sbx.at(src_entry), sbx.at(dst_entry)
        if dst_host.is_dir() and not dst_host.is_symlink() and not src_host.is_dir():
            raise self._fail(f"mv: cannot overwrite directory '{rest[1]}' with non-directory", rest[0], "Is a directory")
        self._entry_ok("mv: cannot move", rest[0])
        self._entry_ok("mv: cannot move to", rest[1])
        link = sbx.link_target(src) if src_host.is_symlink() else None
        os.replace(src_host, dst_host)
        if link is not None:  # the host link is relative: point it at the same sandbox path again
            dst_host.unlink()
            os.symlink(os.path.relpath(sbx.fs / link.lstrip("/"), dst_host.parent), dst_host)
        moved = {k: v for k, v in sbx.owners.items() if k == src_entry or k.startswith(src_entry + "/")}
        sbx.forget(src_entry)
        sbx.forget(dst_entry)
        for key, value in moved.items():
            sbx.owners[dst_entry + key[len(src_entry):]] = value
        return 0, b"", b""

    def cmd_rm(self, args: list[str], stdin: bytes) -> Result:
        flags, paths = self._flags(args, "frR")
        for arg in paths:
            path = self.path(arg)
            if not self.sbx.traversable(self.user, path, follow=False):
                raise self._fail("rm: cannot remove", arg, "Permission denied")
            if not self.sbx.lexists(path):
                if "f" in flags:
                    continue
                raise self._fail("rm: cannot remove", arg, "No such file or directory")
            entry = self.sbx.entry(path)
            host = self.sbx.at(entry)
            if host.is_dir() and not host.is_symlink() and not {"r", "R"} & flags.keys():
                raise self._fail("rm: cannot remove", arg, "Is a directory")
            self._entry_ok("rm: cannot remove", arg)
            shutil.rmtree(host) if host.is_dir() and not host.is_symlink() else host.unlink()
            self.sbx.forget(entry)
        return 0, b"", b""

    def cmd_cat(self, args: list[str], stdin: bytes) -> Result:
        if not args:
            return 0, stdin, b""
        return 0, b"".join(self._read("cat:", arg) for arg in args), b""

    def cmd_head(self, args: list[str], stdin: bytes) -> Result:
        flags, paths = self._flags(args, "", with_value="c")
        if "c" not in flags or len(paths) > 1:
            return 1, b"", b"head: the stand-in models only 'head -c N [FILE]'\n"
        data = self._read("head: cannot open", paths[0]) if paths else stdin
        return 0, data[: int(flags["c"])], b""

    def cmd_base64(self, args: list[str], stdin: bytes) -> Result:
        flags, paths = self._flags(args, "d", with_value="w")
        data = self._read("base64:", paths[0]) if paths else stdin
        if "d" in flags:
            try:
                return 0, base64.b64decode(b"".join(data.split()), validate=True), b""
            except ValueError:
                return 1, b"", b"base64: invalid input\n"
        text = base64.b64encode(data)
        wrap = int(flags.get("w", "76"))
        if not text:
            return 0, b"", b""
        lines = [text[i : i + wrap] for i in range(0, len(text), wrap)] if wrap else [text]
        return 0, b"\n".join(lines) + b"\n", b""

    def cmd_cmp(self, args: list[str], stdin: bytes) -> Result:
        flags, paths = self._flags(args, "s")
        if len(paths) != 2:
            return 2, b"", b"cmp: expects FILE1 FILE2\n"
        try:
            first, second = self._read("cmp:", paths[0]), self._read("cmp:", paths[1])
        except EnvdError as exc:
            return 2, b"", f"{exc.message}\n".encode()
        if first == second:
            return 0, b"", b""
        return 1, b"" if "s" in flags else f"{paths[0]} {paths[1]} differ\n".encode(), b""

    def cmd_sha256sum(self, args: list[str], stdin: bytes) -> Result:
        _, paths = self._flags(args, "")
        out, err, code = bytearray(), bytearray(), 0
        for arg in paths:
            try:
                data = self._read("sha256sum:", arg)
            except EnvdError as exc:
                err += f"{exc.message}\n".encode()
                code = 1
                continue
            out += f"{hashlib.sha256(data).hexdigest()}  {arg}\n".encode()
        return code, bytes(out), bytes(err)

    def _lstat(self, verb: str, arg: str, follow: bool) -> tuple[str, os.stat_result]:
        path = self.path(arg)
        canonical = self.sbx.real(path) if follow else self.sbx.entry(path)
        if not self.sbx.traversable(self.user, canonical, follow=False):
            raise self._fail(verb, arg, "Permission denied")
        if not os.path.lexists(self.sbx.at(canonical)):
            raise self._fail(verb, arg, "No such file or directory")
        return canonical, os.lstat(self.sbx.at(canonical))

    def cmd_stat(self, args: list[str], stdin: bytes) -> Result:
        flags, paths = self._flags(args, "L", with_value="c")
        if "c" not in flags or not paths:
            return 1, b"", b"stat: only 'stat [-L] -c FORMAT FILE...' is supported\n"
        out, err, code = bytearray(), bytearray(), 0
        for arg in paths:
            try:
                canonical, st = self._lstat("stat: cannot statx", arg, "L" in flags)
            except EnvdError as exc:
                err += f"{exc.message}\n".encode()
                code = 1
                continue
            owner, _, group = self.sbx.owner(canonical, follow=False).partition(":")
            group = group or owner
            if stat.S_ISLNK(st.st_mode):
                kind = "symbolic link"
            elif stat.S_ISDIR(st.st_mode):
                kind = "directory"
            else:
                kind = "regular file" if st.st_size else "regular empty file"
            fields = {
                "a": format(stat.S_IMODE(st.st_mode), "o"),
                "U": owner,
                "u": str(self.sbx.uid_of(owner)),
                "G": group,
                "g": str(self.sbx.uid_of(group)),
                "s": str(st.st_size),
                "F": kind,
                "n": arg,
                "%": "%",
            }
            fmt, line, i = flags["c"], [], 0
            while i < len(fmt):
                if fmt[i] == "%" and i + 1 < len(fmt) and fmt[i + 1] in fields:
                    line.append(fields[fmt[i + 1]])
                    i += 2
                else:
                    line.append(fmt[i])
                    i += 1
            out += ("".join(line) + "\n").encode()
        return code, bytes(out), bytes(err)

    def cmd_find(self, args: list[str], stdin: bytes) -> Result:
        """Only `find DIR -maxdepth 1 [-type f|d|l] [-user U] [-name PATTERN] [-mmin ±N] [-delete|-print]`."""
        if len(args) < 3 or args[1:3] != ["-maxdepth", "1"]:
            return 1, b"", b"find: the stand-in models only 'find DIR -maxdepth 1 ...'\n"
        top, rest = args[0], args[3:]
        tests: list[tuple[str, str]] = []
        action = "-print"
        i = 0
        while i < len(rest):
            if rest[i] in ("-delete", "-print"):
                action = rest[i]
                i += 1
            elif rest[i] in ("-type", "-user", "-name", "-mmin") and i + 1 < len(rest):
                tests.append((rest[i], rest[i + 1]))
                i += 2
            else:
                return 1, b"", f"find: unknown predicate '{rest[i]}'\n".encode()
        directory = self.path(top)
        if not self.sbx.may(self.user, directory, 5) or not self.sbx.host(directory).is_dir():
            return 1, b"", f"find: '{top}': Permission denied\n".encode()
        base = self.sbx.real(directory)
        out, err, code = bytearray(), bytearray(), 0
        now = time.time()
        for name in sorted(os.listdir(self.sbx.at(base))):
            entry = posixpath.join(base, name)
            st = os.lstat(self.sbx.at(entry))
            kind = "l" if stat.S_ISLNK(st.st_mode) else "d" if stat.S_ISDIR(st.st_mode) else "f"
            ok = True
            for predicate, value in tests:
                if predicate == "-type":
                    ok = kind == value
                elif predicate == "-user":
                    ok = self.sbx.owner_user(entry, follow=False) == value
                elif predicate == "-name":
                    ok = fnmatch.fnmatchcase(name, value)
                else:
                    age, limit = (now - st.st_mtime) / 60, float(value.lstrip("+-"))
                    ok = age > limit if value.startswith("+") else age < limit if value.startswith("-") else (
                        int(age) == int(limit))
                if not ok:
                    break
            if not ok:
                continue
            shown = top.rstrip("/") + "/" + name
            if action == "-print":
                out += f"{shown}\n".encode()
                continue
            try:
                self.sbx.check_entry(self.user, entry)
                shutil.rmtree(self.sbx.at(entry)) if kind == "d" else os.unlink(self.sbx.at(entry))
                self.sbx.forget(entry)
            except EnvdError:
                err += f"find: cannot delete '{shown}': Permission denied\n".encode()
                code = 1
        return code, bytes(out), bytes(err)


__all__ = ["DEFAULT_API_KEY", "E2BStandin", "Fault", "Shell", "StandinSandbox", "envelope", "read_envelopes"]
