"""Helpers shared by the auth service's tests.

Unit fakes (hand-written, no mocks): FakeClock, FakeOAuth, FakeVaultKeys, FakePublisher,
FakeVaultStatus, FakeVaultGrants, a_grant. Real-parts helpers: settings for an AuthService wired
to the OAuth stand-in, the browser-like `begin`/`exchange` steps, `VaultResponder` (a small
real-NATS stand-in for the vault's `vault.connections.status` and `vault.grants.list` answers),
caller-token minting for HS256 / RSA / JWKS, `AuthStackThread` (the whole thing on its own event
loop in a thread, for sync clients such as schemathesis) and `AuthProcess` (`python -m
services.auth` as a process).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import nats
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from nats.aio.client import Client

from services.auth.callers import mint_caller_token
from services.auth.domain import CodeExchange, TokenGrant
from services.auth.errors import BusUnavailable, UpstreamError, VaultUnavailable
from services.auth.settings import AuthSettings
from shared import subjects
from shared.broker import settle
from shared.events import (
    ConnectionStatusReply,
    ConnectionStatusRequest,
    Event,
    GrantIssued,
    GrantRevoked,
    GrantsListReply,
    GrantsListRequest,
    GrantView,
    TokensIssued,
    TokensRevoked,
)
from shared.sealing import KeyPair, Recipient
from standins.oauth import OAuthStandin

ACCESS = "sk-ant-oat01-unit-access-token-value"
REFRESH = "sk-ant-ort01-unit-refresh-token-value"
JWT_SECRET = "integration-jwt-secret-" + "q" * 32
PROBLEM = "application/problem+json"
PASTE = re.compile(r'<code id="paste-code">([^<]+)</code>')


# --- unit fakes ------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FakeOAuth:
    grant: TokenGrant | None = None
    error: UpstreamError | None = None
    requests: list[CodeExchange] = field(default_factory=list)

    async def exchange_code(self, request: CodeExchange) -> TokenGrant:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        assert self.grant is not None
        return self.grant

    async def aclose(self) -> None:
        pass


@dataclass
class FakeVaultKeys:
    recipient: Recipient | None

    def current(self) -> Recipient | None:
        return self.recipient


@dataclass
class FakePublisher:
    fail: bool = False
    published: list[tuple[str, Event]] = field(default_factory=list)

    async def publish(self, subject: str, event: Event) -> None:
        if self.fail:
            raise BusUnavailable()
        self.published.append((subject, event))


@dataclass
class FakeVaultStatus:
    replies: dict[str, ConnectionStatusReply] = field(default_factory=dict)
    down: bool = False

    async def status(self, user_id: str) -> ConnectionStatusReply:
        if self.down:
            raise VaultUnavailable()
        return self.replies.get(user_id, ConnectionStatusReply(connected=False))


@dataclass
class FakeVaultGrants:
    """The vault's leases per (user, sandbox), as `vault.grants.list` would answer them."""

    leases: dict[tuple[str, str], GrantView] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    down: bool = False

    def lease(self, user_id: str, sandbox_id: str, *, mode: str = "access_only", issued_at: int = 1_764_331_200_000,
              expires_at: int = 1_764_417_600_000, last_injected_at: int | None = None) -> None:
        self.leases[(user_id, sandbox_id)] = GrantView(
            sandbox_id=sandbox_id, mode=mode, issued_at=issued_at, expires_at=expires_at,
            last_injected_at=last_injected_at,
        )

    async def grants(self, user_id: str) -> GrantsListReply:
        self.asked.append(user_id)
        if self.down:
            raise VaultUnavailable()
        return GrantsListReply(grants=[view for (user, _), view in self.leases.items() if user == user_id])


def a_grant(**overrides: object) -> TokenGrant:
    values: dict[str, object] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "expires_in": 28800,
        "refresh_token_expires_in": 2592000,
        "scopes": ("user:profile", "user:inference"),
        "account_uuid": "acc-1",
        "email": "a@example.com",
        "organization_uuid": "org-1",
        "organization_name": "Org",
    }
    values.update(overrides)
    return TokenGrant(**values)


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


# --- caller tokens --------------------------------------------------------------------------
def bearer(user: str, secret: str = JWT_SECRET, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_caller_token(secret, user, **claims)}"}


@dataclass
class SigningKey:
    """An asymmetric caller-token issuer (what a platform with its own IdP has)."""

    private_key: Any
    algorithm: str
    kid: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    @classmethod
    def rsa(cls) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")

    @classmethod
    def ec(cls) -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP256R1()), "ES256")

    def public_pem(self) -> str:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        data = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def token(self, user: str, *, ttl_s: int = 600, with_kid: bool = True, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"sub": user, "iat": now, "exp": now + ttl_s, **claims}
        headers = {"kid": self.kid} if with_kid else None
        return jwt.encode(body, self.private_key, algorithm=self.algorithm, headers=headers)

    def bearer(self, user: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user, **kwargs)}"}


# --- real parts -----------------------------------------------------------------------------
def settings_for(
    nats_url: str, data_dir: Path, standin: OAuthStandin, vault: KeyPair | None, **extra: object
) -> AuthSettings:
    """Everything points at loopback: the stand-in for both account types and as the ONLY
    token endpoint (no fallback to the real ones)."""
    values: dict[str, object] = {
        "nats_url": nats_url,
        "data_dir": data_dir,
        "host": "127.0.0.1",
        "port": 0,
        "jwt_secret": JWT_SECRET,
        "oauth_authorize_url": standin.claude_ai_authorize_url,
        "oauth_console_authorize_url": standin.console_authorize_url,
        "oauth_token_url": standin.token_url,
        "oauth_token_urls": standin.token_url,
        "oauth_redirect_uri": standin.callback_url,
        "vault_public_key": vault.recipient.public_b64 if vault else None,
        "vault_timeout": 1.0,
    }
    values.update(extra)
    return AuthSettings(**values)


async def follow_authorize(http: httpx.AsyncClient, authorize_url: str) -> str:
    """Act as the browser: authorize (auto-approved) → callback page → the string to paste."""
    page = await http.get(authorize_url, follow_redirects=True)
    assert page.status_code == 200, page.text
    match = PASTE.search(page.text)
    assert match, page.text
    return html.unescape(match.group(1))


async def begin(
    http: httpx.AsyncClient, base_url: str, user: str, secret: str = JWT_SECRET, body: dict | None = None
) -> str:
    started = await http.post(
        f"{base_url}/v1/claude-code/login", headers=bearer(user, secret), **({"json": body} if body else {})
    )
    assert started.status_code == 201, started.text
    pasted = await follow_authorize(http, started.json()["authorize_url"])
    assert pasted.endswith("#" + started.json()["state"])
    return pasted


async def exchange(
    http: httpx.AsyncClient, base_url: str, user: str, pasted: str, secret: str = JWT_SECRET
) -> httpx.Response:
    return await http.post(f"{base_url}/v1/claude-code/exchange", headers=bearer(user, secret), json={"code": pasted})


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"] and "`" not in body["detail"], body  # plain words
    assert isinstance(body["type"], str)
    if slug:
        assert body["type"].endswith("/" + slug), body
    return body


class VaultResponder:
    """A stand-in for the vault's side of `vault.connections.status` and `vault.grants.list`, on
    a real NATS server.

    It learns connections from what auth publishes (core subscriptions also see JetStream
    publishes): `tokens.issued` → connected (or what `override` says), `tokens.revoked` → gone;
    and leases: `grants.issued` → the newest grant per (person, sandbox), `grants.revoked` → gone.
    `mode`: "answer" | "silent" (subscribed, never answers) | "garbage" (answers nonsense)."""

    def __init__(self, nats_url: str, *, mode: str = "answer") -> None:
        self.nats_url = nats_url
        self.mode = mode
        self.connections: dict[str, ConnectionStatusReply] = {}
        self.requests: list[ConnectionStatusRequest] = []
        self.revoked: list[TokensRevoked] = []
        self.issued: list[TokensIssued] = []
        self.leases: dict[tuple[str, str], GrantView] = {}
        self.grants_issued: list[GrantIssued] = []
        self.grants_revoked: list[GrantRevoked] = []
        self.grant_requests: list[GrantsListRequest] = []
        self._nc: Client | None = None

    async def __aenter__(self) -> VaultResponder:
        self._nc = await nats.connect(self.nats_url, name="test-vault-responder")
        await self._nc.subscribe(subjects.VAULT_CONNECTIONS_STATUS, cb=self._on_status)
        await self._nc.subscribe(subjects.TOKENS_ISSUED, cb=self._on_issued)
        await self._nc.subscribe(subjects.TOKENS_REVOKED, cb=self._on_revoked)
        await self._nc.subscribe(subjects.VAULT_GRANTS_LIST, cb=self._on_grants_list)
        await self._nc.subscribe(subjects.GRANTS_ISSUED, cb=self._on_grant_issued)
        await self._nc.subscribe(subjects.GRANTS_REVOKED, cb=self._on_grant_revoked)
        await settle(self._nc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()

    def set(self, user_id: str, **fields: Any) -> None:
        self.connections[user_id] = ConnectionStatusReply(**{"connected": True, **fields})

    async def _on_status(self, msg) -> None:
        if self.mode == "silent":
            return
        if self.mode == "garbage":
            await msg.respond(b'{"connected": "perhaps", "state": 12}')
            return
        request = ConnectionStatusRequest.model_validate_json(msg.data)
        self.requests.append(request)
        reply = self.connections.get(request.user_id, ConnectionStatusReply(connected=False))
        await msg.respond(reply.model_dump_json().encode())

    async def _on_issued(self, msg) -> None:
        event = TokensIssued.model_validate_json(msg.data)
        self.issued.append(event)
        previous = self.connections.get(event.user_id)
        self.connections[event.user_id] = ConnectionStatusReply(
            connected=True,
            state="connected",
            kind=event.kind,
            scopes=event.scopes,
            expires_at=event.expires_at,
            refresh_token_expires_at=event.refresh_token_expires_at,
            account=event.account,
            version=(previous.version or 0) + 1 if previous and previous.connected else 1,
        )

    async def _on_revoked(self, msg) -> None:
        event = TokensRevoked.model_validate_json(msg.data)
        self.revoked.append(event)
        self.connections.pop(event.user_id, None)

    async def _on_grants_list(self, msg) -> None:
        if self.mode == "silent":
            return
        if self.mode == "garbage":
            await msg.respond(b'{"grants": "many"}')
            return
        request = GrantsListRequest.model_validate_json(msg.data)
        self.grant_requests.append(request)
        mine = [view for (user, _), view in sorted(self.leases.items()) if user == request.user_id]
        await msg.respond(GrantsListReply(grants=mine).model_dump_json().encode())

    async def _on_grant_issued(self, msg) -> None:
        event = GrantIssued.model_validate_json(msg.data)
        self.grants_issued.append(event)
        claims = jwt.decode(event.grant, options={"verify_signature": False})  # the real vault verifies
        key = (event.user_id, event.sandbox_id)
        previous = self.leases.get(key)
        if previous is None or claims["iat"] * 1000 >= previous.issued_at:  # the newest grant wins
            self.leases[key] = GrantView(sandbox_id=event.sandbox_id, mode=claims["mode"],
                                         issued_at=claims["iat"] * 1000, expires_at=claims["exp"] * 1000)

    async def _on_grant_revoked(self, msg) -> None:
        event = GrantRevoked.model_validate_json(msg.data)
        self.grants_revoked.append(event)
        self.leases.pop((event.user_id, event.sandbox_id), None)

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        async def poll() -> None:
            while not predicate():
                await asyncio.sleep(0.02)

        await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def serving(app: Any, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Any ASGI app under uvicorn on a free loopback port (e.g. a JWKS endpoint)."""
    import socket

    import uvicorn

    class _Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()

    sock = socket.socket()
    sock.bind((host, 0))
    sock.setblocking(False)
    server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


def openapi_examples_missing(spec: dict[str, Any]) -> list[str]:
    """Operations whose success response or request body has no example."""
    schemas = spec.get("components", {}).get("schemas", {})

    def has_example(media: dict[str, Any]) -> bool:
        if "example" in media or "examples" in media:
            return True
        schema = media.get("schema", {})
        ref = schema.get("$ref", "")
        target = schemas.get(ref.rsplit("/", 1)[-1], {}) if ref else schema
        return bool(target.get("examples") or target.get("example"))

    missing = []
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            ok = [r for code, r in operation.get("responses", {}).items() if code.startswith("2") and code != "204"]
            if not ok and "204" in operation.get("responses", {}):
                ok = [{"content": {"none": {"example": ""}}}]  # 204 No Content: nothing to exemplify
            medias = [m for r in ok for m in r.get("content", {}).values()]
            if not medias or not all(has_example(m) for m in medias):
                missing.append(f"{method.upper()} {path} response")
            body = operation.get("requestBody", {}).get("content", {})
            if body and not all(has_example(m) for m in body.values()):
                missing.append(f"{method.upper()} {path} body")
    return missing


REPO = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without any auth/OAuth/vault setting of the machine, plus `extra`."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "OAUTH_", "VAULT_", "GRANT_"))}
    return {**base, **extra}


class AuthProcess:
    """`python -m services.auth` as its own process (as `ccbridge up` runs it), ready when
    /readyz says 200. `lines()` are its JSON log lines."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = int(env["AUTH_PORT"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: Any = None

    def __enter__(self) -> AuthProcess:
        import subprocess
        import sys

        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.auth"], env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise AssertionError("auth did not become ready: " + self.log_path.read_text()[-2000:])

    def __exit__(self, *exc: object) -> None:
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def lines(self) -> list[dict[str, Any]]:
        import json

        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


# --- pytest fixtures (import them into a test module to use them) ------------------------------
@pytest.fixture
def vault_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
async def standin() -> AsyncIterator[OAuthStandin]:
    async with OAuthStandin(port=0) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


@pytest.fixture
async def vault_responder(nats_url: str) -> AsyncIterator[VaultResponder]:
    async with VaultResponder(nats_url) as responder:
        yield responder


# --- the whole stack in a thread (for sync clients) ---------------------------------------------
class AuthStackThread:
    """OAuth stand-in + vault responder + AuthService on a private event loop in a thread."""

    def __init__(self, nats_url: str, data_dir: Path, **settings: object) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.extra = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="auth-stack", daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self.base_url = ""
        self.responder: VaultResponder | None = None
        self.standin: OAuthStandin | None = None

    def _run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        from services.auth.app import AuthService

        self.standin = await self._stack.enter_async_context(OAuthStandin(port=0))
        self.responder = await self._stack.enter_async_context(VaultResponder(self.nats_url))
        settings = settings_for(self.nats_url, self.data_dir, self.standin, KeyPair.generate(), **self.extra)
        service = await self._stack.enter_async_context(AuthService(settings))
        self.base_url = service.base_url

    def __enter__(self) -> AuthStackThread:
        self.thread.start()
        self._run(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._run(self._stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@contextlib.contextmanager
def auth_stack_thread(nats_url: str, data_dir: Path, **settings: object) -> Iterator[AuthStackThread]:
    with AuthStackThread(nats_url, data_dir, **settings) as stack:
        yield stack


__all__ = [
    "ACCESS",
    "JWT_SECRET",
    "PROBLEM",
    "REFRESH",
    "AuthProcess",
    "AuthStackThread",
    "FakeClock",
    "FakeOAuth",
    "FakePublisher",
    "FakeVaultKeys",
    "FakeVaultGrants",
    "FakeVaultStatus",
    "SigningKey",
    "VaultResponder",
    "a_grant",
    "assert_problem",
    "auth_stack_thread",
    "begin",
    "bearer",
    "clean_env",
    "exchange",
    "follow_authorize",
    "new_user",
    "openapi_examples_missing",
    "serving",
    "settings_for",
]
