"""Helpers shared by the vault's unit and integration tests: event/request builders, an
in-memory fake store (unit of work + repositories), PostgreSQL schema isolation."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from services.vault.domain import Connection
from services.vault.errors import ConcurrencyConflict, StoreUnavailable
from shared import subjects
from shared.events import (
    AccountInfo,
    CredentialMode,
    CredentialsReply,
    CredentialsRequest,
    TokenBundle,
    TokensIssued,
    new_event_id,
)
from shared.sealing import KeyPair, Recipient, open_sealed, seal

SCOPES = ["user:inference", "user:profile"]
EXPIRES_AT = 1_893_456_000_000  # 2030-01-01, ms


def canary(label: str = "access") -> str:
    """A token-shaped unique string we can look for in files, rows and logs."""
    return f"sk-ant-oat01-CANARY{label}{uuid.uuid4().hex}"


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def issued_event(
    vault: Recipient,
    *,
    user_id: str,
    access_token: str,
    refresh_token: str | None = None,
    kind: str = "oauth",
    event_id: str | None = None,
    expires_at: int = EXPIRES_AT,
    scopes: list[str] | None = None,
    refresh_token_expires_at: int | None = None,
) -> TokensIssued:
    event_id = event_id or new_event_id()
    scopes = scopes if scopes is not None else list(SCOPES)
    bundle = TokenBundle(access_token=access_token, refresh_token=refresh_token, expires_at=expires_at, scopes=scopes)
    sealed = seal(bundle.model_dump_json().encode(), vault, subject=subjects.TOKENS_ISSUED, message_id=event_id)
    return TokensIssued(
        event_id=event_id,
        user_id=user_id,
        kind=kind,  # type: ignore[arg-type]
        sealed=sealed,
        scopes=scopes,
        expires_at=expires_at,
        refresh_token_expires_at=refresh_token_expires_at,
        account=AccountInfo(email="person@example.com", account_uuid="acc-1"),
    )


def credentials_request(requester: KeyPair, *, user_id: str, mode: CredentialMode = "file") -> CredentialsRequest:
    return CredentialsRequest(
        user_id=user_id,
        mode=mode,
        requester_key_id=requester.key_id,
        requester_public_key=requester.recipient.public_b64,
    )


def open_reply(reply: CredentialsReply, requester: KeyPair) -> TokenBundle:
    assert reply.ok and reply.sealed is not None, reply
    plaintext = open_sealed(
        reply.sealed, requester, subject=subjects.VAULT_CREDENTIALS_GET, message_id=reply.request_id
    )
    return TokenBundle.model_validate_json(plaintext)


# --- in-memory store ------------------------------------------------------------------
@dataclass
class FakeStore:
    """Implements services.vault.ports.Store in memory, with real transaction semantics:
    nothing is visible until commit."""

    connections: dict[str, Connection] = field(default_factory=dict)
    processed: dict[str, str] = field(default_factory=dict)
    unavailable: bool = False
    commits: int = 0
    created: bool = False
    disposed: bool = False

    async def create_all(self) -> None:
        self.created = True

    def unit_of_work(self, keyring: object = None) -> FakeUnitOfWork:
        return FakeUnitOfWork(self)

    async def dispose(self) -> None:
        self.disposed = True


class _FakeConnections:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    async def get(self, user_id: str, *, for_update: bool = False) -> Connection | None:
        found = self._uow.staged_connections.get(user_id) or self._uow.store.connections.get(user_id)
        if found is None:
            return None
        self._uow.loaded[user_id] = found.version
        return copy.deepcopy(found)

    async def add(self, connection: Connection) -> None:
        if connection.user_id in self._uow.store.connections:
            raise ConcurrencyConflict("exists")
        self._uow.staged_connections[connection.user_id] = copy.deepcopy(connection)
        self._uow.loaded[connection.user_id] = connection.version

    async def update(self, connection: Connection) -> None:
        current = self._uow.store.connections.get(connection.user_id)
        if current is None or current.version != self._uow.loaded.get(connection.user_id):
            raise ConcurrencyConflict("changed")
        self._uow.staged_connections[connection.user_id] = copy.deepcopy(connection)


class _FakeProcessed:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    async def mark_processed(self, event_id: str, subject: str) -> bool:
        if event_id in self._uow.store.processed or event_id in self._uow.staged_events:
            return False
        self._uow.staged_events[event_id] = subject
        return True


class FakeUnitOfWork:
    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.staged_connections: dict[str, Connection] = {}
        self.staged_events: dict[str, str] = {}
        self.loaded: dict[str, int] = {}
        self.connections = _FakeConnections(self)
        self.processed_events = _FakeProcessed(self)

    async def __aenter__(self) -> Self:
        if self.store.unavailable:
            raise StoreUnavailable("fake database is down")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.rollback()

    async def commit(self) -> None:
        if self.store.unavailable:
            raise StoreUnavailable("fake database is down")
        self.store.connections.update(self.staged_connections)
        self.store.processed.update(self.staged_events)
        self.store.commits += 1
        await self.rollback()

    async def rollback(self) -> None:
        self.staged_connections.clear()
        self.staged_events.clear()


# --- PostgreSQL isolation -------------------------------------------------------------
def unique_schema_name() -> str:
    return f"vault_test_{uuid.uuid4().hex[:12]}"


async def drop_schema(database_url: str, schema: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class VaultDb:
    """A database for one test: the URL and, on PostgreSQL, a private schema."""

    url: str
    schema: str | None

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")


async def vault_db(database_url: str) -> AsyncIterator[VaultDb]:
    """Body of a `vault_db` fixture: a unique PostgreSQL schema per test, dropped after."""
    if database_url.startswith("postgresql"):
        schema = unique_schema_name()
        try:
            yield VaultDb(database_url, schema)
        finally:
            await drop_schema(database_url, schema)
    else:
        yield VaultDb(database_url, None)
