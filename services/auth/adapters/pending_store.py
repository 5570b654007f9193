"""Pending logins in a JetStream KV bucket (shared by every auth replica), and an in-memory fake.

- Key = the login's state; bucket TTL = the login's life, so forgotten logins vanish by themselves.
- Single use: `consume` deletes with `last=revision` (compare-and-set): of two racing replicas
  exactly one wins.
- Per-caller cap: key `user.<sha256(user id)>` holds the caller's logins (state, expiry), updated
  with compare-and-set, so "at most N live logins" holds across replicas. Consumed logins drop
  out because each listed state is looked up; expired ones by their expiry.
- The record holds the PKCE verifier, which together with a code someone saw would be enough to
  redeem it: values are AES-256-GCM encrypted with a key derived from the caller-JWT secret
  (which every replica shares), bound to the key name, so the bus never carries a verifier in
  the clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
from datetime import datetime, timedelta

import nats.errors
import nats.js.errors
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from services.auth.domain import PendingLogin
from services.auth.errors import StoreUnavailable, TooManyPendingLogins
from services.auth.ports import StoredLogin
from shared.kv import open_or_create_bucket
from shared.logging import get_logger
from shared.subjects import PENDING_LOGINS_BUCKET

log = get_logger(__name__)

_WRONG_LAST_SEQUENCE = (10071, 10164)
INDEX_PREFIX = "user."
_CAS_ATTEMPTS = 8
_TRANSIENT = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError)


class RecordCipher:
    """AES-256-GCM with a key derived (HKDF-SHA256) from a service secret; AAD = the KV key."""

    VERSION = b"\x01"

    def __init__(self, secret: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ccbridge/auth/pending-login/v1").derive(
            secret
        )
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "RecordCipher()"

    def encrypt(self, plaintext: bytes, *, key: str) -> bytes:
        nonce = os.urandom(12)
        return self.VERSION + nonce + self._aead.encrypt(nonce, plaintext, key.encode())

    def decrypt(self, blob: bytes, *, key: str) -> bytes:
        if len(blob) < 1 + 12 + 16 or blob[:1] != self.VERSION:
            raise ValueError("not a sealed pending-login record")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], key.encode())
        except Exception as exc:
            raise ValueError("pending-login record does not open") from exc


async def open_bucket(
    js: JetStreamContext, *, bucket: str = PENDING_LOGINS_BUCKET, ttl: timedelta, replicas: int = 1
) -> KeyValue:
    """The bucket, created on first use (shared.kv)."""
    return await open_or_create_bucket(js, KeyValueConfig(
        bucket=bucket,
        description="ccbridge auth: pending logins (state -> sealed PKCE record)",
        history=1,
        ttl=ttl.total_seconds(),
        storage=StorageType.FILE,
        replicas=replicas,
    ))


class KvPendingStore:
    def __init__(self, kv: KeyValue, cipher: RecordCipher) -> None:
        self._kv = kv
        self._cipher = cipher

    @classmethod
    async def open(
        cls, js: JetStreamContext, cipher: RecordCipher, *, ttl: timedelta, replicas: int = 1
    ) -> KvPendingStore:
        return cls(await open_bucket(js, ttl=ttl, replicas=replicas), cipher)

    async def put(self, login: PendingLogin, *, limit: int | None = None) -> None:
        # The record exists before it is listed in the caller's index: a racing replica that
        # reads the index must find every listed login (it drops listed states without a record
        # as consumed), or it would undercount and let the caller past the cap.
        try:
            await self._kv.create(login.state, self._cipher.encrypt(login.to_json(), key=login.state))
            if limit is not None:
                try:
                    await self._reserve(login, limit)
                except BaseException:
                    with contextlib.suppress(*_TRANSIENT, nats.js.errors.KeyNotFoundError):
                        await self._kv.delete(login.state)
                    raise
        except _TRANSIENT as exc:
            log.warning("pending-login store write failed", error_type=type(exc).__name__)
            raise StoreUnavailable() from None

    async def _reserve(self, login: PendingLogin, limit: int) -> None:
        """Add `login` to its caller's index unless the caller is at `limit` (compare-and-set)."""
        key = index_key(login.user_id)
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            listed = self._open_index(entry.value, key) if entry is not None and entry.value else []
            live = [item for item in listed if item[1] > login.created_at and await self._exists(item[0])]
            check_capacity(live, limit, login.created_at)
            value = self._cipher.encrypt(dump_index([*live, (login.state, login.expires_at)]), key=key)
            try:
                if entry is None:
                    await self._kv.create(key, value)
                else:
                    await self._kv.update(key, value, last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another replica changed the index meanwhile: read it again
        log.warning("pending-login index kept changing under us", attempts=_CAS_ATTEMPTS)
        raise StoreUnavailable()

    def _open_index(self, blob: bytes, key: str) -> list[tuple[str, datetime]]:
        try:
            return load_index(self._cipher.decrypt(blob, key=key))
        except ValueError:
            log.warning("unreadable pending-login index replaced")
            return []

    async def _exists(self, state: str) -> bool:
        try:
            entry = await self._kv.get(state)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError):
            return False
        return bool(entry.value)

    async def get(self, state: str) -> StoredLogin | None:
        try:
            entry = await self._kv.get(state)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.js.errors.InvalidKeyError:
            return None
        except _TRANSIENT as exc:
            log.warning("pending-login store read failed", error_type=type(exc).__name__)
            raise StoreUnavailable() from None
        if not entry.value:
            return None
        try:
            login = PendingLogin.from_json(self._cipher.decrypt(entry.value, key=state))
        except ValueError:
            log.warning("unreadable pending-login record ignored (other secret or corrupted)")
            return None
        if login.state != state:
            return None
        return StoredLogin(login=login, revision=entry.revision or 0)

    async def consume(self, state: str, revision: int) -> bool:
        try:
            await self._kv.delete(state, last=revision)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return False
            log.warning("pending-login store delete failed", error_type=type(exc).__name__)
            raise StoreUnavailable() from None
        except _TRANSIENT as exc:
            log.warning("pending-login store delete failed", error_type=type(exc).__name__)
            raise StoreUnavailable() from None
        return True

    async def restore(self, login: PendingLogin) -> None:
        try:
            await self._kv.create(login.state, self._cipher.encrypt(login.to_json(), key=login.state))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # somebody put it back already
        except _TRANSIENT as exc:
            log.warning("pending-login store restore failed", error_type=type(exc).__name__)
            raise StoreUnavailable() from None


def index_key(user_id: str) -> str:
    return INDEX_PREFIX + hashlib.sha256(user_id.encode()).hexdigest()[:40]


def dump_index(items: list[tuple[str, datetime]]) -> bytes:
    return json.dumps([{"state": state, "expires_at": expires.isoformat()} for state, expires in items]).encode()


def load_index(data: bytes) -> list[tuple[str, datetime]]:
    try:
        return [(str(i["state"]), datetime.fromisoformat(i["expires_at"])) for i in json.loads(data)]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("not a pending-login index") from exc


def check_capacity(live: list[tuple[str, datetime]], limit: int, now: datetime) -> None:
    if len(live) >= limit:
        soonest = min(expires for _, expires in live)
        raise TooManyPendingLogins(max(1, math.ceil((soonest - now).total_seconds())))


class InMemoryPendingStore:
    """Same semantics as the KV store (revisions, compare-and-set), for unit tests."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[PendingLogin, int]] = {}
        self._revision = 0

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, login: PendingLogin, *, limit: int | None = None) -> None:
        if login.state in self._items:
            raise StoreUnavailable("duplicate state")
        if limit is not None:
            live = [
                (other.state, other.expires_at)
                for other, _ in self._items.values()
                if other.user_id == login.user_id and other.expires_at > login.created_at
            ]
            check_capacity(live, limit, login.created_at)
        self._revision += 1
        self._items[login.state] = (login, self._revision)

    async def get(self, state: str) -> StoredLogin | None:
        item = self._items.get(state)
        return StoredLogin(login=item[0], revision=item[1]) if item else None

    async def consume(self, state: str, revision: int) -> bool:
        item = self._items.get(state)
        if item is None or item[1] != revision:
            return False
        del self._items[state]
        return True

    async def restore(self, login: PendingLogin) -> None:
        if login.state not in self._items:
            await self.put(login)
