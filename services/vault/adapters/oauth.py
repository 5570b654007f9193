"""The OAuth token endpoint, as the refresher uses it: exactly the request the real Claude Code
CLI sends — `POST OAUTH_TOKEN_URL`, JSON `{"grant_type":"refresh_token","refresh_token",
"client_id","scope"}` — over one reused `httpx.AsyncClient`. Disconnecting revokes the login the
way `claude auth logout` does: `POST <OAUTH_TOKEN_URL>/revoke`, JSON `{"token", "token_type_hint":
"refresh_token", "client_id"}`, 5 s timeout.

Answers map to the vault's error tree: 400/401 `invalid_grant` → `RefreshRejected` (only a
new login helps); 429 / 5xx / timeouts / connection errors / a body that is not a token
response → `RefreshTransient` (back off, try again), with the server's Retry-After. Nothing
from a response body is logged except the OAuth error code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from services.vault.errors import RefreshRejected, RefreshTransient
from services.vault.ports import TokenResponse
from shared.logging import get_logger
from shared.oauth import oauth_error_code, parse_token_response
from shared.oauth import retry_after_seconds as parse_retry_after

log = get_logger(__name__)

USER_AGENT = "ccbridge-vault/0.1"
REVOKE_TIMEOUT_S = 5.0  # what the CLI allows its logout revoke


def _token_response(body: Any) -> TokenResponse:
    parsed = parse_token_response(body)
    if parsed is None:
        raise RefreshTransient("the token endpoint answered 200 without a token response", outcome="bad_response")
    account: dict[str, object] | None = None
    if parsed.account or parsed.organization:
        account = {
            "account_uuid": parsed.account.uuid if parsed.account else None,
            "email": parsed.account.email_address if parsed.account else None,
            "organization_uuid": parsed.organization.uuid if parsed.organization else None,
            "organization_name": parsed.organization.name if parsed.organization else None,
        }
    return TokenResponse(
        access_token=parsed.access_token,
        refresh_token=parsed.refresh_token,
        expires_in=parsed.expires_in,
        scope=parsed.scope,
        refresh_token_expires_in=parsed.refresh_token_expires_in,
        account=account,
    )


class HttpTokenEndpoint:
    """`TokenEndpoint` over HTTP. Give it a client to share one connection pool (the vault
    does), or let it make and own one."""

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        timeout_s: float = 15.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._timeout = httpx.Timeout(timeout_s)
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=self._timeout,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"HttpTokenEndpoint(token_url={self.token_url!r})"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    @property
    def revoke_url(self) -> str:
        return self.token_url.rstrip("/") + "/revoke"

    async def revoke(self, refresh_token: str) -> None:
        body = {"token": refresh_token, "token_type_hint": "refresh_token", "client_id": self.client_id}
        try:
            response = await self._client.post(
                self.revoke_url, json=body, timeout=httpx.Timeout(REVOKE_TIMEOUT_S),
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
        except httpx.TimeoutException:
            raise RefreshTransient("the revoke endpoint timed out", outcome="timeout") from None
        except httpx.HTTPError as exc:
            raise RefreshTransient(f"the revoke endpoint is unreachable ({type(exc).__name__})") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        if status == 429 or status >= 500:
            raise RefreshTransient(f"the revoke endpoint answered {status}",
                                   retry_after_s=parse_retry_after(response.headers.get("retry-after")))
        # 400 invalid_grant/invalid_token: the token is dead already — as good as revoked.
        raise RefreshRejected(oauth_error_code(response) or f"status {status}")

    async def refresh(self, refresh_token: str, scopes: Sequence[str]) -> TokenResponse:
        body: dict[str, str] = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.client_id,
        }
        if scopes:
            body["scope"] = " ".join(scopes)
        try:
            response = await self._client.post(
                self.token_url,
                json=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=self._timeout,
            )
        except httpx.TimeoutException:
            raise RefreshTransient("the token endpoint timed out", outcome="timeout") from None
        except httpx.HTTPError as exc:
            raise RefreshTransient(f"the token endpoint is unreachable ({type(exc).__name__})") from None
        status = response.status_code
        if status == 200:
            try:
                payload = response.json()
            except ValueError:
                raise RefreshTransient("the token endpoint answered 200 without JSON", outcome="bad_response") from None
            return _token_response(payload)
        error = oauth_error_code(response)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status in (400, 401) and error == "invalid_grant":
            raise RefreshRejected("invalid_grant")
        if status == 429:
            raise RefreshTransient("rate limited by the token endpoint", outcome="rate_limited",
                                   retry_after_s=retry_after)
        if status >= 500:
            raise RefreshTransient(f"the token endpoint answered {status}", retry_after_s=retry_after)
        # Another 4xx (invalid_request, invalid_client, invalid_scope, 404 …): most likely our
        # configuration (OAUTH_TOKEN_URL / OAUTH_CLIENT_ID). Not the person's fault: keep the
        # connection, back off, log loudly.
        log.error("refresh rejected by the token endpoint", status=status, error=error)
        raise RefreshTransient(f"the token endpoint answered {status} {error or ''}".strip(), outcome="rejected",
                               retry_after_s=retry_after)
