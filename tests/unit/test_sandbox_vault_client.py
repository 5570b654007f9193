"""Vault client: request shape, sealed reply opening, error mapping (fake NATS connection)."""

from __future__ import annotations

from dataclasses import dataclass

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
from shared.events import CredentialsReply, CredentialsRequest, TokenBundle
from shared.sealing import KeyPair, reply_binding, seal

ACCESS = "sk-ant-oat01-vault-client-access"
BUNDLE = TokenBundle(access_token=ACCESS, refresh_token="sk-ant-ort01-r", expires_at=1_900_000_000_000,
                     scopes=["user:inference"])


@dataclass
class Reply:
    data: bytes


class FakeConnection:
    """Answers like a vault would: `answer(request) -> bytes`, or raises `error`."""

    def __init__(self, answer=None, error: Exception | None = None) -> None:  # type: ignore[no-untyped-def]
        self.answer = answer
        self.error = error
        self.requests: list[tuple[str, CredentialsRequest, float]] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Reply:
        request = CredentialsRequest.model_validate_json(payload)
        self.requests.append((subject, request, timeout))
        if self.error:
            raise self.error
        return Reply(self.answer(request))


def sealed_ok(request: CredentialsRequest, *, bundle: TokenBundle = BUNDLE, message_id: str | None = None,
              to: KeyPair | None = None, user_id: str | None = None, sandbox_id: str | None = None) -> bytes:
    from shared.sealing import Recipient

    recipient = to.recipient if to else Recipient.from_b64(request.requester_public_key)
    box = seal(bundle.model_dump_json().encode(), recipient, subject=subjects.VAULT_CREDENTIALS_GET,
               message_id=message_id or request.request_id,
               bind=reply_binding(user_id or request.user_id, sandbox_id or request.sandbox_id))
    return CredentialsReply(request_id=request.request_id, ok=True, sealed=box, expires_at=bundle.expires_at,
                            scopes=bundle.scopes).model_dump_json().encode()


def want(user_id: str, mode: str, sandbox_id: str = "sbx-1", grant: str | None = "a.b.c-grant-token") -> CredentialsFor:
    return CredentialsFor(user_id=user_id, sandbox_id=sandbox_id, grant=grant, mode=mode)  # type: ignore[arg-type]


def client(conn: FakeConnection, key: KeyPair | None = None) -> NatsVaultClient:
    return NatsVaultClient(lambda: conn, key or KeyPair.generate(), timeout=0.5)  # type: ignore[arg-type,return-value]


async def test_request_carries_our_public_key_and_reply_opens() -> None:
    key = KeyPair.generate()
    conn = FakeConnection(sealed_ok)
    creds = await client(conn, key).fetch(want("user-9", "access_only"))
    [(subject, request, timeout)] = conn.requests
    assert subject == "vault.credentials.get"
    assert timeout == 0.5
    assert (request.user_id, request.mode, request.sandbox_id) == ("user-9", "access_only", "sbx-1")
    assert request.grant == "a.b.c-grant-token"
    assert request.requester_key_id == key.key_id
    assert request.requester_public_key == key.recipient.public_b64
    assert creds.bundle is not None and creds.bundle.access_token == ACCESS
    assert creds.expires_at == BUNDLE.expires_at
    assert ACCESS not in repr(creds)


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
        ("grant_required", GrantRequired, False),
        ("grant_invalid", GrantInvalid, False),
    ],
)
async def test_vault_refusals_map_to_typed_errors(code: str, expected: type[SandboxError], retryable: bool) -> None:
    conn = FakeConnection(lambda r: CredentialsReply(request_id=r.request_id, ok=False, error=code)  # type: ignore[arg-type]
                          .model_dump_json().encode())
    with pytest.raises(expected) as info:
        await client(conn).fetch(want("u", "file"))
    assert info.value.retryable is retryable


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: b"not json",
        lambda r: b'{"ok": true}',
        # answers someone else's request
        lambda r: CredentialsReply(request_id="other-request-id", ok=True).model_dump_json().encode(),
        # ok but nothing sealed, in a mode that needs a token
        lambda r: CredentialsReply(request_id=r.request_id, ok=True, expires_at=1).model_dump_json().encode(),
        # sealed for another key
        lambda r: sealed_ok(r, to=KeyPair.generate()),
        # sealed for us but bound to another request id (replayed box)
        lambda r: sealed_ok(r, message_id="another-request-000"),
        # ... or to another person, or another sandbox (a box lifted from another reply)
        lambda r: sealed_ok(r, user_id="mallory"),
        lambda r: sealed_ok(r, sandbox_id="sbx-other"),
    ],
)
async def test_bad_replies_are_vault_errors_without_secrets(answer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(VaultError) as info:
        await client(FakeConnection(answer)).fetch(want("u", "file"))
    assert info.value.reason == "vault_error"
    assert ACCESS not in str(info.value)


async def test_env_mode_needs_the_sealed_access_token_too() -> None:
    conn = FakeConnection(lambda r: CredentialsReply(request_id=r.request_id, ok=True, expires_at=123,
                                                     scopes=["user:inference"]).model_dump_json().encode())
    with pytest.raises(VaultError):
        await client(conn).fetch(want("u", "env"))


async def test_unavailable_vault_reply_is_retryable() -> None:
    conn = FakeConnection(
        lambda r: CredentialsReply(request_id=r.request_id, ok=False, error="unavailable").model_dump_json().encode()
    )
    with pytest.raises(VaultUnavailable) as info:
        await client(conn).fetch(want("u", "file"))
    assert info.value.retryable and info.value.reason == "vault_unavailable"
