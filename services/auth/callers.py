"""Who is calling: JWTs minted by the platform for its users (`sub` = user id).

Three ways to check them, chosen by the token's `alg` header:
- HS256 with a shared secret (AUTH_JWT_SECRET, or the dev secret file);
- an asymmetric algorithm (RS*/PS*/ES*/EdDSA, AUTH_JWT_ALGORITHMS) with a fixed public key
  (AUTH_JWT_PUBLIC_KEY) or the issuer's JWKS (AUTH_JWKS_URL, PyJWKClient: cached key set, one
  forced refresh per cooldown for an unknown `kid`).
Every token needs `exp` and `sub`; `aud`/`iss` are enforced when configured. A token that does
not verify is a 401; a genuine token for another audience/issuer is a 403.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.auth.errors import CallerKeysUnavailable, ForbiddenToken, Unauthorized
from shared.logging import get_logger

log = get_logger(__name__)

ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 8192
_USER_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")  # shared.events.UserId
_FAMILIES: dict[type, tuple[str, ...]] = {
    rsa.RSAPublicKey: ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    ec.EllipticCurvePublicKey: ("ES256", "ES384", "ES512"),
    ed25519.Ed25519PublicKey: ("EdDSA",),
    ed448.Ed448PublicKey: ("EdDSA",),
}


@dataclass(frozen=True)
class Caller:
    user_id: str


def load_public_key(value: str) -> Any:
    """PEM text, or the path of a PEM file. Raises ValueError with a readable reason."""
    text = value.strip()
    if not text.startswith("-----BEGIN"):
        try:
            text = Path(text).expanduser().read_text()
        except OSError as exc:
            raise ValueError(f"AUTH_JWT_PUBLIC_KEY is neither PEM text nor a readable file ({type(exc).__name__})") from None
    try:
        key = load_pem_public_key(text.encode())
    except ValueError:
        raise ValueError("AUTH_JWT_PUBLIC_KEY is not a PEM public key") from None
    if not isinstance(key, tuple(_FAMILIES)):
        raise ValueError("AUTH_JWT_PUBLIC_KEY must be an RSA, EC or Ed25519/Ed448 public key")
    return key


def algorithms_for_key(key: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    for family, names in _FAMILIES.items():
        if isinstance(key, family):
            return tuple(name for name in allowed if name in names)
    return ()


class JwksKeys:
    """The issuer's key set over HTTP (PyJWKClient, blocking urllib → run in a thread)."""

    def __init__(self, url: str, *, cache_s: float = 300.0, timeout: float = 5.0, cooldown_s: float = 30.0) -> None:
        self.url = url
        self._client = jwt.PyJWKClient(
            url, cache_jwk_set=True, lifespan=cache_s, timeout=timeout, cooldown_duration=cooldown_s,
            headers={"User-Agent": "ccbridge-auth/0.1", "Accept": "application/json"},
        )

    def __repr__(self) -> str:
        return f"JwksKeys(url={self.url!r})"

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        if not kid:
            raise Unauthorized("The bearer token names no key (no kid header), which the JWKS needs.", token_sent=True)
        return await asyncio.to_thread(self._key_for, kid)

    def _key_for(self, kid: str) -> jwt.PyJWK:
        try:
            return self._client.get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            log.warning("JWKS unreachable", url=self.url, error_type=type(exc).__name__)
            raise CallerKeysUnavailable() from None
        except jwt.PyJWKClientError as exc:
            if "Unable to find a signing key" in str(exc):
                raise Unauthorized("The bearer token was signed with a key the issuer does not publish.",
                                   token_sent=True) from None
            log.warning("JWKS unusable", url=self.url, error_type=type(exc).__name__)
            raise CallerKeysUnavailable() from None
        except Exception as exc:  # noqa: BLE001 - JSON/parse errors of the key set: not the caller's fault
            log.warning("JWKS unusable", url=self.url, error_type=type(exc).__name__)
            raise CallerKeysUnavailable() from None


class CallerVerifier:
    def __init__(
        self,
        secret: str | None = None,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 30.0,
        public_key: Any = None,
        jwks: JwksKeys | None = None,
        algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA"),
    ) -> None:
        if secret is None and public_key is None and jwks is None:
            raise ValueError("a caller verifier needs a secret, a public key or a JWKS")
        self._secret = secret
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway_s
        self._public_key = public_key
        self._public_algorithms = algorithms_for_key(public_key, algorithms) if public_key is not None else ()
        if public_key is not None and not self._public_algorithms:
            raise ValueError("AUTH_JWT_ALGORITHMS allows no algorithm for the type of AUTH_JWT_PUBLIC_KEY")
        self._jwks = jwks
        self._algorithms = algorithms

    def __repr__(self) -> str:
        modes = [m for m, on in (("hs256", self._secret), ("public_key", self._public_key), ("jwks", self._jwks)) if on]
        return f"CallerVerifier(modes={modes}, audience={self._audience!r}, issuer={self._issuer!r})"

    async def verify_header(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthorized("Missing Authorization header: send Authorization: Bearer <token>.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("The Authorization header must be Bearer <token>.")
        return await self.verify(token.strip())

    async def verify(self, token: str) -> Caller:
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("The bearer token is not valid.", token_sent=True)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token is not valid.", token_sent=True) from None
        alg = header.get("alg")
        if alg == ALGORITHM and self._secret is not None:
            return self._decode(token, self._secret, [ALGORITHM])
        if isinstance(alg, str) and alg in self._algorithms:
            kid = header.get("kid")
            if self._public_key is not None and (self._jwks is None or not kid):
                return self._decode(token, self._public_key, list(self._public_algorithms))
            if self._jwks is not None:
                key = await self._jwks.key_for(kid if isinstance(kid, str) else None)
                return self._decode(token, key, list(self._algorithms))
        raise Unauthorized("The bearer token uses a signing algorithm this service does not accept.", token_sent=True)

    def _decode(self, token: str, key: Any, algorithms: list[str]) -> Caller:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The bearer token has expired.", token_sent=True) from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("The bearer token is not valid yet.", token_sent=True) from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            # Claims are checked after the signature: this token is genuine, just not for us.
            raise ForbiddenToken() from None
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim in ("aud", "iss"):
                raise ForbiddenToken(f"The bearer token has no {exc.claim} claim; this service requires one.") from None
            raise Unauthorized(f"The bearer token has no {exc.claim} claim.", token_sent=True) from None
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token is not valid.", token_sent=True) from None
        except Exception:  # noqa: BLE001 - a key/algorithm mismatch deep in cryptography: still just invalid
            raise Unauthorized("The bearer token is not valid.", token_sent=True) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _USER_ID_RE.fullmatch(sub):
            raise Unauthorized("The bearer token has no usable sub claim.", token_sent=True)
        return Caller(user_id=sub)


def mint_caller_token(
    secret: str, user_id: str, *, ttl_s: int = 600, audience: str | None = None, issuer: str | None = None
) -> str:
    """What a platform does for its user; used by tests and tools."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
