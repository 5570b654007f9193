"""A loopback stand-in for e2b — control plane and envd — that the REAL `e2b` Python SDK (2.x)
talks to unmodified, so the sandbox service's e2b backend is tested end to end without the
cloud. Files live in a temp dir per sandbox (`<root>/<sandbox_id>/fs/<path>`).

    async with E2BStandin(tmp_path) as e2b:
        sbx = e2b.add_sandbox()                  # a sandbox "the platform created"
        # point the SDK at it (what the sandbox service's settings do):
        #   E2B_API_URL=e2b.api_url  E2B_SANDBOX_URL=e2b.sandbox_url  E2B_API_KEY=e2b.api_key
        e2b.fail("files.write", status=500, times=2)   # failure injection
        e2b.slow("process", seconds=3)
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
- `process.Process/Start` runs `/bin/bash -l -c <cmd>`; the stand-in interprets a small
  allow-list against the sandbox's files (`&&` chains of `true`, `id`, `echo`, `mkdir [-p]
  [-m MODE]`, `chmod MODE`, `chown OWNER[:[GROUP]]`, `mv [-f]`, `rm [-rf] [--]`, `cat`,
  `test -e|-f|-d`, `stat -c FMT`); anything else exits 127. Ownership is simulated (recorded,
  checked like POSIX: only root chowns to others; writing needs the dir's w bit for you);
  modes are real on the host files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import posixpath
import secrets
import shlex
import shutil
import socket
import stat
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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

DEFAULT_API_KEY = "e2b_standin_0123456789abcdef"
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
    """One injected failure. `op`: create | connect | files.read | files.write | make_dir |
    remove | stat | process | health | * ; `times` None = until cleared."""

    op: str
    kind: str  # "status" | "slow"
    status: int = 500
    seconds: float = 0.0
    times: int | None = 1
    sandbox_id: str | None = None
    message: str = "injected failure"

    def matches(self, op: str, sandbox_id: str | None) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.op not in ("*", op):
            return False
        return self.sandbox_id is None or self.sandbox_id == sandbox_id


@dataclass
class StandinSandbox:
    sandbox_id: str
    root: Path
    template: str
    envd_access_token: str
    users: dict[str, str]
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    alive: bool = True
    owners: dict[str, str] = field(default_factory=dict)
    """sandbox path → "user:group" (simulated ownership)."""
    commands: list[tuple[str, str, int]] = field(default_factory=list)
    """(user, command, exit code) of every process started."""
    denied: list[str] = field(default_factory=list)
    """Path prefixes nobody may write under (permission denied)."""

    @property
    def fs(self) -> Path:
        return self.root / "fs"

    def home_of(self, user: str) -> str:
        return self.users.get(user, f"/home/{user}")

    def host(self, path: str) -> Path:
        """The host path of an absolute sandbox path, confined to the sandbox."""
        if not path.startswith("/"):
            raise EnvdError("invalid_argument", f"path {path!r} is not absolute")
        norm = posixpath.normpath(path)
        host = self.fs / norm.lstrip("/")
        real_root = os.path.realpath(self.fs)
        if os.path.commonpath([os.path.realpath(host), real_root]) != real_root:
            raise EnvdError("permission_denied", f"{path}: outside the sandbox")
        return host

    def owner(self, path: str) -> str:
        norm = posixpath.normpath(path)
        while True:
            if norm in self.owners:
                return self.owners[norm]
            if norm == "/":
                return "root:root"
            norm = posixpath.dirname(norm)

    def owner_user(self, path: str) -> str:
        return self.owner(path).split(":", 1)[0]

    def read(self, path: str) -> bytes:
        """The bytes of a file in this sandbox (for tests)."""
        return self.host(path).read_bytes()

    def mode(self, path: str) -> int:
        return stat.S_IMODE(self.host(path).stat().st_mode)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test's loop owns the signals
        pass


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
        self._servers: list[tuple[_Server, asyncio.Task[None]]] = []
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
        for path, owner, mode in [("/", "root", 0o755), ("/home", "root", 0o755), ("/root", "root", 0o700),
                                  ("/tmp", "root", 0o1777)]:
            sbx.host(path).mkdir(parents=True, exist_ok=True)
            os.chmod(sbx.host(path), mode | 0o700)  # the host user (the test) must still get in
            sbx.owners[path] = f"{owner}:{owner}"
        for user, home in homes.items():
            sbx.host(home).mkdir(parents=True, exist_ok=True)
            sbx.owners[home] = f"{user}:{user}"
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
            server = _Server(config)
            task = asyncio.create_task(server.serve(sockets=[sock]), name=f"e2b-standin-{attr}")
            self._servers.append((server, task))
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the e2b stand-in stopped during start")
                await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for server, _ in servers:
            server.should_exit = True
        for server, task in servers:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except (TimeoutError, asyncio.TimeoutError):
                server.force_exit = True
                with contextlib.suppress(Exception):
                    await task

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
                return JSONResponse(self._sandbox_json(self.sandboxes[self.idempotency[key]]), status_code=201)
            sbx = self.add_sandbox(
                template=template,
                metadata={str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
                env_vars={str(k): str(v) for k, v in (body.get("envVars") or {}).items()},
            )
            if key:
                self.idempotency[key] = sbx.sandbox_id
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

    def _writable(self, sbx: StandinSandbox, user: str, path: str) -> None:
        """Raise permission_denied unless `user` may create/replace `path`."""
        norm = posixpath.normpath(path)
        for prefix in sbx.denied:
            if norm == prefix or norm.startswith(prefix.rstrip("/") + "/"):
                raise EnvdError("permission_denied", f"open {path}: permission denied")
        if user == "root":
            return
        parent = posixpath.dirname(norm)
        while not sbx.host(parent).exists():  # would be created: check the first existing ancestor
            parent = posixpath.dirname(parent)
        host = sbx.host(parent)
        mode = stat.S_IMODE(host.stat().st_mode)
        bit = 0o200 if sbx.owner_user(parent) == user else 0o002
        if not mode & bit:
            raise EnvdError("permission_denied", f"open {path}: permission denied")

    def _mkdirs(self, sbx: StandinSandbox, user: str, path: str, mode: int = 0o755) -> bool:
        """mkdir -p; new dirs belong to `user`. Returns False when it already existed."""
        host = sbx.host(path)
        if host.exists():
            if not host.is_dir():
                raise EnvdError("invalid_argument", f"{path} exists and is not a directory")
            return False
        self._writable(sbx, user, path)
        missing = []
        current = posixpath.normpath(path)
        while not sbx.host(current).exists():
            missing.append(current)
            current = posixpath.dirname(current)
        for item in reversed(missing):
            sbx.host(item).mkdir()
            os.chmod(sbx.host(item), mode | 0o700)
            sbx.owners[item] = f"{user}:{user}"
        return True

    def _write(self, sbx: StandinSandbox, user: str, path: str, data: bytes) -> None:
        self._writable(sbx, user, path)
        host = sbx.host(path)
        if host.is_dir():
            raise EnvdError("invalid_argument", f"{path} is a directory")
        self._mkdirs(sbx, user, posixpath.dirname(posixpath.normpath(path)))
        existed = host.exists()
        host.write_bytes(data)
        if not existed:
            os.chmod(host, 0o644)  # envd's umask: a new file is world-readable until chmod
            sbx.owners[posixpath.normpath(path)] = f"{user}:{user}"

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
                        uploads.append((query_path or name, part.get_payload(decode=True) or b""))
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
                    if not self._mkdirs(sbx, user, path):
                        raise EnvdError("already_exists", f"directory {path} already exists")
                except EnvdError as exc:
                    return _connect_error(exc)
                return JSONResponse({"entry": _entry(sbx, path)})

            return await guarded(request, "make_dir", handle)

        async def remove(request: Request) -> Response:
            async def handle(req: Request, sbx: StandinSandbox) -> Response:
                try:
                    user = self._user_of(req, sbx)
                    path = _unary_path(await req.body())
                    self._writable(sbx, user, path)
                    host = sbx.host(path)
                    if not host.exists():
                        raise EnvdError("not_found", f"path {path} not found")
                    shutil.rmtree(host) if host.is_dir() else host.unlink()
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
                    code = "internal" if fault.status >= 500 else "permission_denied"
                    yield envelope({"error": {"code": code, "message": fault.message}}, END_STREAM)
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


class Shell:
    """The tiny allow-listed command interpreter behind process.Process/Start."""

    def __init__(self, standin: E2BStandin, sbx: StandinSandbox, user: str, cwd: str) -> None:
        self.standin = standin
        self.sbx = sbx
        self.user = user
        self.cwd = cwd

    def path(self, arg: str) -> str:
        return posixpath.normpath(arg if arg.startswith("/") else posixpath.join(self.cwd, arg))

    def run(self, command: str) -> tuple[int, bytes, bytes]:
        try:
            lexer = shlex.shlex(command, posix=True, punctuation_chars="&|;<>")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError as exc:
            return 2, b"", f"bash: syntax error: {exc}\n".encode()
        out, err = bytearray(), bytearray()
        for word in tokens:
            if word in {"|", ";", "||", ">", "<", ">>", "&"} or (set(word) <= set("&|;<>") and word != "&&"):
                return 2, b"", f"standin: unsupported shell syntax {word!r}\n".encode()
        chain: list[list[str]] = [[]]
        for word in tokens:
            if word == "&&":
                chain.append([])
            else:
                chain[-1].append(word)
        code = 0
        for argv in chain:
            if not argv:
                return 2, bytes(out), b"bash: syntax error near `&&'\n"
            code, o, e = self.one(argv)
            out += o
            err += e
            if code:
                break
        return code, bytes(out), bytes(err)

    def one(self, argv: list[str]) -> tuple[int, bytes, bytes]:
        name, args = argv[0], argv[1:]
        handler = getattr(self, f"cmd_{name}", None)
        if handler is None:
            return 127, b"", f"bash: {name}: command not found\n".encode()
        try:
            return handler(args)
        except EnvdError as exc:
            return 1, b"", f"{name}: {exc.message}\n".encode()
        except (OSError, ValueError, IndexError) as exc:
            return 1, b"", f"{name}: {exc}\n".encode()

    @staticmethod
    def _flags(args: list[str], allowed: str) -> tuple[set[str], list[str]]:
        flags: set[str] = set()
        rest: list[str] = []
        parsing = True
        for arg in args:
            if parsing and arg == "--":
                parsing = False
            elif parsing and arg.startswith("-") and len(arg) > 1:
                for ch in arg[1:]:
                    if ch not in allowed:
                        raise ValueError(f"invalid option -- '{ch}'")
                    flags.add(ch)
            else:
                rest.append(arg)
        return flags, rest

    def cmd_true(self, args: list[str]) -> tuple[int, bytes, bytes]:
        return 0, b"", b""

    def cmd_echo(self, args: list[str]) -> tuple[int, bytes, bytes]:
        return 0, (" ".join(args) + "\n").encode(), b""

    def cmd_id(self, args: list[str]) -> tuple[int, bytes, bytes]:
        uid = 0 if self.user == "root" else 1000
        if args in (["-u"],):
            return 0, f"{uid}\n".encode(), b""
        if args in (["-un"], ["-nu"], ["-n", "-u"], ["-u", "-n"]):
            return 0, f"{self.user}\n".encode(), b""
        return 0, f"uid={uid}({self.user}) gid={uid}({self.user}) groups={uid}({self.user})\n".encode(), b""

    def cmd_mkdir(self, args: list[str]) -> tuple[int, bytes, bytes]:
        mode = 0o755
        if "-m" in args:
            index = args.index("-m")
            mode = int(args[index + 1], 8)
            args = args[:index] + args[index + 2 :]
        flags, paths = self._flags(args, "p")
        for arg in paths:
            path = self.path(arg)
            if self.sbx.host(path).exists() and "p" not in flags:
                return 1, b"", f"mkdir: cannot create directory '{arg}': File exists\n".encode()
            if "p" not in flags and not self.sbx.host(posixpath.dirname(path)).is_dir():
                return 1, b"", f"mkdir: cannot create directory '{arg}': No such file or directory\n".encode()
            self.standin._mkdirs(self.sbx, self.user, path, mode)
        return 0, b"", b""

    def _owned(self, path: str, verb: str) -> None:
        if self.user != "root" and self.sbx.owner_user(path) != self.user:
            raise EnvdError("permission_denied", f"changing {verb} of '{path}': Operation not permitted")
        for prefix in self.sbx.denied:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                raise EnvdError("permission_denied", f"changing {verb} of '{path}': Permission denied")

    def cmd_chmod(self, args: list[str]) -> tuple[int, bytes, bytes]:
        flags, rest = self._flags(args, "")
        mode, paths = int(rest[0], 8), rest[1:]
        if not paths:
            return 1, b"", b"chmod: missing operand\n"
        for arg in paths:
            path = self.path(arg)
            host = self.sbx.host(path)
            if not host.exists():
                return 1, b"", f"chmod: cannot access '{arg}': No such file or directory\n".encode()
            self._owned(path, "permissions")
            os.chmod(host, mode | (0o700 if host.is_dir() else 0))  # the host user keeps access to dirs
        return 0, b"", b""

    def cmd_chown(self, args: list[str]) -> tuple[int, bytes, bytes]:
        _, rest = self._flags(args, "")
        spec, paths = rest[0], rest[1:]
        owner, _, group = spec.partition(":")
        group = group or owner
        if owner not in self.sbx.users:
            return 1, b"", f"chown: invalid user: '{spec}'\n".encode()
        for arg in paths:
            path = self.path(arg)
            if not self.sbx.host(path).exists():
                return 1, b"", f"chown: cannot access '{arg}': No such file or directory\n".encode()
            if self.user != "root" and owner != self.user:
                return 1, b"", f"chown: changing ownership of '{arg}': Operation not permitted\n".encode()
            self._owned(path, "ownership")
            self.sbx.owners[path] = f"{owner}:{group}"
        return 0, b"", b""

    def cmd_mv(self, args: list[str]) -> tuple[int, bytes, bytes]:
        _, rest = self._flags(args, "f")
        if len(rest) != 2:
            return 1, b"", b"mv: expects SOURCE DEST\n"
        src, dst = self.path(rest[0]), self.path(rest[1])
        host_src, host_dst = self.sbx.host(src), self.sbx.host(dst)
        if not host_src.exists():
            return 1, b"", f"mv: cannot stat '{rest[0]}': No such file or directory\n".encode()
        if host_dst.is_dir():
            dst = posixpath.join(dst, posixpath.basename(src))
            host_dst = self.sbx.host(dst)
        self.standin._writable(self.sbx, self.user, src)
        self.standin._writable(self.sbx, self.user, dst)
        os.replace(host_src, host_dst)
        owner = self.sbx.owners.pop(src, None)
        if owner:
            self.sbx.owners[dst] = owner
        return 0, b"", b""

    def cmd_rm(self, args: list[str]) -> tuple[int, bytes, bytes]:
        flags, paths = self._flags(args, "frR")
        for arg in paths:
            path = self.path(arg)
            host = self.sbx.host(path)
            if not host.exists():
                if "f" in flags:
                    continue
                return 1, b"", f"rm: cannot remove '{arg}': No such file or directory\n".encode()
            self.standin._writable(self.sbx, self.user, path)
            if host.is_dir():
                if not flags & {"r", "R"}:
                    return 1, b"", f"rm: cannot remove '{arg}': Is a directory\n".encode()
                shutil.rmtree(host)
            else:
                host.unlink()
            for key in [k for k in self.sbx.owners if k == path or k.startswith(path + "/")]:
                del self.sbx.owners[key]
        return 0, b"", b""

    def cmd_cat(self, args: list[str]) -> tuple[int, bytes, bytes]:
        out = bytearray()
        for arg in args:
            host = self.sbx.host(self.path(arg))
            if not host.is_file():
                return 1, bytes(out), f"cat: {arg}: No such file or directory\n".encode()
            out += host.read_bytes()
        return 0, bytes(out), b""

    def cmd_test(self, args: list[str]) -> tuple[int, bytes, bytes]:
        if len(args) != 2 or args[0] not in {"-e", "-f", "-d"}:
            return 2, b"", b"test: unsupported expression\n"
        host = self.sbx.host(self.path(args[1]))
        ok = {"-e": host.exists(), "-f": host.is_file(), "-d": host.is_dir()}[args[0]]
        return (0 if ok else 1), b"", b""

    def cmd_stat(self, args: list[str]) -> tuple[int, bytes, bytes]:
        if len(args) < 3 or args[0] != "-c":
            return 1, b"", b"stat: only 'stat -c FORMAT FILE...' is supported\n"
        fmt, paths = args[1], args[2:]
        out = bytearray()
        for arg in paths:
            path = self.path(arg)
            host = self.sbx.host(path)
            if not host.exists():
                return 1, bytes(out), f"stat: cannot statx '{arg}': No such file or directory\n".encode()
            st = host.stat()
            owner, _, group = self.sbx.owner(path).partition(":")
            mode = stat.S_IMODE(st.st_mode)
            line = (
                fmt.replace("%a", format(mode, "o"))
                .replace("%U", owner)
                .replace("%G", group or owner)
                .replace("%n", arg)
                .replace("%s", str(st.st_size))
            )
            out += (line + "\n").encode()
        return 0, bytes(out), b""



__all__ = ["DEFAULT_API_KEY", "E2BStandin", "Fault", "Shell", "StandinSandbox", "envelope", "read_envelopes"]
