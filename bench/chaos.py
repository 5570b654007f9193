"""Chaos run: sandbox events published while the sandbox service and the vault are SIGKILLed
and restarted and nats-server (file store, same port, same store dir) is killed and
restarted. Afterwards every sandbox must have exactly one effective injection, none lost, and
duplicates must have had no second effect.

`python -m bench.chaos` (`make chaos`): 10,000 events. The short profile (1,000 events) runs
inside `make test` (tests/integration/test_chaos_sandbox.py).

What is checked, from the durable record (the JetStream stream), not from what a core
subscriber happened to see while the server was down:
- lost: unique sandbox.created event ids with no `sandbox.credentials.injected` (0);
- duplicate injections: causes with more than one distinct injected event id (0);
- raw injected messages vs causes (the stream's duplicate window drops republished results);
- failed events and dead letters (0: retries outlast every outage);
- every sandbox home holds `.claude/.credentials.json` with exactly its user's token, and no
  half-written temp file is left behind;
- duplicates (same event id republished; a second event for the same sandbox) changed nothing:
  the credentials file is the one of the first injection (same inode: not rewritten).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats

from bench import common
from ccbridge.embedded_nats import EmbeddedNats
from ccbridge.stack import Stack
from shared import subjects
from shared.events import SandboxCreated, SandboxCredentialsFailed

CHAOS_ENV = {
    # short ack waits and retries so recovery after a kill takes seconds, not minutes
    "SANDBOX_ACK_WAIT": "3",
    "VAULT_ACK_WAIT_S": "3",
    "SANDBOX_MAX_DELIVER": "100",
    "SANDBOX_RETRY_BASE_DELAY": "0.2",
    "SANDBOX_RETRY_MAX_DELAY": "1",
    "VAULT_REQUEST_TIMEOUT": "1",
    "VAULT_RETRY_MAX_DELAY_S": "1",
    "LOG_LEVEL": "WARNING",
}


@dataclass
class ChaosResult:
    events: int = 0
    unique_events: int = 0
    sandboxes: int = 0
    republished_same_id: int = 0
    second_event_same_sandbox: int = 0
    publish_acks_duplicate: int = 0
    sandbox_kills: int = 0
    vault_kills: int = 0
    nats_restarts: int = 0
    injected_causes: int = 0
    injected_messages: int = 0
    lost: int = 0
    duplicate_injections: int = 0
    failed_events: int = 0
    dead_letters: int = 0
    homes_ok: int = 0
    homes_wrong: int = 0
    temp_files_left: int = 0
    rewritten_by_duplicate: int = 0
    seconds: float = 0.0
    settle_seconds: float = 0.0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicate_injections == 0
            and self.failed_events == 0
            and self.dead_letters == 0
            and self.homes_wrong == 0
            and self.homes_ok == self.sandboxes
            and self.rewritten_by_duplicate == 0
        )  # temp_files_left is reported, not judged: see `findings`

    @property
    def findings(self) -> list[str]:
        out = []
        if self.temp_files_left:
            out.append(
                f"{self.temp_files_left} '.<name>.<hex>.ccbridge-tmp' files left in sandbox homes by a SIGKILL "
                "between write and rename (may hold a full credentials copy a later scrub does not remove)"
            )
        return out

    def lines(self) -> list[str]:
        return [
            f"events published        {self.events} ({self.unique_events} unique ids, {self.sandboxes} sandboxes)",
            f"duplicates              {self.republished_same_id} republished with the same event id "
            f"({self.publish_acks_duplicate} dropped by JetStream at publish), "
            f"{self.second_event_same_sandbox} second events for an existing sandbox",
            f"chaos                   {self.sandbox_kills} × SIGKILL sandbox, {self.vault_kills} × SIGKILL vault, "
            f"{self.nats_restarts} × nats-server killed + restarted",
            f"injected                {self.injected_causes}/{self.unique_events} causes "
            f"({self.injected_messages} result messages in the stream)",
            f"lost                    {self.lost}",
            f"duplicate injections    {self.duplicate_injections}",
            f"failed / dead letters   {self.failed_events} / {self.dead_letters}",
            f"sandbox homes           {self.homes_ok} right credentials file, {self.homes_wrong} wrong/missing, "
            f"{self.temp_files_left} temp files left",
            f"second effects          {self.rewritten_by_duplicate} credentials files rewritten by a duplicate",
            f"time                    {self.seconds:.0f} s total, {self.settle_seconds:.0f} s to settle after "
            "the last publish",
            f"verdict                 {'PASS' if self.ok else 'FAIL'}",
            *(f"finding                 {f}" for f in self.findings),
        ]


async def _quiet(_exc: Exception) -> None:
    """The harness's connection drops on purpose (nats-server restarts): no tracebacks."""


async def _quiet_event() -> None:
    return None


class Chaos:
    def __init__(self, workdir: Path, *, events: int, users: int = 20, seed: int = 8,
                 interval_s: float = 2.5, max_actions: int = 1_000_000, rate: float = 0.0,
                 log=print) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.n = events
        self.users = [f"chaos-user-{i:03d}" for i in range(users)]
        self.rng = random.Random(seed)
        self.interval_s = interval_s
        self.max_actions = max(3, max_actions)
        self.rate = rate
        self.log = log
        self.result = ChaosResult()
        self.server: EmbeddedNats | None = None
        self.stack: Stack | None = None
        self._inodes: dict[str, int] = {}

    # --- plan ------------------------------------------------------------------------------
    def plan(self) -> tuple[list[SandboxCreated], dict[str, str]]:
        """The events in publish order, and sandbox_id → user_id. About 5% are republished
        with the same event id (some right away, some later) and about 5% of sandboxes get a
        second, different event."""
        first: list[SandboxCreated] = [
            common.sandbox_created(self.users[i % len(self.users)], f"chaos-sbx-{i:05d}") for i in range(self.n)
        ]
        owners = {e.sandbox_id: e.user_id for e in first}
        ordered: list[SandboxCreated] = []
        for i, event in enumerate(first):
            ordered.append(event)
            roll = self.rng.random()
            if roll < 0.05 and i > 10:
                ordered.append(first[self.rng.randrange(max(0, i - 200), i)])  # same event id again
                self.result.republished_same_id += 1
            elif roll < 0.10 and i > 10:
                earlier = first[self.rng.randrange(max(0, i - 200), i)]
                ordered.append(common.sandbox_created(earlier.user_id, earlier.sandbox_id))
                self.result.second_event_same_sandbox += 1
        return ordered, owners

    async def granted(self, js: Any, events: list[SandboxCreated], owners: dict[str, str]) -> list[SandboxCreated]:
        """The planned events, each carrying its sandbox's grant (one per sandbox from auth's
        `POST /v1/claude-code/grants`; a second event for a sandbox presents the same grant) —
        fetched, and recorded by the vault, before any chaos."""
        assert self.stack is not None
        async with common.Grants.of(self.stack) as grants:
            tokens = await grants.many((user, sandbox_id, "access_only") for sandbox_id, user in owners.items())
        await common.wait_grants_recorded(js, timeout=max(120.0, len(tokens) / 20))
        return [e.model_copy(update={"grant": tokens[e.sandbox_id]}) for e in events]

    # --- chaos actions -----------------------------------------------------------------------
    async def _kill_service(self, name: str) -> None:
        assert self.stack is not None
        await asyncio.to_thread(self.stack.kill, name, signal.SIGKILL)
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        self.stack.start_service(name)

    async def _restart_nats(self) -> None:
        assert self.server is not None
        await asyncio.to_thread(self.server.kill)
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        await asyncio.to_thread(self.server.start)

    async def chaos_loop(self, stop: asyncio.Event, min_actions: int = 3) -> None:
        """Kill/restart in turn: sandbox, vault, nats-server — until `stop` is set or
        `max_actions` were done, and at least `min_actions` times (each kind at least once)."""
        actions = ("sandbox", "vault", "nats")
        i = 0
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval_s * self.rng.uniform(0.6, 1.4))
            except TimeoutError:
                pass
            if (stop.is_set() and i >= min_actions) or i >= self.max_actions:
                return
            action = actions[i % len(actions)]
            i += 1
            if action == "nats":
                await self._restart_nats()
                self.result.nats_restarts += 1
            else:
                await self._kill_service(action)
                if action == "sandbox":
                    self.result.sandbox_kills += 1
                else:
                    self.result.vault_kills += 1
            self.log(f"chaos: {action} killed and restarted")

    # --- publishing ----------------------------------------------------------------------------
    async def publish_all(self, js: Any, events: list[SandboxCreated]) -> None:
        """In order, with retries (same Nats-Msg-Id) through server restarts."""
        def stored(_: int, ack: Any) -> None:
            if ack.duplicate:
                self.result.publish_acks_duplicate += 1

        await common.publish_paced(js, [(subjects.SANDBOX_CREATED, e) for e in events], rate=self.rate, window=64,
                                   attempts=600, timeout=2.0, on_ack=stored)

    # --- checking ---------------------------------------------------------------------------------
    async def read_results(self, js: Any) -> tuple[dict[str, set[str]], int, list[SandboxCredentialsFailed]]:
        return await common.read_results(js)

    async def injected_count(self, js: Any) -> int:
        return await common.injected_count(js)

    def check_homes(self, owners: dict[str, str]) -> None:
        r = self.result
        wrong: list[str] = []
        for sandbox_id, user_id in owners.items():
            token = common.credentials_token(self.data_dir, sandbox_id)
            if token == common.access_token_for(user_id):
                r.homes_ok += 1
            else:
                r.homes_wrong += 1
                wrong.append(sandbox_id)
        root = self.data_dir.resolve() / "sandboxes"
        r.temp_files_left = sum(1 for p in root.rglob("*ccbridge-tmp*"))
        r.examples["wrong_homes"] = wrong[:10]

    def credentials_inode(self, sandbox_id: str) -> int | None:
        return common.credentials_inode(self.data_dir, sandbox_id)

    # --- the run ------------------------------------------------------------------------------------
    async def wait_idle(self, js: Any, expected_injected: int, timeout: float, quiet_s: float = 2.0) -> bool:
        return await common.wait_pipeline_idle(js, expected_injected, timeout, quiet_s=quiet_s)

    async def late_duplicates(self, js: Any, firsts: list[SandboxCreated]) -> list[SandboxCreated]:
        """After everything settled: duplicates that slip past JetStream's dedupe (same event id,
        another Nats-Msg-Id) and second events for existing sandboxes. Their sandboxes' credentials
        files must not be rewritten (same inode) and must still hold the right token."""
        sample = self.rng.sample(firsts, k=2 * max(1, min(100, len(firsts) // 20)))
        self._inodes = {e.sandbox_id: self.credentials_inode(e.sandbox_id) or -1 for e in sample}
        seconds = await common.late_duplicates(js, sample)
        self.result.republished_same_id += len(sample) - len(seconds)
        self.result.second_event_same_sandbox += len(seconds)
        return seconds

    async def run(self) -> ChaosResult:
        r = self.result
        started = time.monotonic()
        events, owners = self.plan()

        self.server = EmbeddedNats(self.workdir / "nats", log_file=self.workdir / "nats-server.log").start()
        self.stack = common.make_stack(self.data_dir, self.server.url, env=CHAOS_ENV)
        await self.stack.astart()
        nc = await nats.connect(self.server.url, name="chaos-harness", max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2, error_cb=_quiet, disconnected_cb=_quiet_event)
        js = nc.jetstream()
        try:
            await common.connect_users(js, self.data_dir, self.users)
            self.log(f"chaos: {len(self.users)} users connected; {len(owners)} grants from auth")
            events = await self.granted(js, events, owners)
            firsts_by_sandbox: dict[str, SandboxCreated] = {}
            for event in events:
                firsts_by_sandbox.setdefault(event.sandbox_id, event)
            firsts = list(firsts_by_sandbox.values())
            unique = {e.event_id: e for e in events}
            self.log(f"chaos: publishing {len(events)} events under chaos")

            stop = asyncio.Event()
            chaos = asyncio.create_task(self.chaos_loop(stop))
            try:
                await self.publish_all(js, events)
                self.log("chaos: all published; chaos goes on until the backlog is worked off")
                await self.wait_idle(js, len(unique), timeout=max(300.0, self.n / 5), quiet_s=0.0)
            finally:
                stop.set()
                await chaos
            publish_done = time.monotonic()
            self.log("chaos: stopped; waiting for the pipeline to settle")
            await self.wait_idle(js, len(unique), timeout=max(180.0, self.n / 5))
            r.settle_seconds = time.monotonic() - publish_done

            self.log("chaos: late duplicates (past the dedupe window) and second events")
            seconds = await self.late_duplicates(js, firsts)
            unique.update({e.event_id: e for e in seconds})
            await self.wait_idle(js, len(unique), timeout=120.0)

            r.events = len(events) + 2 * len(seconds)  # late: as many same-id resends as second events
            r.unique_events, r.sandboxes = len(unique), len(owners)
            injected, raw, failures = await self.read_results(js)
            r.injected_causes = sum(1 for c in unique if injected.get(c))
            r.injected_messages = raw
            r.lost = r.unique_events - r.injected_causes
            r.duplicate_injections = sum(1 for ids in injected.values() if len(ids) > 1)
            r.failed_events = len(failures)
            r.examples["lost"] = [c for c in unique if not injected.get(c)][:10]
            r.examples["failures"] = [f"{f.reason}: {f.detail}"[:120] for f in failures[:5]]
            r.dead_letters = sum((await common.dlq_counts(js)).values())
            self.check_homes(owners)
            rewritten = [s for s, ino in self._inodes.items() if self.credentials_inode(s) != ino]
            r.rewritten_by_duplicate = len(rewritten)
            r.examples["rewritten"] = rewritten[:10]
        finally:
            await nc.close()
            await asyncio.to_thread(self.stack.stop)
            self.server.stop()
        r.seconds = time.monotonic() - started
        return r


async def run_chaos(events: int, workdir: Path | None = None, *, users: int = 20, seed: int = 8,
                    interval_s: float = 2.5, max_actions: int = 1_000_000, log=print) -> ChaosResult:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ccbridge-chaos-"))
    chaos = Chaos(workdir, events=events, users=users, seed=seed, interval_s=interval_s,
                  max_actions=max_actions, log=log)
    return await chaos.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=int(os.environ.get("CHAOS_EVENTS", 10_000)))
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between chaos actions")
    parser.add_argument("--max-actions", type=int, default=60,
                        help="stop the chaos after this many kills/restarts (then the backlog drains)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = asyncio.run(run_chaos(args.events, args.workdir, users=args.users, seed=args.seed,
                                   interval_s=args.interval, max_actions=args.max_actions,
                                   log=lambda t: print(f"  · {t}", file=sys.stderr)))
    print("\n".join(result.lines()))
    if args.json:
        args.json.write_text(json.dumps(asdict(result) | {"ok": result.ok, "findings": result.findings}, indent=2) + "\n")
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
