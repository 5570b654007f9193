"""Process lifetime: a service runs until SIGTERM, and what it built at start is frozen out of
the garbage collector's reach once it is up (full collections then stay short); on request it
dumps tracemalloc snapshots for finding leaks."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import structlog

from shared import lifecycle
from shared.runtime import run_until_stopped, start_heap_snapshots


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # other tests expect a normal collector


class Service(lifecycle.Service):
    def __init__(self) -> None:
        super().__init__()
        self.up = asyncio.Event()
        self.stopped = False
        self.frozen_at_start: int | None = None

    async def open(self, stack: AsyncExitStack) -> None:
        self.frozen_at_start = gc.get_freeze_count()
        self.startup_state = [object() for _ in range(1000)]  # built while starting
        stack.callback(setattr, self, "stopped", True)
        self.up.set()


async def test_runs_until_sigterm_and_freezes_the_startup_heap_once_up(unfrozen: None) -> None:
    service = Service()
    task = asyncio.create_task(run_until_stopped(service))
    await asyncio.wait_for(service.up.wait(), 5)
    await asyncio.sleep(0)  # the service is up: the heap is frozen now
    assert service.frozen_at_start == 0
    assert gc.get_freeze_count() >= len(service.startup_state)
    assert not task.done() and not service.stopped
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 5)
    assert service.stopped


# --- the tracemalloc hook (CCBRIDGE_TRACEMALLOC, docs/performance.md "Memory") ------------------
def test_heap_snapshots_are_off_unless_asked() -> None:
    assert start_heap_snapshots({}) is None


def test_heap_snapshots_are_dumped_per_service_and_compare(tmp_path: Path) -> None:
    from bench.heapdiff import diff_lines

    out = tmp_path / "snapshots"
    already = tracemalloc.is_tracing()
    with structlog.contextvars.bound_contextvars(service="sandbox"):
        thread = start_heap_snapshots({"CCBRIDGE_TRACEMALLOC": str(out), "CCBRIDGE_TRACEMALLOC_INTERVAL_S": "0.05"})
    assert thread is not None and tracemalloc.is_tracing()
    kept = []
    try:
        deadline = time.monotonic() + 30
        while len(found := sorted(out.glob(f"sandbox-{os.getpid()}-*.tracemalloc"))) < 2:
            kept.append(bytearray(4096))  # something to see grow
            assert time.monotonic() < deadline, "no snapshots written"
            time.sleep(0.01)
    finally:
        if not already:
            tracemalloc.stop()
    lines = diff_lines(found[0], found[1])
    assert lines[0].startswith("total ")
    if not already:
        thread.join(5)
        assert not thread.is_alive()  # the dumper ends with the tracing
async def test_a_service_stops_once_its_supervisor_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The portable half of "services die with `ccbridge up`": a parent that is not the recorded
    supervisor any more (it died; the service was re-parented) stops the service cleanly."""
    import time

    from shared import runtime

    monkeypatch.setattr(runtime, "PARENT_CHECK_INTERVAL_S", 0.05)
    monkeypatch.setenv(runtime.SUPERVISOR_PID_ENV, str(os.getppid() + 1_000_000))  # not our parent
    service = Service()
    started = time.monotonic()
    await asyncio.wait_for(run_until_stopped(service), 5)
    assert service.stopped and time.monotonic() - started < 2

    monkeypatch.setenv(runtime.SUPERVISOR_PID_ENV, str(os.getppid()))  # our parent: keeps running
    service = Service()
    task = asyncio.create_task(run_until_stopped(service))
    await asyncio.sleep(0.5)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- the one lifecycle (shared/lifecycle.py) ----------------------------------------------------
class Parts(lifecycle.Service):
    """Opens three parts and a background task; `fail_at` makes the open fail after that part."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.closed: list[str] = []
        self.task: asyncio.Task[None] | None = None

    async def open(self, stack: AsyncExitStack) -> None:
        for index, part in enumerate(("store", "bus", "http")):
            stack.push_async_callback(self._close, part)
            if index == self.fail_at:
                raise RuntimeError(f"{part} would not open")
        self.task = lifecycle.background(stack, asyncio.Event().wait(), "forever")

    async def _close(self, part: str) -> None:
        self.closed.append(part)
        if part == "http":
            raise ConnectionError("closing http failed")  # the rest still closes


async def test_stop_closes_in_reverse_order_and_awaits_background_tasks() -> None:
    service = Parts()
    await service.start()
    assert service.started and service.task is not None and not service.task.done()
    with pytest.raises(ConnectionError):
        await service.stop()
    assert service.closed == ["http", "bus", "store"] and service.task.cancelled()
    assert not service.started
    await service.stop()  # twice is harmless
    assert service.closed == ["http", "bus", "store"]


async def test_a_start_that_fails_half_way_closes_what_it_opened() -> None:
    service = Parts(fail_at=1)
    with pytest.raises(RuntimeError, match="bus would not open"):
        await service.start()
    assert service.closed == ["bus", "store"] and not service.started


async def test_a_signal_during_a_slow_start_stops_the_service() -> None:
    class Slow(lifecycle.Service):
        async def open(self, stack: AsyncExitStack) -> None:
            stack.callback(closed.append, "opened part")
            await asyncio.Event().wait()  # NATS is not up yet

    closed: list[str] = []
    task = asyncio.create_task(run_until_stopped(Slow()))
    await asyncio.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 5)
    assert closed == ["opened part"]


async def test_a_service_that_ends_on_its_own_is_stopped() -> None:
    class Ending(lifecycle.Service):
        async def open(self, stack: AsyncExitStack) -> None:
            stack.callback(closed.append, "closed")

        async def wait_closed(self) -> None:
            return None

    closed: list[str] = []
    await asyncio.wait_for(run_until_stopped(Ending()), 5)
    assert closed == ["closed"]
