"""`ccbridge connections list`: what operators see — and that no secret is in it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

from ccbridge.client import CcbridgeClient
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.stack import Stack


async def test_connections_list_shows_state_and_no_secret(tmp_path: Path) -> None:
    token = f"sk-ant-oat01-list-{uuid.uuid4().hex}"
    users = [f"list-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    async with Stack(tmp_path / "data", services=("vault",)) as stack:
        nc = await stack.connect_nats("ops")
        try:
            for user in users:
                await connect_user_on_bus(nc, vault_recipient(stack.data_dir / "keys"), user, token)
            async with CcbridgeClient(stack.nats_url, connection=nc) as ccb:
                for user in users:
                    for _ in range(50):
                        if (await ccb.connection_status(user)).connected:
                            break
                        await asyncio.sleep(0.1)
        finally:
            await nc.close()
        env = {**stack.service_env()}
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "ccbridge.cli", "connections", "list", "--json"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        table = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "ccbridge.cli", "connections", "list"],
            capture_output=True, text=True, timeout=60, env={**env, "COLUMNS": "200"},
        )
    assert done.returncode == 0, done.stderr
    rows = {row["user_id"]: row for row in json.loads(done.stdout)}
    assert set(users) <= set(rows)
    assert all(rows[u]["state"] == "connected" and rows[u]["version"] == 1 for u in users)
    assert "user:inference" in rows[users[0]]["scopes"]
    for output in (done.stdout, done.stderr, table.stdout, table.stderr):
        assert token not in output and "sk-ant-ort01" not in output
    assert users[0] in table.stdout and "2 connection(s)" in table.stdout
