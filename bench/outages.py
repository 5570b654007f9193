"""Outage profiles: a dependency goes down for a while in the middle of a steady stream of
`sandbox.created`, comes back, and nothing fails and nothing is lost (issue 17).

    python -m bench.outages [--profile postgres|vault|oauth|e2b|all] [--outage-s 60] [--rate 25]

`make chaos` runs every profile with a one-minute outage after the kill/restart chaos run
(`make outages` runs only these). Short versions run inside `make test`
(tests/integration/test_outages.py).

Each profile starts its own stack (embedded nats-server, the three services as processes,
ccbridge.stack), connects a few people, asks auth for one grant per sandbox, then publishes
`--rate` fresh sandboxes per second for `--lead-s` + `--outage-s` + `--tail-s` seconds. At
`--lead-s` the dependency goes down for `--outage-s`:

- postgres: the vault runs on a private PostgreSQL (bench/postgres.py), stopped with
  `pg_ctl stop -m fast`, then started again; a person's login (`tokens.issued`) is published
  during the outage and must be stored afterwards.
- vault: the vault process is SIGKILLed, then started again (the same login check).
- oauth: the OAuth stand-in (standins/oauth.py) answers 503 on its token endpoint while every
  person's access token is due for a refresh (short `expires_in`, VAULT_REFRESH_MARGIN_S to
  match; the people connect through auth's real login). Sandboxes keep getting the still-valid
  access tokens; no `tokens.reconnect_required`; every refresh succeeds after the outage.
- e2b: the sandboxes are e2b sandboxes (standins/e2b.py, the real SDK); e2b's API answers 429
  and 502 in turn; envd keeps working.

During the outage some sandboxes are sent again (same event id under another Nats-Msg-Id) and
some get a second event; after everything settled a sample of the outage's sandboxes gets the
same again. None may have a second effect.

Printed per profile: sandboxes published (and how many during the outage), injected, failed
events, dead letters, lost, duplicates and their second effects (a credentials file rewritten,
an e2b sandbox written twice, two different results for one event), the seconds each service
paused each dependency (from its /metrics), how long after recovery the last sandbox was
injected, and p50/max time from publish to injection of the sandboxes published during the
outage. Only the correctness figures decide the exit code; times are reported, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import nats
from nats.aio.msg import Msg

from bench import common
from bench.postgres import PrivatePostgres
from ccbridge.demo import mint_caller_token
from ccbridge.embedded_nats import EmbeddedNats, free_port
from ccbridge.stack import Stack
from shared import subjects
from shared.events import SandboxCreated, derived_event_id
from standins.e2b import E2BStandin
from standins.oauth import OAuthStandin

PROFILES = ("postgres", "vault", "oauth", "e2b")

OUTAGE_ENV = {
    "LOG_LEVEL": "INFO",  # the breakers' "dependency down" / "dependency back" lines in the logs
}


@dataclass
class OutageConfig:
    outage_s: float = 60.0
    lead_s: float = 10.0
    """Steady stream before the outage."""
    tail_s: float = 10.0
    """Steady stream after it."""
    rate: float | None = None
    """sandbox.created per second (None: the profile's own, `OutageRun.rate`)."""
    users: int = 5
    duplicates: float = 0.04
    """Share of the outage's sandboxes sent again during it (half the same event, half a second one)."""
    late_duplicates: int = 20
    settle_s: float = 300.0
    """Longest wait for the backlog after the stream (SANDBOX_RETRY_WINDOW_S is 300 s)."""
    seed: int = 17
    env: dict[str, str] = field(default_factory=dict)
    """More service settings (the short test profiles use shorter probe intervals)."""


@dataclass
class OutageResult:
    profile: str
    what: str
    outage_s: float = 0.0
    rate: float = 0.0
    published: int = 0
    during_outage: int = 0
    duplicates: int = 0
    injected: int = 0
    failed: int = 0
    dead_letters: int = 0
    lost: int = 0
    second_effects: int = 0
    homes_wrong: int = 0
    paused_s: dict[str, float] = field(default_factory=dict)
    last_injected_after_recovery_s: float | None = None
    outage_latency_p50_s: float | None = None
    outage_latency_max_s: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.published > 0 and self.failed == 0 and self.dead_letters == 0 and self.lost == 0
                and self.second_effects == 0 and self.homes_wrong == 0 and all(self.checks.values()))

    def lines(self) -> list[str]:
        def s(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f} s"

        paused = ", ".join(f"{k} {v:.1f} s" for k, v in self.paused_s.items()) or "nothing"
        return [
            f"profile                 {self.profile}: {self.what} for {self.outage_s:.1f} s",
            (f"published               {self.published} sandboxes at {self.rate:g}/s ({self.during_outage} during "
             "the outage)"),
            f"injected                {self.injected}/{self.published}",
            f"failed / dead letters   {self.failed} / {self.dead_letters}",
            f"lost                    {self.lost}",
            f"duplicates              {self.duplicates} sent, {self.second_effects} with a second effect",
            f"homes                   {self.homes_wrong} without their person's valid token",
            f"paused (service: dep)   {paused}",
            f"recovery                last sandbox injected {s(self.last_injected_after_recovery_s)} after recovery",
            (f"outage's sandboxes      publish → injected p50 {s(self.outage_latency_p50_s)}, "
             f"max {s(self.outage_latency_max_s)}"),
            *(f"check                   {name}: {'yes' if passed else 'NO'}" for name, passed in self.checks.items()),
            *(f"note                    {note}" for note in self.notes),
            f"verdict                 {'PASS' if self.ok else 'FAIL'} ({self.seconds:.0f} s)",
        ]


async def _quiet(_exc: Exception) -> None:
    """The harness's connection errors (none expected: NATS stays up) are not tracebacks."""


class OutageRun:
    """One profile: the stream, the outage and the figures. Subclasses say what goes down and
    how (`prepare`, `down`, `up`) and add their own checks (`during`, `verify`)."""

    name: ClassVar[str]
    what: ClassVar[str]
    backend: ClassVar[str] = "local"
    default_rate: ClassVar[float] = 25.0
    login_during_outage: ClassVar[bool] = False

    def __init__(self, workdir: Path, cfg: OutageConfig, *, log: Callable[[str], None] = print) -> None:
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed)
        self.users = [f"{self.name}-user-{i:02d}" for i in range(cfg.users)]
        self.rate = cfg.rate or self.default_rate
        self.result = OutageResult(self.name, self.what, rate=self.rate)
        self.stack: Stack | None = None
        self.nc: Any = None
        self.down_at = self.up_at = 0.0
        self.published_at: dict[str, float] = {}
        self.in_outage_seconds: list[SandboxCreated] = []
        self._late_login: str | None = None

    # --- what the profiles change ------------------------------------------------------------
    async def prepare(self) -> dict[str, str]:
        """Start what the services depend on; their extra settings."""
        return {}

    async def connect(self, js: Any) -> None:
        await common.connect_users(js, self.data_dir, self.users, nc=self.nc)

    def new_sandbox(self, index: int) -> str:
        return f"{self.name}-{index:05d}-{common.uid('s')[2:]}"

    async def down(self) -> None:
        raise NotImplementedError

    async def up(self) -> None:
        raise NotImplementedError

    async def during(self, js: Any) -> None:
        """Right after the dependency went down."""
        if self.login_during_outage:
            self._late_login = f"{self.name}-late-login"
            await common.publish(js, subjects.TOKENS_ISSUED,
                                 common.tokens_issued(common.vault_recipient(self.data_dir), self._late_login))

    async def verify(self, js: Any) -> None:
        """After the backlog settled."""
        if self._late_login is not None:
            try:
                await common.wait_connected(self.nc, [self._late_login], timeout=120)
                stored = True
            except TimeoutError:
                stored = False
            self.result.checks["the login published during the outage is stored"] = stored

    def home_token(self, sandbox_id: str) -> str | None:
        return common.credentials_token(self.data_dir, sandbox_id)

    def token_ok(self, user_id: str, token: str | None) -> bool:
        return token == common.access_token_for(user_id)

    def effect_mark(self, sandbox_id: str) -> object:
        """Changes when the sandbox is written again (a second effect)."""
        return common.credentials_inode(self.data_dir, sandbox_id)

    def written_twice(self) -> list[str]:
        """Sandboxes the backend saw written more than once (where it can tell)."""
        return []

    def other_results(self, sandbox_id: str) -> set[str]:
        """Ids of `sandbox.credentials.injected` a sandbox may rightly get besides its
        injection's (re-injections after a refresh)."""
        return set()

    async def cleanup(self) -> None:
        return None

    # --- the run --------------------------------------------------------------------------------
    async def run(self) -> OutageResult:
        r = self.result
        started = time.monotonic()
        server = EmbeddedNats(self.workdir / "nats", log_file=self.workdir / "nats-server.log").start()
        try:
            env = {**OUTAGE_ENV, "VAULT_METRICS_PORT": str(free_port()), **await self.prepare(), **self.cfg.env}
            self.stack = common.make_stack(self.data_dir, server.url, env=env)
            await self.stack.astart()
            self.nc = await nats.connect(server.url, name=f"outage-{self.name}", max_reconnect_attempts=-1,
                                         error_cb=_quiet)
            js = self.nc.jetstream()
            events = await self.plan(js)
            await self.connect(js)
            self.log(f"{self.name}: {len(self.users)} people connected, {len(events)} sandboxes to publish at "
                     f"{self.rate:g}/s; the outage starts after {self.cfg.lead_s:g} s")
            watcher = await common.ResultWatcher(self.nc).start()
            try:
                await self.stream(js, events)
                causes = [e.event_id for e in events + self.in_outage_seconds]
                self.log(f"{self.name}: stream over; waiting for the backlog")
                await watcher.wait_settled(causes, timeout=self.cfg.settle_s)
                await common.wait_consumer_idle(js, subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREATED_DURABLE,
                                                timeout=60)
                await self.verify(js)
                late = await self.late_duplicates(js, events, watcher)
                await self.measure(js, watcher, events, late)
            finally:
                await watcher.stop()
        finally:
            if self.nc is not None:
                await self.nc.close()
            if self.stack is not None:
                await asyncio.to_thread(self.stack.stop)
            await self.cleanup()
            server.stop()
        r.seconds = time.monotonic() - started
        return r

    async def plan(self, js: Any) -> list[SandboxCreated]:
        """One fresh sandbox per event, round robin over the people, each with its grant from
        auth (recorded by the vault before anything else happens)."""
        assert self.stack is not None
        total = max(1, round(self.rate * (self.cfg.lead_s + self.cfg.outage_s + self.cfg.tail_s)))
        pairs = [(self.users[i % len(self.users)], self.new_sandbox(i)) for i in range(total)]
        async with common.Grants.of(self.stack) as grants:
            events = await grants.events(pairs, backend=self.backend)
        await common.wait_grants_recorded(js)
        return events

    async def stream(self, js: Any, events: list[SandboxCreated]) -> None:
        def stored(index: int, _: Any) -> None:
            self.published_at[events[index].event_id] = time.perf_counter()

        outage = asyncio.create_task(self.outage(js, events))
        try:
            await common.publish_paced(js, [(subjects.SANDBOX_CREATED, e) for e in events], rate=self.rate,
                                       window=64, attempts=600, on_ack=stored)
        finally:
            await outage  # never left running: it brings the dependency back

    async def outage(self, js: Any, events: list[SandboxCreated]) -> None:
        await asyncio.sleep(self.cfg.lead_s)
        self.log(f"{self.name}: DOWN — {self.what}")
        await self.down()
        self.down_at = time.perf_counter()
        try:
            await self.during(js)
            await asyncio.sleep(self.cfg.outage_s / 2)
            await self.duplicate_some(js, events)
            await asyncio.sleep(max(0.0, self.down_at + self.cfg.outage_s - time.perf_counter()))
        finally:
            await self.up()
            self.up_at = time.perf_counter()
            self.result.outage_s = self.up_at - self.down_at
            self.log(f"{self.name}: UP after {self.result.outage_s:.1f} s")

    def in_outage(self, events: list[SandboxCreated]) -> list[SandboxCreated]:
        end = self.up_at or float("inf")
        return [e for e in events if self.down_at <= self.published_at.get(e.event_id, -1.0) < end]

    async def duplicate_some(self, js: Any, events: list[SandboxCreated]) -> None:
        """Half of a sample of the outage's sandboxes sent again with the same event id (another
        Nats-Msg-Id), half with a second event: all held with the rest, none may act twice."""
        pool = self.in_outage(events)
        k = min(len(pool), max(2, round(len(pool) * self.cfg.duplicates)))
        sample = self.rng.sample(pool, k)
        for event in sample[: k // 2]:
            await common.republish(js, event, f"again-{event.event_id}")
        self.in_outage_seconds = [common.sandbox_created(e.user_id, e.sandbox_id, grant=e.grant, backend=e.backend)
                                  for e in sample[k // 2:]]
        await common.publish_many(js, [(subjects.SANDBOX_CREATED, e) for e in self.in_outage_seconds])
        self.result.duplicates += k

    async def late_duplicates(self, js: Any, events: list[SandboxCreated],
                              watcher: common.ResultWatcher) -> list[SandboxCreated]:
        """After everything settled: the same again for a sample of the outage's sandboxes, whose
        marks (credentials file inode, e2b writes) must not change."""
        pool = self.in_outage(events)
        sample = self.rng.sample(pool, min(len(pool), self.cfg.late_duplicates))
        marks = {e.sandbox_id: self.effect_mark(e.sandbox_id) for e in sample}
        seconds = await common.late_duplicates(js, sample)
        await watcher.wait_settled([e.event_id for e in seconds], timeout=60)
        await common.wait_consumer_idle(js, subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREATED_DURABLE, timeout=60)
        rewritten = [sid for sid, mark in marks.items() if self.effect_mark(sid) != mark]
        self.result.duplicates += len(sample)
        self.result.second_effects += len(rewritten)
        self.result.examples["rewritten_by_late_duplicate"] = rewritten[:10]
        return seconds

    async def measure(self, js: Any, watcher: common.ResultWatcher, events: list[SandboxCreated],
                      late: list[SandboxCreated]) -> None:
        r = self.result
        assert self.stack is not None
        sandbox_of = {e.event_id: e.sandbox_id for e in events + self.in_outage_seconds + late}
        causes = list(sandbox_of)
        injected, _, failures = await common.read_results(js)
        r.published = len(events)
        r.during_outage = len(self.in_outage(events))
        r.injected = sum(1 for e in events if injected.get(e.event_id))
        r.lost = sum(1 for c in causes if not injected.get(c))
        r.failed = len(failures)
        r.dead_letters = sum((await common.dlq_counts(js)).values())
        twice = [c for c, ids in injected.items()
                 if c in sandbox_of and len(ids - self.other_results(sandbox_of[c])) > 1] + self.written_twice()
        r.second_effects += len(twice)
        r.examples["lost"] = [c for c in causes if not injected.get(c)][:10]
        r.examples["failures"] = [f"{f.reason}: {f.detail}"[:160] for f in failures[:5]]
        r.examples["second_effects"] = twice[:10]
        owners = {e.sandbox_id: e.user_id for e in events}
        wrong = [sid for sid, user in owners.items() if not self.token_ok(user, self.home_token(sid))]
        r.homes_wrong = len(wrong)
        r.examples["wrong_homes"] = wrong[:10]
        for service in ("vault", "sandbox"):
            for dependency, seconds in (await common.paused_seconds(self.stack, service)).items():
                if seconds:
                    r.paused_s[f"{service}: {dependency}"] = round(seconds, 1)
        sandbox, vault = await common.scrape(self.stack, "sandbox"), await common.scrape(self.stack, "vault")
        retried = common.metric(sandbox, "ccbridge_sandbox_injections_total", outcome="retry")
        r.notes.append(f"sandbox.created retried with backoff (not held) {retried:.0f} times")
        internal = common.metric(vault, "ccbridge_vault_credential_requests_total", outcome="internal")
        r.checks["the vault answered no credentials request `internal`"] = internal == 0
        arrivals = [t for c in causes[: len(events) + len(self.in_outage_seconds)]
                    if (t := watcher.first_injected_at(c)) is not None]
        if arrivals and self.up_at:
            r.last_injected_after_recovery_s = round(max(arrivals) - self.up_at, 1)
        waits = [t - self.published_at[e.event_id] for e in self.in_outage(events)
                 if (t := watcher.first_injected_at(e.event_id)) is not None]
        if waits:
            r.outage_latency_p50_s = round(common.percentile(waits, 50), 1)
            r.outage_latency_max_s = round(max(waits), 1)


# --- the profiles ------------------------------------------------------------------------------------
class PostgresOutage(OutageRun):
    name = "postgres"
    what = "the vault's PostgreSQL stopped (pg_ctl stop -m fast)"
    login_during_outage = True
    pg: PrivatePostgres | None = None

    async def prepare(self) -> dict[str, str]:
        self.pg = PrivatePostgres()
        await asyncio.to_thread(self.pg.start)
        return {"DATABASE_URL": self.pg.url}

    async def down(self) -> None:
        assert self.pg is not None
        await asyncio.to_thread(self.pg.stop, "fast")

    async def up(self) -> None:
        assert self.pg is not None
        await asyncio.to_thread(self.pg.start)

    async def cleanup(self) -> None:
        if self.pg is not None:
            await asyncio.to_thread(self.pg.destroy)


class VaultOutage(OutageRun):
    name = "vault"
    what = "the vault process killed (SIGKILL), then started again"
    login_during_outage = True

    async def down(self) -> None:
        assert self.stack is not None
        await asyncio.to_thread(self.stack.kill, "vault", signal.SIGKILL)

    async def up(self) -> None:
        """Back = answering again (a fresh process needs a few seconds to start)."""
        assert self.stack is not None
        self.stack.start_service("vault")
        deadline = time.monotonic() + 60
        while await common.connection_status(self.nc, self.users[0], timeout=0.5) is None:
            self.stack.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("the vault did not come back within 60 s")
            await asyncio.sleep(0.1)


_PASTE = re.compile(r'id="paste-code">([^<]+)<')


async def login_through_auth(http: httpx.AsyncClient, stack: Stack, user_id: str) -> httpx.Response:
    """A person connects their Claude account the way the connect page does: auth's login,
    the OAuth authorize page (the stand-in approves at once and shows `<code>#<state>`), auth's
    exchange — whose answer is returned (202: auth publishes the sealed tokens; no token passes
    through here)."""
    secret = stack.service_env()["AUTH_JWT_SECRET"]
    caller = {"Authorization": f"Bearer {mint_caller_token(secret, user_id, ttl_s=3600)}"}
    started = await http.post(f"{stack.auth_url}/v1/claude-code/login", headers=caller)
    started.raise_for_status()
    page = await http.get(started.json()["authorize_url"], follow_redirects=True)
    match = _PASTE.search(page.text)
    if page.status_code != 200 or match is None:
        raise RuntimeError(f"the authorize page did not show a code ({page.status_code})")
    return await http.post(f"{stack.auth_url}/v1/claude-code/exchange", headers=caller,
                           json={"code": html.unescape(match.group(1))})


class OAuthOutage(OutageRun):
    name = "oauth"
    what = "the OAuth token endpoint answering 503 while every access token is due for a refresh"
    oauth: OAuthStandin | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refreshed: list[tuple[str, float]] = []
        self.refresh_ids: set[str] = set()
        self.reconnects: list[str] = []
        # Due about when the outage starts (it starts `lead_s` after the people connect), and
        # valid well past its end: the refresh falls into the outage, the token outlives it.
        self.due_after_s = self.cfg.lead_s + 1.5
        self.lifetime_s = int(self.due_after_s + self.cfg.outage_s + max(60.0, self.cfg.outage_s))

    async def prepare(self) -> dict[str, str]:
        self.oauth = await OAuthStandin(port=0, access_token_lifetime=self.lifetime_s).start()
        return {
            "OAUTH_AUTHORIZE_URL": self.oauth.claude_ai_authorize_url,
            "OAUTH_CONSOLE_AUTHORIZE_URL": self.oauth.console_authorize_url,
            "OAUTH_TOKEN_URL": self.oauth.token_url,
            "OAUTH_TOKEN_URLS": self.oauth.token_url,
            "OAUTH_REDIRECT_URI": self.oauth.callback_url,
            "VAULT_REFRESH_ENABLED": "true",
            "VAULT_REFRESH_INTERVAL_S": "1",
            "VAULT_REFRESH_MARGIN_S": f"{self.lifetime_s - self.due_after_s:g}",
        }

    async def connect(self, js: Any) -> None:
        assert self.stack is not None
        for subject, cb in ((subjects.TOKENS_REFRESHED, self._on_refreshed),
                            (subjects.TOKENS_RECONNECT_REQUIRED, self._on_reconnect)):
            await self.nc.subscribe(subject, cb=cb)
        async with httpx.AsyncClient(timeout=30) as http:
            for user in self.users:
                done = await login_through_auth(http, self.stack, user)
                if done.status_code != 202:
                    raise RuntimeError(f"exchange answered {done.status_code}: {done.text[:200]}")
        await common.wait_connected(self.nc, self.users)

    async def during(self, js: Any) -> None:
        """A person connecting during the outage is told so (auth's problem+json), then tries
        again after it (in `verify`)."""
        assert self.stack is not None
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await login_through_auth(http, self.stack, "oauth-late-login")
        problem = answer.headers.get("content-type", "").startswith("application/problem+json")
        self.result.checks["a login during the outage is answered 502/503 problem+json"] = (
            answer.status_code in (502, 503) and problem)
        slug = str(answer.json().get("type", "")).rsplit("/", 1)[-1] if problem else answer.text[:80]
        self.result.notes.append(f"the login during the outage was answered {answer.status_code} {slug}")

    async def _on_refreshed(self, msg: Msg) -> None:
        event = json.loads(msg.data)
        self.refreshed.append((event["user_id"], time.perf_counter()))
        self.refresh_ids.add(event["event_id"])

    async def _on_reconnect(self, msg: Msg) -> None:
        self.reconnects.append(json.loads(msg.data)["user_id"])

    async def down(self) -> None:
        assert self.oauth is not None
        self.oauth.state.outage(self.cfg.outage_s + 600, status=503)  # ended by `up`

    async def up(self) -> None:
        assert self.oauth is not None
        self.oauth.state.outage(0)
        # tokens refreshed from now on live 8 h: one refresh after the outage, not a refresh storm
        self.oauth.state.access_token_lifetime = 28_800

    async def verify(self, js: Any) -> None:
        assert self.oauth is not None and self.stack is not None
        async with httpx.AsyncClient(timeout=30) as http:
            again = await login_through_auth(http, self.stack, "oauth-late-login")
        try:
            await common.wait_connected(self.nc, ["oauth-late-login"], timeout=60)
            stored = again.status_code == 202
        except TimeoutError:
            stored = False
        self.result.checks["the same login after the outage is stored"] = stored
        deadline = time.monotonic() + max(120.0, self.lifetime_s)
        while not self._all_refreshed_after_recovery() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        after = {u: t - self.up_at for u, t in self.refreshed if t >= self.up_at}
        refused = self.oauth.state.stats["outage"]
        r = self.result
        r.checks["refresh attempts met the outage (answered 503)"] = refused > 0
        r.checks["no tokens.reconnect_required"] = not self.reconnects
        r.checks[f"every person's refresh succeeded after recovery ({len(after)}/{len(self.users)})"] = (
            len(after) == len(self.users))
        r.notes.append(f"{refused} refresh attempts answered 503 during the outage")
        if after:
            r.notes.append(f"refreshed {min(after.values()):.1f}–{max(after.values()):.1f} s after recovery")
        # the refreshes re-inject every live sandbox: let that settle before the late duplicates
        await common.wait_consumer_idle(js, subjects.TOKENS_STREAM.name, subjects.SANDBOX_TOKENS_REFRESHED_DURABLE,
                                        timeout=120)

    def other_results(self, sandbox_id: str) -> set[str]:
        return {derived_event_id(f"{refresh}:{sandbox_id}", "reinjected") for refresh in self.refresh_ids}

    def _all_refreshed_after_recovery(self) -> bool:
        return {u for u, t in self.refreshed if t >= self.up_at} >= set(self.users)

    def token_ok(self, user_id: str, token: str | None) -> bool:
        assert self.oauth is not None
        return token is not None and self.oauth.state.access_token_valid(token)

    async def cleanup(self) -> None:
        if self.oauth is not None:
            await self.oauth.stop()


class E2BOutage(OutageRun):
    name = "e2b"
    what = "e2b's API answering 429 and 502 in turn (envd up)"
    backend = "e2b"
    # the stand-in (envd's shell included) runs in this process: at 25/s it, not the service,
    # would be the bottleneck, and the backlog after the outage would measure it
    default_rate = 10.0
    e2b: E2BStandin | None = None

    async def prepare(self) -> dict[str, str]:
        self.e2b = await E2BStandin(self.workdir / "e2b").start()
        return self.e2b.env()

    def new_sandbox(self, index: int) -> str:
        assert self.e2b is not None
        return self.e2b.add_sandbox(f"i{index:05d}{common.uid('s')[2:]}").sandbox_id

    async def down(self) -> None:
        assert self.e2b is not None
        self.e2b.outage(self.cfg.outage_s + 600)  # ended by `up`

    async def up(self) -> None:
        assert self.e2b is not None
        self.e2b.clear_faults()

    def home_token(self, sandbox_id: str) -> str | None:
        assert self.e2b is not None
        try:
            data = json.loads(self.e2b.sandboxes[sandbox_id].read("/home/user/.claude/.credentials.json"))
            return str(data["claudeAiOauth"]["accessToken"])
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def uploads(self, sandbox_id: str) -> int:
        assert self.e2b is not None
        return self.e2b.count("POST", "/files", sandbox_id)

    def effect_mark(self, sandbox_id: str) -> object:
        return self.uploads(sandbox_id)

    def written_twice(self) -> list[str]:
        assert self.e2b is not None
        return [sid for sid in self.e2b.sandboxes if self.uploads(sid) > 1]

    async def cleanup(self) -> None:
        if self.e2b is not None:
            await self.e2b.stop()


RUNS: dict[str, type[OutageRun]] = {run.name: run for run in (PostgresOutage, VaultOutage, OAuthOutage, E2BOutage)}


async def run_profile(name: str, cfg: OutageConfig, workdir: Path | None = None, *,
                      log: Callable[[str], None] = print) -> OutageResult:
    """Run one profile in `workdir` (kept), or in a temp dir removed afterwards."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return await RUNS[name](Path(workdir), cfg, log=log).run()
    with tempfile.TemporaryDirectory(prefix=f"ccbridge-outage-{name}-") as scratch:
        return await RUNS[name](Path(scratch), cfg, log=log).run()


def main(argv: list[str] | None = None) -> None:
    defaults = OutageConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.outages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=(*PROFILES, "all"), default="all")
    parser.add_argument("--outage-s", type=float, default=defaults.outage_s)
    parser.add_argument("--lead-s", type=float, default=defaults.lead_s)
    parser.add_argument("--tail-s", type=float, default=defaults.tail_s)
    parser.add_argument("--rate", type=float, help="sandbox.created per second (default: 25, e2b 10)")
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--workdir", type=Path, help="keep each profile's stack (logs, stores) under here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    cfg = OutageConfig(outage_s=args.outage_s, lead_s=args.lead_s, tail_s=args.tail_s, rate=args.rate,
                       users=args.users)
    names = PROFILES if args.profile == "all" else (args.profile,)
    results: list[OutageResult] = []
    for name in names:
        workdir = args.workdir / name if args.workdir else None
        result = asyncio.run(run_profile(name, cfg, workdir, log=lambda t: print(f"  · {t}", file=sys.stderr,
                                                                                  flush=True)))
        results.append(result)
        print("\n".join(result.lines()) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"ok": r.ok} for r in results], indent=2) + "\n")
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
