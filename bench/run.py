"""One benchmark run: the raw NATS limit, then the real services, then HPKE, then a profile.

All on an embedded nats-server this run starts on a free loopback port (file store in a
temporary directory), with the vault and sandbox services as separate processes
(ccbridge.stack.Stack), SQLite, and the local sandbox backend.

Throughput figures are drain rates: a backlog of N messages is published while the consumer
is stopped, then the consumer starts and we time first result → last result (process start
and warm-up excluded, the publisher not competing for the CPU). Raw and pipeline are
measured the same way, so their ratio compares like with like.
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from pydantic_settings import BaseSettings, SettingsConfigDict

from bench import common, profiling, raw, soak
from ccbridge.embedded_nats import EmbeddedNats
from ccbridge.stack import Stack
from shared import subjects
from shared.events import SandboxCreated, TokenBundle
from shared.sealing import KeyPair, open_sealed, seal

PIPELINE = ("vault", "sandbox")
"""The processes measured; auth only issues the grants, in the setup."""

TARGETS = {  # issue 16
    "pipeline_ratio_min": 0.2,
    "tokens_ratio_min": 0.1,
    "p99_ms_at_200_max": 15.0,
    "light_p50_ms_max": 5.0,
    "rss_mb_max": 120.0,
}


class BenchConfig(BaseSettings):
    """What one `make bench` run measures; each field from BENCH_<NAME> (e.g. BENCH_RAW_EVENTS)."""

    model_config = SettingsConfigDict(env_prefix="BENCH_", extra="ignore")

    raw_events: int = 3000
    pipeline_events: int = 1500
    tokens_events: int = 600
    users: int = 50
    rate: float = 200.0
    rate_seconds: float = 3.0
    light_rate: float = 20.0
    saturation_events: int = 600
    inflight: int = 16
    profile_events: int = 800
    profile: bool = True
    hpke_seconds: float = 1.0
    batch: int = 8
    log_level: str = "INFO"
    soak_seconds: float = 30.0
    soak_rate: float = 80.0
    e2b_injections: int = 20
    workdir: Path | None = None
    keep: bool = False


def log(text: str) -> None:
    print(f"  · {text}", file=sys.stderr, flush=True)


# --- (a) raw limit ---------------------------------------------------------------------------
async def measure_raw(nc: nats.NATS, url: str, cfg: BenchConfig, payload: bytes,
                      server_pids: dict[str, int]) -> dict[str, Any]:
    """`payload`: a real `sandbox.created` (with its grant from auth), so raw and pipeline move
    the same bytes; fetch batch and in-flight limit = the sandbox service's SANDBOX_CONCURRENCY."""
    js = nc.jetstream()
    await raw.ensure_stream(js)
    arrivals: list[float] = []

    async def on_out(_msg: Any) -> None:
        arrivals.append(time.perf_counter())

    sub = await nc.subscribe(raw.SUBJECT_OUT, cb=on_out)
    sem = asyncio.Semaphore(256)

    async def put(i: int) -> None:
        async with sem:
            await js.publish(raw.SUBJECT_IN, payload, headers={"Nats-Msg-Id": f"raw-{i}"}, stream=raw.STREAM)

    await asyncio.gather(*(put(i) for i in range(cfg.raw_events)))
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.raw", "--url", url, "--count", str(cfg.raw_events), "--batch", str(cfg.batch),
        "--in-flight", str(cfg.batch),
        stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parent.parent),
    )
    cpu = CpuMeter({"raw-worker": worker.pid, **server_pids}).start()
    samples: list[float] = []
    last: dict[str, float] = {}
    while worker.returncode is None:  # the worker's CPU, read just before it exits
        sample = cpu.stop(cfg.raw_events)
        if "raw-worker" in sample:
            samples.append(sample["raw-worker"])
            last = sample
        try:
            await asyncio.wait_for(worker.wait(), 0.1)
        except TimeoutError:
            pass
    out = await worker.stdout.read() if worker.stdout else b""
    await nc.flush()
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    await js.delete_stream(raw.STREAM)
    rate = _drain_rate(arrivals)
    return {"events": cfg.raw_events, "batch": cfg.batch, "in_flight": cfg.batch, "publish": "async (PubAcks gathered)",
            "payload_bytes": len(payload), "msg_per_s": rate,
            "worker_reported_msg_per_s": float(out.decode().strip() or 0),
            "cpu_ms_per_msg": last if samples else {}}


def _drain_rate(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    times = sorted(times)
    return round((len(times) - 1) / (times[-1] - times[0]), 1)


# --- grants (setup) ----------------------------------------------------------------------------
async def granted_events(stack: Stack, js: Any, cfg: BenchConfig, users: list[str]) -> dict[str, list[SandboxCreated]]:
    """Every `sandbox.created` the timed sections publish, each a fresh sandbox with its grant
    from auth, asked for (and recorded by the vault) before anything is timed: grants are setup,
    not what the bench measures."""
    counts = {
        "pipeline": cfg.pipeline_events,
        "fixed": int(cfg.rate * cfg.rate_seconds),
        "light": int(cfg.light_rate * cfg.rate_seconds),
        "saturation": cfg.saturation_events,
        "profile": cfg.profile_events if cfg.profile else 0,
    }
    async with common.Grants.of(stack) as grants:
        planned = {name: await grants.events([(users[i % len(users)], common.uid("sbx")) for i in range(n)])
                   for name, n in counts.items()}
    await common.wait_grants_recorded(js)
    return planned


# --- (c) tokens.issued → persisted ------------------------------------------------------------
async def measure_tokens(stack: Stack, server: EmbeddedNats, js: Any, cfg: BenchConfig,
                         users: list[str]) -> dict[str, Any]:
    data_dir = stack.data_dir
    db = common.db_path(data_dir)
    vault = common.vault_recipient(data_dir)
    stack.kill("vault", signal.SIGTERM)
    events = [common.tokens_issued(vault, users[i % len(users)] if i < len(users) else common.uid("user"))
              for i in range(cfg.tokens_events)]
    ids = {e.event_id for e in events}
    await common.publish_many(js, [(subjects.TOKENS_ISSUED, e) for e in events])
    stack.start_service("vault")
    deadline = time.monotonic() + 300
    cpu: CpuMeter | None = None
    at_start = 0
    while time.monotonic() < deadline:
        stack.check_alive()
        stored = _stored(db, ids)
        if stored >= len(ids):
            break
        if cpu is None and stored:  # the vault is up and consuming: start counting CPU
            cpu, at_start = CpuMeter(process_pids(stack, server)).start(), stored
        await asyncio.sleep(0.05 if cpu is None else 0.2)
    cpu_ms = cpu.stop(len(ids) - at_start) if cpu else {}
    times = _stored_times(db, ids)
    # a batch's events share their transaction's timestamp: count what was stored after the first one
    span = (times[-1] - times[0]).total_seconds() if len(times) > 1 else 0.0
    rate = sum(1 for t in times if t > times[0]) / span if span > 0 else 0.0
    await _wait_vault_ready(stack)
    return {"events": cfg.tokens_events, "persisted": len(times), "msg_per_s": round(rate, 1),
            "transactions": len(set(times)),
            "connections_rows": common.count_rows(db, "connections"),
            "cpu_ms_per_msg": cpu_ms}


def _stored(db: Path, ids: set[str]) -> int:
    return len(_stored_times(db, ids))


def _stored_times(db: Path, ids: set[str]) -> list[Any]:
    import sqlite3
    from datetime import datetime

    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
            rows = conn.execute("SELECT event_id, processed_at FROM processed_events").fetchall()
    except sqlite3.OperationalError:
        return []
    return sorted(datetime.fromisoformat(str(at)) for eid, at in rows if eid in ids)


async def _wait_vault_ready(stack: Stack, timeout: float = 60) -> None:
    assert stack.nats_url is not None, "the stack is started"
    nc = await nats.connect(stack.nats_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await nc.request(subjects.VAULT_CREDENTIALS_GET, b"{}", timeout=0.5)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


# --- (b) sandbox.created → injected ------------------------------------------------------------
async def measure_pipeline(stack: Stack, server: EmbeddedNats, js: Any, watcher: common.ResultWatcher,
                           cfg: BenchConfig, events: list[SandboxCreated]) -> dict[str, Any]:
    stack.kill("sandbox", signal.SIGTERM)
    causes = [e.event_id for e in events]
    await common.publish_many(js, [(subjects.SANDBOX_CREATED, e) for e in events])
    stack.start_service("sandbox")
    await watcher.wait_settled(causes[:1], timeout=120)  # the sandbox service is up and consuming
    cpu = CpuMeter(process_pids(stack, server)).start()
    settled = await watcher.wait_settled(causes, timeout=600)
    cpu_ms = cpu.stop(len(causes) - 1)
    stack.check_alive()
    injected = [watcher.first_injected_at(c) for c in causes]
    times = [t for t in injected if t is not None]
    failed = settled - len(times)
    ok_files = sum(
        1 for e in events[:: max(1, len(events) // 50)]
        if common.credentials_token(stack.data_dir, e.sandbox_id) == common.access_token_for(e.user_id)
    )
    return {"events": cfg.pipeline_events, "injected": len(times), "failed": failed,
            "msg_per_s": _drain_rate(times), "credentials_files_checked_ok": ok_files, "cpu_ms_per_msg": cpu_ms}


# --- (d) latency ----------------------------------------------------------------------------
async def measure_fixed_rate(js: Any, watcher: common.ResultWatcher, events: list[SandboxCreated],
                             rate: float) -> dict[str, Any]:
    total = len(events)
    warmup = min(50, total // 10)
    sent: dict[str, float] = {}
    tasks: list[asyncio.Task[Any]] = []
    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        event = events[i]
        sent[event.event_id] = time.perf_counter()
        tasks.append(asyncio.create_task(common.publish(js, subjects.SANDBOX_CREATED, event)))
    offered = total / (time.perf_counter() - start)
    await asyncio.gather(*tasks)
    causes = list(sent)
    await watcher.wait_settled(causes, timeout=300)
    latencies = []
    for cause in causes[warmup:]:
        at = watcher.first_injected_at(cause)
        if at is not None:
            latencies.append((at - sent[cause]) * 1000)
    return _latency_summary(latencies, offered_rate=round(offered, 1), events=len(causes) - warmup)


async def measure_saturation(js: Any, watcher: common.ResultWatcher, cfg: BenchConfig,
                             events: list[SandboxCreated]) -> dict[str, Any]:
    """Closed loop: `inflight` publishers, each sends one event, waits for its result, repeats.
    With inflight ≥ 2 x SANDBOX_CONCURRENCY the service never waits for work."""
    latencies: list[float] = []
    remaining = len(events)
    lock = asyncio.Lock()

    async def worker(k: int) -> None:
        nonlocal remaining
        while True:
            async with lock:
                if remaining <= 0:
                    return
                remaining -= 1
                i = remaining
            event = events[i]
            future = watcher.expect(event.event_id)
            t0 = time.perf_counter()
            await common.publish(js, subjects.SANDBOX_CREATED, event)
            result = await asyncio.wait_for(future, 60)
            if result.subject == subjects.SANDBOX_CREDENTIALS_INJECTED:
                latencies.append((result.at - t0) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(cfg.inflight)))
    elapsed = time.perf_counter() - start
    return _latency_summary(latencies, offered_rate=round(len(events) / elapsed, 1),
                            events=len(events), inflight=cfg.inflight)


def _latency_summary(latencies: list[float], **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "measured": len(latencies),
        "p50_ms": round(common.percentile(latencies, 50), 2),
        "p90_ms": round(common.percentile(latencies, 90), 2),
        "p99_ms": round(common.percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2) if latencies else None,
        "histogram_ms": sorted(round(v, 2) for v in latencies),
    }


# --- CPU per message -----------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds (user + system) each process spent between `start()` and `stop(n)`, per message:
    on a 2-core machine the sum over processes bounds the throughput (2 / sum)."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        import psutil

        out = {}
        for name, proc in self._procs.items():
            try:
                times = proc.cpu_times()
                out[name] = times.user + times.system
            except psutil.Error:
                continue
        return out

    def start(self) -> CpuMeter:
        self._before = self._now()
        return self

    def stop(self, messages: int) -> dict[str, float]:
        after = self._now()
        per = {name: round((after[name] - self._before.get(name, 0.0)) * 1000 / max(1, messages), 3)
               for name in after}
        per["total"] = round(sum(per.values()), 3)
        return per


def process_pids(stack: Stack, server: EmbeddedNats) -> dict[str, int]:
    pids = {name: svc.process.pid for name, svc in stack.processes.items() if name in PIPELINE}
    if server.process is not None:
        pids["nats-server"] = server.process.pid
    pids["harness"] = os.getpid()
    return pids


# --- (e) RSS -------------------------------------------------------------------------------------
class RssSampler:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.peak: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, float]:
        now: dict[str, float] = {}
        for name, svc in self.stack.processes.items():
            if name not in PIPELINE:
                continue
            value = common.rss_mb(svc.process.pid)
            if value is not None:
                now[name] = round(value, 1)
                self.peak[name] = max(self.peak.get(name, 0.0), now[name])
        return now

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.25)

    def start(self) -> RssSampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# --- (f) HPKE ------------------------------------------------------------------------------------
def measure_hpke(seconds: float) -> dict[str, Any]:
    key = KeyPair.generate()
    recipient = key.recipient
    bundle = TokenBundle(
        access_token="sk-ant-oat01-" + "a" * 108,
        refresh_token="sk-ant-ort01-" + "b" * 108,
        expires_at=1_893_456_000_000,
        scopes=common.SCOPES,
    ).model_dump_json().encode()
    seals = 0
    start = time.perf_counter()
    box = seal(bundle, recipient, subject=subjects.TOKENS_ISSUED, message_id="bench-0")
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            box = seal(bundle, recipient, subject=subjects.TOKENS_ISSUED, message_id="bench-0")
        seals += 50
    seal_rate = seals / (time.perf_counter() - start)
    opens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            open_sealed(box, key, subject=subjects.TOKENS_ISSUED, message_id="bench-0")
        opens += 50
    open_rate = opens / (time.perf_counter() - start)
    return {"plaintext_bytes": len(bundle), "seal_per_s": round(seal_rate), "open_per_s": round(open_rate)}


# --- profile ----------------------------------------------------------------------------------
async def profile_pipeline(stack: Stack, js: Any, watcher: common.ResultWatcher, cfg: BenchConfig,
                           events: list[SandboxCreated], out_dir: Path) -> dict[str, Any]:
    recorders = [
        profiling.Recorder(name, svc.process.pid, out_dir / f"pyspy-{name}.txt").start()
        for name, svc in stack.processes.items() if name in PIPELINE
    ]
    await asyncio.sleep(1.0)  # attach
    started = time.perf_counter()
    publishing = asyncio.create_task(common.publish_many(js, [(subjects.SANDBOX_CREATED, e) for e in events]))
    await watcher.wait_settled([e.event_id for e in events], timeout=600)
    await publishing
    elapsed = time.perf_counter() - started
    profiles = [r.stop() for r in recorders]
    return {
        "events": len(events),
        "msg_per_s_while_profiled": round(len(events) / elapsed, 1),
        "tool": "py-spy record --rate 200 --nonblocking --threads",
        "services": [p.summary() for p in profiles],
    }


# --- the run ------------------------------------------------------------------------------------
async def run(cfg: BenchConfig, out_dir: Path) -> dict[str, Any]:
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="ccbridge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": cfg.model_dump(mode="json"),
        "targets": TARGETS,
    }
    server = EmbeddedNats(workdir / "nats", log_file=workdir / "nats-server.log").start()
    nc = await nats.connect(server.url, name="bench-harness")
    js = nc.jetstream()
    stack: Stack | None = None
    try:
        stack = common.make_stack(workdir / "data", server.url, LOG_LEVEL=cfg.log_level,
                                  SANDBOX_CONCURRENCY=str(cfg.batch))
        await stack.astart()
        rss = RssSampler(stack).start()
        report["rss_idle_mb"] = rss.sample()
        watcher = await common.ResultWatcher(nc).start()
        users = [f"bench-user-{i:04d}" for i in range(cfg.users)]
        log("grants: one per sandbox from auth (POST /v1/claude-code/grants), before anything is timed")
        planned = await granted_events(stack, js, cfg, users)

        payload = planned["pipeline"][0].model_dump_json().encode()  # a real sandbox.created, grant and all
        log(f"raw loop: {cfg.raw_events} messages of {len(payload)} B (a granted sandbox.created), "
            f"fetch batch {cfg.batch}, {cfg.batch} in flight, async publish (the services idle)")
        assert server.process is not None
        report["raw"] = await measure_raw(nc, server.url, cfg, payload,
                                          {"nats-server": server.process.pid, "harness": os.getpid()})

        log(f"tokens.issued → persisted: {cfg.tokens_events} events")
        report["tokens"] = await measure_tokens(stack, server, js, cfg, users)
        log(f"sandbox.created → injected: {cfg.pipeline_events} events over {cfg.users} users")
        report["pipeline"] = await measure_pipeline(stack, server, js, watcher, cfg, planned["pipeline"])
        log(f"latency at {cfg.rate:g}/s for {cfg.rate_seconds:g} s")
        report["latency_fixed"] = await measure_fixed_rate(js, watcher, planned["fixed"], cfg.rate)
        log(f"latency at a light {cfg.light_rate:g}/s for {cfg.rate_seconds:g} s")
        report["latency_light"] = await measure_fixed_rate(js, watcher, planned["light"], cfg.light_rate)
        log(f"latency at saturation: {cfg.saturation_events} events, {cfg.inflight} in flight")
        report["latency_saturation"] = await measure_saturation(js, watcher, cfg, planned["saturation"])
        report["rss_after_load_mb"] = rss.sample()
        await rss.stop()
        report["rss_peak_mb"] = dict(rss.peak)
        if cfg.profile:
            log(f"profiling sandbox + vault with py-spy over {cfg.profile_events} events")
            report["profile"] = await profile_pipeline(stack, js, watcher, cfg, planned["profile"],
                                                       workdir / "profiles")
        await watcher.stop()
        if cfg.soak_seconds > 0:  # last: its grants are asked for as it goes (bench/soak.py)
            log(f"soak profile: fresh sandboxes at {cfg.soak_rate:g}/s for {cfg.soak_seconds:g} s, RSS sampled")
            report["soak"] = await soak.stream(stack, nc, users, soak.SoakConfig(
                rate=cfg.soak_rate, seconds=cfg.soak_seconds, events=None), log=log)
    finally:
        await nc.close()
        if stack is not None:
            await asyncio.to_thread(stack.stop)
        server.stop()
    log("HPKE seal/open")
    report["hpke"] = measure_hpke(cfg.hpke_seconds)
    if cfg.e2b_injections > 0:  # after the stack: the stand-in and the SDK run in this process
        log(f"e2b: {cfg.e2b_injections} injections into fresh homes (+ as many re-injections) via the stand-in")
        from bench import e2b_roundtrips  # imports the sandbox service's backend: only here

        report["e2b"] = await e2b_roundtrips.measure(cfg.e2b_injections)
    raw_rate = report["raw"]["msg_per_s"] or float("nan")
    report["pipeline"]["ratio_to_raw"] = round(report["pipeline"]["msg_per_s"] / raw_rate, 3)
    report["pipeline"]["batch"] = cfg.batch  # SANDBOX_CONCURRENCY: fetch batch and in-flight limit
    report["tokens"]["ratio_to_raw"] = round(report["tokens"]["msg_per_s"] / raw_rate, 3)
    report["verdicts"] = verdicts(report)
    report["duration_s"] = round(time.perf_counter() - started, 1)
    if not cfg.keep and cfg.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        report["workdir"] = str(workdir)
    return report


def verdicts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    ratio = report["pipeline"]["ratio_to_raw"]
    out["pipeline_ratio"] = {"value": ratio, "target": f">= {TARGETS['pipeline_ratio_min']}",
                             "pass": ratio >= TARGETS["pipeline_ratio_min"]}
    tokens = report["tokens"]["ratio_to_raw"]
    out["tokens_ratio"] = {"value": tokens, "target": f">= {TARGETS['tokens_ratio_min']}",
                           "pass": tokens >= TARGETS["tokens_ratio_min"]}
    light = report.get("latency_light")
    if light:
        out["light_p50"] = {"value": light["p50_ms"], "target": f"< {TARGETS['light_p50_ms_max']:g} ms",
                            "pass": light["p50_ms"] < TARGETS["light_p50_ms_max"]}
    p99 = report["latency_fixed"]["p99_ms"]
    out["p99_at_200"] = {"value": p99, "target": f"< {TARGETS['p99_ms_at_200_max']} ms",
                         "pass": p99 < TARGETS["p99_ms_at_200_max"]}
    for name, value in report.get("rss_peak_mb", {}).items():
        out[f"rss_{name}"] = {"value": value, "target": f"< {TARGETS['rss_mb_max']:g} MB",
                              "pass": value < TARGETS["rss_mb_max"]}
    return out
