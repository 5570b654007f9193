"""Use case: inject a person's Claude Code credentials into one sandbox (`sandbox.created`).

look up the live record → (duplicate? answer again) → record the intent (`pending`) and, at
the same time, fetch the credentials (vault) → write the files that changed (backend) → record
`injected` → publish `sandbox.credentials.injected` (`run`). Errors are raised; the one delivery policy
(`shared.delivery`) holds the message while the vault or e2b is down, retries, or — once the
retry window has run out, or at once for a final error — dead-letters it and calls
`report_failed` (clean up, publish `sandbox.credentials.failed`).

No second effect for a duplicate: the same event_id finds its own `injected` record and only
re-announces the result (same derived event id → JetStream drops the copy); another event for
a sandbox that already holds the same credentials (same keyed fingerprint) writes nothing; and
a file already holding the exact bytes is never rewritten. Records are compare-and-set: a
refresh or revoke that touched the record while we worked forces a redo.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Protocol

from services.sandbox import domain
from services.sandbox.adapters.backends.base import BackendProvider, Target
from services.sandbox.adapters.live_registry import LiveRegistry
from services.sandbox.adapters.vault_client import CredentialsFor, VaultClient
from services.sandbox.errors import (
    BackendError,
    BackendUnavailable,
    NotConnected,
    ReconnectRequired,
    SandboxError,
    SandboxGone,
    SandboxNotFound,
)
from services.sandbox.writer import SandboxLocks, scrub_credentials, write_credentials
from shared import subjects
from shared.events import (
    CredentialMode,
    Event,
    SandboxCreated,
    SandboxCredentialsFailed,
    SandboxCredentialsInjected,
    TokenBundle,
    derived_event_id,
)
from shared.logging import get_logger

log = get_logger("ccbridge.sandbox.injector")


class EventPublisher(Protocol):
    async def publish(self, subject: str, event: Event) -> None: ...


@dataclass(frozen=True)
class Injected:
    event: SandboxCredentialsInjected
    written: tuple[str, ...]
    """Files actually (re)written this time; empty when the sandbox already held them."""
    duplicate: bool = False
    """True when this very event had been handled already (only re-announced)."""


@dataclass(frozen=True)
class InjectionOptions:
    default_mode: CredentialMode = "access_only"
    env_file: str = domain.DEFAULT_ENV_FILE
    mcp_package: str = domain.DEFAULT_MCP_PACKAGE
    fingerprint_key: bytes = b"ccbridge-unkeyed"

    def layout(self, home: PurePosixPath, config_dir: str | None) -> domain.Layout:
        """Where the files go in a sandbox with this home."""
        return domain.resolve_layout(home, config_dir, env_file=self.env_file)

    def mcp_package_for(self, mcp: bool) -> str | None:
        return self.mcp_package if mcp else None

    def fingerprint(self, bundle: TokenBundle, *, mode: CredentialMode, config_dir: str | None, mcp: bool) -> str:
        """`domain.fingerprint` of what an injection with these options writes."""
        return domain.fingerprint(self.fingerprint_key, mode=mode, bundle=bundle, config_dir=config_dir,
                                  env_file=self.env_file, mcp_package=self.mcp_package_for(mcp))


def provider_for(backends: Mapping[str, BackendProvider], kind: str) -> BackendProvider:
    provider = backends.get(kind)
    if provider is None:
        raise BackendUnavailable(f"backend {kind!r} is not configured in this service")
    return provider


def failed_event(cause: Event, sandbox_id: str, error: SandboxError, detail: str, *, event_id: str
                 ) -> SandboxCredentialsFailed:
    """`sandbox.credentials.failed` for `sandbox_id`, caused by `cause` (the detail's tail: the
    end of an error chain says the most)."""
    return SandboxCredentialsFailed(
        event_id=event_id,
        user_id=cause.user_id,
        sandbox_id=sandbox_id,
        cause_event_id=cause.event_id,
        reason=error.reason,
        detail=detail[-500:],
        retryable=error.retryable,
    )


def injected_event(record: domain.LiveSandbox, *, event_id: str, refreshed_by: str | None = None
                   ) -> SandboxCredentialsInjected:
    """`sandbox.credentials.injected` for what `record` holds (caused by its sandbox.created)."""
    return SandboxCredentialsInjected(
        event_id=event_id,
        user_id=record.user_id,
        sandbox_id=record.sandbox_id,
        cause_event_id=record.created_event_id,
        backend=record.backend,
        mode=record.mode,
        expires_at=record.expires_at or 0,
        files=list(record.files),
        env=dict(record.env),
        backend_sandbox_id=record.backend_sandbox_id,
        refreshed_by=refreshed_by,
    )


def occurred_ms(event: Event) -> int:
    return int(event.occurred_at.timestamp() * 1000)


class Revoked(NotConnected):
    """tokens.revoked for this person came after this sandbox.created: do not inject."""


class CredentialInjector:
    def __init__(
        self,
        *,
        vault: VaultClient,
        backends: Mapping[str, BackendProvider],
        publisher: EventPublisher,
        registry: LiveRegistry,
        options: InjectionOptions,
        locks: SandboxLocks,
    ) -> None:
        """`locks`: the same `SandboxLocks` as the process's `LiveSandboxes`, so work on one
        sandbox (created, refresh, revoke) is serialised in this process."""
        self._vault = vault
        self._backends = dict(backends)
        self._publisher = publisher
        self._registry = registry
        self._options = options
        self._locks = locks

    @property
    def registry(self) -> LiveRegistry:
        return self._registry

    def mode_of(self, event: SandboxCreated) -> CredentialMode:
        return event.options.mode or self._options.default_mode

    def needs(self, event: SandboxCreated) -> tuple[str, ...]:
        """The dependencies an injection calls (their breakers hold it while they are down)."""
        return ("vault", event.backend) if event.backend == "e2b" else ("vault",)

    # --- the message ------------------------------------------------------------------------
    async def run(self, event: SandboxCreated) -> Injected:
        """Inject and announce it (`sandbox.credentials.injected`). Raises `SandboxError`s; what
        happens then (hold, retry, report) is the delivery policy's business."""
        try:
            result = await self.inject(event)
        except SandboxError:
            raise
        except Exception as exc:  # a bug: retried, then final like any retryable error
            log.exception("sandbox.inject_crashed", sandbox_id=event.sandbox_id, cause_event_id=event.event_id)
            raise BackendError(f"unexpected {type(exc).__name__}", retryable=True) from exc
        await self._publisher.publish(subjects.SANDBOX_CREDENTIALS_INJECTED, result.event)
        log.info(
            "sandbox.credentials_injected",
            sandbox_id=event.sandbox_id,
            user_id=event.user_id,
            mode=result.event.mode,
            written=list(result.written),
            duplicate=result.duplicate,
            cause_event_id=event.event_id,
        )
        return result

    async def report_failed(self, event: SandboxCreated, error: BaseException, detail: str,
                            exhausted: bool) -> SandboxCredentialsFailed:
        """The injection failed for good: clean up after it and publish
        `sandbox.credentials.failed` (its id derives from the cause: a second report dedupes)."""
        failure = error if isinstance(error, SandboxError) else BackendError(detail, retryable=True)
        await self._settle_final(event, failure)
        failed = failed_event(event, event.sandbox_id, failure, detail,
                              event_id=derived_event_id(event.event_id, "failed"))
        await self._publisher.publish(subjects.SANDBOX_CREDENTIALS_FAILED, failed)
        log.warning(
            "sandbox.credentials_failed",
            sandbox_id=event.sandbox_id,
            user_id=event.user_id,
            reason=failure.reason,
            detail=detail,
            exhausted=exhausted,
        )
        return failed

    # --- the work ---------------------------------------------------------------------------
    async def inject(self, event: SandboxCreated) -> Injected:
        """Fetch, build, write and record; raises `SandboxError`s. Publishes nothing."""
        mode = self.mode_of(event)
        provider = provider_for(self._backends, event.backend)
        opts = self._options
        async with self._locks.hold(event.backend, event.sandbox_id):
            # two independent reads: one round trip of waiting instead of two
            lookup, revoked_at = await asyncio.gather(
                self._registry.get(event.user_id, event.sandbox_id), self._registry.revoked_at(event.user_id)
            )
            if lookup.destroyed:
                raise SandboxGone(f"sandbox.destroyed was received for {event.sandbox_id} before this event")
            record, revision = lookup.record, lookup.revision
            if record is not None and record.state == "injected" and record.created_event_id == event.event_id:
                return Injected(self._injected_event(event, record), (), duplicate=True)
            if revoked_at is not None and occurred_ms(event) <= revoked_at:
                raise Revoked("the person's credentials were revoked after this sandbox.created")
            # the vault checks the grant before it seals anything: a refusal writes nothing. It is
            # asked only now, once the lookups let the injection go on: nothing leaves the vault
            # for a destroyed sandbox or a person who revoked meanwhile.
            want = CredentialsFor(user_id=event.user_id, sandbox_id=event.sandbox_id, grant=event.grant, mode=mode)
            if record is None:  # the intent, so a concurrent refresh / revoke sees this sandbox
                record = domain.LiveSandbox(
                    user_id=event.user_id,
                    sandbox_id=event.sandbox_id,
                    backend=event.backend,
                    created_event_id=event.event_id,
                    mode=mode,
                    home=event.home,
                    user=event.user,
                    template=event.template,
                    config_dir=event.options.config_dir,
                    mcp=event.options.mcp,
                    grant=event.grant,
                )
                # recording the intent and asking the vault are independent: both at once (one
                # round trip of waiting instead of two); nothing is written before both are done
                revision, credentials = await asyncio.gather(self._registry.save(record, revision=None),
                                                             self._vault.fetch(want))
            else:
                credentials = await self._vault.fetch(want)
            bundle = domain.check_usable(credentials.bundle)
            fp = opts.fingerprint(bundle, mode=mode, config_dir=event.options.config_dir, mcp=event.options.mcp)
            written: tuple[str, ...]  # the files this delivery wrote (none when it had nothing to do)
            if record.state == "injected" and record.fingerprint == fp:
                # this sandbox already holds exactly these credentials: no second effect
                files, written, backend_id = record.files, (), record.backend_sandbox_id
            else:
                target = event if record.backend_sandbox_id is None else self._target(event, record)
                async with provider.open(target) as sandbox:
                    backend_id = sandbox.backend_sandbox_id or record.backend_sandbox_id
                    if backend_id and record.backend_sandbox_id is None:
                        # remember a freshly created e2b sandbox before anything else can fail
                        record = replace(record, backend_sandbox_id=backend_id)
                        revision = await self._registry.save(record, revision=revision)
                    layout = opts.layout(sandbox.home, event.options.config_dir)
                    result = await write_credentials(sandbox, layout, mode, bundle,
                                                     mcp_package=opts.mcp_package_for(event.options.mcp))
                files, written = result.files, result.written
            record = replace(
                record,
                state="injected",
                created_event_id=event.event_id,
                backend=event.backend,  # where the files were just written
                mode=mode,
                home=event.home,
                user=event.user,
                config_dir=event.options.config_dir,
                mcp=event.options.mcp,
                backend_sandbox_id=backend_id,
                fingerprint=fp,
                expires_at=credentials.expires_at,
                files=tuple(files),
                env=domain.env_names(mode),
                touched_by=None,
                grant=event.grant,
                lease_expires_at=credentials.lease_expires_at,
            )
            await self._registry.save(record, revision=revision)
        return Injected(self._injected_event(event, record), tuple(written))

    @staticmethod
    def _target(event: SandboxCreated, record: domain.LiveSandbox) -> Target:
        """The e2b sandbox created for this platform sandbox earlier: connect, never create again."""
        return Target(
            event_id=event.event_id,
            sandbox_id=record.target_id,
            backend=event.backend,
            home=event.home,
            user=event.user,
        )

    @staticmethod
    def _injected_event(event: SandboxCreated, record: domain.LiveSandbox) -> SandboxCredentialsInjected:
        return injected_event(record, event_id=derived_event_id(event.event_id, "injected"))

    async def _settle_final(self, event: SandboxCreated, error: SandboxError) -> None:
        """After a final failure: drop our own `pending` intent; and when the person has no
        usable connection any more, make sure this sandbox holds none of their credentials
        (a revoke may have raced an earlier delivery of this very event). Best effort."""
        if isinstance(error, SandboxGone) or event.backend not in self._backends:
            return
        try:
            async with self._locks.hold(event.backend, event.sandbox_id):
                lookup = await self._registry.get(event.user_id, event.sandbox_id)
                record = lookup.record
                untouched_intent = record is not None and record.state == "pending" and record.touched_by is None
                no_connection = isinstance(error, (NotConnected, ReconnectRequired))
                if isinstance(error, Revoked) or (no_connection and record is not None and not untouched_intent):
                    await self._scrub(event, record, lookup.revision)
                elif untouched_intent and record is not None and record.created_event_id == event.event_id:
                    if record.backend_sandbox_id and record.template is not None:
                        # created from a template for this event, never injected: nobody else
                        # knows its id, so it would only run until its timeout
                        await self._backends[event.backend].discard(record.backend_sandbox_id)
                    await self._registry.forget(event.user_id, event.sandbox_id)
        except Exception as exc:  # noqa: BLE001 - the failure report matters more
            log.warning("sandbox.settle_failed", sandbox_id=event.sandbox_id, error=repr(exc))

    async def _scrub(self, event: SandboxCreated, record: domain.LiveSandbox | None, revision: int | None) -> None:
        if record is not None:
            target: Target = self._target(event, record)
        else:
            target = Target(event_id=event.event_id, sandbox_id=event.sandbox_id, backend=event.backend,
                            home=event.home, user=event.user)
        config_dir = record.config_dir if record is not None else event.options.config_dir
        try:
            async with self._backends[event.backend].open(target, must_exist=True) as sandbox:
                layout = self._options.layout(sandbox.home, config_dir)
                removed = await scrub_credentials(sandbox, layout)
        except SandboxNotFound:
            return
        if removed:
            log.warning("sandbox.credentials_scrubbed_after_failure", sandbox_id=event.sandbox_id,
                        removed=list(removed))
        if record is not None and revision is not None:
            await self._registry.save(
                replace(record, state="scrubbed", fingerprint=None, files=removed), revision=revision
            )
