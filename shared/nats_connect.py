"""A NATS connection whose first connect is bounded: it succeeds or fails within `timeout`,
quietly, with one sentence saying why.

nats-py's defaults suit a long-running service, not a command or a client call that promised a
timeout: an unreachable server is retried 60 times 2 s apart (two minutes), and its default error
callback logs each failed attempt with a traceback. Here the first connect makes at most a few
attempts, each bounded, the whole bounded by `timeout`; errors meanwhile are only collected
(DEBUG). Once connected, the connection reconnects as usual (`reconnect_attempts`) and reports
trouble in one WARNING line, without a traceback.

Used by ccbridge's CLI verbs, `ccbridge.client.CcbridgeClient` and the vault's operator tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from shared.settings import nats_servers, redact_url

log = logging.getLogger("ccbridge.nats")


class BusUnreachable(ConnectionError):
    """The first connect to NATS failed or did not finish in time. The message names the URL
    (redacted: never a password) and the last reason."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = redact_url(url)
        self.reason = reason
        super().__init__(f"cannot reach NATS at {self.url}: {reason}")


def describe_error(exc: BaseException | None, timeout: float | None = None) -> str:
    """A short, secret-free reason for a failed connect."""
    if exc is None or isinstance(exc, (asyncio.TimeoutError, nats.errors.TimeoutError)):
        return f"no answer within {timeout:g} s" if timeout else "no answer in time"
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization" in str(exc).lower():
        return "authorization failed (wrong NATS user or password)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, OSError):
        return (exc.strerror or type(exc).__name__).lower()
    if isinstance(exc, nats.errors.NoServersError):
        return "no server answered"
    text = str(exc).strip()
    return text[:160] if text and "://" not in text else type(exc).__name__


async def connect(
    url: str,
    *,
    timeout: float = 5.0,
    name: str | None = None,
    inbox_prefix: str | None = None,
    reconnect_attempts: int = 60,
    **options: Any,
) -> NatsClient:
    """Connect to `url` (one server or a comma-separated list) within `timeout` seconds, or raise
    `BusUnreachable`. `reconnect_attempts` applies once connected (nats-py's meaning; -1: forever)."""
    failures: list[BaseException] = []
    connected = False

    async def on_error(exc: Exception) -> None:
        if connected:
            log.warning("nats: %s (%s)", describe_error(exc), redact_url(url))
        else:
            failures.append(exc)
            log.debug("nats: connect attempt failed: %s", describe_error(exc))

    nc = NatsClient()
    kwargs: dict[str, Any] = {
        "servers": nats_servers(url),
        "connect_timeout": max(0.2, min(2.0, timeout / 2)),
        # The first connect: each server at most twice (nats-py drops a server after more than
        # `max_reconnect_attempts` failures; 0 would mean "never drop it").
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": min(0.5, max(0.05, timeout / 10)),
        "error_cb": on_error,
        **options,
    }
    if name:
        kwargs["name"] = name
    if inbox_prefix:
        kwargs["inbox_prefix"] = inbox_prefix
    try:
        await asyncio.wait_for(nc.connect(**kwargs), timeout)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        cause = failures[-1] if failures else exc  # the last attempt's own reason says most
        raise BusUnreachable(url, describe_error(cause, timeout)) from None
    connected = True
    nc.options["max_reconnect_attempts"] = reconnect_attempts
    return nc


__all__ = ["BusUnreachable", "connect", "describe_error"]
