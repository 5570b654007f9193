"""Console logs of the auth service: uvicorn's `color_message` extra is dropped (shared.logging)."""

from __future__ import annotations

import logging

import pytest
import structlog

from shared.logging import configure_logging


@pytest.fixture
def formatter():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, structlog.get_config(), logging.getLogger("httpx").level)
    configure_logging("INFO", "console", service="auth")
    yield root.handlers[0].formatter
    root.handlers[:], level, config, httpx_level = saved
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)
    structlog.configure(**config)
    structlog.contextvars.unbind_contextvars("service")


def test_uvicorn_color_message_is_dropped(formatter) -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (42,), None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    line = formatter.format(record)
    assert "Started server process [42]" in line
    assert "color_message" not in line and "\x1b[36m" not in line
