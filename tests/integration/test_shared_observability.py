"""Trace context crosses the bus in message headers; log redaction holds for our logs and for
third-party (stdlib) logs alike."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid

import nats
import pytest
import structlog
from faststream.nats import NatsMessage
from opentelemetry import trace

from shared.broker import make_broker, settle
from shared.logging import configure_logging, get_logger
from shared.settings import ServiceSettings

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


async def test_traceparent_travels_in_headers_and_the_consumer_continues_the_trace(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CCBRIDGE_TRACING", "on")
    subject = f"ccbridge-test.trace.{uuid.uuid4().hex}"
    settings = ServiceSettings(NATS_URL=nats_url)
    producer, consumer = make_broker(settings, name="auth"), make_broker(settings, name="vault")
    seen_headers: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
    consumer_trace: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @consumer.subscriber(subject)
    async def handle(body: dict, message: NatsMessage) -> None:
        consumer_trace.set_result(format(trace.get_current_span().get_span_context().trace_id, "032x"))

    async def spy(msg: nats.aio.msg.Msg) -> None:
        if not seen_headers.done():
            seen_headers.set_result(msg.headers or {})

    raw = await nats.connect(nats_url)
    await raw.subscribe(subject, cb=spy)
    await settle(raw)
    try:
        async with producer, consumer:
            await consumer.start()
            await producer.connect()
            # the consumer's SUB must reach the server before the publish (start() does not wait)
            await settle(consumer.connection)
            await producer.publish({"hello": "world"}, subject)
            headers = await asyncio.wait_for(seen_headers, 5)
            trace_id_in_consumer = await asyncio.wait_for(consumer_trace, 5)
    finally:
        await raw.close()
    match = TRACEPARENT.match(headers.get("traceparent", ""))
    assert match, headers
    assert match.group(1) == trace_id_in_consumer != "0" * 32


def test_redaction_covers_structlog_and_stdlib_logs(capsys: pytest.CaptureFixture[str]) -> None:
    secrets = {
        "access": "sk-ant-oat01-" + uuid.uuid4().hex,
        "refresh": "sk-ant-ort01-" + uuid.uuid4().hex,
        "bearer": uuid.uuid4().hex + uuid.uuid4().hex,
        "code": "opaque-" + uuid.uuid4().hex,
    }
    root_handlers = logging.getLogger().handlers[:]
    try:
        configure_logging("DEBUG", "json", service="test")
        log = get_logger("test.redaction")
        log.info("exchange.ok", access_token=secrets["access"], nested={"refresh_token": secrets["refresh"]}, user_id="u1")
        log.info("header", value=f"Bearer {secrets['bearer']}")
        log.info("callback", code=secrets["code"])
        logging.getLogger("some.library").warning("got %s back", secrets["access"])
        try:
            raise ValueError(f"bad token {secrets['refresh']}")
        except ValueError:
            log.exception("failure")
    finally:
        logging.getLogger().handlers[:] = root_handlers
        structlog.reset_defaults()
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == 5, err
    for value in secrets.values():
        assert value not in err
    assert err.count("[redacted]") >= 5
    assert lines[0]["user_id"] == "u1" and lines[0]["event"] == "exchange.ok"


@pytest.mark.parametrize(
    ("mode", "endpoint", "enabled"),
    [
        (None, None, False),  # default auto: nobody collects spans → no middleware
        (None, "http://127.0.0.1:4318", True),
        ("auto", "http://127.0.0.1:4318", True),
        ("on", None, True),
        ("off", "http://127.0.0.1:4318", False),
    ],
)
def test_tracing_is_on_by_default_only_when_an_exporter_is_configured(
    monkeypatch: pytest.MonkeyPatch, mode: str | None, endpoint: str | None, enabled: bool
) -> None:
    from shared.tracing import telemetry_middlewares, tracing_enabled

    for name, value in (("CCBRIDGE_TRACING", mode), ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert tracing_enabled() is enabled
    assert len(telemetry_middlewares("sandbox")) == int(enabled)
