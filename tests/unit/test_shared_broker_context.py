"""`bus.Message` / `bus.Broker` give a handler its message and broker without the worker-thread
hop FastStream's own `NatsMessage` / `NatsBroker` annotations cost every message (fast_depends
runs a custom field's sync `use` in a thread pool)."""

from __future__ import annotations

import fast_depends.core.model
import pytest
from faststream.nats import NatsBroker, NatsMessage, TestNatsBroker

from shared import broker as bus


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    hops: list[object] = []
    real = fast_depends.core.model.run_async

    async def counting(func, *args, **kwargs):
        if not fast_depends.core.model.is_coroutine_callable(func):
            hops.append(func)  # would run in a worker thread
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(fast_depends.core.model, "run_async", counting)
    return hops


async def test_bus_message_and_broker_resolve_on_the_loop(thread_hops: list[object]) -> None:
    broker = NatsBroker()
    seen: list[tuple[bytes, bool]] = []

    @broker.subscriber("ccbridge-test.ctx")
    async def handle(body: dict, msg: bus.Message, current: bus.Broker) -> None:
        seen.append((msg.body, current is broker))

    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish({"a": 1}, "ccbridge-test.ctx")
    assert seen == [(b'{"a":1}', True)]
    assert thread_hops == []


async def test_faststreams_own_annotation_is_what_costs_the_hop(thread_hops: list[object]) -> None:
    """Why `AsyncContext` exists: if FastStream stops hopping, this fails and it can go."""
    broker = NatsBroker()

    @broker.subscriber("ccbridge-test.ctx-own")
    async def handle(body: dict, msg: NatsMessage) -> None:
        assert msg.body

    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish({"a": 1}, "ccbridge-test.ctx-own")
    assert thread_hops
