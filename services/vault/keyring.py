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

Rotation is a small step on top of this: `Keyring.with_key(...)` adds a KEK and makes it
active; `Keyring.rewrap(record, context)` re-wraps only the 32-byte data key under the active
KEK (the record ciphertext is untouched, because its AAD does not name the KEK).

Key material never appears in repr/str/exceptions.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.vault.errors import DecryptionFailed, InvalidKeyring, UnknownKeyId

__all__ = [
    "DecryptionFailed",
    "EncryptedRecord",
    "InvalidKeyring",
    "Keyring",
    "RecordContext",
    "UnknownKeyId",
    "load_or_create_keyring",
]

KEY_BYTES = 32
NONCE_BYTES = 12
KEK_FILE_NAME = "vault-kek.json"
_KID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_AAD_PREFIX = b"ccbridge/vault/v1"


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
    """A set of KEKs by id, one of them active (used for new wraps)."""

    __slots__ = ("_active", "_keys")

    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if not keys:
            raise InvalidKeyring("a keyring needs at least one key")
        for kid, key in keys.items():
            if not isinstance(kid, str) or not _KID_RE.match(kid):
                raise InvalidKeyring("key ids must match [A-Za-z0-9._-]{1,64}")
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise InvalidKeyring(f"key {kid!r} must be exactly {KEY_BYTES} bytes")
        if active not in keys:
            raise InvalidKeyring(f"active key id {active!r} is not among the keys")
        self._keys: Mapping[str, bytes] = MappingProxyType(dict(keys))
        self._active = active

    # --- construction -------------------------------------------------------
    @staticmethod
    def new_kek_id() -> str:
        return f"kek-{secrets.token_hex(6)}"

    @classmethod
    def generate(cls) -> Keyring:
        kid = cls.new_kek_id()
        return cls({kid: AESGCM.generate_key(bit_length=256)}, kid)

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        """`{"active": "<kid>", "keys": {"<kid>": "<base64url 32 bytes>"}}`."""
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
        return cls(keys, doc["active"])

    def export_json(self) -> str:
        """The secret serialisation (for the 0600 KEK file). Never log it."""
        return json.dumps({"active": self._active, "keys": {k: _b64e(v) for k, v in self._keys.items()}}, indent=2)

    def with_key(self, kek_id: str, key: bytes, *, activate: bool = True) -> Keyring:
        """A new keyring that also holds `kek_id` (rotation step 1)."""
        keys = dict(self._keys)
        keys[kek_id] = key
        return Keyring(keys, kek_id if activate else self._active)

    # --- introspection (no key bytes) ----------------------------------------
    @property
    def active_kek_id(self) -> str:
        return self._active

    @property
    def kek_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __repr__(self) -> str:
        return f"Keyring(active={self._active!r}, kek_ids={list(self._keys)!r})"

    __str__ = __repr__

    def __reduce__(self) -> object:  # no pickling of key material by accident
        raise TypeError("Keyring cannot be pickled")

    # --- crypto ---------------------------------------------------------------
    def _kek(self, kek_id: str) -> AESGCM:
        key = self._keys.get(kek_id)
        if key is None:
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
        """Re-wrap the data key under the active KEK (rotation step 2); ciphertext unchanged."""
        if record.kek_id == self._active:
            return record
        data_key = self._unwrap(record, context)
        return EncryptedRecord(
            kek_id=self._active,
            wrapped_data_key=self._wrap(data_key, context, self._active),
            nonce=record.nonce,
            ciphertext=record.ciphertext,
        )


# --- loading -------------------------------------------------------------------
def _write_private_once(path: Path, text: str) -> None:
    """Create `path` 0600 atomically; if another process created it first, keep theirs."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create_keyring(keys_dir: Path, *, env_value: str | None = None) -> Keyring:
    """VAULT_KEKS if given, else `<keys_dir>/vault-kek.json` (created 0600 with one random key)."""
    if env_value and env_value.strip():
        return Keyring.from_json(env_value)
    path = Path(keys_dir) / KEK_FILE_NAME
    if not path.exists():
        _write_private_once(path, Keyring.generate().export_json())
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidKeyring(f"cannot read {path}: {exc.strerror}") from None
    return Keyring.from_json(text)
