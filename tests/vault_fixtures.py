"""Helpers shared by the vault's unit and integration tests: event/request builders, an
in-memory fake store (unit of work + repositories) and other fakes, PostgreSQL schema
isolation, a running-vault harness, and the canary ledger.

Canary ledger: every `canary()` token and every OAuth stand-in token made with
`canary_factory()` is remembered, and so is every artifact a test leaves behind (SQLite files,
service logs, the in-process log tee). PostgreSQL schemas are scanned when they are dropped;
`vault_log_tee` (session-wide) scans the rest when the session ends, whatever ran.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import pytest

from ccbridge.devtools import sealed_tokens_issued
from services.vault.domain import AuditEntry, AuditRecord, Connection, ConnectionSummary, SandboxLease
from services.vault.errors import ConcurrencyConflict, StoreUnavailable
from services.vault.ports import DueRefresh
from shared import subjects
from shared.events import (
    AccountInfo,
    CredentialMode,
    CredentialsReply,
    CredentialsRequest,
    TokenBundle,
    TokensIssued,
)
from shared.sealing import KeyPair, Recipient, open_sealed, reply_binding
from tests import grants
from tests.grants import grant_for

SCOPES = ["user:inference", "user:profile"]
EXPIRES_AT = 1_893_456_000_000  # 2030-01-01, ms


CANARIES: set[str] = set()
USERS: set[str] = set()
ARTIFACTS: set[Path] = set()
SCANNED: dict[str, int] = {"postgres_schemas": 0}
LOG_TEE = Path(tempfile.gettempdir()) / f"ccbridge-vault-tests-{os.getpid()}.log"


def canary(label: str = "access") -> str:
    """A token-shaped unique string we can look for in files, rows and logs."""
    value = f"sk-ant-oat01-CANARY{label}{uuid.uuid4().hex}"
    CANARIES.add(value)
    return value


def opaque_canary(label: str = "at") -> str:
    """A token that does NOT look like one (the log redactor cannot hide it): a leak shows."""
    value = f"CANARY{label}{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
    CANARIES.add(value)
    return value


def canary_factory(label: str) -> Callable[[], str]:
    return lambda: opaque_canary(label)


def new_user() -> str:
    user = f"user-{uuid.uuid4().hex[:12]}"
    USERS.add(user)
    return user


def register_artifact(path: Path | str) -> None:
    ARTIFACTS.add(Path(path))


_MARK = re.compile(rb"CANARY[A-Za-z0-9]{8,}")
_HEX_MARK = re.compile(rb"(?i:43414e415259)(?:[0-9a-fA-F]{2}){8,}")


def leaked(data: bytes | str, canaries: set[str] | None = None) -> list[str]:
    """The canaries found in `data`, raw or hex-encoded (e.g. a PostgreSQL bytea dump).

    Every canary contains `CANARY…`: find those marks first (fast, usually none), then see
    which known canary each one is."""
    raw = data if isinstance(data, bytes) else data.encode()
    known = canaries if canaries is not None else CANARIES
    marks = [m.group() for m in _MARK.finditer(raw)]
    marks += [bytes.fromhex(m.group().decode()) for m in _HEX_MARK.finditer(raw)]
    if not marks:
        return []
    found = []
    for value in known:
        tail = value[value.index("CANARY"):].encode()
        if any(mark.startswith(tail) for mark in marks):
            found.append(value)
    return found


class _TeeLogger:
    """structlog logger: writes to the current stderr (pytest's capture still works; stdout stays
    clean for CLI output) and appends to LOG_TEE, so the canary scan also sees in-process logs,
    unredacted."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        with open(LOG_TEE, "a") as fh:
            fh.write(message + "\n")

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def install_log_tee() -> None:
    """Route structlog (as unconfigured: console renderer, no redaction) through `_TeeLogger`.
    Idempotent; a test that calls configure_logging() later takes over, which is fine."""
    import structlog

    if getattr(install_log_tee, "done", False) or structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.StackInfoRenderer(),
            structlog.dev.set_exc_info,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        logger_factory=lambda *args: _TeeLogger(),
        cache_logger_on_first_use=False,
    )
    handler = logging.FileHandler(LOG_TEE)  # stdlib loggers (SQLAlchemy, FastStream, httpx, …)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    register_artifact(LOG_TEE)
    install_log_tee.done = True


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
    return sealed_tokens_issued(
        vault, user_id, access_token, refresh_token=refresh_token, kind=kind,
        event_id=event_id, expires_at=expires_at, scopes=scopes if scopes is not None else list(SCOPES),
        refresh_token_expires_at=refresh_token_expires_at,
        account=AccountInfo(email="person@example.com", account_uuid="acc-1"),
    )


def credentials_request(
    requester: KeyPair, *, user_id: str, mode: CredentialMode = "file", sandbox_id: str = "sbx-test",
    grant: str | None | bool = True,
) -> CredentialsRequest:
    """A request as the sandbox service makes it; `grant=True`: a fresh grant of the test
    authority (tests/grants.py) for this person and sandbox, allowing every mode (the newest
    grant governs a sandbox: grants of different modes for one sandbox would narrow it)."""
    return CredentialsRequest(
        user_id=user_id,
        sandbox_id=sandbox_id,
        grant=grant_for(user_id, sandbox_id, "file") if grant is True else grant or None,
        mode=mode,
        requester_key_id=requester.key_id,
        requester_public_key=requester.recipient.public_b64,
    )


def open_reply(reply: CredentialsReply, requester: KeyPair, *, user_id: str, sandbox_id: str | None = "sbx-test"
               ) -> TokenBundle:
    assert reply.ok and reply.sealed is not None, reply
    plaintext = open_sealed(
        reply.sealed, requester, subject=subjects.VAULT_CREDENTIALS_GET, message_id=reply.request_id,
        bind=reply_binding(user_id, sandbox_id),
    )
    return TokenBundle.model_validate_json(plaintext)


def make_vault(store: Any, *, keypair: KeyPair, trusted: Any, keyring: Any = None, publisher: Any = None,
               grants_required: bool = True, **kwargs: Any) -> Any:
    """A `Vault` on `store` (FakeStore or SqlStore) whose leases trust the test grant authority."""
    from services.vault.adapters.audit_writer import AuditWriter
    from services.vault.leases import Leases
    from services.vault.trust import TrustStore
    from services.vault.use_cases import Vault
    from tests.grants import verifier

    def unit_of_work() -> Any:
        return store.unit_of_work(keyring)

    kwargs.setdefault("audit", AuditWriter(unit_of_work))  # never started: a test flushes it when it looks

    return Vault(
        unit_of_work=unit_of_work,
        read_for_release=lambda wanted: store.read_for_release(wanted, keyring),
        leases=Leases(unit_of_work=unit_of_work, verifier=verifier(), required=grants_required,
                      publisher=publisher),
        keypair=keypair,
        trusted=trusted if isinstance(trusted, TrustStore) else TrustStore.fixed(trusted),
        **kwargs,
    )


# --- in-memory store ------------------------------------------------------------------
@dataclass
class FakeStore:
    """Implements services.vault.ports.Store in memory, with real transaction semantics:
    nothing is visible until commit. `undecryptable[user]` makes `get()` raise that error.
    tests/integration/test_vault_repository_contract.py holds it to SqlStore's behaviour.

    `kek_ids[user]`: the active KEK of the cipher that last wrote the connection (what a
    summary reports); `refreshable[user]`: a `set_refreshable` override, until the connection
    is written again (SqlStore's `refreshable` column)."""

    connections: dict[str, Connection] = field(default_factory=dict)
    processed: dict[str, str] = field(default_factory=dict)
    processed_at: dict[str, datetime] = field(default_factory=dict)
    revocations: dict[str, datetime] = field(default_factory=dict)
    audit: list[tuple[AuditEntry, datetime]] = field(default_factory=list)
    leases: dict[str, tuple[str, int]] = field(default_factory=dict)
    kek_ids: dict[str, str] = field(default_factory=dict)
    refreshable: dict[str, bool] = field(default_factory=dict)
    sandbox_leases: dict[tuple[str, str], SandboxLease] = field(default_factory=dict)
    undecryptable: dict[str, Exception] = field(default_factory=dict)
    unavailable: bool = False
    commits: int = 0
    migrated: bool = False
    disposed: bool = False

    async def migrate(self) -> None:
        self.migrated = True

    def unit_of_work(self, keyring: object = None) -> FakeUnitOfWork:
        return FakeUnitOfWork(self, keyring)

    async def ping(self) -> bool:
        return not self.unavailable

    async def read_for_release(
        self, wanted: Sequence[tuple[str, str | None]], keyring: object = None
    ) -> tuple[dict[str, Any], dict[tuple[str, str], SandboxLease]]:
        if self.unavailable:
            raise StoreUnavailable("fake database is down")
        connections: dict[str, Any] = {}
        leases: dict[tuple[str, str], SandboxLease] = {}
        for user_id, sandbox_id in wanted:
            if user_id in self.connections:
                connections[user_id] = (self.undecryptable[user_id] if user_id in self.undecryptable
                                        else copy.deepcopy(self.connections[user_id]))
            if sandbox_id is not None and (user_id, sandbox_id) in self.sandbox_leases:
                leases[(user_id, sandbox_id)] = copy.deepcopy(self.sandbox_leases[(user_id, sandbox_id)])
        return connections, leases

    async def dispose(self) -> None:
        self.disposed = True

    def actions(self, user_id: str | None = None) -> list[str]:
        return [e.action for e, _ in self.audit if user_id is None or e.user_id == user_id]


def _summary_of(c: Connection, kek_id: str | None = None) -> ConnectionSummary:
    return replace(c.summary(), kek_id=kek_id)


class _FakeConnections:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def _current(self, user_id: str) -> Connection | None:
        if user_id in self._uow.staged_connections:
            return self._uow.staged_connections[user_id]
        return None if user_id in self._uow.deleted else self._uow.store.connections.get(user_id)

    def _kek_id(self, user_id: str) -> str | None:
        return self._uow.staged_kek_ids.get(user_id) or self._uow.store.kek_ids.get(user_id)

    def _refreshable(self, c: Connection) -> bool:
        return self._uow.store.refreshable.get(c.user_id, c.refreshable)

    def _written(self, connection: Connection) -> None:
        """Like SqlStore's add/update: re-encrypted under the active KEK, `refreshable` recomputed."""
        self._uow.staged_connections[connection.user_id] = copy.deepcopy(connection)
        self._uow.staged_kek_ids[connection.user_id] = getattr(self._uow.cipher, "active_kek_id", None)
        self._uow.staged_refreshable.pop(connection.user_id, None)
        self._uow.loaded[connection.user_id] = connection.version

    async def get(self, user_id: str, *, for_update: bool = False) -> Connection | None:
        found = self._current(user_id)
        if found is None:
            return None
        self._uow.loaded[user_id] = found.version
        if user_id in self._uow.store.undecryptable and user_id not in self._uow.staged_connections:
            raise self._uow.store.undecryptable[user_id]
        return copy.deepcopy(found)

    async def summary(self, user_id: str, *, for_update: bool = False) -> ConnectionSummary | None:
        found = self._current(user_id)
        if found is None:
            return None
        self._uow.loaded[user_id] = found.version
        return _summary_of(found, self._kek_id(user_id))

    async def summaries(self, *, limit: int = 1000, state: str | None = None) -> list[ConnectionSummary]:
        users = sorted(set(self._uow.store.connections) | set(self._uow.staged_connections))
        current = [c for c in map(self._current, users) if c is not None and (state is None or c.state == state)]
        return [_summary_of(c, self._kek_id(c.user_id)) for c in current[:limit]]

    async def get_many(self, user_ids: Sequence[str], *, for_update: bool = False) -> dict[str, Any]:
        self._uow.statements += 1
        found: dict[str, Any] = {}
        for user_id in dict.fromkeys(user_ids):
            current = self._current(user_id)
            if current is None:
                continue
            self._uow.loaded[user_id] = current.version
            if user_id in self._uow.store.undecryptable and user_id not in self._uow.staged_connections:
                found[user_id] = (_summary_of(current), self._uow.store.undecryptable[user_id])
            else:
                found[user_id] = (_summary_of(current), copy.deepcopy(current))
        return found

    async def add(self, connection: Connection) -> None:
        if self._current(connection.user_id) is not None:
            raise ConcurrencyConflict("exists")
        self._written(connection)

    async def add_many(self, connections: Sequence[Connection]) -> None:
        self._uow.statements += 1
        for connection in connections:
            await self.add(connection)

    async def update_many(self, changes: Sequence[tuple[Connection, int]]) -> None:
        self._uow.statements += 1
        for connection, expected in changes:
            await self.update(connection, expected_version=expected)

    async def update(
        self, connection: Connection, *, expected_version: int | None = None, lease_owner: str | None = None
    ) -> None:
        expected = expected_version if expected_version is not None else self._uow.loaded.get(connection.user_id)
        if expected is None:
            raise ValueError("update() a connection that was not read in this unit of work")
        if connection.version <= expected:
            raise ValueError("update() needs a changed connection (version must grow)")
        current = self._current(connection.user_id)
        if current is None or current.version != expected:
            raise ConcurrencyConflict("changed")
        lease = self._uow.store.leases.get(connection.user_id)
        if lease_owner is not None and (lease is None or lease[0] != lease_owner):
            raise ConcurrencyConflict("lease lost")
        self._written(connection)
        self._uow.released.add(connection.user_id)

    async def delete(self, user_id: str) -> ConnectionSummary | None:
        current = self._current(user_id)
        if current is None:
            return None
        summary = _summary_of(current, self._kek_id(user_id))
        self._uow.deleted.add(user_id)
        self._uow.staged_connections.pop(user_id, None)
        self._uow.staged_kek_ids.pop(user_id, None)
        self._uow.loaded.pop(user_id, None)
        return summary

    async def due_for_refresh(self, now_ms: int, margin_ms: int, limit: int) -> list[DueRefresh]:
        due = []
        for c in sorted(self._uow.store.connections.values(), key=lambda c: c.expires_at):
            lease = self._uow.store.leases.get(c.user_id)
            if (self._refreshable(c) and c.state != "reconnect_required" and c.expires_at <= now_ms + margin_ms
                    and (c.next_refresh_at is None or c.next_refresh_at <= now_ms)
                    and (lease is None or lease[1] < now_ms)):
                due.append(DueRefresh(c.user_id, c.version))
        return due[:limit]

    async def claim_lease(self, user_id: str, version: int, owner: str, now_ms: int, until_ms: int) -> bool:
        current = self._uow.store.connections.get(user_id)
        lease = self._uow.store.leases.get(user_id)
        if (current is None or current.version != version or not self._refreshable(current)
                or (lease is not None and lease[1] >= now_ms)):
            return False
        self._uow.staged_leases[user_id] = (owner, until_ms)
        return True

    async def release_lease(self, user_id: str, owner: str) -> None:
        lease = self._uow.store.leases.get(user_id)
        if lease is not None and lease[0] == owner:
            self._uow.released.add(user_id)

    async def defer_refresh(self, user_id: str, owner: str, next_refresh_at: int, error: str) -> None:
        lease = self._uow.store.leases.get(user_id)
        current = self._uow.store.connections.get(user_id)
        if lease is not None and lease[0] == owner and current is not None:
            changed = copy.deepcopy(current)
            changed.next_refresh_at, changed.last_refresh_error = next_refresh_at, error[:64]
            changed.refresh_failures += 1
            self._uow.staged_connections[user_id] = changed
            self._uow.released.add(user_id)

    async def set_refreshable(self, user_id: str, refreshable: bool) -> None:
        if self._current(user_id) is not None:
            self._uow.staged_refreshable[user_id] = refreshable

    def _warned_for(self, c: Connection) -> int | None:
        return self._uow.staged_warned.get(c.user_id, c.login_warned_for)

    async def due_login_warnings(self, now_ms: int, warn_before_ms: int, limit: int) -> list[ConnectionSummary]:
        due = [c for c in self._uow.store.connections.values()
               if replace(c, login_warned_for=self._warned_for(c)).login_warning_due(now_ms, warn_before_ms)]
        return [_summary_of(c) for c in sorted(due, key=lambda c: c.refresh_token_expires_at or 0)[:limit]]

    async def mark_login_warned(self, user_id: str, refresh_token_expires_at: int) -> bool:
        current = self._current(user_id)
        if (current is None or current.refresh_token_expires_at != refresh_token_expires_at
                or self._warned_for(current) == refresh_token_expires_at):
            return False
        self._uow.staged_warned[user_id] = refresh_token_expires_at
        return True

    async def unmark_login_warned(self, user_id: str, refresh_token_expires_at: int) -> None:
        current = self._current(user_id)
        if current is not None and self._warned_for(current) == refresh_token_expires_at:
            self._uow.staged_warned[user_id] = None

    async def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for c in self._uow.store.connections.values():
            counts[c.state] = counts.get(c.state, 0) + 1
        return counts


class _FakeProcessed:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    async def mark_processed(self, event_id: str, subject: str) -> bool:
        if event_id in self._uow.store.processed or event_id in self._uow.staged_events:
            return False
        self._uow.staged_events[event_id] = subject
        return True

    async def mark_many(self, event_ids: Sequence[str], subject: str) -> set[str]:
        self._uow.statements += 1
        return {e for e in dict.fromkeys(event_ids) if await self.mark_processed(e, subject)}

    async def delete_older_than(self, cutoff: datetime) -> int:
        doomed = [e for e, at in self._uow.store.processed_at.items() if at < cutoff]

        def delete() -> None:
            for event_id in doomed:
                self._uow.store.processed.pop(event_id, None)
                self._uow.store.processed_at.pop(event_id, None)

        self._uow.on_commit.append(delete)
        return len(doomed)


class _FakeRevocations:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    async def revoked_at(self, user_id: str) -> datetime | None:
        return self._uow.staged_revocations.get(user_id) or self._uow.store.revocations.get(user_id)

    async def revoked_at_many(self, user_ids: Sequence[str]) -> dict[str, datetime]:
        self._uow.statements += 1
        found = {u: await self.revoked_at(u) for u in dict.fromkeys(user_ids)}
        return {u: at for u, at in found.items() if at is not None}

    async def record(self, user_id: str, at: datetime, event_id: str | None) -> None:
        current = await self.revoked_at(user_id)
        if current is None or current < at:
            self._uow.staged_revocations[user_id] = at

    async def delete_older_than(self, cutoff: datetime) -> int:
        doomed = [u for u, at in self._uow.store.revocations.items() if at < cutoff]

        def delete() -> None:
            for user_id in doomed:
                self._uow.store.revocations.pop(user_id, None)

        self._uow.on_commit.append(delete)
        return len(doomed)


class _FakeAudit:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    async def add(self, entry: AuditEntry, at: datetime | None = None) -> None:
        self._uow.staged_audit.append((entry, at or datetime.now(UTC)))

    async def add_many(self, entries: Sequence[tuple[AuditEntry, datetime]]) -> None:
        self._uow.staged_audit.extend(entries)

    async def list(self, *, user_id: str | None = None, action: str | None = None, limit: int = 100) -> list[Any]:
        return [
            AuditRecord(i, at, e) for i, (e, at) in enumerate(self._uow.store.audit)
            if (user_id is None or e.user_id == user_id) and (action is None or e.action == action)
        ][::-1][:limit]

    async def delete_older_than(self, cutoff: datetime) -> int:
        doomed = {id(record) for record in self._uow.store.audit if record[1] < cutoff}

        def delete() -> None:
            self._uow.store.audit[:] = [record for record in self._uow.store.audit if id(record) not in doomed]

        self._uow.on_commit.append(delete)
        return len(doomed)


class _FakeSandboxLeases:
    def __init__(self, uow: FakeUnitOfWork) -> None:
        self._uow = uow

    def _all(self) -> dict[tuple[str, str], SandboxLease]:
        return {**self._uow.store.sandbox_leases, **self._uow.staged_sandbox_leases}

    async def get(self, user_id: str, sandbox_id: str, *, for_update: bool = False) -> SandboxLease | None:
        found = self._all().get((user_id, sandbox_id))
        return copy.deepcopy(found) if found else None

    async def save(self, lease: SandboxLease) -> None:
        saved = copy.deepcopy(lease)
        current = self._all().get((lease.user_id, lease.sandbox_id))
        saved.last_released_at = current.last_released_at if current else None
        self._uow.staged_sandbox_leases[(lease.user_id, lease.sandbox_id)] = saved

    async def live_for(self, user_id: str, now_ms: int, *, limit: int = 1000) -> list[SandboxLease]:
        live = [copy.deepcopy(x) for (u, _), x in self._all().items()
                if u == user_id and x.ended_at is None and x.expires_at > now_ms]
        return sorted(live, key=lambda x: x.expires_at)[:limit]

    async def due(self, now_ms: int, *, limit: int) -> list[SandboxLease]:
        due = [copy.deepcopy(x) for x in self._all().values()
               if (x.ended_at is None and x.expires_at <= now_ms) or (x.ended_at is not None and not x.announced)]
        return sorted(due, key=lambda x: x.expires_at)[:limit]

    async def mark_announced(self, user_id: str, sandbox_id: str, ended_at: int) -> None:
        current = self._all().get((user_id, sandbox_id))
        if current is not None and current.ended_at == ended_at:
            marked = copy.deepcopy(current)
            marked.announced = True
            self._uow.staged_sandbox_leases[(user_id, sandbox_id)] = marked

    async def record_releases(self, releases: Sequence[tuple[str, str, int]]) -> None:
        for user_id, sandbox_id, at in releases:
            current = self._all().get((user_id, sandbox_id))
            if current is not None and (current.last_released_at or 0) < at:
                updated = copy.deepcopy(current)
                updated.last_released_at = at
                self._uow.staged_sandbox_leases[(user_id, sandbox_id)] = updated

    async def delete_ended_before(self, cutoff_ms: int) -> int:
        doomed = [k for k, x in self._uow.store.sandbox_leases.items()
                  if x.ended_at is not None and x.ended_at < cutoff_ms and x.announced]

        def delete() -> None:
            for key in doomed:
                self._uow.store.sandbox_leases.pop(key, None)

        self._uow.on_commit.append(delete)
        return len(doomed)


class FakeUnitOfWork:
    def __init__(self, store: FakeStore, cipher: object = None) -> None:
        self.store = store
        self.cipher = cipher
        self.staged_connections: dict[str, Connection] = {}
        self.staged_kek_ids: dict[str, str | None] = {}
        self.staged_refreshable: dict[str, bool] = {}
        self.on_commit: list[Callable[[], None]] = []
        self.staged_events: dict[str, str] = {}
        self.staged_revocations: dict[str, datetime] = {}
        self.staged_audit: list[tuple[AuditEntry, datetime]] = []
        self.staged_leases: dict[str, tuple[str, int]] = {}
        self.staged_warned: dict[str, int | None] = {}
        self.staged_sandbox_leases: dict[tuple[str, str], SandboxLease] = {}
        self.deleted: set[str] = set()
        self.released: set[str] = set()
        self.loaded: dict[str, int] = {}
        self.statements = 0  # batch statements issued (mark_many, get_many, …)
        self.connections = _FakeConnections(self)
        self.processed_events = _FakeProcessed(self)
        self.revocations = _FakeRevocations(self)
        self.audit = _FakeAudit(self)
        self.sandbox_leases = _FakeSandboxLeases(self)

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
        store = self.store
        for user_id in self.deleted:
            for owned in (store.connections, store.leases, store.undecryptable, store.kek_ids, store.refreshable):
                owned.pop(user_id, None)
        for user_id, connection in self.staged_connections.items():
            previous = store.connections.get(user_id)
            if previous is not None:  # the warning mark is mark_login_warned's alone (as in SqlStore)
                connection = replace(connection, login_warned_for=previous.login_warned_for)
            store.connections[user_id] = connection
            store.undecryptable.pop(user_id, None)
        for user_id, kek_id in self.staged_kek_ids.items():
            store.refreshable.pop(user_id, None)
            if kek_id is None:
                store.kek_ids.pop(user_id, None)
            else:
                store.kek_ids[user_id] = kek_id
        store.refreshable.update(self.staged_refreshable)
        for user_id in self.released:
            store.leases.pop(user_id, None)
        store.leases.update(self.staged_leases)
        for user_id, value in self.staged_warned.items():
            if user_id in store.connections:
                store.connections[user_id].login_warned_for = value
        for pending in self.on_commit:
            pending()
        now = datetime.now(UTC)
        for event_id, subject in self.staged_events.items():
            store.processed[event_id] = subject
            store.processed_at[event_id] = now
        store.revocations.update(self.staged_revocations)
        store.sandbox_leases.update(self.staged_sandbox_leases)
        store.audit.extend(self.staged_audit)
        store.commits += 1
        await self.rollback()

    async def rollback(self) -> None:
        for staged in (self.staged_connections, self.staged_events, self.staged_revocations, self.staged_leases,
                       self.staged_warned, self.staged_sandbox_leases, self.staged_kek_ids, self.staged_refreshable):
            staged.clear()
        self.staged_audit.clear()
        self.on_commit.clear()
        self.deleted.clear()
        self.released.clear()


@dataclass
class FakePublisher:
    """services.vault.ports.EventPublisher that keeps what was published."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    failing: bool = False

    async def publish(self, subject: str, event: Any) -> None:
        if self.failing:
            raise ConnectionError("bus down")
        self.events.append((subject, event))

    def of(self, subject: str) -> list[Any]:
        return [e for s, e in self.events if s == subject]


@dataclass
class FakeTokenEndpoint:
    """services.vault.ports.TokenEndpoint: answers from a script (TokenResponse or exception)."""

    script: list[Any] = field(default_factory=list)
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    revoke_script: list[Any] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)

    async def revoke(self, refresh_token: str) -> None:
        """Answers from `revoke_script` (None = ok, or an exception); ok when it is empty."""
        answer = self.revoke_script.pop(0) if self.revoke_script else None
        if isinstance(answer, BaseException):
            raise answer
        self.revoked.append(refresh_token)

    async def refresh(self, refresh_token: str, scopes: Sequence[str]) -> Any:
        self.calls.append((refresh_token, tuple(scopes)))
        answer = self.script.pop(0)
        if callable(answer):
            answer = answer()
        if isinstance(answer, BaseException):
            raise answer
        return answer


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


async def dump_schema(database_url: str, schema: str) -> str:
    """Every row of every table of a PostgreSQL schema, as PostgreSQL renders it (bytea as hex)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            tables = (await conn.execute(text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"), {"s": schema})).scalars()
            lines: list[str] = []
            for table in list(tables):
                result = await conn.execute(text(f'SELECT t::text FROM "{schema}"."{table}" t'))
                lines += [row[0] for row in result]
            return "\n".join(lines)
    finally:
        await engine.dispose()


async def vault_db(database_url: str) -> AsyncIterator[VaultDb]:
    """Body of a `vault_db` fixture: a unique PostgreSQL schema per test, scanned for canaries
    and dropped after; a SQLite file is registered for the final scan."""
    if database_url.startswith("postgresql"):
        schema = unique_schema_name()
        try:
            yield VaultDb(database_url, schema)
            dumped = await dump_schema(database_url, schema)
            SCANNED["postgres_schemas"] += 1
            assert not leaked(dumped), f"plaintext token in PostgreSQL schema {schema}"
        finally:
            await drop_schema(database_url, schema)
    else:
        from sqlalchemy.engine import make_url

        path = Path(make_url(database_url).database or "")
        for suffix in ("", "-wal", "-journal"):
            register_artifact(f"{path}{suffix}")
        yield VaultDb(database_url, None)


# --- pytest fixtures (import them into a test module to use them) ------------------------
T = TypeVar("T")
WAIT_S = 30.0


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT_S) -> T:
    """Poll until `probe` returns something truthy (not a timing assertion: a generous bound)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[VaultDb]:
    async for value in vault_db(database_url):
        yield value


@pytest.fixture(scope="session", autouse=True)
def vault_log_tee() -> Iterator[None]:
    """Tee every log into LOG_TEE from the start; at the end of the session, scan every
    database file and log the vault tests left behind for the canary tokens they used (no
    file-order trick: this runs after the last test, whatever ran). PostgreSQL schemas are
    scanned as each test's schema is dropped (`vault_db`)."""
    install_log_tee()
    yield
    scan_for_canaries()


def scan_for_canaries() -> None:
    """Fail (an error at session teardown) if any canary token is in a file the tests left."""
    files = sorted(p for p in ARTIFACTS if p.exists() and p.is_file())
    databases = [p for p in files if p.suffix == ".db"]
    if not databases or not CANARIES:
        return  # no vault test ran in this session: nothing to scan
    leaks: dict[str, list[str]] = {}
    users_seen = 0
    for path in files:
        data = path.read_bytes()
        if found := leaked(data):
            leaks[str(path)] = found[:3]
        users_seen += sum(1 for user in USERS if user.encode() in data)
    assert leaks == {}, f"plaintext tokens found: {leaks}"
    # positive control: the scan read real vault data, not empty files
    assert users_seen > 0, "the canary scan found no vault data in the files it read"
    print(f"\ncanary scan: {len(CANARIES)} tokens, {len(databases)} SQLite files, "
          f"{len([p for p in files if p.suffix == '.log'])} logs, {SCANNED['postgres_schemas']} PostgreSQL schemas: clean")


def vault_settings(tmp_path: Path, nats_url: str, db: VaultDb, **env: Any) -> Any:
    """Settings of an in-process test vault: no metrics port, no refresher, and a token URL on a
    closed loopback port (nothing may ever reach the real OAuth server) unless overridden."""
    from services.vault.settings import VaultSettings

    values: dict[str, Any] = {
        "NATS_URL": nats_url,
        "CCBRIDGE_DATA_DIR": tmp_path / "data",
        "DATABASE_URL": db.url,
        "VAULT_DATABASE_SCHEMA": db.schema,
        "VAULT_FETCH_TIMEOUT_S": 0.5,
        "VAULT_METRICS_PORT": 0,
        "VAULT_REFRESH_ENABLED": False,
        "OAUTH_TOKEN_URL": "http://127.0.0.1:9/v1/oauth/token",
        "VAULT_KEK_CHECK_INTERVAL_S": 0.2,
        "VAULT_REVOKE_ATTEMPTS": 1,
        "VAULT_GRANT_PUBLIC_KEYS": grants.PUBLIC_KEY,
    }
    values.update(env)
    return VaultSettings(**values)


def service_env(tmp_path: Path, nats_url: str, db: VaultDb, **extra: str) -> dict[str, str]:
    """Environment of a `python -m services.vault` test process (same defaults as above)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "OAUTH_", "DATABASE_URL"))}
    env.update({
        "NATS_URL": nats_url,
        "CCBRIDGE_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": db.url,
        "VAULT_FETCH_TIMEOUT_S": "0.5",
        "VAULT_METRICS_PORT": "0",
        "VAULT_REFRESH_ENABLED": "false",
        "OAUTH_TOKEN_URL": "http://127.0.0.1:9/v1/oauth/token",
        "VAULT_KEK_CHECK_INTERVAL_S": "0.2",
        "VAULT_REVOKE_ATTEMPTS": "1",
        **grants.env(),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    if db.schema:
        env["VAULT_DATABASE_SCHEMA"] = db.schema
    env.update(extra)
    return env


REPO = Path(__file__).resolve().parent.parent


@dataclass
class VaultProcess:
    """`python -m services.vault` as a child process, its log registered for the canary scan."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: Any = None

    def start(self) -> VaultProcess:
        import subprocess

        register_artifact(self.log_path)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.vault"], cwd=REPO, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_started(self, timeout: float = 60.0) -> None:
        async def started() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            return "vault started" in self.log_text()

        await eventually(started, f"{self.name} to start", timeout)

    async def astop(self, timeout: float = 30.0) -> int:
        """stop() without blocking the event loop (which may be serving the OAuth stand-in)."""
        return await asyncio.to_thread(self.stop, timeout)

    def stop(self, timeout: float = 30.0) -> int:
        import signal
        import subprocess

        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# --- the OAuth stand-in ---------------------------------------------------------------------
async def standin_login(oauth: Any, *, scopes: str = "user:inference user:profile") -> dict[str, Any]:
    """A real authorization-code + PKCE login against the stand-in; its token response."""
    import base64
    import hashlib
    import secrets
    from urllib.parse import parse_qs, urlsplit

    import httpx

    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(oauth.authorize_url, params={
            "code": "true", "client_id": oauth.state.client_id, "response_type": "code",
            "redirect_uri": oauth.callback_url, "scope": scopes, "code_challenge": challenge,
            "code_challenge_method": "S256", "state": state,
        })
        assert answer.status_code == 302, answer.text
        code = parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]
        token = await http.post(oauth.token_url, json={
            "grant_type": "authorization_code", "code": code, "redirect_uri": oauth.callback_url,
            "client_id": oauth.state.client_id, "code_verifier": verifier, "state": state,
        })
        assert token.status_code == 200, token.text
        return token.json()


def issued_from_login(vault: Recipient, user_id: str, grant: dict[str, Any]) -> TokensIssued:
    """The tokens.issued auth would publish for a stand-in login."""
    now_ms = int(time.time() * 1000)
    return issued_event(
        vault, user_id=user_id, access_token=grant["access_token"], refresh_token=grant["refresh_token"],
        expires_at=now_ms + grant["expires_in"] * 1000, scopes=grant["scope"].split(),
        refresh_token_expires_at=now_ms + grant["refresh_token_expires_in"] * 1000,
    )
