"""At-rest encryption of credential records: AES-256-GCM envelope encryption.

Each record gets its own random 256-bit *data key*. The record is encrypted with the data key
(random 96-bit nonce); the data key is encrypted ("wrapped") with the active *key-encryption
key* (KEK), also AES-256-GCM with its own random nonce. The row stores the KEK id, the wrapped
data key, the record nonce and the ciphertext — never a key in the clear.

Associated data binds every ciphertext to where it belongs:
- record ciphertext: (user_id, version)
- wrapped data key:  (user_id, version, kek_id)
so a ciphertext copied to another user's row, replayed at another version, or relabelled with
another KEK id fails to decrypt (`DecryptionFailed`).

Rotation: `Keyring.with_key(...)` adds a KEK and makes it active; `Keyring.rewrap(record,
context)` re-wraps only the 32-byte data key under the active KEK (the record ciphertext is
untouched, because its AAD does not name the KEK); `Keyring.retire(kid)` drops a KEK's bytes
and remembers its id, so a record still wrapped by it fails loudly (`RetiredKeyId`) instead of
looking like garbage.

Where KEKs come from is a port, `KekSource` (env `VAULT_KEKS`, the key file; a KMS can be
added). `LiveKeyring` is what the vault uses: it follows its source, so a replica picks up a
key another process added (`ccbridge keys rotate`) — see `LiveKeyring` for the rules.

Key material never appears in repr/str/exceptions.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import threading
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.vault.errors import (
    DecryptionFailed,
    InvalidKeyring,
    KeySourceReadOnly,
    RetiredKeyId,
    UnknownKeyId,
)
from shared.files import write_private_file

__all__ = [
    "DecryptionFailed",
    "EncryptedRecord",
    "EnvKekSource",
    "FileKekSource",
    "InvalidKeyring",
    "KekSource",
    "Keyring",
    "LiveKeyring",
    "RecordContext",
    "RetiredKeyId",
    "UnknownKeyId",
    "WritableKekSource",
    "load_or_create_keyring",
]

KEY_BYTES = 32
NONCE_BYTES = 12
KEK_FILE_NAME = "vault-kek.json"
_KID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_AAD_PREFIX = b"ccbridge/vault/v1"
_T = typing.TypeVar("_T")


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _encode_aad(*parts: str) -> bytes:
    """Length-prefixed, so no choice of values can make two different tuples collide."""
    out = bytearray(_AAD_PREFIX)
    for part in parts:
        raw = part.encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


@dataclass(frozen=True)
class RecordContext:
    """Where a record lives; bound into the AEAD associated data."""

    user_id: str
    version: int

    def record_aad(self) -> bytes:
        return _encode_aad("record", self.user_id, str(self.version))

    def data_key_aad(self, kek_id: str) -> bytes:
        return _encode_aad("data-key", self.user_id, str(self.version), kek_id)


@dataclass(frozen=True)
class EncryptedRecord:
    """What the store persists. Not secret by itself, but kept out of reprs anyway."""

    kek_id: str
    wrapped_data_key: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


class Keyring:
    """An immutable set of KEKs by id, one of them active (used for new wraps), plus the ids of
    retired KEKs (bytes destroyed)."""

    __slots__ = ("_active", "_keys", "_retired")

    def __init__(self, keys: Mapping[str, bytes], active: str, retired: Mapping[str, str] | None = None) -> None:
        if not keys:
            raise InvalidKeyring("a keyring needs at least one key")
        for kid, key in keys.items():
            if not isinstance(kid, str) or not _KID_RE.match(kid):
                raise InvalidKeyring("key ids must match [A-Za-z0-9._-]{1,64}")
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise InvalidKeyring(f"key {kid!r} must be exactly {KEY_BYTES} bytes")
        if active not in keys:
            raise InvalidKeyring(f"active key id {active!r} is not among the keys")
        retired = dict(retired or {})
        for kid, when in retired.items():
            if not isinstance(kid, str) or not _KID_RE.match(kid) or not isinstance(when, str):
                raise InvalidKeyring("retired entries must be {<key id>: <ISO time>}")
            if kid in keys:
                raise InvalidKeyring(f"key {kid!r} is both present and retired")
        self._keys: Mapping[str, bytes] = MappingProxyType(dict(keys))
        self._active = active
        self._retired: Mapping[str, str] = MappingProxyType(retired)

    # --- construction -------------------------------------------------------
    @staticmethod
    def new_kek_id() -> str:
        return f"kek-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"

    @classmethod
    def generate(cls) -> Keyring:
        kid = cls.new_kek_id()
        return cls({kid: AESGCM.generate_key(bit_length=256)}, kid)

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        """`{"active": "<kid>", "keys": {"<kid>": "<base64url 32 bytes>"}, "retired": {"<kid>": "<when>"}}`
        (`retired` is optional)."""
        try:
            doc = json.loads(text)
        except (ValueError, TypeError):
            raise InvalidKeyring("keyring is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict) or not isinstance(doc.get("active"), str):
            raise InvalidKeyring('keyring must look like {"active": "<kid>", "keys": {"<kid>": "<base64url>"}}')
        keys: dict[str, bytes] = {}
        for kid, encoded in doc["keys"].items():
            if not isinstance(encoded, str):
                raise InvalidKeyring(f"key {kid!r} must be a base64url string")
            try:
                keys[kid] = _b64d(encoded.strip())
            except (ValueError, TypeError):
                raise InvalidKeyring(f"key {kid!r} is not base64url") from None
        retired = doc.get("retired") or {}
        if not isinstance(retired, dict):
            raise InvalidKeyring("retired must be an object {<key id>: <ISO time>}")
        return cls(keys, doc["active"], retired)

    def export_json(self) -> str:
        """The secret serialisation (for the 0600 KEK file). Never log it."""
        doc: dict[str, object] = {"active": self._active, "keys": {k: _b64e(v) for k, v in self._keys.items()}}
        if self._retired:
            doc["retired"] = dict(self._retired)
        return json.dumps(doc, indent=2)

    def with_key(self, kek_id: str, key: bytes, *, activate: bool = True) -> Keyring:
        """A new keyring that also holds `kek_id` (rotation step 1)."""
        if kek_id in self._keys or kek_id in self._retired:
            raise InvalidKeyring(f"key id {kek_id!r} is already in use")
        keys = dict(self._keys)
        keys[kek_id] = key
        return Keyring(keys, kek_id if activate else self._active, self._retired)

    def with_new_key(self) -> Keyring:
        """Rotation step 1 with a fresh random KEK, made active."""
        return self.with_key(self.new_kek_id(), AESGCM.generate_key(bit_length=256))

    def retire(self, kek_id: str, *, when: datetime | None = None) -> Keyring:
        """A new keyring without `kek_id`'s bytes; records still under it raise `RetiredKeyId`."""
        if kek_id == self._active:
            raise InvalidKeyring("the active key cannot be retired: rotate first")
        if kek_id not in self._keys:
            raise InvalidKeyring(f"no key {kek_id!r} to retire")
        keys = {k: v for k, v in self._keys.items() if k != kek_id}
        retired = dict(self._retired)
        retired[kek_id] = (when or datetime.now(UTC)).isoformat(timespec="seconds")
        return Keyring(keys, self._active, retired)

    # --- introspection (no key bytes) ----------------------------------------
    @property
    def active_kek_id(self) -> str:
        return self._active

    @property
    def kek_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @property
    def retired(self) -> Mapping[str, str]:
        return self._retired

    def fingerprint(self) -> str:
        """Identifies the key set without revealing it (ids only)."""
        return f"{self._active}|{','.join(sorted(self._keys))}|{','.join(sorted(self._retired))}"

    def __repr__(self) -> str:
        return f"Keyring(active={self._active!r}, kek_ids={list(self._keys)!r}, retired={list(self._retired)!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:  # no pickling of key material by accident
        raise TypeError("Keyring cannot be pickled")

    # --- crypto ---------------------------------------------------------------
    def _kek(self, kek_id: str) -> AESGCM:
        key = self._keys.get(kek_id)
        if key is None:
            if kek_id in self._retired:
                raise RetiredKeyId(kek_id, self._retired[kek_id])
            raise UnknownKeyId(kek_id)
        return AESGCM(key)

    def _wrap(self, data_key: bytes, context: RecordContext, kek_id: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._kek(kek_id).encrypt(nonce, data_key, context.data_key_aad(kek_id))

    def _unwrap(self, record: EncryptedRecord, context: RecordContext) -> bytes:
        kek = self._kek(record.kek_id)
        blob = record.wrapped_data_key
        if len(blob) <= NONCE_BYTES:
            raise DecryptionFailed("wrapped data key is truncated")
        try:
            data_key = kek.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context.data_key_aad(record.kek_id))
        except InvalidTag:
            raise DecryptionFailed("data key does not unwrap in this context") from None
        if len(data_key) != KEY_BYTES:
            raise DecryptionFailed("data key has the wrong length")
        return data_key

    def encrypt(self, plaintext: bytes, context: RecordContext) -> EncryptedRecord:
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, context.record_aad())
        return EncryptedRecord(
            kek_id=self._active,
            wrapped_data_key=self._wrap(data_key, context, self._active),
            nonce=nonce,
            ciphertext=ciphertext,
        )

    def decrypt(self, record: EncryptedRecord, context: RecordContext) -> bytes:
        data_key = self._unwrap(record, context)
        if len(record.nonce) != NONCE_BYTES:
            raise DecryptionFailed("record nonce has the wrong length")
        try:
            return AESGCM(data_key).decrypt(record.nonce, record.ciphertext, context.record_aad())
        except InvalidTag:
            raise DecryptionFailed("record does not decrypt in this context") from None

    def rewrap(self, record: EncryptedRecord, context: RecordContext) -> EncryptedRecord:
        """Re-wrap the data key under the active KEK (rotation step 2); ciphertext unchanged.
        The record itself is authenticated first, so a tampered record is never re-wrapped."""
        if record.kek_id == self._active:
            return record
        self.decrypt(record, context)
        data_key = self._unwrap(record, context)
        return EncryptedRecord(
            kek_id=self._active,
            wrapped_data_key=self._wrap(data_key, context, self._active),
            nonce=record.nonce,
            ciphertext=record.ciphertext,
        )


# --- sources -------------------------------------------------------------------
@runtime_checkable
class KekSource(Protocol):
    """Where the KEKs come from. `load()` returns the current keyring; `fingerprint()` is a
    cheap value that changes when the source may have changed (None: never changes)."""

    @property
    def name(self) -> str: ...

    def load(self) -> Keyring: ...

    def fingerprint(self) -> object | None: ...


@runtime_checkable
class WritableKekSource(KekSource, Protocol):
    """A source rotation can write to: `update(change)` applies `change` atomically (under a lock
    shared with other processes) and returns the new keyring."""

    def update(self, change: Callable[[Keyring], Keyring]) -> Keyring: ...


@dataclass(frozen=True)
class EnvKekSource:
    """`VAULT_KEKS`: fixed for the life of the process (rotate by redeploying, see docs/vault.md)."""

    value: str = field(repr=False)
    name: str = "env:VAULT_KEKS"

    def load(self) -> Keyring:
        return Keyring.from_json(self.value)

    def fingerprint(self) -> object | None:
        return None


@dataclass(frozen=True)
class FileKekSource:
    """A JSON key file (0600), e.g. `<keys_dir>/vault-kek.json` or a mounted secret.
    Created with one random key when `create` is set and the file is missing."""

    path: Path
    create: bool = True

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def load(self) -> Keyring:
        if self.create and not self.path.exists():
            write_private_file(self.path, Keyring.generate().export_json())
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise InvalidKeyring(f"cannot read {self.path}: {exc.strerror}") from None
        return Keyring.from_json(text)

    def fingerprint(self) -> object | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def update(self, change: Callable[[Keyring], Keyring]) -> Keyring:
        with self._locked():
            new = change(self.load())
            write_private_file(self.path, new.export_json(), replace=True)
            return new


def kek_source(keys_dir: Path, *, env_value: str | None = None, path: Path | None = None) -> KekSource:
    """VAULT_KEKS if given, else the key file (`path`, default `<keys_dir>/vault-kek.json`)."""
    if env_value and env_value.strip():
        return EnvKekSource(env_value)
    return FileKekSource(Path(path) if path else Path(keys_dir) / KEK_FILE_NAME)


class LiveKeyring:
    """The keyring a running vault uses: a `Keyring` that follows its `KekSource`.

    - Reads: a record under a key id this process does not know (or knows as retired) makes it
      reload the source once and retry — another process may have rotated a moment ago. Reloads
      forced this way are rate-limited (`min_reload_interval_s`), so garbage ids cannot turn into
      a file-read storm.
    - Writes: before encrypting, the source's fingerprint (for a file: inode, mtime, size — one
      `stat`) is checked at most every `check_interval_s`; a changed source is reloaded, so new
      rows move to the new active KEK within that interval. The rotation tool re-wraps
      stragglers written meanwhile (it waits longer than this interval before its last pass).
    - A source that became unreadable or invalid keeps the last good keyring (logged), never
      leaves the vault without keys.
    """

    def __init__(
        self,
        source: KekSource,
        *,
        check_interval_s: float = 2.0,
        min_reload_interval_s: float = 0.25,
        on_reload: Callable[[Keyring, Keyring], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self._check_interval = check_interval_s
        self._min_reload = min_reload_interval_s
        self._on_reload = on_reload
        self._on_error = on_error
        self._clock = clock
        self._lock = threading.Lock()
        self._fingerprint = source.fingerprint()
        self._current = source.load()
        now = clock()
        self._checked_at = now
        self._reloaded_at = now
        self.reloads = 0

    def __repr__(self) -> str:
        return f"LiveKeyring(source={self.source.name!r}, current={self._current!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("LiveKeyring cannot be pickled")

    # --- following the source -------------------------------------------------
    def current(self) -> Keyring:
        """The keyring, reloaded first if the source changed (checked at most every interval)."""
        now = self._clock()
        if now - self._checked_at >= self._check_interval:
            with self._lock:
                if now - self._checked_at >= self._check_interval:
                    self._checked_at = now
                    fingerprint = self.source.fingerprint()
                    if fingerprint is not None and fingerprint != self._fingerprint:
                        self._reload_locked(now, fingerprint)
        return self._current

    def reload(self, *, force: bool = False) -> bool:
        """Reload now (rate-limited unless `force`); True if the key set changed."""
        now = self._clock()
        with self._lock:
            if not force and now - self._reloaded_at < self._min_reload:
                return False
            return self._reload_locked(now, self.source.fingerprint())

    def _reload_locked(self, now: float, fingerprint: object | None) -> bool:
        self._reloaded_at = now
        self._checked_at = now
        try:
            fresh = self.source.load()
        except Exception as exc:  # noqa: BLE001 - keep the last good keyring
            if self._on_error is not None:
                self._on_error(exc)
            return False
        self._fingerprint = fingerprint
        old, self._current = self._current, fresh
        if old.fingerprint() == fresh.fingerprint():
            return False
        self.reloads += 1
        if self._on_reload is not None:
            self._on_reload(old, fresh)
        return True

    # --- the Keyring interface ------------------------------------------------
    @property
    def active_kek_id(self) -> str:
        return self.current().active_kek_id

    @property
    def kek_ids(self) -> tuple[str, ...]:
        return self.current().kek_ids

    @property
    def retired(self) -> Mapping[str, str]:
        return self.current().retired

    def encrypt(self, plaintext: bytes, context: RecordContext) -> EncryptedRecord:
        return self.current().encrypt(plaintext, context)

    def decrypt(self, record: EncryptedRecord, context: RecordContext) -> bytes:
        return self._with_reload(lambda ring: ring.decrypt(record, context))

    def rewrap(self, record: EncryptedRecord, context: RecordContext) -> EncryptedRecord:
        return self._with_reload(lambda ring: ring.rewrap(record, context))

    def _with_reload(self, operation: Callable[[Keyring], _T]) -> _T:
        ring = self.current()
        try:
            return operation(ring)
        except (UnknownKeyId, RetiredKeyId):
            if not self.reload():
                raise
            return operation(self._current)


# --- loading -------------------------------------------------------------------
def load_or_create_keyring(keys_dir: Path, *, env_value: str | None = None) -> Keyring:
    """VAULT_KEKS if given, else `<keys_dir>/vault-kek.json` (created 0600 with one random key)."""
    return kek_source(keys_dir, env_value=env_value).load()


def require_writable(source: KekSource) -> WritableKekSource:
    if not isinstance(source, WritableKekSource):
        raise KeySourceReadOnly(
            f"the KEK source {source.name} cannot be written: add the new key there and run "
            "`ccbridge keys rewrap` (see docs/vault.md)"
        )
    return source
