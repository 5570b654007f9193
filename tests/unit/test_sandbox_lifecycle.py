"""Live-sandbox use cases (re-inject, scrub, forget) and the registry-backed parts of the
sandbox.created use case, with hand-written fakes: in-memory registry, backend and vault."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import pytest

from services.sandbox import domain
from services.sandbox.adapters.backends.base import FileByFile
from services.sandbox.adapters.live_registry import Lookup, MemoryLiveRegistry
from services.sandbox.adapters.vault_client import CredentialsFor, VaultCredentials
from services.sandbox.errors import BackendError, GrantInvalid, LiveRecordChanged, NotConnected, SandboxNotFound
from services.sandbox.injector import CredentialInjector, Injected, InjectionOptions
from services.sandbox.live import Done, LiveSandboxes
from services.sandbox.writer import SandboxLocks
from shared import subjects
from shared.delivery import DeliveryPolicy
from shared.events import (
    EVENT_MODELS,
    CredentialMode,
    Event,
    GrantEnded,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxCredentialsInjected,
    SandboxCredentialsScrubbed,
    SandboxDestroyed,
    SandboxOptions,
    TokenBundle,
    TokensRefreshed,
    TokensRevoked,
    derived_event_id,
)
from tests.delivery_harness import Done as Acked
from tests.delivery_harness import Failed, Letters, Retry, policy, settle
from tests.grants import grant_for

EXPIRES = 1_900_000_000_000


def fake_grant(user: str, sandbox_id: str) -> str:
    """Shaped like a grant (the fake vault does not verify: the real one's tests do)."""
    return f"hdr.{user}-{sandbox_id}.signature"


def bundle(n: int = 1) -> TokenBundle:
    return TokenBundle(access_token=f"sk-ant-oat01-token-{n}", refresh_token=f"sk-ant-ort01-refresh-{n}",
                       expires_at=EXPIRES + n, scopes=["user:inference"])


class Vault:
    def __init__(self) -> None:
        self.bundles: dict[str, TokenBundle | Exception] = {}
        self.calls: list[tuple[str, CredentialMode]] = []
        self.wants: list[CredentialsFor] = []

    async def fetch(self, want: CredentialsFor) -> VaultCredentials:
        user_id, mode = want.user_id, want.mode
        self.calls.append((user_id, mode))
        self.wants.append(want)
        value = self.bundles.get(user_id, NotConnected("no connection"))
        if isinstance(value, Exception):
            raise value
        if mode != "file":
            value = value.model_copy(update={"refresh_token": None})
        return VaultCredentials(bundle=value, expires_at=value.expires_at, scopes=tuple(value.scopes))


class Publisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, Event]] = []
        self.fail_subjects: set[str] = set()
        self.log: list[str] | None = None

    async def publish(self, subject: str, event: Event) -> None:
        if subject in self.fail_subjects:
            raise ConnectionError("bus down")
        self.published.append((subject, event))
        if self.log is not None:
            self.log.append(f"publish {subject}")

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for _, e in self.published if isinstance(e, kind)]


class Sandbox(FileByFile):
    backend_sandbox_id = None

    def __init__(self, home: PurePosixPath, files: dict[PurePosixPath, bytes], log: list[str]) -> None:
        self._home, self.files, self.log = home, files, log

    @property
    def home(self) -> PurePosixPath:
        return self._home

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        await asyncio.sleep(0)
        return self.files.get(path)

    async def write_file(self, path: PurePosixPath, data: bytes, mode: int) -> None:
        self.files[path] = data
        self.log.append(f"write {path}")

    async def make_dir(self, path: PurePosixPath, mode: int) -> None:
        pass

    async def remove(self, path: PurePosixPath) -> None:
        self.files.pop(path, None)
        self.log.append(f"remove {path}")


class Backend:
    kind = "local"

    def __init__(self) -> None:
        self.homes: dict[str, dict[PurePosixPath, bytes]] = {}
        self.log: list[str] = []
        self.gone: set[str] = set()
        self.fail: Exception | None = None
        self.before_write: Any = None

    @asynccontextmanager
    async def open(self, target: Any, *, must_exist: bool = False) -> AsyncIterator[Sandbox]:
        if target.sandbox_id in self.gone or (must_exist and target.sandbox_id not in self.homes):
            raise SandboxNotFound(f"{target.sandbox_id} is gone")
        if self.fail is not None:
            raise self.fail
        if self.before_write is not None:
            await self.before_write(target)
        files = self.homes.setdefault(target.sandbox_id, {})
        yield Sandbox(PurePosixPath("/home") / target.sandbox_id, files, self.log)

    async def discard(self, sandbox_id: str) -> None:
        self.log.append(f"discard {sandbox_id}")

    async def aclose(self) -> None:
        pass

    def creds(self, sandbox_id: str) -> dict[str, Any] | None:
        raw = self.homes.get(sandbox_id, {}).get(PurePosixPath(f"/home/{sandbox_id}/.claude/.credentials.json"))
        return json.loads(raw)["claudeAiOauth"] if raw else None

    def writes(self, sandbox_id: str) -> list[str]:
        return [line for line in self.log if line.startswith("write") and f"/{sandbox_id}/" in line]


Exhausted = Failed  # a live message whose retries ran out: dead-lettered, then reported
SUBJECT_OF = {model: subject for subject, model in EVENT_MODELS.items()}


class Driven:
    """A use case as its subscriber drives it: through the real delivery policy. What the
    message became: the use case's own result (acked), `Retry` (nacked) or `Failed` (reported)."""

    def __init__(self, policy: DeliveryPolicy, work: Any, final: Any, needs: Any = None) -> None:
        self._policy, self._work, self._final, self._needs = policy, work, final, needs

    async def __call__(self, event: Any, *, delivery: int = 1, body: bytes = b"{}", age_s: float = 0.0) -> Any:
        async def final(error: BaseException, detail: str, exhausted: bool) -> Any:
            return await self._final(event, error, detail, exhausted)

        outcome = await settle(lambda: self._work(event), final, policy=self._policy, delivered=delivery, body=body,
                               age_s=age_s, needs=self._needs(event) if self._needs else (),
                               subject=SUBJECT_OF[type(event)])
        return outcome.result if isinstance(outcome, Acked) else outcome


class DrivenInjector:
    def __init__(self, injector: CredentialInjector, policy: DeliveryPolicy) -> None:
        self.use_case = injector
        self.handle = Driven(policy, injector.run, injector.report_failed, injector.needs)


class DrivenLive:
    def __init__(self, live: LiveSandboxes, policy: DeliveryPolicy) -> None:
        self.use_case = live
        self.on_refreshed = Driven(policy, live.on_refreshed, live.report_failed)
        self.on_revoked = Driven(policy, live.on_revoked, live.report_failed)
        self.on_grant_ended = Driven(policy, live.on_grant_ended, live.report_failed)
        self.on_destroyed = live.on_destroyed


class World:
    def __init__(self, max_deliver: int = 3) -> None:
        self.vault, self.publisher, self.backend = Vault(), Publisher(), Backend()
        self.registry, self.dead = MemoryLiveRegistry(), Letters()
        self.policy = policy(letters=self.dead, max_deliver=max_deliver)
        locks = SandboxLocks()
        options = InjectionOptions(fingerprint_key=b"k" * 32)
        common = dict(vault=self.vault, backends={"local": self.backend}, publisher=self.publisher,
                      registry=self.registry, options=options, locks=locks)
        self.injector = DrivenInjector(CredentialInjector(**common), self.policy)
        self.live = DrivenLive(LiveSandboxes(**common, concurrency=2), self.policy)

    async def create(self, user: str, sandbox_id: str, mode: CredentialMode = "access_only", **kw: Any) -> Any:
        kw.setdefault("grant", fake_grant(user, sandbox_id))
        event = SandboxCreated(user_id=user, sandbox_id=sandbox_id, options=SandboxOptions(mode=mode), **kw)
        return await self.injector.handle(event)


# --- sandbox.created with the registry ----------------------------------------------------------
async def test_injection_is_recorded_without_token_material() -> None:
    world = World()
    world.vault.bundles["u"] = bundle()
    outcome = await world.create("u", "s1", "file")
    assert isinstance(outcome, Injected)
    lookup = await world.registry.get("u", "s1")
    assert lookup.record is not None
    record = lookup.record
    assert (record.state, record.mode, record.created_event_id, record.expires_at) == (
        "injected", "file", outcome.event.cause_event_id, EXPIRES + 1)
    assert record.files == tuple(outcome.event.files)
    raw = record.to_json()
    assert b"sk-ant" not in raw and len(record.fingerprint or "") == 32
    assert domain.LiveSandbox.from_json(raw) == record


async def test_another_event_for_a_sandbox_holding_the_same_credentials_has_no_effect() -> None:
    world = World()
    world.vault.bundles["u"] = bundle()
    first = await world.create("u", "s1")
    second = await world.create("u", "s1")  # new event id, same sandbox, same credentials
    assert isinstance(first, Injected) and isinstance(second, Injected)
    assert second.written == () and not second.duplicate
    assert len(world.backend.writes("s1")) == 3
    assert second.event.event_id == derived_event_id(second.event.cause_event_id, "injected")
    assert second.event.event_id != first.event.event_id


async def test_changed_options_rewrite_the_sandbox() -> None:
    world = World()
    world.vault.bundles["u"] = bundle()
    await world.create("u", "s1")
    outcome = await world.injector.handle(
        SandboxCreated(user_id="u", sandbox_id="s1", options=SandboxOptions(mode="access_only", mcp=True)))
    assert isinstance(outcome, Injected)
    assert outcome.written == ("/home/s1/.claude.json",)  # only the MCP entry changed


async def test_created_after_destroyed_is_refused_without_asking_the_vault() -> None:
    world = World()
    world.vault.bundles["u"] = bundle()
    await world.live.on_destroyed(SandboxDestroyed(user_id="u", sandbox_id="s1"))
    outcome = await world.create("u", "s1")
    assert isinstance(outcome, Failed) and not outcome.exhausted
    assert (outcome.event.reason, outcome.event.retryable) == ("sandbox_not_found", False)
    assert world.vault.calls == [] and world.backend.log == []


async def test_created_that_predates_a_revocation_is_refused() -> None:
    world = World()
    world.vault.bundles["u"] = bundle()  # the vault has not caught up yet
    old = SandboxCreated(user_id="u", sandbox_id="s1", occurred_at=datetime.now(UTC) - timedelta(minutes=1))
    await world.live.on_revoked(TokensRevoked(user_id="u"))
    outcome = await world.injector.handle(old)
    assert isinstance(outcome, Failed)
    assert outcome.event.reason == "not_connected" and "revoked" in outcome.event.detail
    assert world.vault.calls == [] and world.backend.creds("s1") is None
    assert (await world.registry.get("u", "s1")).record is None  # the intent was dropped
    later = datetime.now(UTC) + timedelta(seconds=1)
    fresh = await world.create("u", "s2", occurred_at=later)  # after the revocation: fine
    assert isinstance(fresh, Injected)


async def test_revoke_racing_an_injection_leaves_no_credentials() -> None:
    """tokens.revoked arrives while sandbox.created is between its vault fetch and its write:
    the scrub touches the pending record, the injection's record update then conflicts, the
    redelivery is refused (revoked) and scrubs what the first attempt wrote."""
    world = World()
    world.vault.bundles["u"] = bundle()
    event = SandboxCreated(user_id="u", sandbox_id="s1", occurred_at=datetime.now(UTC) - timedelta(seconds=5))
    revoke = TokensRevoked(user_id="u")
    scrubbed: list[Any] = []

    async def revoke_now(target: Any) -> None:
        world.backend.before_write = None
        # not under the same replica's lock: another replica handles the revoke
        live = LiveSandboxes(vault=world.vault, backends={"local": world.backend}, publisher=world.publisher,
                             registry=world.registry, options=InjectionOptions(fingerprint_key=b"k" * 32),
                             locks=SandboxLocks())
        scrubbed.append(await live.on_revoked(revoke))

    world.backend.before_write = revoke_now
    first = await world.injector.handle(event, delivery=1)
    assert isinstance(first, Retry) and isinstance(first.error, LiveRecordChanged)
    assert isinstance(scrubbed[0], Done)
    assert world.backend.creds("s1") is not None  # written after the scrub...
    second = await world.injector.handle(event, delivery=2)
    assert isinstance(second, Failed) and second.event.reason == "not_connected"
    assert world.backend.creds("s1") is None  # ...and removed by the redelivery
    assert world.publisher.of(SandboxCredentialsInjected) == []


async def test_exhausted_event_is_dead_lettered_before_the_failed_event() -> None:
    world = World(max_deliver=2)
    world.vault.bundles["u"] = bundle()
    world.backend.fail = BackendError("EIO", retryable=True)
    order: list[str] = []
    world.publisher.log = order
    original = world.dead.dead_letter

    async def dead_letter(subject: str, body: bytes, reason: str, *, message_id: str,
                          copy_seq: int | None = None) -> None:
        order.append(f"dead_letter {subject}")
        await original(subject, body, reason, message_id=message_id, copy_seq=copy_seq)

    world.dead.dead_letter = dead_letter
    event = SandboxCreated(user_id="u", sandbox_id="s1")
    assert isinstance(await world.injector.handle(event, delivery=1), Retry)
    last = await world.injector.handle(event, delivery=2, body=b"original-bytes")
    assert isinstance(last, Failed) and last.exhausted
    assert order == ["dead_letter sandbox.created", "publish sandbox.credentials.failed"]
    [(subject, body, reason, message_id)] = world.dead.kept
    assert (subject, body, message_id) == ("sandbox.created", b"original-bytes", "evt-test")
    assert reason.startswith("backend_error:")


async def test_a_report_that_cannot_be_sent_brings_the_message_back() -> None:
    world = World(max_deliver=1)
    world.vault.bundles["u"] = NotConnected("x")  # final
    world.publisher.fail_subjects.add(subjects.SANDBOX_CREDENTIALS_FAILED)
    event = SandboxCreated(user_id="u", sandbox_id="s1")
    assert isinstance(await world.injector.handle(event, delivery=1), Retry)  # nacked: JetStream brings it back
    world.publisher.fail_subjects.clear()
    again = await world.injector.handle(event, delivery=2)  # the redelivery reports it
    assert isinstance(again, Failed)
    assert [e.event_id for e in world.publisher.of(SandboxCredentialsFailed)] == [derived_event_id(event.event_id,
                                                                                                   "failed")]


# --- tokens.refreshed ------------------------------------------------------------------------
async def test_refresh_reinjects_each_live_sandbox_of_the_person_under_its_own_grant() -> None:
    world = World()
    world.vault.bundles = {"u": bundle(1), "other": bundle(9)}
    for sid in ("s1", "s2"):
        await world.create("u", sid)
    await world.create("u", "s3", "file")
    await world.create("other", "s4")
    world.vault.bundles["u"] = bundle(2)
    world.vault.calls.clear()
    world.vault.wants.clear()
    refresh = TokensRefreshed(user_id="u", expires_at=EXPIRES + 2, version=2)
    outcome = await world.live.on_refreshed(refresh)
    assert isinstance(outcome, Done) and sorted(outcome.sandboxes) == ["s1", "s2", "s3"]
    # one request per sandbox: the vault checks each sandbox's grant (and its newest lease)
    assert sorted((w.sandbox_id, w.mode, w.grant) for w in world.vault.wants) == [
        ("s1", "access_only", fake_grant("u", "s1")), ("s2", "access_only", fake_grant("u", "s2")),
        ("s3", "file", fake_grant("u", "s3"))]
    for sid in ("s1", "s2", "s3"):
        assert world.backend.creds(sid)["accessToken"] == "sk-ant-oat01-token-2"
    assert "refreshToken" not in world.backend.creds("s1")
    assert world.backend.creds("s3")["refreshToken"] == "sk-ant-ort01-refresh-2"
    assert world.backend.creds("s4")["accessToken"] == "sk-ant-oat01-token-9"
    reinjected = [e for e in world.publisher.of(SandboxCredentialsInjected) if e.refreshed_by == refresh.event_id]
    assert sorted(e.sandbox_id for e in reinjected) == ["s1", "s2", "s3"]
    assert all(e.expires_at == EXPIRES + 2 for e in reinjected)
    assert all(e.event_id == derived_event_id(f"{refresh.event_id}:{e.sandbox_id}", "reinjected") for e in reinjected)
    # the same refresh delivered again: no writes, the same announcements
    writes = len(world.backend.log)
    again = await world.live.on_refreshed(refresh, delivery=2)
    assert isinstance(again, Done) and len(world.backend.log) == writes
    ids = [e.event_id for e in world.publisher.of(SandboxCredentialsInjected) if e.refreshed_by == refresh.event_id]
    assert sorted(set(ids)) == sorted({e.event_id for e in reinjected})


async def test_refresh_forgets_a_sandbox_that_is_gone_and_keeps_going() -> None:
    world = World()
    world.vault.bundles["u"] = bundle(1)
    await world.create("u", "s1")
    await world.create("u", "s2")
    world.backend.gone.add("s1")
    world.vault.bundles["u"] = bundle(2)
    outcome = await world.live.on_refreshed(TokensRefreshed(user_id="u", expires_at=1, version=2))
    assert isinstance(outcome, Done) and outcome.sandboxes == ("s2",)
    assert (await world.registry.get("u", "s1")).record is None
    assert [r.sandbox_id for r, _ in await world.registry.for_user("u")] == ["s2"]


async def test_refresh_touches_a_pending_injection_so_it_redoes_with_fresh_credentials() -> None:
    world = World()
    world.vault.bundles["u"] = bundle(1)
    event = SandboxCreated(user_id="u", sandbox_id="s1", options=SandboxOptions(mode="access_only"))
    refresh = TokensRefreshed(user_id="u", expires_at=EXPIRES + 2, version=2)

    async def refresh_meanwhile(target: Any) -> None:
        world.backend.before_write = None
        world.vault.bundles["u"] = bundle(2)
        # another replica (its own locks; the same replica would simply wait for the injection)
        other = LiveSandboxes(vault=world.vault, backends={"local": world.backend}, publisher=world.publisher,
                              registry=world.registry, options=InjectionOptions(fingerprint_key=b"k" * 32),
                              locks=SandboxLocks())
        assert isinstance(await other.on_refreshed(refresh), Done)

    world.backend.before_write = refresh_meanwhile
    first = await world.injector.handle(event, delivery=1)
    assert isinstance(first, Retry)
    second = await world.injector.handle(event, delivery=2)
    assert isinstance(second, Injected)
    assert world.backend.creds("s1")["accessToken"] == "sk-ant-oat01-token-2"


async def test_refresh_retries_transient_failures_then_dead_letters_and_reports() -> None:
    world = World(max_deliver=2)
    world.vault.bundles["u"] = bundle(1)
    await world.create("u", "s1")
    world.vault.bundles["u"] = bundle(2)
    world.backend.fail = BackendError("EIO", retryable=True)
    refresh = TokensRefreshed(user_id="u", expires_at=1, version=2)
    assert isinstance(await world.live.on_refreshed(refresh, delivery=1), Retry)
    last = await world.live.on_refreshed(refresh, delivery=2, body=b"raw")
    assert isinstance(last, Exhausted)
    [(subject, body, _, message_id)] = world.dead.kept
    assert (subject, body, message_id) == (subjects.TOKENS_REFRESHED, b"raw", "evt-test")
    [failed] = world.publisher.of(SandboxCredentialsFailed)
    assert (failed.sandbox_id, failed.cause_event_id, failed.reason, failed.retryable) == (
        "s1", refresh.event_id, "backend_error", True)


async def test_refresh_for_someone_without_sandboxes_does_nothing() -> None:
    world = World()
    assert await world.live.on_refreshed(TokensRefreshed(user_id="nobody", expires_at=1, version=2)) == Done()
    assert world.vault.calls == []


# --- tokens.revoked ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["file", "access_only", "env"])
async def test_revoke_scrubs_secret_files_and_reports_each_sandbox(mode: CredentialMode) -> None:
    world = World()
    world.vault.bundles["u"] = bundle()
    await world.create("u", "s1", mode)
    await world.create("u", "s2", mode)
    revoke = TokensRevoked(user_id="u", reason="admin")
    outcome = await world.live.on_revoked(revoke)
    assert isinstance(outcome, Done) and sorted(outcome.sandboxes) == ["s1", "s2"]
    secret = ".config/ccbridge/env" if mode == "env" else ".claude/.credentials.json"
    for sid in ("s1", "s2"):
        files = world.backend.homes[sid]
        assert PurePosixPath(f"/home/{sid}/{secret}") not in files
        assert PurePosixPath(f"/home/{sid}/.claude.json") in files
        assert (await world.registry.get("u", sid)).record.state == "scrubbed"
    events = world.publisher.of(SandboxCredentialsScrubbed)
    assert sorted(e.sandbox_id for e in events) == ["s1", "s2"]
    assert all(e.files == [f"/home/{e.sandbox_id}/{secret}"] and e.reason == "admin" and not e.sandbox_gone
               for e in events)
    # redelivered: announced again with the same ids, nothing else
    log = len(world.backend.log)
    await world.live.on_revoked(revoke, delivery=2)
    assert len(world.backend.log) == log
    assert {e.event_id for e in world.publisher.of(SandboxCredentialsScrubbed)} == {e.event_id for e in events}
    # a refresh afterwards does not bring the credentials back
    world.vault.bundles["u"] = bundle(3)
    assert await world.live.on_refreshed(TokensRefreshed(user_id="u", expires_at=1, version=3)) == Done()


async def test_revoke_of_a_sandbox_that_is_gone_reports_it_gone() -> None:
    world = World()
    world.vault.bundles["u"] = bundle()
    await world.create("u", "s1")
    world.backend.gone.add("s1")
    await world.live.on_revoked(TokensRevoked(user_id="u"))
    [event] = world.publisher.of(SandboxCredentialsScrubbed)
    assert event.sandbox_gone and event.files == []
    assert (await world.registry.get("u", "s1")) == Lookup(None, None)


async def test_scrub_failure_is_retried_then_reported_failed() -> None:
    world = World(max_deliver=1)
    world.vault.bundles["u"] = bundle()
    await world.create("u", "s1")
    world.backend.fail = BackendError("EIO", retryable=True)
    outcome = await world.live.on_revoked(TokensRevoked(user_id="u"))
    assert isinstance(outcome, Exhausted)
    [failed] = world.publisher.of(SandboxCredentialsFailed)
    assert failed.detail.startswith("scrub failed") and failed.sandbox_id == "s1"
    assert world.dead.kept[0][0] == subjects.TOKENS_REVOKED


# --- the registry's compare-and-set -------------------------------------------------------------
async def test_memory_registry_compare_and_set_and_tombstones() -> None:
    registry = MemoryLiveRegistry()
    record = domain.LiveSandbox(user_id="u", sandbox_id="s", backend="local", created_event_id="e")
    rev = await registry.save(record, revision=None)
    with pytest.raises(LiveRecordChanged):
        await registry.save(record, revision=None)
    rev2 = await registry.save(replace(record, state="injected"), revision=rev)
    with pytest.raises(LiveRecordChanged):
        await registry.save(record, revision=rev)
    assert (await registry.get("u", "s")).revision == rev2
    await registry.destroyed("u", "s")
    assert (await registry.get("u", "s")).destroyed
    assert await registry.for_user("u") == []
    await registry.mark_revoked("u", 10)
    await registry.mark_revoked("u", 5)
    assert await registry.revoked_at("u") == 10


# --- grants -----------------------------------------------------------------------------------
async def test_a_refused_grant_writes_nothing_and_reports_the_reason() -> None:
    world = World()
    world.vault.bundles["u"] = GrantInvalid("grant is for another sandbox")
    outcome = await world.create("u", "s1")
    assert isinstance(outcome, Failed) and (outcome.event.reason, outcome.exhausted) == ("grant_invalid", False)
    assert outcome.event.detail == "grant is for another sandbox"
    assert "s1" not in world.backend.homes  # the sandbox was never even opened
    assert (await world.registry.get("u", "s1")).record is None  # nor remembered


async def test_grant_ended_scrubs_that_sandbox_only_and_says_why() -> None:
    world = World()
    world.vault.bundles["u"] = bundle()
    await world.create("u", "s1")
    await world.create("u", "s2")
    ended = GrantEnded(user_id="u", sandbox_id="s1", reason="lease_expired", ended_at=int(time.time() * 1000))
    outcome = await world.live.on_grant_ended(ended)
    assert isinstance(outcome, Done) and outcome.sandboxes == ("s1",)
    assert world.backend.creds("s1") is None and world.backend.creds("s2") is not None
    [scrubbed] = world.publisher.of(SandboxCredentialsScrubbed)
    assert (scrubbed.sandbox_id, scrubbed.reason, scrubbed.cause_event_id) == ("s1", "lease_expired", ended.event_id)
    assert isinstance(await world.live.on_grant_ended(ended), Done)  # a redelivery scrubs nothing new ...
    again = world.publisher.of(SandboxCredentialsScrubbed)
    assert [e.event_id for e in again] == [scrubbed.event_id] * 2  # ... and its report dedupes on the bus


async def test_grant_ended_leaves_a_sandbox_that_holds_a_newer_grant() -> None:
    """A lease ended, then the person granted the sandbox again and it was re-created with the new
    grant: the late grants.ended must not scrub the new lease's credentials."""
    world = World()
    world.vault.bundles["u"] = bundle()
    ended_at = int(time.time() * 1000) - 10_000
    await world.create("u", "s1", grant=grant_for("u", "s1", now_s=time.time()))
    outcome = await world.live.on_grant_ended(GrantEnded(user_id="u", sandbox_id="s1", reason="grant_ended",
                                                         ended_at=ended_at))
    assert isinstance(outcome, Done) and outcome.sandboxes == ()
    assert world.backend.creds("s1") is not None


async def test_a_revocation_dated_in_the_future_does_not_refuse_later_sandboxes() -> None:
    """A publisher's clock (or a forged tokens.revoked) must not lock the person out for good."""
    world = World()
    world.vault.bundles["u"] = bundle()
    await world.live.on_revoked(TokensRevoked(user_id="u", occurred_at=datetime.now(UTC) + timedelta(days=3650)))
    await asyncio.sleep(0.01)
    assert isinstance(await world.create("u", "s1"), Injected)
