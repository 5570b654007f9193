"""The whole flow under the least-privilege NATS users of deploy/nats: every service connects as
its own user, a platform user publishes sandbox.created and reads the result, and a person
connects through auth's HTTP API. (test_nats_permissions.py proves what each user may NOT do.)"""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

import httpx
import pytest

from ccbridge.client import CcbridgeClient
from ccbridge.demo import connect_claude_account, mint_caller_token, prepare_when_connected, standin_oauth_env
from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack
from shared.events import SandboxCredentialsInjected
from standins.oauth import OAuthStandin
from tests.nats_perms_fixtures import SecuredNats

pytestmark = pytest.mark.e2e


async def test_flow_works_with_one_nats_user_per_service(tmp_path: Path) -> None:
    jwt_secret = secrets.token_urlsafe(32)
    user = f"lp-{uuid.uuid4().hex[:6]}"
    with SecuredNats.start(tmp_path / "nats") as server:
        async with OAuthStandin(port=0) as oauth:
            stack = Stack(
                tmp_path / "data",
                nats_url=server.url("ops"),  # the stack runner's own readiness checks
                env={"AUTH_JWT_SECRET": jwt_secret, **standin_oauth_env(oauth)},
                per_service_env={name: {"NATS_URL": server.url(name)} for name in ("auth", "vault", "sandbox")},
                auth_port=free_port(),
            )
            async with stack:
                async with httpx.AsyncClient(timeout=30) as http:
                    connected = await connect_claude_account(http, stack.auth_url, mint_caller_token(jwt_secret, user))
                    assert connected.status == 202, connected.body
                    async with CcbridgeClient(server.url("platform")) as ccb:
                        result = await prepare_when_connected(ccb, "sbx-lp", user, timeout=30)
                    # auth asks the vault over vault.connections.status with its own user
                    status = await http.get(f"{stack.auth_url}/v1/claude-code/status",
                                            headers={"Authorization": f"Bearer {mint_caller_token(jwt_secret, user)}"})
                logs = "".join(p.read_text(errors="replace") for p in stack.log_dir.glob("*.log"))
    assert isinstance(result, SandboxCredentialsInjected), result
    assert status.status_code == 200 and status.json()["connected"] is True
    home = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "sbx-lp"
    assert json.loads((home / ".claude/.credentials.json").read_text())["claudeAiOauth"]["accessToken"].startswith("sk-ant-oat01-")
    assert "Permissions Violation" not in logs and "permissions violation" not in logs.lower()
