"""A healthy start is quiet: no service logs a warning or an error, no traceback, no noise.

Three things used to make noise at every start: FastStream's pull loop died on nats-py's bare
`asyncio.TimeoutError` (an ERROR with a traceback, plus an INFO "callback for Task-N is being
executed..." per restart), and the stack's readiness probe sent `{}` to vault.credentials.get,
which the vault logged as a rejected request dozens of times."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack

pytestmark = pytest.mark.e2e

# nats-server's one intentional warning: the embedded server reads plain-text passwords from its
# environment (docs/operations.md, "Known limits"); production may give it bcrypt hashes instead.
ALLOWED_NATS_WARNINGS = ("Plaintext passwords detected",)


def _service_problems(path: Path) -> list[str]:
    problems = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"not a log record (a traceback?): {line[:200]}")
            continue
        if entry.get("level") in ("warning", "error", "critical", "exception"):
            problems.append(line[:300])
        elif "credentials request rejected" in entry.get("event", ""):
            problems.append(f"the readiness probe reached the vault: {line[:200]}")
        elif entry.get("level") == "info" and "is being executed" in entry.get("event", ""):
            problems.append(f"task supervisor chatter: {line[:200]}")
    return problems


async def test_a_healthy_start_logs_no_warning_and_no_traceback(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "data", env={"LOG_FORMAT": "json"}, auth_port=free_port())
    async with stack:
        # several pull timeouts of every consumer (the sandbox fetches for 1 s, the vault for 2 s)
        await asyncio.sleep(5)
        stack.check_alive()
    problems = {name: _service_problems(stack.log_dir / f"{name}.log") for name in ("vault", "sandbox", "auth")}
    assert problems == {"vault": [], "sandbox": [], "auth": []}
    for name in ("vault", "sandbox", "auth"):
        assert (stack.log_dir / f"{name}.log").read_text().strip(), f"{name} logged nothing at all"
    nats_log = (stack.log_dir / "nats-server.log").read_text().splitlines()
    loud = [line for line in nats_log if ("[WRN]" in line or "[ERR]" in line or "[FTL]" in line)
            and not any(allowed in line for allowed in ALLOWED_NATS_WARNINGS)]
    assert loud == []
