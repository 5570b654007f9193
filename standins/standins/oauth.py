"""A loopback stand-in for Anthropic's OAuth server, close enough to the real one that the auth
service (and the real Claude Code CLI, pointed at it) cannot tell the difference in the flows
ccbridge uses. Facts it copies are in docs/design (authorize query, manual-redirect page showing
`<code>#<state>`, JSON-only token endpoint, PKCE S256, refresh-token rotation, and the revoke call
`claude auth logout` makes: `POST <token URL>/revoke` `{"token", "token_type_hint", "client_id"}`,
which ends the whole login).

    async with OAuthStandin(port=0, access_token_factory=lambda: CANARY) as oauth:
        oauth.authorize_url, oauth.token_url, oauth.callback_url
        oauth.state.fail_next(429, times=1)        # failure injection
        oauth.state.outage(60, status=503)         # token + revoke answer 503 for a minute
        oauth.state.stats                          # also GET /_standin/stats

Seed-era clients (`POST /user-settings/mcp/claude-code`) used their PKCE verifier as the OAuth
`state`; nothing special is needed here: the authorize page then shows `code#verifier`, and the
exchange carries the verifier as both `code_verifier` and `state`, which match the grant.

`ccbridge standin-oauth` runs it by hand (`run_oauth_standin(host, port)`).
Test-only routes live under `/_standin/`: `GET /_standin/stats`; `POST /_standin/failures`
`{"status", "times"?, "body"?, "headers"?}` (the next responses); `POST /_standin/outage`
`{"seconds", "status"?: 503, "retry_after"?: <s>}` — the token and revoke endpoints answer
`status` (with `Retry-After` when given) until `seconds` have passed; `{"seconds": 0}` ends it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from shared.health import EmbeddedServer, bind_socket

REAL_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
KNOWN_SCOPES = frozenset(
    {
        "user:profile",
        "user:inference",
        "user:sessions:claude_code",
        "user:mcp_servers",
        "user:file_upload",
        "org:create_api_key",
    }
)
AUTHORIZE_PATH = "/oauth/authorize"  # platform.claude.com/oauth/authorize: Console accounts
CAI_AUTHORIZE_PATH = "/cai/oauth/authorize"  # claude.com/cai/oauth/authorize: Claude.ai accounts
CALLBACK_PATH = "/oauth/code/callback"
TOKEN_PATH = "/v1/oauth/token"
REVOKE_PATH = f"{TOKEN_PATH}/revoke"
PROFILE_PATH = "/api/oauth/profile"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def _new_access_token() -> str:
    return f"sk-ant-oat01-{secrets.token_urlsafe(72)}"


def _new_refresh_token() -> str:
    return f"sk-ant-ort01-{secrets.token_urlsafe(72)}"


@dataclass
class Grant:
    code: str
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    code_challenge: str
    state: str
    issued_at: float
    used: bool = False
    authorize_path: str = AUTHORIZE_PATH


@dataclass
class Login:
    """One consented login: refresh tokens rotate inside it; it ends `refresh_token_lifetime`
    after consent (refreshing does not extend it, as with the real server)."""

    login_id: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: float
    account: dict[str, Any]
    organization: dict[str, Any]


@dataclass
class AccessRecord:
    login_id: str
    scopes: tuple[str, ...]
    expires_at: float


@dataclass
class InjectedFailure:
    status: int
    body: dict[str, Any] | str
    headers: dict[str, str]


@dataclass
class StandinState:
    """Everything the server knows; tests read and steer it directly (same process) or over
    `/_standin/*` (another process)."""

    client_id: str = REAL_CLIENT_ID
    access_token_lifetime: int = 28_800
    refresh_token_lifetime: int = 2_592_000
    code_lifetime: float = 300.0
    access_token_factory: Callable[[], str] = _new_access_token
    refresh_token_factory: Callable[[], str] = _new_refresh_token
    allowed_redirect_uris: frozenset[str] | None = None  # None: any absolute http(s) URI
    account: dict[str, Any] = field(
        default_factory=lambda: {"uuid": str(uuid.uuid4()), "email_address": "standin@example.com"}
    )
    organization: dict[str, Any] = field(
        default_factory=lambda: {"uuid": str(uuid.uuid4()), "name": "Stand-in Org"}
    )
    clock: Callable[[], float] = time.time

    grants: dict[str, Grant] = field(default_factory=dict)
    logins: dict[str, Login] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # live refresh token -> login id
    access_tokens: dict[str, AccessRecord] = field(default_factory=dict)
    failures: deque[InjectedFailure] = field(default_factory=deque)
    down_until: float = 0.0  # time.monotonic() deadline of an outage (see `outage`)
    down_failure: InjectedFailure | None = None
    revocations: list[dict[str, Any]] = field(default_factory=list)  # bodies of accepted revoke calls
    stats: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        body: dict[str, Any] | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next `times` token-endpoint responses are `status` with `body` (JSON if a dict)."""
        if body is None:
            body = {"error": "rate_limit_error" if status == 429 else "server_error", "error_description": "injected"}
        if headers is None and status == 429:
            headers = {"Retry-After": "7"}
        with self._lock:
            for _ in range(times):
                self.failures.append(InjectedFailure(status, body, dict(headers or {})))

    def outage(self, seconds: float, *, status: int = 503, retry_after: float | None = None) -> None:
        """The token and revoke endpoints answer `status` (JSON `server_error` / `rate_limit_error`,
        `Retry-After` when given) for `seconds` from now, then work again; 0 ends an outage."""
        body = {"error": "rate_limit_error" if status == 429 else "server_error", "error_description": "outage"}
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
        with self._lock:
            self.down_failure = InjectedFailure(status, body, headers)
            self.down_until = time.monotonic() + max(0.0, seconds)

    def take_failure(self) -> InjectedFailure | None:
        """What the next token/revoke call answers instead of doing its work: the outage's
        answer while one lasts, else the next failure queued by `fail_next`."""
        with self._lock:
            if self.down_failure is not None and time.monotonic() < self.down_until:
                self.stats["outage"] += 1
                return self.down_failure
            return self.failures.popleft() if self.failures else None

    def access_token_valid(self, token: str) -> bool:
        record = self.access_tokens.get(token)
        return record is not None and record.expires_at > self.clock() and record.login_id in self.logins

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": dict(self.stats),
            "pending_failures": len(self.failures),
            "outage_s_left": round(max(0.0, self.down_until - time.monotonic()), 1) if self.down_failure else 0.0,
            "grants": len(self.grants),
            "live_refresh_tokens": len(self.refresh_tokens),
        }


# --- helpers -----------------------------------------------------------------
def _oauth_error(error: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def _invalid_request() -> JSONResponse:
    return _oauth_error("invalid_request", "Invalid request format")


def _invalid_grant(description: str) -> JSONResponse:
    return _oauth_error("invalid_grant", description)


def _authorize_error(request: Request, description: str) -> Response:
    """The real server shows a page; API clients asking for JSON get JSON."""
    if "application/json" in request.headers.get("accept", ""):
        return _oauth_error("invalid_request", description)
    page = (
        "<!doctype html><html><head><title>Authorization error</title></head><body>"
        f'<h1>Authorization error</h1><p id="error">{html.escape(description)}</p></body></html>'
    )
    return HTMLResponse(page, status_code=400)


def _absolute_http_uri(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.fragment


def _with_query(uri: str, params: dict[str, str]) -> str:
    parts = urlsplit(uri)
    query = f"{parts.query}&{urlencode(params)}" if parts.query else urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _valid_verifier(verifier: Any) -> bool:
    return isinstance(verifier, str) and 43 <= len(verifier) <= 128 and set(verifier) <= _UNRESERVED


def _str_fields(body: dict[str, Any], names: tuple[str, ...]) -> bool:
    return all(isinstance(body.get(n), str) and body.get(n) for n in names)


def create_oauth_app(state: StandinState | None = None) -> FastAPI:
    state = state or StandinState()
    app = FastAPI(title="ccbridge OAuth stand-in", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.standin = state

    @app.get(AUTHORIZE_PATH)
    @app.get(CAI_AUTHORIZE_PATH)
    async def authorize(request: Request) -> Response:
        """Auto-approves (no consent page). Both account types' paths land here; the stats
        count which one was used (`authorize:/cai/oauth/authorize` vs `authorize:/oauth/authorize`)."""
        state.stats["authorize"] += 1
        state.stats[f"authorize:{request.url.path}"] += 1
        q = request.query_params
        required = ("code", "client_id", "response_type", "redirect_uri", "scope", "code_challenge",
                    "code_challenge_method", "state")
        missing = [name for name in required if not q.get(name)]
        if missing:
            return _authorize_error(request, f"missing parameter(s): {', '.join(missing)}")
        if any(len(q.getlist(name)) > 1 for name in required):
            return _authorize_error(request, "repeated parameter")
        if q["code"] != "true":
            return _authorize_error(request, "code must be 'true'")
        if q["client_id"] != state.client_id:
            return _authorize_error(request, "unknown client_id")
        if q["response_type"] != "code":
            return _authorize_error(request, "unsupported response_type")
        if q["code_challenge_method"] != "S256":
            return _authorize_error(request, "code_challenge_method must be S256")
        challenge = q["code_challenge"]
        if len(challenge) != 43 or not set(challenge) <= _UNRESERVED:
            return _authorize_error(request, "malformed code_challenge")
        redirect_uri = q["redirect_uri"]
        if not _absolute_http_uri(redirect_uri) or (
            state.allowed_redirect_uris is not None and redirect_uri not in state.allowed_redirect_uris
        ):
            return _authorize_error(request, "redirect_uri is not allowed")
        scopes = tuple(q["scope"].split())
        unknown = [s for s in scopes if s not in KNOWN_SCOPES]
        if not scopes or unknown:
            return _authorize_error(request, "invalid scope")
        if len(q["state"]) > 512:
            return _authorize_error(request, "state too long")
        code = secrets.token_urlsafe(32)
        state.grants[code] = Grant(
            code=code,
            client_id=q["client_id"],
            redirect_uri=redirect_uri,
            scopes=scopes,
            code_challenge=challenge,
            state=q["state"],
            issued_at=state.clock(),
            authorize_path=request.url.path,
        )
        state.stats["authorize_approved"] += 1
        return RedirectResponse(_with_query(redirect_uri, {"code": code, "state": q["state"]}), status_code=302)

    @app.get(CALLBACK_PATH)
    async def manual_callback(request: Request) -> Response:
        state.stats["callback"] += 1
        code, st = request.query_params.get("code"), request.query_params.get("state")
        if not code or not st:
            return HTMLResponse("<!doctype html><p id='error'>Missing code or state.</p>", status_code=400)
        paste = html.escape(f"{code}#{st}")
        page = (
            "<!doctype html><html><head><title>Authentication Code</title></head><body>"
            "<h1>Authentication Code</h1><p>Paste this into Claude Code:</p>"
            f'<code id="paste-code">{paste}</code></body></html>'
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.post(TOKEN_PATH)
    async def token(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = json.loads(await request.body()) if content_type == "application/json" else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        grant_type = body.get("grant_type") if isinstance(body, dict) else None
        state.stats[f"token:{grant_type if grant_type in ('authorization_code', 'refresh_token') else 'other'}"] += 1
        if (failure := state.take_failure()) is not None:
            state.stats["token:injected_failure"] += 1
            if isinstance(failure.body, dict):
                return JSONResponse(failure.body, status_code=failure.status, headers=failure.headers)
            return Response(failure.body, status_code=failure.status, headers=failure.headers, media_type="text/plain")
        if not isinstance(body, dict):
            return _invalid_request()
        if grant_type == "authorization_code":
            return _authorization_code(state, body)
        if grant_type == "refresh_token":
            return _refresh(state, body)
        if isinstance(grant_type, str) and grant_type:
            return _oauth_error("unsupported_grant_type", "Unsupported grant_type")
        return _invalid_request()

    @app.post(REVOKE_PATH)
    async def revoke(request: Request) -> Response:
        state.stats["revoke"] += 1
        if (failure := state.take_failure()) is not None:
            state.stats["revoke:injected_failure"] += 1
            return JSONResponse(failure.body, status_code=failure.status, headers=failure.headers)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            body = json.loads(await request.body()) if content_type == "application/json" else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not _str_fields(body, ("token", "token_type_hint", "client_id")):
            return _invalid_request()
        if body["client_id"] != state.client_id:
            return _oauth_error("invalid_client", "client_id mismatch.", 401)
        state.revocations.append(dict(body))
        login_id = state.refresh_tokens.get(body["token"])
        if login_id is not None:  # the whole login ends: every refresh and access token of it
            state.logins.pop(login_id, None)
            for token in [t for t, owner in state.refresh_tokens.items() if owner == login_id]:
                del state.refresh_tokens[token]
            for token in [t for t, record in state.access_tokens.items() if record.login_id == login_id]:
                del state.access_tokens[token]
            state.stats["revoke:ok"] += 1
        return Response(status_code=200)  # RFC 7009: an unknown token is answered the same way

    @app.get(PROFILE_PATH)
    async def profile(request: Request) -> Response:
        state.stats["profile"] += 1
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not state.access_token_valid(token):
            return JSONResponse({"error": {"type": "authentication_error", "message": "Invalid token"}}, status_code=401)
        login = state.logins[state.access_tokens[token].login_id]
        return JSONResponse({"account": login.account, "organization": login.organization})

    @app.get("/_standin/stats")
    async def stats() -> dict[str, Any]:
        return state.snapshot()

    @app.post("/_standin/failures")
    async def inject(request: Request) -> Response:
        try:
            spec = json.loads(await request.body())
            state.fail_next(int(spec["status"]), times=int(spec.get("times", 1)), body=spec.get("body"),
                            headers=spec.get("headers"))
        except (ValueError, KeyError, TypeError):
            return _invalid_request()
        return JSONResponse({"pending_failures": len(state.failures)})

    @app.post("/_standin/outage")
    async def outage(request: Request) -> Response:
        try:
            spec = json.loads(await request.body())
            retry_after = spec.get("retry_after")
            state.outage(float(spec["seconds"]), status=int(spec.get("status", 503)),
                         retry_after=float(retry_after) if retry_after is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            return _invalid_request()
        return JSONResponse(state.snapshot())

    return app


def _issue(state: StandinState, login: Login, scopes: tuple[str, ...]) -> JSONResponse:
    now = state.clock()
    access, refresh = state.access_token_factory(), state.refresh_token_factory()
    state.access_tokens[access] = AccessRecord(login.login_id, scopes, now + state.access_token_lifetime)
    state.refresh_tokens[refresh] = login.login_id
    return JSONResponse(
        {
            "token_type": "Bearer",
            "access_token": access,
            "expires_in": state.access_token_lifetime,
            "refresh_token": refresh,
            "refresh_token_expires_in": max(0, int(login.expires_at - now)),
            "scope": " ".join(scopes),
            "account": login.account,
            "organization": login.organization,
        },
        headers={"Cache-Control": "no-store"},
    )


def _authorization_code(state: StandinState, body: dict[str, Any]) -> Response:
    if not _str_fields(body, ("code", "redirect_uri", "client_id", "code_verifier", "state")):
        return _invalid_request()
    grant = state.grants.get(body["code"])
    if grant is None or grant.used:
        return _invalid_grant("Invalid 'code' in request.")
    if state.clock() - grant.issued_at > state.code_lifetime:
        grant.used = True
        return _invalid_grant("Authorization code expired.")
    grant.used = True  # single use, even when the rest of the request is wrong
    if body["client_id"] != grant.client_id or body["client_id"] != state.client_id:
        return _invalid_grant("client_id mismatch.")
    if body["redirect_uri"] != grant.redirect_uri:
        return _invalid_grant("redirect_uri mismatch.")
    if body["state"] != grant.state:
        return _invalid_grant("state mismatch.")
    if not _valid_verifier(body["code_verifier"]) or not secrets.compare_digest(
        s256(body["code_verifier"]), grant.code_challenge
    ):
        return _invalid_grant("Invalid code_verifier.")
    login = Login(
        login_id=grant.code,
        client_id=grant.client_id,
        scopes=grant.scopes,
        expires_at=state.clock() + state.refresh_token_lifetime,
        account=dict(state.account),
        organization=dict(state.organization),
    )
    state.logins[login.login_id] = login
    state.stats["token:authorization_code:ok"] += 1
    return _issue(state, login, grant.scopes)


def _refresh(state: StandinState, body: dict[str, Any]) -> Response:
    if not _str_fields(body, ("refresh_token", "client_id")):
        return _invalid_request()
    scope = body.get("scope")
    if scope is not None and not isinstance(scope, str):
        return _invalid_request()
    if body["client_id"] != state.client_id:
        return _invalid_grant("client_id mismatch.")
    login_id = state.refresh_tokens.pop(body["refresh_token"], None)  # rotation: old token dies here
    login = state.logins.get(login_id) if login_id else None
    if login is None:
        return _invalid_grant("Invalid refresh token.")
    if login.expires_at <= state.clock():
        state.logins.pop(login.login_id, None)
        return _invalid_grant("Refresh token expired.")
    scopes = login.scopes
    if scope:
        wanted = tuple(scope.split())
        if not set(wanted) <= set(login.scopes):
            state.refresh_tokens[body["refresh_token"]] = login.login_id  # a refused request rotates nothing
            return _oauth_error("invalid_scope", "Requested scope exceeds the grant.")
        scopes = wanted
    state.stats["token:refresh_token:ok"] += 1
    return _issue(state, login, scopes)


# --- running it ----------------------------------------------------------------

class OAuthStandin:
    """`async with OAuthStandin(port=0) as s:` — a real HTTP server on 127.0.0.1."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_id: str = REAL_CLIENT_ID,
        access_token_lifetime: int = 28_800,
        refresh_token_lifetime: int = 2_592_000,
        code_lifetime: float = 300.0,
        access_token_factory: Callable[[], str] | None = None,
        refresh_token_factory: Callable[[], str] | None = None,
        allowed_redirect_uris: set[str] | frozenset[str] | None = None,
        state: StandinState | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.state = state or StandinState(
            client_id=client_id,
            access_token_lifetime=access_token_lifetime,
            refresh_token_lifetime=refresh_token_lifetime,
            code_lifetime=code_lifetime,
            access_token_factory=access_token_factory or _new_access_token,
            refresh_token_factory=refresh_token_factory or _new_refresh_token,
            allowed_redirect_uris=frozenset(allowed_redirect_uris) if allowed_redirect_uris is not None else None,
        )
        self.app = create_oauth_app(self.state)
        self._server: EmbeddedServer | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorize_url(self) -> str:
        return self.base_url + AUTHORIZE_PATH

    @property
    def claude_ai_authorize_url(self) -> str:
        """Where OAUTH_AUTHORIZE_URL points for Claude.ai accounts (the real one is under /cai/)."""
        return self.base_url + CAI_AUTHORIZE_PATH

    @property
    def console_authorize_url(self) -> str:
        """Where OAUTH_CONSOLE_AUTHORIZE_URL points for Console accounts."""
        return self.base_url + AUTHORIZE_PATH

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    @property
    def callback_url(self) -> str:
        return self.base_url + CALLBACK_PATH

    @property
    def stats_url(self) -> str:
        return self.base_url + "/_standin/stats"

    async def start(self) -> OAuthStandin:
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off")
        self._server = EmbeddedServer(config)
        await self._server.launch(sock, "oauth-standin")
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.finish(timeout_s=10)

    async def __aenter__(self) -> OAuthStandin:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def run_oauth_standin(host: str = "127.0.0.1", port: int = 8900, **options: Any) -> None:
    """Blocking: serve the stand-in until Ctrl-C (for `ccbridge standin-oauth`)."""
    state = StandinState(**options)
    print(f"OAuth stand-in on http://{host}:{port}  (authorize {AUTHORIZE_PATH}, token {TOKEN_PATH})", flush=True)
    uvicorn.run(create_oauth_app(state), host=host, port=port, log_level="info")


__all__ = [
    "AUTHORIZE_PATH",
    "CAI_AUTHORIZE_PATH",
    "CALLBACK_PATH",
    "REAL_CLIENT_ID",
    "TOKEN_PATH",
    "OAuthStandin",
    "StandinState",
    "create_oauth_app",
    "run_oauth_standin",
    "s256",
]
