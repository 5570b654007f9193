"""Vault client: request shape (version 2, a batch), sealed reply opening, error mapping, and the
opportunistic batching of concurrent fetches (fake NATS connection)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import pytest

from services.sandbox.adapters.vault_client import CredentialsFor, NatsVaultClient
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
from shared.events import (
    CredentialsBatchReply,
    CredentialsBatchRequest,
    CredentialsItemResult,
    ReleasedItem,
    ReleasedItems,
    TokenBundle,
)
from shared.sealing import KeyPair, Recipient, seal

ACCESS = "sk-ant-oat01-vault-client-access"
BUNDLE = TokenBundle(access_token=ACCESS, refresh_token="sk-ant-ort01-r", expires_at=1_900_000_000_000,
                     scopes=["user:inference"])


@dataclass
class Reply:
    data: bytes


class FakeConnection:
    """Answers like a vault would: `answer(request) -> bytes`, or raises `error`; `gate` (an
    event) holds every answer until set, so concurrent fetches pile up."""

    def __init__(self, answer: Callable[[CredentialsBatchRequest], bytes] | None = None,
                 error: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.answer = answer
        self.error = error
        self.gate = gate
        self.requests: list[tuple[str, CredentialsBatchRequest, float]] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Reply:
        request = CredentialsBatchRequest.model_validate_json(payload)
        self.requests.append((subject, request, timeout))
        if self.gate is not None:
            await self.gate.wait()
        if self.error:
            raise self.error
        assert self.answer is not None
        return Reply(self.answer(request))


def sealed_ok(request: CredentialsBatchRequest, *, bundle: TokenBundle = BUNDLE, message_id: str | None = None,
              to: KeyPair | None = None, user_id: str | None = None, sandbox_id: str | None = None) -> bytes:
    """Every item released (`user_id` / `sandbox_id` relabel what is inside the box)."""
    recipient = to.recipient if to else Recipient.from_b64(request.requester_public_key)
    released = [ReleasedItem(request_id=i.request_id, user_id=user_id or i.user_id,
                             sandbox_id=sandbox_id or i.sandbox_id, bundle=bundle) for i in request.items]
    box = seal(ReleasedItems(items=released).model_dump_json().encode(), recipient,
               subject=subjects.VAULT_CREDENTIALS_GET, message_id=message_id or request.request_id)
    results = [CredentialsItemResult(request_id=i.request_id, ok=True, expires_at=bundle.expires_at,
                                     scopes=bundle.scopes, lease_expires_at=1_950_000_000_000) for i in request.items]
    return CredentialsBatchReply(request_id=request.request_id, ok=True, items=results,
                                 sealed=box).model_dump_json().encode()


def item_error(code: str, detail: str = "") -> Callable[[CredentialsBatchRequest], bytes]:
    def answer(request: CredentialsBatchRequest) -> bytes:
        results = [CredentialsItemResult(request_id=i.request_id, ok=False, error=code, detail=detail)
                   for i in request.items]
        return CredentialsBatchReply(request_id=request.request_id, ok=True, items=results).model_dump_json().encode()

    return answer


def want(user_id: str, mode: str, sandbox_id: str = "sbx-1", grant: str | None = "a.b.c-grant-token") -> CredentialsFor:
    return CredentialsFor(user_id=user_id, sandbox_id=sandbox_id, grant=grant, mode=mode)


def client(conn: FakeConnection, key: KeyPair | None = None, **kwargs: Any) -> NatsVaultClient:
    return NatsVaultClient(lambda: conn, key or KeyPair.generate(), timeout=0.5, **kwargs)


async def test_request_carries_our_public_key_and_reply_opens() -> None:
    key = KeyPair.generate()
    conn = FakeConnection(sealed_ok)
    creds = await client(conn, key).fetch(want("user-9", "access_only"))
    [(subject, request, timeout)] = conn.requests
    assert subject == "vault.credentials.get" and timeout == 0.5
    assert request.schema_version == 2 and request.requester_key_id == key.key_id
    assert request.requester_public_key == key.recipient.public_b64
    [item] = request.items
    assert (item.user_id, item.mode, item.sandbox_id, item.grant) == ("user-9", "access_only", "sbx-1",
                                                                      "a.b.c-grant-token")
    assert creds.bundle is not None and creds.bundle.access_token == ACCESS
    assert (creds.expires_at, creds.lease_expires_at) == (BUNDLE.expires_at, 1_950_000_000_000)
    assert ACCESS not in repr(creds)


async def test_concurrent_fetches_share_one_request_while_another_is_in_flight() -> None:
    """The first fetch goes out at once; the ones made while it is in flight go together."""
    gate = asyncio.Event()
    conn = FakeConnection(sealed_ok, gate=gate)
    vault = client(conn, max_in_flight=1)
    first = asyncio.ensure_future(vault.fetch(want("u0", "access_only", "sbx-0")))
    await asyncio.sleep(0.005)  # alone: out at once (after the loop went round once without company)
    assert len(conn.requests) == 1
    rest = [asyncio.ensure_future(vault.fetch(want(f"u{i}", "access_only", f"sbx-{i}"))) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(first, *rest)
    assert [len(r.items) for _, r, _ in conn.requests] == [1, 5]
    assert all(r.bundle is not None for r in results)


async def test_fetches_made_in_the_same_turn_share_one_request() -> None:
    """The handlers of one fetched batch ask at once: one request for all of them."""
    conn = FakeConnection(sealed_ok)
    vault = client(conn)
    results = await asyncio.gather(*(vault.fetch(want(f"u{i}", "access_only", f"sbx-{i}")) for i in range(6)))
    assert [len(r.items) for _, r, _ in conn.requests] == [6]
    assert all(r.bundle is not None for r in results)


async def test_one_item_failing_does_not_fail_the_others() -> None:
    def mixed(request: CredentialsBatchRequest) -> bytes:
        ok = CredentialsBatchReply.model_validate_json(sealed_ok(request))
        items = [r if i.user_id != "nobody" else CredentialsItemResult(request_id=r.request_id, ok=False,
                                                                      error="not_connected")
                 for i, r in zip(request.items, ok.items, strict=True)]
        return ok.model_copy(update={"items": items}).model_dump_json().encode()

    gate = asyncio.Event()
    vault = client(FakeConnection(mixed, gate=gate), max_in_flight=1)
    blocker = asyncio.ensure_future(vault.fetch(want("first", "access_only", "sbx-0")))
    await asyncio.sleep(0)
    good = asyncio.ensure_future(vault.fetch(want("someone", "access_only", "sbx-1")))
    bad = asyncio.ensure_future(vault.fetch(want("nobody", "access_only", "sbx-2")))
    await asyncio.sleep(0.01)
    gate.set()
    assert (await blocker).bundle is not None and (await good).bundle is not None
    with pytest.raises(NotConnected):
        await bad


@pytest.mark.parametrize("error", [nats.errors.TimeoutError(), nats.errors.NoRespondersError(),
                                   nats.errors.ConnectionClosedError()])
async def test_no_answer_is_vault_unavailable_and_retryable(error: Exception) -> None:
    with pytest.raises(VaultUnavailable) as info:
        await client(FakeConnection(error=error)).fetch(want("u", "file"))
    assert info.value.retryable is True
    assert info.value.reason == "vault_unavailable"


@pytest.mark.parametrize(
    ("code", "expected", "retryable"),
    [
        ("not_connected", NotConnected, False),
        ("reconnect_required", ReconnectRequired, False),
        ("unauthorized_requester", VaultError, False),
        ("invalid_request", VaultError, False),
        ("internal", VaultError, True),
        ("unavailable", VaultUnavailable, True),
        ("grant_required", GrantRequired, False),
        ("grant_invalid", GrantInvalid, False),
    ],
)
async def test_vault_refusals_map_to_typed_errors(code: str, expected: type[SandboxError], retryable: bool) -> None:
    with pytest.raises(expected) as info:  # refused for the item
        await client(FakeConnection(item_error(code, "why"))).fetch(want("u", "file"))
    assert info.value.retryable is retryable

    def whole(request: CredentialsBatchRequest) -> bytes:
        return CredentialsBatchReply(request_id=request.request_id, ok=False, error=code).model_dump_json().encode()

    with pytest.raises(expected):  # ... or the whole request refused
        await client(FakeConnection(whole)).fetch(want("u", "file"))


async def test_a_grant_refusal_keeps_the_vaults_detail() -> None:
    with pytest.raises(GrantInvalid, match="grant is for another sandbox"):
        await client(FakeConnection(item_error("grant_invalid", "grant is for another sandbox"))).fetch(want("u", "file"))


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: b"not json",
        lambda r: b'{"ok": true}',
        # answers someone else's request
        lambda r: CredentialsBatchReply(request_id="other-request-id", ok=True).model_dump_json().encode(),
        # ok but nothing sealed
        lambda r: CredentialsBatchReply(request_id=r.request_id, ok=True, items=[
            CredentialsItemResult(request_id=i.request_id, ok=True, expires_at=1) for i in r.items
        ]).model_dump_json().encode(),
        # ok but leaves the item out
        lambda r: CredentialsBatchReply(request_id=r.request_id, ok=True).model_dump_json().encode(),
        # sealed for another key
        lambda r: sealed_ok(r, to=KeyPair.generate()),
        # sealed for us but bound to another request id (replayed box)
        lambda r: sealed_ok(r, message_id="another-request-000"),
        # ... or holding another person's, or another sandbox's bundle
        lambda r: sealed_ok(r, user_id="mallory"),
        lambda r: sealed_ok(r, sandbox_id="sbx-other"),
    ],
)
async def test_bad_replies_are_vault_errors_without_secrets(answer) -> None:
    with pytest.raises(VaultError) as info:
        await client(FakeConnection(answer)).fetch(want("u", "file"))
    assert info.value.reason == "vault_error"
    assert ACCESS not in str(info.value)
