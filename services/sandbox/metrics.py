"""Prometheus metrics of one sandbox-service replica (own registry, so several can live in one
test process). Labels are closed sets: never a user id, a sandbox id or anything secret."""

from __future__ import annotations

import asyncio
import time
from typing import get_args

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.sandbox.injector import CredentialInjector, EventPublisher, Injected
from shared import subjects
from shared.delivery import BreakerMetrics
from shared.events import Event, FailureReason, SandboxCreated, SandboxCredentialsFailed
from shared.subjects import DLQ_STREAM

OUTCOMES = ("injected", "duplicate", "retry", "held", "failed", "dead_lettered")
DEPENDENCIES = ("vault", "e2b")
REASONS = get_args(FailureReason)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SandboxMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.events_in = Counter("ccbridge_sandbox_events_in", "Events consumed, by subject.", ["subject"], registry=r)
        self.events_out = Counter("ccbridge_sandbox_events_out", "Result events published, by subject.", ["subject"], registry=r)
        self.outcomes = Counter("ccbridge_sandbox_injections", "sandbox.created handled, by outcome.", ["outcome"], registry=r)
        self.failures = Counter("ccbridge_sandbox_failures", "Failures by machine-readable reason.", ["reason"], registry=r)
        self.latency = Histogram(
            "ccbridge_sandbox_injection_seconds", "sandbox.created received → result published.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.dlq_messages = Gauge("ccbridge_dlq_messages", "Messages waiting in the dead-letter stream.", registry=r)
        self.breakers = BreakerMetrics(r, "sandbox", DEPENDENCIES)

    def consumed(self, subject: str) -> None:
        self.events_in.labels(subject=subject).inc()

    def published(self, subject: str) -> None:
        self.events_out.labels(subject=subject).inc()

    def injected(self, result: Injected, seconds: float) -> None:
        self.outcomes.labels(outcome="duplicate" if result.duplicate else "injected").inc()
        self.latency.observe(seconds)

    def failed(self, event: SandboxCredentialsFailed, exhausted: bool, seconds: float) -> None:
        self.outcomes.labels(outcome="dead_lettered" if exhausted else "failed").inc()
        self.failures.labels(reason=_closed(event.reason)).inc()
        self.latency.observe(seconds)

    def delivery(self, outcome: str, reason: str) -> None:
        """shared.delivery's observer: a message retried or held (its final outcome is counted
        where it is reported)."""
        if outcome in ("retried", "held"):
            self.outcomes.labels(outcome="retry" if outcome == "retried" else "held").inc()
            self.failures.labels(reason=_closed(reason)).inc()

    def invalid_event(self) -> None:
        self.outcomes.labels(outcome="dead_lettered").inc()
        self.failures.labels(reason="invalid_event").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _closed(reason: str) -> str:
    return reason if reason in REASONS else "other"


class MeteredInjector:
    """The injector with its outcomes and latency counted (a decorator, so the use case stays
    free of metrics). Latency runs from the first attempt on an event to its result, injected
    or failed, across held and redelivered attempts on this replica."""

    MAX_TRACKED = 4096  # events between first attempt and result; beyond it the oldest is forgotten

    def __init__(self, inner: CredentialInjector, metrics: SandboxMetrics) -> None:
        self._inner = inner
        self._metrics = metrics
        self._started: dict[str, float] = {}

    def _began(self, event_id: str) -> None:
        if event_id not in self._started:
            if len(self._started) >= self.MAX_TRACKED:
                self._started.pop(next(iter(self._started)))
            self._started[event_id] = time.perf_counter()

    def _took(self, event_id: str) -> float:
        return time.perf_counter() - self._started.pop(event_id, time.perf_counter())

    def needs(self, event: SandboxCreated) -> tuple[str, ...]:
        return self._inner.needs(event)

    async def run(self, event: SandboxCreated) -> Injected:
        self._began(event.event_id)
        self._metrics.consumed(subjects.SANDBOX_CREATED)
        result = await self._inner.run(event)
        self._metrics.injected(result, self._took(event.event_id))
        return result

    async def report_failed(self, event: SandboxCreated, error: BaseException, detail: str,
                            exhausted: bool) -> SandboxCredentialsFailed:
        failed = await self._inner.report_failed(event, error, detail, exhausted)
        self._metrics.failed(failed, exhausted, self._took(event.event_id))
        return failed


class MeteredPublisher:
    """Counts every result event a publisher sends."""

    def __init__(self, inner: EventPublisher, metrics: SandboxMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def publish(self, subject: str, event: Event) -> None:
        await self._inner.publish(subject, event)
        self._metrics.published(subject)


async def watch_dlq_depth(js: JetStreamContext, metrics: SandboxMetrics, interval_s: float = 15.0) -> None:
    """Keep `ccbridge_dlq_messages` current (one replica's view of the shared DLQ stream)."""
    while True:
        try:
            info = await js.stream_info(DLQ_STREAM.name)
            metrics.dlq_messages.set(info.state.messages)
        except Exception:  # noqa: BLE001 - a missed sample is not an error worth more than a gap
            pass
        await asyncio.sleep(interval_s)
