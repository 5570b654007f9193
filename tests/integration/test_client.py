"""The platform client against the running services on the stack's own nats-server, which runs
production's NATS users: the client connects as `platform`, gets each sandbox's grant from auth's
route with the person's caller token, and the harness connects people as `auth` would."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from ccbridge.client import CcbridgeClient, CcbridgeTimeout, GrantRefused, request_grant
from ccbridge.demo import dev_jwt_secret, mint_caller_token
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack
from shared.events import SandboxCredentialsFailed, SandboxCredentialsInjected


@pytest.fixture
async def stack(tmp_path: Path):
    # The stack's own (private) nats-server: these tests must not share durable consumers with others.
    async with Stack(tmp_path / "data", services=("vault", "sandbox", "auth"), auth_port=free_port(),
                     env=GRANT_LIMITS) as running:
        yield running


# grants for many sandboxes of few people, fast: auth's per-caller grant rate limit raised
GRANT_LIMITS = {"AUTH_GRANT_RATE_LIMIT_PER_MINUTE": "6000", "AUTH_GRANT_RATE_LIMIT_BURST": "1000"}


async def _grant(stack: Stack, user: str, sandbox_id: str, **kwargs) -> str:
    secret = dev_jwt_secret(stack.data_dir / "keys")
    assert secret, "auth writes its dev secret at start"
    return (await request_grant(stack.auth_url, mint_caller_token(secret, user), sandbox_id, **kwargs)).token


async def _connected_user(stack: Stack, token: str) -> str:
    user = f"user-{uuid.uuid4().hex[:8]}"
    nc = await stack.connect_nats("auth")  # tokens.issued is auth's to publish
    try:
        await connect_user_on_bus(nc, vault_recipient(stack.data_dir / "keys"), user, token)
    finally:
        await nc.close()
    return user


async def _prepare_until_connected(ccb: CcbridgeClient, stack: Stack, sandbox_id: str, user: str, **kwargs):
    grant = await _grant(stack, user, sandbox_id, mode=kwargs.get("mode"))
    for _ in range(50):  # the vault stores asynchronously
        result = await ccb.prepare_sandbox(sandbox_id, user, grant=grant, **kwargs)
        if not (isinstance(result, SandboxCredentialsFailed) and result.reason == "not_connected"):
            return result
        await asyncio.sleep(0.1)
    raise AssertionError("the vault never stored the connection")


async def test_prepare_sandbox_returns_injected_and_files_exist(stack: Stack) -> None:
    user = await _connected_user(stack, "sk-ant-oat01-client-test-token")
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        result = await _prepare_until_connected(ccb, stack, "sbx-client-1", user, mode="access_only")
    assert isinstance(result, SandboxCredentialsInjected)
    assert result.mode == "access_only" and result.sandbox_id == "sbx-client-1"
    creds = json.loads((Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "sbx-client-1/.claude/.credentials.json").read_text())
    assert creds["claudeAiOauth"]["accessToken"] == "sk-ant-oat01-client-test-token"
    assert "refreshToken" not in creds["claudeAiOauth"]


async def test_unknown_user_gets_a_typed_failure(stack: Stack) -> None:
    nobody = f"nobody-{uuid.uuid4().hex[:6]}"
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        result = await ccb.prepare_sandbox("sbx-nobody", nobody, grant=await _grant(stack, nobody, "sbx-nobody"),
                                           timeout=15)
    assert isinstance(result, SandboxCredentialsFailed)
    assert result.reason == "not_connected" and not result.retryable


async def test_without_the_persons_grant_nothing_is_injected(stack: Stack) -> None:
    """A publisher of sandbox.created (the platform, or whoever holds its credentials) cannot
    put a person's credentials into a sandbox that person did not grant."""
    victim = await _connected_user(stack, "sk-ant-oat01-victim-of-a-platform")
    mallory = f"mallory-{uuid.uuid4().hex[:6]}"
    root = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"])
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        assert (await _prepare_until_connected(ccb, stack, "sbx-victim", victim)).__class__ is SandboxCredentialsInjected
        attempts = {
            "grant_required": None,
            "grant_invalid": await _grant(stack, mallory, "sbx-attacker"),  # somebody else's grant
        }
        for reason, grant in attempts.items():
            result = await ccb.prepare_sandbox("sbx-attacker", victim, grant=grant, timeout=15)
            assert isinstance(result, SandboxCredentialsFailed) and result.reason == reason, result
        # the victim's grant names ITS sandbox: replayed for another one it is refused
        replay = await _grant(stack, victim, "sbx-victim")
        result = await ccb.prepare_sandbox("sbx-attacker", victim, grant=replay, timeout=15)
        assert isinstance(result, SandboxCredentialsFailed) and result.reason == "grant_invalid"
    assert not (root / "sbx-attacker").exists()
    with pytest.raises(GrantRefused) as refused:  # and auth grants nothing without a caller token
        await request_grant(stack.auth_url, "not-a-jwt", "sbx-attacker")
    assert refused.value.status == 401


async def test_many_concurrent_calls_on_one_connection(stack: Stack) -> None:
    users = [await _connected_user(stack, f"sk-ant-oat01-concurrent-{i:02d}") for i in range(3)]
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        await _prepare_until_connected(ccb, stack, "sbx-warmup", users[-1])
        grants = [await _grant(stack, users[i % 3], f"sbx-many-{i}") for i in range(30)]
        calls = [ccb.prepare_sandbox(f"sbx-many-{i}", users[i % 3], grant=grants[i], timeout=30) for i in range(30)]
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
    async with Stack(tmp_path / "data", nats_url=embedded_nats.url, services=("vault", "sandbox", "auth"),
                     auth_port=free_port(), env=GRANT_LIMITS) as running:
        yield running


async def test_retry_with_the_same_event_id_has_no_second_effect(open_stack: Stack) -> None:
    stack = open_stack
    user = await _connected_user(stack, "sk-ant-oat01-retry-token")
    async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
        first = await _prepare_until_connected(ccb, stack, "sbx-retry", user)
        creds = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "sbx-retry/.claude/.credentials.json"
        inode_before = creds.stat().st_ino
    # A retry after e.g. a lost connection: JetStream drops the duplicate publish, nothing is
    # written again, and the client still answers with the earlier result.
    async with CcbridgeClient(stack.nats_url_for("platform")) as fresh:
        again = await fresh.prepare_sandbox("sbx-retry", user, event_id=first.cause_event_id, timeout=5,
                                            grant=await _grant(stack, user, "sbx-retry"))
    assert again == first
    assert creds.stat().st_ino == inode_before


async def test_timeout_is_a_clear_error_when_no_sandbox_service_runs(tmp_path: Path) -> None:
    async with Stack(tmp_path / "data", services=("vault",)) as running:
        async with CcbridgeClient(running.nats_url_for("platform")) as ccb:
            with pytest.raises(CcbridgeTimeout, match="is the ccbridge sandbox service running"):
                await ccb.prepare_sandbox("sbx-timeout", "someone", timeout=1)


async def test_an_unreachable_nats_raises_unavailable_within_the_connect_timeout() -> None:
    """No two-minute reconnect loop, no traceback per attempt: CcbridgeUnavailable, in time."""
    import socket
    import time

    from ccbridge.client import CcbridgeUnavailable

    silent = socket.socket()  # accepts, never answers: only a bounded connect gets past it
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        for port in (free_port(), silent.getsockname()[1]):
            started = time.monotonic()
            with pytest.raises(CcbridgeUnavailable) as caught:
                async with CcbridgeClient(f"nats://platform:s3cret@127.0.0.1:{port}", connect_timeout=2):
                    pass
            assert time.monotonic() - started < 3.5
            assert f"127.0.0.1:{port}" in str(caught.value) and "s3cret" not in str(caught.value)
    finally:
        silent.close()
