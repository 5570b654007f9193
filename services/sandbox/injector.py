"""Use case: inject a person's Claude Code credentials into one sandbox.

fetch credentials (vault) → build the files (domain) → write the ones that changed
(backend) → publish `sandbox.credentials.injected`; on error either ask for a redelivery
(`Retry`) or publish `sandbox.credentials.failed` (`Failed`).

Idempotency: result events carry `derived_event_id(cause, "injected"|"failed")`, so a
redelivered or duplicated `sandbox.created` republishes the same id and JetStream drops the
copy; and a file already holding the exact bytes is not rewritten. Work on one sandbox is
serialised inside this process.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from shared import subjects
from shared.events import (
    CredentialMode,
    Event,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxCredentialsInjected,
    derived_event_id,
)
from shared.logging import get_logger
from services.sandbox import domain
from services.sandbox.adapters.backends.base import BackendProvider
from services.sandbox.adapters.vault_client import VaultClient
from services.sandbox.errors import BackendError, BackendUnavailable, SandboxError

log = get_logger("ccbridge.sandbox.injector")


class EventPublisher(Protocol):
    async def publish(self, subject: str, event: Event) -> None: ...


@dataclass(frozen=True)
class Injected:
    event: SandboxCredentialsInjected
    written: tuple[str, ...]
    """Files actually (re)written this time; empty when the sandbox already held them."""


@dataclass(frozen=True)
class Retry:
    error: SandboxError
    delay: float


@dataclass(frozen=True)
class Failed:
    event: SandboxCredentialsFailed
    error: SandboxError
    exhausted: bool
    """True when a retryable error ran out of deliveries: the message goes to the DLQ."""


Outcome = Injected | Retry | Failed


@dataclass(frozen=True)
class RetryPolicy:
    max_deliver: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, delivery: int) -> float:
        return domain.retry_delay(delivery, base=self.base_delay, cap=self.max_delay)


class CredentialInjector:
    def __init__(
        self,
        *,
        vault: VaultClient,
        backends: Mapping[str, BackendProvider],
        publisher: EventPublisher,
        default_mode: CredentialMode = "file",
        retry: RetryPolicy | None = None,
    ) -> None:
        self._vault = vault
        self._backends = dict(backends)
        self._publisher = publisher
        self._default_mode = default_mode
        self._retry = retry or RetryPolicy()
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._retry

    def mode_of(self, event: SandboxCreated) -> CredentialMode:
        return event.options.mode or self._default_mode

    async def handle(self, event: SandboxCreated, *, delivery: int = 1) -> Outcome:
        """Inject and report. Never raises for a domain failure; raises only if even the
        failure report cannot be published (the caller then lets the message be redelivered)."""
        try:
            result = await self.inject(event)
            await self._publisher.publish(subjects.SANDBOX_CREDENTIALS_INJECTED, result.event)
        except SandboxError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a bug or a bus hiccup: retry, then give up
            log.exception("sandbox.inject_crashed", sandbox_id=event.sandbox_id, cause_event_id=event.event_id)
            error = BackendError(f"unexpected {type(exc).__name__}", retryable=True)
        else:
            log.info(
                "sandbox.credentials_injected",
                sandbox_id=event.sandbox_id,
                user_id=event.user_id,
                mode=result.event.mode,
                written=len(result.written),
                cause_event_id=event.event_id,
            )
            return result

        if error.retryable and delivery < self._retry.max_deliver:
            delay = self._retry.delay(delivery)
            log.warning(
                "sandbox.inject_retry",
                sandbox_id=event.sandbox_id,
                reason=error.reason,
                detail=error.detail,
                delivery=delivery,
                delay_s=delay,
            )
            return Retry(error, delay)

        exhausted = error.retryable
        detail = error.detail
        if exhausted:
            detail = f"{detail} (after {delivery} deliveries)"[-500:]
        failed = SandboxCredentialsFailed(
            event_id=derived_event_id(event.event_id, "failed"),
            user_id=event.user_id,
            sandbox_id=event.sandbox_id,
            cause_event_id=event.event_id,
            reason=error.reason,
            detail=detail,
            retryable=error.retryable,
        )
        await self._publisher.publish(subjects.SANDBOX_CREDENTIALS_FAILED, failed)
        log.warning(
            "sandbox.credentials_failed",
            sandbox_id=event.sandbox_id,
            user_id=event.user_id,
            reason=error.reason,
            detail=detail,
            exhausted=exhausted,
        )
        return Failed(failed, error, exhausted)

    async def inject(self, event: SandboxCreated) -> Injected:
        """Fetch, build and write; raises `SandboxError`s. Publishes nothing."""
        mode = self.mode_of(event)
        provider = self._backends.get(event.backend)
        if provider is None:
            raise BackendUnavailable(f"backend {event.backend!r} is not configured in this service")
        credentials = await self._vault.fetch(event.user_id, mode)
        bundle = credentials.bundle if mode != "env" else None
        if mode != "env":
            domain.check_usable(bundle)

        async with self._lock(event.backend, event.sandbox_id), provider.open(event) as sandbox:
            layout = domain.resolve_layout(sandbox.home, event.options.config_dir)
            existing: dict[PurePosixPath, bytes | None] = {}
            for path in layout.merged_paths:
                existing[path] = await sandbox.read_file(path)
            files = domain.build_files(layout, mode, bundle, existing)
            await sandbox.make_dir(layout.config_dir, domain.DIR_MODE)
            written: list[str] = []
            for spec in files:
                current = existing[spec.path] if spec.path in existing else await sandbox.read_file(spec.path)
                if current == spec.content:
                    continue
                await sandbox.write_file(spec.path, spec.content, spec.mode)
                written.append(str(spec.path))

        injected = SandboxCredentialsInjected(
            event_id=derived_event_id(event.event_id, "injected"),
            user_id=event.user_id,
            sandbox_id=event.sandbox_id,
            cause_event_id=event.event_id,
            backend=event.backend,
            mode=mode,
            expires_at=credentials.expires_at,
            files=[str(spec.path) for spec in files],
            env=domain.env_names(mode),
        )
        return Injected(injected, tuple(written))

    def _lock(self, backend: str, sandbox_id: str) -> asyncio.Lock:
        key = (backend, sandbox_id)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock
