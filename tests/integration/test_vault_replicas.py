"""Three vault PROCESSES (`python -m services.vault`) on one database (SQLite file, and
PostgreSQL when reachable) and one NATS, racing to refresh the same connections against the
OAuth stand-in — which, like the real server, kills a refresh token the moment it is used.

Exactly one refresh request per rotation: every refresh request the server saw succeeded (a
second refresh of the same token would be `invalid_grant`), one `tokens.refreshed` per
rotation, and what each connection holds at the end is the live token."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js.api import DeliverPolicy

from ccbridge.embedded_nats import free_port
from services.vault.adapters.store import SqlStore
from services.vault.keyring import FileKekSource
from shared import subjects
from shared.broker import make_broker, publish_event
from shared.sealing import Recipient
from standins.oauth import OAuthStandin
from tests.vault_fixtures import (
    VaultDb,
    VaultProcess,
    canary_factory,
    eventually,
    issued_from_login,
    leaked,
    new_user,
    service_env,
    standin_login,
    vault_settings,
)

REPLICAS = 3
USERS = 6
ROTATIONS = 3  # per user, at least


async def _metrics(port: int) -> tuple[float, str]:
    async with httpx.AsyncClient(timeout=5) as http:
        health = await http.get(f"http://127.0.0.1:{port}/healthz")
        ready = await http.get(f"http://127.0.0.1:{port}/readyz")
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    assert health.status_code == 200 and ready.status_code == 200, ready.text
    ok = 0.0
    for line in text.splitlines():
        if line.startswith('ccbridge_vault_refreshes_total{outcome="ok"}'):
            ok = float(line.split()[-1])
    return ok, text


async def test_three_vault_processes_refresh_each_rotation_exactly_once(
    tmp_path: Path, nats_url: str, db: VaultDb, nc: nats.NATS
) -> None:
    async with OAuthStandin(port=0, access_token_lifetime=3, access_token_factory=canary_factory("at"),
                            refresh_token_factory=canary_factory("rt")) as oauth:
        ports = [free_port() for _ in range(REPLICAS)]
        replicas = [
            VaultProcess(
                f"vault-{i}",
                service_env(
                    tmp_path, nats_url, db,
                    OAUTH_TOKEN_URL=oauth.token_url,
                    VAULT_REFRESH_ENABLED="true",
                    VAULT_REFRESH_INTERVAL_S="0.1",
                    VAULT_REFRESH_MARGIN_S="2",
                    VAULT_REFRESH_TIMEOUT_S="5",
                    VAULT_REFRESH_LEASE_S="15",
                    VAULT_METRICS_PORT=str(ports[i]),
                    VAULT_INSTANCE_ID=f"replica-{i}",
                ),
                tmp_path / f"vault-{i}.log",
            )
            for i in range(REPLICAS)
        ]
        for replica in replicas:  # all at once: they also race on keys and migrations
            replica.start()
        try:
            await asyncio.gather(*(r.wait_started() for r in replicas))
        except BaseException:
            await asyncio.gather(*(replica.astop() for replica in replicas))
            raise
        refreshed = await nc.jetstream().subscribe(subjects.TOKENS_REFRESHED, stream=subjects.TOKENS_STREAM.name,
                                                   deliver_policy=DeliverPolicy.NEW)
        reconnects = await nc.jetstream().subscribe(subjects.TOKENS_RECONNECT_REQUIRED,
                                                    stream=subjects.TOKENS_STREAM.name,
                                                    deliver_policy=DeliverPolicy.NEW)
        try:
            vault_key = Recipient.from_b64((tmp_path / "data" / "keys" / "vault.hpke.pub").read_text())

            users = [new_user() for _ in range(USERS)]
            grants = await asyncio.gather(*(standin_login(oauth) for _ in users))
            settings = vault_settings(tmp_path, nats_url, db)
            async with make_broker(settings, name="test-publisher") as publisher:
                await publisher.connect()
                for user, grant in zip(users, grants, strict=True):
                    await publish_event(publisher, subjects.TOKENS_ISSUED, issued_from_login(vault_key, user, grant))

            events: dict[str, dict[str, Any]] = {}  # event_id -> body

            async def drain(timeout: float = 0.2) -> None:
                try:
                    while True:
                        msg = await refreshed.next_msg(timeout=timeout)
                        body = json.loads(msg.data)
                        if body["user_id"] in users:
                            events[body["event_id"]] = body
                except (TimeoutError, nats.errors.TimeoutError):
                    pass

            async def rotated_enough() -> bool:
                await drain()
                per_user = Counter(body["user_id"] for body in events.values())
                return all(per_user[user] >= ROTATIONS for user in users)

            await eventually(rotated_enough, f"{ROTATIONS} rotations per user", timeout=90)
            scraped = [await _metrics(port) for port in ports]
            assert sum(ok for ok, _ in scraped) <= oauth.state.stats["token:refresh_token:ok"]
            assert all("ccbridge_vault_credential_requests_total" in text for _, text in scraped)
        finally:
            # SIGTERM: a refresh in flight completes (the stand-in keeps answering meanwhile)
            codes = list(await asyncio.gather(*(replica.astop() for replica in replicas)))
        try:
            await drain(timeout=1.0)  # whatever was published before the replicas stopped
        finally:
            await refreshed.unsubscribe()
        assert codes == [0] * REPLICAS, [r.log_text()[-2000:] for r in replicas]

        stats = oauth.state.stats
        # 1. exactly one refresh request per rotation: none was refused, each made one event
        assert stats["token:refresh_token"] == stats["token:refresh_token:ok"] == len(events) > 0
        assert stats["token:injected_failure"] == 0
        with_reconnect = []
        try:
            while True:
                msg = await reconnects.next_msg(timeout=0.3)
                if json.loads(msg.data)["user_id"] in users:
                    with_reconnect.append(msg)
        except (TimeoutError, nats.errors.TimeoutError):
            pass
        finally:
            await reconnects.unsubscribe()
        assert not with_reconnect

        # 2. what the database says: version = 1 + refreshes, the live token held, each rotation audited once
        keyring = FileKekSource(tmp_path / "data" / "keys" / "vault-kek.json", create=False).load()
        store = SqlStore.from_url(db.url, schema=db.schema)
        try:
            async with store.unit_of_work(keyring) as uow:
                connections = {user: await uow.connections.get(user) for user in users}
                audit = [r for user in users for r in await uow.audit.list(user_id=user, action="refreshed",
                                                                            limit=1000)]
        finally:
            await store.dispose()
        assert len(audit) == stats["token:refresh_token:ok"]  # every refresh the server answered was saved
        actors = Counter(record.entry.actor.split(":", 1)[1] for record in audit)
        assert len(actors) >= 2, actors  # the replicas really did compete
        for user in users:
            connection = connections[user]
            assert connection is not None and connection.state == "connected"
            assert connection.credentials.refresh_token in oauth.state.refresh_tokens  # live, not rotated away
            versions = sorted(b["version"] for b in events.values() if b["user_id"] == user)
            assert versions == list(range(2, connection.version + 1))  # one per rotation: no gap, no repeat

        # 3. no token in any replica's log, nor in the SQLite file
        for replica in replicas:
            assert not leaked(replica.log_path.read_bytes()), replica.name
        if db.is_sqlite:
            from sqlalchemy.engine import make_url

            path = Path(make_url(db.url).database or "")
            raw = b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
            assert users[0].encode() in raw and not leaked(raw)
