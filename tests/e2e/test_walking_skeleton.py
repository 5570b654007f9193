"""The walking skeleton end to end, with every part real: the stack as separate processes on its
own nats-server (production's NATS users and permissions, as `ccbridge up` runs it), the OAuth
stand-in over HTTP, a real SQLite file and the real Claude Code CLI.

A canary access token goes through the whole flow; afterwards it must be found only inside the
sandbox's credentials file: not on any bus subject, not in the database, not in any log.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import time
import uuid
from pathlib import Path

import httpx
import nats
import pytest

from ccbridge.client import CcbridgeClient
from ccbridge.demo import (
    claude_auth_status,
    connect_claude_account,
    mint_caller_token,
    prepare_when_connected,
    standin_oauth_env,
)
from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack
from shared.broker import settle
from shared.events import SandboxCredentialsInjected
from standins.oauth import OAuthStandin
from tests.grants import stack_grant

pytestmark = pytest.mark.e2e

CANARY = f"sk-ant-oat01-CANARY{secrets.token_hex(16)}"


async def test_login_to_injected_home_accepted_by_real_cli(tmp_path: Path, claude_bin: str) -> None:
    jwt_secret = secrets.token_urlsafe(32)
    user = f"user-{uuid.uuid4().hex[:8]}"
    sandbox_id = f"sbx-{uuid.uuid4().hex[:8]}"
    captured: list[bytes] = []

    async with OAuthStandin(port=0, access_token_factory=lambda: CANARY) as oauth:
        env = {
            "AUTH_JWT_SECRET": jwt_secret,
            **standin_oauth_env(oauth),
            "LOG_LEVEL": "DEBUG",
        }
        async with Stack(tmp_path / "data", env=env, auth_port=free_port()) as stack:
            spy = await stack.connect_nats("ops")  # only ops may listen to everything

            async def capture(msg: nats.aio.msg.Msg) -> None:
                captured.append(msg.subject.encode() + b" " + json.dumps(msg.headers or {}).encode() + b" " + msg.data)

            await spy.subscribe(">", cb=capture)
            await settle(spy)
            try:
                async with httpx.AsyncClient(timeout=30) as http:
                    connected = await connect_claude_account(http, stack.auth_url, mint_caller_token(jwt_secret, user))
                assert connected.status == 202, connected.body
                assert connected.body["status"] == "connected"
                assert "user:inference" in connected.body["scopes"]
                assert CANARY not in json.dumps(connected.body)

                async with CcbridgeClient(stack.nats_url_for("platform")) as ccb:
                    grant = await stack_grant(stack, user, sandbox_id)
                    result = await prepare_when_connected(ccb, sandbox_id, user, timeout=30, grant=grant)
                assert isinstance(result, SandboxCredentialsInjected), result
                assert result.mode == "access_only"  # the default: the login's refresh token stays in the vault
                await spy.flush()
                await asyncio.sleep(0.3)  # let the spy drain what was already in flight
            finally:
                await spy.close()

        home = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / sandbox_id
        credentials_file = home / ".claude" / ".credentials.json"
        assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((home / ".claude").stat().st_mode) == 0o700
        oauth_blob = json.loads(credentials_file.read_text())["claudeAiOauth"]
        assert oauth_blob["accessToken"] == CANARY
        assert "refreshToken" not in oauth_blob
        assert oauth_blob["expiresAt"] > (time.time() + 3600) * 1000  # ms epoch, hours ahead
        assert "user:inference" in oauth_blob["scopes"]
        assert json.loads((home / ".claude.json").read_text())["hasCompletedOnboarding"] is True
        assert json.loads((home / ".claude" / "settings.json").read_text())["skipDangerousModePermissionPrompt"] is True

        status = claude_auth_status(claude_bin, home)  # the real CLI accepts the default (access-only) home
        assert status["loggedIn"] is True, status
        assert status["authMethod"] == "claude.ai"

        # --- the canary scan -------------------------------------------------------
        assert captured, "the spy saw no bus traffic at all"
        assert any(b"tokens.issued" in m for m in captured)
        leaks = [m[:80] for m in captured if CANARY.encode() in m]
        assert not leaks, f"canary on the bus: {leaks}"
        scanned = 0
        for path in (tmp_path / "data").rglob("*"):
            if path.is_file() and path != credentials_file:
                scanned += 1
                assert CANARY.encode() not in path.read_bytes(), f"canary leaked into {path}"
        assert scanned >= 4  # database, its journal or WAL, logs, keys
        log_text = "".join(p.read_text(errors="replace") for p in (tmp_path / "data" / "logs").glob("*.log"))
        assert "tokens.issued" in log_text or "injected" in log_text, "services logged nothing: the scan proves nothing"
        # each service ran as its own NATS user without one refusal, and no password reached a log
        assert "permissions violation" not in log_text.lower()
        assert not [user for user, password in stack.nats_passwords.items() if password in log_text]
