"""Building blocks shared by the benchmark, the chaos run and the reliability tests.

Everything talks to the services the way a platform would: events on the bus (built with
shared.events, sealed with shared.sealing to the vault's public key), files in sandbox homes,
rows in the vault's SQLite file. No service module is imported.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from ccbridge import devtools
from ccbridge.demo import mint_caller_token
from ccbridge.devtools import sealed_tokens_issued
from ccbridge.embedded_nats import free_port
from ccbridge.stack import Stack
from shared import subjects
from shared.broker import settle, stream_for
from shared.events import (
    ConnectionStatusReply,
    ConnectionStatusRequest,
    Event,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxCredentialsInjected,
    SandboxOptions,
    TokensIssued,
    new_event_id,
)
from shared.sealing import Recipient

SCOPES = ["user:inference", "user:profile", "user:sessions:claude_code"]
HOUR_MS = 3600 * 1000


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def access_token_for(user_id: str, tag: str = "") -> str:
    """Token-shaped, unique and recognisable (the credentials file of each sandbox must hold
    exactly the token of its user)."""
    return f"sk-ant-oat01-bench{tag}{uuid.uuid5(uuid.NAMESPACE_URL, user_id + tag).hex}"


# --- events --------------------------------------------------------------------------
def vault_recipient(data_dir: Path) -> Recipient:
    """The vault's public key of the stack in `data_dir` (its keys/ directory)."""
    return devtools.vault_recipient(Path(data_dir) / "keys")


def tokens_issued(
    vault: Recipient,
    user_id: str,
    *,
    access_token: str | None = None,
    refresh_token: str | None = None,
    event_id: str | None = None,
    expires_at: int | None = None,
    scopes: Sequence[str] = SCOPES,
) -> TokensIssued:
    """A `tokens.issued` exactly as the auth service sends it: bundle sealed to the vault,
    HPKE info bound to the subject and this event's id."""
    return sealed_tokens_issued(
        vault, user_id, access_token or access_token_for(user_id),
        refresh_token=refresh_token or f"sk-ant-ort01-bench{uuid.uuid4().hex}", kind="oauth", event_id=event_id,
        expires_at=expires_at or int(time.time() * 1000) + 8 * HOUR_MS, scopes=list(scopes))


def sandbox_created(
    user_id: str, sandbox_id: str | None = None, *, event_id: str | None = None, mode: str | None = None,
    grant: str | None = None, backend: str = "local",
) -> SandboxCreated:
    """A `sandbox.created` as a platform publishes it; `grant` from auth (`Grants`), required
    by the vault unless it runs with CCBRIDGE_GRANTS=off."""
    return SandboxCreated(
        event_id=event_id or new_event_id(),
        user_id=user_id,
        sandbox_id=sandbox_id or uid("sbx"),
        backend=backend,
        grant=grant,
        options=SandboxOptions(mode=mode),
    )


def encode(event: Event) -> tuple[bytes, dict[str, str]]:
    return event.model_dump_json().encode(), {subjects.MSG_ID_HEADER: event.event_id}


async def publish(js: JetStreamContext, subject: str, event: Event, *, timeout: float = 10.0) -> Any:
    body, headers = encode(event)
    return await js.publish(subject, body, headers=headers, stream=stream_for(subject), timeout=timeout)


async def publish_many(
    js: JetStreamContext, items: Iterable[tuple[str, Event]], *, window: int = 256, retries: int = 60
) -> int:
    """Publish with up to `window` JetStream acks outstanding. A publish that fails (server
    restarting, no ack in time) is retried with the same Nats-Msg-Id, so it lands once."""
    return await publish_paced(js, list(items), window=window, attempts=retries)


async def publish_paced(
    js: JetStreamContext, items: Sequence[tuple[str, Event]], *, rate: float = 0.0, window: int = 256,
    attempts: int = 60, timeout: float = 5.0, on_ack: Callable[[int, Any], None] | None = None,
) -> int:
    """Publish `items` in order, the i-th no earlier than start + i/`rate` (0: as fast as the
    window allows), with up to `window` JetStream acks outstanding. A publish that fails (server
    restarting, no ack in time) is retried with the same Nats-Msg-Id, so it lands once.
    `on_ack(i, ack)` is called as each one is stored."""
    gate = asyncio.Semaphore(window)
    start = time.monotonic()

    async def one(index: int, subject: str, event: Event) -> None:
        try:
            for attempt in range(attempts):
                try:
                    ack = await publish(js, subject, event, timeout=timeout)
                except (TimeoutError, nats.errors.Error, OSError):
                    await asyncio.sleep(min(1.0, 0.1 * (attempt + 1)))
                    continue
                if on_ack is not None:
                    on_ack(index, ack)
                return
            raise RuntimeError(f"could not publish {subject} {event.event_id}")
        finally:
            gate.release()

    tasks: list[asyncio.Task[None]] = []
    for index, (subject, event) in enumerate(items):
        if rate:
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await gate.acquire()
        tasks.append(asyncio.create_task(one(index, subject, event)))
    await asyncio.gather(*tasks)
    return len(tasks)


async def republish(js: JetStreamContext, event: SandboxCreated, msg_id: str) -> None:
    """`event` again under another Nats-Msg-Id: a duplicate JetStream's dedupe does not catch
    (a platform retrying after its window, a replayed dead letter)."""
    body, _ = encode(event)
    await js.publish(subjects.SANDBOX_CREATED, body, headers={subjects.MSG_ID_HEADER: msg_id},
                     stream=subjects.SANDBOX_STREAM.name)


async def late_duplicates(js: JetStreamContext, sample: Sequence[SandboxCreated]) -> list[SandboxCreated]:
    """Duplicates of settled sandboxes that slip past JetStream's dedupe: the first half of
    `sample` republished with the same event id (another Nats-Msg-Id), the second half as second
    events for the same sandboxes (same grant, same backend). Returns the second events: new
    causes, each owed its own result, none owed a second write."""
    half = len(sample) // 2
    for event in sample[:half]:
        await republish(js, event, f"late-{event.event_id}")
    seconds = [sandbox_created(e.user_id, e.sandbox_id, grant=e.grant, backend=e.backend) for e in sample[half:]]
    await publish_many(js, [(subjects.SANDBOX_CREATED, e) for e in seconds])
    return seconds


# --- grants: auth's POST /v1/claude-code/grants, the way a platform asks for them ------------------
class Grants:
    """One grant per sandbox from auth's documented route (docs/auth.md "Grants"): the person's
    caller token (HS256 with the stack's AUTH_JWT_SECRET, `sub` = user id, one per person) and
    `POST /v1/claude-code/grants {"sandbox_id", "mode"}` → 201 `{"grant", ...}`. A grant allows
    its mode and the weaker ones (access_only < env < file): ask for the strongest mode the
    sandbox's events use. At most
    `concurrency` requests in flight; 429 (rate limit), 503 (bus unavailable) and connection
    errors are retried. Grants are setup, never part of a timed section.

        async with common.Grants.of(stack) as grants:
            events = await grants.events([(user, sandbox_id), ...])
    """

    def __init__(self, auth_url: str, jwt_secret: str, *, concurrency: int = 16, timeout: float = 30.0,
                 attempts: int = 60) -> None:
        self.auth_url = auth_url.rstrip("/")
        self._secret = jwt_secret
        self._concurrency = max(1, concurrency)
        self._gate = asyncio.Semaphore(self._concurrency)
        self._timeout = timeout
        self._attempts = attempts
        self._callers: dict[str, str] = {}
        self._http: httpx.AsyncClient | None = None

    @classmethod
    def of(cls, stack: Stack, **kwargs: Any) -> Grants:
        """For a stack started with `make_stack` (auth among its services)."""
        return cls(stack.auth_url, stack.service_env()["AUTH_JWT_SECRET"], **kwargs)

    async def __aenter__(self) -> Grants:
        limits = httpx.Limits(max_connections=self._concurrency, max_keepalive_connections=self._concurrency)
        self._http = httpx.AsyncClient(base_url=self.auth_url, timeout=self._timeout, limits=limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _caller(self, user_id: str) -> str:
        token = self._callers.get(user_id)
        if token is None:  # a day: long runs (soak, chaos) reuse it
            token = self._callers[user_id] = mint_caller_token(self._secret, user_id, ttl_s=86_400)
        return token

    async def grant(self, user_id: str, sandbox_id: str, mode: str = "access_only") -> str:
        """The grant (compact JWS) of `user_id` for `sandbox_id`, allowing `mode`."""
        assert self._http is not None, "use `async with Grants(...)`"
        headers = {"Authorization": f"Bearer {self._caller(user_id)}"}
        body = {"sandbox_id": sandbox_id, "mode": mode}
        async with self._gate:
            for attempt in range(1, self._attempts + 1):
                try:
                    response = await self._http.post("/v1/claude-code/grants", json=body, headers=headers)
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code == 201:
                    return str(response.json()["grant"])
                if response is not None and response.status_code not in (429, 502, 503, 504):
                    raise RuntimeError(f"grant for {sandbox_id}: {response.status_code} {response.text[:300]}")
                if attempt < self._attempts:
                    retry_after = response.headers.get("Retry-After") if response is not None else None
                    await asyncio.sleep(min(2.0, float(retry_after)) if retry_after else min(1.0, 0.05 * attempt))
        raise RuntimeError(f"no grant for {sandbox_id} after {self._attempts} attempts")

    async def many(self, wanted: Iterable[tuple[str, str, str]]) -> dict[str, str]:
        """sandbox_id → grant for each (user_id, sandbox_id, mode), `concurrency` at a time."""
        items = list(wanted)
        tokens = await asyncio.gather(*(self.grant(u, s, m) for u, s, m in items))
        return {sandbox_id: token for (_, sandbox_id, _), token in zip(items, tokens, strict=True)}

    async def events(self, sandboxes: Iterable[tuple[str, str]], *, mode: str | None = None,
                     backend: str = "local") -> list[SandboxCreated]:
        """A granted `sandbox.created` for each (user_id, sandbox_id), in order, in `mode` (None:
        the service's default, access_only); each grant allows exactly that mode."""
        pairs = list(sandboxes)
        granted = await self.many((u, s, mode or "access_only") for u, s in pairs)
        return [sandbox_created(u, s, mode=mode, grant=granted[s], backend=backend) for u, s in pairs]


async def connect_users(js: JetStreamContext, data_dir: Path, users: Sequence[str], *, timeout: float = 120.0,
                        nc: NatsClient | None = None) -> None:
    """Connect each person's Claude account the way auth does (a sealed `tokens.issued`) and
    wait until the vault has stored every one: read from its SQLite file, or — given `nc` —
    asked over `vault.connections.status` (any database)."""
    vault = vault_recipient(data_dir)
    await publish_many(js, [(subjects.TOKENS_ISSUED, tokens_issued(vault, u)) for u in users])
    if nc is not None:
        await wait_connected(nc, users, timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    while not set(users) <= connection_users(db_path(data_dir)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the vault stored {len(connection_users(db_path(data_dir)) & set(users))} "
                               f"of {len(users)} users")
        await asyncio.sleep(0.1)


async def connection_status(nc: NatsClient, user_id: str, *, timeout: float = 2.0) -> ConnectionStatusReply | None:
    """What the vault holds for `user_id` (`vault.connections.status`, what auth asks); None when
    the vault does not answer (down, or its database is)."""
    request = ConnectionStatusRequest(user_id=user_id).model_dump_json().encode()
    try:
        reply = await nc.request(subjects.VAULT_CONNECTIONS_STATUS, request, timeout=timeout)
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    return ConnectionStatusReply.model_validate_json(reply.data)


async def wait_connected(nc: NatsClient, users: Sequence[str], *, timeout: float = 120.0) -> None:
    """Until the vault says every one of `users` is connected (TimeoutError after `timeout`)."""
    deadline = time.monotonic() + timeout
    waiting = list(users)
    while waiting:
        status = await connection_status(nc, waiting[0])
        if status is not None and status.connected:
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"the vault stored {len(users) - len(waiting)} of {len(users)} users")
        await asyncio.sleep(0.1)


# --- watching results ----------------------------------------------------------------------
@dataclass
class Result:
    subject: str
    event: SandboxCredentialsInjected | SandboxCredentialsFailed
    at: float


@dataclass
class ResultWatcher:
    """Every `sandbox.credentials.*` seen on core NATS, by cause event id, with arrival time."""

    nc: NatsClient
    results: dict[str, list[Result]] = field(default_factory=lambda: defaultdict(list))
    by_event_id: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _sub: Any = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _waiters: dict[str, asyncio.Future[Result]] = field(default_factory=dict)

    async def start(self) -> ResultWatcher:
        self._sub = await self.nc.subscribe("sandbox.credentials.*", cb=self._on_msg)
        await settle(self.nc)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        now = time.perf_counter()
        model = SandboxCredentialsInjected if msg.subject == subjects.SANDBOX_CREDENTIALS_INJECTED else SandboxCredentialsFailed
        try:
            event = model.model_validate_json(msg.data)
        except ValueError:
            return
        result = Result(msg.subject, event, now)
        self.results[event.cause_event_id].append(result)
        self.by_event_id[event.event_id] += 1
        waiter = self._waiters.pop(event.cause_event_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(result)
        self._changed.set()

    def expect(self, cause: str) -> asyncio.Future[Result]:
        """A future for the first result of `cause` (call before publishing it)."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters[cause] = future
        return future

    def injected(self, cause: str) -> list[Result]:
        return [r for r in self.results.get(cause, ()) if r.subject == subjects.SANDBOX_CREDENTIALS_INJECTED]

    def first_injected_at(self, cause: str) -> float | None:
        found = self.injected(cause)
        return found[0].at if found else None

    def settled(self, causes: Iterable[str]) -> int:
        return sum(1 for c in causes if self.results.get(c))

    async def wait_settled(self, causes: Sequence[str], timeout: float, *, injected_only: bool = False) -> int:
        """Wait until every cause has a result (or an injected one); returns how many do."""
        deadline = time.monotonic() + timeout
        while True:
            count = (
                sum(1 for c in causes if self.injected(c)) if injected_only else self.settled(causes)
            )
            if count >= len(causes) or time.monotonic() > deadline:
                return count
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=0.5)
            except TimeoutError:
                pass


# --- the stack -------------------------------------------------------------------------------
def stack_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for services under test: SQLite in the data dir, sandboxes under it, no
    metrics port (several stacks run side by side), no token refresh (it would call the real
    OAuth server; tests that want it point OAUTH_TOKEN_URL at the stand-in and turn it on).
    Auth gets a caller-token secret of its own (`Grants.of(stack)` mints with it) and grant
    rate limits far above the default 60/min, burst 30, per person: a harness asks for
    thousands of grants for 20-50 people in its setup phase, and would otherwise wait minutes."""
    data_dir = Path(data_dir).resolve()
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / 'vault.db'}",
        "LOCAL_SANDBOX_ROOT": str(data_dir / "sandboxes"),
        "LOG_FORMAT": "json",
        "VAULT_METRICS_PORT": "0",
        "VAULT_REFRESH_ENABLED": "false",
        "AUTH_JWT_SECRET": secrets.token_urlsafe(32),
        "AUTH_GRANT_RATE_LIMIT_PER_MINUTE": "100000",
        "AUTH_GRANT_RATE_LIMIT_BURST": "100000",
    }
    env.update(extra)
    return env


def make_stack(data_dir: Path, nats_url: str, *, services: tuple[str, ...] = ("vault", "sandbox", "auth"),
               env: Mapping[str, str] | None = None, **more_env: str) -> Stack:
    """The services as processes on `nats_url`; auth (on a free loopback port) issues the grants
    every `sandbox.created` needs."""
    auth_port = free_port() if "auth" in services else None
    return Stack(Path(data_dir), nats_url=nats_url, env=stack_env(data_dir, **{**(env or {}), **more_env}),
                 services=services,
                 auth_port=auth_port)


def sandbox_home(data_dir: Path, sandbox_id: str) -> Path:
    return Path(data_dir).resolve() / "sandboxes" / sandbox_id


def credentials_token(data_dir: Path, sandbox_id: str) -> str | None:
    """The access token in a sandbox's `.claude/.credentials.json`, or None."""
    path = sandbox_home(data_dir, sandbox_id) / ".claude" / ".credentials.json"
    try:
        return json.loads(path.read_text())["claudeAiOauth"]["accessToken"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def credentials_inode(data_dir: Path, sandbox_id: str) -> int | None:
    """The inode of a sandbox's credentials file: a rewrite (atomic replace) changes it."""
    try:
        return (sandbox_home(data_dir, sandbox_id) / ".claude" / ".credentials.json").stat().st_ino
    except OSError:
        return None


# --- the vault's database (read-only, from outside) ------------------------------------------
def db_path(data_dir: Path) -> Path:
    return Path(data_dir).resolve() / "vault.db"


def _ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)


def count_rows(db: Path, table: str, where: str = "", params: Sequence[Any] = ()) -> int:
    if not Path(db).exists():
        return 0
    try:
        with _ro(db) as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table} {where}", tuple(params)).fetchone()[0])
    except sqlite3.OperationalError:  # table not created yet
        return 0


def connection_users(db: Path) -> set[str]:
    try:
        with _ro(db) as conn:
            return {r[0] for r in conn.execute("SELECT user_id FROM connections")}
    except sqlite3.OperationalError:
        return set()


# --- JetStream state ---------------------------------------------------------------------------
async def stream_subject_counts(js: JetStreamContext, stream: str, filter_subject: str = ">") -> dict[str, int]:
    try:
        info = await js.stream_info(stream, subjects_filter=filter_subject)
    except NotFoundError:
        return {}
    return dict(info.state.subjects or {})


async def dlq_counts(js: JetStreamContext) -> dict[str, int]:
    return await stream_subject_counts(js, subjects.DLQ_STREAM.name, "dlq.>")


async def dlq_messages(js: JetStreamContext) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every dead letter (subject, body, headers), read with an ephemeral ordered consumer."""
    out: list[tuple[str, bytes, dict[str, str]]] = []
    try:
        info = await js.stream_info(subjects.DLQ_STREAM.name)
    except NotFoundError:
        return out
    total = info.state.messages
    if not total:
        return out
    sub = await js.subscribe("dlq.>", stream=subjects.DLQ_STREAM.name, ordered_consumer=True)
    try:
        while len(out) < total:
            try:
                msg = await sub.next_msg(timeout=5)
            except nats.errors.TimeoutError:
                break
            out.append((msg.subject, msg.data, dict(msg.headers or {})))
    finally:
        await sub.unsubscribe()
    return out


async def injected_count(js: JetStreamContext) -> int:
    counts = await stream_subject_counts(js, subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREDENTIALS_INJECTED)
    return counts.get(subjects.SANDBOX_CREDENTIALS_INJECTED, 0)


async def read_results(
    js: JetStreamContext,
) -> tuple[dict[str, set[str]], int, list[SandboxCredentialsFailed]]:
    """From the durable record (the stream), not from what a core subscriber happened to see:
    cause event id → distinct injected event ids, raw injected message count, failed events."""
    injected: dict[str, set[str]] = defaultdict(set)
    failures: list[SandboxCredentialsFailed] = []
    counts = await stream_subject_counts(js, subjects.SANDBOX_STREAM.name, "sandbox.credentials.>")
    total = sum(counts.values())
    raw = 0
    if not total:
        return injected, 0, failures
    sub = await js.subscribe("sandbox.credentials.>", stream=subjects.SANDBOX_STREAM.name, ordered_consumer=True)
    try:
        seen = 0
        while seen < total:
            try:
                msg = await sub.next_msg(timeout=10)
            except nats.errors.TimeoutError:
                break
            seen += 1
            if msg.subject == subjects.SANDBOX_CREDENTIALS_INJECTED:
                event = SandboxCredentialsInjected.model_validate_json(msg.data)
                injected[event.cause_event_id].add(event.event_id)
                raw += 1
            elif msg.subject == subjects.SANDBOX_CREDENTIALS_FAILED:
                failures.append(SandboxCredentialsFailed.model_validate_json(msg.data))
    finally:
        await sub.unsubscribe()
    return injected, raw, failures


async def wait_pipeline_idle(js: JetStreamContext, expected_injected: int, timeout: float, *,
                             quiet_s: float = 2.0) -> bool:
    """Until the sandbox.created consumer has nothing pending or unacked and the stream holds at
    least `expected_injected` injected results (and stays so for `quiet_s`)."""
    deadline = time.monotonic() + timeout
    idle_since: float | None = None
    while time.monotonic() < deadline:
        try:
            info = await js.consumer_info(subjects.SANDBOX_STREAM.name, subjects.SANDBOX_CREATED_DURABLE)
            idle = (info.num_pending == 0 and info.num_ack_pending == 0
                    and await injected_count(js) >= expected_injected)
        except (TimeoutError, nats.errors.Error):
            idle = False
        if idle:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= quiet_s:
                return True
        else:
            idle_since = None
        await asyncio.sleep(0.5)
    return False


async def wait_consumer_idle(js: JetStreamContext, stream: str, durable: str, timeout: float) -> bool:
    """Until the durable consumer has nothing pending or unacked (False after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = await js.consumer_info(stream, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return True
        except (TimeoutError, nats.errors.Error):
            pass
        await asyncio.sleep(0.2)
    return False


async def wait_grants_recorded(js: JetStreamContext, timeout: float = 120.0) -> bool:
    """Until the vault has recorded every `grants.issued` auth published (so a harness's grant
    setup is over before it measures anything)."""
    return await wait_consumer_idle(js, subjects.TOKENS_STREAM.name, subjects.VAULT_GRANTS_ISSUED_DURABLE, timeout)


# --- the services' /metrics -------------------------------------------------------------------
def metrics_url(stack: Stack, service: str) -> str | None:
    """Where `service` of a running stack serves /metrics (None: its listener is off)."""
    if service == "auth":
        return f"{stack.auth_url}/metrics"
    port = stack.service_env(service).get(f"{service.upper()}_METRICS_PORT", "0")
    return f"http://127.0.0.1:{port}/metrics" if port and port != "0" else None


async def scrape(stack: Stack, service: str) -> list[Any]:
    """The samples (prometheus_client `Sample`s) of `service`'s /metrics; [] when it serves none
    or does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    url = metrics_url(stack, service)
    if url is None:
        return []
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            text = (await http.get(url)).text
    except httpx.HTTPError:
        return []
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def metric(samples: Iterable[Any], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


async def paused_seconds(stack: Stack, service: str) -> dict[str, float]:
    """`ccbridge_<service>_dependency_paused_seconds_total` by dependency, from its /metrics."""
    wanted = f"ccbridge_{service}_dependency_paused_seconds_total"
    return {s.labels["dependency"]: s.value for s in await scrape(stack, service) if s.name == wanted}


def rss_mb(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 1e6
    except psutil.Error:
        return None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
