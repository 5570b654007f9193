"""Round trips and latency of one e2b injection, against the loopback stand-in.

`await measure(n)` starts `standins.e2b.E2BStandin` (control plane + envd that the real e2b SDK
talks to), then injects `n` times into fresh sandboxes — and `n` times more into those same
homes with new tokens (what a refresh does) — through `E2BBackend` + `write_credentials`, the
sandbox service's own path. Round trips are what the stand-in received for the sandbox during
the injection (connect included): each is one network round trip for the SDK, which is what an
injection costs against the real e2b cloud. Times on loopback mostly measure the SDK and the
stand-in; they are a floor, not a forecast.

    python -m bench.e2b_roundtrips [-n 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from services.sandbox import domain
from services.sandbox.adapters.backends.base import Target
from services.sandbox.adapters.backends.e2b import E2BBackend, E2BConfig
from services.sandbox.writer import write_credentials
from shared.events import TokenBundle
from standins.e2b import E2BStandin

SCOPES = ["user:inference", "user:profile", "user:sessions:claude_code"]


def _bundle() -> TokenBundle:
    return TokenBundle(
        access_token=f"sk-ant-oat01-bench{uuid.uuid4().hex}",
        refresh_token=f"sk-ant-ort01-bench{uuid.uuid4().hex}",
        expires_at=int(time.time() * 1000) + 8 * 3600 * 1000,
        scopes=SCOPES,
    )


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def _inject(standin: E2BStandin, backend: E2BBackend, sandbox_id: str) -> tuple[int, float]:
    before = standin.round_trips(sandbox_id)
    started = time.perf_counter()
    target = Target(event_id=f"bench-{uuid.uuid4().hex[:12]}", sandbox_id=sandbox_id, backend="e2b")
    async with backend.open(target) as sandbox:
        layout = domain.resolve_layout(sandbox.home)
        await write_credentials(sandbox, layout, "file", _bundle())
    return standin.round_trips(sandbox_id) - before, (time.perf_counter() - started) * 1000


async def measure(n: int = 20) -> dict[str, Any]:
    """Inject `n` times into fresh homes and `n` times into homes that already hold the files.
    Returns round trips per injection (the most any injection took) and the p50/p99 time of the
    fresh injections, plus the same for re-injections."""
    if n < 1:
        raise ValueError("n must be at least 1")
    with tempfile.TemporaryDirectory(prefix="ccbridge-e2b-bench-") as root:
        async with E2BStandin(Path(root)) as standin:
            backend = E2BBackend(E2BConfig(api_key=SecretStr(standin.api_key), api_url=standin.api_url,
                                           sandbox_url=standin.sandbox_url, request_retries=0))
            await _inject(standin, backend, standin.add_sandbox().sandbox_id)  # warm-up: SDK clients, imports
            fresh: list[tuple[int, float]] = []
            again: list[tuple[int, float]] = []
            for _ in range(n):
                sandbox_id = standin.add_sandbox().sandbox_id
                fresh.append(await _inject(standin, backend, sandbox_id))
                again.append(await _inject(standin, backend, sandbox_id))
    fresh_ms = [ms for _, ms in fresh]
    again_ms = [ms for _, ms in again]
    return {
        "round_trips_per_injection": max(trips for trips, _ in fresh + again),
        "injection_ms_p50": round(_quantile(fresh_ms, 0.50), 1),
        "injection_ms_p99": round(_quantile(fresh_ms, 0.99), 1),
        "round_trips_fresh": max(trips for trips, _ in fresh),
        "round_trips_reinjection": max(trips for trips, _ in again),
        "reinjection_ms_p50": round(_quantile(again_ms, 0.50), 1),
        "reinjection_ms_p99": round(_quantile(again_ms, 0.99), 1),
        "injections": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="injections into fresh homes (and as many re-injections)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.n)), indent=2))


if __name__ == "__main__":
    main()
