"""README.md's "Try it by hand", run as written: the first block must start the stack with the
OAuth stand-in (`make run STANDIN=1` = `ccbridge up --standin-oauth`), the second block runs
verbatim in bash against such a stack (free ports, a fresh directory standing in for a clone).
The test fails when the README drifts from what the code does."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccbridge import stackfile
from ccbridge.demo import claude_auth_status, find_claude
from ccbridge.embedded_nats import free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def by_hand_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Try it by hand", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def test_the_readme_starts_the_stack_with_the_standin() -> None:
    start, _steps = by_hand_blocks()
    assert start.split("#")[0].split() == ["make", "run", "STANDIN=1"]
    # a make of its own (not a sub-make of `make test`, which would print "Entering directory")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def last_command(*args: str) -> str:
        dry = subprocess.run(["make", "--no-print-directory", "-n", "run", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        return dry.stdout.strip().splitlines()[-1]

    assert last_command("STANDIN=1").endswith("ccbridge up --standin-oauth")
    assert last_command().endswith("ccbridge up")


def test_try_it_by_hand_runs_verbatim(tmp_path: Path) -> None:
    _start, steps = by_hand_blocks()
    clone = tmp_path / "clone"  # what the README's commands see: a checkout after `make run`
    (clone / ".venv" / "bin").mkdir(parents=True)
    shim = clone / ".venv" / "bin" / "ccbridge"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ccbridge.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NATS_", "CCBRIDGE_", "DATABASE_URL", "AUTH_", "OAUTH_", "VAULT_", "SANDBOX_"))}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "200"})

    log = tmp_path / "up.txt"
    with open(log, "wb") as out:  # the README's first block, on free ports (8000 may be taken here)
        up = subprocess.Popen([str(shim), "up", "--standin-oauth"], cwd=clone, stdout=out, stderr=subprocess.STDOUT,
                              env={**env, "AUTH_PORT": str(free_port())}, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while stackfile.read_live(clone / "var") is None:
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        banner = log.read_text()
        assert "STAND-IN" in banner and "NOT for real accounts" in banner

        done = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"README block failed:\n{done.stdout}\n{done.stderr}"
        assert '"status":"connected"' in done.stdout
        assert "ready" in done.stderr and "sbx-1" in done.stderr
        home = clone / "var" / "sandboxes" / "sbx-1"
        credentials = json.loads((home / ".claude" / ".credentials.json").read_text())
        assert credentials["claudeAiOauth"]["accessToken"] and "refreshToken" not in credentials["claudeAiOauth"]
        assert ".credentials.json" in done.stdout  # the block's last line lists the home
        if claude := find_claude():  # the real CLI reads the injected home as logged in
            assert claude_auth_status(claude, home).get("loggedIn") is True
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    assert up.returncode == 0, log.read_text()
