"""Bad input on the bus, against the real vault and sandbox processes on a private nats-server.

Hypothesis generates malformed and hostile messages for every subject the services consume
(tokens.issued, tokens.revoked, tokens.refreshed, sandbox.created, sandbox.destroyed, and the
vault.credentials.get request): not JSON, wrong schema, wrong types, huge, forged / tampered /
wrong-key sealed boxes, a valid box replayed inside another event. Every one must be dead
lettered (its body found unchanged on `dlq.<subject>`) or rejected (a
`sandbox.credentials.failed` for it, or an error reply), with 0 crashed consumers (processes
alive, a good event still processed afterwards) and 0 bad writes (no connection row, no
credentials file, nothing outside the sandbox root for a hostile message).

The corpus is drawn with hypothesis up front (bounded examples), then sent in one go, so the
test takes well under a minute or two.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from bench import common
from ccbridge.embedded_nats import EmbeddedNats
from ccbridge.stack import Stack
from shared import subjects
from shared.events import (
    CredentialsBatchReply,
    CredentialsBatchRequest,
    CredentialsItem,
    CredentialsReply,
    CredentialsRequest,
    SandboxCredentialsFailed,
    Sealed,
    TokenBundle,
    new_event_id,
)
from shared.sealing import KeyPair, b64e, issued_binding, load_or_create_keypair, seal

pytestmark = [pytest.mark.timeout(300)]

EXAMPLES = int(os.environ.get("BUS_FUZZ_EXAMPLES", "60"))
HOSTILE = "hostile-"  # every hostile user id / sandbox id starts with this
SETTINGS = settings(max_examples=EXAMPLES, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


# --- the stack under attack -------------------------------------------------------------------
class Target:
    def __init__(self, stack: Stack, server: EmbeddedNats, nc: nats.NATS) -> None:
        self.stack, self.server, self.nc = stack, server, nc
        self.js = nc.jetstream()
        self.data_dir = stack.data_dir
        self.vault_key = common.vault_recipient(self.data_dir)
        self.sandbox_key = load_or_create_keypair(self.data_dir / "keys", "sandbox")
        self.good_user = common.uid("good-user")

    async def good_flow_still_works(self) -> None:
        """A valid tokens.issued is stored and a valid sandbox.created is injected."""
        self.stack.check_alive()
        user = common.uid("good-user")
        await common.publish(self.js, subjects.TOKENS_ISSUED, common.tokens_issued(self.vault_key, user))
        deadline = time.monotonic() + 60
        while user not in common.connection_users(common.db_path(self.data_dir)):
            assert time.monotonic() < deadline, "the vault stopped storing tokens.issued"
            await asyncio.sleep(0.1)
        watcher = await common.ResultWatcher(self.nc).start()
        async with common.Grants.of(self.stack) as grants:
            [event] = await grants.events([(user, common.uid("sbx"))])
        await common.publish(self.js, subjects.SANDBOX_CREATED, event)
        assert await watcher.wait_settled([event.event_id], 60, injected_only=True) == 1
        await watcher.stop()
        assert common.credentials_token(self.data_dir, event.sandbox_id) == common.access_token_for(user)
        self.stack.check_alive()

    def no_bad_writes(self) -> None:
        users = common.connection_users(common.db_path(self.data_dir))
        assert not [u for u in users if u.startswith(HOSTILE)], "a hostile message created a connection"
        root = common.sandbox_home(self.data_dir, "x").parent
        for path in root.rglob(".credentials.json"):
            assert not path.parent.parent.name.startswith(HOSTILE), f"credentials written for {path}"
        outside = [p for p in self.data_dir.rglob("*") if "escape-canary" in p.name]
        assert not outside and not Path("/etc/escape-canary").exists(), outside


@pytest.fixture(scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    base = tmp_path_factory.mktemp("bus-fuzz")
    server = EmbeddedNats(base / "nats", log_file=base / "nats-server.log").start()
    stack = common.make_stack(base / "data", server.url, LOG_LEVEL="INFO", SANDBOX_MAX_DELIVER="3",
                              SANDBOX_RETRY_BASE_DELAY="0.1", VAULT_POISON_AFTER="3")
    await stack.astart()
    nc = await nats.connect(server.url)
    target = Target(stack, server, nc)
    try:
        await target.good_flow_still_works()  # the stack is sound before the attack
        yield target
    finally:
        await nc.close()
        await asyncio.to_thread(stack.stop)
        server.stop()


# --- strategies -----------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(
    max_size=30
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
huge_text = st.integers(min_value=70_000, max_value=600_000).map(lambda n: "A" * n)


def mutated(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """`base` (with a fresh event id: dead letters are keyed by it) with one field dropped,
    retyped, made huge, or an unknown field added."""
    keys = sorted(base)

    def fresh() -> dict[str, Any]:
        return {**base, "event_id": new_event_id()} if "event_id" in base else dict(base)

    def drop(key: str) -> dict[str, Any]:
        return {k: v for k, v in fresh().items() if k != key}

    return st.one_of(
        st.sampled_from(keys).map(drop),
        st.tuples(st.sampled_from(keys), json_values).map(lambda kv: {**fresh(), kv[0]: kv[1]}),
        st.tuples(st.sampled_from(keys), huge_text).map(lambda kv: {**fresh(), kv[0]: kv[1]}),
        st.tuples(st.text(min_size=1, max_size=12).filter(lambda k: k not in base), json_values).map(
            lambda kv: {**fresh(), kv[0]: kv[1]}
        ),
    ).map(lambda doc: json.dumps(doc).encode())


garbage = st.one_of(
    st.binary(max_size=2048),
    st.just(b""),
    st.just(b"null"),
    st.just(b"[]"),
    st.just(b'{"schema_version": 2}'),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=100_000, max_value=900_000).map(lambda n: b"{" + b" " * n + b"}"),
)


def draw_corpus(strategy: st.SearchStrategy[Any]) -> list[Any]:
    corpus: list[Any] = []

    @SETTINGS
    @given(strategy)
    def collect(item: Any) -> None:
        corpus.append(item)

    collect()
    return corpus


def hostile_sandbox_id() -> str:
    return f"{HOSTILE}{uuid.uuid4().hex[:10]}"


def issued_doc(t: Target, *, box: Sealed, user: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "event_id": event_id or new_event_id(),
        "user_id": user or f"{HOSTILE}{uuid.uuid4().hex[:8]}",
        "occurred_at": "2026-11-01T00:00:00Z",
        "kind": "oauth",
        "sealed": box.model_dump(),
        "scopes": ["user:inference"],
        "expires_at": 1_893_456_000_000,
    }


def valid_box(t: Target, event_id: str, plaintext: bytes | None = None, *, user: str = "lifted") -> Sealed:
    bundle = plaintext or TokenBundle(access_token="sk-ant-oat01-" + "h" * 40, expires_at=1_893_456_000_000,
                                      scopes=["user:inference"]).model_dump_json().encode()
    return seal(bundle, t.vault_key, subject=subjects.TOKENS_ISSUED, message_id=event_id,
                bind=issued_binding(user, "oauth"))


def hostile_boxes(t: Target) -> st.SearchStrategy[bytes]:
    """Schema-valid tokens.issued whose box must not open (or opens to junk)."""

    def replayed(_: Any) -> bytes:  # a valid box lifted from another event
        return json.dumps(issued_doc(t, box=valid_box(t, new_event_id()))).encode()

    def tampered(flip: int) -> bytes:
        event_id = new_event_id()
        box = valid_box(t, event_id)
        raw = bytearray(base64.urlsafe_b64decode(box.ciphertext + "=" * (-len(box.ciphertext) % 4)))
        raw[flip % len(raw)] ^= 0x01
        forged = Sealed(key_id=box.key_id, ciphertext=b64e(bytes(raw)))
        return json.dumps(issued_doc(t, box=forged, event_id=event_id)).encode()

    def wrong_key(_: Any) -> bytes:
        event_id = new_event_id()
        other = KeyPair.generate().recipient
        box = seal(b'{"access_token":"x","expires_at":1}', other, subject=subjects.TOKENS_ISSUED, message_id=event_id)
        return json.dumps(issued_doc(t, box=box, event_id=event_id)).encode()

    def forged_key_id(ciphertext: bytes) -> bytes:
        box = Sealed(key_id=t.vault_key.key_id, ciphertext=b64e(ciphertext or b"\x00"))
        return json.dumps(issued_doc(t, box=box)).encode()

    def junk_inside(plaintext: bytes) -> bytes:  # opens, but is not a TokenBundle
        event_id, user = new_event_id(), f"{HOSTILE}{uuid.uuid4().hex[:8]}"
        box = valid_box(t, event_id, plaintext or b"{}", user=user)
        return json.dumps(issued_doc(t, box=box, event_id=event_id, user=user)).encode()

    def not_base64(text: str) -> bytes:
        doc = issued_doc(t, box=valid_box(t, new_event_id()))
        doc["sealed"]["ciphertext"] = text or "!"
        return json.dumps(doc).encode()

    return st.one_of(
        st.just(None).map(replayed),
        st.integers(min_value=0, max_value=10_000).map(tampered),
        st.just(None).map(wrong_key),
        st.binary(min_size=1, max_size=300).map(forged_key_id),
        st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())).map(junk_inside),
        st.text(alphabet="!@#$%^&*()<>?~ \n\t", min_size=1, max_size=50).map(not_base64),
    )


# --- sending and accounting ------------------------------------------------------------------------
async def send(t: Target, subject: str, bodies: list[bytes]) -> None:
    for body in bodies:
        headers = {subjects.MSG_ID_HEADER: f"fuzz-{uuid.uuid4().hex}"} if len(body) % 3 else None
        await t.js.publish(subject, body, headers=headers, stream=subjects.SANDBOX_STREAM.name
                           if subject.startswith("sandbox.") else subjects.TOKENS_STREAM.name, timeout=10)


async def dead_lettered(t: Target, subject: str) -> set[bytes]:
    return {body for subj, body, _ in await common.dlq_messages(t.js) if subj == subjects.dead_letter_subject(subject)}


def field_of(body: bytes, name: str) -> str | None:
    try:
        value = json.loads(body).get(name)
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def event_id_of(body: bytes) -> str | None:
    return field_of(body, "event_id")


def rejected_by(body: bytes, failed_causes: set[str], failed_sandboxes: set[str]) -> bool:
    """A failed event answers it: by its event id, or — when it had none and the model gave it
    a fresh one — by its sandbox id."""
    event_id = event_id_of(body)
    if event_id is not None:
        return event_id in failed_causes
    return field_of(body, "sandbox_id") in failed_sandboxes


async def wait_accounted(t: Target, subject: str, bodies: list[bytes], *, failed_causes: set[str] | None = None,
                         failed_sandboxes: set[str] | None = None, timeout: float = 90) -> tuple[int, list[bytes]]:
    """(dead-lettered count, bodies neither dead-lettered nor rejected)."""
    deadline = time.monotonic() + timeout
    while True:
        dlq = await dead_lettered(t, subject)
        missing = [
            b for b in bodies
            if b not in dlq and not (failed_causes is not None
                                     and rejected_by(b, failed_causes, failed_sandboxes or set()))
        ]
        if not missing or time.monotonic() > deadline:
            return sum(1 for b in bodies if b in dlq), missing
        await asyncio.sleep(0.5)


# --- the tests ---------------------------------------------------------------------------------------
async def test_tokens_issued_hostile_all_dead_lettered(target: Target) -> None:
    t = target
    base = issued_doc(t, box=valid_box(t, new_event_id()))
    bodies = draw_corpus(st.one_of(garbage, mutated(base), hostile_boxes(t)))
    bodies = list(dict.fromkeys(bodies))  # the DLQ keeps bodies, so count distinct ones
    await send(t, subjects.TOKENS_ISSUED, bodies)
    count, missing = await wait_accounted(t, subjects.TOKENS_ISSUED, bodies)
    print(f"\ntokens.issued: {len(bodies)} hostile, {count} dead-lettered, {len(missing)} unaccounted")
    assert not missing, [m[:120] for m in missing[:5]]
    # a whole valid event replayed (same event id, new Nats-Msg-Id) has no second effect
    user = f"good-replay-{uuid.uuid4().hex[:8]}"
    event = common.tokens_issued(t.vault_key, user)
    await common.publish(t.js, subjects.TOKENS_ISSUED, event)
    await _wait_user(t, user)
    version = _version(t, user)
    body, _ = common.encode(event)
    await t.js.publish(subjects.TOKENS_ISSUED, body, headers={subjects.MSG_ID_HEADER: f"replay-{uuid.uuid4().hex}"},
                       stream=subjects.TOKENS_STREAM.name)
    await t.good_flow_still_works()  # processed after the replay, in order
    assert _version(t, user) == version
    t.no_bad_writes()


async def test_sandbox_created_hostile_dead_lettered_or_rejected(target: Target) -> None:
    t = target
    victim = common.uid("victim")  # connected: the config_dir checks run after the fetch
    await common.publish(t.js, subjects.TOKENS_ISSUED, common.tokens_issued(t.vault_key, victim))
    await _wait_user(t, victim)
    # granted sandboxes (auth's POST /v1/claude-code/grants), so the hostile options meet the
    # checks behind the vault's grant check; mutations of the grant field itself are in the corpus
    base_sandbox, victim_sandboxes = hostile_sandbox_id(), [hostile_sandbox_id() for _ in range(8)]
    async with common.Grants.of(t.stack) as grants:
        base_grant = await grants.grant(f"{HOSTILE}user", base_sandbox)
        victim_grants = await grants.many((victim, s, "access_only") for s in victim_sandboxes)
    base = common.sandbox_created(f"{HOSTILE}user", base_sandbox, grant=base_grant).model_dump(mode="json")
    semantic = st.one_of(
        # schema-valid but hostile: config dir escaping the home, absolute paths elsewhere,
        # a person with no connection, another person's grant; each must be answered with
        # sandbox.credentials.failed
        st.tuples(st.sampled_from(["../../escape-canary", "/etc/escape-canary", "a/../../escape-canary", "..", "./"]),
                  st.sampled_from(victim_sandboxes)).map(
            lambda ds: {**base, "event_id": new_event_id(), "sandbox_id": ds[1], "grant": victim_grants[ds[1]],
                        "user_id": victim, "options": {"config_dir": ds[0]}}
        ),
        st.just(None).map(lambda _: {**base, "event_id": new_event_id()}),
        st.sampled_from(victim_sandboxes).map(lambda s: {**base, "event_id": new_event_id(), "user_id": victim,
                                                         "sandbox_id": s}),
        st.sampled_from(["../etc", "a/b", ".hidden", "x" * 200, "sbx\x00", ""]).map(
            lambda s: {**base, "event_id": new_event_id(), "sandbox_id": s}
        ),
    ).map(lambda doc: json.dumps(doc).encode())
    bodies = draw_corpus(st.one_of(garbage, mutated(base), semantic))
    bodies = list(dict.fromkeys(bodies))
    watcher = await common.ResultWatcher(t.nc).start()
    await send(t, subjects.SANDBOX_CREATED, bodies)
    failed: set[str] = set()
    failed_sandboxes: set[str] = set()

    def refresh_failed() -> set[str]:
        for cause, results in watcher.results.items():
            for result in results:
                if isinstance(result.event, SandboxCredentialsFailed):
                    failed.add(cause)
                    failed_sandboxes.add(result.event.sandbox_id)
        return failed

    deadline = time.monotonic() + 90
    while True:
        count, missing = await wait_accounted(t, subjects.SANDBOX_CREATED, bodies, failed_causes=refresh_failed(),
                                              failed_sandboxes=failed_sandboxes, timeout=0)
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    injected = [c for c, rs in watcher.results.items() if any(r.subject.endswith("injected") for r in rs)]
    reasons = Counter(r.event.reason for rs in watcher.results.values() for r in rs
                      if isinstance(r.event, SandboxCredentialsFailed))
    await watcher.stop()
    print(f"\nsandbox.created: {len(bodies)} hostile, {count} dead-lettered, "
          f"{len(bodies) - count - len(missing)} rejected with a failed event {dict(reasons)}, "
          f"{len(missing)} unaccounted")
    assert not missing, [m[:160] for m in missing[:5]]
    assert not [c for c in injected if c in {event_id_of(b) for b in bodies}], "a hostile event was injected"
    await t.good_flow_still_works()
    t.no_bad_writes()


async def test_other_consumed_subjects_dead_letter_malformed(target: Target) -> None:
    t = target
    corpus = list(dict.fromkeys(draw_corpus(garbage)))[:40]
    # each subject gets its own bodies (see the cross-subject test below for why); a suffix
    # keeps every body malformed
    sent = {
        subject: [body + b" " + subject.encode() for body in corpus]
        for subject in (subjects.TOKENS_REVOKED, subjects.TOKENS_REFRESHED, subjects.SANDBOX_DESTROYED)
    }
    for subject, bodies in sent.items():
        await send(t, subject, bodies)
    for subject, bodies in sent.items():
        count, missing = await wait_accounted(t, subject, bodies)
        print(f"\n{subject}: {len(bodies)} malformed, {count} dead-lettered, {len(missing)} unaccounted")
        assert not missing, (subject, [m[:120] for m in missing[:5]])
    await t.good_flow_still_works()
    t.no_bad_writes()


async def test_same_bad_body_on_two_subjects_dead_lettered_twice(target: Target) -> None:
    t = target
    body = json.dumps({"not": "an event", "nonce": uuid.uuid4().hex}).encode()
    await send(t, subjects.TOKENS_REFRESHED, [body])  # sandbox only
    await send(t, subjects.SANDBOX_DESTROYED, [body])  # sandbox only
    _, missing_refreshed = await wait_accounted(t, subjects.TOKENS_REFRESHED, [body], timeout=30)
    _, missing_destroyed = await wait_accounted(t, subjects.SANDBOX_DESTROYED, [body], timeout=30)
    assert not missing_refreshed and not missing_destroyed


async def test_credentials_get_hostile_requests_rejected(target: Target) -> None:
    t = target
    connected = common.uid("good-user")
    await common.publish(t.js, subjects.TOKENS_ISSUED, common.tokens_issued(t.vault_key, connected))
    await _wait_user(t, connected)
    sandbox = t.sandbox_key
    intruder = KeyPair.generate()
    base = CredentialsRequest(user_id=connected, requester_key_id=sandbox.key_id,
                              requester_public_key=sandbox.recipient.public_b64).model_dump(mode="json")
    semantic = st.one_of(
        # an untrusted key asks for a connected person's tokens
        st.sampled_from(["file", "access_only", "env"]).map(lambda m: {
            **base, "request_id": new_event_id(), "mode": m, "requester_key_id": intruder.key_id,
            "requester_public_key": intruder.recipient.public_b64}),
        # the trusted key's public half with somebody else's key id, and the reverse
        st.just(None).map(lambda _: {**base, "request_id": new_event_id(), "requester_key_id": intruder.key_id}),
        st.just(None).map(lambda _: {**base, "request_id": new_event_id(),
                                     "requester_public_key": intruder.recipient.public_b64}),
        st.text(max_size=60).map(lambda k: {**base, "request_id": new_event_id(), "requester_public_key": k or "x"}),
    ).map(lambda doc: json.dumps(doc).encode())
    batch = CredentialsBatchRequest(requester_key_id=sandbox.key_id, requester_public_key=sandbox.recipient.public_b64,
                                    items=[CredentialsItem(user_id=connected, sandbox_id="sbx-fuzz")]
                                    ).model_dump(mode="json")
    bodies = draw_corpus(st.one_of(garbage, mutated(base).filter(lambda b: b != json.dumps(base).encode()),
                                   mutated(batch).filter(lambda b: b != json.dumps(batch).encode()), semantic))
    rejected, granted, silent = 0, [], []
    replies: TypeAdapter[Any] = TypeAdapter(CredentialsReply | CredentialsBatchReply)
    for body in bodies:
        try:
            reply = await t.nc.request(subjects.VAULT_CREDENTIALS_GET, body, timeout=10)
        except nats.errors.TimeoutError:
            silent.append(body)
            continue
        parsed = replies.validate_json(reply.data)  # every answer is a reply of one version or the other
        released = parsed.ok and (parsed.sealed is not None)
        if released:
            granted.append(body)
        else:
            rejected += 1
    print(f"\nvault.credentials.get: {len(bodies)} hostile, {rejected} rejected with an error reply, "
          f"{len(granted)} granted, {len(silent)} unanswered")
    # no request in the corpus carries a grant, so whatever its shape nothing may be released
    assert granted == [], [g[:200] for g in granted[:3]]
    assert not silent, [s[:120] for s in silent[:5]]
    assert rejected >= len(bodies) - len(granted)
    await t.good_flow_still_works()


def _version(t: Target, user: str) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{common.db_path(t.data_dir)}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT version FROM connections WHERE user_id = ?", (user,)).fetchone()[0])


async def _wait_user(t: Target, user: str) -> None:
    deadline = time.monotonic() + 60
    while user not in common.connection_users(common.db_path(t.data_dir)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
