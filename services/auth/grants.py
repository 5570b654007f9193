"""Use cases about grants: a person's signed permission for ONE sandbox to hold their Claude
credentials for a while (a lease). The contract — claims, mode order, signing and verifying —
is `shared.grants`; the vault verifies every grant before it seals anything.

- `issue`: sign a grant with auth's grant key (`sub` = the caller), then publish
  `grants.issued` with it. The platform puts the grant into `sandbox.created`; the event is how a
  NEWER grant for a sandbox that is already live reaches the vault (the newest grant wins: it
  extends or shortens the lease). If the event cannot be published, no grant is returned: a
  renewal the vault never heard of would look granted to the platform and silently not apply.
- `live`: the caller's live leases, as the vault holds them (`vault.grants.list`).
- `end`: publish `grants.revoked`; the vault ends the lease, the sandbox service scrubs the
  sandbox. Idempotent (ending a lease that is not there is nothing).

Everything is keyed by the caller's own user id: nobody can list or end another person's leases.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from services.auth.connections import from_ms
from services.auth.errors import BusUnavailable, InvalidGrantRequest, VaultBadReply
from services.auth.ports import Clock, EventPublisher, VaultGrants
from shared import subjects
from shared.events import GrantIssued, GrantRevoked, new_event_id
from shared.grants import GrantClaims, GrantSigner
from shared.logging import get_logger

log = get_logger(__name__)

MIN_TTL_S = 60
DEFAULT_TTL_S = 86_400  # an agent session outlives an hour (design.md)
END_REASON = "grant_ended"


@dataclass(frozen=True)
class GrantPolicy:
    max_ttl_s: int = 7 * 86_400

    @property
    def default_ttl_s(self) -> int:
        return min(DEFAULT_TTL_S, self.max_ttl_s)

    def ttl(self, requested: int | None) -> int:
        """The lease asked for, or the default; `InvalidGrantRequest` outside MIN..max."""
        if requested is None:
            return self.default_ttl_s
        if requested > self.max_ttl_s:
            raise InvalidGrantRequest(
                f"ttl_s may be at most {self.max_ttl_s} seconds here (GRANT_MAX_TTL_S).",
                field="ttl_s", msg=f"Input should be less than or equal to {self.max_ttl_s}", type_="less_than_equal",
            )
        if requested < MIN_TTL_S:
            raise InvalidGrantRequest(
                f"ttl_s must be at least {MIN_TTL_S} seconds.",
                field="ttl_s", msg=f"Input should be greater than or equal to {MIN_TTL_S}", type_="greater_than_equal",
            )
        return requested


@dataclass(frozen=True)
class IssuedGrant:
    token: str
    claims: GrantClaims
    event_id: str

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.claims.exp, tz=UTC)


@dataclass(frozen=True)
class LeaseView:
    sandbox_id: str
    mode: str
    issued_at: datetime
    expires_at: datetime
    last_injected_at: datetime | None


def _moment(value: int) -> datetime:
    moment = from_ms(value)
    if moment is None:
        log.warning("vault grant listing carries an impossible time", value=value)
        raise VaultBadReply()
    return moment


class GrantService:
    def __init__(
        self, *, signer: GrantSigner, publisher: EventPublisher, vault: VaultGrants, clock: Clock, policy: GrantPolicy
    ) -> None:
        self.signer = signer
        self.publisher = publisher
        self.vault = vault
        self.clock = clock
        self.policy = policy

    async def issue(self, user_id: str, sandbox_id: str, mode: str, ttl_s: int | None = None) -> IssuedGrant:
        ttl = self.policy.ttl(ttl_s)
        now = self.clock()
        token, claims = self.signer.sign(
            user_id=user_id, sandbox_id=sandbox_id, mode=mode, ttl_s=ttl, now_s=now.timestamp()
        )
        event = GrantIssued(event_id=new_event_id(), user_id=user_id, occurred_at=now, sandbox_id=sandbox_id,
                            grant=token)
        try:
            await self.publisher.publish(subjects.GRANTS_ISSUED, event)
        except BusUnavailable:
            log.warning("grant not issued: grants.issued could not be published", user_id=user_id,
                        sandbox_id=sandbox_id, jti=claims.jti)
            raise BusUnavailable(
                "The grant could not be handed to the vault, so none was issued. Retry shortly.",
                headers={"Retry-After": "2"},
            ) from None
        log.info("grant issued", user_id=user_id, sandbox_id=sandbox_id, mode=mode, ttl_s=ttl, jti=claims.jti,
                 kid=self.signer.kid, event_id=event.event_id)
        return IssuedGrant(token=token, claims=claims, event_id=event.event_id)

    async def live(self, user_id: str) -> list[LeaseView]:
        reply = await self.vault.grants(user_id)
        views = [
            LeaseView(
                sandbox_id=g.sandbox_id, mode=g.mode, issued_at=_moment(g.issued_at), expires_at=_moment(g.expires_at),
                last_injected_at=from_ms(g.last_injected_at),
            )
            for g in reply.grants
        ]
        return sorted(views, key=lambda view: (view.expires_at, view.sandbox_id))

    async def end(self, user_id: str, sandbox_id: str) -> str:
        event = GrantRevoked(event_id=new_event_id(), user_id=user_id, occurred_at=self.clock(),
                             sandbox_id=sandbox_id, reason=END_REASON)
        try:
            await self.publisher.publish(subjects.GRANTS_REVOKED, event)
        except BusUnavailable:
            raise BusUnavailable(
                "The end of this lease could not be handed to the vault. Retry shortly.", headers={"Retry-After": "2"}
            ) from None
        log.info("grant ended by its person", user_id=user_id, sandbox_id=sandbox_id, event_id=event.event_id)
        return event.event_id
