"""Process lifetime: a service runs until SIGTERM, and what it built at start is frozen out of
the garbage collector's reach once it is up (full collections then stay short)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from shared.runtime import run_until_stopped


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
