"""HTTP request/response models (with the examples /docs shows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.events import CredentialMode, SandboxId
from shared.grants import MAX_TTL_S as MAX_GRANT_TTL_S

_EXAMPLE_STATE = "q5S7l0m0xY8c6pE0XJv7Yb0rQm9bV3wH2tXo1kZ4cGs"
_EXAMPLE_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXkdBjftJeZ4CVP"


class LoginIn(BaseModel):
    """Optional body of `POST /v1/claude-code/login` (no body = the defaults)."""

    account_type: Literal["claude_ai", "console"] = Field(
        default="claude_ai",
        description="`claude_ai`: a Claude.ai subscription (Pro/Max/Team); `console`: an Anthropic Console account.",
    )
    create_api_key: bool = Field(default=False, description="Also ask for `org:create_api_key`.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"account_type": "claude_ai"}, {"account_type": "console", "create_api_key": True}]
        },
    )


class LoginStartedOut(BaseModel):
    authorize_url: str = Field(description="Open this in the person's browser.")
    state: str = Field(description="The login's id; comes back in the pasted `code#state`.")
    expires_at: datetime = Field(description="The login must be completed before this time (UTC).")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "authorize_url": "https://claude.com/cai/oauth/authorize?code=true&client_id=9d1c250a-e61b-44d9-"
                    "88ed-5944d1962f5e&response_type=code&redirect_uri=https%3A%2F%2Fplatform.claude.com%2Foauth"
                    "%2Fcode%2Fcallback&scope=user%3Aprofile+user%3Ainference&code_challenge=E9Melhoa2OwvFrEMTJgu"
                    f"CHaoeK1t8URWbuGJSstw-cM&code_challenge_method=S256&state={_EXAMPLE_STATE}",
                    "state": _EXAMPLE_STATE,
                    "expires_at": "2026-11-28T12:10:00Z",
                }
            ]
        }
    )


class ExchangeIn(BaseModel):
    code: str = Field(
        min_length=1,
        max_length=4096,
        description="What the authorize page showed: `<code>#<state>` (or the code alone with `state`).",
    )
    state: str | None = Field(default=None, max_length=512, description="Only when `code` has no `#<state>`.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"code": f"hJ2kB0d3VtS0xw1Qy6n8Lr#{_EXAMPLE_STATE}"},
                {"code": "hJ2kB0d3VtS0xw1Qy6n8Lr", "state": _EXAMPLE_STATE},
            ]
        }
    )


class ConnectedOut(BaseModel):
    status: Literal["connected"] = "connected"
    expires_at: datetime = Field(description="When the access token expires (UTC); the vault refreshes it.")
    scopes: list[str] = Field(description="Scopes granted.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "connected",
                    "expires_at": "2026-11-28T20:00:00Z",
                    "scopes": ["user:profile", "user:inference", "user:sessions:claude_code"],
                }
            ]
        }
    )


class LegacyExchangeIn(BaseModel):
    authorization_code: str = Field(
        min_length=1,
        max_length=4096,
        pattern=r"^\s*[!-\"$-~]{1,2048}#[A-Za-z0-9._~-]{43,128}\s*$",
        description="`<code>#<verifier>`: the code, and the PKCE verifier the client generated (and sent as "
        "the OAuth `state`).",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"authorization_code": f"hJ2kB0d3VtS0xw1Qy6n8Lr#{_EXAMPLE_VERIFIER}"}]},
    )


class LegacyExchangeOut(BaseModel):
    success: Literal[True] = True

    model_config = ConfigDict(json_schema_extra={"examples": [{"success": True}]})


class SetupTokenIn(BaseModel):
    token: SecretStr = Field(
        min_length=20,
        max_length=2048,
        description="What `claude setup-token` printed: `sk-ant-oat01-…` (valid ~1 year, `user:inference` only).",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"token": "sk-ant-oat01-" + "x" * 20 + "…"}]},
    )


class AccountOut(BaseModel):
    account_uuid: str | None = None
    email: str | None = None
    organization_uuid: str | None = None
    organization_name: str | None = None


class StatusOut(BaseModel):
    user_id: str = Field(description="Whose status this is: the `sub` of the caller token (the ccbridge user id).")
    connected: bool = Field(description="The vault holds a connection for the caller.")
    state: Literal["connected", "refresh_failed", "reconnect_required", "not_connected"] = Field(
        description="`refresh_failed`: the last refresh failed, the vault keeps trying; `reconnect_required`: "
        "the login ended or was refused, connect again."
    )
    kind: Literal["oauth", "setup_token"] | None = Field(default=None, description="How the account was connected.")
    scopes: list[str] = Field(default_factory=list)
    expires_at: datetime | None = Field(default=None, description="Access-token expiry (UTC); the vault refreshes.")
    login_expires_at: datetime | None = Field(
        default=None, description="When the login itself ends (refresh does not extend it), if known."
    )
    account: AccountOut | None = Field(default=None, description="Account and organization, if the server sent them.")
    version: int | None = Field(default=None, description="Connection version (1 = first connect).")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "user-42",
                    "connected": True,
                    "state": "connected",
                    "kind": "oauth",
                    "scopes": ["user:profile", "user:inference"],
                    "expires_at": "2026-11-28T20:00:00Z",
                    "login_expires_at": "2026-12-28T12:00:00Z",
                    "account": {
                        "account_uuid": "1b6e2f0a-8c1d-4f3e-9a7b-2c5d8e0f1a3b",
                        "email": "person@example.com",
                        "organization_uuid": "7c9d1e2f-3a4b-5c6d-7e8f-9a0b1c2d3e4f",
                        "organization_name": "Example Org",
                    },
                    "version": 2,
                },
                {"user_id": "user-42", "connected": False, "state": "not_connected", "kind": None, "scopes": [],
                 "expires_at": None, "login_expires_at": None, "account": None, "version": None},
            ]
        }
    )


class RevokedOut(BaseModel):
    status: Literal["revoked"] = "revoked"
    event_id: str = Field(description="event_id of the `tokens.revoked` event published.")

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": "revoked", "event_id": "6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d"}]}
    )


_EXAMPLE_GRANT = (
    "eyJhbGciOiJFZERTQSIsImtpZCI6IjNmMmE5YzFkOGU3YjZhNTQiLCJ0eXAiOiJjY2JyaWRnZS1ncmFudCtqd3QifQ."
    "eyJpc3MiOiJjY2JyaWRnZS1hdXRoIiwiYXVkIjoiY2NicmlkZ2UtdmF1bHQiLCJzdWIiOiJ1c2VyLTQyIiwic2J4Ijoic2J4LTEyMyIs"
    "Im1vZGUiOiJhY2Nlc3Nfb25seSIsImlhdCI6MTc2NDMzMTIwMCwiZXhwIjoxNzY0NDE3NjAwLCJqdGkiOiI5YjFkZTY0YzNhN2Y0ZTIw"
    "YjhjNWQxZjBhMmU0YjZjOCJ9.mC3pQ0wQm9Vd0tGZ0VhS1pLVnF6dWJ4b3l3a2N0Q0x6a2ZqVnR5b2Fhc0h0d2V6a0xvQ2hQZ2VaQQ"
)


class GrantIn(BaseModel):
    """Body of `POST /v1/claude-code/grants`: which sandbox may hold the caller's Claude credentials, how, how long."""

    sandbox_id: SandboxId
    mode: CredentialMode = Field(
        default="access_only",
        description="The strongest credential mode the sandbox may receive: `access_only` and `env` carry the "
        "access token only, `file` also the refresh token (the whole login).",
    )
    ttl_s: int | None = Field(
        default=None, ge=60, le=MAX_GRANT_TTL_S,
        description="Length of the lease in seconds: 60 up to GRANT_MAX_TTL_S (default 7 days). Default: 86400, "
        "or GRANT_MAX_TTL_S if that is shorter.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"sandbox_id": "sbx-123"},
                {"sandbox_id": "sbx-123", "mode": "file", "ttl_s": 3600},
            ]
        },
    )


class GrantOut(BaseModel):
    grant: str = Field(
        description="The grant: a compact JWS (EdDSA) for the platform to put into `sandbox.created`. It names the "
        "caller (`sub`), the sandbox (`sbx`), the mode and the expiry (`exp`)."
    )
    sandbox_id: str
    mode: CredentialMode
    expires_at: datetime = Field(description="When the lease ends (UTC): the sandbox is scrubbed then.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"grant": _EXAMPLE_GRANT, "sandbox_id": "sbx-123", "mode": "access_only",
                 "expires_at": "2026-11-29T12:00:00Z"}
            ]
        }
    )


class LeaseOut(BaseModel):
    sandbox_id: str
    mode: CredentialMode = Field(description="The strongest mode the newest grant allows.")
    issued_at: datetime = Field(description="When the newest grant for this sandbox was signed (UTC).")
    expires_at: datetime = Field(description="When the lease ends (UTC).")
    last_injected_at: datetime | None = Field(
        default=None, description="When the vault last released credentials for this sandbox (UTC), if ever."
    )


class GrantsOut(BaseModel):
    grants: list[LeaseOut] = Field(description="The caller's live leases, as the vault holds them.")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "grants": [
                        {"sandbox_id": "sbx-123", "mode": "access_only", "issued_at": "2026-11-28T12:00:00Z",
                         "expires_at": "2026-11-29T12:00:00Z", "last_injected_at": "2026-11-28T12:00:02Z"},
                        {"sandbox_id": "sbx-456", "mode": "file", "issued_at": "2026-11-28T13:00:00Z",
                         "expires_at": "2026-11-28T14:00:00Z", "last_injected_at": None},
                    ]
                },
                {"grants": []},
            ]
        }
    )


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["https://ccbridge.dev/problems/invalid-state"])
    title: str = Field(examples=["Unknown or expired login"])
    status: int = Field(examples=[400])
    detail: str = Field(examples=["This login is unknown, expired or already used: start a new login."])
    instance: str | None = Field(default=None, examples=["/v1/claude-code/exchange"])


class ReadinessOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool] = Field(examples=[{"bus": True, "vault_key": True, "grant_key": True}])

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"status": "ready", "checks": {"bus": True, "vault_key": True, "grant_key": True}}]
        }
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    schema = Problem.model_json_schema()
    return {
        status: {
            "description": PROBLEM_DESCRIPTIONS.get(status, "Error"),
            "content": {
                "application/problem+json": {"schema": schema, "example": PROBLEM_EXAMPLES.get(status, PROBLEM_EXAMPLES[400])}
            },
            **({"headers": _RETRY_AFTER} if status in (429, 503) else {}),
        }
        for status in statuses
    }


# Every operation can answer these (authentication, body limit, rate limits, abuse of the API).
COMMON_PROBLEMS = (401, 403, 413, 422, 503)
PROBLEM_DESCRIPTIONS = {
    400: "Malformed input, unknown/expired/used login, or the code was rejected",
    401: "Missing, invalid or expired bearer token",
    403: "The token is for another audience/issuer, or the login belongs to another caller",
    413: "The request body is too large",
    422: "The body or parameters are not valid",
    429: "Too many requests or too many logins in progress; see Retry-After",
    502: "The authorization server or the vault answered nonsense or failed",
    503: "A dependency is unavailable (service starting, upstream rate limit, vault, bus, store); see Retry-After",
    504: "The authorization server timed out",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}}


def _problem_example(status: int, slug: str, title: str, detail: str) -> dict[str, Any]:
    return {"type": f"https://ccbridge.dev/problems/{slug}", "title": title, "status": status, "detail": detail,
            "instance": "/v1/claude-code/exchange"}


PROBLEM_EXAMPLES = {
    400: _problem_example(400, "invalid-state", "Unknown or expired login",
                          "This login is unknown, expired or already used: start a new login."),
    401: _problem_example(401, "unauthorized", "Unauthorized", "The bearer token has expired."),
    403: _problem_example(403, "forbidden-state", "Login belongs to someone else",
                          "This login was started by another caller."),
    413: _problem_example(413, "payload-too-large", "Payload too large", "The request body is larger than 16384 bytes."),
    422: _problem_example(422, "invalid-request", "Invalid request", "The request body or parameters are not valid."),
    429: _problem_example(429, "rate-limited", "Too many requests",
                          "Too many requests of this kind from this caller; retry after the indicated delay."),
    502: _problem_example(502, "upstream-error", "Authorization server error",
                          "The authorization server failed or could not be reached; retry shortly."),
    503: _problem_example(503, "upstream-rate-limited", "Authorization server busy",
                          "The authorization server is rate limiting; retry after the indicated delay."),
    504: _problem_example(504, "upstream-timeout", "Authorization server timeout",
                          "The authorization server did not answer in time; retry shortly."),
}
