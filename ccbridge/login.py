"""`ccbridge login`: the connect flow in a terminal, through the auth service's HTTP API like
any other client. Prints (and where possible opens) the authorize URL, reads the pasted
`code#state`, and reports the result. Never sees a token: the API never returns one."""

from __future__ import annotations

import os
import shutil
import sys
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

UNREACHABLE_HINT = "is the stack running? (`ccbridge up`), or give --auth-url / CCBRIDGE_AUTH_URL"


class LoginError(Exception):
    """A step failed; `message` is for the person, `exit_code` for scripts."""

    def __init__(self, message: str, *, exit_code: int = 1, status: int | None = None, problem: dict | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status
        self.problem = problem or {}


def _human(value: str | None) -> str:
    if not value:
        return "unknown"
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        try:
            when = datetime.fromtimestamp(int(value) / 1000, UTC)
        except (TypeError, ValueError):
            return str(value)
    return when.astimezone().strftime("%Y-%m-%d %H:%M %Z")


@dataclass
class LoginResult:
    status: str
    expires_at: str | None
    """When the *access token* expires (~8 h); the vault refreshes it. Not the login's end."""
    scopes: list[str]
    login_expires_at: str | None = None
    """When the login itself (the refresh token) ends, if the vault knows it (~30 days)."""

    def expires_human(self) -> str:
        return _human(self.expires_at)

    def login_expires_human(self) -> str:
        return _human(self.login_expires_at)

    def summary(self) -> str:
        line = f"access token valid until {self.expires_human()} (the vault renews it)"
        if self.login_expires_at:
            line += f"; the login (refresh) lasts until {self.login_expires_human()}"
        return line


def login_expiry(http: httpx.Client, auth_url: str, caller_token: str, *, wait_s: float = 3.0) -> str | None:
    """When the login (refresh token) ends, from `GET /v1/claude-code/status`: the vault stores the
    tokens a moment after the exchange's 202, so ask a few times within `wait_s`. None if unknown."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            response = http.get(f"{auth_url}/v1/claude-code/status",
                                headers={"Authorization": f"Bearer {caller_token}"}, timeout=2.0)
            body = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            body = {}
        if body.get("connected"):
            return body.get("login_expires_at")
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.25)


def browser_available() -> bool:
    if sys.platform == "darwin" or os.environ.get("BROWSER"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and bool(
        shutil.which("xdg-open") or shutil.which("chromium") or shutil.which("firefox")
    )


def _problem(response: httpx.Response) -> dict:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {}
    except ValueError:
        return {}


def _fail(step: str, response: httpx.Response) -> LoginError:
    problem = _problem(response)
    detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    hints = {
        401: "your caller token was refused: get a fresh one (ccbridge token --user <id>)",
        403: "this login belongs to someone else: start again with `ccbridge login`",
        429: "too many attempts: wait a minute and try again",
        503: "the service is busy or the token endpoint is rate-limited: try again shortly",
    }
    hint = hints.get(response.status_code, "")
    if problem.get("code") == "invalid_code" or "invalid_code" in str(problem.get("type", "")):
        hint = "the code was refused (expired, already used, or mistyped): run `ccbridge login` again"
    message = f"{step} failed (HTTP {response.status_code}): {detail}" + (f"\n  → {hint}" if hint else "")
    return LoginError(message, exit_code=2 if response.status_code < 500 else 3, status=response.status_code, problem=problem)


def run_login(
    http: httpx.Client,
    auth_url: str,
    caller_token: str,
    *,
    read_paste: Callable[[], str],
    show: Callable[[str], None],
    open_browser: bool,
) -> LoginResult:
    headers = {"Authorization": f"Bearer {caller_token}"}
    try:
        started = http.post(f"{auth_url}/v1/claude-code/login", headers=headers)
    except httpx.HTTPError as exc:
        raise LoginError(f"cannot reach the auth service at {auth_url}: {type(exc).__name__} — {UNREACHABLE_HINT}",
                         exit_code=3) from exc
    if started.status_code != 201:
        raise _fail("starting the login", started)
    authorize_url = started.json()["authorize_url"]
    show("Open this URL, sign in to Claude and approve:")
    show(f"  {authorize_url}")
    if open_browser:
        webbrowser.open(authorize_url, new=2)
    show("Then paste the code shown (it looks like <code>#<state>).")
    pasted = read_paste().strip()
    if not pasted:
        raise LoginError("nothing was pasted", exit_code=2)
    try:
        exchanged = http.post(f"{auth_url}/v1/claude-code/exchange", headers=headers, json={"code": pasted})
    except httpx.HTTPError as exc:
        raise LoginError(f"cannot reach the auth service at {auth_url}: {type(exc).__name__} — {UNREACHABLE_HINT}",
                         exit_code=3) from exc
    if exchanged.status_code != 202:
        raise _fail("exchanging the code", exchanged)
    body = exchanged.json()
    return LoginResult(status=body.get("status", "connected"), expires_at=body.get("expires_at"), scopes=body.get("scopes", []))
