"""Caller authentication: HS256 JWT, `sub` = user id, `exp` required."""

from __future__ import annotations

import time

import jwt
import pytest

from services.auth.callers import CallerVerifier, mint_caller_token
from services.auth.errors import Unauthorized

SECRET = "s" * 64


def encode(claims: dict, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_valid_token_gives_the_user() -> None:
    caller = CallerVerifier(SECRET).verify_header(f"Bearer {mint_caller_token(SECRET, 'user-42')}")
    assert caller.user_id == "user-42"


def test_scheme_is_case_insensitive_and_trimmed() -> None:
    token = mint_caller_token(SECRET, "user-1")
    assert CallerVerifier(SECRET).verify_header(f"  bearer {token} ").user_id == "user-1"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "Bearer not.a.jwt",
    ],
)
def test_missing_or_malformed_header(header: str | None) -> None:
    with pytest.raises(Unauthorized) as caught:
        CallerVerifier(SECRET).verify_header(header)
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "token",
    [
        encode({"sub": "u", "exp": int(time.time()) + 60}, secret="x" * 64),  # wrong key
        encode({"sub": "u"}),  # no exp
        encode({"exp": int(time.time()) + 60}),  # no sub
        encode({"sub": "u", "exp": int(time.time()) - 3600}),  # expired
        encode({"sub": "u", "exp": int(time.time()) + 60, "nbf": int(time.time()) + 3600}),  # not yet valid
        encode({"sub": "", "exp": int(time.time()) + 60}),
        encode({"sub": "a\nb", "exp": int(time.time()) + 60}),
        encode({"sub": "u" * 300, "exp": int(time.time()) + 60}),
        encode({"sub": "u", "exp": int(time.time()) + 60}, secret=SECRET, algorithm="HS512"),  # other alg
        jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, None, algorithm="none"),  # unsigned
    ],
)
def test_rejected_tokens(token: str) -> None:
    with pytest.raises(Unauthorized):
        CallerVerifier(SECRET).verify(token)


def test_expired_says_so_without_echoing_the_token() -> None:
    token = encode({"sub": "u", "exp": int(time.time()) - 3600})
    with pytest.raises(Unauthorized) as caught:
        CallerVerifier(SECRET).verify(token)
    assert "expired" in caught.value.detail
    assert token not in caught.value.detail


def test_audience_enforced_only_when_configured() -> None:
    with_aud = mint_caller_token(SECRET, "u", audience="ccbridge")
    assert CallerVerifier(SECRET).verify(with_aud).user_id == "u"
    assert CallerVerifier(SECRET, audience="ccbridge").verify(with_aud).user_id == "u"
    with pytest.raises(Unauthorized):
        CallerVerifier(SECRET, audience="ccbridge").verify(mint_caller_token(SECRET, "u"))
    with pytest.raises(Unauthorized):
        CallerVerifier(SECRET, audience="other").verify(with_aud)


def test_repr_hides_the_secret() -> None:
    assert SECRET not in repr(CallerVerifier(SECRET))
