"""examples/agent_platform.py, run as a platform team would run it, against the running stack."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import pytest

from ccbridge.demo import dev_jwt_secret, mint_caller_token
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


async def test_example_prepares_a_sandbox_the_real_cli_accepts(tmp_path: Path, embedded_nats, claude_bin: str) -> None:
    user = f"example-{uuid.uuid4().hex[:6]}"
    async with Stack(tmp_path / "data", nats_url=embedded_nats.url, auth_port=free_port()) as stack:
        nc = await nats.connect(stack.nats_url)
        await connect_user_on_bus(nc, vault_recipient(stack.data_dir / "keys"), user, "sk-ant-oat01-example-token")
        await nc.close()
        secret = dev_jwt_secret(stack.data_dir / "keys")
        assert secret
        env = {**os.environ, "NATS_URL": stack.nats_url, "CLAUDE_BIN": claude_bin,
               "CCBRIDGE_AUTH_URL": stack.auth_url, "CCBRIDGE_TOKEN": mint_caller_token(secret, user),
               "LOCAL_SANDBOX_ROOT": stack.service_env()["LOCAL_SANDBOX_ROOT"]}
        done = None
        for _ in range(20):  # the vault stores the connection asynchronously
            done = subprocess.run([sys.executable, "examples/agent_platform.py", "--user", user], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=180)
            if "not_connected" not in done.stdout + done.stderr:
                break
    assert done is not None and done.returncode == 0, done.stdout + done.stderr
    assert "ready: access_only credentials" in done.stdout
    assert '"loggedIn": true' in done.stdout
    assert "skipped `claude -p`" in done.stdout
