"""Prometheus metrics of one sandbox-service replica (own registry, so several can live in one
test process). Labels are closed sets: never a user id, a sandbox id or anything secret."""

from __future__ import annotations

import asyncio
import time
from typing import get_args

from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.sandbox.injector import CredentialInjector, EventPublisher, Failed, Injected, Outcome, Retry, RetryPolicy
from shared import subjects
from shared.events import Event, FailureReason, SandboxCreated
from shared.subjects import DLQ_STREAM

OUTCOMES = ("injected", "duplicate", "retry", "failed", "dead_lettered")
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

    def consumed(self, subject: str) -> None:
        self.events_in.labels(subject=subject).inc()

    def published(self, subject: str) -> None:
        self.events_out.labels(subject=subject).inc()

    def handled(self, outcome: Outcome, seconds: float) -> None:
        if isinstance(outcome, Injected):
            self.outcomes.labels(outcome="duplicate" if outcome.duplicate else "injected").inc()
            self.latency.observe(seconds)
            return
        if isinstance(outcome, Retry):
            self.outcomes.labels(outcome="retry").inc()
            self.failures.labels(reason=_closed(outcome.error.reason)).inc()
            return
        if isinstance(outcome, Failed):
            self.outcomes.labels(outcome="dead_lettered" if outcome.exhausted else "failed").inc()
            self.failures.labels(reason=_closed(outcome.event.reason)).inc()
            self.latency.observe(seconds)

    def invalid_event(self) -> None:
        self.outcomes.labels(outcome="dead_lettered").inc()
        self.failures.labels(reason="invalid_event").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _closed(reason: str) -> str:
    return reason if reason in REASONS else "other"


class MeteredInjector:
    """The injector with its outcomes and latency counted (a decorator, so the use case stays
    free of metrics)."""

    def __init__(self, inner: CredentialInjector, metrics: SandboxMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._inner.retry_policy

    async def handle(
        self, event: SandboxCreated, *, delivery: int = 1, body: bytes | None = None, copy_seq: int | None = None
    ) -> Outcome:
        started = time.perf_counter()
        self._metrics.consumed(subjects.SANDBOX_CREATED)
        outcome = await self._inner.handle(event, delivery=delivery, body=body, copy_seq=copy_seq)
        self._metrics.handled(outcome, time.perf_counter() - started)
        return outcome


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
