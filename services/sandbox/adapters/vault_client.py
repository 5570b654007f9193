"""Credentials from the vault over core NATS request/reply on `vault.credentials.get`.

The request names this service's public key; the vault seals the bundles to it (HPKE, info
bound to subject `vault.credentials.get` and the request id; each bundle names its user and
sandbox, checked here), so the tokens are only ever readable here. No reply in time (or nobody
listening) → `VaultUnavailable` (retryable); the vault's own refusals map to typed, final errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import nats.errors
from nats.aio.client import Client as NatsClient
from pydantic import ValidationError

from services.sandbox.errors import (
    GrantInvalid,
    GrantRequired,
    NotConnected,
    ReconnectRequired,
    SandboxError,
    VaultError,
    VaultUnavailable,
)
from shared import subjects
from shared.batching import Coalescer
from shared.events import (
    MAX_BATCH_ITEMS,
    CredentialMode,
    CredentialsBatchReply,
    CredentialsBatchRequest,
    CredentialsItem,
    CredentialsItemResult,
    ReleasedItem,
    ReleasedItems,
    TokenBundle,
)
from shared.sealing import KeyPair, SealingError, open_sealed


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


def _reply_error(reply: CredentialsBatchReply | CredentialsItemResult) -> SandboxError:
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
            return GrantRequired(getattr(reply, "detail", "") or "no grant for this sandbox")
        case "grant_invalid":
            return GrantInvalid(getattr(reply, "detail", "") or "the vault refused the grant")
        case other:
            return VaultError(f"the vault refused the request: {other or 'no reason given'}")


Result = VaultCredentials | SandboxError


class NatsVaultClient:
    """`vault.credentials.get`, version 2 (a batch). Requests made while others are in flight are
    sent together (`shared.batching.Coalescer`): at light load each goes out alone at once (no
    waiting for company); under load the sandboxes of a fetched batch share one round trip, one
    database read and one sealed box in the vault. Each request still succeeds or fails on its
    own."""

    def __init__(self, connection: Callable[[], NatsClient], key: KeyPair, *, timeout: float,
                 max_batch: int = 64, max_in_flight: int = 2) -> None:
        """`connection` returns the live NATS client (the broker's, once it is connected)."""
        self._connection = connection
        self._key = key
        self._recipient = key.recipient  # derived once: it is the same for every request
        self._timeout = timeout
        self._batches: Coalescer[CredentialsFor, VaultCredentials] = Coalescer(
            self._request_all, max_batch=max(1, min(max_batch, MAX_BATCH_ITEMS)),
            max_in_flight=max(1, max_in_flight), name="sandbox-vault-requests")

    async def fetch(self, want: CredentialsFor) -> VaultCredentials:
        return await self._batches.submit(want)

    async def _request_all(self, wants: list[CredentialsFor]) -> list[Result]:
        """One request for the batch; a failure of the whole request is every item's."""
        try:
            return await self.request(wants)
        except SandboxError as exc:  # the whole request: no vault, refused, unreadable reply
            return [exc] * len(wants)
        except Exception as exc:  # noqa: BLE001 - every waiter must get an answer
            return [VaultError(f"unexpected {type(exc).__name__}", retryable=True)] * len(wants)

    def build_request(self, wants: Sequence[CredentialsFor]) -> CredentialsBatchRequest:
        recipient = self._recipient
        return CredentialsBatchRequest(
            requester_key_id=recipient.key_id, requester_public_key=recipient.public_b64,
            items=[CredentialsItem(user_id=w.user_id, sandbox_id=w.sandbox_id, grant=w.grant, mode=w.mode)
                   for w in wants],
        )

    async def request(self, wants: Sequence[CredentialsFor]) -> list[Result]:
        """One request for `wants`: each one's credentials or error, in order."""
        request = self.build_request(wants)
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

    def open_reply(self, request: CredentialsBatchRequest, data: bytes) -> list[Result]:
        try:
            reply = CredentialsBatchReply.model_validate_json(data)
        except ValidationError:
            raise VaultError("the vault's reply is not a valid CredentialsBatchReply") from None
        if reply.request_id != request.request_id:
            raise VaultError("the vault's reply answers another request")
        if not reply.ok:
            raise _reply_error(reply)
        released = self._released(request, reply)
        results = {r.request_id: r for r in reply.items}
        answers: list[Result] = []
        for item in request.items:
            result = results.get(item.request_id)
            if result is None:
                answers.append(VaultError("the vault's reply leaves this sandbox out", retryable=True))
            elif not result.ok:
                answers.append(_reply_error(result))
            elif (bundle := released.get(item.request_id)) is None:
                answers.append(VaultError("the vault's reply carries no sealed credentials for this sandbox"))
            elif (bundle.user_id, bundle.sandbox_id) != (item.user_id, item.sandbox_id):
                answers.append(VaultError("the sealed credentials are another sandbox's"))
            else:
                answers.append(VaultCredentials(bundle=bundle.bundle, expires_at=bundle.bundle.expires_at,
                                                scopes=tuple(bundle.bundle.scopes),
                                                lease_expires_at=result.lease_expires_at))
        return answers

    def _released(self, request: CredentialsBatchRequest, reply: CredentialsBatchReply) -> dict[str, ReleasedItem]:
        if reply.sealed is None:
            return {}
        try:
            plaintext = open_sealed(reply.sealed, self._key, subject=subjects.VAULT_CREDENTIALS_GET,
                                    message_id=request.request_id)
            return {item.request_id: item for item in ReleasedItems.model_validate_json(plaintext).items}
        except SealingError as exc:
            raise VaultError(f"cannot open the sealed credentials: {exc}") from None
        except ValidationError:
            raise VaultError("the sealed credentials are not ReleasedItems") from None
