"""The sandbox service's memory does not grow with the sandboxes it has handled (the leak of
docs/performance.md, "Memory"): what its NATS connection buffers stays bounded after many
injections, and the tombstone purge at start leaves no watcher subscribed to the live-sandbox
bucket. The RSS figures themselves come from `make soak`; nothing here asserts on time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType

from services.sandbox.adapters.live_registry import KvLiveRegistry, record_key
from services.sandbox.domain import LiveSandbox
from shared import subjects
from tests.grants import sandbox_created
from tests.sandbox_fixtures import (
    Collector,
    FakeVault,
    as_json,
    make_bundle,
    publish_created,
    running,
    settings_for,
    uid,
)

INJECTIONS = 300


def buffered(connection: Client) -> tuple[int, int]:
    """(subscriptions, messages waiting in their queues) of one NATS connection. nats-py keeps
    its subscriptions in `_subs`; there is no public list."""
    subs = list(connection._subs.values())
    return len(subs), sum(sub.pending_msgs for sub in subs)


async def test_injections_leave_nothing_queued_on_the_service_connection(
    nats_url: str, tmp_path: Path, nc: Client, fake_vault: FakeVault, collector: Collector,
) -> None:
    users = [uid("mem-user") for _ in range(5)]
    for user in users:
        fake_vault.users[user] = make_bundle()
    events = [sandbox_created(user_id=users[i % len(users)], sandbox_id=uid("mem-sbx")) for i in range(INJECTIONS)]

    async with running(settings_for(nats_url, tmp_path)) as service:
        connection = service.broker.connection
        subscriptions_at_start, _ = buffered(connection)
        for event in events:
            await publish_created(nc, event)
        causes = {e.event_id for e in events}
        await collector.wait(lambda m: m[0] == subjects.SANDBOX_CREDENTIALS_INJECTED
                             and as_json(m[1]).get("cause_event_id") in causes, count=INJECTIONS)
        await asyncio.sleep(0.5)  # the last records' KV writes are delivered wherever they go
        subscriptions, waiting = buffered(connection)

    print(f"\n{INJECTIONS} injections: {subscriptions} subscriptions (at start {subscriptions_at_start}), "
          f"{waiting} messages waiting in their queues")
    # every injection writes its live record twice; a subscriber that never reads (the leak)
    # held both writes of every sandbox
    assert waiting <= 16, f"{waiting} messages queued on the service's connection after {INJECTIONS} injections"
    assert subscriptions <= subscriptions_at_start


@pytest.fixture
async def bucket(nc: Client) -> AsyncIterator[KvLiveRegistry]:
    name = f"test_tombstones_{uuid.uuid4().hex[:8]}"
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket=name, history=1, storage=StorageType.MEMORY))
    yield KvLiveRegistry(kv)
    await js.delete_key_value(name)


def record(user: str, sandbox_id: str) -> LiveSandbox:
    return LiveSandbox(user_id=user, sandbox_id=sandbox_id, backend="local", created_event_id=uid("ev"),
                       mode="access_only")


async def test_tombstone_purge_drops_old_markers_keeps_records_and_leaves_no_watcher(
    nc: Client, bucket: KvLiveRegistry,
) -> None:
    js = nc.jetstream()
    user = uid("tomb-user")
    destroyed, forgotten, live = uid("sbx"), uid("sbx"), uid("sbx")
    for sandbox_id in (destroyed, forgotten, live):
        await bucket.save(record(user, sandbox_id), revision=None)
    await bucket.destroyed(user, destroyed)  # a delete marker (tombstone)
    await bucket.forget(user, forgotten)  # a purge marker
    assert (await bucket.get(user, destroyed)).destroyed

    subscriptions_before, _ = buffered(nc)
    # markers younger than the age limit stay
    assert await bucket.purge_tombstones(js, older_than=3600) == 0
    assert (await bucket.get(user, destroyed)).destroyed
    # older ones go (0 = every marker): no tombstone left, the live record untouched
    assert await bucket.purge_tombstones(js, older_than=0) == 2
    assert not (await bucket.get(user, destroyed)).destroyed
    assert (await bucket.get(user, live)).record is not None
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await bucket.kv.get(record_key(user, forgotten))

    # and nothing keeps listening to the bucket: later writes are queued nowhere
    for _ in range(50):
        await bucket.save(record(user, uid("sbx")), revision=None)
    await nc.flush()
    await asyncio.sleep(0.2)
    subscriptions, waiting = buffered(nc)
    assert subscriptions == subscriptions_before
    assert waiting == 0
