"""HTTP request/response models (with the examples /docs shows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_EXAMPLE_STATE = "q5S7l0m0xY8c6pE0XJv7Yb0rQm9bV3wH2tXo1kZ4cGs"


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
    checks: dict[str, bool] = Field(examples=[{"bus": True, "vault_key": True}])


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Malformed code, unknown/expired/used login, or the code was rejected",
        401: "Missing, invalid or expired bearer token",
        403: "The login belongs to another caller",
        422: "The body is not valid",
        502: "The authorization server failed or answered nonsense",
        503: "A dependency is unavailable (rate limit upstream, vault key, bus, store); see Retry-After",
        504: "The authorization server timed out",
    }
    schema = Problem.model_json_schema()
    return {
        status: {
            "description": descriptions.get(status, "Error"),
            "content": {"application/problem+json": {"schema": schema}},
        }
        for status in statuses
    }
