"""The vault service end to end on a real nats-server (JetStream) and a real SQLite file /
PostgreSQL: sealed tokens in, encrypted rows, duplicates, dead letters, redelivery while the
database is down, and the credentials request/reply."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.js.api import DeliverPolicy
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from services.vault.adapters.models import ConnectionRow, ProcessedEventRow
from services.vault.adapters.store import SqlStore
from services.vault.app import VaultService
from services.vault.errors import StoreUnavailable
from services.vault.keyring import Keyring
from services.vault.settings import VaultSettings
from shared import subjects
from shared.broker import REASON_HEADER, dead_letter_msg_id, make_broker, publish_event
from shared.events import ConnectionStatusReply, ConnectionStatusRequest, CredentialsReply, Sealed
from shared.sealing import KeyPair, b64d, b64e
from tests import grants
from tests.vault_fixtures import (
    VaultDb,
    canary,
    credentials_request,
    eventually,
    issued_event,
    new_user,
    open_reply,
    vault_settings,
)

T = TypeVar("T")

@dataclass
class Running:
    service: VaultService
    settings: VaultSettings
    db: VaultDb
    requester: KeyPair  # trusted via VAULT_TRUSTED_REQUESTER_KEYS
    file_requester: KeyPair  # trusted via <keys_dir>/sandbox-test.hpke.pub
    nc: nats.NATS
    js: Any = field(init=False)

    def __post_init__(self) -> None:
        self.js = self.nc.jetstream()

    @property
    def vault_key(self) -> KeyPair:
        return self.service.keypair

    async def publish(self, event: Any) -> None:
        broker = make_broker(self.settings, name="test-publisher")
        async with broker:
            await broker.connect()
            await publish_event(broker, subjects.TOKENS_ISSUED, event)

    async def publish_raw(self, body: bytes, msg_id: str | None = None) -> None:
        headers = {subjects.MSG_ID_HEADER: msg_id} if msg_id else None
        await self.js.publish(subjects.TOKENS_ISSUED, body, headers=headers)

    async def row(self, user_id: str) -> Any:
        async with self.service.store.engine.connect() as conn:
            result = await conn.execute(select(ConnectionRow.__table__).where(ConnectionRow.user_id == user_id))
            return result.one_or_none()

    async def wait_row(self, user_id: str, version: int = 1) -> Any:
        async def probe() -> Any:
            row = await self.row(user_id)
            return row if row is not None and row.version >= version else None

        return await eventually(probe, f"connection of {user_id} at version {version}")

    async def drained(self) -> None:
        """Every tokens.issued message so far was delivered to the vault and acked."""

        async def probe() -> bool:
            info = await self.js.consumer_info(subjects.TOKENS_STREAM.name, subjects.VAULT_TOKENS_ISSUED_DURABLE)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(probe, "the vault consumer to drain")

    async def ask(self, payload: Any) -> CredentialsReply:
        data = payload if isinstance(payload, bytes) else payload.model_dump_json().encode()
        reply = await self.nc.request(subjects.VAULT_CREDENTIALS_GET, data, timeout=10)
        return CredentialsReply.model_validate_json(reply.data)


def _settings(tmp_path: Path, nats_url: str, db: VaultDb, **env: Any) -> VaultSettings:
    return vault_settings(tmp_path, nats_url, db, **env)


@pytest.fixture
async def running(tmp_path: Path, nats_url: str, db: VaultDb, nc: nats.NATS) -> AsyncIterator[Running]:
    requester, file_requester = KeyPair.generate(), KeyPair.generate()
    keys_dir = tmp_path / "data" / "keys"
    keys_dir.mkdir(parents=True)
    (keys_dir / "sandbox-test.hpke.pub").write_text(file_requester.recipient.public_b64 + "\n")
    settings = _settings(tmp_path, nats_url, db, VAULT_TRUSTED_REQUESTER_KEYS=requester.recipient.public_b64)
    async with VaultService(settings) as service:
        yield Running(service, settings, db, requester, file_requester, nc)


async def _dlq_reader(js: Any) -> Any:
    """An ephemeral consumer on the dead letters of tokens.issued, from now on."""
    return await js.subscribe(
        subjects.dead_letter_subject(subjects.TOKENS_ISSUED),
        stream=subjects.DLQ_STREAM.name,
        deliver_policy=DeliverPolicy.NEW,
    )


async def _collect(sub: Any, want: Callable[[list[Any]], bool]) -> list[Any]:
    got: list[Any] = []

    async def probe() -> bool:
        try:
            got.append(await sub.next_msg(timeout=0.2))
        except (TimeoutError, nats.errors.TimeoutError):
            pass
        return want(got)

    await eventually(probe, "dead letters")
    return got


# --- tests -------------------------------------------------------------------------
async def test_service_files_and_key_material(running: Running) -> None:
    keys_dir = running.settings.keys_dir
    assert (keys_dir / "vault.hpke.key").stat().st_mode & 0o777 == 0o600
    assert (keys_dir / "vault.hpke.pub").read_text().strip() == running.vault_key.recipient.public_b64
    assert (keys_dir / "vault-kek.json").stat().st_mode & 0o777 == 0o600
    info = await running.js.consumer_info(subjects.TOKENS_STREAM.name, subjects.VAULT_TOKENS_ISSUED_DURABLE)
    assert str(getattr(info.config.ack_policy, "value", info.config.ack_policy)) == "explicit"
    assert info.config.filter_subject == subjects.TOKENS_ISSUED


async def test_issued_tokens_stored_encrypted(running: Running) -> None:
    user, access, refresh = new_user(), canary("access"), canary("refresh")
    event = issued_event(running.vault_key.recipient, user_id=user, access_token=access, refresh_token=refresh)
    await running.publish(event)

    row = await running.wait_row(user)
    assert (row.version, row.state, row.kind, row.expires_at) == (1, "connected", "oauth", event.expires_at)
    # positive control: the vault can give the tokens back ...
    bundle = open_reply(await running.ask(credentials_request(running.requester, user_id=user)), running.requester,
                        user_id=user)
    assert (bundle.access_token, bundle.refresh_token) == (access, refresh)

    # ... yet they are nowhere in the database in the clear
    if running.db.is_sqlite:
        path = Path(make_url(running.db.url).database or "")
        raw = b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
        assert user.encode() in raw
        for secret in (access, refresh):
            assert secret.encode() not in raw and secret.encode().hex().encode() not in raw
    else:
        async with running.service.store.engine.connect() as conn:
            schema = running.db.schema
            lines: list[str] = []
            for table in ("connections", "processed_events"):
                result = await conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t'))
                lines += [r[0] for r in result]
            rendered = "\n".join(lines)
        assert user in rendered and event.event_id in rendered
        for secret in (access, refresh):
            assert secret not in rendered and secret.encode().hex() not in rendered


async def test_duplicates_have_one_effect_and_new_events_bump_the_version(running: Running) -> None:
    user, first_token, second_token = new_user(), canary("one"), canary("two")
    event = issued_event(running.vault_key.recipient, user_id=user, access_token=first_token)
    await running.publish(event)
    await running.publish(event)  # same Nats-Msg-Id: JetStream drops it
    body = event.model_dump_json().encode()
    await running.publish_raw(body, msg_id=f"other-{uuid.uuid4().hex}")  # slips past the window
    await running.publish_raw(body)  # no msg id at all
    await running.wait_row(user)
    await running.drained()

    row = await running.row(user)
    assert row.version == 1
    async with running.service.store.engine.connect() as conn:
        marks = (await conn.execute(select(ProcessedEventRow.__table__).where(
            ProcessedEventRow.event_id == event.event_id))).all()
    assert len(marks) == 1 and marks[0].subject == subjects.TOKENS_ISSUED

    await running.publish(issued_event(running.vault_key.recipient, user_id=user, access_token=second_token))
    row = await running.wait_row(user, version=2)
    assert row.version == 2
    bundle = open_reply(await running.ask(credentials_request(running.requester, user_id=user)), running.requester,
                        user_id=user)
    assert bundle.access_token == second_token


async def test_poison_is_dead_lettered_and_the_consumer_keeps_going(running: Running) -> None:
    dlq = await _dlq_reader(running.js)
    try:
        user = new_user()
        tampered = issued_event(running.vault_key.recipient, user_id=user, access_token=canary())
        raw = bytearray(b64d(tampered.sealed.ciphertext))
        raw[-1] ^= 1
        broken_box = Sealed(key_id=tampered.sealed.key_id, ciphertext=b64e(bytes(raw)))
        tampered = tampered.model_copy(update={"sealed": broken_box})
        garbage_marker = uuid.uuid4().hex
        garbage = f'{{"garbage": "{garbage_marker}"'.encode()  # not even JSON
        good_user = new_user()
        good = issued_event(running.vault_key.recipient, user_id=good_user, access_token=canary())

        await running.publish(tampered)
        await running.publish_raw(garbage, msg_id=f"garbage-{garbage_marker}")
        await running.publish(good)

        await running.wait_row(good_user)  # processed after (or around) the poison
        assert await running.row(user) is None

        def letter_of(msg: Any, message_id: str) -> bool:
            # dlq-<subject>-<message id>-<stream sequence of the failed copy> (shared.broker.dead_letter_msg_id)
            head, _, copy = msg.headers.get(subjects.MSG_ID_HEADER, "").rpartition("-")
            return head == dead_letter_msg_id(subjects.TOKENS_ISSUED, message_id) and copy.isdigit()

        def ours(msgs: list[Any]) -> list[Any]:
            return [m for m in msgs if m.data == garbage or letter_of(m, tampered.event_id)]

        letters = ours(await _collect(dlq, lambda got: len(ours(got)) == 2))
        (tampered_letter,) = [m for m in letters if letter_of(m, tampered.event_id)]
        (garbage_letter,) = [m for m in letters if letter_of(m, f"garbage-{garbage_marker}")]
        assert tampered_letter.headers[REASON_HEADER].startswith("unopenable_box")
        assert garbage_letter.headers[REASON_HEADER].startswith("invalid_event")
        assert json.loads(tampered_letter.data)["event_id"] == tampered.event_id  # kept unchanged for replay
        await running.drained()  # nothing left unacked behind
    finally:
        await dlq.unsubscribe()


async def test_credentials_request_reply(running: Running) -> None:
    user, access, refresh = new_user(), canary("a"), canary("r")
    await running.publish(issued_event(running.vault_key.recipient, user_id=user, access_token=access,
                                       refresh_token=refresh))
    await running.wait_row(user)

    for requester in (running.requester, running.file_requester):
        for mode, expected_refresh in (("file", refresh), ("access_only", None), ("env", None)):
            request = credentials_request(requester, user_id=user, mode=mode)
            reply = await running.ask(request)
            assert reply.ok and reply.request_id == request.request_id
            assert reply.scopes == ["user:inference", "user:profile"]
            bundle = open_reply(reply, requester, user_id=user)
            assert (bundle.access_token, bundle.refresh_token) == (access, expected_refresh)

    untrusted = await running.ask(credentials_request(KeyPair.generate(), user_id=user))
    assert (untrusted.ok, untrusted.error, untrusted.sealed) == (False, "unauthorized_requester", None)
    unknown = await running.ask(credentials_request(running.requester, user_id=new_user()))
    assert (unknown.ok, unknown.error) == (False, "not_connected")
    for junk in (b"{}", b"\xff\xfe not json"):
        invalid = await running.ask(junk)
        assert (invalid.ok, invalid.error) == (False, "invalid_request")


@dataclass
class FlakyStore:
    """A real store whose first `failures` units of work fail as if the database were down."""

    inner: SqlStore
    failures: int
    attempts: int = 0

    @property
    def engine(self) -> Any:
        return self.inner.engine

    async def migrate(self) -> None:
        await self.inner.migrate()

    async def ping(self) -> bool:
        return await self.inner.ping()

    def unit_of_work(self, keyring: Keyring) -> Any:
        self.attempts += 1
        if self.attempts <= self.failures:
            return _DownUnitOfWork()
        return self.inner.unit_of_work(keyring)

    async def dispose(self) -> None:
        await self.inner.dispose()


class _DownUnitOfWork:
    async def __aenter__(self) -> Any:
        raise StoreUnavailable("simulated outage")

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_database_outage_is_retried_not_dead_lettered(
    tmp_path: Path, nats_url: str, db: VaultDb, nc: nats.NATS
) -> None:
    store = FlakyStore(SqlStore.from_url(db.url, schema=db.schema), failures=2)
    settings = _settings(tmp_path, nats_url, db)
    dlq = await _dlq_reader(nc.jetstream())
    try:
        async with VaultService(settings, store=store) as service:
            running = Running(service, settings, db, KeyPair.generate(), KeyPair.generate(), nc)
            user = new_user()
            event = issued_event(service.keypair.recipient, user_id=user, access_token=canary())
            await running.publish(event)
            row = await running.wait_row(user)
            assert row.version == 1
            assert store.attempts >= 3  # two failed deliveries (nacked with delay), then stored
            letters = await _collect(dlq, lambda got: True)  # whatever arrived by now
            dead_id = dead_letter_msg_id(subjects.TOKENS_ISSUED, event.event_id)
            assert not [m for m in letters if m.headers.get(subjects.MSG_ID_HEADER, "").startswith(dead_id)]
    finally:
        await dlq.unsubscribe()
        await store.dispose()


async def test_events_published_while_the_vault_is_down_are_processed_after_restart(
    tmp_path: Path, nats_url: str, db: VaultDb
) -> None:
    keks = Keyring.generate().export_json()
    settings = _settings(tmp_path, nats_url, db, VAULT_KEKS=keks)
    async with VaultService(settings) as first:
        vault_public = first.keypair.recipient
    user = new_user()
    publisher = make_broker(settings, name="test-publisher")
    async with publisher:
        await publisher.connect()
        await publish_event(publisher, subjects.TOKENS_ISSUED, issued_event(vault_public, user_id=user,
                                                                            access_token=canary()))
    async with VaultService(settings) as second:
        assert second.keypair.key_id == vault_public.key_id  # same key file, loaded again
        store = second.store

        async def probe() -> Any:
            async with store.unit_of_work(Keyring.from_json(keks)) as uow:
                return await uow.connections.get(user)

        connection = await eventually(probe, "the event sent while the vault was down")
        assert connection.version == 1


async def test_env_private_key_is_used_and_published(tmp_path: Path, nats_url: str, db: VaultDb) -> None:
    pair = KeyPair.generate()
    settings = _settings(tmp_path, nats_url, db, VAULT_HPKE_PRIVATE_KEY=pair.private_b64())
    async with VaultService(settings) as service:
        assert service.keypair.key_id == pair.key_id
        assert not (settings.keys_dir / "vault.hpke.key").exists()
        assert (settings.keys_dir / "vault.hpke.pub").read_text().strip() == pair.recipient.public_b64
        assert pair.private_b64() not in repr(service) + repr(settings)


async def test_python_m_services_vault_runs_and_stops_on_sigterm(tmp_path: Path, nats_url: str) -> None:
    """The composition-root contract: `python -m services.vault` serves until SIGTERM, exits 0."""
    import os
    import signal
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    requester = KeyPair.generate()
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "CCBRIDGE_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'db' / 'vault.db'}",
        "VAULT_TRUSTED_REQUESTER_KEYS": requester.recipient.public_b64,
        **grants.env(),
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "vault.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.vault"], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await eventually(lambda: _async(b"vault started" in log_path.read_bytes() or proc.poll() is not None),
                         "the vault process to start")
        assert proc.poll() is None, log_path.read_text()
        assert (tmp_path / "db" / "vault.db").exists()
        key = Path(tmp_path / "data" / "keys" / "vault.hpke.pub").read_text().strip()
        user = new_user()
        async with make_broker(VaultSettings(NATS_URL=nats_url), name="test-publisher") as publisher:
            await publisher.connect()
            from shared.sealing import Recipient

            await publish_event(publisher, subjects.TOKENS_ISSUED,
                                issued_event(Recipient.from_b64(key), user_id=user, access_token=canary()))
        client = await nats.connect(nats_url)
        try:
            async def granted() -> CredentialsReply | None:
                msg = await client.request(subjects.VAULT_CREDENTIALS_GET,
                                           credentials_request(requester, user_id=user).model_dump_json().encode(),
                                           timeout=5)
                reply = CredentialsReply.model_validate_json(msg.data)
                return reply if reply.ok else None

            reply = await eventually(granted, "the vault process to store and grant")
            assert open_reply(reply, requester, user_id=user).refresh_token is None
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log_path.read_text()
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert any(line.get("event") == "vault stopped" for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _async(value: T) -> T:
    return value


# --- revoke, status, trust reload ---------------------------------------------------------
async def test_tokens_revoked_crypto_shreds_the_connection(running: Running) -> None:
    from shared.events import ConnectionStatusReply, ConnectionStatusRequest, TokensRevoked

    user = new_user()
    await running.publish(issued_event(running.vault_key.recipient, user_id=user, access_token=canary(),
                                       refresh_token=canary("r")))
    await running.wait_row(user)
    status = ConnectionStatusReply.model_validate_json((await running.nc.request(
        subjects.VAULT_CONNECTIONS_STATUS, ConnectionStatusRequest(user_id=user).model_dump_json().encode(),
        timeout=10)).data)
    assert (status.connected, status.state, status.version) == (True, "connected", 1)

    event = TokensRevoked(user_id=user, reason="user_request")
    async with make_broker(running.settings, name="test-publisher") as publisher:
        await publisher.connect()
        await publish_event(publisher, subjects.TOKENS_REVOKED, event)

    async def gone() -> bool:
        return await running.row(user) is None

    await eventually(gone, "the connection to be shredded")
    reply = await running.ask(credentials_request(running.requester, user_id=user))
    assert (reply.ok, reply.error) == (False, "not_connected")
    status = ConnectionStatusReply.model_validate_json((await running.nc.request(
        subjects.VAULT_CONNECTIONS_STATUS, ConnectionStatusRequest(user_id=user).model_dump_json().encode(),
        timeout=10)).data)
    assert status == ConnectionStatusReply(connected=False)
    async with running.service.unit_of_work() as uow:
        audit = await uow.audit.list(user_id=user, action="revoked")
    assert [(r.entry.event_id, r.entry.outcome) for r in audit] == [(event.event_id, "revoked")]
    info = await running.js.consumer_info(subjects.TOKENS_STREAM.name, subjects.VAULT_TOKENS_REVOKED_DURABLE)
    assert info.config.filter_subject == subjects.TOKENS_REVOKED


async def test_a_sandbox_key_added_after_start_is_trusted_without_restart(running: Running) -> None:
    user = new_user()
    await running.publish(issued_event(running.vault_key.recipient, user_id=user, access_token=canary()))
    await running.wait_row(user)
    late = KeyPair.generate()
    refused = await running.ask(credentials_request(late, user_id=user))
    assert refused.error == "unauthorized_requester"

    (running.settings.keys_dir / "sandbox-late.hpke.pub").write_text(late.recipient.public_b64 + "\n")

    async def trusted() -> CredentialsReply | None:
        reply = await running.ask(credentials_request(late, user_id=user))
        return reply if reply.ok else None

    reply = await eventually(trusted, "the new sandbox key to be trusted")  # re-read at most once a second
    assert open_reply(reply, late, user_id=user).access_token


def test_ccbridge_vault_revoke_waits_for_the_vault(tmp_path: Path, nats_url: str, monkeypatch) -> None:
    from typer.testing import CliRunner

    from ccbridge.cli import app
    from tests.vault_fixtures import VaultProcess, service_env

    db = VaultDb(f"sqlite+aiosqlite:///{tmp_path / 'cli-vault.db'}", None)
    vault = VaultProcess("vault-cli", service_env(tmp_path, nats_url, db), tmp_path / "vault-cli.log").start()
    user = new_user()
    try:
        asyncio.run(vault.wait_started())
        settings = vault_settings(tmp_path, nats_url, db)

        async def connect() -> None:
            from shared.sealing import Recipient

            key = Recipient.from_b64((settings.keys_dir / "vault.hpke.pub").read_text())
            async with make_broker(settings, name="test-publisher") as publisher:
                await publisher.connect()
                await publish_event(publisher, subjects.TOKENS_ISSUED, issued_event(key, user_id=user,
                                                                                  access_token=canary()))
                # stored before the revoke is sent (two consumers: their order is not the bus's)
                status = ConnectionStatusRequest(user_id=user).model_dump_json().encode()

                async def connected() -> bool | None:
                    reply = await publisher.connection.request(subjects.VAULT_CONNECTIONS_STATUS, status, timeout=2)
                    return ConnectionStatusReply.model_validate_json(reply.data).connected or None

                await eventually(connected, "the login to be stored")

        asyncio.run(connect())
        for name, value in (("NATS_URL", nats_url), ("DATABASE_URL", db.url),
                            ("CCBRIDGE_DATA_DIR", str(tmp_path / "data"))):
            monkeypatch.setenv(name, value)
        result = CliRunner().invoke(app, ["vault", "revoke", "--user", user, "--reason", "offboarding",
                                          "--wait", "30"])
    finally:
        vault.stop()
    assert result.exit_code == 0, result.output
    assert "shredded" in result.output

    async def leftovers() -> tuple[Any, list[Any]]:
        store = SqlStore.from_url(db.url)
        try:
            async with store.unit_of_work(Keyring.generate()) as uow:
                return await uow.connections.summary(user), await uow.audit.list(user_id=user, action="revoked")
        finally:
            await store.dispose()

    summary, audit = asyncio.run(leftovers())
    assert summary is None  # whichever event the vault saw first, the tokens are not there
    assert [r.entry.reason for r in audit] == ["offboarding"]
