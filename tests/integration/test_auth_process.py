"""`python -m services.auth` as a process, as `ccbridge up` runs it: a taken port is one clear
line and exit code 3 (no traceback); a healthy start, probed the way the stack probes it (GET
/readyz until 200), logs nothing at warning or error."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx

from ccbridge.embedded_nats import free_port
from services.auth.app import EXIT_CANNOT_LISTEN
from shared.sealing import load_or_create_keypair
from tests.auth_fixtures import REPO, AuthProcess, clean_env


def test_a_taken_port_is_one_clear_line_and_exit_3(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = clean_env(AUTH_PORT=str(port), CCBRIDGE_DATA_DIR=str(tmp_path), NATS_URL="nats://127.0.0.1:1")
        done = subprocess.run([sys.executable, "-m", "services.auth"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == EXIT_CANNOT_LISTEN == 3
    assert done.stderr == f"auth: cannot listen on 127.0.0.1:{port}: address already in use (set AUTH_PORT)\n"
    assert done.stdout == ""


def test_an_address_not_on_this_host_names_auth_host(tmp_path: Path) -> None:
    env = clean_env(AUTH_HOST="192.0.2.1", AUTH_PORT="0", CCBRIDGE_DATA_DIR=str(tmp_path),
                    NATS_URL="nats://127.0.0.1:1")
    done = subprocess.run([sys.executable, "-m", "services.auth"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr.strip().endswith("(set AUTH_HOST)") and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_a_healthy_start_logs_no_warning_and_no_probe(nats_url: str, tmp_path: Path) -> None:
    """The stack's wait_ready GETs /readyz (503 while starting, then 200): none of that is
    logged at INFO or above, and a development start (dev secret, loopback) is not a warning."""
    load_or_create_keypair(tmp_path / "keys", "vault")
    env = clean_env(NATS_URL=nats_url, CCBRIDGE_DATA_DIR=str(tmp_path), AUTH_PORT=str(free_port()),
                    LOG_FORMAT="json", LOG_LEVEL="INFO")
    with AuthProcess(env, tmp_path / "auth.log") as auth:
        for _ in range(3):
            assert httpx.get(f"{auth.base_url}/readyz").status_code == 200
            assert httpx.get(f"{auth.base_url}/healthz").status_code == 200
        assert httpx.get(f"{auth.base_url}/v1/claude-code/status").status_code == 401  # a real refusal
    lines = auth.lines()
    events = [line.get("event", "") for line in lines]
    assert "auth service listening" in events
    loud = [line for line in lines if line.get("level") in ("warning", "error", "critical")]
    assert loud == []
    assert not [e for e in events if "/readyz" in e or "/healthz" in e]
    assert [e for e in events if "/v1/claude-code/status" in e]  # ordinary requests are still logged
    dev = next(line for line in lines if line.get("event", "").startswith("AUTH_JWT_SECRET is not set"))
    assert dev["level"] == "info"
