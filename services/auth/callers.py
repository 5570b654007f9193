"""Who is calling: HS256 JWTs minted by the platform for its users (`sub` = user id)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

from services.auth.errors import Unauthorized

ALGORITHM = "HS256"
_USER_ID_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")  # shared.events.UserId


@dataclass(frozen=True)
class Caller:
    user_id: str


class CallerVerifier:
    def __init__(self, secret: str, *, audience: str | None = None, leeway_s: float = 30.0) -> None:
        self._secret = secret
        self._audience = audience
        self._leeway = leeway_s

    def __repr__(self) -> str:
        return f"CallerVerifier(audience={self._audience!r})"

    def verify_header(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthorized("Missing Authorization header: send `Authorization: Bearer <token>`.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("The Authorization header must be `Bearer <token>`.")
        return self.verify(token.strip())

    def verify(self, token: str) -> Caller:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("The bearer token has expired.") from None
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token is not valid.") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _USER_ID_RE.fullmatch(sub):
            raise Unauthorized("The bearer token has no usable `sub`.")
        return Caller(user_id=sub)


def mint_caller_token(secret: str, user_id: str, *, ttl_s: int = 600, audience: str | None = None) -> str:
    """What a platform does for its user; used by tests and tools."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
