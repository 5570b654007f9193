"""The vault's bus entry points on FastStream's TestNatsBroker, with an in-memory store.

Covers what each message leads to: stored + ack, duplicate no-op, dead letter + term (poison)
or ack (malformed), held while the database is down, nack with delay (retry), and every reply
of `vault.credentials.get`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from faststream import Context
from faststream.nats import NatsBroker, TestNatsBroker
from faststream.nats.message import NatsMessage

from services.vault.errors import ConcurrencyConflict
from services.vault.handlers import (
    build_credentials_router,
    build_revoked_router,
    build_status_router,
    build_tokens_router,
    delivery_policy,
)
from services.vault.settings import VaultSettings
from services.vault.trust import TrustedRequesters
from services.vault.use_cases import Vault
from shared import subjects
from shared.broker import DLQ, REASON_HEADER, TOKENS, dead_letter_msg_id
from shared.delivery import Breakers, Delivery
from shared.events import ConnectionStatusReply, ConnectionStatusRequest, CredentialsReply, Sealed, TokensRevoked
from shared.sealing import KeyPair, SealingError, b64d, b64e, issued_binding, seal
from tests.vault_fixtures import (
    FakeStore,
    canary,
    credentials_request,
    issued_event,
    make_vault,
    new_user,
    open_reply,
)


@dataclass
class Acks:
    acked: int = 0
    nacked: list[float | None] = field(default_factory=list)
    rejected: int = 0


@pytest.fixture
def acks(monkeypatch: pytest.MonkeyPatch) -> Acks:
    """Record what the handler decided for each message (TestNatsBroker has no server)."""
    seen = Acks()

    async def ack(self: NatsMessage) -> None:
        if self.raw_message.subject in (subjects.TOKENS_ISSUED, subjects.TOKENS_REVOKED):  # not the DLQ readers
            seen.acked += 1

    async def nack(self: NatsMessage, delay: float | None = None) -> None:
        seen.nacked.append(delay)

    async def reject(self: NatsMessage) -> None:
        seen.rejected += 1

    monkeypatch.setattr(NatsMessage, "ack", ack)
    monkeypatch.setattr(NatsMessage, "nack", nack)
    monkeypatch.setattr(NatsMessage, "reject", reject)
    return seen


@dataclass
class Harness:
    broker: NatsBroker
    store: FakeStore
    vault_key: KeyPair
    requester: KeyPair
    dead_letters: list[tuple[bytes, dict[str, Any]]]
    vault: Vault

    async def issue(self, payload: Any, headers: dict[str, str] | None = None) -> None:
        await self.broker.publish(payload, subjects.TOKENS_ISSUED, stream=TOKENS.name, headers=headers)

    async def revoke(self, payload: Any, headers: dict[str, str] | None = None) -> None:
        await self.broker.publish(payload, subjects.TOKENS_REVOKED, stream=TOKENS.name, headers=headers)

    async def ask(self, payload: Any) -> CredentialsReply:
        response = await self.broker.request(payload, subjects.VAULT_CREDENTIALS_GET, timeout=3.0)
        return CredentialsReply.model_validate_json(response.body)

    async def status(self, user_id: str) -> ConnectionStatusReply:
        response = await self.broker.request(ConnectionStatusRequest(user_id=user_id).model_dump(mode="json"),
                                             subjects.VAULT_CONNECTIONS_STATUS)
        return ConnectionStatusReply.model_validate_json(response.body)


@pytest.fixture
async def harness() -> Any:
    store = FakeStore()
    vault_key, requester = KeyPair.generate(), KeyPair.generate()
    trusted = TrustedRequesters.of([requester.recipient])
    vault = make_vault(store, keypair=vault_key, trusted=trusted, request_timeout_s=0.2,
                       breakers=Breakers(probe_interval_s=0.02, max_probe_interval_s=0.1))
    broker = NatsBroker()
    settings = VaultSettings(VAULT_POISON_AFTER=3)
    policy = delivery_policy(settings, vault, broker)
    broker.include_router(build_tokens_router(vault, settings, policy))
    broker.include_router(build_revoked_router(vault, settings, policy))
    broker.include_router(build_credentials_router(vault))
    broker.include_router(build_status_router(vault))
    dead_letters: list[tuple[bytes, dict[str, Any]]] = []

    @broker.subscriber(subjects.dead_letter_subject(subjects.TOKENS_ISSUED), stream=DLQ)
    async def capture(body: Any, message: Any = Context("message")) -> None:
        dead_letters.append((message.body, dict(message.headers)))

    @broker.subscriber(subjects.dead_letter_subject(subjects.TOKENS_REVOKED), stream=DLQ)
    async def capture_revoked(body: Any, message: Any = Context("message")) -> None:
        dead_letters.append((message.body, dict(message.headers)))

    async with TestNatsBroker(broker) as test_broker:
        yield Harness(test_broker, store, vault_key, requester, dead_letters, vault)


def _json(event: Any) -> dict[str, Any]:
    return event.model_dump(mode="json")


# --- tokens.issued ---------------------------------------------------------------------
async def test_issued_tokens_are_stored_and_acked(harness: Harness, acks: Acks, capsys) -> None:
    user, access = new_user(), canary()
    await harness.issue(_json(issued_event(harness.vault_key.recipient, user_id=user, access_token=access,
                                           refresh_token="rt-" + access)))

    conn = harness.store.connections[user]
    assert (conn.version, conn.state, conn.kind) == (1, "connected", "oauth")
    assert conn.credentials.access_token == access and conn.credentials.refresh_token == "rt-" + access
    assert conn.account is not None and conn.account.email == "person@example.com"
    assert acks.acked == 1 and not acks.nacked and not harness.dead_letters
    out = capsys.readouterr()
    assert user in out.out + out.err  # logged with the user id ...
    assert access not in out.out + out.err  # ... never with the token


async def test_same_event_twice_has_one_effect(harness: Harness, acks: Acks) -> None:
    user = new_user()
    event = issued_event(harness.vault_key.recipient, user_id=user, access_token=canary())
    await harness.issue(_json(event))
    await harness.issue(_json(event))

    assert harness.store.connections[user].version == 1
    assert harness.store.commits == 1
    assert acks.acked == 2 and not harness.dead_letters


async def test_new_event_for_same_user_is_version_two(harness: Harness, acks: Acks) -> None:
    user, first, second = new_user(), canary("one"), canary("two")
    await harness.issue(_json(issued_event(harness.vault_key.recipient, user_id=user, access_token=first)))
    await harness.issue(_json(issued_event(harness.vault_key.recipient, user_id=user, access_token=second,
                                           kind="setup_token", expires_at=42)))

    conn = harness.store.connections[user]
    assert conn.version == 2 and conn.credentials.access_token == second
    assert conn.kind == "setup_token" and conn.expires_at == 42


@pytest.mark.parametrize("payload", [b"garbage{", b"{}", b'{"user_id": "u", "sealed": 5}', b"[1,2]"])
async def test_malformed_payload_is_dead_lettered_and_acked(harness: Harness, acks: Acks, payload: bytes) -> None:
    await harness.issue(payload, headers={subjects.MSG_ID_HEADER: "abc12345"})

    assert len(harness.dead_letters) == 1
    body, headers = harness.dead_letters[0]
    assert body == payload  # kept unchanged
    assert headers[REASON_HEADER].startswith("invalid_event")
    assert headers[subjects.MSG_ID_HEADER] == dead_letter_msg_id(subjects.TOKENS_ISSUED, "abc12345")
    assert acks.acked == 1 and not acks.nacked
    assert not harness.store.connections


def _tampered(box: Sealed) -> Sealed:
    raw = bytearray(b64d(box.ciphertext))
    raw[-1] ^= 1
    return box.model_copy(update={"ciphertext": b64e(bytes(raw))})


async def test_unopenable_boxes_are_dead_lettered(harness: Harness, acks: Acks) -> None:
    vault = harness.vault_key.recipient
    user = new_user()
    tampered = issued_event(vault, user_id=user, access_token=canary())
    tampered = tampered.model_copy(update={"sealed": _tampered(tampered.sealed)})
    other_key = issued_event(KeyPair.generate().recipient, user_id=user, access_token=canary())
    # a genuine box lifted into another event: bound to the first event's id, so it fails
    genuine = issued_event(vault, user_id=user, access_token=canary())
    replayed = issued_event(vault, user_id=user, access_token=canary()).model_copy(update={"sealed": genuine.sealed})

    for event in (tampered, other_key, replayed):  # as auth publishes them: Nats-Msg-Id = event id
        await harness.issue(_json(event), headers={subjects.MSG_ID_HEADER: event.event_id})

    assert [h[REASON_HEADER].split(":")[0] for _, h in harness.dead_letters] == ["unopenable_box"] * 3
    assert [h[subjects.MSG_ID_HEADER] for _, h in harness.dead_letters] == [
        dead_letter_msg_id(subjects.TOKENS_ISSUED, e.event_id) for e in (tampered, other_key, replayed)
    ]
    assert not harness.store.connections and acks.rejected == 3 and acks.acked == 0


async def test_box_with_a_non_bundle_inside_is_dead_lettered_without_leaking(
    harness: Harness, acks: Acks, capsys
) -> None:
    secret = canary()
    event = issued_event(harness.vault_key.recipient, user_id=new_user(), access_token=canary())
    inner = json.dumps({"access_token": secret, "expires_at": "not-a-number"}).encode()
    box = seal(inner, harness.vault_key.recipient, subject=subjects.TOKENS_ISSUED, message_id=event.event_id,
               bind=issued_binding(event.user_id, event.kind))
    await harness.issue(_json(event.model_copy(update={"sealed": box})))

    assert [h[REASON_HEADER] for _, h in harness.dead_letters] == ["invalid_event: sealed payload is not a TokenBundle"]
    out = capsys.readouterr()
    assert secret not in out.out + out.err


async def _held_until_the_database_is_back(harness: Harness, acks: Acks, deliver: Any) -> None:
    """`deliver` runs while the database is down: the message is held (no nack, no dead
    letter, the breaker open), and finishes once the database answers again."""
    harness.store.unavailable = True
    handling = asyncio.create_task(deliver())
    for _ in range(200):
        if harness.vault.breakers["database"].state != "closed":
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not handling.done() and harness.vault.breakers["database"].state != "closed"
    assert acks.nacked == [] and acks.acked == 0 and not harness.dead_letters
    harness.store.unavailable = False
    await asyncio.wait_for(handling, 5)
    assert acks.acked == 1 and acks.nacked == [] and not harness.dead_letters
    assert harness.vault.breakers["database"].state == "closed"


async def test_store_unavailable_holds_the_event_until_the_database_is_back(harness: Harness, acks: Acks) -> None:
    user = new_user()
    event = issued_event(harness.vault_key.recipient, user_id=user, access_token=canary())
    await _held_until_the_database_is_back(harness, acks, lambda: harness.issue(_json(event)))
    assert harness.store.connections[user].version == 1


async def test_unexpected_error_is_retried_then_dead_lettered(
    harness: Harness, acks: Acks, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = issued_event(harness.vault_key.recipient, user_id=new_user(), access_token=canary())

    async def boom(self: Any, event: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(Vault, "store_issued_tokens", boom)
    _deliveries(monkeypatch, 1, 2, 3)
    for _ in range(3):  # VAULT_POISON_AFTER=3
        await harness.issue(_json(event))

    assert len(acks.nacked) == 2 and 0.5 <= acks.nacked[0] <= 1.0 <= acks.nacked[1] <= 2.0  # jittered backoff
    assert [h[REASON_HEADER].split(":")[0] for _, h in harness.dead_letters] == ["max_deliveries"]
    assert acks.rejected == 1 and acks.acked == 0


def _deliveries(monkeypatch: pytest.MonkeyPatch, *counts: int) -> None:
    """TestNatsBroker's messages carry no JetStream metadata: say which delivery each one is."""
    of, numbers = Delivery.of, iter(counts)
    monkeypatch.setattr(Delivery, "of", staticmethod(lambda message: replace(of(message), delivered=next(numbers))))


async def test_a_conflict_is_retried_with_backoff_for_ever(
    harness: Harness, acks: Acks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retryable but not an outage: nacked with backoff, never dead-lettered (no event lost)."""
    async def conflict(self: Any, event: Any) -> Any:
        raise ConcurrencyConflict("somebody else first")

    monkeypatch.setattr(Vault, "store_issued_tokens", conflict)
    _deliveries(monkeypatch, 1, 1000)
    event = issued_event(harness.vault_key.recipient, user_id=new_user(), access_token=canary())
    await harness.issue(_json(event))
    await harness.issue(_json(event))
    assert len(acks.nacked) == 2 and acks.nacked[1] <= 30.0 and not harness.dead_letters
    assert harness.vault.breakers["database"].state == "closed"  # not a reason to pause anybody


# --- vault.credentials.get ----------------------------------------------------------------
async def _connect(harness: Harness, user: str, access: str, refresh: str | None) -> None:
    await harness.issue(_json(issued_event(harness.vault_key.recipient, user_id=user, access_token=access,
                                           refresh_token=refresh)))


@pytest.mark.parametrize(("mode", "with_refresh"), [("file", True), ("access_only", False), ("env", False)])
async def test_trusted_request_gets_sealed_tokens_per_mode(
    harness: Harness, acks: Acks, mode: str, with_refresh: bool
) -> None:
    user, access, refresh = new_user(), canary("a"), canary("r")
    await _connect(harness, user, access, refresh)
    request = credentials_request(harness.requester, user_id=user, mode=mode)

    reply = await harness.ask(_json(request))

    assert reply.ok and reply.error is None and reply.request_id == request.request_id
    assert reply.scopes == ["user:inference", "user:profile"] and reply.expires_at is not None
    bundle = open_reply(reply, harness.requester, user_id=user)
    assert bundle.access_token == access
    assert bundle.refresh_token == (refresh if with_refresh else None)
    assert refresh not in reply.model_dump_json() and access not in reply.model_dump_json()
    # the box is bound to this request id: nobody can pass it off as another reply
    with pytest.raises(SealingError):
        open_reply(reply.model_copy(update={"request_id": "0" * 32}), harness.requester, user_id=user)
    # ... and to this person and sandbox
    with pytest.raises(SealingError):
        open_reply(reply, harness.requester, user_id=user, sandbox_id="sbx-other")


async def test_untrusted_requester_is_refused(harness: Harness, acks: Acks) -> None:
    user = new_user()
    await _connect(harness, user, canary(), None)
    request = credentials_request(KeyPair.generate(), user_id=user)

    reply = await harness.ask(_json(request))

    assert (reply.ok, reply.error, reply.sealed) == (False, "unauthorized_requester", None)
    assert reply.request_id == request.request_id


async def test_unknown_user_is_not_connected(harness: Harness) -> None:
    reply = await harness.ask(_json(credentials_request(harness.requester, user_id=new_user())))
    assert (reply.ok, reply.error) == (False, "not_connected")


async def test_reconnect_required(harness: Harness, acks: Acks) -> None:
    user = new_user()
    await _connect(harness, user, canary(), "r")
    harness.store.connections[user].state = "reconnect_required"

    reply = await harness.ask(_json(credentials_request(harness.requester, user_id=user)))
    assert (reply.ok, reply.error, reply.sealed) == (False, "reconnect_required", None)


@pytest.mark.parametrize(
    ("payload", "request_id"),
    [
        (b"not json at all", ""),
        (b"{}", ""),
        (b'{"request_id": "req-12345678", "user_id": "u"}', "req-12345678"),
        (b'{"request_id": "req-12345678", "user_id": "u", "requester_key_id": "k", '
         b'"requester_public_key": "p", "mode": "everything"}', "req-12345678"),
    ],
)
async def test_invalid_request_gets_an_answer(harness: Harness, payload: bytes, request_id: str) -> None:
    reply = await harness.ask(payload)
    assert (reply.ok, reply.error, reply.request_id) == (False, "invalid_request", request_id)


async def test_mismatched_key_id_is_invalid(harness: Harness) -> None:
    request = credentials_request(harness.requester, user_id=new_user()).model_copy(
        update={"requester_key_id": "f" * 32}
    )
    reply = await harness.ask(_json(request))
    assert reply.error == "invalid_request"


async def test_store_outage_answers_unavailable_so_the_sandbox_retries(harness: Harness) -> None:
    harness.store.unavailable = True
    reply = await harness.ask(_json(credentials_request(harness.requester, user_id=new_user())))
    assert (reply.ok, reply.error) == (False, "unavailable")


async def test_unexpected_bug_still_answers(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(self: Any, request: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(Vault, "release_credentials", boom)
    request = credentials_request(harness.requester, user_id=new_user())
    reply = await harness.ask(_json(request))
    assert (reply.ok, reply.error, reply.request_id) == (False, "internal", request.request_id)


# --- audit, revoke, status, latency, metrics ------------------------------------------------
async def test_dead_letters_are_audited(harness: Harness, acks: Acks) -> None:
    user = new_user()
    await harness.issue(json.dumps({"user_id": user, "sealed": "nope"}).encode(),
                        headers={subjects.MSG_ID_HEADER: "evt-dead-1"})
    tampered = issued_event(harness.vault_key.recipient, user_id=user, access_token=canary())
    tampered = tampered.model_copy(update={"sealed": _tampered(tampered.sealed)})
    await harness.issue(_json(tampered))

    audit = [(e.action, e.outcome, e.reason, e.event_id, e.user_id) for e, _ in harness.store.audit]
    assert audit == [
        ("dead_lettered", "error", "invalid_event: schema", "evt-dead-1", user),
        ("dead_lettered", "error", "unopenable_box", tampered.event_id, user),
    ]
    assert harness.vault.metrics.value("ccbridge_vault_tokens_issued_total", outcome="dead_lettered") == 2


async def test_revoked_event_shreds_the_connection(harness: Harness, acks: Acks) -> None:
    user = new_user()
    await _connect(harness, user, canary(), canary("r"))
    event = TokensRevoked(user_id=user, reason="user_request")

    await harness.revoke(_json(event))
    await harness.revoke(_json(event))  # redelivered: one effect

    assert user not in harness.store.connections and user in harness.store.revocations
    revoked = [e for e, _ in harness.store.audit if e.action == "revoked"]
    assert [(e.outcome, e.event_id, e.reason) for e in revoked] == [("revoked", event.event_id, "user_request")]
    reply = await harness.ask(_json(credentials_request(harness.requester, user_id=user)))
    assert reply.error == "not_connected"
    assert acks.acked >= 3 and not acks.nacked


async def test_malformed_revoked_is_dead_lettered(harness: Harness, acks: Acks) -> None:
    await harness.revoke(b'{"user_id": 5}', headers={subjects.MSG_ID_HEADER: "rev-bad-1"})
    assert [h[REASON_HEADER] for _, h in harness.dead_letters] == ["invalid_event: schema"]
    assert [e.action for e, _ in harness.store.audit] == ["dead_lettered"]


async def test_revoke_while_the_database_is_down_is_held(harness: Harness, acks: Acks) -> None:
    user = new_user()
    await _connect(harness, user, canary(), None)
    acks.acked = 0
    await _held_until_the_database_is_back(harness, acks,
                                           lambda: harness.revoke(_json(TokensRevoked(user_id=user))))
    assert user not in harness.store.connections


async def test_connection_status(harness: Harness, acks: Acks) -> None:
    user = new_user()
    assert (await harness.status(user)) == ConnectionStatusReply(connected=False)
    await _connect(harness, user, canary(), canary("r"))
    status = await harness.status(user)
    assert (status.connected, status.state, status.kind, status.version) == (True, "connected", "oauth", 1)
    assert status.scopes == ["user:inference", "user:profile"] and status.account is not None
    assert status.account.email == "person@example.com"
    harness.store.connections[user].state = "reconnect_required"
    assert (await harness.status(user)).state == "reconnect_required"


async def test_a_slow_store_answers_unavailable_within_the_budget(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.vault_fixtures import FakeUnitOfWork

    original = FakeUnitOfWork.__aenter__

    async def slow(self: Any) -> Any:
        await asyncio.sleep(5)
        return await original(self)

    monkeypatch.setattr(FakeUnitOfWork, "__aenter__", slow)
    reply = await harness.ask(_json(credentials_request(harness.requester, user_id=new_user())))
    assert (reply.ok, reply.error) == (False, "unavailable")
    assert harness.vault.metrics.value("ccbridge_vault_credential_requests_total", outcome="unavailable") == 1


async def test_grants_and_refusals_are_audited_and_counted(harness: Harness, acks: Acks) -> None:
    from services.vault.adapters.audit_writer import AuditWriter

    writer = AuditWriter(harness.store.unit_of_work)
    harness.vault.audit_sink = writer
    user = new_user()
    await _connect(harness, user, canary(), canary("r"))
    request = credentials_request(harness.requester, user_id=user, mode="access_only")
    assert (await harness.ask(_json(request))).ok
    stranger = KeyPair.generate()
    assert (await harness.ask(_json(credentials_request(stranger, user_id=user)))).error == "unauthorized_requester"
    assert await writer.flush() == 2

    audit = [(e.action, e.actor, e.user_id) for e, _ in harness.store.audit if e.action.startswith("credentials")]
    assert audit == [("credentials_granted", f"requester:{harness.requester.key_id}", user),
                     ("credentials_refused", f"requester:{stranger.key_id}", user)]
    granted = next(e for e, _ in harness.store.audit if e.action == "credentials_granted")
    assert granted.detail == {"mode": "access_only", "request_id": request.request_id, "sandbox_id": "sbx-test"}
    metrics = harness.vault.metrics
    assert metrics.value("ccbridge_vault_credential_requests_total", outcome="ok") == 1
    assert metrics.value("ccbridge_vault_credential_requests_total", outcome="unauthorized_requester") == 1


async def test_a_record_that_does_not_decrypt_fails_loudly(harness: Harness, acks: Acks) -> None:
    from services.vault.errors import RetiredKeyId

    user = new_user()
    await _connect(harness, user, canary(), canary("r"))
    harness.store.undecryptable[user] = RetiredKeyId("kek-old", "2026-11-01T00:00:00+00:00")

    reply = await harness.ask(_json(credentials_request(harness.requester, user_id=user)))

    assert (reply.ok, reply.error, reply.sealed) == (False, "internal", None)
    failures = [e for e, _ in harness.store.audit if e.action == "credentials_decrypt_failed"]
    assert [(e.reason, e.kek_id, e.outcome) for e in failures] == [("retired_key_id", "kek-old", "error")]
    assert harness.vault.metrics.value("ccbridge_vault_decrypt_failures_total", reason="retired_key_id") == 1


# --- version 2: batched requests on the same subject -----------------------------------------
async def test_a_batched_request_gets_a_batched_reply_and_a_bad_one_a_batched_refusal(
    harness: Harness, acks: Acks
) -> None:
    from shared.events import CredentialsBatchReply, CredentialsBatchRequest, CredentialsItem
    from tests.grants import grant_for

    user = new_user()
    await _connect(harness, user, canary("a"), canary("r"))
    batch = CredentialsBatchRequest(
        requester_key_id=harness.requester.key_id, requester_public_key=harness.requester.recipient.public_b64,
        items=[CredentialsItem(user_id=user, sandbox_id=f"sbx-{i}", grant=grant_for(user, f"sbx-{i}")) for i in range(3)])
    response = await harness.broker.request(_json(batch), subjects.VAULT_CREDENTIALS_GET, timeout=3.0)
    reply = CredentialsBatchReply.model_validate_json(response.body)
    assert reply.ok and [r.ok for r in reply.items] == [True, True, True] and reply.sealed is not None
    # version 1 keeps working on the same subject
    assert (await harness.ask(_json(credentials_request(harness.requester, user_id=user)))).ok
    # a malformed batch (duplicate item ids) is refused whole, in version 2
    doc = _json(batch)
    doc["items"][1]["request_id"] = doc["items"][0]["request_id"]
    response = await harness.broker.request(doc, subjects.VAULT_CREDENTIALS_GET, timeout=3.0)
    refused = CredentialsBatchReply.model_validate_json(response.body)
    assert (refused.ok, refused.error, refused.request_id) == (False, "invalid_request", batch.request_id)


# --- tokens.issued: one transaction per fetched batch, each message settled alone ---------------
async def _deliver_together(harness: Harness, events: list[Any]) -> None:
    """As FastStream hands the messages of one fetch to the handler: all at once."""
    await asyncio.gather(*(harness.issue(_json(e), headers={subjects.MSG_ID_HEADER: e.event_id}) for e in events))


async def test_a_fetched_batch_is_stored_in_one_transaction_and_its_poison_dead_lettered_alone(
    harness: Harness, acks: Acks
) -> None:
    vault = harness.vault_key.recipient
    good = [issued_event(vault, user_id=new_user(), access_token=canary()) for _ in range(3)]
    poison = issued_event(vault, user_id=new_user(), access_token=canary())
    poison = poison.model_copy(update={"sealed": _tampered(poison.sealed)})

    await _deliver_together(harness, [good[0], poison, good[1], good[2]])

    assert all(harness.store.connections[e.user_id].version == 1 for e in good)
    assert poison.user_id not in harness.store.connections
    assert (harness.vault._issued.batches, harness.vault._issued.largest) == (1, 3)  # one transaction for the three
    assert len({harness.store.processed_at[e.event_id] for e in good}) == 1
    assert acks.acked == 3 and acks.rejected == 1 and not acks.nacked
    assert [h[subjects.MSG_ID_HEADER] for _, h in harness.dead_letters] == [
        dead_letter_msg_id(subjects.TOKENS_ISSUED, poison.event_id)]


async def test_a_duplicate_inside_one_batch_has_one_effect(harness: Harness, acks: Acks) -> None:
    user = new_user()
    event = issued_event(harness.vault_key.recipient, user_id=user, access_token=canary())
    other = issued_event(harness.vault_key.recipient, user_id=new_user(), access_token=canary())

    await _deliver_together(harness, [event, other, event])

    assert harness.store.connections[user].version == 1
    assert harness.store.commits == 1 and harness.vault._issued.batches == 1
    assert [e.action for e, _ in harness.store.audit if e.user_id == user] == ["tokens_stored"]
    assert acks.acked == 3 and not acks.nacked and not harness.dead_letters


async def test_a_database_outage_holds_the_whole_batch(harness: Harness, acks: Acks) -> None:
    events = [issued_event(harness.vault_key.recipient, user_id=new_user(), access_token=canary()) for _ in range(3)]
    harness.store.unavailable = True
    handling = asyncio.create_task(_deliver_together(harness, events))
    for _ in range(200):
        if harness.vault.breakers["database"].state != "closed":
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not handling.done() and acks.acked == 0 and acks.nacked == [] and not harness.dead_letters
    harness.store.unavailable = False
    await asyncio.wait_for(handling, 5)
    assert all(harness.store.connections[e.user_id].version == 1 for e in events)
    assert acks.acked == 3 and acks.nacked == [] and not harness.dead_letters


async def test_an_event_failing_in_its_batch_does_not_hold_back_the_others(
    harness: Harness, acks: Acks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conflict (retryable, not an outage) on one event: the batch is retried event by event;
    the others are stored and acked, that one is nacked with backoff."""
    from tests.vault_fixtures import _FakeConnections

    vault = harness.vault_key.recipient
    good = [issued_event(vault, user_id=new_user(), access_token=canary()) for _ in range(2)]
    bad = issued_event(vault, user_id=new_user(), access_token=canary())
    original = _FakeConnections.add_many

    async def add_many(self: Any, connections: Any) -> None:
        if any(c.user_id == bad.user_id for c in connections):
            raise ConcurrencyConflict("somebody else was first")
        await original(self, connections)

    monkeypatch.setattr(_FakeConnections, "add_many", add_many)
    await _deliver_together(harness, [good[0], bad, good[1]])

    assert all(e.user_id in harness.store.connections for e in good) and bad.user_id not in harness.store.connections
    assert acks.acked == 2 and len(acks.nacked) == 1 and not harness.dead_letters
    assert harness.vault.breakers["database"].state == "closed"
