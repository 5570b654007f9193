"""deploy/nats/accounts.conf, proved on a real nats-server: every service user can do exactly
its job (JetStream publish with ack, its own durable pull consumers, request/reply vault <->
sandbox, auth's KV bucket) and every forbidden publish / subscribe / JetStream API call is refused
(nats-py reports the server's "permissions violation" through the error callback)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig, StreamSource

from ccbridge.embedded_nats import nats_server_binary
from shared import subjects as s
from shared.broker import ensure_streams, settle
from tests.nats_perms_fixtures import (
    USERS,
    SecuredNats,
    inbox_prefix,
    password_env_name,
    render_nats_config,
)

# core request/reply: auth and the platform ask, the vault answers (no token in the answer)
CONNECTIONS_STATUS = getattr(s, "VAULT_CONNECTIONS_STATUS", "vault.connections.status")
VIOLATION_WAIT_S = 10.0
DENIED_API_TIMEOUT_S = 1.0


class Conn:
    """One user's connection plus the errors the server sent it."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.errors: list[str] = []
        self._changed = asyncio.Event()
        self.nc: NatsClient | None = None

    async def on_error(self, error: Exception) -> None:
        self.errors.append(str(error).lower())
        self._changed.set()

    async def connect(self, url: str, *, inbox: str | None = None) -> Conn:
        """As ccbridge connects: replies on the user's own prefix `_INBOX.ccbridge-<user>`."""
        self.nc = await nats.connect(url, error_cb=self.on_error, allow_reconnect=False, name=f"perm-test-{self.user}",
                                     inbox_prefix=inbox or inbox_prefix(self.user))
        return self

    @property
    def js(self):
        return self.nc.jetstream(timeout=5.0)

    @property
    def js_denied(self):
        return self.nc.jetstream(timeout=DENIED_API_TIMEOUT_S)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]

    async def expect_violation(self, verb: str, subject: str) -> None:
        """Wait until the server reports `Permissions Violation for <verb> to "<subject>"`."""
        needle = f'permissions violation for {verb} to "{subject.lower()}"'
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VIOLATION_WAIT_S
        while not any(needle in e for e in self.errors):
            remaining = deadline - loop.time()
            if remaining <= 0:
                pytest.fail(f"{self.user}: no '{needle}' (errors seen: {self.errors})")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        assert self.nc is not None and self.nc.is_connected, "a refused operation must not drop the connection"

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


@pytest.fixture(scope="module")
async def bus(secured_nats: SecuredNats) -> AsyncIterator[dict[str, Conn]]:
    conns = {user: await Conn(user).connect(secured_nats.url(user)) for user in USERS}
    await ensure_streams(conns["auth"].js)  # streams exist before any test, as after `auth` starts
    yield conns
    for conn in conns.values():
        await conn.close()


def uid() -> str:
    return uuid.uuid4().hex


async def pull_until(sub, wanted: str):
    """Fetch one message at a time until the one whose body holds `wanted` arrives (others,
    left by earlier tests on the shared server, are acked and skipped)."""
    for _ in range(30):  # bounded: a refused MSG.NEXT must fail the test, not hang it
        try:
            (msg,) = await sub.fetch(batch=1, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        if wanted.encode() in msg.data:
            return msg
        await msg.ack()
    pytest.fail(f"message {wanted} never arrived")


def explicit_ack(**extra: object) -> ConsumerConfig:
    return ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=5, ack_wait=30, **extra)


# --- the config itself ----------------------------------------------------------------------
def test_config_is_valid_and_fails_closed_without_a_password(tmp_path: Path) -> None:
    config = render_nats_config(tmp_path / "conf", store_dir=tmp_path / "store")
    env = {**os.environ, **{password_env_name(u): "x" * 16 for u in USERS}}
    ok = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr + ok.stdout

    env.pop("NATS_SANDBOX_PASSWORD")
    broken = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], env=env, capture_output=True, text=True)
    assert broken.returncode != 0
    assert "NATS_SANDBOX_PASSWORD" in broken.stderr + broken.stdout


def test_committed_config_holds_no_password_literal() -> None:
    text = (Path(__file__).resolve().parents[2] / "deploy/nats/accounts.conf").read_text()
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped.startswith("password"):
            assert stripped.split(":", 1)[1].strip().startswith("$NATS_"), line


@pytest.mark.parametrize("how", ["anonymous", "wrong_password", "unknown_user"])
async def test_unauthenticated_connections_are_refused(secured_nats: SecuredNats, how: str) -> None:
    url = {
        "anonymous": secured_nats.anonymous_url,
        "wrong_password": f"nats://vault:not-the-password@127.0.0.1:{secured_nats.port}",
        "unknown_user": f"nats://mallory:{secured_nats.passwords['vault']}@127.0.0.1:{secured_nats.port}",
    }[how]
    seen: list[Exception] = []

    async def on_error(error: Exception) -> None:
        seen.append(error)

    with pytest.raises((nats.errors.NoServersError, nats.errors.AuthorizationError, nats.errors.Error)):
        await nats.connect(url, error_cb=on_error, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2)
    assert any(isinstance(e, nats.errors.AuthorizationError) or "authorization" in str(e).lower() for e in seen)


# --- what each user may do -------------------------------------------------------------------
@pytest.mark.parametrize("user", ["auth", "vault", "sandbox"])
async def test_every_service_can_provision_the_streams(bus: dict[str, Conn], user: str) -> None:
    conn = bus[user]
    await ensure_streams(conn.js)  # create-or-update, as shared.broker.provision does at start
    for spec in s.ALL_STREAMS:
        info = await conn.js.stream_info(spec.name)
        assert info.config.subjects == list(spec.subjects)
    assert conn.violations() == []


async def test_auth_owns_the_pending_logins_bucket(bus: dict[str, Conn]) -> None:
    auth = bus["auth"]
    kv = await auth.js.create_key_value(bucket=s.PENDING_LOGINS_BUCKET, ttl=600)
    key = f"state-{uid()}"
    await kv.put(key, b'{"verifier":"sealed-or-hashed"}')
    assert (await kv.get(key)).value == b'{"verifier":"sealed-or-hashed"}'
    again = await auth.js.key_value(s.PENDING_LOGINS_BUCKET)  # bind (second replica)
    assert key in await again.keys()
    await kv.delete(key)
    with pytest.raises(Exception):  # noqa: B017 - KeyDeletedError or KeyNotFoundError
        await kv.get(key)
    assert auth.violations() == []


async def test_the_whole_event_flow_runs_under_least_privilege(bus: dict[str, Conn]) -> None:
    auth, vault, sandbox, platform, ops = (bus[u] for u in USERS)
    run = uid()

    # vault answers vault.credentials.get (queue group, as N replicas would)
    async def answer(msg) -> None:
        request = json.loads(msg.data)
        await msg.respond(json.dumps({"request_id": request["request_id"], "ok": True, "sealed": "box"}).encode())

    responder = await vault.nc.subscribe(s.VAULT_CREDENTIALS_GET, queue=s.VAULT_QUEUE, cb=answer)
    results_live = await platform.nc.subscribe("sandbox.credentials.*")
    await settle(vault.nc)
    await settle(platform.nc)

    # platform -> sandbox.created (JetStream ack)
    ack = await platform.js.publish(s.SANDBOX_CREATED, json.dumps({"sandbox_id": run}).encode(),
                                    headers={s.MSG_ID_HEADER: f"created-{run}"})
    assert ack.stream == s.SANDBOX_STREAM.name

    # sandbox consumes it through its durable, asks the vault, reports the result
    created = await sandbox.js.pull_subscribe(s.SANDBOX_CREATED, durable=s.SANDBOX_CREATED_DURABLE,
                                              stream=s.SANDBOX_STREAM.name, config=explicit_ack())
    msg = await pull_until(created, run)
    await msg.in_progress()
    await msg.ack_sync()

    reply = await sandbox.nc.request(s.VAULT_CREDENTIALS_GET, json.dumps({"request_id": run}).encode(), timeout=5)
    assert json.loads(reply.data) == {"request_id": run, "ok": True, "sealed": "box"}
    await responder.unsubscribe()

    ack = await sandbox.js.publish(s.SANDBOX_CREDENTIALS_INJECTED, json.dumps({"sandbox_id": run}).encode(),
                                   headers={s.MSG_ID_HEADER: f"injected-{run}"})
    assert ack.stream == s.SANDBOX_STREAM.name

    # platform reads the result live and through its own durable
    live = await results_live.next_msg(timeout=5)
    assert live.subject == s.SANDBOX_CREDENTIALS_INJECTED and run.encode() in live.data
    results = await platform.js.pull_subscribe("sandbox.credentials.>", durable="platform-results",
                                               stream=s.SANDBOX_STREAM.name, config=explicit_ack())
    await (await pull_until(results, run)).ack_sync()

    # auth -> tokens.issued -> vault's durable (nak once, redelivered, ack)
    ack = await auth.js.publish(s.TOKENS_ISSUED, json.dumps({"user_id": run, "sealed": "box"}).encode(),
                                headers={s.MSG_ID_HEADER: f"issued-{run}"})
    assert ack.stream == s.TOKENS_STREAM.name
    issued = await vault.js.pull_subscribe(s.TOKENS_ISSUED, durable=s.VAULT_TOKENS_ISSUED_DURABLE,
                                           stream=s.TOKENS_STREAM.name, config=explicit_ack())
    first = await pull_until(issued, run)
    await first.nak()
    redelivered = await pull_until(issued, run)
    assert redelivered.metadata.num_delivered >= 2
    await redelivered.ack_sync()

    # vault -> tokens.refreshed / tokens.reconnect_required; sandbox consumes refreshed
    for subject in (s.TOKENS_REFRESHED, s.TOKENS_RECONNECT_REQUIRED):
        ack = await vault.js.publish(subject, json.dumps({"user_id": run}).encode(),
                                     headers={s.MSG_ID_HEADER: f"{subject}-{run}"})
        assert ack.stream == s.TOKENS_STREAM.name
    refreshed = await sandbox.js.pull_subscribe(s.TOKENS_REFRESHED, durable=s.SANDBOX_TOKENS_REFRESHED_DURABLE,
                                                stream=s.TOKENS_STREAM.name, config=explicit_ack())
    await (await pull_until(refreshed, run)).ack_sync()

    # auth -> tokens.revoked -> both the vault's and the sandbox's durables
    await auth.js.publish(s.TOKENS_REVOKED, json.dumps({"user_id": run}).encode(),
                          headers={s.MSG_ID_HEADER: f"revoked-{run}"})
    for conn, durable in ((vault, s.VAULT_TOKENS_REVOKED_DURABLE), (sandbox, s.SANDBOX_TOKENS_REVOKED_DURABLE)):
        revoked = await conn.js.pull_subscribe(s.TOKENS_REVOKED, durable=durable, stream=s.TOKENS_STREAM.name,
                                               config=explicit_ack())
        await (await pull_until(revoked, run)).ack_sync()

    # auth and the platform ask the vault for a connection's status; the platform disconnects
    async def status(msg) -> None:
        await msg.respond(json.dumps({"connected": True, "state": "connected"}).encode())

    status_responder = await vault.nc.subscribe(CONNECTIONS_STATUS, queue=s.VAULT_QUEUE, cb=status)
    await settle(vault.nc)
    for conn in (auth, platform):
        answer_ = await conn.nc.request(CONNECTIONS_STATUS, json.dumps({"user_id": run}).encode(), timeout=5)
        assert json.loads(answer_.data)["connected"] is True
    await status_responder.unsubscribe()
    ack = await platform.js.publish(s.TOKENS_REVOKED, json.dumps({"user_id": run, "reason": "platform"}).encode(),
                                    headers={s.MSG_ID_HEADER: f"platform-revoked-{run}"})
    assert ack.stream == s.TOKENS_STREAM.name

    # platform -> sandbox.destroyed -> sandbox
    await platform.js.publish(s.SANDBOX_DESTROYED, json.dumps({"sandbox_id": run}).encode(),
                              headers={s.MSG_ID_HEADER: f"destroyed-{run}"})
    destroyed = await sandbox.js.pull_subscribe(s.SANDBOX_DESTROYED, durable=s.SANDBOX_DESTROYED_DURABLE,
                                                stream=s.SANDBOX_STREAM.name, config=explicit_ack())
    await (await pull_until(destroyed, run)).ack_sync()

    # dead letters from vault and sandbox; ops reads them
    for conn, original in ((vault, s.TOKENS_ISSUED), (sandbox, s.SANDBOX_CREATED)):
        ack = await conn.js.publish(s.dead_letter_subject(original), json.dumps({"user_id": run}).encode(),
                                    headers={s.MSG_ID_HEADER: f"dlq-{conn.user}-{run}"})
        assert ack.stream == s.DLQ_STREAM.name
    dlq = await ops.js.pull_subscribe("dlq.>", durable=f"ops-{run}", stream=s.DLQ_STREAM.name)
    seen = set()
    for _ in range(2):
        letter = await pull_until(dlq, run)
        seen.add(letter.subject)
        await letter.ack()
    assert seen == {"dlq.tokens.issued", "dlq.sandbox.created"}

    for conn in bus.values():
        assert conn.violations() == [], (conn.user, conn.violations())


# --- what each user may NOT do: core publish / subscribe ---------------------------------------
CORE_DENIED = [
    ("auth", "publish", "tokens.refreshed"),
    ("auth", "publish", "tokens.reconnect_required"),
    ("auth", "publish", "sandbox.created"),
    ("auth", "publish", "sandbox.credentials.injected"),
    ("auth", "publish", "vault.credentials.get"),
    ("auth", "publish", "dlq.tokens.issued"),
    ("auth", "subscribe", "tokens.issued"),
    ("auth", "subscribe", "tokens.>"),
    ("auth", "subscribe", "vault.credentials.get"),
    ("auth", "subscribe", CONNECTIONS_STATUS),
    ("auth", "subscribe", "sandbox.>"),
    ("auth", "subscribe", ">"),
    ("vault", "publish", "tokens.issued"),
    ("vault", "publish", "tokens.revoked"),
    ("vault", "publish", "sandbox.created"),
    ("vault", "publish", "sandbox.credentials.injected"),
    ("vault", "publish", "_INBOX.not-a-reply-to-anything"),
    ("vault", "subscribe", "tokens.issued"),
    ("vault", "subscribe", "sandbox.created"),
    ("sandbox", "publish", "tokens.issued"),
    ("sandbox", "publish", "tokens.refreshed"),
    ("sandbox", "publish", "tokens.revoked"),
    ("sandbox", "publish", "tokens.reconnect_required"),
    ("sandbox", "publish", "sandbox.created"),
    ("sandbox", "publish", CONNECTIONS_STATUS),
    ("sandbox", "subscribe", "vault.credentials.get"),
    ("sandbox", "subscribe", CONNECTIONS_STATUS),
    ("sandbox", "subscribe", "tokens.refreshed"),
    ("sandbox", "subscribe", "tokens.>"),
    ("platform", "publish", "sandbox.credentials.injected"),
    ("platform", "publish", "sandbox.credentials.failed"),
    ("platform", "publish", "tokens.issued"),
    ("platform", "publish", "tokens.refreshed"),
    ("platform", "publish", "vault.credentials.get"),
    ("platform", "publish", "dlq.sandbox.created"),
    ("platform", "subscribe", "sandbox.created"),
    ("platform", "subscribe", "tokens.>"),
    ("platform", "subscribe", "vault.credentials.get"),
    ("platform", "subscribe", CONNECTIONS_STATUS),
    ("platform", "subscribe", ">"),
    # grants: auth signs and ends them, the vault ends leases, nobody else writes any
    ("auth", "publish", "grants.ended"),
    ("auth", "publish", "tokens.login_expiring"),
    ("auth", "subscribe", "grants.>"),
    ("auth", "subscribe", "grants.ended"),
    ("auth", "subscribe", s.VAULT_GRANTS_LIST),
    ("vault", "publish", "grants.issued"),
    ("vault", "publish", "grants.revoked"),
    ("vault", "subscribe", "grants.issued"),
    ("vault", "subscribe", "grants.ended"),
    ("sandbox", "publish", "grants.issued"),
    ("sandbox", "publish", "grants.revoked"),
    ("sandbox", "publish", "grants.ended"),
    ("sandbox", "publish", "tokens.login_expiring"),
    ("sandbox", "publish", s.VAULT_GRANTS_LIST),
    ("sandbox", "subscribe", s.VAULT_GRANTS_LIST),
    ("sandbox", "subscribe", "grants.ended"),
    ("platform", "publish", "grants.issued"),
    ("platform", "publish", "grants.revoked"),
    ("platform", "publish", "grants.ended"),
    ("platform", "publish", "tokens.login_expiring"),
    ("platform", "publish", "tokens.reconnect_required"),
    ("platform", "publish", s.VAULT_GRANTS_LIST),
    # the notices it may read do not open the token subjects around them
    ("platform", "subscribe", "tokens.issued"),
    ("platform", "subscribe", "tokens.refreshed"),
    ("platform", "subscribe", "tokens.revoked"),
    ("platform", "subscribe", "tokens.*"),
    ("platform", "subscribe", "grants.issued"),
    ("platform", "subscribe", "grants.revoked"),
    ("platform", "subscribe", "grants.>"),
    ("platform", "subscribe", s.VAULT_GRANTS_LIST),
    # replies: each user reads its own inbox only (what the vault fetches is the sealed tokens)
    *[(spy, "subscribe", "_INBOX.>") for spy in ("auth", "vault", "sandbox", "platform")],
    *[(spy, "subscribe", "_INBOX.*") for spy in ("auth", "vault", "sandbox", "platform")],
    *[(spy, "subscribe", f"{inbox_prefix(owner)}.>")
      for spy in ("auth", "vault", "sandbox", "platform") for owner in USERS if owner != spy],
]


@pytest.mark.parametrize(("user", "verb", "subject"), CORE_DENIED, ids=lambda v: str(v))
async def test_forbidden_core_traffic_is_refused(bus: dict[str, Conn], user: str, verb: str, subject: str) -> None:
    conn = bus[user]
    if verb == "publish":
        await conn.nc.publish(subject, b"{}")
        await conn.nc.flush()
        await conn.expect_violation("publish", subject)
    else:
        await conn.nc.subscribe(subject)
        await conn.nc.flush()
        await conn.expect_violation("subscription", subject)


# --- single rules the whole-flow tests depend on, one by one ------------------------------------
CORE_ALLOWED = [
    ("vault", "publish", s.TOKENS_LOGIN_EXPIRING),
    ("vault", "publish", s.GRANTS_ENDED),
    ("auth", "publish", s.GRANTS_ISSUED),
    ("auth", "publish", s.GRANTS_REVOKED),
    ("platform", "subscribe", s.TOKENS_RECONNECT_REQUIRED),
    ("platform", "subscribe", s.TOKENS_LOGIN_EXPIRING),
    ("platform", "subscribe", s.GRANTS_ENDED),
    ("vault", "subscribe", s.VAULT_GRANTS_LIST),
    *[(user, "subscribe", f"{inbox_prefix(user)}.>") for user in ("auth", "vault", "sandbox", "platform")],
]


@pytest.mark.parametrize(("user", "verb", "subject"), CORE_ALLOWED, ids=lambda v: str(v))
async def test_allowed_core_traffic_is_accepted(bus: dict[str, Conn], user: str, verb: str, subject: str) -> None:
    conn = bus[user]
    before = len(conn.violations())
    if verb == "publish":
        await conn.nc.publish(subject, json.dumps({"user_id": f"allowed-{uid()}"}).encode())
    else:
        await (await conn.nc.subscribe(subject)).unsubscribe()
    await settle(conn.nc)  # a refusal is sent before the PONG that ends this
    assert conn.violations()[before:] == []


async def test_auth_cannot_read_back_the_tokens_it_publishes(bus: dict[str, Conn]) -> None:
    auth = bus["auth"]
    spy = await auth.nc.subscribe(s.TOKENS_ISSUED)
    await auth.expect_violation("subscription", s.TOKENS_ISSUED)
    run = uid()
    ack = await auth.js.publish(s.TOKENS_ISSUED, run.encode(), headers={s.MSG_ID_HEADER: f"spy-{run}"})
    assert ack.stream == s.TOKENS_STREAM.name
    await auth.nc.flush()  # anything the server routed to auth before the ack is here by now
    assert spy.pending_msgs == 0


async def test_only_the_vault_receives_credential_requests(bus: dict[str, Conn]) -> None:
    sandbox, vault, platform = bus["sandbox"], bus["vault"], bus["platform"]
    spies = [await conn.nc.subscribe(s.VAULT_CREDENTIALS_GET) for conn in (sandbox, platform)]
    for conn in (sandbox, platform):
        await conn.expect_violation("subscription", s.VAULT_CREDENTIALS_GET)
    got: list[bytes] = []

    async def answer(msg) -> None:
        got.append(msg.data)
        await msg.respond(b"ok")

    sub = await vault.nc.subscribe(s.VAULT_CREDENTIALS_GET, queue=s.VAULT_QUEUE, cb=answer)
    await settle(vault.nc)
    run = uid().encode()
    assert (await sandbox.nc.request(s.VAULT_CREDENTIALS_GET, run, timeout=5)).data == b"ok"
    await sub.unsubscribe()
    for conn, spy in zip((sandbox, platform), spies, strict=True):
        await conn.nc.flush()
        assert spy.pending_msgs == 0
    assert run in got


async def test_messages_the_vault_fetches_reach_only_the_vaults_inbox(bus: dict[str, Conn]) -> None:
    """The review's case: JetStream delivers what the vault pulls from its durable (the sealed
    tokens.issued) on the vault's inbox. No other user may listen there, nor on `_INBOX.>`."""
    auth, vault = bus["auth"], bus["vault"]
    vault_violations = len(vault.violations())  # the module's server is shared: count from here
    spies = {user: bus[user] for user in ("auth", "sandbox", "platform")}
    spy_subs = []
    for conn in spies.values():
        for pattern in ("_INBOX.>", f"{inbox_prefix('vault')}.>"):
            spy_subs.append((conn, await conn.nc.subscribe(pattern)))
            await conn.expect_violation("subscription", pattern)
    run = uid()
    await auth.js.publish(s.TOKENS_ISSUED, json.dumps({"user_id": run, "sealed": "box"}).encode(),
                          headers={s.MSG_ID_HEADER: f"inbox-spy-{run}"})
    issued = await vault.js.pull_subscribe(s.TOKENS_ISSUED, durable=s.VAULT_TOKENS_ISSUED_DURABLE,
                                           stream=s.TOKENS_STREAM.name, config=explicit_ack())
    # fetched into the vault's own `_INBOX.ccbridge-vault.<nuid>` (nats-py keeps that subject private)
    assert issued._deliver.startswith(f"{inbox_prefix('vault')}.")
    await (await pull_until(issued, run)).ack_sync()
    for conn, sub in spy_subs:
        await conn.nc.flush()
        assert sub.pending_msgs == 0, f"{conn.user} read the vault's inbox"
    assert vault.violations()[vault_violations:] == []


@pytest.mark.parametrize("user", ["auth", "vault", "sandbox", "platform"])
async def test_a_client_on_the_default_inbox_prefix_gets_no_replies(secured_nats: SecuredNats, user: str) -> None:
    """Every ccbridge connection must set its inbox prefix: on nats-py's default `_INBOX` the
    server refuses the reply subscription, so requests and JetStream calls time out (here
    $JS.API.INFO, which every service user may ask)."""
    conn = await Conn(user).connect(secured_nats.url(user), inbox="_INBOX")
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await conn.nc.request("$JS.API.INFO", b"", timeout=DENIED_API_TIMEOUT_S)
        assert any('permissions violation for subscription to "_inbox.' in e for e in conn.errors), conn.errors
    finally:
        await conn.close()


async def test_the_platform_reads_the_notices_the_vault_publishes(bus: dict[str, Conn]) -> None:
    """docs/events.md promises the platform tokens.reconnect_required, tokens.login_expiring and
    grants.ended: the vault may publish them (JetStream, acked) and the platform reads them live."""
    vault, platform = bus["vault"], bus["platform"]
    before = {conn.user: len(conn.violations()) for conn in (vault, platform)}
    run = uid()
    notices = (s.TOKENS_RECONNECT_REQUIRED, s.TOKENS_LOGIN_EXPIRING, s.GRANTS_ENDED)
    live = {subject: await platform.nc.subscribe(subject) for subject in notices}
    await settle(platform.nc)
    for subject in notices:
        ack = await vault.js.publish(subject, json.dumps({"user_id": run}).encode(),
                                     headers={s.MSG_ID_HEADER: f"{subject}-{run}"})
        assert ack.stream == s.TOKENS_STREAM.name
    for subject, sub in live.items():
        msg = await sub.next_msg(timeout=5)
        assert msg.subject == subject and run.encode() in msg.data
        await sub.unsubscribe()
    for conn in (vault, platform):
        assert conn.violations()[before[conn.user]:] == [], (conn.user, conn.violations())


async def test_the_grants_flow_under_least_privilege(bus: dict[str, Conn]) -> None:
    """grants.issued / grants.revoked from auth reach the vault's durables, grants.ended from the
    vault reaches the sandbox service's durable, auth asks vault.grants.list and the vault answers."""
    auth, vault, sandbox = bus["auth"], bus["vault"], bus["sandbox"]
    before = {conn.user: len(conn.violations()) for conn in (auth, vault, sandbox)}
    run = uid()
    for subject, durable in ((s.GRANTS_ISSUED, s.VAULT_GRANTS_ISSUED_DURABLE),
                             (s.GRANTS_REVOKED, s.VAULT_GRANTS_REVOKED_DURABLE)):
        ack = await auth.js.publish(subject, json.dumps({"user_id": run, "sandbox_id": run}).encode(),
                                    headers={s.MSG_ID_HEADER: f"{subject}-{run}"})
        assert ack.stream == s.TOKENS_STREAM.name
        grants = await vault.js.pull_subscribe(subject, durable=durable, stream=s.TOKENS_STREAM.name,
                                               config=explicit_ack())
        first = await pull_until(grants, run)
        await first.in_progress()
        await first.ack_sync()

    ack = await vault.js.publish(s.GRANTS_ENDED, json.dumps({"user_id": run}).encode(),
                                 headers={s.MSG_ID_HEADER: f"ended-{run}"})
    assert ack.stream == s.TOKENS_STREAM.name
    ended = await sandbox.js.pull_subscribe(s.GRANTS_ENDED, durable=s.SANDBOX_GRANTS_ENDED_DURABLE,
                                            stream=s.TOKENS_STREAM.name, config=explicit_ack())
    await (await pull_until(ended, run)).ack_sync()

    async def grants_list(msg) -> None:
        await msg.respond(json.dumps({"grants": [{"sandbox_id": run}]}).encode())

    responder = await vault.nc.subscribe(s.VAULT_GRANTS_LIST, queue=s.VAULT_QUEUE, cb=grants_list)
    await settle(vault.nc)
    reply = await auth.nc.request(s.VAULT_GRANTS_LIST, json.dumps({"user_id": run}).encode(), timeout=5)
    assert json.loads(reply.data) == {"grants": [{"sandbox_id": run}]}
    await responder.unsubscribe()
    for conn in (auth, vault, sandbox):
        assert conn.violations()[before[conn.user]:] == [], (conn.user, conn.violations())


# --- what each user may NOT do: JetStream API ------------------------------------------------
def _add_consumer(stream: str, name: str, filter_subject: str) -> Callable[[Conn], Awaitable[object]]:
    return lambda c: c.js_denied.add_consumer(
        stream, config=ConsumerConfig(name=name, durable_name=name, filter_subject=filter_subject))


def _raw(subject: str, payload: bytes = b"{}") -> Callable[[Conn], Awaitable[object]]:
    return lambda c: c.nc.request(subject, payload, timeout=DENIED_API_TIMEOUT_S)


TOKENS, SANDBOX = s.TOKENS_STREAM.name, s.SANDBOX_STREAM.name
JS_DENIED = [
    # auth must not read tokens through JetStream, nor destroy or copy the stream
    ("auth", f"$JS.API.CONSUMER.CREATE.{TOKENS}.auth-spy.tokens.issued", _add_consumer(TOKENS, "auth-spy", "tokens.issued")),
    ("auth", f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.VAULT_TOKENS_ISSUED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.VAULT_TOKENS_ISSUED_DURABLE}", b'{"batch":1}')),
    ("auth", f"$JS.API.STREAM.MSG.GET.{TOKENS}", lambda c: c.js_denied.get_msg(TOKENS, seq=1)),
    ("auth", f"$JS.API.DIRECT.GET.{TOKENS}", lambda c: c.js_denied.get_msg(TOKENS, seq=1, direct=True)),
    ("auth", f"$JS.API.STREAM.DELETE.{TOKENS}", lambda c: c.js_denied.delete_stream(TOKENS)),
    ("auth", f"$JS.API.STREAM.PURGE.{TOKENS}", lambda c: c.js_denied.purge_stream(TOKENS)),
    ("auth", "$JS.API.STREAM.CREATE.SPY_MIRROR",
     lambda c: c.js_denied.add_stream(StreamConfig(name="SPY_MIRROR", mirror=StreamSource(name=TOKENS)))),
    # the sandbox can only create its own durables on its own filter subjects
    ("sandbox", f"$JS.API.CONSUMER.CREATE.{TOKENS}.{s.SANDBOX_TOKENS_REFRESHED_DURABLE}.tokens.issued",
     _add_consumer(TOKENS, s.SANDBOX_TOKENS_REFRESHED_DURABLE, "tokens.issued")),
    ("sandbox", f"$JS.API.CONSUMER.CREATE.{TOKENS}.sandbox-spy.tokens.>", _add_consumer(TOKENS, "sandbox-spy", "tokens.>")),
    ("sandbox", f"$JS.API.CONSUMER.DURABLE.CREATE.{TOKENS}.{s.SANDBOX_TOKENS_REFRESHED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.DURABLE.CREATE.{TOKENS}.{s.SANDBOX_TOKENS_REFRESHED_DURABLE}")),
    ("sandbox", f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.VAULT_TOKENS_ISSUED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.VAULT_TOKENS_ISSUED_DURABLE}", b'{"batch":1}')),
    ("sandbox", f"$JS.API.STREAM.MSG.GET.{TOKENS}", lambda c: c.js_denied.get_msg(TOKENS, seq=1)),
    ("sandbox", f"$JS.API.STREAM.DELETE.{TOKENS}", lambda c: c.js_denied.delete_stream(TOKENS)),
    # the vault reads tokens, not sandbox events
    ("vault", f"$JS.API.CONSUMER.CREATE.{SANDBOX}.vault-spy.sandbox.created",
     _add_consumer(SANDBOX, "vault-spy", "sandbox.created")),
    ("vault", f"$JS.API.STREAM.DELETE.{SANDBOX}", lambda c: c.js_denied.delete_stream(SANDBOX)),
    # the platform reads results only, and cannot steal the sandbox service's work
    ("platform", f"$JS.API.CONSUMER.CREATE.{SANDBOX}.platform-results.sandbox.created",
     _add_consumer(SANDBOX, "platform-results", "sandbox.created")),
    ("platform", f"$JS.API.CONSUMER.MSG.NEXT.{SANDBOX}.{s.SANDBOX_CREATED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.MSG.NEXT.{SANDBOX}.{s.SANDBOX_CREATED_DURABLE}", b'{"batch":1}')),
    ("platform", f"$JS.API.STREAM.INFO.{TOKENS}", lambda c: c.js_denied.stream_info(TOKENS)),
    ("platform", f"$JS.API.STREAM.CREATE.{TOKENS}",
     lambda c: c.js_denied.add_stream(StreamConfig(name=TOKENS, subjects=["tokens.>"]))),
    # grants: each durable is its owner's, on its own filter; the platform reads grants.ended live only
    ("auth", f"$JS.API.CONSUMER.CREATE.{TOKENS}.auth-spy.grants.ended", _add_consumer(TOKENS, "auth-spy", "grants.ended")),
    ("auth", f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.SANDBOX_GRANTS_ENDED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.SANDBOX_GRANTS_ENDED_DURABLE}", b'{"batch":1}')),
    ("platform", f"$JS.API.CONSUMER.CREATE.{TOKENS}.platform-results.grants.ended",
     _add_consumer(TOKENS, "platform-results", "grants.ended")),
    ("platform", f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.SANDBOX_GRANTS_ENDED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.SANDBOX_GRANTS_ENDED_DURABLE}", b'{"batch":1}')),
    ("sandbox", f"$JS.API.CONSUMER.CREATE.{TOKENS}.{s.SANDBOX_GRANTS_ENDED_DURABLE}.grants.issued",
     _add_consumer(TOKENS, s.SANDBOX_GRANTS_ENDED_DURABLE, "grants.issued")),
    ("sandbox", f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.VAULT_GRANTS_ISSUED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.VAULT_GRANTS_ISSUED_DURABLE}", b'{"batch":1}')),
    ("vault", f"$JS.API.CONSUMER.CREATE.{TOKENS}.{s.VAULT_GRANTS_ISSUED_DURABLE}.grants.>",
     _add_consumer(TOKENS, s.VAULT_GRANTS_ISSUED_DURABLE, "grants.>")),
    ("vault", f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.SANDBOX_GRANTS_ENDED_DURABLE}",
     _raw(f"$JS.API.CONSUMER.MSG.NEXT.{TOKENS}.{s.SANDBOX_GRANTS_ENDED_DURABLE}", b'{"batch":1}')),
]


@pytest.mark.parametrize(("user", "api_subject", "call"), JS_DENIED, ids=[f"{u}:{a}" for u, a, _ in JS_DENIED])
async def test_forbidden_jetstream_api_calls_are_refused(
    bus: dict[str, Conn], user: str, api_subject: str, call: Callable[[Conn], Awaitable[object]]
) -> None:
    conn = bus[user]
    with pytest.raises(nats.errors.TimeoutError):  # the request never reaches JetStream
        await call(conn)
    await conn.expect_violation("publish", api_subject)


# --- the same rules through the services' own wiring (FastStream + shared.broker) -------------
async def test_faststream_wiring_of_the_services_works_under_their_users(tmp_path: Path) -> None:
    """make_broker + provision + a durable pull subscriber + publish_event + request/reply +
    dead_letter, each service on its own NATS user: the API subjects FastStream really uses are
    all granted (a violation would show up in the error list or as a timeout). Pull subscribers,
    routers' included, fetch into the service's own inbox prefix (CcbridgeBroker)."""
    from faststream.nats import AckPolicy as FsAckPolicy
    from faststream.nats import ConsumerConfig as FsConsumerConfig
    from faststream.nats import NatsRouter, PullSub

    from shared.broker import DLQ, SANDBOX, TOKENS, dead_letter, make_broker, provision, publish_event
    from shared.events import GrantEnded, GrantRevoked, SandboxCreated, Sealed, TokensIssued
    from shared.settings import ServiceSettings

    with SecuredNats.start(tmp_path) as server:
        errors: list[str] = []

        def settings_for(user: str) -> ServiceSettings:
            return ServiceSettings(nats_url=server.url(user))

        brokers = {user: make_broker(settings_for(user), name=user) for user in ("auth", "vault", "sandbox", "platform")}

        async def connect(user: str) -> None:
            await brokers[user].connect()
            nc = brokers[user].connection
            original = nc._error_cb  # make_broker takes no error_cb: tap nats-py's callback here

            async def tap(error: Exception) -> None:
                errors.append(f"{user}: {str(error).lower()}")
                await original(error)

            nc._error_cb = tap
        vault, sandbox = brokers["vault"], brokers["sandbox"]
        loop = asyncio.get_running_loop()
        issued_seen: asyncio.Future[str] = loop.create_future()
        created_seen: asyncio.Future[str] = loop.create_future()
        revoked_seen: asyncio.Future[str] = loop.create_future()
        ended_seen: asyncio.Future[str] = loop.create_future()
        consumer = FsConsumerConfig(ack_policy=FsAckPolicy.EXPLICIT, max_deliver=5, ack_wait=30)

        @vault.subscriber(s.TOKENS_ISSUED, stream=TOKENS, durable=s.VAULT_TOKENS_ISSUED_DURABLE,
                          pull_sub=PullSub(batch_size=1, timeout=1.0), config=consumer)
        async def on_issued(body: dict) -> None:
            if not issued_seen.done():
                issued_seen.set_result(body["event_id"])

        @vault.subscriber(s.VAULT_CREDENTIALS_GET, queue=s.VAULT_QUEUE)
        async def on_get(body: dict) -> dict:
            return {"request_id": body["request_id"], "ok": True}

        grants_router = NatsRouter()  # the vault's real subscribers live on routers

        @grants_router.subscriber(s.GRANTS_REVOKED, stream=TOKENS, durable=s.VAULT_GRANTS_REVOKED_DURABLE,
                                  pull_sub=PullSub(batch_size=1, timeout=1.0), config=consumer)
        async def on_grant_revoked(body: dict) -> None:
            if not revoked_seen.done():
                revoked_seen.set_result(body["event_id"])

        @grants_router.subscriber(s.VAULT_GRANTS_LIST, queue=s.VAULT_QUEUE)
        async def on_grants_list(body: dict) -> dict:
            return {"grants": []}

        vault.include_router(grants_router)

        @sandbox.subscriber(s.GRANTS_ENDED, stream=TOKENS, durable=s.SANDBOX_GRANTS_ENDED_DURABLE,
                            pull_sub=PullSub(batch_size=1, timeout=1.0), config=consumer)
        async def on_grant_ended(body: dict) -> None:
            if not ended_seen.done():
                ended_seen.set_result(body["event_id"])

        @sandbox.subscriber(s.SANDBOX_CREATED, stream=SANDBOX, durable=s.SANDBOX_CREATED_DURABLE,
                            pull_sub=PullSub(batch_size=1, timeout=1.0), config=consumer)
        async def on_created(body: dict) -> None:
            if not created_seen.done():
                created_seen.set_result(body["event_id"])

        try:
            for user in ("auth", "vault", "sandbox"):
                await connect(user)
                await provision(brokers[user], settings_for(user))
            await vault.start()
            await sandbox.start()
            await connect("platform")

            issued = TokensIssued(user_id="u-1", sealed=Sealed(key_id="k", ciphertext="c"), expires_at=1)
            await publish_event(brokers["auth"], s.TOKENS_ISSUED, issued)
            created = SandboxCreated(user_id="u-1", sandbox_id="sbx-1")
            await publish_event(brokers["platform"], s.SANDBOX_CREATED, created)
            assert await asyncio.wait_for(issued_seen, 20) == issued.event_id
            assert await asyncio.wait_for(created_seen, 20) == created.event_id

            reply = await sandbox.request({"request_id": "req-12345678"}, s.VAULT_CREDENTIALS_GET, timeout=5)
            assert json.loads(reply.body) == {"request_id": "req-12345678", "ok": True}

            revoked = GrantRevoked(user_id="u-1", sandbox_id="sbx-1")
            await publish_event(brokers["auth"], s.GRANTS_REVOKED, revoked)
            ended = GrantEnded(user_id="u-1", sandbox_id="sbx-1", reason="grant_ended", ended_at=1)
            await publish_event(vault, s.GRANTS_ENDED, ended)
            assert await asyncio.wait_for(revoked_seen, 20) == revoked.event_id
            assert await asyncio.wait_for(ended_seen, 20) == ended.event_id
            listed = await brokers["auth"].request({"user_id": "u-1"}, s.VAULT_GRANTS_LIST, timeout=5)
            assert json.loads(listed.body) == {"grants": []}
            for user, broker in brokers.items():
                assert broker.connection.new_inbox().startswith(f"{inbox_prefix(user)}."), user

            await dead_letter(vault, s.TOKENS_ISSUED, b"not json", "invalid_event", message_id=issued.event_id)
            await dead_letter(sandbox, s.SANDBOX_CREATED, b"not json", "invalid_event", message_id=created.event_id)
            info = await brokers["auth"].connection.jetstream().stream_info(DLQ.name)
            assert info.state.messages == 2
        finally:
            for broker in brokers.values():
                await broker.stop()
        assert [e for e in errors if "permissions violation" in e] == []
