"""`ccbridge up` as a person runs it, in a subprocess: the banner, `<data dir>/stack.json`, the
verbs and the Python client finding the stack through it, a clean stop, a stale file, and a
supervisor killed with SIGKILL taking its services and nats-server with it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccbridge import stackfile
from ccbridge.embedded_nats import free_port

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CCBRIDGE = [sys.executable, "-m", "ccbridge.cli"]


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NATS_", "CCBRIDGE_", "DATABASE_URL", "AUTH_", "VAULT_", "SANDBOX_", "OAUTH_"))}
    env.update({"PYTHONPATH": str(REPO), "CCBRIDGE_DATA_DIR": str(data), "COLUMNS": "250", **extra})
    return env


class Up:
    """`ccbridge up` in its own process group (so a test can reach every process it started)."""

    def __init__(self, data: Path, *args: str, **env: str) -> None:
        self.data = data
        self.log = data.parent / f"up-{time.monotonic_ns()}.txt"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([*CCBRIDGE, "up", *args], env=_env(data, **{"AUTH_PORT": str(free_port()), **env}),
                                         stdout=out, stderr=subprocess.STDOUT, cwd=data.parent,
                                         start_new_session=True)

    def wait_up(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ccbridge up exited {self.proc.returncode}:\n{self.output()}")
            doc = stackfile.read_live(self.data)
            if doc and doc.get("pid") == self.proc.pid:
                return doc
            time.sleep(0.2)
        raise AssertionError(f"ccbridge up did not come up:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` (Linux /proc)."""
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent and int(entry.name) not in found:
                found.add(int(entry.name))
                frontier.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "var"


def test_up_writes_stack_json_the_verbs_and_the_client_use_it(data: Path) -> None:
    up = Up(data)
    try:
        doc = up.wait_up()
        file = stackfile.path(data)
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert doc["pid"] == up.proc.pid and doc["format"] == 1
        assert doc["nats_url"].startswith("nats://ops:") and doc["nats_urls"]["platform"].startswith("nats://platform:")
        for key in ("auth_url", "vault_metrics_port", "sandbox_metrics_port", "database_url", "logs"):
            assert doc[key], key
        banner = up.output()
        password = re.search(r"nats://ops:([^@]+)@", doc["nats_url"]).group(1)
        assert password not in banner
        assert doc["auth_url"] in banner and str(file) in banner
        assert f":{doc['vault_metrics_port']}/metrics" in banner and f":{doc['sandbox_metrics_port']}/metrics" in banner

        env = _env(data)  # no NATS_URL, no CCBRIDGE_AUTH_URL: only stack.json says where the stack is
        shown = subprocess.run([*CCBRIDGE, "stack", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and password not in shown.stdout
        assert json.loads(shown.stdout)["auth_url"] == doc["auth_url"]
        # the platform's verb: a grant from auth (dev token minted from the data dir's secret), then NATS
        created = subprocess.run([*CCBRIDGE, "sandbox", "create", "--user", "nobody", "--sandbox-id", "sbx-1",
                                  "--json", "--timeout", "30"], env=env, capture_output=True, text=True, timeout=90)
        assert created.returncode == 1 and json.loads(created.stdout)["reason"] == "not_connected", created.stderr
        # an operator's verb, as the ops user
        listed = subprocess.run([*CCBRIDGE, "dlq", "list", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
        revoked = subprocess.run([*CCBRIDGE, "vault", "revoke", "--user", "nobody", "--wait", "20"], env=env,
                                 capture_output=True, text=True, timeout=90)
        assert revoked.returncode == 0, revoked.stderr
        assert "nothing was connected for nobody" in revoked.stderr and "shredded" not in revoked.stderr
        metrics = subprocess.run([sys.executable, "-c", "import sys, urllib.request as r; "
                                  f"print(r.urlopen('http://127.0.0.1:{doc['vault_metrics_port']}/readyz').status)"],
                                 capture_output=True, text=True, timeout=30)
        assert metrics.stdout.strip() == "200"
        # the Python client, constructed without a URL
        client = subprocess.run([sys.executable, "-c", (
            "import asyncio\nfrom ccbridge.client import CcbridgeClient\n"
            "async def main():\n"
            "    async with CcbridgeClient() as ccb:\n"
            "        print((await ccb.connection_status('nobody')).connected)\n"
            "asyncio.run(main())\n")], env=env, capture_output=True, text=True, timeout=60)
        assert client.returncode == 0 and client.stdout.strip() == "False", client.stderr
    finally:
        up.stop()
    assert up.proc.returncode == 0, up.output()
    assert not stackfile.path(data).exists()  # a clean stop removes it


def test_a_stale_stack_json_is_ignored(data: Path) -> None:
    other = subprocess.Popen(["sleep", "30"])  # alive, but not ccbridge: a reused pid
    try:
        stackfile.write(data, {"pid": other.pid, "auth_url": "http://127.0.0.1:1"})
        assert stackfile.read_live(data) is None or not sys.platform.startswith("linux")
    finally:
        other.kill()
        other.wait()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stackfile.write(data, {"pid": dead.pid, "nats_url": "nats://ops:secret@127.0.0.1:1",
                           "nats_urls": {"platform": "nats://platform:secret@127.0.0.1:1"},
                           "auth_url": "http://127.0.0.1:1"})
    assert stackfile.read_live(data) is None
    env = _env(data)
    shown = subprocess.run([*CCBRIDGE, "stack"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 3 and "no running `ccbridge up`" in shown.stderr
    os.environ.pop("NATS_URL", None)
    assert stackfile.nats_url("platform", data).source == "default"
    assert stackfile.auth_url(data).value == stackfile.DEFAULT_AUTH_URL


def test_a_second_up_on_a_running_data_dir_is_refused(data: Path) -> None:
    first = Up(data)
    try:
        first.wait_up()
        second = subprocess.run([*CCBRIDGE, "up"], env=_env(data, AUTH_PORT=str(free_port())), capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2 and f"pid {first.proc.pid}" in second.stderr
        assert stackfile.read_live(data)["pid"] == first.proc.pid
    finally:
        first.stop()


async def test_client_resolves_the_stack_from_the_data_dir(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ccbridge.client import CcbridgeClient

    up = Up(data)
    try:
        doc = await asyncio.to_thread(up.wait_up)
        monkeypatch.delenv("NATS_URL", raising=False)
        monkeypatch.setenv("CCBRIDGE_DATA_DIR", str(data))
        client = CcbridgeClient()
        assert client.nats_url == doc["nats_urls"]["platform"]
        async with client as ccb:
            assert (await ccb.connection_status("nobody")).connected is False
    finally:
        await asyncio.to_thread(up.stop)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_supervisor_takes_its_services_and_nats_server_with_it(data: Path) -> None:
    """SIGKILL leaves `ccbridge up` no chance to clean up: the kernel (PR_SET_PDEATHSIG) and each
    service's own parent watch must. Then a second `up` on the same data dir, same auth port,
    starts clean (no "address already in use", no second nats-server on the same store)."""
    auth_port = str(free_port())
    up = Up(data, AUTH_PORT=auth_port)
    children: set[int] = set()
    try:
        up.wait_up()
        children = _children(up.proc.pid)
        names = {Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in children}
        assert sum("services." in n for n in names) == 3 and any("nats-server" in n for n in names), names
        up.proc.kill()
        up.proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.2)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children if _alive(pid)}
        assert left == {}, left
    finally:  # whatever outlived the supervisor must not outlive the test
        if up.proc.poll() is None:
            up.proc.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert stackfile.read_live(data) is None  # its stack.json is stale now

    again = Up(data, AUTH_PORT=auth_port)
    try:
        doc = again.wait_up()
        assert doc["pid"] == again.proc.pid and doc["auth_url"].endswith(f":{auth_port}")
    finally:
        again.stop()
    assert again.proc.returncode == 0, again.output()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_services_stop_on_their_own_when_the_supervisor_is_gone(tmp_path: Path) -> None:
    """The portable half alone (macOS has no PR_SET_PDEATHSIG): services started without it still
    stop, cleanly, once their supervisor is gone — they watch CCBRIDGE_SUPERVISOR_PID."""
    script = (
        "import sys, time\n"
        "import ccbridge.stack as stack\n"
        "stack.die_with_parent = lambda *a, **k: None  # the services: their own parent watch only\n"
        "s = stack.Stack(sys.argv[1], services=('vault', 'sandbox'))\n"
        "s.start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = _env(tmp_path / "data")
    supervisor = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    children: set[int] = set()
    try:
        assert supervisor.stdout is not None
        for line in supervisor.stdout:
            if line.strip() == "ready":
                break
        else:
            raise AssertionError("the stack did not start")
        children = _children(supervisor.pid)
        services = {pid for pid in children if b"services." in Path(f"/proc/{pid}/cmdline").read_bytes()}
        assert len(services) == 2
        supervisor.kill()
        supervisor.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in services):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in services)
        logs = (tmp_path / "data" / "logs" / "vault.log").read_text()
        assert "the supervisor" in logs and "vault stopped" in logs  # a clean stop, not a kill
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
