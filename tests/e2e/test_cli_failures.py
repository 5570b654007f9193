"""The CLI when something is wrong: NATS or auth unreachable, bad input, nothing set up here.
Each verb fails within its timeout, in at most a few lines, with its documented exit code
(ccbridge/cli.py: 1 refused, 2 usage, 3 unreachable), never a traceback, never a password."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccbridge.embedded_nats import free_port

REPO = Path(__file__).resolve().parents[2]
CCBRIDGE = [sys.executable, "-m", "ccbridge.cli"]
SECRET = "p4ssw0rd-that-must-never-be-printed"
# Python's start and the CLI's imports on a busy 2-core machine: what a verb may take beyond its timeout.
SLACK_S = 6.0
GRANT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([*CCBRIDGE, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL)
    return done, time.monotonic() - started


def lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never says a word: a NATS that hangs (a half-dead host, a
    firewall that lets the SYN through). Only a bounded connect gets past it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def _env(tmp_path: Path, nats_port: int, auth_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CCBRIDGE_", "DATABASE_URL"))}
    env.update({
        "PYTHONPATH": str(REPO),
        "NATS_URL": f"nats://ops:{SECRET}@127.0.0.1:{nats_port}",
        "CCBRIDGE_AUTH_URL": f"http://127.0.0.1:{auth_port}",
        "CCBRIDGE_DATA_DIR": str(tmp_path / "data"),
        "AUTH_JWT_SECRET": "x" * 40,
        "COLUMNS": "200",
    })
    return env


VERBS = [  # (argv, its own timeout)
    (["sandbox", "create", "--user", "a", "--sandbox-id", "s1", "--timeout", "5"], 5.0),  # auth first
    (["sandbox", "create", "--user", "a", "--sandbox-id", "s1", "--timeout", "5", "--grant", GRANT], 5.0),  # NATS
    (["dlq", "list", "--timeout", "3"], 3.0),
    (["dlq", "replay", "1", "--timeout", "3"], 3.0),
    (["vault", "revoke", "--user", "a", "--timeout", "3"], 3.0),
    (["login", "--user", "a", "--no-browser"], 3.0),
]


@pytest.mark.parametrize("where", ["closed port", "silent server"])
def test_unreachable_nats_or_auth_fails_within_the_timeout_in_few_lines(
    tmp_path: Path, silent_server: int, where: str
) -> None:
    port = free_port() if where == "closed port" else silent_server
    env = _env(tmp_path, port, free_port())  # auth: always a closed port (an HTTP client's own timeout)
    for args, timeout in VERBS:
        done, took = run(args, env, tmp_path)
        output = lines(done)
        assert done.returncode == 3, (args, done.stdout, done.stderr)
        assert took <= timeout + SLACK_S, (args, took)
        assert 1 <= len(output) <= 3, (args, output)
        assert "Traceback" not in done.stderr and SECRET not in done.stdout + done.stderr, (args, output)
        assert "127.0.0.1:" in output[0], (args, output)  # the URL tried
        assert "ccbridge up" in " ".join(output) or "--auth-url" in " ".join(output), (args, output)  # a hint


def test_json_mode_reports_the_failure_as_one_object(tmp_path: Path) -> None:
    import json

    done, _ = run(["sandbox", "create", "--user", "a", "--sandbox-id", "s1", "--timeout", "3", "--json",
                   "--grant", GRANT], _env(tmp_path, free_port(), free_port()), tmp_path)
    assert done.returncode == 3
    doc = json.loads(done.stdout)
    assert doc["ok"] is False and doc["error"] == "unreachable" and SECRET not in done.stdout


BAD_INPUT = [
    ["sandbox", "create", "--user", "a", "--sandbox-id", "bad/id"],
    ["sandbox", "create", "--user", "a", "--sandbox-id", "../etc"],
    ["sandbox", "create", "--user", "a", "--sandbox-id", "s1", "--mode", "yolo"],
    ["sandbox", "create", "--user", "a", "--sandbox-id", "s1", "--backend", "docker"],
    ["sandbox", "create", "--user", "a", "--sandbox-id", "s1", "--timeout", "0"],
    ["sandbox", "create", "--user", "", "--sandbox-id", "s1"],
    ["sandbox", "create", "--sandbox-id", "s1"],
    ["connections", "list", "--state", "bogus"],
    ["dlq", "replay", "not-a-number"],
    ["no-such-verb"],
]


def test_bad_input_is_a_usage_error_before_anything_connects(tmp_path: Path, silent_server: int) -> None:
    # NATS and auth hang: a verb that tried to connect would take its whole timeout
    env = _env(tmp_path, silent_server, silent_server)
    for args in BAD_INPUT:
        done, took = run(args, env, tmp_path)
        output = lines(done)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert len(output) == 1, (args, output)
        assert "Traceback" not in output[0] and took < SLACK_S, (args, took, output)


def test_help_shows_plain_flags(tmp_path: Path) -> None:
    """No `--no-no-browser`, no `--no-json`, no `<bool>` type after a flag, in any verb's help."""
    import typer.main

    from ccbridge.cli import app

    def paths(command, prefix):
        yield prefix
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from paths(sub, [*prefix, name])

    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "TERM": "dumb"}
    for path in paths(typer.main.get_command(app), []):
        done, _ = run([*path, "--help"], env, tmp_path)
        assert done.returncode == 0, (path, done.stderr)
        text = done.stdout
        assert "<bool>" not in text and "--no-no-" not in text and "--no-json" not in text, (path, text)
    login_help, _ = run(["login", "--help"], env, tmp_path)
    assert "--no-browser" in login_help.stdout
    top, _ = run(["--help"], env, tmp_path)
    assert "Exit codes: 0 done, 1 refused" in " ".join(top.stdout.split())


def test_operator_commands_outside_a_data_dir_create_nothing(tmp_path: Path) -> None:
    """Run where no stack ever ran (no ./var): a clear line, exit 2, and no key file, no empty
    database left behind. `keys init` and `vault migrate` are the explicit ways to create them."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "CCBRIDGE_", "DATABASE_URL", "VAULT_"))}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "200"})
    for args in (["connections", "list"], ["keys", "list"], ["keys", "rotate"], ["keys", "rewrap"],
                 ["keys", "retire", "kek-x"], ["vault", "revoke", "--user", "a", "--wait", "5"],
                 ["connections", "list", "--json"]):
        done, took = run(args, env, cwd)
        output = lines(done)
        assert done.returncode == 2, (args, output)
        assert len(output) == 1 and ("no vault keys" in output[0] or "no vault database" in output[0]
                                     or '"error": "no_' in output[0]), (args, output)
        assert list(cwd.iterdir()) == [], (args, list(cwd.rglob("*")))

    created, _ = run(["keys", "init"], env, cwd)
    assert created.returncode == 0, created.stderr
    keys = cwd / "var" / "keys"
    assert {p.name for p in keys.iterdir()} >= {"vault-kek.json", "vault.hpke.key", "sandbox.hpke.key", "auth.grant.key"}
    assert all((p.stat().st_mode & 0o077) == 0 for p in keys.iterdir() if p.name.endswith((".key", ".json")))
    before = (keys / "vault-kek.json").read_text()
    again, _ = run(["keys", "init", "--json"], env, cwd)
    assert again.returncode == 0 and '"created": true' not in again.stdout
    assert (keys / "vault-kek.json").read_text() == before  # never replaced

    no_db, _ = run(["connections", "list"], env, cwd)
    assert no_db.returncode == 2 and "no vault database" in no_db.stderr and not (cwd / "var" / "vault.db").exists()
    migrated, _ = run(["vault", "migrate", "--json"], env, cwd)
    assert migrated.returncode == 0, migrated.stderr
    listed, _ = run(["connections", "list", "--json"], env, cwd)
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed.stderr
    status, _ = run(["keys", "list", "--json"], env, cwd)
    assert status.returncode == 0 and '"active"' in status.stdout
