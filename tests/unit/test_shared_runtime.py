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
from pathlib import Path
from typing import Any

import pytest
import structlog

from shared.runtime import run_until_stopped, start_heap_snapshots


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # other tests expect a normal collector


class Service:
    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.stopped = False
        self.frozen_at_start: int | None = None

    async def __aenter__(self) -> Service:
        self.frozen_at_start = gc.get_freeze_count()
        self.startup_state = [object() for _ in range(1000)]  # built while starting
        self.up.set()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.stopped = True


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
