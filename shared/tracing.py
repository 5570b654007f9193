"""OpenTelemetry trace context across the bus.

FastStream's `NatsTelemetryMiddleware` writes W3C `traceparent` into the headers of every message
a service publishes and continues the trace in the consumer, so one login or one sandbox can be
followed auth → vault → sandbox. Spans are exported only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
and the optional exporter is installed (`pip install 'ccbridge[otlp]'`); otherwise they stay in
process (the context still propagates).

`CCBRIDGE_TRACING`: `auto` (default) turns the middleware on only when an exporter endpoint is
set — spans nobody collects cost ~10 % of a message's CPU (docs/performance.md); `on` always
(propagate a platform's trace context without exporting); `off` never.
"""

from __future__ import annotations

import os
from functools import cache

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from shared.logging import get_logger

log = get_logger(__name__)


def tracing_enabled() -> bool:
    mode = os.environ.get("CCBRIDGE_TRACING", "auto").strip().lower()
    if mode in {"", "auto"}:
        return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return mode not in {"0", "off", "false", "no"}


@cache
def tracer_provider(service: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": f"ccbridge-{service}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("tracing.exporter_missing", hint="pip install 'ccbridge[otlp]'")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def telemetry_middlewares(service: str) -> tuple:
    if not tracing_enabled():
        return ()
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware

    return (NatsTelemetryMiddleware(tracer_provider=tracer_provider(service), include_messages_counters=False),)
