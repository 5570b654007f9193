"""Use cases on live sandboxes: what happens to the sandboxes already holding a person's
credentials when those credentials change.

- `tokens.refreshed` → re-inject into each live sandbox of the person (fresh credentials from
  the vault; a sandbox already holding them is left alone) and announce each re-injection as
  `sandbox.credentials.injected` with `refreshed_by` = the refresh event id. A sandbox still
  `pending` (its sandbox.created is being handled) gets its record touched, which makes that
  handler redo its work with the fresh credentials.
- `tokens.revoked` → remember the revocation time (a later-delivered sandbox.created from
  before it is refused), remove the credential files from each live sandbox, mark the record
  `scrubbed` and publish `sandbox.credentials.scrubbed`.
- `grants.ended` → the lease of one sandbox is over (expired, or the person ended it): remove
  the credential files from it and publish `sandbox.credentials.scrubbed` with the reason —
  unless the sandbox holds a grant signed after the end (a new lease).
- `sandbox.destroyed` → forget the sandbox, leaving a tombstone.

Every record update is compare-and-set; a conflict retries the whole message, and whatever was
already done is recognised on the next delivery (`touched_by` = this event) and only
re-announced with the same derived event id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace

from services.sandbox import domain
from services.sandbox.adapters.backends.base import BackendProvider, Target
from services.sandbox.adapters.live_registry import LiveRegistry
from services.sandbox.adapters.vault_client import CredentialsFor, VaultClient
from services.sandbox.errors import (
    BackendError,
    GrantInvalid,
    GrantRequired,
    SandboxError,
    SandboxNotFound,
)
from services.sandbox.injector import (
    EventPublisher,
    InjectionOptions,
    failed_event,
    injected_event,
    occurred_ms,
    provider_for,
)
from services.sandbox.writer import SandboxLocks, scrub_credentials, write_credentials
from shared import subjects
from shared.events import (
    GrantEnded,
    SandboxCredentialsFailed,
    SandboxCredentialsScrubbed,
    SandboxDestroyed,
    TokensRefreshed,
    TokensRevoked,
    derived_event_id,
)
from shared.grants import unverified_issued_at_ms
from shared.logging import get_logger

log = get_logger("ccbridge.sandbox.live")

@dataclass(frozen=True)
class Done:
    sandboxes: tuple[str, ...] = ()
    """The sandboxes this message changed (re-injected / scrubbed)."""
    failed: tuple[SandboxCredentialsFailed, ...] = ()
    """Final per-sandbox failures that were reported."""


class LiveFailures(SandboxError):
    """Some sandboxes of the message failed in a way worth another try (the others are done or
    reported). Its `dependency` is theirs when they all wait on the same one (the vault, e2b):
    the delivery policy then holds the message until it is back."""

    def __init__(self, action: str, failures: list[tuple[domain.LiveSandbox, SandboxError]]) -> None:
        first = failures[0][1]
        dependencies = {error.dependency for _, error in failures}
        super().__init__(f"{action} failed for {len(failures)} sandbox(es): {first.detail}", retryable=True,
                         dependency=dependencies.pop() if len(dependencies) == 1 else None)
        self.reason = first.reason
        self.action = action
        self.failures = failures


Result = str | None | SandboxError
"""Per sandbox: its id when changed, None when nothing to do, or the error."""


def _per_sandbox_id(event_id: str, sandbox_id: str, kind: str) -> str:
    return derived_event_id(f"{event_id}:{sandbox_id}", kind)


def _target(record: domain.LiveSandbox, event_id: str) -> Target:
    return Target(
        event_id=event_id,
        sandbox_id=record.target_id,
        backend=record.backend,
        home=record.home,
        user=record.user,
    )


class LiveSandboxes:
    def __init__(
        self,
        *,
        vault: VaultClient,
        backends: Mapping[str, BackendProvider],
        publisher: EventPublisher,
        registry: LiveRegistry,
        options: InjectionOptions,
        locks: SandboxLocks,
        concurrency: int = 4,
    ) -> None:
        self._vault = vault
        self._backends = dict(backends)
        self._publisher = publisher
        self._registry = registry
        self._options = options
        self._locks = locks
        self._concurrency = max(1, concurrency)

    # --- sandbox.destroyed ------------------------------------------------------------------
    async def on_destroyed(self, event: SandboxDestroyed) -> None:
        await self._registry.destroyed(event.user_id, event.sandbox_id)
        log.info("sandbox.forgotten", sandbox_id=event.sandbox_id, user_id=event.user_id, cause_event_id=event.event_id)

    # --- tokens.refreshed -------------------------------------------------------------------
    async def on_refreshed(self, event: TokensRefreshed) -> Done:
        records = [(r, rev) for r, rev in await self._registry.for_user(event.user_id) if r.state != "scrubbed"]
        if not records:
            return Done()
        results = await self._each(records, lambda rec, rev: self._refresh_one(event, rec, rev))
        return await self._conclude(event, results, action="re-inject")

    async def _refresh_one(self, event: TokensRefreshed, record: domain.LiveSandbox, revision: int) -> str | None:
        async with self._locks.hold(record.backend, record.sandbox_id):
            lookup = await self._registry.get(record.user_id, record.sandbox_id)
            if lookup.record is None or lookup.revision is None:
                return None  # destroyed / forgotten meanwhile
            record, revision = lookup.record, lookup.revision
            if record.state == "scrubbed":
                return None
            if record.state == "pending":
                if record.touched_by != event.event_id:  # its handler must redo with fresh credentials
                    await self._registry.save(replace(record, touched_by=event.event_id), revision=revision)
                return None
            provider = provider_for(self._backends, record.backend)
            try:  # each sandbox under its own grant: the vault applies its newest lease
                creds = await self._vault.fetch(CredentialsFor(
                    user_id=record.user_id, sandbox_id=record.sandbox_id, grant=record.grant, mode=record.mode))
            except (GrantInvalid, GrantRequired):
                if record.lease_expires_at is not None and record.lease_expires_at <= time.time() * 1000:
                    # the lease is over: grants.ended (from the vault's sweeper) scrubs it
                    log.info("sandbox.lease_over_on_refresh", sandbox_id=record.sandbox_id, user_id=record.user_id)
                    return None
                raise
            bundle = domain.check_usable(creds.bundle)
            opts = self._options
            fp = opts.fingerprint(bundle, mode=record.mode, config_dir=record.config_dir, mcp=record.mcp)
            if record.fingerprint == fp:
                if record.touched_by == event.event_id:  # done by an earlier delivery: announce again
                    await self._announce_reinjected(event, record)
                    return record.sandbox_id
                return None  # already holds these credentials
            try:
                async with provider.open(_target(record, record.created_event_id), must_exist=True) as sandbox:
                    layout = opts.layout(sandbox.home, record.config_dir)
                    written = await write_credentials(sandbox, layout, record.mode, bundle,
                                                      mcp_package=opts.mcp_package_for(record.mcp))
            except SandboxNotFound:
                await self._registry.forget(record.user_id, record.sandbox_id)
                log.info("sandbox.gone_on_refresh", sandbox_id=record.sandbox_id, user_id=record.user_id)
                return None
            record = replace(
                record,
                fingerprint=fp,
                expires_at=creds.expires_at,
                files=written.files,
                touched_by=event.event_id,
                lease_expires_at=creds.lease_expires_at,
            )
            await self._registry.save(record, revision=revision)
            log.info(
                "sandbox.credentials_reinjected",
                sandbox_id=record.sandbox_id,
                user_id=record.user_id,
                written=list(written.written),
                cause_event_id=event.event_id,
            )
            await self._announce_reinjected(event, record)
            return record.sandbox_id

    async def _announce_reinjected(self, event: TokensRefreshed, record: domain.LiveSandbox) -> None:
        await self._publisher.publish(
            subjects.SANDBOX_CREDENTIALS_INJECTED,
            injected_event(record, event_id=_per_sandbox_id(event.event_id, record.sandbox_id, "reinjected"),
                           refreshed_by=event.event_id),
        )

    # --- tokens.revoked ---------------------------------------------------------------------
    async def on_revoked(self, event: TokensRevoked) -> Done:
        # never later than now: a publisher's clock must not refuse the person's future sandboxes
        await self._registry.mark_revoked(event.user_id, min(occurred_ms(event), int(time.time() * 1000)))
        records = list(await self._registry.for_user(event.user_id))
        if not records:
            return Done()
        results = await self._each(records, lambda rec, rev: self._scrub_one(event, rec))
        return await self._conclude(event, results, action="scrub")

    # --- grants.ended -----------------------------------------------------------------------
    async def on_grant_ended(self, event: GrantEnded) -> Done:
        """Scrub the one sandbox whose lease ended — not one that holds a newer grant."""
        lookup = await self._registry.get(event.user_id, event.sandbox_id)
        record = lookup.record
        if record is None or lookup.revision is None:
            return Done()
        issued_at = unverified_issued_at_ms(record.grant) if record.grant else None
        if issued_at is not None and issued_at > event.ended_at:  # the vault's rule: domain.SandboxLease
            log.info("sandbox.grant_end_ignored", sandbox_id=event.sandbox_id, user_id=event.user_id,
                     why="the sandbox holds a grant signed after the lease ended")
            return Done()
        results = await self._each([(record, lookup.revision)], lambda rec, rev: self._scrub_one(event, rec))
        return await self._conclude(event, results, action="scrub")

    async def _scrub_one(self, event: TokensRevoked | GrantEnded, record: domain.LiveSandbox) -> str | None:
        async with self._locks.hold(record.backend, record.sandbox_id):
            lookup = await self._registry.get(record.user_id, record.sandbox_id)
            if lookup.record is None or lookup.revision is None:
                return None
            record, revision = lookup.record, lookup.revision
            if record.state == "scrubbed":
                if record.touched_by == event.event_id:  # done by an earlier delivery: announce again
                    await self._announce_scrubbed(event, record, gone=False)
                    return record.sandbox_id
                return None
            provider = provider_for(self._backends, record.backend)
            gone = False
            try:
                async with provider.open(_target(record, record.created_event_id), must_exist=True) as sandbox:
                    layout = self._options.layout(sandbox.home, record.config_dir)
                    removed = await scrub_credentials(sandbox, layout)
            except SandboxNotFound:
                gone, removed = True, ()
            if gone:
                await self._registry.forget(record.user_id, record.sandbox_id)
            else:
                await self._registry.save(
                    replace(record, state="scrubbed", fingerprint=None, files=removed, touched_by=event.event_id),
                    revision=revision,
                )
            record = replace(record, files=removed)
            log.info(
                "sandbox.credentials_scrubbed",
                sandbox_id=record.sandbox_id,
                user_id=record.user_id,
                removed=list(removed),
                sandbox_gone=gone,
                cause_event_id=event.event_id,
            )
            await self._announce_scrubbed(event, record, gone=gone)
            return record.sandbox_id

    async def _announce_scrubbed(
        self, event: TokensRevoked | GrantEnded, record: domain.LiveSandbox, *, gone: bool
    ) -> None:
        await self._publisher.publish(
            subjects.SANDBOX_CREDENTIALS_SCRUBBED,
            SandboxCredentialsScrubbed(
                event_id=_per_sandbox_id(event.event_id, record.sandbox_id, "scrubbed"),
                user_id=record.user_id,
                sandbox_id=record.sandbox_id,
                cause_event_id=event.event_id,
                backend=record.backend,
                files=list(record.files),
                sandbox_gone=gone,
                reason=event.reason,
            ),
        )

    # --- shared -------------------------------------------------------------------------------
    async def _each(
        self,
        records: list[tuple[domain.LiveSandbox, int]],
        work: Callable[[domain.LiveSandbox, int], Awaitable[str | None]],
    ) -> list[tuple[domain.LiveSandbox, str | None | SandboxError]]:
        gate = asyncio.Semaphore(self._concurrency)

        async def one(record: domain.LiveSandbox, revision: int) -> tuple[domain.LiveSandbox, Result]:
            async with gate:
                try:
                    return record, await work(record, revision)
                except SandboxError as exc:
                    return record, exc
                except Exception as exc:
                    log.exception("sandbox.live_crashed", sandbox_id=record.sandbox_id)
                    return record, BackendError(f"unexpected {type(exc).__name__}", retryable=True)

        return list(await asyncio.gather(*(one(r, rev) for r, rev in records)))

    async def _conclude(
        self,
        event: TokensRefreshed | TokensRevoked | GrantEnded,
        results: list[tuple[domain.LiveSandbox, str | None | SandboxError]],
        *,
        copy_seq: int | None = None,
        action: str,
    ) -> Done:
        """Report each final per-sandbox failure now; raise `LiveFailures` for the retryable ones
        (the delivery policy retries the message — what is done is recognised and not redone —
        and, once its window has run out, `report_failed` reports them)."""
        done = tuple(r for _, r in results if isinstance(r, str))
        errors = [(rec, r) for rec, r in results if isinstance(r, SandboxError)]
        final = [(rec, e) for rec, e in errors if not e.retryable]
        reported = tuple([await self._report(event, rec, error, f"{action} failed: {error.detail}")
                          for rec, error in final])
        retryable = [(rec, e) for rec, e in errors if e.retryable]
        if retryable:
            log.warning("sandbox.live_retry", event_id=event.event_id, user_id=event.user_id,
                        failing=[rec.sandbox_id for rec, _ in retryable], reason=retryable[0][1].reason,
                        detail=retryable[0][1].detail)
            raise LiveFailures(action, retryable)
        return Done(done, reported)

    async def report_failed(self, event: TokensRefreshed | TokensRevoked | GrantEnded, error: BaseException,
                            detail: str, exhausted: bool) -> None:
        """The message failed for good: a `sandbox.credentials.failed` for each sandbox still failing."""
        if not isinstance(error, LiveFailures):
            log.error("sandbox.live_failed_unexpectedly", event_id=event.event_id, error=type(error).__name__)
            return
        suffix = detail[len(error.detail):] if detail.startswith(error.detail) else ""
        for record, failure in error.failures:
            await self._report(event, record, failure, f"{error.action} failed: {failure.detail}{suffix}")

    async def _report(self, event: TokensRefreshed | TokensRevoked | GrantEnded, record: domain.LiveSandbox,
                      error: SandboxError, detail: str) -> SandboxCredentialsFailed:
        failed = failed_event(event, record.sandbox_id, error, detail,
                              event_id=_per_sandbox_id(event.event_id, record.sandbox_id, "failed"))
        await self._publisher.publish(subjects.SANDBOX_CREDENTIALS_FAILED, failed)
        log.warning("sandbox.live_failed", sandbox_id=record.sandbox_id, reason=failed.reason, detail=failed.detail)
        return failed
