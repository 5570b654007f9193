"""A small HTTP server next to the bus for services without an HTTP API of their own (vault,
sandbox): `/metrics` (Prometheus), `/healthz` (the process is up), `/readyz` (the service's own
checks: database, NATS, …). Each service sets its host and port (`<SERVICE>_METRICS_HOST/PORT`).

A plain ASGI callable served by uvicorn (already a dependency): no framework for three routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST

from shared.logging import get_logger

log = get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]
MetricsRenderer = Callable[[], bytes]


def build_app(render_metrics: MetricsRenderer, readiness: ReadinessCheck) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        status, ctype, body = 404, "application/json", b'{"error":"not_found"}'
        if method not in ("GET", "HEAD"):
            status, body = 405, b'{"error":"method_not_allowed"}'
        elif path == "/metrics":
            status, ctype, body = 200, CONTENT_TYPE_LATEST, render_metrics()
        elif path == "/healthz":
            status, body = 200, b'{"status":"ok"}'
        elif path == "/readyz":
            try:
                checks = await asyncio.wait_for(readiness(), timeout=3.0)
            except Exception:  # noqa: BLE001 - a failing check is "not ready", never a 500
                checks = {"checks": False}
            ready = all(checks.values())
            status = 200 if ready else 503
            body = json.dumps({"status": "ready" if ready else "not_ready", **checks}).encode()
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype.encode()), (b"cache-control", b"no-store")],
        })
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A non-blocking listening-ready socket for uvicorn (port 0 = a free one): binding it
    ourselves lets the caller learn the real port and fail fast on a taken one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class EmbeddedServer(uvicorn.Server):
    """uvicorn as a task of the running loop, without its own signal handling (the program it
    runs in owns the signals): `await launch(sock, name)`, later `await finish()`."""

    task: asyncio.Task[None] | None = None

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]  # any CM will do
        return contextlib.nullcontext()

    async def launch(self, sock: socket.socket, name: str) -> None:
        """Serve on `sock`; returns once it accepts connections (raises what stopped it, if it did)."""
        self.task = asyncio.create_task(self.serve(sockets=[sock]), name=name)
        while not self.started:
            if self.task.done():
                sock.close()
                self.task.result()
                raise RuntimeError(f"{name} stopped during start")
            await asyncio.sleep(0.01)

    async def finish(self, timeout_s: float = 5.0) -> None:
        """Let it finish the requests in flight; force it after `timeout_s`. Waits for its task;
        an error the server ended with is raised."""
        task, self.task = self.task, None
        if task is None:
            return
        self.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=timeout_s)
        except TimeoutError:
            self.force_exit = True
            with contextlib.suppress(Exception):
                await task


class HealthServer:
    def __init__(self, host: str, port: int, render_metrics: MetricsRenderer, readiness: ReadinessCheck,
                 *, name: str = "service") -> None:
        self.host = host
        self.port = port
        self.name = name
        self._app = build_app(render_metrics, readiness)
        self._server: EmbeddedServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off")
        self._server = EmbeddedServer(config)
        await self._server.launch(sock, f"{self.name}-metrics")

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.finish()


async def start_health(stack: contextlib.AsyncExitStack, settings: Any, render_metrics: MetricsRenderer,
                       readiness: ReadinessCheck, name: str) -> HealthServer | None:
    """Start the health server on `settings.metrics_host`/`metrics_port`, stopped with the
    service. A port that cannot be opened is logged, not fatal: metrics must not take the
    service's real work down with them."""
    health = HealthServer(settings.metrics_host, settings.metrics_port, render_metrics, readiness, name=name)
    try:
        await health.start()
    except OSError as exc:
        log.error("metrics server not started", service=name, host=settings.metrics_host,
                  port=settings.metrics_port, error=exc.strerror or type(exc).__name__)
        return None
    stack.push_async_callback(health.stop)
    return health
