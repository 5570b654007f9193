"""The whole flow under the least-privilege NATS users of deploy/nats: every service connects as
its own user, a platform user publishes sandbox.created and reads the result, and a person
connects through auth's HTTP API. (test_nats_permissions.py proves what each user may NOT do.)
And `ccbridge up`'s own embedded nats-server (Stack without NATS_URL) enforces the same model."""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import uuid
from pathlib import Path

import httpx
import nats
import pytest

from ccbridge.client import CcbridgeClient, request_grant
from ccbridge.demo import connect_claude_account, mint_caller_token, prepare_when_connected, standin_oauth_env
from ccbridge.devtools import connect_user_on_bus, vault_recipient
from ccbridge.embedded_nats import free_port
from ccbridge.nats_users import nats_url_for
from ccbridge.stack import Stack
from shared import subjects as s
from shared.broker import settle
from shared.events import CredentialsReply, CredentialsRequest, SandboxCredentialsInjected
from shared.subjects import inbox_prefix
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
                    grant = await request_grant(stack.auth_url, mint_caller_token(jwt_secret, user), "sbx-lp")
                    async with CcbridgeClient(server.url("platform")) as ccb:
                        result = await prepare_when_connected(ccb, "sbx-lp", user, timeout=30, grant=grant.token)
                    # auth asks the vault over vault.connections.status with its own user
                    status = await http.get(f"{stack.auth_url}/v1/claude-code/status",
                                            headers={"Authorization": f"Bearer {mint_caller_token(jwt_secret, user)}"})
                logs = "".join(p.read_text(errors="replace") for p in stack.log_dir.glob("*.log"))
    assert isinstance(result, SandboxCredentialsInjected), result
    assert status.status_code == 200 and status.json()["connected"] is True
    home = Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "sbx-lp"
    credentials = json.loads((home / ".claude/.credentials.json").read_text())
    assert credentials["claudeAiOauth"]["accessToken"].startswith("sk-ant-oat01-")
    assert "Permissions Violation" not in logs and "permissions violation" not in logs.lower()


# --- `ccbridge up`: the embedded nats-server runs the same users and permissions -----------------
class Watched:
    """A connection as one NATS user, with the errors (permission violations) the server sent it."""

    def __init__(self, user: str) -> None:
        self.user, self.errors = user, []

    async def connect(self, stack: Stack) -> nats.NATS:
        async def on_error(error: Exception) -> None:
            self.errors.append(str(error).lower())

        return await nats.connect(stack.nats_url_for(self.user), inbox_prefix=inbox_prefix(self.user),
                                  error_cb=on_error, allow_reconnect=False)

    async def refused(self, verb: str, subject: str) -> bool:
        needle = f'permissions violation for {verb} to "{subject.lower()}"'
        for _ in range(100):
            if any(needle in e for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


async def test_the_dev_stack_enforces_the_production_permissions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with Stack(data, services=("vault", "sandbox")) as stack:
        assert stack.nats is not None and stack.nats_url == stack.nats_url_for("ops")
        # the services run as their own users (their logs would show a refused subscription)
        users = json.loads(stack.nats_users_file.read_text())
        assert set(users["passwords"]) == {"auth", "vault", "sandbox", "platform", "ops"}
        for path in (stack.nats_users_file, *(data / "nats" / "conf").iterdir()):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        with pytest.raises(Exception):  # noqa: B017 - no anonymous access
            await nats.connect(stack.nats.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)

        platform, sandbox, auth = Watched("platform"), Watched("sandbox"), Watched("auth")
        pnc, snc, anc = await platform.connect(stack), await sandbox.connect(stack), await auth.connect(stack)
        try:
            # the platform may not read the vault's replies (fetched, sealed tokens.issued) nor the subject
            spies = [await pnc.subscribe(f"{inbox_prefix('vault')}.>"), await pnc.subscribe(s.TOKENS_ISSUED),
                     await pnc.subscribe("_INBOX.>")]
            assert await platform.refused("subscription", f"{inbox_prefix('vault')}.>")
            assert await platform.refused("subscription", s.TOKENS_ISSUED)
            assert await platform.refused("subscription", "_INBOX.>")
            # the sandbox user may not answer vault.credentials.get
            impostor = await snc.subscribe(s.VAULT_CREDENTIALS_GET, queue=s.VAULT_QUEUE)
            assert await sandbox.refused("subscription", s.VAULT_CREDENTIALS_GET)

            # real traffic meanwhile: auth's sealed tokens reach the vault, the vault answers the sandbox
            user = f"dev-{uuid.uuid4().hex[:6]}"
            await connect_user_on_bus(anc, vault_recipient(data / "keys"), user, "sk-ant-oat01-dev-stack")
            async with CcbridgeClient("", connection=pnc) as ccb:
                for _ in range(50):
                    if (await ccb.connection_status(user)).connected:
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail("the vault never stored the connection")
            request = CredentialsRequest(user_id=user, requester_key_id="nobody", requester_public_key="AAAA")
            reply = await snc.request(s.VAULT_CREDENTIALS_GET, request.model_dump_json().encode(), timeout=10)
            assert CredentialsReply.model_validate_json(reply.data).request_id == request.request_id  # the vault's
            for conn in (pnc, snc):
                await settle(conn)
            assert [sub.pending_msgs for sub in (*spies, impostor)] == [0, 0, 0, 0]
            assert auth.errors == []
        finally:
            for conn in (pnc, snc, anc):
                await conn.close()
        logs = "".join(p.read_text(errors="replace") for p in stack.log_dir.glob("*.log") if p.name != "nats-server.log")
        passwords = users["passwords"]
    assert "permissions violation" not in logs.lower()
    assert not any(password in logs for password in passwords.values())

    # a restart of the same data dir keeps the passwords (external clients keep their URLs)
    async with Stack(data, services=()) as again:
        assert again.nats_passwords == passwords
        assert json.loads(again.nats_users_file.read_text())["server"] == again.nats.url
        assert nats_url_for(data, "platform") == again.nats_url_for("platform")
    assert json.loads(again.nats_users_file.read_text())["server"] is None
