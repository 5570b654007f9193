"""`python -m bench` (`make bench`): one run, a table, docs/bench/latest.json + latest.png.

Counts come from the environment (BENCH_RAW_EVENTS, BENCH_PIPELINE_EVENTS, BENCH_TOKENS_EVENTS,
BENCH_USERS, BENCH_RATE, BENCH_RATE_SECONDS, BENCH_SATURATION_EVENTS, BENCH_INFLIGHT,
BENCH_PROFILE_EVENTS, BENCH_PROFILE=0 to skip py-spy, BENCH_HPKE_SECONDS, BENCH_BATCH,
BENCH_LOG_LEVEL, BENCH_SOAK_SECONDS (0 skips the soak profile), BENCH_SOAK_RATE, BENCH_E2B_INJECTIONS
(0 skips the e2b round trips)) or the flags below. Misses against the targets are reported, never fatal.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bench import report as reporting
from bench.run import BenchConfig, run

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    cfg = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench", help="where latest.json/png go")
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run, ~1 min)")
    parser.add_argument("--raw-events", type=int, default=cfg.raw_events)
    parser.add_argument("--pipeline-events", type=int, default=cfg.pipeline_events)
    parser.add_argument("--tokens-events", type=int, default=cfg.tokens_events)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-soak", action="store_true", help="skip the short soak profile (BENCH_SOAK_SECONDS=0)")
    parser.add_argument("--no-e2b", action="store_true", help="skip the e2b round trips (BENCH_E2B_INJECTIONS=0)")
    parser.add_argument("--workdir", type=Path, help="keep the run's nats store, database, sandboxes, logs here")
    args = parser.parse_args(argv)
    cfg.raw_events, cfg.pipeline_events, cfg.tokens_events = args.raw_events, args.pipeline_events, args.tokens_events
    cfg.profile = cfg.profile and not args.no_profile
    cfg.workdir = args.workdir
    if args.no_soak:
        cfg.soak_seconds = 0
    if args.no_e2b:
        cfg.e2b_injections = 0
    if args.quick:
        cfg.raw_events, cfg.pipeline_events, cfg.tokens_events = 600, 400, 200
        cfg.rate_seconds, cfg.saturation_events, cfg.profile_events, cfg.users = 2.0, 200, 300, 20
        cfg.soak_seconds = min(cfg.soak_seconds, 20.0)
        cfg.e2b_injections = min(cfg.e2b_injections, 5)
    report = asyncio.run(run(cfg, args.out))
    reporting.write_json(report, args.out / "latest.json")
    reporting.write_png(report, args.out / "latest.png")
    reporting.print_table(report, written_to=args.out / "latest.json")


if __name__ == "__main__":
    main()
