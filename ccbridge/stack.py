"""Run the whole ccbridge stack as separate processes: an embedded nats-server (unless
NATS_URL names one) and the three services. Used by `ccbridge up`, `ccbridge demo` and the
end-to-end tests, so all three start the stack the same way.

The embedded nats-server runs production's users and permissions (deploy/nats/accounts.conf,
see ccbridge.nats_users): each service connects as its own user, `nats_url` is the `ops` user's
URL (harnesses, CLI verbs) and `nats_url_for(user)` any other's. A NATS_URL given by the operator
is used unchanged, by every service, as before."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js.errors import NotFoundError

from ccbridge import nats_users
from ccbridge.embedded_nats import EmbeddedNats, die_with_parent, free_port
from shared import subjects
from shared.grants import load_or_create_signer
from shared.runtime import SUPERVISOR_PID_ENV
from shared.sealing import load_or_create_keypair
from shared.settings import nats_servers

SERVICES = ("vault", "sandbox", "auth")


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Stack:
    data_dir: Path
    # An external NATS (used as is by everyone), or None: an embedded one; once started, the
    # embedded server's `ops` URL.
    nats_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    auth_port: int | None = None
    log_dir: Path | None = None
    quiet: bool = True
    # Per-service additions, e.g. each service's own NATS user in NATS_URL (least privilege).
    per_service_env: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        """Where the services' and nats-server's logs go (`log_dir`, else <data_dir>/logs)."""
        assert self.log_dir is not None  # set by __post_init__
        return self.log_dir

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.log_dir = Path(self.log_dir or self.data_dir / "logs").resolve()
        self.nats: EmbeddedNats | None = None
        self.external_nats_url = self.nats_url
        self.nats_passwords: dict[str, str] = {}
        self.processes: dict[str, ServiceProcess] = {}
        # Health/metrics listeners on free ports: 9100/9101 often belong to node_exporter & co.
        self.metrics_ports = {name: free_port() for name in ("vault", "sandbox")}

    # --- configuration --------------------------------------------------
    @property
    def auth_url(self) -> str:
        host = self.service_env().get("AUTH_HOST") or "127.0.0.1"
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, host)  # listening everywhere: ask loopback
        return f"http://{host}:{self.service_env()['AUTH_PORT']}"

    def nats_url_for(self, user: str) -> str:
        """`user`'s URL (nats://<user>:<password>@…) on the embedded server; with an external
        NATS, that URL unchanged, whoever asks."""
        if self.external_nats_url:
            return self.external_nats_url
        if self.nats is None:
            raise RuntimeError("the embedded nats-server is not running")
        return nats_users.user_url(self.nats.url, user, self.nats_passwords[user])

    @property
    def nats_urls(self) -> dict[str, str]:
        """Every user's URL (what a `stack.json` would hold)."""
        return {user: self.nats_url_for(user) for user in nats_users.USERS}

    def describe(self) -> dict[str, Any]:
        """What `ccbridge up` writes to `<data_dir>/stack.json` (ccbridge.stackfile): holds the
        NATS passwords of `ops` and `platform` — the file is 0600; print URLs only through
        `shared.settings.redact_url`."""
        env = self.service_env()
        return {
            "pid": os.getpid(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "data_dir": str(self.data_dir),
            "nats_url": self.nats_url_for("ops"),
            "nats_urls": {user: self.nats_url_for(user) for user in ("ops", "platform")},
            "nats_embedded": self.nats is not None,
            "auth_url": self.auth_url,
            "vault_metrics_port": int(env["VAULT_METRICS_PORT"]),
            "sandbox_metrics_port": int(env["SANDBOX_METRICS_PORT"]),
            "database_url": env["DATABASE_URL"],
            "local_sandbox_root": env["LOCAL_SANDBOX_ROOT"],
            "logs": str(self.log_dir),
        }

    def service_env(self, name: str | None = None) -> dict[str, str]:
        """The environment of service `name` (its own NATS user); without a name, a harness's
        (NATS_URL = `nats_url`, the ops user)."""
        env = dict(os.environ)
        if not self.external_nats_url:
            # the embedded users are ccbridge's own: each service's default prefix is the right one
            env.pop("NATS_INBOX_PREFIX", None)
        env.update(
            {
                "NATS_URL": self.nats_url_for(name) if name else self.nats_url or "",
                "CCBRIDGE_DATA_DIR": str(self.data_dir),
                "DATABASE_URL": env.get("DATABASE_URL") or f"sqlite+aiosqlite:///{self.data_dir / 'vault.db'}",
                "LOCAL_SANDBOX_ROOT": env.get("LOCAL_SANDBOX_ROOT") or str(self.data_dir / "sandboxes"),
                "AUTH_PORT": str(self.auth_port or env.get("AUTH_PORT") or 8000),
                "VAULT_METRICS_PORT": env.get("VAULT_METRICS_PORT") or str(self.metrics_ports["vault"]),
                "SANDBOX_METRICS_PORT": env.get("SANDBOX_METRICS_PORT") or str(self.metrics_ports["sandbox"]),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        if self.auth_port:
            env["AUTH_PORT"] = str(self.auth_port)
        return env

    # --- lifecycle ------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Stack:
        asyncio.run(self.astart(timeout))
        return self

    async def astart(self, timeout: float = 60.0) -> Stack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.external_nats_url:
            self.start_nats()
        if self.auth_port is None:
            requested = (self.env.get("AUTH_PORT") or os.environ.get("AUTH_PORT") or "").strip()
            if not requested:
                self.auth_port = 8000 if _port_free(8000) else free_port()
            elif requested == "0":  # "any free port": pick it here, so auth_url is known
                self.auth_port = free_port()
        # Keys exist before any service starts, so auth can seal to the vault at once and the
        # vault trusts auth's grant key from its first request.
        keys_dir = self.data_dir / "keys"
        if not self.service_env().get("VAULT_HPKE_PRIVATE_KEY"):
            load_or_create_keypair(keys_dir, "vault")
        if not self.service_env().get("SANDBOX_HPKE_PRIVATE_KEY"):
            load_or_create_keypair(keys_dir, "sandbox")
        if not self.service_env().get("AUTH_GRANT_PRIVATE_KEY"):
            load_or_create_signer(keys_dir)
        for name in self.services:
            self.start_service(name)
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_nats(self) -> EmbeddedNats:
        """The embedded nats-server: production's config and users, this data dir's passwords
        (<data_dir>/nats/users.json, generated once), JetStream in <data_dir>/nats."""
        self.nats_passwords = nats_users.load_or_create_passwords(self.data_dir)
        store = self.data_dir / nats_users.STORE_DIRNAME
        self.nats = nats_users.start_secured_nats(store / "conf", store, self.nats_passwords,
                                                  log_file=self.logs / "nats-server.log",
                                                  die_with_parent=True)
        nats_users.record_server(self.data_dir, self.nats.url)
        self.nats_url = self.nats_url_for("ops")
        return self.nats

    async def connect_nats(self, user: str = "ops", **options: Any) -> nats.NATS:
        """A connection as `user`, replying on that user's inbox prefix (for harnesses and tests)."""
        return await nats.connect(servers=nats_servers(self.nats_url_for(user)),
                                  inbox_prefix=subjects.inbox_prefix(user), **options)

    @property
    def nats_users_file(self) -> Path:
        return nats_users.users_file(self.data_dir)

    def start_service(self, name: str) -> ServiceProcess:
        log_path = self.logs / f"{name}.log"
        out = open(log_path, "ab")
        # Its own session (a Ctrl-C in the terminal reaches only the supervisor, which stops the
        # services in order), yet it dies with the supervisor: PR_SET_PDEATHSIG on Linux, and the
        # service watches CCBRIDGE_SUPERVISOR_PID itself (shared.runtime) everywhere.
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env={**self.service_env(name), **self.per_service_env.get(name, {}),
                 SUPERVISOR_PID_ENV: str(os.getpid())},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        out.close()
        self.processes[name] = ServiceProcess(name, process, log_path)
        return self.processes[name]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes[name].process
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(15)

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start_service(name)

    def stop(self) -> None:
        for svc in reversed(list(self.processes.values())):
            if svc.process.poll() is None:
                svc.process.send_signal(signal.SIGTERM)
        for svc in self.processes.values():
            try:
                svc.process.wait(15)
            except subprocess.TimeoutExpired:
                svc.process.kill()
                svc.process.wait()
        self.processes.clear()
        if self.nats:
            self.nats.stop()
            self.nats = None
            nats_users.record_server(self.data_dir, None)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Stack:
        return await self.astart()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def check_alive(self) -> None:
        for svc in self.processes.values():
            if svc.process.poll() is not None:
                tail = svc.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"service {svc.name} exited with {svc.process.returncode}:\n{tail}")

    async def wait_ready(self, timeout: float) -> None:
        """Ready = durable consumers exist, the vault answers requests, auth says /readyz 200."""
        deadline = time.monotonic() + timeout
        nc = await nats.connect(servers=nats_servers(self.nats_url_for("ops")), max_reconnect_attempts=-1,
                                inbox_prefix=subjects.inbox_prefix("ops"))
        try:
            js = nc.jetstream()
            pending = []
            if "vault" in self.services:
                pending.append((subjects.TOKENS_STREAM.name, subjects.VAULT_TOKENS_ISSUED_DURABLE))
            if "sandbox" in self.services:
                pending.append((subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREATED_DURABLE))
            async with httpx.AsyncClient(timeout=2.0) as http:
                while True:
                    self.check_alive()
                    pending = [p for p in pending if not await _consumer_exists(js, *p)]
                    vault_ok = "vault" not in self.services or await self._vault_ready(http, nc)
                    auth_ok = "auth" not in self.services or await _http_ok(http, f"{self.auth_url}/readyz")
                    if not pending and vault_ok and auth_ok:
                        return
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"stack not ready: consumers={pending} vault={vault_ok} auth={auth_ok}")
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def metrics_url(self, name: str) -> str | None:
        """Service `name`'s health/metrics listener (vault, sandbox), None when it is off (port 0)."""
        env = self.service_env(name)
        port = int(env.get(f"{name.upper()}_METRICS_PORT") or 0)
        if not port:
            return None
        host = env.get(f"{name.upper()}_METRICS_HOST") or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        return f"http://{host}:{port}"

    async def _vault_ready(self, http: httpx.AsyncClient, nc: nats.NATS) -> bool:
        """The vault's /readyz (it listens only once its subscribers are up). Only with its
        metrics listener off, a request on vault.credentials.get — which the vault logs as a
        rejected request."""
        url = self.metrics_url("vault")
        if url:
            return await _http_ok(http, f"{url}/readyz")
        return await _responds(nc, subjects.VAULT_CREDENTIALS_GET)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


async def _consumer_exists(js: nats.js.JetStreamContext, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
        return True
    except (TimeoutError, NotFoundError, nats.errors.Error):
        return False


async def _responds(nc: nats.NATS, subject: str) -> bool:
    try:
        await nc.request(subject, b"{}", timeout=0.5)
        return True
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False


async def _http_ok(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(url)).status_code == 200
    except httpx.HTTPError:
        return False
