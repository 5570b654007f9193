"""Ports of the auth service's use cases (adapters implement them; unit tests use fakes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.auth.domain import CodeExchange, PendingLogin, TokenGrant
from shared.events import ConnectionStatusReply, Event, GrantsListReply
from shared.sealing import Recipient

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class StoredLogin:
    login: PendingLogin
    revision: int


class PendingStore(Protocol):
    """Pending logins keyed by state. Errors: `StoreUnavailable`."""

    async def put(self, login: PendingLogin, *, limit: int | None = None) -> None:
        """Store a new login. With `limit`: `TooManyPendingLogins` if its caller already holds
        that many live (unexpired, unconsumed) logins; the check and the insert are atomic."""
        ...

    async def get(self, state: str) -> StoredLogin | None: ...

    async def consume(self, state: str, revision: int) -> bool:
        """Delete iff still at `revision` (compare-and-set); False if someone else did first."""
        ...

    async def restore(self, login: PendingLogin) -> None:
        """Put a consumed login back (the upstream failed transiently, the code is still good)."""
        ...


class OAuthClient(Protocol):
    """The token endpoint. Errors: the `UpstreamError` family."""

    async def exchange_code(self, request: CodeExchange) -> TokenGrant: ...

    async def aclose(self) -> None: ...


class VaultKeys(Protocol):
    def current(self) -> Recipient | None: ...


class EventPublisher(Protocol):
    """Errors: `BusUnavailable`."""

    async def publish(self, subject: str, event: Event) -> None: ...


class VaultStatus(Protocol):
    """The vault's view of a person's connection (request/reply). Errors: `VaultUnavailable`,
    `VaultBadReply`."""

    async def status(self, user_id: str) -> ConnectionStatusReply: ...


class VaultGrants(Protocol):
    """The vault's live leases of a person (request/reply on `vault.grants.list`). Errors:
    `VaultUnavailable`, `VaultBadReply`."""

    async def grants(self, user_id: str) -> GrantsListReply: ...
