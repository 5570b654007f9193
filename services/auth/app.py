"""Composition root of the auth service: the only place that wires adapters.

    create_app(settings, *, broker, parts)  -> FastAPI (its lifespan starts/stops the runtime)
    build_api(metrics, components=None)   -> FastAPI with routes and error handlers only (unit tests)
    AuthService(settings, *, parts)       -> the app under uvicorn (shared.lifecycle), base_url
    serve(settings), main()               -> `python -m services.auth`
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import uvicorn
from fastapi import FastAPI
from faststream.nats import NatsBroker

from services.auth.adapters.bus import BrokerPublisher
from services.auth.adapters.keys import JWT_SECRET_FILE, VaultKeySource, load_or_create_jwt_secret
from services.auth.adapters.oauth_client import HttpOAuthClient
from services.auth.adapters.pending_store import KvPendingStore, RecordCipher
from services.auth.adapters.vault_status import NatsVaultGrants, NatsVaultStatus
from services.auth.callers import CallerVerifier, JwksKeys, load_public_key
from services.auth.connections import ConnectionService
from services.auth.grants import GrantPolicy, GrantService
from services.auth.limits import Limit, RateLimiter
from services.auth.login import LoginPolicy, LoginService
from services.auth.metrics import AuthMetrics
from services.auth.ports import Clock, OAuthClient, PendingStore, VaultGrants, VaultKeys, VaultStatus
from services.auth.problems import BodyLimitMiddleware, install_error_handlers
from services.auth.routes import AuthComponents, router
from services.auth.settings import AuthSettings
from shared import subjects
from shared.broker import document_publishers, make_broker, provision
from shared.events import Event, GrantIssued, GrantRevoked, TokensIssued, TokensRevoked
from shared.grants import GrantSigner, load_or_create_signer
from shared.grants import key_paths as grant_key_paths
from shared.health import EmbeddedServer, bind_socket
from shared.lifecycle import Service, run_service
from shared.logging import get_logger

log = get_logger(__name__)

EXIT_CANNOT_LISTEN = 3

# What auth puts on the bus (AsyncAPI documents these; `publish_event` sends them).
PUBLISHES: dict[str, type[Event]] = {
    subjects.TOKENS_ISSUED: TokensIssued,
    subjects.TOKENS_REVOKED: TokensRevoked,
    subjects.GRANTS_ISSUED: GrantIssued,
    subjects.GRANTS_REVOKED: GrantRevoked,
}


def build_broker(settings: AuthSettings) -> NatsBroker:
    """Auth's broker: it consumes nothing; it publishes and asks the vault (status, grants)."""
    broker = make_broker(settings, name="auth")
    document_publishers(broker, PUBLISHES)
    return broker

DESCRIPTION = """Connect a person's Claude account to ccbridge.

1. `POST /v1/claude-code/login` → open `authorize_url` in the person's browser.
2. The person approves and is shown `code#state`; `POST /v1/claude-code/exchange` with it.
3. The tokens go, sealed to the vault's key, onto the bus; this API never returns them.

Other ways in: a `claude setup-token` token (`POST /v1/claude-code/token`), the seed-compatible
`POST /user-settings/mcp/claude-code`, and the web page `GET /connect`. `GET /v1/claude-code/status`
asks the vault; `DELETE /v1/claude-code` disconnects.

Grants (least authority): the vault releases a person's credentials only to a sandbox that person
granted. `POST /v1/claude-code/grants` signs a grant (EdDSA JWS) for one sandbox, for a while, for the
platform to put into `sandbox.created`; `GET /v1/claude-code/grants` lists the live ones;
`DELETE /v1/claude-code/grants/{sandbox_id}` ends one.

Callers authenticate with a JWT (`sub` = user id): HS256 (AUTH_JWT_SECRET), or an asymmetric key
(AUTH_JWT_PUBLIC_KEY / AUTH_JWKS_URL). Errors are RFC 9457 problem+json. Details: docs/auth.md.
"""


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_api(
    metrics: AuthMetrics | None = None,
    components: AuthComponents | None = None,
    *,
    lifespan=None,
    max_body_bytes: int = 16_384,
    frame_ancestors: str = "'self'",
) -> FastAPI:
    # /docs is served by routes.py from local files (no CDN); ReDoc would load from a CDN: off.
    app = FastAPI(title="ccbridge auth", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.metrics = metrics or AuthMetrics()
    app.state.components = components
    app.state.frame_ancestors = frame_ancestors
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.include_router(router)
    return app


def build_verifier(settings: AuthSettings, dev_secret: Callable[[], str]) -> CallerVerifier:
    """HS256 with AUTH_JWT_SECRET; an asymmetric key/JWKS when configured; the dev secret file
    only when nothing at all is configured."""
    secret = settings.jwt_secret.get_secret_value().strip() if settings.jwt_secret is not None else None
    if secret is None and not settings.asymmetric_configured:
        secret = dev_secret()
    public_key = load_public_key(settings.jwt_public_key) if settings.jwt_public_key else None
    jwks = (
        JwksKeys(
            settings.jwks_url, cache_s=settings.jwks_cache_s, timeout=settings.jwks_timeout,
            cooldown_s=settings.jwks_cooldown_s,
        )
        if settings.jwks_url
        else None
    )
    return CallerVerifier(
        secret,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway_s=settings.jwt_leeway_s,
        public_key=public_key,
        jwks=jwks,
        algorithms=settings.asymmetric_algorithms,
    )


def build_limiter(settings: AuthSettings) -> RateLimiter:
    """One bucket per (action, caller). Connect actions (login; exchange, setup token, seed route)
    and disconnect use AUTH_RATE_LIMIT_*; reads (status, grant list) AUTH_READ_RATE_LIMIT_*;
    grants issued and ended AUTH_GRANT_RATE_LIMIT_*."""
    read = Limit(settings.read_rate_limit_per_minute, settings.read_rate_limit_burst)
    grant = Limit(settings.grant_rate_limit_per_minute, settings.grant_rate_limit_burst)
    return RateLimiter(
        per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst,
        limits={"status": read, "grant_list": read, "grant_issue": grant, "grant_end": grant},
    )


def load_grant_signer(settings: AuthSettings) -> GrantSigner:
    """AUTH_GRANT_PRIVATE_KEY, else `<keys_dir>/auth.grant.key` (created on first start, 0600, with
    `auth.grant.pub` beside it: a vault sharing the data dir trusts that file). With the env key
    nothing is written: give the vault its public half (logged at start) in its trust settings."""
    if settings.grant_private_key is not None:
        signer = GrantSigner.from_b64(settings.grant_private_key.get_secret_value())
        source = "AUTH_GRANT_PRIVATE_KEY"
    else:
        signer = load_or_create_signer(settings.keys_dir)
        source = str(grant_key_paths(settings.keys_dir)[0])
    log.info("grant key loaded", kid=signer.kid, public_key=signer.public_b64, source=source)
    return signer


def state_secret(settings: AuthSettings, dev_secret: Callable[[], str]) -> str:
    """The key of pending-login records: AUTH_STATE_SECRET, else AUTH_JWT_SECRET, else the dev file."""
    for candidate in (settings.state_secret, settings.jwt_secret):
        if candidate is not None:
            return candidate.get_secret_value().strip()
    if settings.asymmetric_configured:
        log.warning("AUTH_STATE_SECRET is not set: pending logins use the dev secret file (one host only)")
    return dev_secret()


@dataclass(frozen=True)
class AuthParts:
    """Adapters given instead of the ones built from the settings at start (tests, embedding);
    each None is built: the OAuth client over HTTP, the pending-login store in NATS KV, the
    vault over the bus, the grant key from AUTH_GRANT_PRIVATE_KEY or its file."""

    oauth_client: OAuthClient | None = None
    pending_store: PendingStore | None = None
    clock: Clock = utc_now
    vault_keys: VaultKeys | None = None
    vault_status: VaultStatus | None = None
    vault_grants: VaultGrants | None = None
    grant_signer: GrantSigner | None = None


class AuthRuntime:
    """Everything with a lifecycle behind the app: broker, pending-login store, OAuth client."""

    def __init__(self, settings: AuthSettings, *, broker: NatsBroker, parts: AuthParts | None = None) -> None:
        self.settings = settings
        self.broker = broker
        parts = parts or AuthParts()
        self._oauth_client = parts.oauth_client
        self._pending_store = parts.pending_store
        self._clock = parts.clock
        self._vault_keys = parts.vault_keys
        self._vault_status = parts.vault_status
        self._vault_grants = parts.vault_grants
        self._grant_signer = parts.grant_signer
        self._owned_oauth: OAuthClient | None = None
        self._broker_started = False

    async def start(self, app: FastAPI) -> None:
        settings = self.settings
        cached: list[str] = []

        def dev_secret() -> str:
            if not cached:
                cached.append(load_or_create_jwt_secret(settings.keys_dir))
                # On loopback this is the development setup `ccbridge up` makes: not news. A
                # listener other hosts can reach with a secret from a file is worth a warning.
                (log.info if is_loopback(settings.host) else log.warning)(
                    "AUTH_JWT_SECRET is not set: caller tokens use the dev secret file (development only)",
                    path=str(settings.keys_dir / JWT_SECRET_FILE), host=settings.host,
                )
            return cached[0]

        callers = build_verifier(settings, dev_secret)  # a bad key fails the start, loudly
        secret = state_secret(settings, dev_secret)
        signer = self._grant_signer or load_grant_signer(settings)
        vault_keys = self._vault_keys or VaultKeySource(env_value=settings.vault_public_key, keys_dir=settings.keys_dir)
        log.info("connecting to the bus", nats_url=_without_credentials(settings.nats_url))
        self._broker_started = True
        try:
            await self.broker.start()
            await provision(self.broker, settings)
            pending = self._pending_store or await KvPendingStore.open(
                self.broker.connection.jetstream(),
                RecordCipher(secret.encode()),
                ttl=timedelta(seconds=settings.login_ttl_s),
                replicas=settings.stream_replicas,
            )
            oauth = self._oauth_client
            if oauth is None:
                oauth = self._owned_oauth = HttpOAuthClient(
                    token_urls=settings.token_urls, timeout=settings.oauth_http_timeout
                )
        except BaseException:
            await self.stop(app)
            raise
        publisher = BrokerPublisher(self.broker)
        login = LoginService(
            policy=LoginPolicy(
                authorize_url=settings.oauth_authorize_url,
                redirect_uri=settings.oauth_redirect_uri,
                client_id=settings.oauth_client_id,
                scopes=settings.scopes,
                ttl=timedelta(seconds=settings.login_ttl_s),
                console_authorize_url=settings.oauth_console_authorize_url,
                legacy_redirect_uri=settings.legacy_redirect_uri,
                max_pending_per_caller=settings.max_pending_logins,
                code_attempts=settings.login_code_attempts,
            ),
            pending=pending,
            oauth=oauth,
            vault_keys=vault_keys,
            publisher=publisher,
            clock=self._clock,
        )
        connections = ConnectionService(
            vault=self._vault_status
            or NatsVaultStatus(lambda: self.broker.connection, timeout=settings.vault_timeout),
            publisher=publisher,
            clock=self._clock,
        )
        grants = GrantService(
            signer=signer,
            publisher=publisher,
            vault=self._vault_grants or NatsVaultGrants(lambda: self.broker.connection, timeout=settings.vault_timeout),
            clock=self._clock,
            policy=GrantPolicy(max_ttl_s=settings.grant_max_ttl_s),
        )

        async def readiness() -> dict[str, bool]:
            return {"bus": self.bus_connected(), "vault_key": vault_keys.current() is not None, "grant_key": True}

        app.state.components = AuthComponents(
            login=login,
            callers=callers,
            readiness=readiness,
            connections=connections,
            limiter=build_limiter(settings),
            grants=grants,
        )
        log.info(
            "auth runtime started",
            token_urls=",".join(settings.token_urls),
            authorize_url=settings.oauth_authorize_url,
            console_authorize_url=settings.oauth_console_authorize_url,
            callers=repr(callers),
            vault_key=vault_keys.current() is not None,
            grant_kid=signer.kid,
            grant_max_ttl_s=settings.grant_max_ttl_s,
        )

    def bus_connected(self) -> bool:
        try:
            return bool(self._broker_started and self.broker.connection.is_connected)
        except Exception:  # noqa: BLE001 - not connected (yet) in whatever way
            return False

    async def stop(self, app: FastAPI) -> None:
        app.state.components = None
        if self._owned_oauth is not None:
            await self._owned_oauth.aclose()
            self._owned_oauth = None
        if self._broker_started:
            self._broker_started = False
            with contextlib.suppress(Exception):
                await self.broker.stop()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class ProbeAccessFilter(logging.Filter):
    """uvicorn's access line of a probe (/healthz, /readyz, /metrics) goes out at DEBUG: the
    stack's readiness wait, orchestrators and scrapers call them every few seconds, and a 503
    from /readyz while starting is expected, not a refusal worth reading."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and str(args[2]).split("?", 1)[0] in OPS_PATHS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


PROBE_ACCESS_FILTER = ProbeAccessFilter()


def quiet_probe_access_logs() -> None:
    access = logging.getLogger("uvicorn.access")
    if PROBE_ACCESS_FILTER not in access.filters:
        access.addFilter(PROBE_ACCESS_FILTER)


def _without_credentials(url: str) -> str:
    head, sep, tail = url.rpartition("@")
    return f"{head.split('//')[0]}//***@{tail}" if sep else url


def create_app(settings: AuthSettings, *, broker: NatsBroker, parts: AuthParts | None = None) -> FastAPI:
    runtime = AuthRuntime(settings, broker=broker, parts=parts)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start(app)
        try:
            yield
        finally:
            await runtime.stop(app)

    app = build_api(
        AuthMetrics(), lifespan=lifespan, max_body_bytes=settings.max_body_bytes,
        frame_ancestors=settings.connect_frame_ancestors,
    )
    app.state.runtime = runtime
    return app


class CannotListen(Exception):
    """The HTTP listener cannot be opened (port taken, address not on this host, no permission)."""

    def __init__(self, host: str, port: int, error: OSError) -> None:
        self.host, self.port, self.errno = host, port, error.errno
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        hint = "AUTH_HOST" if error.errno == errno.EADDRNOTAVAIL else "AUTH_PORT"
        super().__init__(f"auth: cannot listen on {_host_port(host, port)}: {reason} (set {hint})")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"



class AuthService(Service):
    """`async with AuthService(settings) as auth: auth.base_url` — HTTP API on a real port."""

    name = "auth"

    def __init__(self, settings: AuthSettings, *, parts: AuthParts | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.broker = build_broker(settings)
        self.app = create_app(settings, broker=self.broker, parts=parts)
        self._runtime: AuthRuntime = self.app.state.runtime
        self._server: EmbeddedServer | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("AuthService is not started")
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def open(self, stack: AsyncExitStack) -> None:
        """HTTP first (so /healthz answers and /readyz says 503 while the bus is awaited), then
        the runtime; a runtime that fails to start takes the HTTP server down with it."""
        try:
            sock = bind_socket(self.settings.host, self.settings.port)
        except OSError as exc:
            raise CannotListen(self.settings.host, self.settings.port, exc) from None
        self.port = sock.getsockname()[1]
        quiet_probe_access_logs()
        config = uvicorn.Config(
            self.app, log_config=None, lifespan="off", server_header=False, timeout_graceful_shutdown=10
        )
        self._server = EmbeddedServer(config)
        stack.push_async_callback(self._stop_http)
        await self._server.launch(sock, "auth-http")
        stack.push_async_callback(self._runtime.stop, self.app)
        await self._runtime.start(self.app)
        log.info("auth service listening", url=self.base_url)
        stack.callback(log.info, "auth service stopped")  # (only a service that started says it stopped)

    async def wait_closed(self) -> None:
        """Returns when the HTTP server ends on its own (it should not)."""
        if self._server is not None and self._server.task is not None:
            await asyncio.shield(self._server.task)

    async def _stop_http(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        try:
            await server.finish(timeout_s=15)
        except Exception:  # noqa: BLE001 - the server failed; still release the rest
            log.warning("auth HTTP server ended with an error")

def main() -> None:
    def check(settings: AuthSettings) -> None:
        # Caller-key settings are checked before anything connects (a bad PEM is not a crash).
        build_verifier(settings, lambda: "x" * 32)

    run_service("auth", AuthSettings, AuthService, check=check, exit_codes={CannotListen: EXIT_CANNOT_LISTEN})
