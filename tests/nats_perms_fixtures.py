"""A real nats-server running ccbridge's production NATS config (deploy/nats/nats.conf +
accounts.conf) with test passwords, for tests that must run under least-privilege users.

    with SecuredNats.start(tmp_path) as nats:
        nats.url("vault")          # nats://vault:<password>@127.0.0.1:<port>
        nats.urls                  # {"auth": ..., "vault": ..., "sandbox": ..., "platform": ..., "ops": ...}
        nats.password_env()        # {"NATS_AUTH_PASSWORD": ..., ...} (what the server was given)

Reusable by the whole-flow test: start the services with `NATS_URL=nats.url("<service>")`.
The config is rendered by ccbridge.nats_users, as `ccbridge up` renders it for its embedded
server: the committed files with only `store_dir` rewritten to the temp dir; host/port/monitoring
come from the command line.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from ccbridge.embedded_nats import EmbeddedNats
from ccbridge.nats_users import USERS, password_env, password_env_name, render_nats_config, start_secured_nats, user_url
from shared.subjects import inbox_prefix

__all__ = ["USERS", "SecuredNats", "inbox_prefix", "password_env_name", "render_nats_config", "secured_nats"]


@dataclass
class SecuredNats:
    base_dir: Path
    passwords: Mapping[str, str]
    server: EmbeddedNats

    @classmethod
    def start(cls, base_dir: Path, passwords: Mapping[str, str] | None = None) -> SecuredNats:
        chosen = dict(passwords or {user: secrets.token_hex(16) for user in USERS})
        base_dir = Path(base_dir)
        server = start_secured_nats(base_dir / "conf", base_dir / "store", chosen, log_file=base_dir / "nats.log")
        return cls(base_dir, chosen, server)

    # --- addresses ---------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, user: str) -> str:
        return user_url(self.server.url, user, self.passwords[user])

    @property
    def urls(self) -> dict[str, str]:
        return {user: self.url(user) for user in USERS}

    @property
    def anonymous_url(self) -> str:
        return self.server.url

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.server.http_port}"

    def password_env(self) -> dict[str, str]:
        return password_env(self.passwords)

    # --- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> SecuredNats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def secured_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredNats]:
    """One least-privilege nats-server per test module (import this fixture into the module)."""
    with SecuredNats.start(tmp_path_factory.mktemp("secured-nats")) as server:
        yield server
