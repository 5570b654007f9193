"""The OAuth token endpoint over httpx: one AsyncClient per service, reused.

Requests are byte-for-byte what the real CLI sends (JSON body, the same six fields). Failures
become the `UpstreamError` family; response bodies are never logged or put into errors.

Several token URLs may be configured (the current one first, the seed's older one after it):
the next one is tried only when one answers 404, i.e. the endpoint does not exist there and the
code was never looked at. Any other answer, a timeout or a broken connection ends the attempt:
a code is never sent again once a server may have seen it.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from services.auth.domain import CodeExchange, TokenGrant
from services.auth.errors import (
    InvalidCode,
    UpstreamBadResponse,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from shared.logging import get_logger
from shared.oauth import oauth_error_code, parse_token_response, retry_after_seconds

log = get_logger(__name__)

USER_AGENT = "ccbridge-auth/0.1"
DEFAULT_RETRY_AFTER_S = 30


def parse_retry_after(value: str | None, *, now: float | None = None) -> int:
    """Whole seconds to tell the caller (at least 1); a default when the header is absent."""
    seconds = retry_after_seconds(value, now=now)
    return DEFAULT_RETRY_AFTER_S if seconds is None else int(max(seconds, 1))


def grant_from_json(body: Any) -> TokenGrant:
    parsed = parse_token_response(body)
    if parsed is None:
        raise UpstreamBadResponse()
    scopes = tuple(parsed.scope.split()) if parsed.scope and parsed.scope.strip() else None
    return TokenGrant(
        access_token=parsed.access_token,
        refresh_token=parsed.refresh_token,
        expires_in=parsed.expires_in,
        refresh_token_expires_in=parsed.refresh_token_expires_in,
        scopes=scopes,
        account_uuid=parsed.account.uuid if parsed.account else None,
        email=parsed.account.email_address if parsed.account else None,
        organization_uuid=parsed.organization.uuid if parsed.organization else None,
        organization_name=parsed.organization.name if parsed.organization else None,
    )


class HttpOAuthClient:
    def __init__(
        self,
        *,
        token_url: str | None = None,
        token_urls: tuple[str, ...] | list[str] = (),
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        urls = tuple(dict.fromkeys([*([token_url] if token_url else []), *token_urls]))
        if not urls:
            raise ValueError("at least one token URL is needed")
        self.token_urls = urls
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def exchange_code(self, request: CodeExchange) -> TokenGrant:
        body = {
            "grant_type": "authorization_code",
            "code": request.code,
            "redirect_uri": request.redirect_uri,
            "client_id": request.client_id,
            "code_verifier": request.code_verifier,
            "state": request.state,
        }
        return await self._post(body, grant_type="authorization_code")

    @property
    def token_url(self) -> str:
        return self.token_urls[0]

    async def _post(self, body: dict[str, str], *, grant_type: str) -> TokenGrant:
        for index, url in enumerate(self.token_urls):
            response = await self._send(url, body, grant_type=grant_type)
            if response.status_code != 404:
                return self._grant(response, grant_type=grant_type)
            more = index + 1 < len(self.token_urls)
            log.warning("token endpoint not found", grant_type=grant_type, endpoint=index, url=url, status=404,
                        next_endpoint=more)
        raise UpstreamBadResponse(
            "No configured token endpoint exists (every one answered 404); check OAUTH_TOKEN_URL(S)."
        )

    async def _send(self, url: str, body: dict[str, str], *, grant_type: str) -> httpx.Response:
        started = time.monotonic()
        try:
            response = await self._client.post(url, json=body)
        except httpx.TimeoutException as exc:
            log.warning("token endpoint timeout", grant_type=grant_type, error_type=type(exc).__name__)
            raise UpstreamTimeout() from None
        except httpx.HTTPError as exc:
            log.warning("token endpoint unreachable", grant_type=grant_type, error_type=type(exc).__name__)
            raise UpstreamUnavailable() from None
        elapsed_ms = int((time.monotonic() - started) * 1000)
        log.info("token endpoint answered", grant_type=grant_type, status=response.status_code, elapsed_ms=elapsed_ms)
        return response

    def _grant(self, response: httpx.Response, *, grant_type: str) -> TokenGrant:
        status = response.status_code
        if status == 429:
            raise UpstreamRateLimited(parse_retry_after(response.headers.get("retry-after")))
        if status in (400, 401, 403):
            error = oauth_error_code(response)
            log.info("token endpoint refused the grant", grant_type=grant_type, status=status, error=error)
            raise InvalidCode(oauth_error=error)
        if status >= 500:
            raise UpstreamUnavailable()
        if status != 200:
            # 3xx (we never follow), other 4xx: our configuration is off.
            raise UpstreamBadResponse(f"The authorization server answered HTTP {status}; check OAUTH_TOKEN_URL(S).")
        content_type = response.headers.get("content-type", "")
        try:
            payload = response.json()
        except ValueError:
            log.warning("token response is not JSON", content_type=content_type[:100])
            raise UpstreamBadResponse() from None
        return grant_from_json(payload)
