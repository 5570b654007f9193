"""Soak: fresh sandboxes at a steady rate through the real processes, each service's RSS
sampled all along; memory that grows with the number of sandboxes handled is a leak.

`python -m bench.soak` (`make soak`): an embedded nats-server on a free loopback port, the
three services as processes (ccbridge.stack.Stack, SQLite, local backend, LOG_LEVEL=INFO),
SOAK_USERS people connected, then SOAK_RATE `sandbox.created`/s for SOAK_SECONDS (or
SOAK_EVENTS events), every one a new sandbox with its own grant. Each grant is asked for just
ahead of its sandbox.created (auth's `POST /v1/claude-code/grants`, a bounded look-ahead), the
way a platform creates a sandbox: what the soak measures is memory per sandbox, and a sandbox's
grant passes through auth and the vault too. Nothing here is timed.

Reported per service: RSS at the start and the end, and the growth per 10,000 events — the
slope of a least-squares line through (events handled, RSS) over the second half of the run
(the first half is warm-up: caches, allocator arenas, connection buffers filling) — against
the target of at most 1 MB per 10,000 events. `make bench` runs a short profile of the same
(bench/run.py). `--tracemalloc DIR` also makes every service dump tracemalloc snapshots
(shared.runtime.start_heap_snapshots) and prints what grew in each between the middle and the
end of the run (bench/heapdiff.py). Figures are printed, never judged fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg
from pydantic_settings import BaseSettings, SettingsConfigDict

from bench import common
from ccbridge.embedded_nats import EmbeddedNats
from ccbridge.stack import Stack
from shared import subjects
from shared.events import SandboxCreated

TARGET_MB_PER_10K = 1.0


class SoakConfig(BaseSettings):
    """A soak run; each field from SOAK_<NAME> (SOAK_RATE, SOAK_SECONDS, SOAK_EVENTS, SOAK_USERS)."""

    model_config = SettingsConfigDict(env_prefix="SOAK_", extra="ignore")

    rate: float = 80.0
    seconds: float = 300.0
    events: int | None = None
    users: int = 20
    sample_s: float = 1.0
    grant_concurrency: int = 8
    log_level: str = "INFO"

    @property
    def total(self) -> int:
        return self.events if self.events is not None else max(1, round(self.rate * self.seconds))


@dataclass
class Sample:
    t: float
    handled: int
    rss_mb: dict[str, float]


def growth_per_10k(samples: list[Sample], service: str) -> float | None:
    """MB of RSS per 10,000 events handled: slope of the least-squares line through the second
    half of the samples (by time)."""
    if not samples:
        return None
    half = samples[-1].t / 2
    points = [(s.handled, s.rss_mb[service]) for s in samples if s.t >= half and service in s.rss_mb]
    if len(points) < 3 or points[-1][0] == points[0][0]:
        return None
    slope, _ = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return round(slope * 10_000, 2)


class _Results:
    """Counts `sandbox.credentials.injected` / `.failed` (core NATS), keeping nothing else."""

    def __init__(self) -> None:
        self.injected = 0
        self.failed = 0
        self.reasons: dict[str, int] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        if msg.subject == subjects.SANDBOX_CREDENTIALS_INJECTED:
            self.injected += 1
        else:
            self.failed += 1
            try:
                reason = str(json.loads(msg.data).get("reason"))
            except (ValueError, AttributeError):
                reason = "?"
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.changed.set()

    @property
    def handled(self) -> int:
        return self.injected + self.failed


def sample_rss(stack: Stack) -> dict[str, float]:
    out = {}
    for name, svc in stack.processes.items():
        value = common.rss_mb(svc.process.pid)
        if value is not None:
            out[name] = round(value, 2)
    return out


async def stream(stack: Stack, nc: nats.NATS, users: list[str], cfg: SoakConfig, log: Any = print) -> dict[str, Any]:
    """Stream `cfg.total` fresh sandboxes at `cfg.rate` into a running stack (auth among its
    services, `users` connected) and sample RSS; returns the figures."""
    js = nc.jetstream()
    results = _Results()
    sub = await nc.subscribe("sandbox.credentials.*", cb=results.on_msg)
    await nc.flush()
    total = cfg.total
    ready: asyncio.Queue[SandboxCreated | Exception] = asyncio.Queue(maxsize=max(64, int(cfg.rate * 2)))
    samples: list[Sample] = []
    started = time.monotonic()

    async def grant_ahead(grants: common.Grants) -> None:
        chunk = cfg.grant_concurrency
        try:
            for first in range(0, total, chunk):
                pairs = [(users[i % len(users)], f"soak-{i:07d}-{common.uid('s')[2:]}")
                         for i in range(first, min(total, first + chunk))]
                for event in await grants.events(pairs):
                    await ready.put(event)
        except Exception as exc:  # noqa: BLE001 - handed to the publisher, which stops at it
            await ready.put(exc)

    async def publish_all() -> float:
        window = asyncio.Semaphore(256)
        pending: set[asyncio.Task[Any]] = set()

        async def one(event: SandboxCreated) -> None:
            try:
                await common.publish_many(js, [(subjects.SANDBOX_CREATED, event)])
            finally:
                window.release()

        begin = time.monotonic()
        for i in range(total):
            delay = begin + i / cfg.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            event = await ready.get()
            if isinstance(event, Exception):
                raise RuntimeError("asking auth for a grant failed") from event
            await window.acquire()
            task = asyncio.create_task(one(event))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        return total / max(1e-9, time.monotonic() - begin)

    async def sampler(stop: asyncio.Event) -> None:
        next_report = started + 30
        while not stop.is_set():
            now = time.monotonic()
            samples.append(Sample(round(now - started, 2), results.handled, sample_rss(stack)))
            if now >= next_report:
                next_report += 30
                rss = ", ".join(f"{k} {v:.0f}" for k, v in samples[-1].rss_mb.items())
                log(f"soak: {results.handled}/{total} handled after {now - started:.0f} s; RSS MB: {rss}")
            try:
                await asyncio.wait_for(stop.wait(), cfg.sample_s)
            except TimeoutError:
                pass

    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(stop))
    try:
        async with common.Grants.of(stack, concurrency=cfg.grant_concurrency) as grants:
            granting = asyncio.create_task(grant_ahead(grants))
            try:
                offered = await publish_all()
            finally:
                granting.cancel()
                await asyncio.gather(granting, return_exceptions=True)
        deadline = time.monotonic() + 120 + total / max(1.0, cfg.rate)
        while results.handled < total and time.monotonic() < deadline:
            results.changed.clear()
            try:
                await asyncio.wait_for(results.changed.wait(), 1.0)
            except TimeoutError:
                stack.check_alive()
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        await sampling
        await sub.unsubscribe()
    samples.append(Sample(round(time.monotonic() - started, 2), results.handled, sample_rss(stack)))
    services: dict[str, dict[str, Any]] = {}
    for name in stack.processes:
        series = [s.rss_mb[name] for s in samples if name in s.rss_mb]
        if not series:
            continue
        growth = growth_per_10k(samples, name)
        services[name] = {
            "rss_start_mb": series[0],
            "rss_end_mb": series[-1],
            "rss_peak_mb": max(series),
            "growth_mb_per_10k": growth,
            "pass": None if growth is None else growth <= TARGET_MB_PER_10K,
        }
    return {
        "events": total,
        "rate_offered": cfg.rate,
        "rate_published": round(offered, 1),
        "seconds": round(elapsed, 1),
        "users": len(users),
        "injected": results.injected,
        "failed": results.failed,
        "failure_reasons": results.reasons,
        "target_mb_per_10k": TARGET_MB_PER_10K,
        "fit": "least squares over the second half of the run (by time)",
        "services": services,
        "samples": [asdict(s) for s in samples],
    }


def lines(report: dict[str, Any]) -> list[str]:
    out = [
        f"soak: {report['events']:,} fresh sandboxes at {report['rate_published']:g}/s "
        f"(offered {report['rate_offered']:g}/s) over {report['users']} people in {report['seconds']:.0f} s: "
        f"{report['injected']:,} injected, {report['failed']:,} failed"
        + (f" {report['failure_reasons']}" if report["failure_reasons"] else ""),
        f"{'service':10} {'RSS start':>10} {'RSS end':>10} {'growth per 10k events':>24}   "
        f"target <= {report['target_mb_per_10k']:g} MB",
    ]
    for name, svc in report["services"].items():
        growth = svc["growth_mb_per_10k"]
        verdict = "" if svc["pass"] is None else ("PASS" if svc["pass"] else "MISS")
        shown = "n/a" if growth is None else f"{growth:+.2f} MB"
        out.append(f"{name:10} {svc['rss_start_mb']:>7.1f} MB {svc['rss_end_mb']:>7.1f} MB {shown:>24}   {verdict}")
    return out


def heap_diffs(directory: Path) -> list[str]:
    """Per service process: what grew between its middle and its last tracemalloc snapshot."""
    from bench.heapdiff import diff_lines

    out: list[str] = []
    by_process: dict[str, list[Path]] = {}
    for path in sorted(directory.glob("*.tracemalloc")):  # <service>-<pid>-<n>.tracemalloc
        by_process.setdefault(path.name.rsplit("-", 1)[0], []).append(path)
    for process, paths in sorted(by_process.items()):
        if len(paths) < 2:
            continue
        old, new = paths[(len(paths) - 1) // 2], paths[-1]
        out.append(f"\ntracemalloc, {process}: {old.name} → {new.name}")
        out.extend(diff_lines(old, new, top=12))
    return out


async def run(cfg: SoakConfig, workdir: Path, *, tracemalloc_dir: Path | None = None,
              log: Any = print) -> dict[str, Any]:
    server = EmbeddedNats(workdir / "nats", log_file=workdir / "nats-server.log").start()
    extra = {}
    if tracemalloc_dir is not None:
        interval = max(5.0, cfg.total / cfg.rate / 8)
        extra = {"CCBRIDGE_TRACEMALLOC": str(tracemalloc_dir.resolve()),
                 "CCBRIDGE_TRACEMALLOC_INTERVAL_S": f"{interval:g}"}
    stack = common.make_stack(workdir / "data", server.url, env=extra, LOG_LEVEL=cfg.log_level)
    try:
        await stack.astart()
        nc = await nats.connect(server.url, name="soak-harness")
        try:
            users = [f"soak-user-{i:03d}" for i in range(cfg.users)]
            await common.connect_users(nc.jetstream(), stack.data_dir, users)
            log(f"soak: {len(users)} people connected; {cfg.total:,} sandboxes at {cfg.rate:g}/s")
            return await stream(stack, nc, users, cfg, log)
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(stack.stop)
        server.stop()


def main(argv: list[str] | None = None) -> None:
    cfg = SoakConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=cfg.rate, help="sandbox.created per second (SOAK_RATE)")
    parser.add_argument("--seconds", type=float, default=cfg.seconds, help="how long to stream (SOAK_SECONDS)")
    parser.add_argument("--events", type=int, default=cfg.events, help="how many events; overrides --seconds")
    parser.add_argument("--users", type=int, default=cfg.users)
    parser.add_argument("--workdir", type=Path, help="keep the nats store, database, sandboxes and logs here")
    parser.add_argument("--tracemalloc", type=Path, metavar="DIR",
                        help="services dump tracemalloc snapshots here; print what grew (slows them down)")
    parser.add_argument("--json", type=Path, help="also write the figures (and every RSS sample) here")
    args = parser.parse_args(argv)
    cfg.rate, cfg.seconds, cfg.events, cfg.users = args.rate, args.seconds, args.events, args.users
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ccbridge-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(cfg, workdir, tracemalloc_dir=args.tracemalloc,
                             log=lambda text: print(f"  · {text}", file=sys.stderr, flush=True)))
    print("\n".join(lines(report)))
    if args.tracemalloc is not None:
        print("\n".join(heap_diffs(args.tracemalloc)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.workdir is None:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
