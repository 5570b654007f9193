"""Grants: a person's signed permission for ONE sandbox to hold their Claude credentials.

Auth signs a grant (compact JWS, EdDSA/Ed25519, PyJWT) when the person — through the platform,
with their caller token — asks for it; the platform puts it into `sandbox.created`; the sandbox
service passes it along with its credentials request; the vault verifies it before it seals
anything. Claims: `iss`, `aud`, `sub` (user id), `sbx` (sandbox id), `mode` (the strongest
credential mode allowed), `iat`, `exp`, `jti`.

This module is the contract both ends share: the claims, the mode order, signing (auth's
private key) and verifying (the vault's set of auth public keys, by `kid`, so auth's key can be
rotated: trust the new public key, then switch auth over).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.files import write_private_file
from shared.sealing import b64d, b64e

ALGORITHM = "EdDSA"
TOKEN_TYPE = "ccbridge-grant+jwt"
ISSUER = "ccbridge-auth"
AUDIENCE = "ccbridge-vault"
KEY_NAME = "auth.grant"
UNTRUSTED_KEY = "signed by a key the vault does not trust"
EXPIRED = "grant expired"
MAX_TTL_S = 31 * 24 * 3600
"""No grant outlives a login (~30 days), whatever a signer asks for."""

# access_only and env carry the access token only; file also the refresh token (the whole login).
MODE_STRENGTH: dict[str, int] = {"access_only": 0, "env": 1, "file": 2}

GrantMode = Literal["access_only", "env", "file"]


def mode_allows(granted: str, requested: str) -> bool:
    """Whether a grant for `granted` covers a request for `requested`."""
    return MODE_STRENGTH.get(requested, 99) <= MODE_STRENGTH.get(granted, -1)


class GrantError(Exception):
    """The grant is not valid here. `detail` names the check that failed, never a secret."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class GrantClaims(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    iss: str = Field(max_length=128)
    aud: str = Field(max_length=128)
    sub: str = Field(min_length=1, max_length=256)
    sbx: str = Field(min_length=1, max_length=128)
    mode: GrantMode
    # milliseconds in a NumericDate (RFC 7519 allows fractions): two grants for one sandbox
    # signed in the same second must still be ordered, and a lease's end compared exactly
    iat: float = Field(ge=0)
    exp: int = Field(ge=0)
    jti: str = Field(min_length=8, max_length=64)

    @property
    def iat_ms(self) -> int:
        return round(self.iat * 1000)

    @property
    def exp_ms(self) -> int:
        return self.exp * 1000

    def newer_than(self, iat_ms: int, jti: str) -> bool:
        """The newest grant wins; of two signed in the same millisecond, the larger jti (stable)."""
        return (self.iat_ms, self.jti) > (iat_ms, jti)


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_b64(public_key: Ed25519PublicKey) -> str:
    return b64e(public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(b64d(text.strip()))
    except Exception as exc:
        raise GrantError("not an Ed25519 public key") from exc


@dataclass(frozen=True)
class GrantSigner:
    """Auth's grant key. repr never shows the private half."""

    private_key: Ed25519PrivateKey = field(repr=False)
    issuer: str = ISSUER

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def kid(self) -> str:
        return key_id_of(self.public_key)

    @property
    def public_b64(self) -> str:
        return public_b64(self.public_key)

    @classmethod
    def generate(cls) -> GrantSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_b64(cls, text: str) -> GrantSigner:
        try:
            return cls(Ed25519PrivateKey.from_private_bytes(b64d(text.strip())))
        except Exception as exc:
            raise GrantError("not an Ed25519 private key") from exc

    def private_b64(self) -> str:
        return b64e(
            self.private_key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        )

    def sign(self, *, user_id: str, sandbox_id: str, mode: str, ttl_s: int, now_s: float) -> tuple[str, GrantClaims]:
        claims = GrantClaims(
            iss=self.issuer, aud=AUDIENCE, sub=user_id, sbx=sandbox_id, mode=mode,
            iat=round(now_s, 3), exp=int(now_s) + ttl_s, jti=uuid.uuid4().hex,
        )
        token = jwt.encode(
            claims.model_dump(), self.private_key, algorithm=ALGORITHM, headers={"kid": self.kid, "typ": TOKEN_TYPE}
        )
        return token, claims


class GrantVerifier:
    """Checks a grant's signature against auth's trusted public keys (by `kid`) and its claims
    against a request. Times are checked by the caller's clock (`now_s`), not PyJWT's."""

    def __init__(self, public_keys: Iterable[Ed25519PublicKey], *, issuer: str = ISSUER, leeway_s: int = 30,
                 max_ttl_s: int = MAX_TTL_S) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {key_id_of(k): k for k in public_keys}
        self._issuer = issuer
        self._leeway = leeway_s
        self._max_ttl = max_ttl_s

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"GrantVerifier(kids={sorted(self._keys)})"

    def verify(self, token: str, *, now_s: float, allow_expired: bool = False) -> GrantClaims:
        """The claims of a genuine, current grant; `GrantError` otherwise. `allow_expired`: the
        caller checks expiry itself (the vault does, against the newest grant it knows)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise GrantError("not a JWS") from None
        if header.get("alg") != ALGORITHM or header.get("typ") != TOKEN_TYPE:
            raise GrantError("not a ccbridge grant (alg/typ)")
        key = self._keys.get(str(header.get("kid", "")))
        if key is None:
            raise GrantError(UNTRUSTED_KEY)
        try:
            payload: Mapping[str, Any] = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=self._issuer,
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                         "require": ["iss", "aud", "sub", "iat", "exp", "jti"]},
            )
        except jwt.InvalidSignatureError:
            raise GrantError("bad signature") from None
        except jwt.PyJWTError as exc:
            raise GrantError(f"invalid grant ({type(exc).__name__})") from None
        try:
            claims = GrantClaims.model_validate(payload)
        except ValidationError:
            raise GrantError("grant claims malformed") from None
        if claims.iat > now_s + self._leeway:
            raise GrantError("grant issued in the future")
        if claims.exp - claims.iat > self._max_ttl or claims.exp <= claims.iat:
            raise GrantError("grant lifetime out of bounds")
        if claims.exp <= now_s and not allow_expired:
            raise GrantError(EXPIRED)
        return claims

    def check(self, token: str, *, user_id: str, sandbox_id: str | None, mode: str, now_s: float) -> GrantClaims:
        """`verify`, then: for this person, for this sandbox, and the mode within the grant."""
        claims = self.verify(token, now_s=now_s)
        if claims.sub != user_id:
            raise GrantError("grant is for another person")
        if sandbox_id is None or claims.sbx != sandbox_id:
            raise GrantError("grant is for another sandbox")
        if not mode_allows(claims.mode, mode):
            raise GrantError(f"mode {mode} is not within the grant ({claims.mode})")
        return claims


def unverified_issued_at_ms(token: str) -> int | None:
    """A grant's `iat` (ms) WITHOUT checking its signature — only for ordering a grant the vault
    has already accepted against a lease end (never to decide whether credentials may leave)."""
    try:
        value = jwt.decode(token, options={"verify_signature": False}).get("iat")
    except jwt.PyJWTError:
        return None
    return round(value * 1000) if isinstance(value, int | float) and not isinstance(value, bool) else None


# --- keys ----------------------------------------------------------------------------
def key_paths(keys_dir: Path) -> tuple[Path, Path]:
    return keys_dir / f"{KEY_NAME}.key", keys_dir / f"{KEY_NAME}.pub"


def load_or_create_signer(keys_dir: Path) -> GrantSigner:
    """Auth's grant key from `<keys_dir>/auth.grant.key`, generated on first start (0600); the
    public half is kept in `auth.grant.pub` for a vault that shares the data dir."""
    private_path, public_path = key_paths(keys_dir)
    if not private_path.exists():
        write_private_file(private_path, GrantSigner.generate().private_b64())
    signer = GrantSigner.from_b64(private_path.read_text())
    publish_public_key(keys_dir, signer)
    return signer


def publish_public_key(keys_dir: Path, signer: GrantSigner) -> None:
    _, public_path = key_paths(keys_dir)
    if not public_path.exists() or public_path.read_text().strip() != signer.public_b64:
        public_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        public_path.write_text(signer.public_b64 + "\n")


def trusted_public_keys(env_value: str | None, keys_dir: Path | None) -> list[Ed25519PublicKey]:
    """The vault's trust: comma-separated base64url keys (a bad one is a configuration error),
    plus `<keys_dir>/auth.grant.pub` when present."""
    keys = [load_public_key(item) for item in (p.strip() for p in (env_value or "").split(",")) if item]
    if keys_dir is not None:
        _, public_path = key_paths(keys_dir)
        if public_path.exists():
            keys.append(load_public_key(public_path.read_text()))
    return keys


__all__ = [
    "GrantClaims",
    "GrantError",
    "GrantSigner",
    "GrantVerifier",
    "MODE_STRENGTH",
    "load_or_create_signer",
    "mode_allows",
    "trusted_public_keys",
]
