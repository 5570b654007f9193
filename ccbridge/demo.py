"""The whole product flow against the bundled OAuth stand-in, as a person and a platform
would drive it. `ccbridge demo` prints it; the end-to-end tests assert on it."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt

PASTE_CODE = re.compile(r'<code id="paste-code">([^<]+)</code>')


def standin_oauth_env(oauth) -> dict[str, str]:
    """Point auth at the OAuth stand-in, and only at it: no fallback to the real endpoints."""
    return {
        "OAUTH_AUTHORIZE_URL": oauth.authorize_url,
        "OAUTH_CONSOLE_AUTHORIZE_URL": oauth.console_authorize_url,
        "OAUTH_TOKEN_URL": oauth.token_url,
        "OAUTH_TOKEN_URLS": oauth.token_url,
        "OAUTH_REDIRECT_URI": oauth.callback_url,
    }


class BackgroundStandin:
    """The OAuth stand-in on its own event loop in a daemon thread, for `ccbridge up --standin-oauth`:
    it lives and dies with the supervisor process (no child to leave behind).

        standin = BackgroundStandin(standins.oauth, port=0).start()
        standin_oauth_env(standin.server)   # OAUTH_* for the services
        standin.stop()
    """

    def __init__(self, standins_oauth: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """`standins_oauth`: the `standins.oauth` module (a development tool, imported by the caller)."""
        self.server = standins_oauth.OAuthStandin(host=host, port=port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> BackgroundStandin:
        import asyncio
        import threading

        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="oauth-standin", daemon=True)
        self._thread.start()
        self._loop = loop
        asyncio.run_coroutine_threadsafe(self.server.start(), loop).result(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        import asyncio

        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(timeout)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)


def mint_caller_token(secret: str, user_id: str, ttl_s: int = 600) -> str:
    """An HS256 caller token as a platform would mint it for its user (`sub` = user id)."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


def dev_jwt_secret(keys_dir: Path) -> str | None:
    if value := os.environ.get("AUTH_JWT_SECRET"):
        return value
    path = keys_dir / "auth-jwt.secret"
    return path.read_text().strip() if path.exists() else None


@dataclass
class Connected:
    status: int
    body: dict


async def connect_claude_account(http: httpx.AsyncClient, auth_url: str, caller_token: str) -> Connected:
    """Login → open the authorize URL (the stand-in approves and shows `code#state`) → paste it."""
    headers = {"Authorization": f"Bearer {caller_token}"}
    login = await http.post(f"{auth_url}/v1/claude-code/login", headers=headers)
    login.raise_for_status()
    page = await http.get(login.json()["authorize_url"], follow_redirects=True)
    page.raise_for_status()
    match = PASTE_CODE.search(page.text)
    if not match:
        raise RuntimeError("the authorize page showed no code to paste")
    pasted = html.unescape(match.group(1)).strip()
    exchange = await http.post(f"{auth_url}/v1/claude-code/exchange", headers=headers, json={"code": pasted})
    return Connected(exchange.status_code, exchange.json())


async def prepare_when_connected(ccb, sandbox_id: str, user_id: str, *, wait_s: float = 15.0, **kwargs):
    """The vault stores tokens asynchronously after the 202: retry `not_connected` briefly."""
    import asyncio

    deadline = time.monotonic() + wait_s
    while True:  # each try is a new event for the same sandbox
        result = await ccb.prepare_sandbox(sandbox_id, user_id, **kwargs)
        if getattr(result, "reason", None) != "not_connected" or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.2)


def find_claude() -> str | None:
    candidates = [os.environ.get("CLAUDE_BIN", ""), "var/tools/claude/node_modules/.bin/claude"]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(Path(candidate).resolve())
    return shutil.which("claude")


def claude_auth_status(claude_bin: str, home: Path, extra_env: dict[str, str] | None = None) -> dict:
    """`HOME=<home> claude auth status --json`, with no credentials of ours leaking in from env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAUDE_", "ANTHROPIC_"))}
    env.update({"HOME": str(home), "DISABLE_AUTOUPDATER": "1", **(extra_env or {})})
    done = subprocess.run(
        [claude_bin, "auth", "status", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"loggedIn": False, "error": (done.stderr or done.stdout)[-500:]}
