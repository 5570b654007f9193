"""Grants end to end on the real processes (auth, vault, sandbox service) and the stack's own
nats-server with production's users: a person's grant lets credentials into one sandbox; ending
it, or its expiry, scrubs that sandbox; a newer grant extends a live sandbox's lease."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from ccbridge.client import CcbridgeClient
from ccbridge.demo import dev_jwt_secret, mint_caller_token
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack
from shared import subjects
from shared.broker import settle
from shared.events import SandboxCredentialsFailed, SandboxCredentialsInjected
from tests import grants

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    env = {**grants.env(), "VAULT_LEASE_SWEEP_INTERVAL_S": "0.3",  # the vault also trusts the test authority
           "AUTH_READ_RATE_LIMIT_PER_MINUTE": "6000", "AUTH_READ_RATE_LIMIT_BURST": "1000"}  # the test polls
    async with Stack(tmp_path / "data", env=env, auth_port=free_port()) as running:
        yield running


class Results:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def on_msg(self, msg: Any) -> None:
        self.seen.append((msg.subject, json.loads(msg.data)))

    def of(self, subject: str, sandbox_id: str) -> list[dict[str, Any]]:
        return [body for s, body in self.seen if s == subject and body.get("sandbox_id") == sandbox_id]

    async def wait(self, subject: str, sandbox_id: str, timeout: float = 30.0) -> dict[str, Any]:
        for _ in range(int(timeout / 0.1)):
            if found := self.of(subject, sandbox_id):
                return found[-1]
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {subject} for {sandbox_id}")


async def _connected(stack: Stack) -> str:
    user = f"grants-{uuid.uuid4().hex[:6]}"
    nc = await stack.connect_nats("auth")
    try:
        await connect_user_on_bus(nc, vault_recipient(stack.data_dir / "keys"), user, f"sk-ant-oat01-{user}")
    finally:
        await nc.close()
    return user


async def _prepare(ccb: CcbridgeClient, sandbox_id: str, user: str, grant: str) -> Any:
    for _ in range(50):  # the vault stores the connection asynchronously
        result = await ccb.prepare_sandbox(sandbox_id, user, grant=grant, timeout=20)
        if not (isinstance(result, SandboxCredentialsFailed) and result.reason == "not_connected"):
            return result
        await asyncio.sleep(0.1)
    raise AssertionError("the vault never stored the connection")


async def test_end_expiry_and_extension_of_a_lease(stack: Stack) -> None:
    user = await _connected(stack)
    caller = {"Authorization": f"Bearer {mint_caller_token(dev_jwt_secret(stack.data_dir / 'keys') or '', user)}"}
    root = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"])
    results = Results()
    spy = await stack.connect_nats("ops")
    await spy.subscribe("sandbox.credentials.*", cb=results.on_msg)
    await settle(spy)
    try:
        async with httpx.AsyncClient(base_url=stack.auth_url, headers=caller, timeout=10) as http, \
                CcbridgeClient(stack.nats_url_for("platform")) as ccb:
            # --- ended by the person: DELETE → grants.ended → scrubbed, and the grant is void
            made = await http.post("/v1/claude-code/grants", json={"sandbox_id": "sbx-end", "ttl_s": 600})
            assert made.status_code == 201, made.text
            ended_grant = made.json()["grant"]
            assert isinstance(await _prepare(ccb, "sbx-end", user, ended_grant), SandboxCredentialsInjected)
            listed = (await http.get("/v1/claude-code/grants")).json()["grants"]
            assert [g["sandbox_id"] for g in listed] == ["sbx-end"]
            assert (await http.delete("/v1/claude-code/grants/sbx-end")).status_code == 204
            scrubbed = await results.wait(subjects.SANDBOX_CREDENTIALS_SCRUBBED, "sbx-end")
            assert scrubbed["reason"] == "grant_ended"
            assert not (root / "sbx-end/.claude/.credentials.json").exists()
            again = await ccb.prepare_sandbox("sbx-end", user, grant=ended_grant, timeout=20)
            assert isinstance(again, SandboxCredentialsFailed) and again.reason == "grant_invalid"
            assert not (root / "sbx-end/.claude/.credentials.json").exists()
            assert (await http.get("/v1/claude-code/grants")).json()["grants"] == []

            # --- expired: the vault's sweeper ends it at its expiry, the sandbox is scrubbed
            short = grants.grant_for(user, "sbx-expire", "access_only", ttl_s=3)
            assert isinstance(await _prepare(ccb, "sbx-expire", user, short), SandboxCredentialsInjected)
            expired = await results.wait(subjects.SANDBOX_CREDENTIALS_SCRUBBED, "sbx-expire")
            assert expired["reason"] == "lease_expired"
            assert not (root / "sbx-expire/.claude/.credentials.json").exists()

            # --- extended: a newer grant for a live sandbox reaches the vault (grants.issued);
            # the sandbox outlives its first grant and is not scrubbed
            first = grants.grant_for(user, "sbx-extend", "access_only", ttl_s=3)
            assert isinstance(await _prepare(ccb, "sbx-extend", user, first), SandboxCredentialsInjected)
            longer = await http.post("/v1/claude-code/grants", json={"sandbox_id": "sbx-extend", "ttl_s": 600})
            assert longer.status_code == 201

            until = datetime.fromisoformat(longer.json()["expires_at"])

            async def lease_extended() -> bool:
                listed = (await http.get("/v1/claude-code/grants")).json()["grants"]
                return any(g["sandbox_id"] == "sbx-extend" and datetime.fromisoformat(g["expires_at"]) == until
                           for g in listed)

            for _ in range(100):
                if await lease_extended():
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the newer grant never reached the vault")
            await asyncio.sleep(4)  # past the first grant's expiry, several sweeps later
            assert results.of(subjects.SANDBOX_CREDENTIALS_SCRUBBED, "sbx-extend") == []
            assert (root / "sbx-extend/.claude/.credentials.json").exists()
            # the sandbox still presents its first (expired) grant; the vault applies the newer lease
            reinjected = await ccb.prepare_sandbox("sbx-extend", user, grant=first, timeout=20)
            assert isinstance(reinjected, SandboxCredentialsInjected), reinjected
    finally:
        await spy.close()
