"""Use cases of sandbox leases: which sandbox may receive whose credentials, and until when.

A person grants one sandbox (auth signs the grant); the vault checks every credentials request
against the grant it carries and against the newest grant it has seen for that (person,
sandbox) — the lease (`domain.SandboxLease`). Leases reach the vault three ways:
- with a credentials request (the grant in `sandbox.created`, passed on by the sandbox service);
- `grants.issued` from auth (a newer grant for a live sandbox: extend, shorten, change mode);
- `grants.revoked` from auth (the person ended it) — recorded even before the vault has seen
  the grant, so the grant is void when it arrives.

When a lease ends (revoked, or expired: the sweeper ends those at their expiry) the vault
publishes `grants.ended`; the sandbox service scrubs that sandbox. The end is stored first and
marked announced after the publish, so a crash in between only means the sweeper announces it
again (same derived event id: JetStream drops the copy; the sandbox side is idempotent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

from services.vault.domain import AuditEntry, SandboxLease
from services.vault.errors import GrantInvalid, GrantRequired, InvalidEvent
from services.vault.metrics import VaultMetrics
from services.vault.ports import EventPublisher, UnitOfWork
from shared import subjects
from shared.events import (
    CredentialsItem,
    CredentialsRequest,
    GrantEnded,
    GrantIssued,
    GrantRevoked,
    GrantsListReply,
    GrantsListRequest,
    GrantView,
    derived_event_id,
    utcnow,
)
from shared.grants import EXPIRED, GrantClaims, GrantError
from shared.logging import get_logger

log = get_logger(__name__)


class GrantChecker(Protocol):
    """shared.grants.GrantVerifier, or the vault's reloading `trust.GrantKeys`."""

    def verify(self, token: str, *, now_s: float, allow_expired: bool = False) -> GrantClaims: ...


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def ended_event(lease: SandboxLease) -> GrantEnded:
    assert lease.ended_at is not None and lease.end_reason is not None
    return GrantEnded(
        event_id=derived_event_id(f"{lease.user_id}\x00{lease.sandbox_id}\x00{lease.ended_at}", "grant-ended"),
        user_id=lease.user_id,
        sandbox_id=lease.sandbox_id,
        reason=lease.end_reason,
        ended_at=lease.ended_at,
    )


class Leases:
    def __init__(
        self,
        *,
        unit_of_work: Callable[[], UnitOfWork],
        verifier: GrantChecker | None,
        required: bool,
        publisher: EventPublisher | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: VaultMetrics | None = None,
        actor: str = "vault",
    ) -> None:
        """`verifier` None: no auth grant key is trusted (then `required` refuses everything)."""
        self._uow = unit_of_work
        self._verifier = verifier
        self.required = required
        self._publisher = publisher
        self._clock = clock
        self.metrics = metrics or VaultMetrics()
        self._actor = actor

    def __repr__(self) -> str:
        return f"Leases(required={self.required}, verifier={self._verifier!r})"

    def now_ms(self) -> int:
        return ms(self._clock())

    # --- vault.credentials.get --------------------------------------------------------
    def claims_of(self, request: CredentialsRequest | CredentialsItem) -> GrantClaims | None:
        """The request's grant: signed by auth, for this person and this sandbox; None when
        grants are off. Raises `GrantRequired` / `GrantInvalid`. Expiry and mode are the lease's
        business (`admit`, `SandboxLease.check`): a live sandbox still presents the grant it was
        created with after a newer one extended, shortened or narrowed its lease."""
        if not self.required:
            return None
        if request.grant is None:
            raise GrantRequired("no grant for this sandbox: ask auth for one (POST /v1/claude-code/grants)")
        if self._verifier is None:
            raise GrantInvalid("the vault trusts no grant key (VAULT_GRANT_PUBLIC_KEYS / auth.grant.pub)")
        try:
            claims = self._verifier.verify(request.grant, now_s=self.now_ms() / 1000, allow_expired=True)
        except GrantError as exc:
            raise GrantInvalid(exc.detail) from None
        if claims.sub != request.user_id:
            raise GrantInvalid("grant is for another person")
        if request.sandbox_id is None or claims.sbx != request.sandbox_id:
            raise GrantInvalid("grant is for another sandbox")
        return claims

    async def admit(
        self, offered: Sequence[tuple[GrantClaims, SandboxLease | None]]
    ) -> list[SandboxLease | GrantInvalid]:
        """For each (claims, the stored lease of its sandbox): the lease that governs that sandbox
        after taking the claims into account — the stored one if it is newer, else the claims
        (stored now, all of them in ONE transaction) — or `GrantInvalid` if an end voids them,
        or if they are expired and nothing newer is known."""
        now = self.now_ms()
        results: list[SandboxLease | GrantInvalid | None] = [None] * len(offered)
        newer: list[int] = []
        for index, (claims, lease) in enumerate(offered):
            newest = lease is None or claims.newer_than(lease.issued_at, lease.jti)
            if newest and claims.exp_ms <= now:
                results[index] = GrantInvalid(EXPIRED)
            elif lease is not None and not newest:  # the newest grant the vault knows governs
                results[index] = GrantInvalid("this grant was ended") if lease.voids(claims) else lease
            else:
                newer.append(index)
        if newer:
            with self.metrics.store_timer("lease"):
                async with self._uow() as uow:
                    for index in newer:
                        claims = offered[index][0]
                        current = await uow.sandbox_leases.get(claims.sub, claims.sbx, for_update=True)
                        if current is None:
                            current = SandboxLease.of(claims)
                        elif current.voids(claims):
                            results[index] = GrantInvalid("this grant was ended")
                            continue
                        elif not current.offer(claims):
                            results[index] = current
                            continue
                        await uow.sandbox_leases.save(current)
                        results[index] = current
                    await uow.commit()
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value] # every index was decided above

    # --- grants.issued ------------------------------------------------------------------
    async def record_grant(self, event: GrantIssued) -> str:
        """A newer grant for a (possibly live) sandbox. Returns the outcome: recorded | older |
        void | expired | ignored (no verifier). A grant that does not verify is poison."""
        if self._verifier is None:
            return "ignored"
        try:
            claims = self._verifier.verify(event.grant, now_s=self.now_ms() / 1000)
        except GrantError as exc:
            if exc.detail == EXPIRED:
                return "expired"
            raise InvalidEvent(f"grant does not verify: {exc.detail}") from None
        if claims.sub != event.user_id or claims.sbx != event.sandbox_id:
            raise InvalidEvent("grant names another person or sandbox than the event")
        [admitted] = await self.admit([(claims, None)])
        if isinstance(admitted, GrantInvalid):
            return "void"
        return "recorded" if admitted.jti == claims.jti else "older"

    # --- grants.revoked -----------------------------------------------------------------
    async def end(self, event: GrantRevoked) -> str:
        """The person ended the lease of a sandbox (at the event's time, never later than now:
        a publisher's clock cannot end leases in the future). ended | already_ended."""
        at = min(ms(event.occurred_at), self.now_ms())
        async with self._uow() as uow:
            lease = await uow.sandbox_leases.get(event.user_id, event.sandbox_id, for_update=True)
            if lease is None:
                lease = SandboxLease.ended_before_seen(event.user_id, event.sandbox_id, at, "grant_ended")
            elif not lease.end(at, "grant_ended"):
                return "already_ended"
            await uow.sandbox_leases.save(lease)
            await uow.audit.add(self._entry(lease, "lease_ended", event_id=event.event_id), self._clock())
            await uow.commit()
        self.metrics.lease_ended("grant_ended")
        await self.announce(lease)
        return "ended"

    # --- the sweeper ----------------------------------------------------------------------
    async def sweep(self, *, limit: int = 500) -> dict[str, int]:
        """End leases past their expiry; announce every end not announced yet."""
        now = self.now_ms()
        expired: list[SandboxLease] = []
        async with self._uow() as uow:
            due = await uow.sandbox_leases.due(now, limit=limit)
            for lease in due:
                if lease.expire_if_due(now):
                    await uow.sandbox_leases.save(lease)
                    await uow.audit.add(self._entry(lease, "lease_ended"), self._clock())
                    expired.append(lease)
            await uow.commit()
        for _ in expired:
            self.metrics.lease_ended("lease_expired")
        announced = 0
        for lease in due:
            if lease.ended and not lease.announced:
                announced += await self.announce(lease)
        return {"expired": len(expired), "announced": announced}

    async def announce(self, lease: SandboxLease) -> bool:
        """Publish `grants.ended`, then mark it announced. False if it must wait for the sweeper."""
        if self._publisher is None or lease.ended_at is None:
            return False
        try:
            await self._publisher.publish(subjects.GRANTS_ENDED, ended_event(lease))
            async with self._uow() as uow:
                await uow.sandbox_leases.mark_announced(lease.user_id, lease.sandbox_id, lease.ended_at)
                await uow.commit()
        except Exception as exc:  # noqa: BLE001 - the sweeper announces it again
            log.warning("lease end not announced yet", user_id=lease.user_id, sandbox_id=lease.sandbox_id,
                        error=type(exc).__name__)
            return False
        lease.announced = True
        log.info("lease ended", user_id=lease.user_id, sandbox_id=lease.sandbox_id, reason=lease.end_reason)
        return True

    # --- vault.grants.list ------------------------------------------------------------------
    async def list_live(self, request: GrantsListRequest) -> GrantsListReply:
        async with self._uow() as uow:
            leases = await uow.sandbox_leases.live_for(request.user_id, self.now_ms())
        return GrantsListReply(grants=[
            GrantView(sandbox_id=lease.sandbox_id, mode=lease.mode, issued_at=lease.issued_at,
                      expires_at=lease.expires_at, last_injected_at=lease.last_released_at)
            for lease in leases
        ])

    def _entry(self, lease: SandboxLease, action: str, *, event_id: str | None = None) -> AuditEntry:
        return AuditEntry(actor=self._actor, action=action, user_id=lease.user_id, reason=lease.end_reason,
                          event_id=event_id, detail={"sandbox_id": lease.sandbox_id, "jti": lease.jti or None})


__all__ = ["Leases", "ended_event"]
