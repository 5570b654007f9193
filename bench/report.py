"""Print the figures against the targets, write docs/bench/latest.json and latest.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _mark(ok: bool | None) -> str:
    if ok is None:
        return ""
    return "[green]PASS[/green]" if ok else "[red]MISS[/red]"


def print_table(report: dict[str, Any], console: Console | None = None, *,
                written_to: Path | str = "docs/bench/latest.json") -> None:
    console = console or Console(width=110)
    verdicts = report.get("verdicts", {})
    raw, pipe, tokens = report["raw"], report["pipeline"], report["tokens"]
    fixed, sat, hpke = report["latency_fixed"], report["latency_saturation"], report["hpke"]
    table = Table(title=f"ccbridge bench — {report['when']} ({report['machine']['cpus']} CPUs)")
    for col in ("measure", "figure", "target", ""):
        table.add_column(col)
    raw_shape = (f"fetch {raw.get('batch', '?')}, {raw.get('in_flight', raw.get('batch', '?'))} in flight, "
                 f"{raw.get('payload_bytes', '?')} B")
    table.add_row(f"raw JetStream loop (consume→async publish→ack; {raw_shape})", f"{raw['msg_per_s']:,.0f} msg/s",
                  "", "")
    table.add_row(
        f"pipeline sandbox.created → injected (fetch {pipe.get('batch', raw.get('batch', '?'))})",
        f"{pipe['msg_per_s']:,.0f} msg/s  ({pipe['ratio_to_raw']:.3f} × raw)",
        verdicts["pipeline_ratio"]["target"] + " × raw",
        _mark(verdicts["pipeline_ratio"]["pass"]),
    )
    tokens_verdict = verdicts.get("tokens_ratio", {})
    table.add_row(
        "tokens.issued → persisted", f"{tokens['msg_per_s']:,.0f} msg/s  ({tokens['ratio_to_raw']:.3f} × raw)",
        (tokens_verdict["target"] + " × raw") if tokens_verdict else "", _mark(tokens_verdict.get("pass")),
    )
    table.add_row(
        f"latency @ {fixed['offered_rate']:g}/s offered",
        f"p50 {fixed['p50_ms']:.1f} ms · p99 {fixed['p99_ms']:.1f} ms",
        "p99 " + verdicts["p99_at_200"]["target"],
        _mark(verdicts["p99_at_200"]["pass"]),
    )
    light = report.get("latency_light")
    if light:
        light_verdict = verdicts.get("light_p50", {})
        table.add_row(f"latency @ {light['offered_rate']:g}/s offered (light load)",
                      f"p50 {light['p50_ms']:.1f} ms · p99 {light['p99_ms']:.1f} ms",
                      ("p50 " + light_verdict["target"]) if light_verdict else "", _mark(light_verdict.get("pass")))
    table.add_row(
        f"latency @ saturation ({sat['inflight']} in flight, {sat['offered_rate']:g}/s)",
        f"p50 {sat['p50_ms']:.1f} ms · p99 {sat['p99_ms']:.1f} ms",
        "",
        "",
    )
    for name, value in report.get("rss_peak_mb", {}).items():
        verdict = verdicts.get(f"rss_{name}", {})
        table.add_row(f"RSS peak {name}", f"{value:.0f} MB", verdict.get("target", ""), _mark(verdict.get("pass")))
    for label, data in (("CPU per msg, raw loop", raw), ("CPU per msg, pipeline", pipe), ("CPU per msg, tokens", tokens)):
        cpu = data.get("cpu_ms_per_msg") or {}
        parts = " · ".join(f"{k} {v:.1f}" for k, v in cpu.items() if k != "total" and v >= 0.05)
        if cpu:
            table.add_row(label, f"{cpu.get('total', 0):.1f} ms ({parts})", "", "")
    table.add_row("HPKE seal / open", f"{hpke['seal_per_s']:,} / {hpke['open_per_s']:,} per s", "", "")
    e2b = report.get("e2b")
    if e2b:
        table.add_row(f"e2b injection via the stand-in ({e2b['injections']} fresh + {e2b['injections']} again)",
                      f"{e2b['round_trips_per_injection']} round trips · p50 {e2b['injection_ms_p50']:.0f} ms "
                      f"(again {e2b['reinjection_ms_p50']:.0f} ms)", "<= 4 round trips",
                      _mark(e2b["round_trips_per_injection"] <= 4))
    soak = report.get("soak")
    if soak:
        for name, svc in soak["services"].items():
            growth = svc["growth_mb_per_10k"]
            table.add_row(
                f"RSS growth {name} (soak {soak['events']:,} events at {soak['rate_published']:g}/s)",
                "n/a" if growth is None else f"{growth:+.1f} MB per 10k events",
                f"<= {soak['target_mb_per_10k']:g} MB", _mark(svc["pass"]),
            )
    console.print(table)
    profile = report.get("profile")
    if profile:
        for svc in profile["services"]:
            if svc.get("error"):
                console.print(f"profile {svc['service']}: {svc['error']}")
                continue
            parts = ", ".join(f"{c['name']} {c['share']:.0%}" for c in svc["components"][:6])
            console.print(
                f"[bold]{svc['service']}[/bold] event loop busy {svc['cpu_busy_main_thread']:.0%} of the drain "
                f"(+{svc['other_thread_samples']} worker-thread samples); loop time by component: {parts}"
            )
    console.print(f"run took {report['duration_s']:.0f} s · figures in {written_to}")


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def write_png(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(f"ccbridge bench {report['when']} · {report['machine']['cpus']} CPUs", fontsize=12)

    ax = axes[0][0]
    names = ["raw loop", "sandbox.created\n→ injected", "tokens.issued\n→ persisted"]
    values = [report["raw"]["msg_per_s"], report["pipeline"]["msg_per_s"], report["tokens"]["msg_per_s"]]
    bars = ax.bar(names, values, color=["#888888", "#1f77b4", "#2ca02c"])
    ax.axhline(report["raw"]["msg_per_s"] * report["targets"]["pipeline_ratio_min"], color="red", ls="--",
               lw=1, label=f"target: {report['targets']['pipeline_ratio_min']:g} × raw")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_ylabel("msg/s (drain rate, log scale)")
    ax.set_title("throughput")
    ax.legend(loc="upper right")

    ax = axes[0][1]
    for key, label in (("latency_light", "light"), ("latency_fixed", "target rate"), ("latency_saturation", "saturation")):
        if key not in report:
            continue
        data = report[key]["histogram_ms"]
        if data:
            ys = [(i + 1) / len(data) for i in range(len(data))]
            ax.plot(data, ys, label=f"{label} ({report[key]['offered_rate']:g}/s): "
                                    f"p50 {report[key]['p50_ms']:.1f}, p99 {report[key]['p99_ms']:.1f} ms")
    ax.axvline(report["targets"]["p99_ms_at_200_max"], color="red", ls="--", lw=1, label="p99 target 15 ms")
    ax.set_xscale("log")
    ax.set_xlabel("sandbox.created → injected (ms)")
    ax.set_ylabel("fraction")
    ax.set_title("latency CDF")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[1][0]
    rss = report.get("rss_peak_mb", {})
    ax.bar(list(rss), list(rss.values()), color="#9467bd")
    ax.axhline(report["targets"]["rss_mb_max"], color="red", ls="--", lw=1, label="target 120 MB")
    for i, value in enumerate(rss.values()):
        ax.annotate(f"{value:.0f} MB", (i, value), ha="center", va="bottom")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("memory per service")
    ax.legend(loc="lower right")

    ax = axes[1][1]
    groups = [("raw loop", report["raw"]), ("sandbox.created\n→ injected", report["pipeline"]),
              ("tokens.issued\n→ persisted", report["tokens"])]
    procs: list[str] = []
    for _, data in groups:
        for name in data.get("cpu_ms_per_msg", {}):
            if name != "total" and name not in procs:
                procs.append(name)
    bottom = [0.0] * len(groups)
    for name in procs:
        values = [data.get("cpu_ms_per_msg", {}).get(name, 0.0) for _, data in groups]
        ax.bar([g for g, _ in groups], values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.1f} ms", (i, total), ha="center", va="bottom")
    ax.set_ylabel("CPU ms per message (user + system)")
    ax.set_title("CPU per message, by process")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
