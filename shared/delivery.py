"""One delivery policy for every JetStream consumer of ccbridge, and the circuit breakers that
let a service ride out a dependency's outage.

What happens to a message whose processing failed, decided in one place:

- **a dependency is down** (the error names it: the vault, the database, e2b): its breaker opens
  and the message is *held* — its handler waits, telling JetStream it is still working on it —
  until the breaker lets a probe through and the probe succeeds. While every worker holds a
  message the consumer pulls nothing new, so work waits in the stream, not in a retry budget.
- **another retryable error**: `nack` with one backoff (exponential, capped, jittered).
- either way, once the message is older than the **retry window** (`window_s`, from the time
  JetStream stored it; 0 = never give up) the failure is final;
- **an exhausted retry** or a bug (an unexpected error, after `poison_after` deliveries): the
  message is dead-lettered unchanged (`dlq.<subject>`, with the reason; one letter per copy of
  the message, so a replayed copy that fails again is kept again), the service reports it (a
  `failed` event, an audit entry) and the message is terminated;
- **a final error** (the error says it is not retryable): reported and terminated; dead-lettered
  too when the service has nobody to report it to (`keep_final`: the vault's poison events).
  If even the report cannot be sent, the message is nacked: JetStream brings it back and the
  report is tried again.

FastStream's acknowledgement API does the rest (`msg.ack()`, `msg.nack(delay)`, `msg.reject()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from shared.logging import get_logger

log = get_logger("ccbridge.delivery")

BreakerState = Literal["closed", "open", "half_open"]


# --- what the policy needs to know about an error ---------------------------------------------
class Classified(Protocol):
    """Every service error carries these (services/*/errors.py)."""

    reason: str
    retryable: bool
    detail: str


def dependency_of(exc: BaseException) -> str | None:
    """The dependency an error says is down (`None`: not a dependency outage)."""
    value = getattr(exc, "dependency", None)
    return value if isinstance(value, str) and value else None


# --- backoff ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backoff:
    """Delay before the next delivery after `delivery` failed ones: base · 2^(n-1), capped, with
    "equal jitter" (half fixed, half random) so replicas never retry in lockstep."""

    base_s: float = 1.0
    cap_s: float = 30.0
    jitter: bool = True

    def delay(self, delivery: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** max(0, min(delivery - 1, 30)))
        if not self.jitter:
            return ceiling
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


# --- circuit breaker ----------------------------------------------------------------------------
class Breaker:
    """Closed → (a failure saying the dependency is down) → open: callers of `admit()` wait; every
    probe interval (doubling up to `max_probe_interval_s`) one of them goes through (half-open);
    its success closes the breaker and releases everybody, its failure keeps it open.

    `open_after` consecutive failures open it (1: the first). More than one keeps a single bad
    caller from pausing everybody: one hostile sandbox whose envd never answers fails alone,
    its redeliveries interleaved with everybody else's successes."""

    def __init__(self, name: str, *, probe_interval_s: float = 1.0, max_probe_interval_s: float = 5.0,
                 open_after: int = 1, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, BreakerState], None] | None = None) -> None:
        self.name = name
        self._probe_interval = probe_interval_s
        self._open_after = max(1, open_after)
        self._max_probe_interval = max_probe_interval_s
        self._clock = clock
        self._on_change = on_change
        self.state: BreakerState = "closed"
        self._closed = asyncio.Event()
        self._closed.set()
        self._probe_at = 0.0
        self._failures = 0
        self._opened_at: float | None = None
        self.paused_s = 0.0
        """Total time spent open (for metrics and the chaos report)."""

    def __repr__(self) -> str:
        return f"Breaker({self.name!r}, {self.state})"

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(self.name, state)

    def failed(self) -> None:
        """The dependency is down (a call through the breaker said so)."""
        now = self._clock()
        self._failures += 1
        if self.state == "closed" and self._failures < self._open_after:
            return
        if self._opened_at is None:
            self._opened_at = now
            log.warning("dependency down: pausing the work that needs it", dependency=self.name)
        tries = self._failures - self._open_after
        interval = min(self._max_probe_interval, self._probe_interval * 2 ** min(max(tries, 0), 10))
        self._probe_at = now + interval
        self._closed.clear()
        self._set("open")

    def succeeded(self) -> None:
        if self._opened_at is not None:
            paused = self._clock() - self._opened_at
            self.paused_s += paused
            log.info("dependency back: resuming", dependency=self.name, paused_s=round(paused, 1))
        self._opened_at = None
        self._failures = 0
        self._set("closed")
        self._closed.set()

    async def admit(self) -> bool:
        """Return when the caller may try the dependency: at once while closed; while open,
        when it is this caller's turn to probe (True: its outcome decides), or when somebody's
        probe closed the breaker."""
        while not self._closed.is_set():
            now = self._clock()
            if self.state == "open" and now >= self._probe_at:
                self._set("half_open")
                self._probe_at = now + self._max_probe_interval  # nobody else probes meanwhile
                return True
            if self.state == "half_open" and now >= self._probe_at:  # the probe never reported
                self._set("open")
                continue
            wait = max(0.05, self._probe_at - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout=wait)
        return False

    def try_admit(self) -> bool:
        """`admit` without waiting, for callers that must answer now (a request/reply): True if
        the caller may try the dependency (closed, or it is this caller's turn to probe)."""
        if self._closed.is_set():
            return True
        now = self._clock()
        if self.state == "half_open" and now >= self._probe_at:  # the probe never reported
            self._set("open")
        if self.state == "open" and now >= self._probe_at:
            self._set("half_open")
            self._probe_at = now + self._max_probe_interval
            return True
        return False

    @property
    def open_for_s(self) -> float:
        return 0.0 if self._opened_at is None else self._clock() - self._opened_at


class Breakers:
    """The breakers of one service, by dependency name (created on first use)."""

    def __init__(self, *, probe_interval_s: float = 1.0, max_probe_interval_s: float = 5.0,
                 open_after: Mapping[str, int] | None = None,
                 on_change: Callable[[str, BreakerState], None] | None = None) -> None:
        self._options: dict[str, Any] = {"probe_interval_s": probe_interval_s,
                                          "max_probe_interval_s": max_probe_interval_s, "on_change": on_change}
        self._open_after = dict(open_after or {})
        self._breakers: dict[str, Breaker] = {}

    def __getitem__(self, name: str) -> Breaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = Breaker(name, open_after=self._open_after.get(name, 1), **self._options)
        return breaker

    def __iter__(self) -> Any:
        return iter(self._breakers.values())

    def any_open(self) -> bool:
        return any(b.state != "closed" for b in self._breakers.values())

    async def call(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """Call `work` through breaker `name`: wait while it is open; a dependency error opens it,
        any other outcome (the dependency answered) closes it."""
        breaker = self[name]
        await breaker.admit()
        try:
            result = await work()
        except Exception as exc:
            if dependency_of(exc) == name:
                breaker.failed()
            else:
                breaker.succeeded()
            raise
        breaker.succeeded()
        return result


# --- the message, as the policy sees it ------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    """Facts about one delivery of a JetStream message (safe defaults outside JetStream)."""

    subject: str
    body: bytes
    delivered: int = 1
    stream_seq: int | None = None
    stored_at: datetime | None = None
    message_id: str | None = None

    @classmethod
    def of(cls, message: Any) -> Delivery:
        raw = getattr(message, "raw_message", None)
        metadata = None
        with contextlib.suppress(Exception):
            metadata = raw.metadata  # type: ignore[union-attr]  # None or core NATS: suppressed above
        headers = getattr(message, "headers", None) or {}
        body = getattr(message, "body", None)
        if body is None:
            body = getattr(raw, "data", b"")
        message_id = headers.get("Nats-Msg-Id")
        return cls(
            subject=getattr(raw, "subject", "") or "",
            body=body if isinstance(body, bytes) else str(body).encode(),
            delivered=max(1, int(getattr(metadata, "num_delivered", 1) or 1)),
            stream_seq=getattr(getattr(metadata, "sequence", None), "stream", None),
            stored_at=getattr(metadata, "timestamp", None),
            message_id=message_id if isinstance(message_id, str) and message_id else None,
        )

    def age_s(self, now: datetime | None = None) -> float:
        if self.stored_at is None:
            return 0.0
        stored = self.stored_at if self.stored_at.tzinfo else self.stored_at.replace(tzinfo=UTC)
        return max(0.0, ((now or datetime.now(UTC)) - stored).total_seconds())

    def dead_letter_id(self) -> str:
        """The message's identity in its dead letter's id (with `stream_seq`, the copy's: see
        `shared.broker.dead_letter_msg_id`): its Nats-Msg-Id, else a digest of its body."""
        return self.message_id or hashlib.sha256(self.body).hexdigest()[:32]


class DeadLetterSink(Protocol):
    async def dead_letter(self, subject: str, body: bytes, reason: str, *, message_id: str,
                          copy_seq: int | None = None) -> None: ...


class Acks(Protocol):
    """FastStream's message: the three outcomes."""

    async def ack(self) -> None: ...

    async def nack(self, delay: float | None = None) -> None: ...

    async def reject(self) -> None: ...

    async def in_progress(self) -> None: ...


Final = Callable[[BaseException, str, bool], Awaitable[None]]
"""Report a final failure: (error, detail, exhausted) — publish the failed event, audit it."""


@dataclass(frozen=True)
class DeliveryPolicy:
    """See the module docstring. `window_s`: how long a message may keep failing retryably (0 =
    for ever); `max_deliver`: an optional cap on the deliveries of a retryable (not dependency)
    failure too (0 = only the window); `poison_after`: deliveries after which an *unexpected*
    error (a bug) is final; `keep_final`: dead-letter final errors too; `ack_wait_s`: the
    consumer's ack wait (the heartbeat runs every third of it); `observe(outcome, reason)`:
    metrics ("retried", "held", "failed", "dead_lettered")."""

    breakers: Breakers
    dead_letters: DeadLetterSink
    window_s: float = 300.0
    max_deliver: int = 0
    poison_after: int = 5
    keep_final: bool = False
    backoff: Backoff = Backoff()
    ack_wait_s: float = 30.0
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    observe: Callable[[str, str], None] = lambda outcome, reason: None

    def out_of_time(self, delivery: Delivery) -> bool:
        return self.window_s > 0 and delivery.age_s(self.clock()) >= self.window_s

    async def handle(self, message: Acks, work: Callable[[], Awaitable[Any]], *, final: Final,
                     needs: tuple[str, ...] = (), delivery: Delivery | None = None) -> None:
        """Run `work` for this message and settle it: ack, hold, nack, or dead letter + report +
        terminate. `needs`: dependencies the work calls — while one of their breakers is open
        the message waits before its first attempt, instead of failing against it."""
        delivery = delivery or Delivery.of(message)
        probing: set[str] = set()
        async with heartbeat(message, self.ack_wait_s):
            for name in needs:
                if await self.breakers[name].admit():
                    probing.add(name)
            while True:
                try:
                    await work()
                except Exception as exc:  # noqa: BLE001 - every failure is settled below
                    dependency = dependency_of(exc)
                    if dependency is not None and not self.out_of_time(delivery):
                        breaker = self.breakers[dependency]
                        breaker.failed()
                        probing.discard(dependency)
                        if breaker.state != "closed":  # an outage: hold the message, then try again
                            self.observe("held", str(getattr(exc, "reason", dependency)))
                            if await breaker.admit():
                                probing.add(dependency)
                            continue
                        # not (yet) an outage: this message retries on its own backoff below
                    self._answered(probing - {dependency} if dependency else probing)
                    await self._settle_failure(message, delivery, exc, final)
                    return
                self._answered(probing)
                await message.ack()
                return

    def _answered(self, probed: set[str]) -> None:
        """The dependencies this message probed answered: they are up again."""
        for name in probed:
            self.breakers[name].succeeded()

    async def _settle_failure(self, message: Acks, delivery: Delivery, exc: BaseException, final: Final) -> None:
        known = hasattr(exc, "reason") and hasattr(exc, "retryable")
        retryable = bool(getattr(exc, "retryable", True))
        cap = self.max_deliver if known else self.poison_after  # an unexpected error that keeps happening: poison
        capped = cap > 0 and delivery.delivered >= cap
        if retryable and not capped and not self.out_of_time(delivery):
            delay = self.backoff.delay(delivery.delivered)
            self.observe("retried", str(getattr(exc, "reason", "unexpected")))
            log.warning("will be retried", subject=delivery.subject, reason=getattr(exc, "reason", "unexpected"),
                        error=type(exc).__name__, delivered=delivery.delivered, delay_s=round(delay, 2))
            await message.nack(delay=delay)
            return
        exhausted = retryable or not known
        keep = exhausted or self.keep_final
        reason = getattr(exc, "reason", "max_deliveries" if not known else "internal")
        detail = str(getattr(exc, "detail", "") or type(exc).__name__)[:300]
        if exhausted:
            age = delivery.age_s(self.clock())
            detail = f"{detail} (still failing after {age:.0f} s, {delivery.delivered} deliveries)"[-500:]
        try:
            if keep:
                await self.dead_letters.dead_letter(delivery.subject, delivery.body, f"{reason}: {detail}"[:200],
                                                    message_id=delivery.dead_letter_id(),
                                                    copy_seq=delivery.stream_seq)
            await final(exc, detail, exhausted)
        except Exception:
            log.exception("failure report not sent; the message will come back", subject=delivery.subject)
            await message.nack(delay=self.backoff.delay(delivery.delivered))
            return
        self.observe("dead_lettered" if keep else "failed", str(reason))
        await message.reject()


@contextlib.asynccontextmanager
async def heartbeat(message: Acks, ack_wait_s: float) -> AsyncIterator[None]:
    """Tell JetStream we are still on it (`+WPI`) every ack_wait/3 while the body runs. A
    timer, not a task per message: most messages are done long before the first beat."""
    interval = max(0.2, ack_wait_s / 3)
    loop = asyncio.get_running_loop()
    beats: set[asyncio.Task[None]] = set()
    timer: asyncio.TimerHandle

    async def in_progress() -> None:
        with contextlib.suppress(Exception):
            await message.in_progress()

    def beat() -> None:
        nonlocal timer
        task = loop.create_task(in_progress())
        beats.add(task)
        task.add_done_callback(beats.discard)
        timer = loop.call_later(interval, beat)

    timer = loop.call_later(interval, beat)
    try:
        yield
    finally:
        timer.cancel()
        for task in list(beats):
            task.cancel()


def breaker_states(breakers: Breakers) -> Mapping[str, BreakerState]:
    return {b.name: b.state for b in breakers}


class BreakerMetrics:
    """`ccbridge_<service>_dependency_paused{dependency}` (1 while work that needs it is paused)
    and `..._paused_seconds` (total time it was): pass `changed` as `Breakers(on_change=)`."""

    def __init__(self, registry: Any, service: str, dependencies: tuple[str, ...]) -> None:
        from prometheus_client import Counter, Gauge  # the services' dependency, not every importer's

        self._dependencies = dependencies
        self.paused = Gauge(f"ccbridge_{service}_dependency_paused",
                            "1 while work that needs the dependency is paused (breaker open).", ["dependency"],
                            registry=registry)
        self.paused_seconds = Counter(f"ccbridge_{service}_dependency_paused_seconds",
                                      "Time work waited for a dependency to come back.", ["dependency"],
                                      registry=registry)
        self._opened_at: dict[str, float] = {}
        for dependency in dependencies:
            self.paused.labels(dependency=dependency)
            self.paused_seconds.labels(dependency=dependency)

    def changed(self, dependency: str, state: BreakerState) -> None:
        name = dependency if dependency in self._dependencies else "other"
        now = time.monotonic()
        if state == "closed":
            opened = self._opened_at.pop(name, None)
            if opened is not None:
                self.paused_seconds.labels(dependency=name).inc(now - opened)
            self.paused.labels(dependency=name).set(0)
        else:
            self._opened_at.setdefault(name, now)
            self.paused.labels(dependency=name).set(1)


__all__ = [
    "Backoff",
    "Breaker",
    "BreakerMetrics",
    "Breakers",
    "DeadLetterSink",
    "Delivery",
    "DeliveryPolicy",
    "dependency_of",
    "heartbeat",
]
