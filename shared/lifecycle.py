"""One lifecycle for the three services (auth, the vault, the sandbox service).

A service subclasses `Service` and implements `open(stack)`: build and start what it needs, in
order, registering on the `contextlib.AsyncExitStack` it is given how to close each part the
moment that part is open. Then:

- `start()` runs `open`; if it fails half-way, whatever was already opened is closed before the
  error propagates — nothing is left running (a health server, a connection, a thread pool);
- `stop()` closes everything in reverse order, each step even if an earlier one failed;
- background work is started with `background(stack, coroutine, name)`: on stop the task is
  cancelled *and awaited*;
- `wait_closed()` returns if the service ends on its own (auth's HTTP server dying);
- `run_service(...)` is the one `main()` (settings → logging → run until SIGTERM/SIGINT or until
  the supervisor is gone: `shared.runtime.run_until_stopped`).

cosmicpython's `bootstrap.py` is the model: one composition root per service, explicit about
what it opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self, TypeVar

from pydantic import ValidationError

from shared.settings import ServiceSettings

EXIT_INVALID_SETTINGS = 2
"""A service's exit code when its settings are invalid (one line on stderr says which)."""

S = TypeVar("S", bound=ServiceSettings)


class Service:
    """Base of the three services: `open(stack)` is their composition root."""

    name = "service"

    def __init__(self) -> None:
        self._stack: AsyncExitStack | None = None

    @property
    def started(self) -> bool:
        return self._stack is not None

    async def open(self, stack: AsyncExitStack) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        if self._stack is not None:
            return
        stack = AsyncExitStack()
        try:
            await self.open(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def wait_closed(self) -> None:
        """Returns when the service ends on its own; by default it never does."""
        await asyncio.Event().wait()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


def background(stack: AsyncExitStack, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """A task that lives as long as the service: cancelled and awaited when it stops."""
    task = asyncio.create_task(work, name=name)
    stack.push_async_callback(cancel_and_wait, task)
    return task


def run_service(
    name: str,
    settings_type: Callable[[], S],
    service: Callable[[S], Service],
    *,
    check: Callable[[S], None] | None = None,
    exit_codes: Mapping[type[BaseException], int] | None = None,
) -> None:
    """The services' `main()`. Invalid settings (or a failed `check`, raising ValueError) exit
    `EXIT_INVALID_SETTINGS` with one line; an exception named in `exit_codes` exits with its
    code and its message on one line; Ctrl-C is a clean stop."""
    from shared.logging import configure_logging
    from shared.runtime import run_until_stopped

    try:
        settings = settings_type()
        if check is not None:
            check(settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"ccbridge {name}: invalid settings: {problems}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID_SETTINGS) from None
    except ValueError as exc:
        print(f"ccbridge {name}: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID_SETTINGS) from None
    configure_logging(settings.log_level, settings.log_format, service=name)
    try:
        asyncio.run(run_until_stopped(service(settings)))
    except KeyboardInterrupt:
        pass
    except tuple((exit_codes or {}).keys()) as exc:
        print(exc, file=sys.stderr)
        code = next(code for kind, code in (exit_codes or {}).items() if isinstance(exc, kind))
        raise SystemExit(code) from None


__all__ = ["EXIT_INVALID_SETTINGS", "Service", "background", "cancel_and_wait", "run_service"]
