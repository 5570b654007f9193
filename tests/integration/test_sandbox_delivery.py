"""Delivery semantics over a real nats-server: the report of the last delivery survives a bus
failure (no message left stuck), malformed lifecycle events are dead-lettered at once, and
bounded concurrency per replica."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
from faststream.nats import NatsBroker
from nats.aio.client import Client

from ccbridge.embedded_nats import EmbeddedNats
from services.sandbox.adapters.backends.local import LocalBackend
from services.sandbox.adapters.bus import BrokerPublisher
from shared import subjects
from shared.broker import settle
from shared.events import Event, TokensRefreshed
from tests.grants import sandbox_created
from tests.sandbox_fixtures import (
    WAIT,
    Collector,
    FakeVault,
    as_json,
    make_bundle,
    publish,
    publish_created,
    running,
    settings_for,
    stored,
    uid,
)


class FlakyPublisher:
    """BrokerPublisher that fails the first `failures` publishes of one subject."""

    attempts: list[str] = []

    def __init__(self, broker: NatsBroker, subject: str, failures: int) -> None:
        self._inner = BrokerPublisher(broker)
        self._subject = subject
        self._left = failures

    async def publish(self, subject: str, event: Event) -> None:
        if subject == self._subject:
            FlakyPublisher.attempts.append(subject)
            if self._left > 0:
                self._left -= 1
                raise ConnectionError("injected: the bus refused the publish")
        await self._inner.publish(subject, event)


async def test_failed_report_on_the_last_delivery_is_retried_not_stuck(
    tmp_path: Path, embedded_nats: EmbeddedNats
) -> None:
    """The vault never answers and the retry window (1.5 s) runs out: the message is
    dead-lettered, and then publishing the failed event fails twice. Nacked, the message comes
    back (JetStream itself never gives up) until the report gets through; then it is
    terminated, and its dead letter was kept once."""
    client = await nats.connect(embedded_nats.url)
    try:
        vault = FakeVault(client)
        await client.subscribe(subjects.VAULT_CREDENTIALS_GET, cb=vault.handle)
        await settle(client)
        user, sandbox_id = uid("user"), uid("sbx")
        vault.users[user] = "silent"
        FlakyPublisher.attempts = []
        settings = settings_for(embedded_nats.url, tmp_path, vault_request_timeout=0.3, retry_window=1.5,
                                ack_wait=5.0)
        event = sandbox_created(user_id=user, sandbox_id=sandbox_id)
        js = client.jetstream()

        def factory(broker: Any) -> FlakyPublisher:
            return FlakyPublisher(broker, subjects.SANDBOX_CREDENTIALS_FAILED, failures=2)

        async with running(settings, publisher=factory):
            await publish_created(client, event)
            deadline = time.monotonic() + WAIT
            while True:
                info = await js.consumer_info(subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREATED_DURABLE)
                failed = await stored(client, subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREDENTIALS_FAILED,
                                      lambda m: as_json(m.data).get("sandbox_id") == sandbox_id)
                if failed and info.num_ack_pending == 0 and info.num_pending == 0:
                    break
                assert time.monotonic() < deadline, "the message stayed unreported"
                await asyncio.sleep(0.2)
        dead = await stored(client, subjects.DLQ_STREAM.name, "dlq.sandbox.created",
                            lambda m: m.data == event.model_dump_json().encode())
    finally:
        await client.close()
    assert len(FlakyPublisher.attempts) == 3  # two refused, the third went through
    # the deliveries after the first report came from its nacks: the (idempotent) work is
    # redone, fails against the still-silent vault, is out of time at once, and reported again
    assert len(failed) == 1 and as_json(failed[0].data)["reason"] == "vault_unavailable"
    gave_up = int(re.search(r"still failing after \d+ s, (\d+) deliveries", dead[0].headers["Ccbridge-Reason"])[1])
    reported = int(re.search(r"still failing after \d+ s, (\d+) deliveries", as_json(failed[0].data)["detail"])[1])
    assert reported == gave_up + 2  # two refused reports, each bringing the message back once
    assert len(dead) == 1  # dead-lettered on each try, kept once (one Nats-Msg-Id per copy)


async def test_malformed_lifecycle_events_are_dead_lettered_and_the_consumer_moves_on(
    tmp_path: Path, embedded_nats: EmbeddedNats,
) -> None:
    """On a server of its own: the durable consumers and streams of the suite's shared server
    carry other tests' leftovers (and a killed service's deliveries wait out their ack_wait)."""
    nc = await nats.connect(embedded_nats.url)
    try:
        fake_vault, collector = FakeVault(nc), Collector()
        await nc.subscribe(subjects.VAULT_CREDENTIALS_GET, cb=fake_vault.handle)
        await nc.subscribe("sandbox.credentials.*", cb=collector.on_msg)
        await nc.subscribe(f"{subjects.DLQ_PREFIX}.>", cb=collector.on_msg)
        await settle(nc)
        user, sandbox_id = uid("user"), uid("sbx")
        fake_vault.users[user] = make_bundle()
        garbage = f'{{"user_id": "{user}", "version": "not a number {uid("x")}"}}'.encode()
        async with running(settings_for(embedded_nats.url, tmp_path)):
            await publish_created(nc, sandbox_created(user_id=user, sandbox_id=sandbox_id))
            await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id)
            await nc.jetstream().publish(subjects.TOKENS_REFRESHED, garbage, stream=subjects.TOKENS_STREAM.name)
            await nc.jetstream().publish(subjects.TOKENS_REVOKED, b"not json", stream=subjects.TOKENS_STREAM.name)
            fake_vault.users[user] = make_bundle()
            good = TokensRefreshed(user_id=user, expires_at=1, scopes=[], version=2)
            await publish(nc, subjects.TOKENS_REFRESHED, good)
            await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, sandbox_id, refreshed_by=good.event_id)
            await collector.wait(lambda m: m == ("dlq.tokens.refreshed", garbage))
    finally:
        await nc.close()
    # no salvage for lifecycle subjects: nothing claims to answer them
    assert [m for m in collector.messages if m[0] == subjects.SANDBOX_CREDENTIALS_FAILED
            and user.encode() in m[1]] == []


async def test_concurrency_per_replica_is_bounded(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    user = uid("user")
    fake_vault.users[user] = make_bundle()
    state = {"now": 0, "peak": 0}

    class Slow(LocalBackend):
        @asynccontextmanager
        async def open(self, event: Any, *, must_exist: bool = False) -> AsyncIterator[Any]:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            try:
                await asyncio.sleep(0.05)
                async with super().open(event, must_exist=must_exist) as sandbox:
                    yield sandbox
            finally:
                state["now"] -= 1

    events = [sandbox_created(user_id=user, sandbox_id=uid("sbx")) for _ in range(24)]
    settings = settings_for(nats_url, tmp_path, concurrency=3)
    async with running(settings, backend=Slow(settings.local_sandbox_root)):
        for event in events:
            await publish_created(nc, event)
        for event in events:
            await collector.event(subjects.SANDBOX_CREDENTIALS_INJECTED, event.sandbox_id)
    assert 1 <= state["peak"] <= 3
