"""`ccbridge login` and `ccbridge sandbox create` as a person runs them, against the running stack
(its own nats-server, production's NATS users: `sandbox create` connects as `platform`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from ccbridge.demo import PASTE_CODE, mint_caller_token, standin_oauth_env
from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack
from standins.oauth import OAuthStandin
from tests.grants import stack_grant

pytestmark = pytest.mark.e2e
CCBRIDGE = [sys.executable, "-m", "ccbridge.cli"]


@pytest.fixture
async def running(tmp_path: Path):
    secret = secrets.token_urlsafe(32)
    async with OAuthStandin(port=0) as oauth:
        env = {
            "AUTH_JWT_SECRET": secret,
            **standin_oauth_env(oauth),
        }
        async with Stack(tmp_path / "data", env=env, auth_port=free_port()) as stack:
            yield stack, secret


def _login(stack: Stack, token: str, paste: str | None, *, as_json: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ccbridge login --json`; read the URL it prints, approve it at the stand-in, paste."""
    proc = subprocess.Popen(
        [*CCBRIDGE, "login", "--auth-url", stack.auth_url, "--token", token, "--no-browser",
         *(["--json"] if as_json else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "500"},
    )
    url = None
    for line in proc.stderr:
        if match := re.search(r"(http://\S+/oauth/authorize\S+)", line):
            url = match.group(1)
            break
    if not url:
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"ccbridge login printed no authorize URL: {out} {err}")
    if paste is None:
        page = httpx.get(url, follow_redirects=True, timeout=10)
        paste = PASTE_CODE.search(page.text).group(1)
    out, err = proc.communicate(paste + "\n", timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


async def test_terminal_login_connects_and_reports_expiry(running) -> None:
    stack, secret = running
    done = await asyncio.to_thread(_login, stack, mint_caller_token(secret, f"cli-{uuid.uuid4().hex[:6]}"), paste=None)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["status"] == "connected"
    assert "user:inference" in result["scopes"] and result["expires_at"]
    assert "sk-ant-" not in done.stdout + done.stderr
    # `expires_at` is the access token's (~8 h); the login's own end is a separate, later date
    assert result["access_token_expires_at"] == result["expires_at"]
    assert result["login_expires_at"] and result["login_expires_at"] > result["expires_at"]


async def test_terminal_login_says_which_expiry_is_which(running) -> None:
    stack, secret = running
    done = await asyncio.to_thread(_login, stack, mint_caller_token(secret, f"cli-{uuid.uuid4().hex[:6]}"), None,
                                   as_json=False)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stderr.split())
    assert "access token valid until" in text and "the login (refresh) lasts until" in text, text
    assert "Access valid until" not in text


async def test_terminal_login_wrong_paste_is_a_clear_error(running) -> None:
    stack, secret = running
    done = await asyncio.to_thread(_login, stack, mint_caller_token(secret, "cli-wrong"), paste="not-a-code#not-a-state")
    assert done.returncode == 2
    result = json.loads(done.stdout)
    assert result["ok"] is False and result["status"] == 400
    assert "exchanging the code failed" in result["error"]


async def test_terminal_login_bad_token_exit_code(running) -> None:
    stack, _ = running
    done = await asyncio.to_thread(
        subprocess.run,
        [*CCBRIDGE, "login", "--auth-url", stack.auth_url, "--token", "not-a-jwt", "--json", "--no-browser"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert json.loads(done.stdout)["status"] == 401


async def test_sandbox_create_exit_codes(running) -> None:
    stack, secret = running
    # the CLI asks auth for the person's grant with a caller token it mints from the dev secret
    env = {**os.environ, "NATS_URL": stack.nats_url_for("platform"), "CCBRIDGE_AUTH_URL": stack.auth_url,
           "AUTH_JWT_SECRET": secret}
    user = f"cli-{uuid.uuid4().hex[:6]}"
    not_connected = await asyncio.to_thread(
        subprocess.run,
        [*CCBRIDGE, "sandbox", "create", "--user", user, "--sandbox-id", "cli-sbx-1", "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert not_connected.returncode == 1
    assert json.loads(not_connected.stdout)["reason"] == "not_connected"

    assert (await asyncio.to_thread(_login, stack, mint_caller_token(secret, user), None)).returncode == 0
    for _ in range(20):  # the vault stores asynchronously after the 202
        ready = await asyncio.to_thread(
            subprocess.run,
            [*CCBRIDGE, "sandbox", "create", "--user", user, "--sandbox-id", "cli-sbx-2", "--json"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        if ready.returncode == 0:
            break
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert json.loads(ready.stdout)["mode"] == "access_only"  # the default: the refresh token stays in the vault
    assert (Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "cli-sbx-2/.claude/.credentials.json").exists()

    # the person's genuine grant, but for another sandbox: refused (exit 1), nothing written
    other_grant = await stack_grant(stack, user, "cli-sbx-2")
    other = await asyncio.to_thread(
        subprocess.run,
        [*CCBRIDGE, "sandbox", "create", "--user", user, "--sandbox-id", "cli-sbx-3", "--json", "--grant", other_grant],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert other.returncode == 1 and json.loads(other.stdout)["reason"] == "grant_invalid", other.stdout
    assert not (Path(stack.service_env()["LOCAL_SANDBOX_ROOT"]) / "cli-sbx-3").exists()
