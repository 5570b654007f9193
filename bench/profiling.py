"""Sampling profiles of live service processes with py-spy, summarised as plain numbers.

`py-spy record --format raw --threads` writes collapsed stacks ("thread;frame;frame count",
frame = "function (file:line)"), active samples only. From them we report:
- cpu_busy: samples of the main thread not waiting in epoll / (rate x seconds): near 1.0
  means the event loop is saturated (more work per message costs throughput directly);
- components: where the main thread's time goes (innermost frame that belongs to a known
  library or to ccbridge);
- top self functions (leaf frames) and top ccbridge functions (inclusive).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")

# Innermost match wins. Patterns are matched against the frame's file path.
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("crypto (HPKE / AES-GCM)", ("cryptography/", "shared/sealing.py", "services/vault/keyring.py")),
    ("pydantic (validate / dump)", ("pydantic/", "pydantic_core/", "pydantic_settings/")),
    ("SQLAlchemy + aiosqlite", ("sqlalchemy/", "aiosqlite/", "sqlite3/")),
    ("logging (structlog)", ("structlog/", "logging/", "shared/logging.py")),
    ("FastStream + fast_depends", ("faststream/", "fast_depends/", "anyio/")),
    ("nats-py client", ("nats/",)),
    ("json", ("json/",)),
    ("file I/O (sandbox writes)", ("services/sandbox/adapters/backends/",)),
    ("ccbridge code", ("services/", "shared/")),
    ("asyncio event loop", ("asyncio/", "selectors.py", "uvloop/")),
    ("threads (to_thread pool)", ("threading.py", "concurrent/futures/")),
)


def py_spy_binary() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def parse_frame(text: str) -> tuple[str, str]:
    match = FRAME.match(text.strip())
    if not match:
        return text.strip(), ""
    return match["func"], match["file"]


def component_of(frames: list[tuple[str, str]]) -> str:
    for _func, path in reversed(frames):
        for name, patterns in COMPONENTS:
            if any(p in path for p in patterns):
                return name
    return "other"


@dataclass
class Profile:
    name: str
    seconds: float
    rate: int
    samples_main: int = 0
    samples_idle: int = 0
    samples_other_threads: int = 0
    components: Counter[str] = field(default_factory=Counter)
    self_functions: Counter[str] = field(default_factory=Counter)
    ccbridge_inclusive: Counter[str] = field(default_factory=Counter)
    error: str | None = None

    @property
    def cpu_busy(self) -> float:
        expected = self.rate * self.seconds
        return round(self.samples_main / expected, 3) if expected else 0.0

    def summary(self, top: int = 12) -> dict[str, Any]:
        total = max(1, self.samples_main)

        def share(counter: Counter[str]) -> list[dict[str, Any]]:
            return [{"name": k, "share": round(v / total, 3)} for k, v in counter.most_common(top)]

        return {
            "service": self.name,
            "seconds": round(self.seconds, 2),
            "rate_hz": self.rate,
            "main_thread_samples": self.samples_main,
            "main_thread_idle_samples": self.samples_idle,
            "other_thread_samples": self.samples_other_threads,
            "cpu_busy_main_thread": self.cpu_busy,
            "components": share(self.components),
            "top_self": share(self.self_functions),
            "top_ccbridge_inclusive": share(self.ccbridge_inclusive),
            "error": self.error,
        }


def parse_collapsed(text: str, profile: Profile) -> Profile:
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        thread, frames_text = parts[0], parts[1:]
        frames = [parse_frame(f) for f in frames_text]
        if "MainThread" not in thread:
            profile.samples_other_threads += count
            continue
        if frames and frames[-1][0].endswith("Selector.select"):
            profile.samples_idle += count  # waiting in epoll: the event loop has nothing to do
            continue
        profile.samples_main += count
        profile.components[component_of(frames)] += count
        if frames:
            func, path = frames[-1]
            profile.self_functions[f"{func} ({path})"] += count
        seen: set[str] = set()
        for func, path in frames:
            if path.startswith(("services/", "shared/")):
                key = f"{func} ({path})"
                if key not in seen:
                    seen.add(key)
                    profile.ccbridge_inclusive[key] += count
    return profile


class Recorder:
    """`py-spy record` attached to one pid until `stop()` (SIGINT makes it write its file)."""

    def __init__(self, name: str, pid: int, out: Path, *, rate: int = 200) -> None:
        self.name, self.pid, self.out, self.rate = name, pid, out, rate
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.stopped = 0.0
        self.error: str | None = None

    def start(self) -> Recorder:
        binary = py_spy_binary()
        if binary is None:
            self.error = "py-spy not installed"
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
             "--threads", "--nonblocking", "--output", str(self.out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.started = time.monotonic()
        return self

    def stop(self) -> Profile:
        self.stopped = time.monotonic()
        profile = Profile(self.name, self.stopped - self.started, self.rate, error=self.error)
        if self.process is None:
            return profile
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.out.exists():
            profile.error = (err or b"").decode(errors="replace")[-300:] or "py-spy wrote nothing"
            return profile
        return parse_collapsed(self.out.read_text(errors="replace"), profile)
