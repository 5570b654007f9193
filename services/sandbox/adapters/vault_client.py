"""Credentials from the vault over core NATS request/reply on `vault.credentials.get`.

The request names this service's public key; the vault seals the TokenBundle to it
(HPKE, info bound to subject `vault.credentials.get` and the request id), so the tokens are
only ever readable here. No reply in time (or nobody listening) → `VaultUnavailable`
(retryable); the vault's own refusals map to typed, final errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import nats.errors
from nats.aio.client import Client as NatsClient
from pydantic import ValidationError

from shared import subjects
from shared.events import CredentialMode, CredentialsReply, CredentialsRequest, TokenBundle
from shared.sealing import KeyPair, SealingError, open_sealed, reply_binding
from services.sandbox.errors import (
    GrantInvalid,
    GrantRequired,
    NotConnected,
    ReconnectRequired,
    SandboxError,
    VaultError,
    VaultUnavailable,
)


@dataclass(frozen=True)
class VaultCredentials:
    """What the vault gave us (`bundle` is None only from fakes that test refusals)."""

    bundle: TokenBundle | None = field(repr=False)
    expires_at: int
    scopes: tuple[str, ...] = ()
    lease_expires_at: int | None = None
    """When the sandbox's lease ends (ms epoch); None when the vault checks no grants."""


@dataclass(frozen=True)
class CredentialsFor:
    """Whose credentials, for which sandbox, under which grant, in which mode."""

    user_id: str
    sandbox_id: str
    grant: str | None
    mode: CredentialMode


class VaultClient(Protocol):
    async def fetch(self, want: CredentialsFor) -> VaultCredentials: ...


def _reply_error(reply: CredentialsReply) -> SandboxError:
    match reply.error:
        case "not_connected":
            return NotConnected("the user has no Claude connection")
        case "reconnect_required":
            return ReconnectRequired("the user's Claude connection must be renewed")
        case "internal":
            return VaultError("the vault reported an internal error", retryable=True)
        case "unavailable":
            return VaultUnavailable("the vault could not answer in time (its database is unavailable)")
        case "grant_required":
            return GrantRequired(reply.detail or "no grant for this sandbox")
        case "grant_invalid":
            return GrantInvalid(reply.detail or "the vault refused the grant")
        case other:
            return VaultError(f"the vault refused the request: {other or 'no reason given'}")


class NatsVaultClient:
    def __init__(self, connection: Callable[[], NatsClient], key: KeyPair, *, timeout: float) -> None:
        """`connection` returns the live NATS client (the broker's, once it is connected)."""
        self._connection = connection
        self._key = key
        self._timeout = timeout

    def build_request(self, want: CredentialsFor) -> CredentialsRequest:
        recipient = self._key.recipient
        return CredentialsRequest(
            user_id=want.user_id, sandbox_id=want.sandbox_id, grant=want.grant, mode=want.mode,
            requester_key_id=recipient.key_id, requester_public_key=recipient.public_b64,
        )

    async def fetch(self, want: CredentialsFor) -> VaultCredentials:
        request = self.build_request(want)
        try:
            response = await self._connection().request(
                subjects.VAULT_CREDENTIALS_GET, request.model_dump_json().encode(), timeout=self._timeout
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise VaultUnavailable(f"no vault reply within {self._timeout:g}s ({type(exc).__name__})") from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                nats.errors.ConnectionDrainingError, nats.errors.StaleConnectionError) as exc:
            raise VaultUnavailable(f"NATS connection not usable ({type(exc).__name__})") from None
        return self.open_reply(request, response.data)

    def open_reply(self, request: CredentialsRequest, data: bytes) -> VaultCredentials:
        try:
            reply = CredentialsReply.model_validate_json(data)
        except ValidationError:
            raise VaultError("the vault's reply is not a valid CredentialsReply") from None
        if reply.request_id != request.request_id:
            raise VaultError("the vault's reply answers another request")
        if not reply.ok:
            raise _reply_error(reply)
        bundle: TokenBundle | None = None
        if reply.sealed is not None:
            try:
                plaintext = open_sealed(
                    reply.sealed, self._key, subject=subjects.VAULT_CREDENTIALS_GET, message_id=request.request_id,
                    bind=reply_binding(request.user_id, request.sandbox_id),
                )
                bundle = TokenBundle.model_validate_json(plaintext)
            except SealingError as exc:
                raise VaultError(f"cannot open the sealed credentials: {exc}") from None
            except ValidationError:
                raise VaultError("the sealed credentials are not a TokenBundle") from None
        else:  # every mode writes a token into the sandbox (env mode: the env file)
            raise VaultError("the vault's reply carries no sealed credentials")
        expires_at = bundle.expires_at if bundle is not None else reply.expires_at
        if expires_at is None:
            raise VaultError("the vault's reply carries no expiry")
        scopes = tuple(bundle.scopes if bundle is not None else reply.scopes)
        return VaultCredentials(bundle=bundle, expires_at=expires_at, scopes=scopes,
                                lease_expires_at=reply.lease_expires_at)
