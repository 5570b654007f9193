"""Which sandboxes hold which person's credentials: the live-sandbox registry.

A JetStream KV bucket (`shared.subjects.LIVE_SANDBOXES_BUCKET`), so every replica and every
restart sees the same records. Key `u<sha256(user_id)[:40]>.<sandbox_id>` (KV keys allow only
`[-/_=.A-Za-z0-9]`; the hash keeps any user id a valid key, the prefix lets one filtered watch
list a person's sandboxes). Value: `domain.LiveSandbox` as JSON — never token material.

Writes are compare-and-set on the key's revision (`create` / `update(last=…)`): a handler that
read revision N and finds the key changed meanwhile gets `LiveRecordChanged` and redoes its
work. `sandbox.destroyed` leaves a delete marker (a tombstone: a late sandbox.created for the
same sandbox is refused); forgetting a record for any other reason purges it (no tombstone).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, cast

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from services.sandbox.domain import LiveSandbox
from services.sandbox.errors import LiveRecordChanged, LiveRegistryError
from shared.batching import Coalescer
from shared.kv import open_or_create_bucket
from shared.logging import get_logger
from shared.subjects import LIVE_SANDBOXES_BUCKET

log = get_logger("ccbridge.sandbox.live")

_BUS_ERRORS = (
    nats.errors.Error,  # timeouts, no responders, connection closed/draining/reconnecting, ...
    nats.js.errors.Error,
    asyncio.TimeoutError,
    ConnectionError,
)


@dataclass(frozen=True)
class Lookup:
    record: LiveSandbox | None
    revision: int | None
    """None when there is no record (never was, purged, or destroyed)."""
    destroyed: bool = False


class LiveRegistry(Protocol):
    async def get(self, user_id: str, sandbox_id: str) -> Lookup: ...

    async def save(self, record: LiveSandbox, *, revision: int | None) -> int:
        """Create (revision None) or replace the record seen at `revision`; returns the new
        revision. Raises `LiveRecordChanged` when someone else wrote the key meanwhile."""
        ...

    async def for_user(self, user_id: str) -> list[tuple[LiveSandbox, int]]:
        """Every current record of this person, with its revision."""
        ...

    async def destroyed(self, user_id: str, sandbox_id: str) -> None:
        """Forget the sandbox and leave a tombstone (sandbox.destroyed)."""
        ...

    async def forget(self, user_id: str, sandbox_id: str) -> None:
        """Forget the sandbox without a tombstone."""
        ...

    async def revoked_at(self, user_id: str) -> int | None:
        """When (ms epoch) this person's credentials were last revoked, if ever."""
        ...

    async def mark_revoked(self, user_id: str, at: int) -> None:
        """Remember a revocation (keeps the latest time)."""
        ...


def user_prefix(user_id: str) -> str:
    return "u" + hashlib.sha256(user_id.encode()).hexdigest()[:40]


def record_key(user_id: str, sandbox_id: str) -> str:
    return f"{user_prefix(user_id)}.{sandbox_id}"


def revoked_key(user_id: str) -> str:
    return "r" + user_prefix(user_id)[1:]


class MemoryLiveRegistry:
    """In-process registry with the same compare-and-set semantics (unit tests, single replica)."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[LiveSandbox, int]] = {}
        self._tombstones: set[str] = set()
        self._revoked: dict[str, int] = {}
        self._revision = 0

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    async def get(self, user_id: str, sandbox_id: str) -> Lookup:
        key = record_key(user_id, sandbox_id)
        if key in self._tombstones:
            return Lookup(None, None, destroyed=True)
        found = self._records.get(key)
        return Lookup(found[0], found[1]) if found else Lookup(None, None)

    async def save(self, record: LiveSandbox, *, revision: int | None) -> int:
        key = record_key(record.user_id, record.sandbox_id)
        current = self._records.get(key)
        if (current[1] if current else None) != revision:
            raise LiveRecordChanged(f"record of {record.sandbox_id} changed meanwhile")
        self._tombstones.discard(key)
        new = self._next()
        self._records[key] = (record, new)
        return new

    async def for_user(self, user_id: str) -> list[tuple[LiveSandbox, int]]:
        prefix = user_prefix(user_id) + "."
        return [entry for key, entry in sorted(self._records.items()) if key.startswith(prefix)]

    async def destroyed(self, user_id: str, sandbox_id: str) -> None:
        key = record_key(user_id, sandbox_id)
        self._records.pop(key, None)
        self._tombstones.add(key)

    async def forget(self, user_id: str, sandbox_id: str) -> None:
        self._records.pop(record_key(user_id, sandbox_id), None)

    async def revoked_at(self, user_id: str) -> int | None:
        return self._revoked.get(user_id)

    async def mark_revoked(self, user_id: str, at: int) -> None:
        self._revoked[user_id] = max(at, self._revoked.get(user_id, at))


async def open_live_bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The bucket, created on first use (shared.kv)."""
    return await open_or_create_bucket(js, KeyValueConfig(
        bucket=LIVE_SANDBOXES_BUCKET,
        description="ccbridge sandbox: live sandboxes and whose credentials they hold (no tokens)",
        history=1,
        storage=StorageType.FILE,
        replicas=replicas,
    ))


class KvLiveRegistry:
    """`LiveRegistry` over the JetStream KV bucket (`kv` is looked up on each call, so the
    service can hand in a getter that works once the broker is connected).

    Pipelined: the record reads, revocation reads and record writes that the injections in hand
    make at about the same time are sent together (`shared.batching.Coalescer`: all requests in
    one write to the socket, the replies awaited together), each still succeeding or failing on
    its own — a compare-and-set that loses fails that record alone. At light load a call goes
    out at once."""

    def __init__(self, kv: KeyValue | Callable[[], KeyValue], *, list_timeout: float = 5.0,
                 pipelined: bool = True, max_batch: int = 64) -> None:
        self._kv = kv
        self._list_timeout = list_timeout
        self._reads: Coalescer[tuple[str, str, str], Lookup | int | None] | None = None
        self._writes: Coalescer[tuple[LiveSandbox, int | None], int] | None = None
        if pipelined:
            self._reads = Coalescer(self._read_all, max_batch=max_batch, max_in_flight=2, name="sandbox-kv-reads")
            self._writes = Coalescer(self._write_all, max_batch=max_batch, max_in_flight=2, name="sandbox-kv-writes")

    @property
    def kv(self) -> KeyValue:
        return self._kv() if callable(self._kv) else self._kv

    async def _read_all(self, items: list[tuple[str, str, str]]) -> list[Lookup | int | None | BaseException]:
        async def one(kind: str, user_id: str, sandbox_id: str) -> Lookup | int | None:
            return await (self._get(user_id, sandbox_id) if kind == "record" else self._revoked_at(user_id))

        return await asyncio.gather(*(one(*item) for item in items), return_exceptions=True)

    async def _write_all(self, items: list[tuple[LiveSandbox, int | None]]) -> list[int | BaseException]:
        return await asyncio.gather(*(self._save(record, revision) for record, revision in items),
                                    return_exceptions=True)

    async def get(self, user_id: str, sandbox_id: str) -> Lookup:
        if self._reads is None:
            return await self._get(user_id, sandbox_id)
        return await self._reads.submit(("record", user_id, sandbox_id))  # type: ignore[return-value]  # a "record" read answers a Lookup

    async def save(self, record: LiveSandbox, *, revision: int | None) -> int:
        if self._writes is None:
            return await self._save(record, revision)
        return await self._writes.submit((record, revision))

    async def revoked_at(self, user_id: str) -> int | None:
        if self._reads is None:
            return await self._revoked_at(user_id)
        return await self._reads.submit(("revoked", user_id, ""))  # type: ignore[return-value]  # a "revoked" read answers int | None

    async def _get(self, user_id: str, sandbox_id: str) -> Lookup:
        key = record_key(user_id, sandbox_id)
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError as exc:
            # KeyValue.get turns "deleted" into KeyNotFoundError and keeps the marker's op
            return Lookup(None, None, destroyed=_op(exc) == _op_name(KV_DEL))
        except _BUS_ERRORS as exc:
            raise LiveRegistryError(f"live registry read failed ({type(exc).__name__})") from None
        try:
            record = LiveSandbox.from_json(entry.value or b"")
        except (ValueError, TypeError):
            log.warning("sandbox.live_record_unreadable", key=key)
            return Lookup(None, entry.revision)
        return Lookup(record, entry.revision)

    async def _save(self, record: LiveSandbox, revision: int | None) -> int:
        key = record_key(record.user_id, record.sandbox_id)
        try:
            if revision is None:
                return await self.kv.create(key, record.to_json())
            return await self.kv.update(key, record.to_json(), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise LiveRecordChanged(f"record of {record.sandbox_id} changed meanwhile") from None
        except _BUS_ERRORS as exc:
            raise LiveRegistryError(f"live registry write failed ({type(exc).__name__})") from None

    async def for_user(self, user_id: str) -> list[tuple[LiveSandbox, int]]:
        found: list[tuple[LiveSandbox, int]] = []
        try:
            watcher = await self.kv.watch(f"{user_prefix(user_id)}.>", ignore_deletes=True)
            try:
                while True:
                    entry = await watcher.updates(timeout=self._list_timeout)
                    if entry is None:  # end of the current values
                        break
                    try:
                        found.append((LiveSandbox.from_json(entry.value or b""), entry.revision))
                    except (ValueError, TypeError):
                        log.warning("sandbox.live_record_unreadable", key=entry.key)
            finally:
                await watcher.stop()
        except _BUS_ERRORS as exc:
            raise LiveRegistryError(f"live registry listing failed ({type(exc).__name__})") from None
        return [(record, rev) for record, rev in found if record.user_id == user_id]

    async def destroyed(self, user_id: str, sandbox_id: str) -> None:
        try:
            await self.kv.delete(record_key(user_id, sandbox_id))
        except _BUS_ERRORS as exc:
            raise LiveRegistryError(f"live registry delete failed ({type(exc).__name__})") from None

    async def forget(self, user_id: str, sandbox_id: str) -> None:
        try:
            await self.kv.purge(record_key(user_id, sandbox_id))
        except _BUS_ERRORS as exc:
            raise LiveRegistryError(f"live registry purge failed ({type(exc).__name__})") from None

    async def _revoked_at(self, user_id: str) -> int | None:
        try:
            entry = await self.kv.get(revoked_key(user_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        except _BUS_ERRORS as exc:
            raise LiveRegistryError(f"live registry read failed ({type(exc).__name__})") from None
        try:
            value = json.loads(entry.value or b"{}").get("revoked_at")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, int) else None

    async def mark_revoked(self, user_id: str, at: int) -> None:
        key = revoked_key(user_id)
        for _ in range(10):  # compare-and-set loop: keep the latest time
            try:
                try:
                    entry = await self.kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    entry = None
                current = None
                if entry is not None:
                    with contextlib.suppress(ValueError, AttributeError):
                        current = json.loads(entry.value or b"{}").get("revoked_at")
                if isinstance(current, int) and current >= at:
                    return
                value = json.dumps({"user_id": user_id, "revoked_at": at}).encode()
                if entry is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except _BUS_ERRORS as exc:
                raise LiveRegistryError(f"live registry write failed ({type(exc).__name__})") from None
        raise LiveRecordChanged("revocation marker kept changing")

    async def purge_tombstones(self, js: JetStreamContext, older_than: float) -> int:
        """Drop delete and purge markers older than `older_than` seconds (best effort, at
        start); returns how many were dropped.

        Not nats-py's `KeyValue.purge_deletes`: it lists the markers with a watcher it never
        stops (nats-py 2.16), so that watcher's ordered consumer kept receiving every later write
        to the bucket — two per sandbox — into queues nobody read, for the life of the process:
        the sandbox service's memory leak (docs/performance.md, "Memory")."""
        markers: list[KeyValue.Entry] = []
        try:
            watcher = await self.kv.watchall(meta_only=True)
            try:
                while (entry := await watcher.updates(timeout=self._list_timeout)) is not None:
                    if entry.operation in (KV_DEL, KV_PURGE):
                        markers.append(entry)
            finally:
                await watcher.stop()
            now = datetime.now(UTC)
            dropped = 0
            for entry in markers:
                created = cast(datetime | None, entry.created)  # nats-py annotates int, sets a datetime
                if older_than > 0 and created is not None and (now - created).total_seconds() < older_than:
                    continue
                # the KV layout (ADR-8): bucket B is stream KV_B, key K subject $KV.B.K
                await js.purge_stream(f"KV_{entry.bucket}", subject=f"$KV.{entry.bucket}.{entry.key}")
                dropped += 1
            return dropped
        except _BUS_ERRORS as exc:
            log.warning("sandbox.live_tombstones_not_purged", error=type(exc).__name__)
            return 0


def _op_name(op: object) -> str:
    return op.decode() if isinstance(op, bytes) else str(op)


def _op(exc: nats.js.errors.KeyNotFoundError) -> str | None:
    op = getattr(exc, "op", None)
    return _op_name(op) if op is not None else None
