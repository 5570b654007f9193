"""Ports the use cases talk to. `adapters/store.py` implements them with SQLAlchemy; unit
tests use small in-memory fakes."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

from services.vault.domain import Connection
from services.vault.keyring import Keyring


class ConnectionRepository(Protocol):
    async def get(self, user_id: str, *, for_update: bool = False) -> Connection | None:
        """The user's connection, decrypted; `for_update` locks the row until commit."""

    async def add(self, connection: Connection) -> None:
        """Insert a connection that does not exist yet (`ConcurrencyConflict` if it does)."""

    async def update(self, connection: Connection) -> None:
        """Persist changes; `ConcurrencyConflict` if somebody else changed it meanwhile."""


class ProcessedEvents(Protocol):
    async def mark_processed(self, event_id: str, subject: str) -> bool:
        """Record `event_id`; False if it was processed before (then do nothing)."""


class UnitOfWork(Protocol):
    """One transaction. Leaving the block without `commit()` rolls back."""

    connections: ConnectionRepository
    processed_events: ProcessedEvents

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class Store(Protocol):
    """The database as the composition root sees it."""

    async def create_all(self) -> None: ...

    def unit_of_work(self, keyring: Keyring) -> UnitOfWork: ...

    async def dispose(self) -> None: ...
