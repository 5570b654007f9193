"""Use cases about an existing connection: its status (asked of the vault, which owns it) and
disconnecting (a `tokens.revoked` event; the vault and the sandbox service act on it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from services.auth.ports import Clock, EventPublisher, VaultStatus
from shared import subjects
from shared.events import AccountInfo, TokensRevoked, new_event_id
from shared.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ConnectionView:
    connected: bool
    state: str  # connected | refresh_failed | reconnect_required | not_connected
    kind: str | None
    scopes: tuple[str, ...]
    expires_at: datetime | None
    login_expires_at: datetime | None
    account: AccountInfo | None
    version: int | None


def from_ms(value: int | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


class ConnectionService:
    def __init__(self, *, vault: VaultStatus, publisher: EventPublisher, clock: Clock) -> None:
        self.vault = vault
        self.publisher = publisher
        self.clock = clock

    async def status(self, user_id: str) -> ConnectionView:
        reply = await self.vault.status(user_id)
        if not reply.connected:
            return ConnectionView(False, "not_connected", None, (), None, None, None, None)
        return ConnectionView(
            connected=True,
            state=reply.state or "connected",
            kind=reply.kind,
            scopes=tuple(reply.scopes),
            expires_at=from_ms(reply.expires_at),
            login_expires_at=from_ms(reply.refresh_token_expires_at),
            account=reply.account,
            version=reply.version,
        )

    async def disconnect(self, user_id: str, reason: str = "user_request") -> str:
        event = TokensRevoked(event_id=new_event_id(), user_id=user_id, occurred_at=self.clock(), reason=reason)
        await self.publisher.publish(subjects.TOKENS_REVOKED, event)
        log.info("disconnect requested", user_id=user_id, event_id=event.event_id, subject=subjects.TOKENS_REVOKED)
        return event.event_id
