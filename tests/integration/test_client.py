"""The platform client against the running vault and sandbox services on the stack's own
nats-server, which runs production's NATS users: the client connects as `platform`, the harness
connects people as `auth` would."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from ccbridge.client import CcbridgeClient, CcbridgeTimeout
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.stack import Stack
from shared.events import SandboxCredentialsFailed, SandboxCredentialsInjected


@pytest.fixture
async def stack(tmp_path: Path):
    # The stack's own (private) nats-server: these tests must not share durable consumers with others.
    async with Stack(tmp_path / "data", services=("vault", "sandbox")) as running:
        yield running


async def _connected_user(stack: Stack, token: str) -> str:
    user = f"user-{uuid.uuid4().hex[:8]}"
    nc = await stack.connect_nats("auth")  # tokens.issued is auth's to publish
    try:
        await connect_user_on_bus(nc, vault_recipient(stack.data_dir / "keys"), user, token)
    finally:
        await nc.close()
    return user


async def _prepare_until_connected(ccb: CcbridgeClient, sandbox_id: str, user: str, **kwargs):
    for _ in range(50):  # the vault stores asynchronously
        result = await ccb.prepare_sandbox(sandbox_id, user, **kwargs)
        if not (isinstance(result, SandboxCredentialsFailed) and result.reason == "not_connected"):
            return result
        await asyncio.sleep(0.1)
    raise AssertionError("the vault never stored the connection")


async def test_prepare_sandbox_returns_injected_and_files_exist(stack: Stack) -> None:
    user = await _connected_user(stack, "sk-ant-oat01-client-test-token")
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        result = await _prepare_until_connected(ccb, "sbx-client-1", user, mode="access_only")
    assert isinstance(result, SandboxCredentialsInjected)
    assert result.mode == "access_only" and result.sandbox_id == "sbx-client-1"
    creds = json.loads((Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "sbx-client-1/.claude/.credentials.json").read_text())
    assert creds["claudeAiOauth"]["accessToken"] == "sk-ant-oat01-client-test-token"
    assert "refreshToken" not in creds["claudeAiOauth"]


async def test_unknown_user_gets_a_typed_failure(stack: Stack) -> None:
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        result = await ccb.prepare_sandbox("sbx-nobody", f"nobody-{uuid.uuid4().hex[:6]}", timeout=15)
    assert isinstance(result, SandboxCredentialsFailed)
    assert result.reason == "not_connected" and not result.retryable


async def test_many_concurrent_calls_on_one_connection(stack: Stack) -> None:
    users = [await _connected_user(stack, f"sk-ant-oat01-concurrent-{i:02d}") for i in range(3)]
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        await _prepare_until_connected(ccb, "sbx-warmup", users[-1])
        calls = [ccb.prepare_sandbox(f"sbx-many-{i}", users[i % 3], timeout=30) for i in range(30)]
        results = await asyncio.gather(*calls)
    assert all(isinstance(r, SandboxCredentialsInjected) for r in results), results
    assert sorted(r.sandbox_id for r in results) == sorted(f"sbx-many-{i}" for i in range(30))
    root = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"])
    for i in range(30):  # each sandbox got ITS user's token, not a neighbour's
        creds = json.loads((root / f"sbx-many-{i}/.claude/.credentials.json").read_text())
        assert creds["claudeAiOauth"]["accessToken"] == f"sk-ant-oat01-concurrent-{i % 3:02d}"


@pytest.fixture
async def open_stack(tmp_path: Path, embedded_nats):
    """An anonymous nats-server. The client answers a duplicate by scanning the stream through an
    ephemeral consumer, which the `platform` user may not create (a known limit, see
    docs/operations.md "NATS users and permissions")."""
    async with Stack(tmp_path / "data", nats_url=embedded_nats.url, services=("vault", "sandbox")) as running:
        yield running


async def test_retry_with_the_same_event_id_has_no_second_effect(open_stack: Stack) -> None:
    stack = open_stack
    user = await _connected_user(stack, "sk-ant-oat01-retry-token")
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        first = await _prepare_until_connected(ccb, "sbx-retry", user)
        creds = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "sbx-retry/.claude/.credentials.json"
        inode_before = creds.stat().st_ino
    # A retry after e.g. a lost connection: JetStream drops the duplicate publish, nothing is
    # written again, and the client still answers with the earlier result.
    async with CcbridgeClient(stack.nats_url_for("platform")) as fresh:
        again = await fresh.prepare_sandbox("sbx-retry", user, event_id=first.cause_event_id, timeout=5)
    assert again == first
    assert creds.stat().st_ino == inode_before


async def test_timeout_is_a_clear_error_when_no_sandbox_service_runs(tmp_path: Path) -> None:
    async with Stack(tmp_path / "data", services=("vault",)) as running:
        async with CcbridgeClient(running.nats_url_for("platform")) as ccb:
            with pytest.raises(CcbridgeTimeout, match="is the ccbridge sandbox service running"):
                await ccb.prepare_sandbox("sbx-timeout", "someone", timeout=1)
