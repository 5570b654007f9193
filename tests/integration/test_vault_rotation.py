"""Key rotation online: two vault replicas (this process and a `python -m services.vault`
child) answer 1,000 credential requests while `rotate_keys` adds a KEK, re-wraps every record
and retires the old KEK — zero failures. Then: a record still under the retired KEK fails
loudly (typed reply, audit entry), and the `ccbridge keys` commands."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import nats
from sqlalchemy import select, update
from typer.testing import CliRunner

from ccbridge.embedded_nats import free_port
from services.vault import tools
from services.vault.adapters.models import SealedSecretRow
from services.vault.app import VaultService
from services.vault.keyring import FileKekSource
from shared import subjects
from shared.events import CredentialsReply
from shared.sealing import KeyPair
from tests.vault_fixtures import (
    VaultDb,
    VaultProcess,
    canary,
    credentials_request,
    eventually,
    issued_event,
    leaked,
    new_user,
    open_reply,
    service_env,
    vault_settings,
)

USERS = 120
REQUESTS = 1000
CONCURRENCY = 16


async def test_rotation_under_load_has_zero_failures(tmp_path: Path, nats_url: str, db: VaultDb, nc: nats.NATS) -> None:
    requester = KeyPair.generate()
    trusted = {"VAULT_TRUSTED_REQUESTER_KEYS": requester.recipient.public_b64}
    settings = vault_settings(tmp_path, nats_url, db, **trusted)
    async with VaultService(settings) as local:
        tokens: dict[str, str] = {}
        for _ in range(USERS):
            user, token = new_user(), canary("rot")
            await local.vault.store_issued_tokens(
                issued_event(local.keypair.recipient, user_id=user, access_token=token, refresh_token=canary("r")))
            tokens[user] = token
        first_kek = local.keyring.active_kek_id
        port = free_port()
        child = VaultProcess("vault-child", service_env(tmp_path, nats_url, db, VAULT_METRICS_PORT=str(port),
                                                        **trusted), tmp_path / "vault-child.log").start()
        try:
            await child.wait_started()
            users = list(tokens)
            failures: list[str] = []
            done = 0
            after_rotation = 0
            rotation: dict[str, Any] = {}
            rng = random.Random(5)

            async def ask() -> None:
                nonlocal done, after_rotation
                user = rng.choice(users)
                mode = rng.choice(["file", "access_only", "env"])
                request = credentials_request(requester, user_id=user, mode=mode)
                try:
                    msg = await nc.request(subjects.VAULT_CREDENTIALS_GET, request.model_dump_json().encode(),
                                           timeout=10)
                    reply = CredentialsReply.model_validate_json(msg.data)
                    if not reply.ok:
                        failures.append(f"{user}: {reply.error}")
                    elif open_reply(reply, requester, user_id=user).access_token != tokens[user]:
                        failures.append(f"{user}: wrong token")
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(f"{user}: {type(exc).__name__}")
                done += 1
                if "report" in rotation:
                    after_rotation += 1

            async def load() -> None:
                while done < REQUESTS or after_rotation < 200:
                    await asyncio.gather(*(ask() for _ in range(CONCURRENCY)))

            async def rotate() -> None:
                await eventually(lambda: _async(done >= 100), "the load to be flowing")
                rotation["started_at"] = done
                rotation["report"] = await tools.rotate_keys(settings, retire_previous=True, actor="test")
                rotation["finished_at"] = done

            await asyncio.gather(load(), rotate())

            assert failures == [], failures[:10]
            assert done >= REQUESTS
            report = rotation["report"]
            assert 0 < rotation["started_at"] < rotation["finished_at"]  # the rotation ran while requests flowed
            assert report.previous_kek_id == first_kek and report.new_kek_id != first_kek
            assert report.rewrap is not None and report.rewrap.ok and report.rewrap.moved == USERS
            assert report.rewrap.by_kek == {report.new_kek_id: USERS}
            assert report.retired == [first_kek]
            ring = FileKekSource(settings.kek_path, create=False).load()
            assert ring.active_kek_id == report.new_kek_id and first_kek in ring.retired
            assert local.keyring.active_kek_id == report.new_kek_id  # the running replicas followed
            assert local.metrics.value("ccbridge_vault_credential_requests_total", outcome="ok") > 0
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            served = [line for line in metrics.splitlines()
                      if line.startswith('ccbridge_vault_credential_requests_total{outcome="ok"}')]
            assert served and float(served[0].split()[-1]) > 0  # both replicas answered
            assert "key-encryption keys reloaded" in child.log_text()
        finally:
            assert await child.astop() == 0, child.log_text()[-2000:]
        assert not leaked(child.log_path.read_bytes())


async def _async(value: Any) -> Any:
    return value


async def test_a_record_under_a_retired_key_fails_loudly(tmp_path: Path, nats_url: str, db: VaultDb,
                                                        nc: nats.NATS) -> None:
    requester = KeyPair.generate()
    settings = vault_settings(tmp_path, nats_url, db, VAULT_TRUSTED_REQUESTER_KEYS=requester.recipient.public_b64)
    async with VaultService(settings) as service:
        user = new_user()
        await service.vault.store_issued_tokens(
            issued_event(service.keypair.recipient, user_id=user, access_token=canary()))
        engine = service.store.engine
        async with engine.connect() as conn:  # a backup of the row, taken before the rotation
            backup = (await conn.execute(select(SealedSecretRow.__table__).where(
                SealedSecretRow.user_id == user))).one()
        report = await tools.rotate_keys(settings, retire_previous=True, settle_s=0.5, actor="test")
        assert report.retired == [backup.kek_id]
        async with engine.begin() as conn:  # ... restored later: it is under the retired key
            await conn.execute(update(SealedSecretRow.__table__).where(SealedSecretRow.user_id == user).values(
                kek_id=backup.kek_id, wrapped_data_key=backup.wrapped_data_key))

        request = credentials_request(requester, user_id=user)
        msg = await nc.request(subjects.VAULT_CREDENTIALS_GET, request.model_dump_json().encode(), timeout=10)
        reply = CredentialsReply.model_validate_json(msg.data)

        assert (reply.ok, reply.error, reply.sealed) == (False, "internal", None)
        async with service.unit_of_work() as uow:
            audit = await uow.audit.list(user_id=user, action="credentials_decrypt_failed")
        assert [(r.entry.reason, r.entry.kek_id) for r in audit] == [("retired_key_id", backup.kek_id)]
        assert service.metrics.value("ccbridge_vault_decrypt_failures_total", reason="retired_key_id") >= 1
        # the operator sees it too: `keys list` reports records under a key it no longer has
        status = await tools.key_status(settings)
        assert status["unknown"] == [backup.kek_id] and status["records"][backup.kek_id] == 1


def test_ccbridge_keys_commands(tmp_path: Path, monkeypatch) -> None:
    from ccbridge.cli import app

    data = tmp_path / "data"
    monkeypatch.setenv("CCBRIDGE_DATA_DIR", str(data))
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'vault.db'}")
    monkeypatch.setenv("VAULT_KEK_CHECK_INTERVAL_S", "0.1")
    monkeypatch.delenv("VAULT_KEKS", raising=False)
    runner = CliRunner()
    assert runner.invoke(app, ["vault", "migrate"]).exit_code == 0
    missing = runner.invoke(app, ["keys", "list"])  # operator verbs never create a key file
    assert missing.exit_code == 2 and "ccbridge keys init" in missing.output
    assert not (data / "keys" / "vault-kek.json").exists()
    assert runner.invoke(app, ["keys", "init"]).exit_code == 0

    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    before = json.loads(listed.stdout)
    assert before["keys"] == [before["active"]] and before["records"] == {}

    rotated = runner.invoke(app, ["keys", "rotate", "--json"])
    assert rotated.exit_code == 0, rotated.output
    summary = json.loads(rotated.stdout)
    assert summary["previous_kek_id"] == before["active"] and summary["failures"] == {}

    retired = runner.invoke(app, ["keys", "retire", before["active"]])
    assert retired.exit_code == 0, retired.output
    after = json.loads(runner.invoke(app, ["keys", "list"]).stdout)
    assert after["active"] == summary["new_kek_id"] and before["active"] in after["retired"]
    key_file = (data / "keys" / "vault-kek.json").read_text()
    for output in (listed.output, rotated.output, retired.output):
        assert not any(secret in output for secret in json.loads(key_file)["keys"].values())

    refused = runner.invoke(app, ["keys", "retire", after["active"]])  # the active key
    assert refused.exit_code == 2 and "invalid_keyring" in refused.output

    monkeypatch.setenv("VAULT_KEKS", key_file)  # keys from the environment cannot be rotated here
    readonly = runner.invoke(app, ["keys", "rotate"])
    assert readonly.exit_code == 2 and "key_source_read_only" in readonly.output
