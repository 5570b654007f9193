"""HTTP entry points: parse, call one use case, map the result. Nothing else.

Every route but the ops ones (/healthz, /readyz, /metrics), the docs and the connect page needs a
caller token, and every route that takes one is rate limited per caller and action (limits.py;
the actions and their settings are in docs/auth.md)."""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request, Response, Security
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter

from services.auth.callers import Caller, CallerVerifier
from services.auth.connections import ConnectionService
from services.auth.domain import parse_legacy_paste, parse_paste, parse_setup_token
from services.auth.errors import AuthError, ForbiddenToken, RateLimited, Unauthorized
from services.auth.grants import GrantService
from services.auth.limits import RateLimiter
from services.auth.login import Connected, LoginService
from services.auth.metrics import AuthMetrics
from services.auth.schemas import (
    COMMON_PROBLEMS,
    AccountOut,
    ConnectedOut,
    ExchangeIn,
    GrantIn,
    GrantOut,
    GrantsOut,
    HealthOut,
    LeaseOut,
    LegacyExchangeIn,
    LegacyExchangeOut,
    LoginIn,
    LoginStartedOut,
    ReadinessOut,
    RevokedOut,
    SetupTokenIn,
    StatusOut,
    problem_responses,
)
from shared.events import SandboxId

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS = {"connect.js": "text/javascript; charset=utf-8", "connect.css": "text/css; charset=utf-8"}


class ServiceStarting(AuthError):
    status, slug, title = 503, "starting", "Starting"
    default_detail = "The service is starting or stopping; retry shortly."

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "2"})


class AssetNotFound(AuthError):
    status, slug, title = 404, "not-found", "Not Found"
    default_detail = "No such asset."


@dataclass
class AuthComponents:
    """What the routes need, wired by app.py (real adapters) or by tests (fakes)."""

    login: LoginService
    callers: CallerVerifier
    readiness: Callable[[], Awaitable[dict[str, bool]]]
    connections: ConnectionService | None = None
    limiter: RateLimiter | None = None
    grants: GrantService | None = None


router = APIRouter()
_bearer = HTTPBearer(
    auto_error=False,
    description="A JWT minted by the platform for its user (`sub` = user id): HS256 with AUTH_JWT_SECRET, or "
    "RS/PS/ES/EdDSA checked with AUTH_JWT_PUBLIC_KEY or AUTH_JWKS_URL.",
)


def components(request: Request) -> AuthComponents:
    found = getattr(request.app.state, "components", None)
    if found is None:
        raise ServiceStarting()
    return found


def metrics(request: Request) -> AuthMetrics:
    return request.app.state.metrics


async def caller(
    request: Request,
    comp: Annotated[AuthComponents, Depends(components)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
    _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Caller:
    try:
        return await comp.callers.verify_header(request.headers.get("authorization"))
    except (Unauthorized, ForbiddenToken) as exc:
        stats.rejected(exc.slug)
        raise


def rate_limit(action: str) -> Callable[..., Awaitable[Caller]]:
    async def dependency(
        who: Annotated[Caller, Depends(caller)],
        comp: Annotated[AuthComponents, Depends(components)],
        stats: Annotated[AuthMetrics, Depends(metrics)],
    ) -> Caller:
        if comp.limiter is not None and (wait := comp.limiter.acquire(action, who.user_id)) is not None:
            stats.rejected("rate_limited")
            raise RateLimited(wait)
        return who

    return dependency


def connections(comp: Annotated[AuthComponents, Depends(components)]) -> ConnectionService:
    if comp.connections is None:
        raise ServiceStarting()
    return comp.connections


def grant_service(comp: Annotated[AuthComponents, Depends(components)]) -> GrantService:
    if comp.grants is None:
        raise ServiceStarting()
    return comp.grants


def _connected_out(connected: Connected) -> ConnectedOut:
    return ConnectedOut(expires_at=connected.expires_at, scopes=list(connected.scopes))


async def _counted(stats: AuthMetrics, path: str, work: Awaitable[Connected]) -> Connected:
    try:
        connected = await work
    except AuthError as exc:
        stats.connect(path, exc.slug)
        raise
    stats.connect(path, "connected")
    return connected


# --- connect ------------------------------------------------------------------------------
@router.post(
    "/v1/claude-code/login",
    status_code=201,
    response_model=LoginStartedOut,
    responses=problem_responses(*COMMON_PROBLEMS, 429),
    summary="Start connecting the caller's Claude account",
    description="Returns the authorize URL to open in the person's browser. Optional body: `account_type` "
    "(`claude_ai` default, or `console`) and `create_api_key` (adds `org:create_api_key`). A caller may hold "
    "a few logins in progress at once (AUTH_MAX_PENDING_LOGINS).",
    tags=["claude-code"],
)
async def start_login(
    who: Annotated[Caller, Depends(rate_limit("login"))],
    comp: Annotated[AuthComponents, Depends(components)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
    body: Annotated[
        LoginIn | None,
        Body(
            openapi_examples={
                "claude_ai": {"summary": "Claude subscription (default)", "value": {"account_type": "claude_ai"}},
                "console": {
                    "summary": "Console account, may create API keys",
                    "value": {"account_type": "console", "create_api_key": True},
                },
            }
        ),
    ] = None,
) -> LoginStartedOut:
    options = body or LoginIn()
    try:
        started = await comp.login.start_login(
            who.user_id, account_type=options.account_type, create_api_key=options.create_api_key
        )
    except AuthError as exc:
        stats.rejected(exc.slug)
        raise
    stats.logins_started.inc()
    return LoginStartedOut(authorize_url=started.authorize_url, state=started.state, expires_at=started.expires_at)


@router.post(
    "/v1/claude-code/exchange",
    status_code=202,
    response_model=ConnectedOut,
    responses=problem_responses(400, *COMMON_PROBLEMS, 429, 502, 504),
    summary="Complete the login with the pasted code#state",
    description="Exchanges the code, hands the tokens (sealed) to the vault. Never returns a token.",
    tags=["claude-code"],
)
async def exchange(
    body: ExchangeIn,
    who: Annotated[Caller, Depends(rate_limit("exchange"))],
    comp: Annotated[AuthComponents, Depends(components)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> ConnectedOut:
    async def work() -> Connected:
        return await comp.login.complete_login(who.user_id, parse_paste(body.code, body.state))

    return _connected_out(await _counted(stats, "paste", work()))


@router.post(
    "/v1/claude-code/token",
    status_code=202,
    response_model=ConnectedOut,
    responses=problem_responses(400, *COMMON_PROBLEMS, 429),
    summary="Connect with a long-lived token from claude setup-token",
    description="Stores an access-only connection: no refresh token, `user:inference` only, valid ~1 year "
    "(`sk-ant-oat01-…`). The token goes to the vault sealed and is never returned.",
    tags=["claude-code"],
)
async def setup_token(
    body: SetupTokenIn,
    who: Annotated[Caller, Depends(rate_limit("exchange"))],
    comp: Annotated[AuthComponents, Depends(components)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> ConnectedOut:
    async def work() -> Connected:
        token = parse_setup_token(body.token.get_secret_value())
        return await comp.login.connect_setup_token(who.user_id, token)

    return _connected_out(await _counted(stats, "setup_token", work()))


@router.post(
    "/user-settings/mcp/claude-code",
    response_model=LegacyExchangeOut,
    responses=problem_responses(400, *COMMON_PROBLEMS, 429, 502, 504),
    summary="Seed-compatible exchange of <code>#<verifier>",
    description="For older clients that made the PKCE pair themselves and sent the verifier as the OAuth `state` "
    "(their authorize page showed `code#verifier`). The exchange sends that verifier as `code_verifier` and as "
    "`state`. Prefer `/v1/claude-code/login` + `/v1/claude-code/exchange`.",
    tags=["compatibility"],
)
async def legacy_exchange(
    body: LegacyExchangeIn,
    who: Annotated[Caller, Depends(rate_limit("exchange"))],
    comp: Annotated[AuthComponents, Depends(components)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> LegacyExchangeOut:
    async def work() -> Connected:
        return await comp.login.complete_legacy(who.user_id, parse_legacy_paste(body.authorization_code))

    await _counted(stats, "legacy", work())
    return LegacyExchangeOut()


@router.get(
    "/v1/claude-code/status",
    response_model=StatusOut,
    responses=problem_responses(*COMMON_PROBLEMS, 429, 502),
    summary="The caller's connection, as the vault holds it",
    description="Asks the vault (`vault.connections.status`); never shows a token. `user_id` is the caller "
    "token's `sub`: whose account this is. 503 when the vault does not answer.",
    tags=["claude-code"],
)
async def status(
    who: Annotated[Caller, Depends(rate_limit("status"))],
    service: Annotated[ConnectionService, Depends(connections)],
) -> StatusOut:
    view = await service.status(who.user_id)
    return StatusOut(
        user_id=who.user_id,
        connected=view.connected,
        state=view.state,
        kind=view.kind,
        scopes=list(view.scopes),
        expires_at=view.expires_at,
        login_expires_at=view.login_expires_at,
        account=AccountOut(**view.account.model_dump()) if view.account is not None else None,
        version=view.version,
    )


@router.delete(
    "/v1/claude-code",
    status_code=202,
    response_model=RevokedOut,
    responses=problem_responses(*COMMON_PROBLEMS, 429),
    summary="Disconnect the caller's Claude account",
    description="Publishes `tokens.revoked`; the vault deletes the tokens and sandboxes lose them. Idempotent.",
    tags=["claude-code"],
)
async def disconnect(
    who: Annotated[Caller, Depends(rate_limit("disconnect"))],
    service: Annotated[ConnectionService, Depends(connections)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> RevokedOut:
    event_id = await service.disconnect(who.user_id)
    stats.disconnects.inc()
    return RevokedOut(event_id=event_id)


# --- grants: leases of the caller's credentials to one sandbox -------------------------------------
SANDBOX_ID_PATTERN: str = TypeAdapter(SandboxId).json_schema()["pattern"]


@router.post(
    "/v1/claude-code/grants",
    status_code=201,
    response_model=GrantOut,
    responses=problem_responses(*COMMON_PROBLEMS, 429),
    summary="Grant one sandbox the caller's Claude credentials for a while",
    description="Signs a grant (EdDSA compact JWS: `sub` = the caller, `sbx`, `mode`, `exp`) for the platform to put "
    "into `sandbox.created`, and publishes `grants.issued` so the vault knows the newest lease: asking again for "
    "the same sandbox extends or shortens its lease, also while it runs. `ttl_s` above GRANT_MAX_TTL_S is a 422. "
    "503 `bus-unavailable` (and no grant) when the vault cannot be told.",
    tags=["grants"],
)
async def issue_grant(
    body: Annotated[
        GrantIn,
        Body(
            openapi_examples={
                "default": {"summary": "access token only, for a day", "value": {"sandbox_id": "sbx-123"}},
                "file": {
                    "summary": "the whole login as a file, for an hour",
                    "value": {"sandbox_id": "sbx-123", "mode": "file", "ttl_s": 3600},
                },
            }
        ),
    ],
    who: Annotated[Caller, Depends(rate_limit("grant_issue"))],
    service: Annotated[GrantService, Depends(grant_service)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> GrantOut:
    issued = await service.issue(who.user_id, body.sandbox_id, body.mode, body.ttl_s)
    stats.grants_issued.labels(mode=issued.claims.mode).inc()
    return GrantOut(grant=issued.token, sandbox_id=issued.claims.sbx, mode=issued.claims.mode,
                    expires_at=issued.expires_at)


@router.get(
    "/v1/claude-code/grants",
    response_model=GrantsOut,
    responses=problem_responses(*COMMON_PROBLEMS, 429, 502),
    summary="The caller's live grants (sandboxes holding their Claude login)",
    description="Asks the vault (`vault.grants.list`) for the caller's live leases; only ever the caller's own. "
    "503 `vault-unavailable` when the vault does not answer.",
    tags=["grants"],
)
async def list_grants(
    who: Annotated[Caller, Depends(rate_limit("grant_list"))],
    service: Annotated[GrantService, Depends(grant_service)],
) -> GrantsOut:
    leases = await service.live(who.user_id)
    return GrantsOut(grants=[
        LeaseOut(sandbox_id=lease.sandbox_id, mode=lease.mode,
                 issued_at=lease.issued_at, expires_at=lease.expires_at, last_injected_at=lease.last_injected_at)
        for lease in leases
    ])


@router.delete(
    "/v1/claude-code/grants/{sandbox_id}",
    status_code=204,
    response_class=Response,
    responses={204: {"description": "The lease ends: the vault stops releasing credentials for this sandbox and "
                                    "the sandbox is scrubbed. Also when there was no lease (idempotent)."},
               **problem_responses(*COMMON_PROBLEMS, 429)},
    summary="End the lease of one sandbox",
    description="Publishes `grants.revoked` for the caller's lease of this sandbox (never anyone else's); the vault "
    "ends it and the sandbox service removes the credentials from the sandbox. Idempotent.",
    tags=["grants"],
)
async def end_grant(
    sandbox_id: Annotated[str, PathParam(min_length=1, max_length=128, pattern=SANDBOX_ID_PATTERN,
                                         description="The sandbox whose lease ends.", examples=["sbx-123"])],
    who: Annotated[Caller, Depends(rate_limit("grant_end"))],
    service: Annotated[GrantService, Depends(grant_service)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> Response:
    await service.end(who.user_id, sandbox_id)
    stats.grants_ended.inc()
    return Response(status_code=204)


# --- the connect page ------------------------------------------------------------------------
def _page_headers(request: Request) -> dict[str, str]:
    ancestors = getattr(request.app.state, "frame_ancestors", "'self'")
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            f"base-uri 'none'; form-action 'none'; frame-ancestors {ancestors}"
        ),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


@router.get(
    "/connect",
    response_class=HTMLResponse,
    summary="Web page: connect a Claude account",
    description="Plain HTML/JS. The caller token comes from the URL fragment (`/connect#token=<jwt>`, never sent "
    "to any server) or a text field. The page never sees an OAuth token.",
    tags=["page"],
    responses={200: {"content": {"text/html": {"example": "<!doctype html><title>Connect Claude Code</title>…"}}}},
)
async def connect_page(request: Request) -> HTMLResponse:
    return HTMLResponse((STATIC_DIR / "connect.html").read_text(), headers=_page_headers(request))


@router.get("/connect/assets/{name}", include_in_schema=False)
async def connect_asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise AssetNotFound()
    return Response((STATIC_DIR / name).read_bytes(), media_type=ASSETS[name], headers=_page_headers(request))


# --- API docs, offline ---------------------------------------------------------------------------
# Swagger UI's files come from the `fastapi-offline` package (pinned in constraints.txt), served
# from here: /docs works on a machine without internet and loads nothing from another host.
SWAGGER_DIR = Path(str(importlib.resources.files("fastapi_offline") / "static"))
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def _docs_headers(script_hashes: list[str]) -> dict[str, str]:
    scripts = " ".join(f"'sha256-{h}'" for h in script_hashes)
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'self' {scripts}; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} · API",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon.png",
        oauth2_redirect_url=None,
        swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io (FastAPI's defaults stay)
    )
    # Swagger UI starts from one inline script: the CSP allows exactly that script (by hash).
    hashes = [base64.b64encode(hashlib.sha256(s).digest()).decode() for s in _INLINE_SCRIPT.findall(page.body)]
    return HTMLResponse(page.body, headers=_docs_headers(hashes))


@router.get("/docs/assets/{name}", include_in_schema=False)
async def swagger_asset(name: str) -> Response:
    if name not in DOCS_ASSETS:
        raise AssetNotFound()
    return Response(
        (SWAGGER_DIR / name).read_bytes(), media_type=DOCS_ASSETS[name],
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=86400"},
    )


# --- ops ----------------------------------------------------------------------------------------
@router.get("/healthz", tags=["ops"], summary="Liveness", response_model=HealthOut)
async def healthz() -> HealthOut:
    return HealthOut()


@router.get(
    "/readyz",
    tags=["ops"],
    summary="Readiness: bus connected and vault key known",
    response_model=ReadinessOut,
    responses={
        503: {
            "model": ReadinessOut,
            "description": "Not ready",
            "content": {"application/json": {"example": {"status": "not_ready", "checks": {"bus": True, "vault_key": False}}}},
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    comp = getattr(request.app.state, "components", None)
    checks = await comp.readiness() if comp is not None else {"started": False}
    ready = all(checks.values())
    body = ReadinessOut(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


_METRICS_EXAMPLE = "# HELP ccbridge_auth_logins_started_total Logins started.\nccbridge_auth_logins_started_total 3.0\n"


@router.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}, "example": _METRICS_EXAMPLE}}}},
)
async def prometheus_metrics(stats: Annotated[AuthMetrics, Depends(metrics)]) -> Response:
    return Response(stats.render(), media_type=CONTENT_TYPE_LATEST)

