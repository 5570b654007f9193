"""A real nats-server running ccbridge's production NATS config (deploy/nats/nats.conf +
accounts.conf) with test passwords, for tests that must run under least-privilege users.

    with SecuredNats.start(tmp_path) as nats:
        nats.url("vault")          # nats://vault:<password>@127.0.0.1:<port>
        nats.urls                  # {"auth": ..., "vault": ..., "sandbox": ..., "platform": ..., "ops": ...}
        nats.password_env()        # {"NATS_AUTH_PASSWORD": ..., ...} (what the server was given)

Reusable by the whole-flow test: start the services with `NATS_URL=nats.url("<service>")`.
The config is the committed one; only `store_dir` is rewritten to the temp dir (nats-server
refuses `-sd` next to a `store_dir` in the file), host/port/monitoring come from the command line.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ccbridge.embedded_nats import free_port, nats_server_binary

REPO = Path(__file__).resolve().parent.parent
NATS_CONFIG_DIR = REPO / "deploy" / "nats"
USERS = ("auth", "vault", "sandbox", "platform", "ops")


def password_env_name(user: str) -> str:
    return f"NATS_{user.upper()}_PASSWORD"


def render_nats_config(dest_dir: Path, *, store_dir: Path) -> Path:
    """Copy deploy/nats/{nats,accounts}.conf into `dest_dir` with `store_dir` pointed at a temp
    dir; returns the path of the main config. Everything else is byte-for-byte the committed file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    main = (NATS_CONFIG_DIR / "nats.conf").read_text()
    rendered, count = re.subn(r'(?m)^(\s*store_dir:\s*).*$', lambda m: f'{m.group(1)}"{store_dir}"', main)
    if count != 1:
        raise AssertionError("deploy/nats/nats.conf must set jetstream.store_dir exactly once")
    (dest_dir / "nats.conf").write_text(rendered)
    (dest_dir / "accounts.conf").write_text((NATS_CONFIG_DIR / "accounts.conf").read_text())
    return dest_dir / "nats.conf"


@dataclass
class SecuredNats:
    base_dir: Path
    passwords: Mapping[str, str]
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, base_dir: Path, passwords: Mapping[str, str] | None = None, timeout: float = 15.0) -> SecuredNats:
        chosen = dict(passwords or {user: secrets.token_hex(16) for user in USERS})
        missing = set(USERS) - set(chosen)
        if missing:
            raise ValueError(f"passwords missing for {sorted(missing)}")
        server = cls(Path(base_dir), chosen)
        server._run(timeout)
        return server

    # --- addresses ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return "127.0.0.1"

    def url(self, user: str) -> str:
        return f"nats://{user}:{self.passwords[user]}@{self.host}:{self.port}"

    @property
    def urls(self) -> dict[str, str]:
        return {user: self.url(user) for user in USERS}

    @property
    def anonymous_url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def password_env(self) -> dict[str, str]:
        return {password_env_name(user): password for user, password in self.passwords.items()}

    # --- lifecycle ---------------------------------------------------------------------------
    def _run(self, timeout: float) -> None:
        config = render_nats_config(self.base_dir / "conf", store_dir=self.base_dir / "store")
        log = (self.base_dir / "nats.log").open("ab")
        env = {**os.environ, **self.password_env()}
        args = [nats_server_binary(), "-c", str(config), "-a", self.host, "-p", str(self.port),
                "-m", str(self.http_port)]
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.base_dir / "nats.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nats-server exited with {self.process.returncode}:\n{tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start in time")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> SecuredNats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredNats]:
    """One least-privilege nats-server per test module (import this fixture into the module)."""
    with SecuredNats.start(tmp_path_factory.mktemp("secured-nats")) as server:
        yield server
