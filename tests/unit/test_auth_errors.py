"""Problem details are plain text: a person reads them (the connect page shows them as they are),
so no Markdown — above all no backticks — in any `detail` the auth service can send."""

from __future__ import annotations

import ast
from pathlib import Path

import services.auth
from services.auth import errors, problems

AUTH_DIR = Path(services.auth.__file__).resolve().parent


def _error_classes() -> list[type[errors.AuthError]]:
    found, todo = [], [errors.AuthError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_default_details_are_plain_text() -> None:
    classes = _error_classes()
    assert len(classes) > 15
    for cls in classes:
        assert "`" not in cls.default_detail, cls.__name__


def test_details_raised_in_the_code_are_plain_text() -> None:
    """Every string literal (or f-string part) handed to an AuthError subclass in services/auth."""
    names = {cls.__name__ for cls in _error_classes()}
    offenders = []
    checked = 0
    for path in sorted(AUTH_DIR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names):
                continue
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg == "detail")]:
                for part in ast.walk(arg):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        checked += 1
                        if "`" in part.value:
                            offenders.append(f"{path.name}:{node.lineno}: {part.value!r}")
    assert checked > 20
    assert offenders == []


# --- draining a refused body ------------------------------------------------------------------
def _receiver(messages: list[dict], *, then_wait: bool = False):
    import asyncio

    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    return receive


async def test_drain_reads_a_body_to_its_end() -> None:
    chunks = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}] * 5
    receive = _receiver([*chunks, {"type": "http.request", "body": b"", "more_body": False}])
    assert await problems.drain(receive) is True


async def test_drain_gives_up_past_its_bounds() -> None:
    endless = [{"type": "http.request", "body": b"x" * 1000, "more_body": True}] * 50
    assert await problems.drain(_receiver(endless), max_bytes=10_000) is False  # too much
    assert await problems.drain(_receiver(endless[:2], then_wait=True), max_seconds=0.05) is False  # too slow
    assert await problems.drain(_receiver(endless[:2])) is False  # the client went away


async def test_a_client_expecting_100_continue_is_answered_without_reading() -> None:
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        raise AssertionError("the app must not run")

    async def receive() -> dict:
        raise AssertionError("nothing may be read: the client waits for 100 Continue")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/v1/claude-code/exchange",
             "headers": [(b"content-length", b"200000"), (b"expect", b"100-continue")]}
    await problems.BodyLimitMiddleware(app, limit=1024)(scope, receive, send)
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]


def test_the_error_tree_and_the_domain_need_no_web_framework() -> None:
    """Rendering is the HTTP layer's (services/auth/problems.py): the domain stays pure."""
    import subprocess
    import sys

    code = ("import sys, services.auth.domain, services.auth.errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
