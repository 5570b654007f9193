"""What Anthropic's OAuth token endpoint answers, for both of its callers: auth (code exchange)
and the vault (refresh). One model of the response and one reading of `Retry-After`."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.logging import get_logger

# Facts of the real Claude Code CLI (design.md): its public OAuth client and current token URL.
CLAUDE_CODE_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
TOKEN_URL = "https://platform.claude.com/v1/oauth/token"
SEED_TOKEN_URL = "https://console.anthropic.com/v1/oauth/token"  # the seed's name; answers 404 since mid-2026
# OAUTH_TOKEN_URLS' default: auth tries them in order, the next one only past a 404.
DEFAULT_TOKEN_URLS = f"{TOKEN_URL},{SEED_TOKEN_URL}"


log = get_logger(__name__)


def parse_token_urls(value: str) -> str:
    """OAUTH_TOKEN_URLS, checked and normalised: a comma separated list of http(s) URLs."""
    urls = [url.strip() for url in value.split(",") if url.strip()]
    if not urls or not all(url.startswith(("http://", "https://")) for url in urls):
        raise ValueError("OAUTH_TOKEN_URLS must be a comma separated list of http(s) URLs")
    return ",".join(urls)


def token_urls(token_url: str | None, urls: str) -> tuple[str, ...]:
    """The token endpoints in the order auth tries them: OAUTH_TOKEN_URL (if set) first, then
    OAUTH_TOKEN_URLS, without repeats. Auth and the vault read the two settings through this one
    function, so they always agree on the endpoint."""
    ordered = ([token_url] if token_url and token_url.strip() else []) + urls.split(",")
    return tuple(dict.fromkeys(url.strip() for url in ordered if url.strip()))


def primary_token_url(token_url: str | None, urls: str) -> str:
    """The one endpoint the vault refreshes and revokes at: OAUTH_TOKEN_URL if set, else the first
    of OAUTH_TOKEN_URLS — the endpoint auth exchanges with first."""
    return token_urls(token_url, urls)[0]


MAX_RETRY_AFTER_S = 3600.0
_TEN_YEARS_S = 10 * 365 * 24 * 3600


class TokenAccount(BaseModel):
    model_config = ConfigDict(extra="ignore")
    uuid: str | None = Field(default=None, max_length=256)
    email_address: str | None = Field(default=None, max_length=512)


class TokenOrganization(BaseModel):
    model_config = ConfigDict(extra="ignore")
    uuid: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=512)


class TokenEndpointResponse(BaseModel):
    """A successful token response (authorization_code or refresh_token grant). Validation
    errors never quote the input: it holds tokens."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    access_token: str = Field(min_length=1, max_length=8192)
    refresh_token: str | None = Field(default=None, min_length=1, max_length=8192)
    expires_in: int = Field(gt=0, le=_TEN_YEARS_S)
    refresh_token_expires_in: int | None = Field(default=None, ge=0, le=_TEN_YEARS_S)
    scope: str | None = Field(default=None, max_length=4096)
    account: TokenAccount | None = None
    organization: TokenOrganization | None = None


def parse_token_response(body: Any) -> TokenEndpointResponse | None:
    """A 200's JSON as a token response, or None when it is not one (logged by its field
    names only: the values are tokens)."""
    try:
        return TokenEndpointResponse.model_validate(body)
    except ValidationError:
        fields = sorted(body) if isinstance(body, dict) else type(body).__name__
        log.warning("token response not understood", fields=str(fields)[:200])
        return None


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from delta-seconds or an HTTP date, within [0, 1 h]; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (now if now is not None else time.time())
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def oauth_error_code(response: httpx.Response) -> str | None:
    """The `error` code of an error response (OAuth `{"error": "invalid_grant"}` or Anthropic API
    `{"error": {"type": ...}}`), never anything else from a body that may hold secrets."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("type")
    return error if isinstance(error, str) and len(error) < 64 else None
