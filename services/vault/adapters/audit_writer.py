"""The audit log's writer for high-volume entries: buffered, written in batches by a
background task, off the request path (the `AuditSink` the use cases submit to)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime

from services.vault.domain import AuditEntry
from services.vault.metrics import VaultMetrics
from services.vault.ports import UnitOfWork
from shared.events import utcnow
from shared.logging import get_logger

log = get_logger(__name__)


class AuditWriter:
    """Buffers high-volume audit entries (credential grants and refusals) and writes them in
    batches, off the request path. Best effort: entries are dropped (and counted) if the
    buffer is full or the database stays down; state changes are audited in their own
    transaction instead, never through here."""

    def __init__(
        self,
        unit_of_work: Callable[[], UnitOfWork],
        *,
        max_buffer: int = 10_000,
        batch: int = 500,
        interval_s: float = 0.5,
        metrics: VaultMetrics | None = None,
    ) -> None:
        self._uow = unit_of_work
        self._buffer: list[tuple[AuditEntry, datetime]] = []
        self._releases: dict[tuple[str, str], int] = {}
        self._max_buffer = max_buffer
        self._batch = batch
        self._interval = interval_s
        self._metrics = metrics
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.written = 0

    def submit(self, entry: AuditEntry, at: datetime | None = None) -> None:
        if len(self._buffer) >= self._max_buffer:
            self.dropped += 1
            return
        self._buffer.append((entry, at or utcnow()))
        if len(self._buffer) >= self._batch:
            self._wakeup.set()

    def submit_release(self, user_id: str, sandbox_id: str, at_ms: int) -> None:
        """When credentials last left for a sandbox (shown by GET /v1/claude-code/grants)."""
        key = (user_id, sandbox_id)
        if key in self._releases or len(self._releases) < self._max_buffer:
            self._releases[key] = max(at_ms, self._releases.get(key, 0))

    async def flush(self) -> int:
        written = 0
        if self._releases:
            releases, self._releases = self._releases, {}
            try:
                async with self._uow() as uow:
                    await uow.sandbox_leases.record_releases([(u, s, at) for (u, s), at in releases.items()])
                    await uow.commit()
            except Exception:
                for key, at in releases.items():  # keep them for the next attempt
                    self._releases[key] = max(at, self._releases.get(key, 0))
                raise
        while self._buffer:
            chunk, self._buffer = self._buffer[: self._batch], self._buffer[self._batch :]
            try:
                async with self._uow() as uow:
                    await uow.audit.add_many(chunk)
                    await uow.commit()
            except Exception:
                self._buffer = chunk + self._buffer  # keep them for the next attempt
                raise
            written += len(chunk)
        self.written += written
        return written

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._interval)
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - retried on the next tick
                log.warning("audit entries not written yet", error=type(exc).__name__, pending=len(self._buffer))
                if len(self._buffer) > self._max_buffer:
                    self.dropped += len(self._buffer) - self._max_buffer
                    self._buffer = self._buffer[-self._max_buffer :]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="vault-audit-writer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - stopping goes on; what was lost is logged
            log.warning("audit entries lost at stop", error=type(exc).__name__, pending=len(self._buffer))
