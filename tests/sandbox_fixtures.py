"""Helpers shared by the sandbox service's tests: a fake vault answering `vault.credentials.get`
on real NATS (sealed to the requester's key with shared.sealing), a collector of result
events, publishing helpers, a reader of what JetStream stored, the real Claude Code CLI runner,
the e2b stand-in fixture and a puller that copies a stand-in sandbox's files back into a temp
home through the real e2b SDK.

Import the fixtures you use into the test module (`from tests.sandbox_fixtures import nc, …`).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import TypeAdapter

from services.sandbox.app import SandboxService
from services.sandbox.settings import SandboxSettings
from shared import subjects
from shared.broker import settle
from shared.events import (
    AnyCredentialsRequest,
    CredentialsBatchReply,
    CredentialsBatchRequest,
    CredentialsItem,
    CredentialsItemResult,
    CredentialsReply,
    CredentialsRequest,
    Event,
    ReleasedItem,
    ReleasedItems,
    SandboxCreated,
    TokenBundle,
)
from shared.grants import GrantError
from shared.sealing import Recipient, reply_binding, seal
from standins.e2b import E2BStandin

REPO = Path(__file__).resolve().parents[1]
WAIT = 60.0  # guard against hangs only; nothing asserts on timing
SCOPES = ["user:inference", "user:profile", "user:sessions:claude_code"]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def make_bundle(*, refresh: bool = True) -> TokenBundle:
    return TokenBundle(
        access_token=f"sk-ant-oat01-{uuid.uuid4().hex}",
        refresh_token=f"sk-ant-ort01-{uuid.uuid4().hex}" if refresh else None,
        expires_at=int(time.time() * 1000) + 8 * 3600 * 1000,
        scopes=SCOPES,
    )


# --- a stand-in vault on real NATS ------------------------------------------------------
_REQUEST: TypeAdapter[Any] = TypeAdapter(AnyCredentialsRequest)


def _grant_refusal(request: CredentialsRequest | CredentialsItem) -> tuple[Any, str] | None:
    """(error, detail) when the real vault would refuse this request's grant."""
    from tests.grants import verifier

    if request.grant is None:
        return "grant_required", "no grant"
    try:
        verifier().check(request.grant, user_id=request.user_id, sandbox_id=request.sandbox_id, mode=request.mode,
                         now_s=time.time())
    except GrantError as exc:
        return "grant_invalid", exc.detail
    return None


@dataclass
class FakeVault:
    """Answers `vault.credentials.get` like the vault: checks the grant (signed by the test
    authority in tests/grants.py, for this person, sandbox and mode), then the TokenBundle sealed
    to the requester and bound to person and sandbox (without the refresh token unless the mode
    is `file`, as the real vault does).

    users: user_id → TokenBundle | "not_connected" | "reconnect_required" | "silent" (never
    answers) | "silent_once" (ignores the first request, then answers with `late_bundles`)."""

    nc: Client
    users: dict[str, Any] = field(default_factory=dict)
    requests: list[CredentialsRequest | CredentialsItem] = field(default_factory=list)
    requesters: list[str] = field(default_factory=list)  # the key id each request named
    late_bundles: dict[str, TokenBundle] = field(default_factory=dict)

    async def handle(self, msg: Msg) -> None:
        request = _REQUEST.validate_json(msg.data)
        self.requesters.append(request.requester_key_id)
        if isinstance(request, CredentialsRequest):  # version 1: one sandbox
            reply = self._answer_v1(request)
        else:
            reply = self._answer_batch(request)
        if reply is not None:
            await msg.respond(reply.model_dump_json().encode())

    def _entry(self, item: CredentialsRequest | CredentialsItem) -> Any:
        """The user's TokenBundle (refresh token only in file mode), an error name, or None (silent)."""
        self.requests.append(item)
        entry = self.users.get(item.user_id, "not_connected")
        if entry == "silent":
            return None
        if entry == "silent_once":
            self.users[item.user_id] = self.late_bundles[item.user_id]
            return None
        if (refusal := _grant_refusal(item)) is not None:
            return refusal
        if isinstance(entry, str):
            return (entry, "")
        return entry if item.mode == "file" else entry.model_copy(update={"refresh_token": None})

    def _answer_v1(self, request: CredentialsRequest) -> CredentialsReply | None:
        entry = self._entry(request)
        if entry is None:
            return None
        if isinstance(entry, tuple):
            return CredentialsReply(request_id=request.request_id, ok=False, error=entry[0], detail=entry[1])
        box = seal(entry.model_dump_json().encode(), Recipient.from_b64(request.requester_public_key),
                   subject=subjects.VAULT_CREDENTIALS_GET, message_id=request.request_id,
                   bind=reply_binding(request.user_id, request.sandbox_id))
        return CredentialsReply(request_id=request.request_id, ok=True, sealed=box, expires_at=entry.expires_at,
                                scopes=entry.scopes)

    def _answer_batch(self, request: CredentialsBatchRequest) -> CredentialsBatchReply | None:
        entries = [self._entry(item) for item in request.items]
        if any(entry is None for entry in entries):  # a silent user: the vault "does not answer"
            return None
        results, released = [], []
        for item, entry in zip(request.items, entries, strict=True):
            if isinstance(entry, tuple):
                results.append(CredentialsItemResult(request_id=item.request_id, ok=False, error=entry[0],
                                                     detail=entry[1]))
                continue
            results.append(CredentialsItemResult(request_id=item.request_id, ok=True, expires_at=entry.expires_at,
                                                 scopes=entry.scopes))
            released.append(ReleasedItem(request_id=item.request_id, user_id=item.user_id,
                                         sandbox_id=item.sandbox_id, bundle=entry))
        box = None
        if released:
            box = seal(ReleasedItems(items=released).model_dump_json().encode(),
                       Recipient.from_b64(request.requester_public_key), subject=subjects.VAULT_CREDENTIALS_GET,
                       message_id=request.request_id)
        return CredentialsBatchReply(request_id=request.request_id, ok=True, items=results, sealed=box)

    def requests_for(self, user_id: str) -> list[CredentialsRequest]:
        return [r for r in self.requests if r.user_id == user_id]


@pytest.fixture
async def fake_vault(nc: Client) -> AsyncIterator[FakeVault]:
    vault = FakeVault(nc)
    sub = await nc.subscribe(subjects.VAULT_CREDENTIALS_GET, cb=vault.handle)
    yield vault
    await sub.unsubscribe()


def as_json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Collector:
    """Core subscription on the result and dead-letter subjects, filtered per test."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._changed = asyncio.Condition()

    async def on_msg(self, msg: Msg) -> None:
        async with self._changed:
            self.messages.append((msg.subject, msg.data))
            self._changed.notify_all()

    async def wait(self, predicate: Callable[[tuple[str, bytes]], bool], count: int = 1,
                   timeout: float = WAIT) -> list[tuple[str, bytes]]:
        async def matched() -> list[tuple[str, bytes]]:
            async with self._changed:
                await self._changed.wait_for(lambda: len([m for m in self.messages if predicate(m)]) >= count)
                return [m for m in self.messages if predicate(m)]

        return await asyncio.wait_for(matched(), timeout)

    async def event(self, subject: str, sandbox_id: str, count: int = 1, **fields: Any) -> dict[str, Any]:
        def match(m: tuple[str, bytes]) -> bool:
            data = as_json(m[1])
            return (
                m[0] == subject
                and data.get("sandbox_id") == sandbox_id
                and all(data.get(k) == v for k, v in fields.items())
            )

        found = await self.wait(match, count)
        return json.loads(found[-1][1])

    def events(self, subject: str, sandbox_id: str) -> list[dict[str, Any]]:
        return [as_json(d) for s, d in self.messages if s == subject and as_json(d).get("sandbox_id") == sandbox_id]


@pytest.fixture
async def collector(nc: Client) -> AsyncIterator[Collector]:
    collector = Collector()
    subs = [
        await nc.subscribe("sandbox.credentials.*", cb=collector.on_msg),
        await nc.subscribe(f"{subjects.DLQ_PREFIX}.>", cb=collector.on_msg),
    ]
    await settle(nc)
    yield collector
    for sub in subs:
        await sub.unsubscribe()


def settings_for(nats_url: str, tmp_path: Path, **overrides: Any) -> SandboxSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "data_dir": tmp_path / "data",
        "local_sandbox_root": tmp_path / "sandboxes",
        "vault_request_timeout": 2.0,
        "retry_base_delay": 0.2,
        "retry_max_delay": 1.0,
        "max_deliver": 5,
        # a dependency that stays down gives up here (production: SANDBOX_RETRY_WINDOW_S, 5 min)
        "retry_window": 20.0,
        "breaker_probe": 0.2,
        "breaker_max_probe": 1.0,
        # a delivery lost with a stopped service's pull request comes back after ack_wait
        "ack_wait": 10.0,
    }
    values.update(overrides)
    return SandboxSettings(**values)


async def publish_created(nc: Client, event: SandboxCreated | None = None, *, raw: bytes | None = None,
                          msg_id: str | None = "auto") -> None:
    payload = raw if raw is not None else event.model_dump_json().encode()
    headers = None
    if msg_id == "auto" and event is not None:
        headers = {"Nats-Msg-Id": event.event_id}
    elif msg_id not in (None, "auto"):
        headers = {"Nats-Msg-Id": msg_id}
    ack = await nc.jetstream().publish(subjects.SANDBOX_CREATED, payload, headers=headers,
                                       stream=subjects.SANDBOX_STREAM.name)
    assert ack.stream == subjects.SANDBOX_STREAM.name


async def publish(nc: Client, subject: str, event: Event) -> None:
    """Publish an event to its stream with Nats-Msg-Id = event_id (as shared.broker does)."""
    stream = subjects.TOKENS_STREAM.name if subject.startswith("tokens.") else subjects.SANDBOX_STREAM.name
    await nc.jetstream().publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id},
                                 stream=stream)


async def stored(nc: Client, stream: str, subject: str, predicate: Callable[[Msg], bool]) -> list[Msg]:
    """Messages JetStream actually stored on `subject` (after its duplicate filter)."""
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        subject, stream=stream, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0)
    )
    found: list[Msg] = []
    try:
        while True:
            try:
                batch = await sub.fetch(256, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):  # fetch raises either
                break
            for msg in batch:
                await msg.ack()
                if predicate(msg):
                    found.append(msg)
    finally:
        await sub.unsubscribe()
    return found


def by_sandbox(sandbox_id: str) -> Callable[[Msg], bool]:
    return lambda msg: as_json(msg.data).get("sandbox_id") == sandbox_id


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def clean_env(home: Path, **env: str) -> dict[str, str]:
    return {
        "PATH": env.pop("PATH", os.environ.get("PATH", "/usr/bin:/bin")),
        "HOME": str(home),
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        **env,
    }


async def run_claude(claude_bin: str, home: Path, *args: str, shell_prefix: str | None = None,
                     **env: str) -> tuple[int, bytes, bytes]:
    """Run the real CLI with a clean environment; `shell_prefix` runs it under `sh -c` after
    that prefix (e.g. `. <env file> &&`)."""
    if shell_prefix is None:
        argv = [claude_bin, *args]
    else:
        quoted = " ".join(["'" + a.replace("'", "'\"'\"'") + "'" for a in (claude_bin, *args)])
        argv = ["/bin/sh", "-c", f"{shell_prefix} exec {quoted}"]
    proc = await asyncio.create_subprocess_exec(
        *argv, env=clean_env(home, **env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, stdout, stderr


async def claude_status(claude_bin: str, home: Path, *, shell_prefix: str | None = None, **env: str) -> dict[str, Any]:
    """`HOME=<home> claude auth status --json` with a clean environment."""
    rc, stdout, stderr = await run_claude(claude_bin, home, "auth", "status", "--json",
                                          shell_prefix=shell_prefix, **env)
    try:
        return json.loads(stdout)
    except ValueError:
        pytest.fail(f"claude auth status printed no JSON (rc={rc}): {stdout[:500]!r} {stderr[:500]!r}")


@asynccontextmanager
async def running(settings: SandboxSettings, **adapters: Any) -> AsyncIterator[SandboxService]:
    async with SandboxService(settings, **adapters) as service:
        yield service


# --- e2b ------------------------------------------------------------------------------------
@pytest.fixture
async def e2b_standin(tmp_path: Path) -> AsyncIterator[E2BStandin]:
    async with E2BStandin(tmp_path / "e2b") as standin:
        yield standin


def e2b_settings(standin: E2BStandin, **overrides: Any) -> dict[str, Any]:
    """SandboxSettings fields pointing the e2b backend at the stand-in (short timeouts)."""
    from pydantic import SecretStr

    return {
        "e2b_api_key": SecretStr(standin.api_key),
        "e2b_api_url": standin.api_url,
        "e2b_sandbox_url": standin.sandbox_url,
        "e2b_request_timeout": 2.0,
        "e2b_request_retries": 0,
        **overrides,
    }


async def pull_home(standin: E2BStandin, sandbox_id: str, files: Iterable[str], dest: Path,
                    *, home: str = "/home/user") -> Path:
    """Copy the listed files out of a stand-in sandbox through the real SDK (`files.read`) into
    `dest`, keeping their paths relative to `home` and their modes (read from `stat`)."""
    from e2b import AsyncSandbox

    sandbox = await AsyncSandbox.connect(sandbox_id, **standin.sdk_options())
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
        path = PurePosixPath(name)
        relative = path.relative_to(home)
        data = await sandbox.files.read(str(path), format="bytes", user="user")
        result = await sandbox.commands.run(f"stat -c %a '{path}'", user="user")
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(data))
        os.chmod(target, int(result.stdout.split()[0], 8))
    return dest
