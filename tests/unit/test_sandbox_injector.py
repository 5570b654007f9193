"""The inject use case with hand-written fakes (vault, publisher, in-memory backend)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePosixPath
from typing import Any

import pytest

from services.sandbox.adapters.backends.base import FileByFile
from services.sandbox.adapters.live_registry import MemoryLiveRegistry
from services.sandbox.adapters.vault_client import CredentialsFor, VaultCredentials
from services.sandbox.errors import BackendError, NotConnected, ReconnectRequired, SandboxError, VaultUnavailable
from services.sandbox.injector import CredentialInjector, Injected, InjectionOptions
from services.sandbox.writer import SandboxLocks
from shared import subjects
from shared.delivery import DeliveryPolicy
from shared.events import (
    CredentialMode,
    Event,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxCredentialsInjected,
    SandboxOptions,
    TokenBundle,
    derived_event_id,
)
from tests.delivery_harness import Done, Failed, Retry, policy, settle

ACCESS = "sk-ant-oat01-unit-access"
REFRESH = "sk-ant-ort01-unit-refresh"
EXPIRES = 1_900_000_000_000


class FakeVault:
    def __init__(self, result: VaultCredentials | SandboxError | Exception | None = None) -> None:
        self.result = result or VaultCredentials(
            bundle=TokenBundle(access_token=ACCESS, refresh_token=REFRESH, expires_at=EXPIRES,
                               scopes=["user:inference", "user:profile"]),
            expires_at=EXPIRES,
            scopes=("user:inference", "user:profile"),
        )
        self.calls: list[tuple[str, CredentialMode]] = []
        self.wants: list[CredentialsFor] = []

    async def fetch(self, want: CredentialsFor) -> VaultCredentials:
        user_id, mode = want.user_id, want.mode
        self.calls.append((user_id, mode))
        self.wants.append(want)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class FakePublisher:
    def __init__(self, fail: Exception | None = None) -> None:
        self.published: list[tuple[str, Event]] = []
        self.fail = fail

    async def publish(self, subject: str, event: Event) -> None:
        if self.fail:
            raise self.fail
        self.published.append((subject, event))


class MemorySandbox(FileByFile):
    backend_sandbox_id = None

    def __init__(self, home: PurePosixPath, store: dict[PurePosixPath, tuple[bytes, int]], log: list[str],
                 fail_writes: Exception | None) -> None:
        self._home = home
        self.store = store
        self.log = log
        self.fail_writes = fail_writes

    @property
    def home(self) -> PurePosixPath:
        return self._home

    def _abs(self, path: PurePosixPath) -> PurePosixPath:
        return path if path.is_absolute() else self._home / path

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        await asyncio.sleep(0)  # let concurrent callers interleave
        entry = self.store.get(self._abs(path))
        return entry[0] if entry else None

    async def write_file(self, path: PurePosixPath, data: bytes, mode: int) -> None:
        if self.fail_writes:
            raise self.fail_writes
        await asyncio.sleep(0)
        self.store[self._abs(path)] = (data, mode)
        self.log.append(f"write {self._abs(path)}")

    async def make_dir(self, path: PurePosixPath, mode: int) -> None:
        self.log.append(f"mkdir {self._abs(path)} {oct(mode)}")

    async def remove(self, path: PurePosixPath) -> None:
        self.store.pop(self._abs(path), None)


class MemoryBackend:
    kind = "local"

    def __init__(self) -> None:
        self.homes: dict[str, dict[PurePosixPath, tuple[bytes, int]]] = {}
        self.log: list[str] = []
        self.fail_writes: Exception | None = None

    @asynccontextmanager
    async def open(self, event: SandboxCreated, *, must_exist: bool = False) -> AsyncIterator[MemorySandbox]:
        store = self.homes.setdefault(event.sandbox_id, {})
        yield MemorySandbox(PurePosixPath("/sbx") / event.sandbox_id, store, self.log, self.fail_writes)

    async def discard(self, sandbox_id: str) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def writes(self) -> list[str]:
        return [line for line in self.log if line.startswith("write")]


class Settling:
    """The injector as its subscriber drives it: through the real delivery policy."""

    def __init__(self, injector: CredentialInjector, policy: DeliveryPolicy) -> None:
        self.injector = injector
        self.policy = policy

    async def handle(self, event: SandboxCreated, *, delivery: int = 1, age_s: float = 0.0) -> Any:
        async def final(error: BaseException, detail: str, exhausted: bool) -> Any:
            return await self.injector.report_failed(event, error, detail, exhausted)

        outcome = await settle(lambda: self.injector.run(event), final, policy=self.policy, delivered=delivery,
                               age_s=age_s, needs=self.injector.needs(event))
        return outcome.result if isinstance(outcome, Done) else outcome


def make(vault: FakeVault | None = None, publisher: FakePublisher | None = None, *, max_deliver: int = 3,
         window_s: float = 300.0, default_mode: CredentialMode = "file"
         ) -> tuple[Settling, FakeVault, FakePublisher, MemoryBackend]:
    vault = vault or FakeVault()
    publisher = publisher or FakePublisher()
    backend = MemoryBackend()
    injector = CredentialInjector(
        vault=vault,
        backends={"local": backend},
        publisher=publisher,
        registry=MemoryLiveRegistry(),
        options=InjectionOptions(default_mode=default_mode),
        locks=SandboxLocks(),
    )
    return Settling(injector, policy(max_deliver=max_deliver, window_s=window_s)), vault, publisher, backend


def created(mode: CredentialMode | None = None, **kwargs: object) -> SandboxCreated:
    options = kwargs.pop("options", SandboxOptions(mode=mode))
    return SandboxCreated(user_id="user-1", sandbox_id="sbx-1", options=options, **kwargs)


async def test_success_writes_files_and_publishes_injected_with_derived_id() -> None:
    injector, vault, publisher, backend = make()
    event = created("file")
    outcome = await injector.handle(event)
    assert isinstance(outcome, Injected)
    assert vault.calls == [("user-1", "file")]
    [(subject, published)] = publisher.published
    assert subject == subjects.SANDBOX_CREDENTIALS_INJECTED
    assert isinstance(published, SandboxCredentialsInjected)
    assert published.event_id == derived_event_id(event.event_id, "injected")
    assert published.cause_event_id == event.event_id
    assert (published.mode, published.expires_at, published.backend, published.env) == ("file", EXPIRES, "local", {})
    assert published.files == [
        "/sbx/sbx-1/.claude/.credentials.json",
        "/sbx/sbx-1/.claude.json",
        "/sbx/sbx-1/.claude/settings.json",
    ]
    store = backend.homes["sbx-1"]
    creds, mode = store[PurePosixPath("/sbx/sbx-1/.claude/.credentials.json")]
    assert mode == 0o600
    assert json.loads(creds)["claudeAiOauth"]["refreshToken"] == REFRESH
    assert "mkdir /sbx/sbx-1/.claude 0o700" in backend.log
    # no token material on the bus
    assert ACCESS not in published.model_dump_json() and REFRESH not in published.model_dump_json()


async def test_default_mode_applies_when_event_has_none() -> None:
    injector, vault, publisher, backend = make(default_mode="access_only")
    await injector.handle(created(None))
    assert vault.calls == [("user-1", "access_only")]
    creds = backend.homes["sbx-1"][PurePosixPath("/sbx/sbx-1/.claude/.credentials.json")][0]
    assert "refreshToken" not in json.loads(creds)["claudeAiOauth"]


async def test_env_mode_reports_env_name_and_writes_the_env_file_not_credentials() -> None:
    injector, _, publisher, backend = make()
    outcome = await injector.handle(created("env"))
    assert isinstance(outcome, Injected)
    assert outcome.event.env == {"CLAUDE_CODE_OAUTH_TOKEN": "access_token"}
    assert outcome.event.mode == "env"
    paths = {str(p) for p in backend.homes["sbx-1"]}
    assert paths == {"/sbx/sbx-1/.config/ccbridge/env", "/sbx/sbx-1/.claude.json", "/sbx/sbx-1/.claude/settings.json"}
    env_file, mode = backend.homes["sbx-1"][PurePosixPath("/sbx/sbx-1/.config/ccbridge/env")]
    assert mode == 0o600 and ACCESS.encode() in env_file and REFRESH.encode() not in env_file
    assert "mkdir /sbx/sbx-1/.config/ccbridge 0o700" in backend.log
    assert ACCESS not in publisher.published[0][1].model_dump_json()


async def test_second_identical_event_writes_nothing_and_republishes_same_id() -> None:
    injector, _, publisher, backend = make()
    event = created("file")
    first = await injector.handle(event)
    second = await injector.handle(event)
    assert isinstance(first, Injected) and isinstance(second, Injected)
    assert len(first.written) == 3
    assert second.written == ()
    assert len(backend.writes()) == 3
    assert first.event.event_id == second.event.event_id


async def test_concurrent_duplicates_write_each_file_once() -> None:
    injector, _, _, backend = make()
    event = created("file")
    outcomes = await asyncio.gather(*(injector.handle(event) for _ in range(5)))
    assert all(isinstance(o, Injected) for o in outcomes)
    assert len(backend.writes()) == 3


async def test_refreshed_token_is_rewritten() -> None:
    injector, vault, _, backend = make()
    await injector.handle(created("file"))
    vault.result = VaultCredentials(
        bundle=TokenBundle(access_token="sk-ant-oat01-newer", expires_at=EXPIRES + 1, scopes=["user:inference"]),
        expires_at=EXPIRES + 1,
    )
    outcome = await injector.handle(created("file"))
    assert isinstance(outcome, Injected)
    assert outcome.written == ("/sbx/sbx-1/.claude/.credentials.json",)


@pytest.mark.parametrize(
    ("error", "reason"), [(NotConnected("x"), "not_connected"), (ReconnectRequired("y"), "reconnect_required")]
)
async def test_final_vault_errors_publish_failed_without_retry(error: SandboxError, reason: str) -> None:
    injector, _, publisher, backend = make(FakeVault(error))
    event = created("file")
    outcome = await injector.handle(event, delivery=1)
    assert isinstance(outcome, Failed)
    assert outcome.exhausted is False
    [(subject, failed)] = publisher.published
    assert subject == subjects.SANDBOX_CREDENTIALS_FAILED
    assert isinstance(failed, SandboxCredentialsFailed)
    assert failed.reason == reason
    assert failed.retryable is False
    assert failed.event_id == derived_event_id(event.event_id, "failed")
    assert backend.writes() == []


async def test_while_the_vault_is_down_the_event_waits_then_fails_once_its_window_is_over() -> None:
    """No answer from the vault: the message is held (no redelivery, no retry spent) while it is
    younger than the retry window; then it is reported, saying how long it kept failing."""
    vault = FakeVault(VaultUnavailable("no reply"))
    injector, _, publisher, _ = make(vault, window_s=0.3)
    outcome = await injector.handle(created("file"), delivery=1)
    assert isinstance(outcome, Failed) and outcome.exhausted is True
    assert len(vault.calls) >= 2  # probed while held, not redelivered
    [(_, failed)] = publisher.published
    assert isinstance(failed, SandboxCredentialsFailed)
    assert failed.reason == "vault_unavailable" and failed.retryable is True
    assert "still failing after 0 s, 1 deliveries" in failed.detail


async def test_a_vault_that_comes_back_gets_the_held_event_injected() -> None:
    vault = FakeVault(VaultUnavailable("no reply"))
    injector, _, publisher, backend = make(vault, window_s=30)

    async def back_soon() -> None:
        await asyncio.sleep(0.05)
        vault.result = FakeVault().result

    asyncio.get_running_loop().create_task(back_soon())
    outcome = await injector.handle(created("file"), delivery=1)
    assert isinstance(outcome, Injected) and len(backend.writes()) == 3
    assert [s for s, _ in publisher.published] == [subjects.SANDBOX_CREDENTIALS_INJECTED]


async def test_transient_backend_error_is_retried() -> None:
    injector, _, publisher, backend = make()
    backend.fail_writes = BackendError("write: EIO")
    outcome = await injector.handle(created("file"), delivery=1)
    assert isinstance(outcome, Retry)
    assert outcome.error.reason == "backend_error"
    assert publisher.published == []


async def test_unexpected_exception_becomes_retryable_backend_error() -> None:
    injector, _, publisher, _ = make(FakeVault(KeyError("bug")), max_deliver=2)
    assert isinstance(await injector.handle(created("file"), delivery=1), Retry)
    outcome = await injector.handle(created("file"), delivery=2)
    assert isinstance(outcome, Failed) and outcome.exhausted
    assert publisher.published[0][1].reason == "backend_error"


async def test_publish_failure_of_injected_event_is_retried() -> None:
    injector, _, _, _ = make(publisher=FakePublisher(fail=ConnectionError("nats down")))
    outcome = await injector.handle(created("file"), delivery=1)
    assert isinstance(outcome, Retry)


async def test_a_failure_report_that_cannot_be_published_brings_the_message_back() -> None:
    injector, _, _, _ = make(FakeVault(NotConnected()), FakePublisher(fail=ConnectionError("nats down")))
    assert isinstance(await injector.handle(created("file")), Retry)


async def test_unconfigured_backend_fails_finally() -> None:
    injector, vault, publisher, _ = make()
    outcome = await injector.handle(created("file", backend="e2b"))
    assert isinstance(outcome, Failed) and not outcome.exhausted
    assert publisher.published[0][1].reason == "backend_unavailable"
    assert vault.calls == []  # no credentials fetched for nothing


async def test_bad_config_dir_is_an_invalid_event() -> None:
    injector, _, publisher, backend = make()
    outcome = await injector.handle(created(options=SandboxOptions(mode="file", config_dir="../../etc")))
    assert isinstance(outcome, Failed)
    assert publisher.published[0][1].reason == "invalid_event"
    assert backend.writes() == []


async def test_config_dir_relocates_credentials_and_settings() -> None:
    injector, _, _, backend = make()
    outcome = await injector.handle(created(options=SandboxOptions(mode="file", config_dir="cfg")))
    assert isinstance(outcome, Injected)
    assert set(outcome.event.files) == {
        "/sbx/sbx-1/cfg/.credentials.json",
        "/sbx/sbx-1/cfg/settings.json",
        "/sbx/sbx-1/.claude.json",
        "/sbx/sbx-1/cfg/.claude.json",
    }
    assert "mkdir /sbx/sbx-1/cfg 0o700" in backend.log
