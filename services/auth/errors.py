"""One error tree for the auth service — plain exceptions, no web framework: the HTTP layer
(services/auth/problems.py) renders them as RFC 9457 problem+json.

Every error carries its HTTP status, a stable `slug` (the tail of the problem `type` URI and the
metrics outcome) and a human `detail` that never contains token material or upstream bodies.
"""

from __future__ import annotations

from typing import Any

PROBLEM_TYPE_BASE = "https://ccbridge.dev/problems/"


class AuthError(Exception):
    status: int = 500
    slug: str = "internal"
    title: str = "Internal error"
    default_detail: str = "The request could not be completed."

    def __init__(
        self, detail: str | None = None, *, headers: dict[str, str] | None = None, **extensions: Any
    ) -> None:
        self.detail = detail or self.default_detail
        self.headers = headers or {}
        self.extensions = extensions  # extra members of the problem document (RFC 9457 §3.2)
        super().__init__(self.detail)

    @property
    def type_uri(self) -> str:
        return PROBLEM_TYPE_BASE + self.slug


# --- caller / input ----------------------------------------------------------
class Unauthorized(AuthError):
    status, slug, title = 401, "unauthorized", "Unauthorized"
    default_detail = "A valid bearer token is required."

    def __init__(self, detail: str | None = None, *, token_sent: bool = False) -> None:
        # RFC 6750 §3: `error="invalid_token"` only when a token was presented.
        challenge = 'Bearer realm="ccbridge"' + (', error="invalid_token"' if token_sent else "")
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class ForbiddenToken(AuthError):
    """The token's signature is good, but it was issued for another audience or by another issuer."""

    status, slug, title = 403, "forbidden-token", "Token not meant for this service"
    default_detail = "The bearer token is genuine but was not issued for this service."


class CallerKeysUnavailable(AuthError):
    status, slug, title = 503, "caller-keys-unavailable", "Caller keys unavailable"
    default_detail = "The keys that verify bearer tokens (JWKS) cannot be fetched right now; retry shortly."

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class RateLimited(AuthError):
    status, slug, title = 429, "rate-limited", "Too many requests"
    default_detail = "Too many requests of this kind from this caller; retry after the indicated delay."

    def __init__(self, retry_after_s: int, detail: str | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class TooManyPendingLogins(RateLimited):
    slug, title = "too-many-pending-logins", "Too many logins in progress"
    default_detail = "This caller already has the maximum number of logins in progress: finish one or wait."


class InvalidSetupToken(AuthError):
    status, slug, title = 400, "invalid-token-format", "Not a Claude Code long-lived token"
    default_detail = "Paste the token that claude setup-token printed (it starts with sk-ant-oat01-)."


class InvalidPaste(AuthError):
    status, slug, title = 400, "invalid-code-format", "Malformed authorization code"
    default_detail = "Paste the whole code#state string shown after authorizing."


class InvalidState(AuthError):
    status, slug, title = 400, "invalid-state", "Unknown or expired login"
    default_detail = "This login is unknown, expired or already used: start a new login."


class ForeignState(AuthError):
    status, slug, title = 403, "forbidden-state", "Login belongs to someone else"
    default_detail = "This login was started by another caller."


# --- upstream (OAuth token endpoint) ------------------------------------------
class UpstreamError(AuthError):
    """Something about the token endpoint. `retryable`: the same code may still work later."""

    retryable: bool = False


class InvalidCode(UpstreamError):
    """The token endpoint refused the code (400/401/403). `oauth_error` is the OAuth `error` name
    it gave, if any (`invalid_grant` for a wrong, used or expired code)."""

    status, slug, title = 400, "invalid-code", "Authorization code rejected"
    default_detail = "The authorization server rejected the code; this login is used up: start a new login."

    def __init__(self, detail: str | None = None, *, oauth_error: str | None = None, **extensions: Any) -> None:
        self.oauth_error = oauth_error
        super().__init__(detail, **extensions)


class UpstreamRateLimited(UpstreamError):
    status, slug, title = 503, "upstream-rate-limited", "Authorization server busy"
    default_detail = "The authorization server is rate limiting; retry after the indicated delay."
    retryable = True

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(headers={"Retry-After": str(retry_after_s)})


class UpstreamUnavailable(UpstreamError):
    status, slug, title = 502, "upstream-error", "Authorization server error"
    default_detail = "The authorization server failed or could not be reached; retry shortly."
    retryable = True


class UpstreamTimeout(UpstreamError):
    status, slug, title = 504, "upstream-timeout", "Authorization server timeout"
    default_detail = "The authorization server did not answer in time; retry shortly."
    retryable = True


class UpstreamBadResponse(UpstreamError):
    status, slug, title = 502, "upstream-bad-response", "Unexpected answer from the authorization server"
    default_detail = "The authorization server answered with something that is not a token response."


# --- our own dependencies -------------------------------------------------------
class VaultKeyUnavailable(AuthError):
    status, slug, title = 503, "vault-key-unavailable", "Vault key unknown"
    default_detail = "The vault's public key is not known yet, so tokens cannot be sealed; retry shortly."

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class StoreUnavailable(AuthError):
    status, slug, title = 503, "store-unavailable", "Login store unavailable"
    default_detail = "Pending logins cannot be read or written right now; retry shortly."

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "2"})


class VaultUnavailable(AuthError):
    status, slug, title = 503, "vault-unavailable", "Vault unavailable"
    default_detail = "The vault did not answer; the connection status is unknown right now. Retry shortly."

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class VaultBadReply(AuthError):
    status, slug, title = 502, "vault-bad-reply", "Unexpected answer from the vault"
    default_detail = "The vault answered with something this service does not understand."


class BusUnavailable(AuthError):
    status, slug, title = 503, "bus-unavailable", "Event bus unavailable"
    default_detail = "The tokens could not be handed to the vault; start a new login."


class InvalidGrantRequest(AuthError):
    """A grant request that is well formed but outside what this service allows (a setting, so
    the schema cannot say it): the same 422 `invalid-request` as any other invalid field."""

    status, slug, title = 422, "invalid-request", "Invalid request"
    default_detail = "The request body or parameters are not valid."

    def __init__(self, detail: str, *, field: str, msg: str, type_: str) -> None:
        super().__init__(detail, errors=[{"loc": ["body", field], "msg": msg, "type": type_}])
