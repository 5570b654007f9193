"""HTTP entry points: parse, call one use case, map the result. Nothing else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from services.auth.callers import Caller, CallerVerifier
from services.auth.domain import parse_paste
from services.auth.errors import AuthError
from services.auth.login import LoginService
from services.auth.metrics import AuthMetrics
from services.auth.schemas import ConnectedOut, ExchangeIn, LoginStartedOut, ReadinessOut, problem_responses


class ServiceStarting(AuthError):
    status, slug, title = 503, "starting", "Starting"
    default_detail = "The service is starting or stopping; retry shortly."

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "2"})


@dataclass
class AuthComponents:
    """What the routes need, wired by app.py (real adapters) or by tests (fakes)."""

    login: LoginService
    callers: CallerVerifier
    readiness: Callable[[], Awaitable[dict[str, bool]]]


router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="HS256 JWT minted by the platform; `sub` = user id.")


def components(request: Request) -> AuthComponents:
    found = getattr(request.app.state, "components", None)
    if found is None:
        raise ServiceStarting()
    return found


def metrics(request: Request) -> AuthMetrics:
    return request.app.state.metrics


def caller(
    request: Request,
    comp: Annotated[AuthComponents, Depends(components)],
    _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
) -> Caller:
    return comp.callers.verify_header(request.headers.get("authorization"))


@router.post(
    "/v1/claude-code/login",
    status_code=201,
    response_model=LoginStartedOut,
    responses=problem_responses(401, 503),
    summary="Start connecting the caller's Claude account",
    tags=["claude-code"],
)
async def start_login(
    who: Annotated[Caller, Depends(caller)],
    comp: Annotated[AuthComponents, Depends(components)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> LoginStartedOut:
    started = await comp.login.start_login(who.user_id)
    stats.logins_started.inc()
    return LoginStartedOut(authorize_url=started.authorize_url, state=started.state, expires_at=started.expires_at)


@router.post(
    "/v1/claude-code/exchange",
    status_code=202,
    response_model=ConnectedOut,
    responses=problem_responses(400, 401, 403, 422, 502, 503, 504),
    summary="Complete the login with the pasted `code#state`",
    description="Exchanges the code, hands the tokens (sealed) to the vault. Never returns a token.",
    tags=["claude-code"],
)
async def exchange(
    body: ExchangeIn,
    who: Annotated[Caller, Depends(caller)],
    comp: Annotated[AuthComponents, Depends(components)],
    stats: Annotated[AuthMetrics, Depends(metrics)],
) -> ConnectedOut:
    try:
        connected = await comp.login.complete_login(who.user_id, parse_paste(body.code, body.state))
    except AuthError as exc:
        stats.exchange(exc.slug)
        raise
    stats.exchange("connected")
    return ConnectedOut(expires_at=connected.expires_at, scopes=list(connected.scopes))


@router.get("/healthz", tags=["ops"], summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["ops"],
    summary="Readiness: bus connected and vault key known",
    response_model=ReadinessOut,
    responses={503: {"model": ReadinessOut, "description": "Not ready"}},
)
async def readyz(request: Request) -> JSONResponse:
    comp = getattr(request.app.state, "components", None)
    checks = await comp.readiness() if comp is not None else {"started": False}
    ready = all(checks.values())
    body = ReadinessOut(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics(stats: Annotated[AuthMetrics, Depends(metrics)]) -> Response:
    return Response(stats.render(), media_type=CONTENT_TYPE_LATEST)
