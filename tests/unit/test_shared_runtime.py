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
