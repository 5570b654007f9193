"""HPKE (RFC 9180) sealing of token material for exactly one receiver.

Suite: DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + AES-256-GCM, single-shot base mode.
`info` binds every box to the subject it travels on and the event (or request) id, so a
box lifted from one message cannot be replayed inside another.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from shared import subjects
from shared.events import Sealed, TokenBundle, TokensIssued
from shared.files import write_private_file

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
SUITE_NAME = "X25519-HKDF_SHA256-AES_256_GCM"
_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw


class SealingError(Exception):
    """A box could not be opened: wrong key, wrong context, or tampered. Says nothing of content."""


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def info_for(subject: str, message_id: str, bind: tuple[str, ...] = ()) -> bytes:
    """HPKE `info`: the subject, the message id and whatever else the box must not be lifted
    away from (`bind`: e.g. the user id and kind of a `tokens.issued`, see `issued_binding`)."""
    return "\x00".join(("ccbridge/v1", subject, message_id, *bind)).encode()


def issued_binding(user_id: str, kind: str) -> tuple[str, ...]:
    """What a `tokens.issued` box is bound to besides its subject and event id: relabelling
    the event with another user (or kind) makes the box unopenable."""
    return ("user", user_id, "kind", kind)


def reply_binding(user_id: str, sandbox_id: str | None) -> tuple[str, ...]:
    """What a credentials reply box is bound to besides its subject and request id."""
    return ("user", user_id, "sandbox", sandbox_id or "")


def public_key_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(_RAW, _RAW_PUB)


def key_id_of(key: X25519PublicKey) -> str:
    """Stable short id of a public key (first 16 bytes of SHA-256, hex)."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:32]


def load_public_key(text: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(b64d(text.strip()))
    except Exception as exc:
        raise SealingError("not a valid X25519 public key") from exc


@dataclass(frozen=True)
class Recipient:
    """Somebody we can seal to."""

    public_key: X25519PublicKey
    key_id: str = ""

    def __post_init__(self) -> None:
        if not self.key_id:
            object.__setattr__(self, "key_id", key_id_of(self.public_key))

    @property
    def public_b64(self) -> str:
        return b64e(public_key_bytes(self.public_key))

    @classmethod
    def from_b64(cls, text: str) -> Recipient:
        return cls(load_public_key(text))


@dataclass(frozen=True)
class KeyPair:
    """Our own HPKE key. repr never shows the private half."""

    private_key: X25519PrivateKey = field(repr=False)

    @property
    def recipient(self) -> Recipient:
        return Recipient(self.private_key.public_key())

    @property
    def key_id(self) -> str:
        return self.recipient.key_id

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_b64(cls, text: str) -> KeyPair:
        try:
            return cls(X25519PrivateKey.from_private_bytes(b64d(text.strip())))
        except Exception as exc:
            raise SealingError("not a valid X25519 private key") from exc

    def private_b64(self) -> str:
        return b64e(self.private_key.private_bytes(_RAW, _RAW_PRIV, serialization.NoEncryption()))


def seal(plaintext: bytes, to: Recipient, *, subject: str, message_id: str, bind: tuple[str, ...] = ()) -> Sealed:
    ciphertext = SUITE.encrypt(plaintext, to.public_key, info=info_for(subject, message_id, bind))
    return Sealed(suite=SUITE_NAME, key_id=to.key_id, ciphertext=b64e(ciphertext))


def open_sealed(
    box: Sealed, key: KeyPair, *, subject: str, message_id: str, bind: tuple[str, ...] = ()
) -> bytes:
    if box.key_id != key.key_id:
        raise SealingError(f"sealed to key {box.key_id}, not to ours ({key.key_id})")
    try:
        raw = b64d(box.ciphertext)
    except Exception as exc:
        raise SealingError("ciphertext is not base64url") from exc
    try:
        return SUITE.decrypt(raw, key.private_key, info=info_for(subject, message_id, bind))
    except (InvalidTag, ValueError) as exc:
        raise SealingError("box does not open with our key in this context") from exc


# --- the tokens.issued box ---------------------------------------------------------
def seal_tokens(bundle: TokenBundle, vault: Recipient, *, event_id: str, user_id: str, kind: str) -> Sealed:
    """The `tokens.issued` box: the bundle sealed to the vault, bound to the subject, the
    event id, the person and the kind (relabelling the event makes it unopenable)."""
    return seal(bundle.model_dump_json().encode(), vault, subject=subjects.TOKENS_ISSUED, message_id=event_id,
                bind=issued_binding(user_id, kind))


def open_tokens(event: TokensIssued, key: KeyPair) -> bytes:
    """The plaintext of `event`'s box (a TokenBundle's JSON), if it opens with `key` for this
    event, person and kind; else SealingError. Parsing is the caller's (a validation error
    quotes its input: the tokens)."""
    return open_sealed(event.sealed, key, subject=subjects.TOKENS_ISSUED, message_id=event.event_id,
                       bind=issued_binding(event.user_id, event.kind))


# --- key files ---------------------------------------------------------------
def key_paths(keys_dir: Path, name: str) -> tuple[Path, Path]:
    return keys_dir / f"{name}.hpke.key", keys_dir / f"{name}.hpke.pub"


def load_or_create_keypair(keys_dir: Path, name: str) -> KeyPair:
    """Our key from `<keys_dir>/<name>.hpke.key`, generated on first start (0600)."""
    private_path, public_path = key_paths(keys_dir, name)
    if not private_path.exists():
        write_private_file(private_path, KeyPair.generate().private_b64())
    pair = KeyPair.from_b64(private_path.read_text())
    if not public_path.exists() or public_path.read_text().strip() != pair.recipient.public_b64:
        public_path.write_text(pair.recipient.public_b64 + "\n")
    return pair


def read_public_key(keys_dir: Path, name: str) -> Recipient | None:
    _, public_path = key_paths(keys_dir, name)
    if not public_path.exists():
        return None
    return Recipient.from_b64(public_path.read_text())
