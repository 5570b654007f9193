"""Operator tools behind `ccbridge vault migrate|revoke` and `ccbridge keys rotate|rewrap|retire|list`.
The CLI only parses arguments and prints; the logic is here, next to what it operates on.

Key rotation runs online, next to running vault replicas:

1. `rotate_keys` adds a fresh KEK to the key file and makes it active (under a file lock, atomic
   replace). Running replicas notice within VAULT_KEK_CHECK_INTERVAL_S (they stat the file) and
   encrypt new writes with it; a replica that reads a record re-wrapped under a key it does not
   know yet reloads the file at once (`LiveKeyring`).
2. `rewrap_records` re-wraps every data key that is not under the active KEK — one small
   transaction per batch, compare-and-set per record on (user, version, KEK id), the record
   ciphertext untouched. After a pass it waits longer than the replicas' check interval and
   passes again, until a pass after that wait finds nothing: writes made by a replica that had
   not noticed the new key yet are caught too.
3. Optionally (`retire_previous`) KEKs that no record uses any more are retired: their bytes
   leave the key file, their ids stay, so a forgotten record fails loudly (`RetiredKeyId`).
"""

from __future__ import annotations

import asyncio
import getpass
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.vault.adapters.store import SqlStore, head_revision
from services.vault.domain import AuditEntry
from services.vault.errors import InvalidKeyring, KeyringError
from services.vault.keyring import FileKekSource, Keyring, LiveKeyring, kek_source, require_writable
from services.vault.ports import RecordCipher, SecretRef, UnitOfWork
from services.vault.settings import VaultSettings
from shared import nats_connect, subjects
from shared.broker import ensure_streams
from shared.events import TokensRevoked
from shared.logging import get_logger

log = get_logger(__name__)


def operator_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in a container
        user = "unknown"
    return f"operator:{user}@{socket.gethostname()}"[:128]


def open_store(settings: VaultSettings) -> SqlStore:
    return SqlStore.from_url(
        settings.database_url.get_secret_value(), schema=settings.database_schema,
        pool_timeout_s=settings.db_pool_timeout_s,
    )


def settings_source(settings: VaultSettings, *, create: bool = False) -> Any:
    """The KEK source of these settings. Operator tools never create a key file by accident
    (`create=False`: a missing file is an error); only `init_keys` (`ccbridge keys init`) and the
    vault service itself create one."""
    source = kek_source(
        settings.keys_dir, env_value=settings.keks.get_secret_value() if settings.keks else None,
        path=settings.kek_path,
    )
    if isinstance(source, FileKekSource) and not create:
        source = FileKekSource(source.path, create=False)
    return source


@dataclass(frozen=True)
class KeyFile:
    name: str
    path: str | None
    created: bool


def init_keys(settings: VaultSettings) -> list[KeyFile]:
    """`ccbridge keys init`: every key `ccbridge up` would create on its first start, created now
    where missing (0600), none replaced: the vault's KEK file (unless VAULT_KEKS is set), the
    vault's and the sandbox service's HPKE key pairs, auth's grant signing key."""
    from shared.grants import key_paths as grant_key_paths
    from shared.grants import load_or_create_signer
    from shared.sealing import key_paths, load_or_create_keypair

    keys_dir = settings.keys_dir
    made: list[KeyFile] = []
    source = settings_source(settings, create=True)
    if isinstance(source, FileKekSource):
        existed = source.path.exists()
        source.load()
        made.append(KeyFile("vault KEKs", str(source.path), not existed))
    else:
        made.append(KeyFile("vault KEKs", None, False))  # VAULT_KEKS: nothing to write
    for owner in ("vault", "sandbox"):
        private, _ = key_paths(keys_dir, owner)
        existed = private.exists()
        load_or_create_keypair(keys_dir, owner)
        made.append(KeyFile(f"{owner} HPKE key", str(private), not existed))
    grant_key, _ = grant_key_paths(keys_dir)
    existed = grant_key.exists()
    load_or_create_signer(keys_dir)
    made.append(KeyFile("auth grant key", str(grant_key), not existed))
    return made


async def _audit(unit_of_work: Callable[[], UnitOfWork], entry: AuditEntry) -> None:
    async with unit_of_work() as uow:
        await uow.audit.add(entry)
        await uow.commit()


# --- migrations -----------------------------------------------------------------------
@dataclass(frozen=True)
class MigrationReport:
    before: str | None
    after: str | None
    head: str


async def migrate(settings: VaultSettings, revision: str = "head") -> MigrationReport:
    store = open_store(settings)
    try:
        before = await store.current_revision()
        await store.migrate(revision)
        after = await store.current_revision()
    finally:
        await store.dispose()
    return MigrationReport(before, after, head_revision())


# --- re-wrapping ----------------------------------------------------------------------
@dataclass
class RewrapReport:
    active_kek_id: str = ""
    moved: int = 0
    conflicts: int = 0
    passes: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # user_id -> reason (never more)
    by_kek: dict[str, int] = field(default_factory=dict)  # after the run

    @property
    def ok(self) -> bool:
        return not self.failures


async def _pass(
    unit_of_work: Callable[[], UnitOfWork], cipher: RecordCipher, active: str, batch: int, report: RewrapReport
) -> int:
    """One sweep over every record not under `active`; returns how many were moved."""
    moved = 0
    after: str | None = None
    while True:
        async with unit_of_work() as uow:
            refs: list[SecretRef] = await uow.secrets.not_under(active, after_user=after, limit=batch)
        if not refs:
            return moved
        async with unit_of_work() as uow:
            for ref in refs:
                try:
                    if await uow.secrets.rewrap(ref, cipher):
                        moved += 1
                        report.failures.pop(ref.user_id, None)
                    else:
                        report.conflicts += 1  # changed meanwhile: the next pass looks again
                except KeyringError as exc:
                    report.failures[ref.user_id] = exc.reason
            await uow.commit()
        after = refs[-1].user_id


async def rewrap_records(
    unit_of_work: Callable[[], UnitOfWork],
    keyring: LiveKeyring | Keyring,
    *,
    batch: int = 200,
    settle_s: float = 0.0,
    max_passes: int = 20,
    actor: str | None = None,
) -> RewrapReport:
    """Move every record to the active KEK (see the module docstring for the passes)."""
    report = RewrapReport()
    # Replicas switch to a new active KEK within their check interval: a pass that starts after
    # `switch_deadline` and finds nothing to move is the last one needed.
    switch_deadline = time.monotonic() + max(0.0, settle_s)
    while report.passes < max_passes:
        if isinstance(keyring, LiveKeyring):
            keyring.reload(force=True)
        active = keyring.active_kek_id
        report.active_kek_id = active
        report.passes += 1
        started = time.monotonic()
        moved = await _pass(unit_of_work, keyring, active, batch, report)
        report.moved += moved
        if moved == 0:
            if started >= switch_deadline:
                break
            await asyncio.sleep(max(0.0, switch_deadline - time.monotonic()))
    async with unit_of_work() as uow:
        report.by_kek = await uow.secrets.count_by_kek()
    await _audit(
        unit_of_work,
        AuditEntry(actor=actor or operator_actor(), action="records_rewrapped",
                   outcome="ok" if report.ok else "error", kek_id=report.active_kek_id,
                   reason=None if report.ok else "some records do not decrypt",
                   detail={"moved": report.moved, "failures": len(report.failures), "passes": report.passes}),
    )
    for user_id, reason in report.failures.items():
        log.error("record not re-wrapped", user_id=user_id, reason=reason)
        await _audit(unit_of_work, AuditEntry(actor=actor or operator_actor(), action="rewrap_failed",
                                              outcome="error", user_id=user_id, reason=reason))
    return report


# --- rotation -------------------------------------------------------------------------
@dataclass
class RotationReport:
    new_kek_id: str
    previous_kek_id: str
    rewrap: RewrapReport | None = None
    retired: list[str] = field(default_factory=list)


def _settle_s(settings: VaultSettings) -> float:
    return 2 * settings.kek_check_interval_s + 1.0


async def rotate_keys(
    settings: VaultSettings,
    *,
    rewrap: bool = True,
    retire_previous: bool = False,
    settle_s: float | None = None,
    actor: str | None = None,
) -> RotationReport:
    """Add a KEK, make it active, re-wrap every record online, optionally retire the old KEKs."""
    actor = actor or operator_actor()
    source = require_writable(settings_source(settings))
    previous = source.load()
    rotated = source.update(lambda ring: ring.with_new_key())
    report = RotationReport(new_kek_id=rotated.active_kek_id, previous_kek_id=previous.active_kek_id)
    log.info("key-encryption key added", kek_id=report.new_kek_id, previous=report.previous_kek_id)
    store = open_store(settings)
    try:
        keyring = LiveKeyring(source, check_interval_s=settings.kek_check_interval_s)

        def unit_of_work() -> UnitOfWork:
            return store.unit_of_work(keyring)

        await _audit(unit_of_work, AuditEntry(actor=actor, action="kek_added", kek_id=report.new_kek_id,
                                              detail={"previous": report.previous_kek_id}))
        if rewrap:
            report.rewrap = await rewrap_records(
                unit_of_work, keyring, settle_s=_settle_s(settings) if settle_s is None else settle_s, actor=actor
            )
            if retire_previous and report.rewrap.ok:
                report.retired = await _retire_unused(source, unit_of_work, actor)
    finally:
        await store.dispose()
    return report


async def rewrap(settings: VaultSettings, *, settle_s: float | None = None, actor: str | None = None) -> RewrapReport:
    """Re-wrap every record under the active KEK of the configured source (any source: after
    VAULT_KEKS got a new active key, for instance)."""
    source = settings_source(settings)
    store = open_store(settings)
    try:
        keyring = LiveKeyring(source, check_interval_s=settings.kek_check_interval_s)
        return await rewrap_records(
            lambda: store.unit_of_work(keyring), keyring,
            settle_s=_settle_s(settings) if settle_s is None else settle_s, actor=actor,
        )
    finally:
        await store.dispose()


async def _retire_unused(source: Any, unit_of_work: Callable[[], UnitOfWork], actor: str) -> list[str]:
    async with unit_of_work() as uow:
        in_use = await uow.secrets.count_by_kek()
    retired: list[str] = []

    def change(ring: Keyring) -> Keyring:
        for kid in ring.kek_ids:
            if kid != ring.active_kek_id and not in_use.get(kid):
                ring = ring.retire(kid)
                retired.append(kid)
        return ring

    source.update(change)
    for kid in retired:
        await _audit(unit_of_work, AuditEntry(actor=actor, action="kek_retired", kek_id=kid))
    return retired


async def retire_key(settings: VaultSettings, kek_id: str, *, force: bool = False, actor: str | None = None) -> int:
    """Drop a KEK's bytes (its id stays, as retired). Refuses while records use it, unless
    `force` — those records then fail loudly until their owners connect again."""
    actor = actor or operator_actor()
    source = require_writable(settings_source(settings))
    store = open_store(settings)
    try:
        keyring = LiveKeyring(source)
        async with store.unit_of_work(keyring) as uow:
            in_use = (await uow.secrets.count_by_kek()).get(kek_id, 0)
        if in_use and not force:
            raise InvalidKeyring(f"{in_use} records still use {kek_id!r}: run `ccbridge keys rewrap` first")
        source.update(lambda ring: ring.retire(kek_id))
        await _audit(lambda: store.unit_of_work(keyring),
                     AuditEntry(actor=actor, action="kek_retired", kek_id=kek_id,
                                outcome="forced" if in_use else "ok", detail={"records": in_use}))
        return in_use
    finally:
        await store.dispose()


async def key_status(settings: VaultSettings) -> dict[str, Any]:
    """Ids only: the active KEK, the others, the retired ones, and how many records each wraps."""
    source = settings_source(settings)
    ring = source.load()
    store = open_store(settings)
    try:
        async with store.unit_of_work(ring) as uow:
            by_kek = await uow.secrets.count_by_kek()
    finally:
        await store.dispose()
    return {
        "source": source.name,
        "active": ring.active_kek_id,
        "keys": list(ring.kek_ids),
        "retired": dict(ring.retired),
        "records": by_kek,
        "unknown": sorted(k for k in by_kek if k not in ring.kek_ids),
    }


# --- listing ---------------------------------------------------------------------------
async def list_connections(settings: VaultSettings, *, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Every connection without a secret: who, state, scopes, expiries, version, KEK id."""
    ring = settings_source(settings).load()
    store = open_store(settings)
    try:
        async with store.unit_of_work(ring) as uow:
            found = await uow.connections.summaries(limit=limit, state=state)
    finally:
        await store.dispose()
    return [
        {
            "user_id": c.user_id,
            "kind": c.kind,
            "state": c.state,
            "scopes": list(c.scopes),
            "expires_at": c.expires_at,
            "refresh_token_expires_at": c.refresh_token_expires_at,
            "email": c.account.email if c.account else None,
            "version": c.version,
            "kek_id": c.kek_id,
        }
        for c in found
    ]


# --- revocation -----------------------------------------------------------------------
@dataclass(frozen=True)
class RevokeReport:
    event: TokensRevoked
    outcome: str | None
    """What the vault did: "revoked" (it shredded a connection), "not_connected" (there was none),
    "timeout" (no confirmation within wait_s), None (not waited for)."""


async def revoke_user(
    settings: VaultSettings,
    user_id: str,
    *,
    reason: str = "operator_request",
    wait_s: float = 0.0,
    connect_timeout: float = 10.0,
) -> RevokeReport:
    """Publish `tokens.revoked` (the vault shreds the secret, the sandbox service scrubs live
    sandboxes). With `wait_s`, wait until the vault's audit log shows what it did. Connecting is
    bounded by `connect_timeout` (`shared.nats_connect.BusUnreachable` past it)."""
    event = TokensRevoked(user_id=user_id, reason=reason)
    # An operator's verb: only `ops` (or auth / the platform) may publish tokens.revoked, so it
    # replies on the ops inbox prefix unless NATS_INBOX_PREFIX says otherwise.
    nc = await nats_connect.connect(settings.nats_url, timeout=connect_timeout, name="ccbridge-vault-cli",
                                    inbox_prefix=settings.nats_inbox_prefix or subjects.inbox_prefix("ops"))
    try:
        js = nc.jetstream()
        await ensure_streams(js, replicas=settings.stream_replicas, max_bytes=settings.stream_max_bytes)
        await js.publish(subjects.TOKENS_REVOKED, event.model_dump_json().encode(),
                         headers={subjects.MSG_ID_HEADER: event.event_id}, stream=subjects.TOKENS_STREAM.name,
                         timeout=connect_timeout)
    finally:
        await nc.close()
    if wait_s <= 0:
        return RevokeReport(event, None)
    store = open_store(settings)
    try:
        deadline = time.monotonic() + wait_s
        ring = Keyring.generate()  # reading the audit log needs no real key
        while time.monotonic() < deadline:
            async with store.unit_of_work(ring) as uow:
                records = await uow.audit.list(user_id=user_id, action="revoked", limit=20)
            for record in records:
                if record.entry.event_id == event.event_id:
                    return RevokeReport(event, record.entry.outcome)
            await asyncio.sleep(0.2)
        return RevokeReport(event, "timeout")
    finally:
        await store.dispose()


__all__ = [
    "KeyFile",
    "MigrationReport",
    "RevokeReport",
    "init_keys",
    "RewrapReport",
    "RotationReport",
    "key_status",
    "migrate",
    "retire_key",
    "revoke_user",
    "rewrap",
    "rewrap_records",
    "rotate_keys",
]
