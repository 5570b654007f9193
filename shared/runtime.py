"""Process lifetime shared by the services: run until SIGTERM/SIGINT (or cancellation), then
stop cleanly — or until the supervisor that started the service is gone.

`ccbridge up` (ccbridge.stack.Stack) passes its pid in `CCBRIDGE_SUPERVISOR_PID`: the service
then watches its parent and stops cleanly once the parent is no longer that process (it was
killed, even with SIGKILL, and the service was re-parented). This is the portable half; on Linux
the supervisor also asks the kernel for SIGTERM at its death (PR_SET_PDEATHSIG, ccbridge.stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from shared.lifecycle import cancel_and_wait

SUPERVISOR_PID_ENV = "CCBRIDGE_SUPERVISOR_PID"
PARENT_CHECK_INTERVAL_S = 0.5

if TYPE_CHECKING:
    from shared.lifecycle import Service

log = logging.getLogger("ccbridge.runtime")


def supervisor_pid() -> int | None:
    """The pid of the supervisor this process must not outlive (CCBRIDGE_SUPERVISOR_PID)."""
    value = os.environ.get(SUPERVISOR_PID_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 1 else None


async def watch_parent(pid: int, stop: asyncio.Event, interval_s: float | None = None) -> None:
    """Set `stop` once this process's parent is no longer `pid` (the supervisor died)."""
    while not stop.is_set():
        if os.getppid() != pid:
            log.info("the supervisor (pid %d) is gone: stopping", pid)
            stop.set()
            return
        await asyncio.sleep(interval_s or PARENT_CHECK_INTERVAL_S)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set by SIGTERM or SIGINT while the block runs (handlers removed afterwards), or
    when the supervisor named by CCBRIDGE_SUPERVISOR_PID is gone."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass
    watcher = None
    if (parent := supervisor_pid()) is not None:
        watcher = loop.create_task(watch_parent(parent, stop), name="ccbridge-parent-watch")
    try:
        yield stop
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)


def freeze_startup_heap() -> None:
    """Once a service is up: collect, then move everything built at start (modules, settings,
    keys, clients) out of the garbage collector's reach, so a full collection scans only what
    the traffic creates. A full collection stops the event loop: measured on the sandbox, the
    worst one went from 89 ms to 5 ms — at 200 msg/s that pause was the latency p99."""
    gc.collect()
    gc.freeze()
    start_heap_snapshots()


TRACEMALLOC_ENV = "CCBRIDGE_TRACEMALLOC"


def start_heap_snapshots(environ: Mapping[str, str] | None = None) -> threading.Thread | None:
    """Debug hook, off by default (docs/performance.md, "Memory"): with
    `CCBRIDGE_TRACEMALLOC=<dir>` the process traces its allocations from now on (tracemalloc,
    `CCBRIDGE_TRACEMALLOC_FRAMES` frames per trace, default 8) and writes a snapshot to
    `<dir>/<service>-<pid>-<n>.tracemalloc` every `CCBRIDGE_TRACEMALLOC_INTERVAL_S` seconds
    (default 30), from a daemon thread. Compare two with `python -m bench.heapdiff A B`.
    Tracing costs CPU and memory itself: for finding leaks, never in production."""
    environ = os.environ if environ is None else environ
    target = environ.get(TRACEMALLOC_ENV)
    if not target:
        return None
    import structlog

    service = str(structlog.contextvars.get_contextvars().get("service", "ccbridge"))
    directory = Path(target)
    directory.mkdir(parents=True, exist_ok=True)
    interval = float(environ.get(f"{TRACEMALLOC_ENV}_INTERVAL_S", "30"))
    if not tracemalloc.is_tracing():
        tracemalloc.start(int(environ.get(f"{TRACEMALLOC_ENV}_FRAMES", "8")))

    def dump() -> None:
        for n in itertools.count():
            time.sleep(interval)
            try:
                snapshot = tracemalloc.take_snapshot()
            except RuntimeError:  # tracing was stopped
                return
            snapshot.dump(str(directory / f"{service}-{os.getpid()}-{n:04d}.tracemalloc"))

    thread = threading.Thread(target=dump, name="ccbridge-tracemalloc", daemon=True)
    thread.start()
    return thread


async def run_until_stopped(service: Service) -> None:
    """Start the service and run it until SIGTERM/SIGINT, the supervisor's death, or the service
    ending on its own (`wait_closed`); then stop it. A signal during a slow start (NATS not up
    yet) stops it too, instead of waiting for the start to finish."""
    with stop_on_signals() as stop:
        stopping = asyncio.create_task(stop.wait(), name="ccbridge-stop-signal")
        starting = asyncio.create_task(service.start(), name="ccbridge-start")
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # a failed start raises here
                freeze_startup_heap()
                ended = asyncio.create_task(service.wait_closed(), name="ccbridge-wait-closed")
                try:
                    await asyncio.wait({stopping, ended}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    await cancel_and_wait(ended)
        finally:
            for task in (starting, stopping):
                if not task.done():
                    await cancel_and_wait(task)
            await service.stop()
