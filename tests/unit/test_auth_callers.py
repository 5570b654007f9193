"""Caller authentication: HS256 or an asymmetric key, `sub` = user id, `exp` required,
`aud`/`iss` when configured (wrong ones are 403, anything that does not verify is 401)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.auth.app import build_verifier
from services.auth.callers import CallerVerifier, algorithms_for_key, load_public_key, mint_caller_token
from services.auth.errors import ForbiddenToken, Unauthorized
from services.auth.settings import AuthSettings
from tests.auth_fixtures import SigningKey

SECRET = "s" * 64
ASYM = ("RS256", "PS256", "ES256", "EdDSA")


def encode(claims: dict, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


async def test_valid_token_gives_the_user() -> None:
    caller = await CallerVerifier(SECRET).verify_header(f"Bearer {mint_caller_token(SECRET, 'user-42')}")
    assert caller.user_id == "user-42"


async def test_scheme_is_case_insensitive_and_trimmed() -> None:
    token = mint_caller_token(SECRET, "user-1")
    assert (await CallerVerifier(SECRET).verify_header(f"  bearer {token} ")).user_id == "user-1"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer not.a.jwt"]
)
async def test_missing_or_malformed_header(header: str | None) -> None:
    with pytest.raises(Unauthorized) as caught:
        await CallerVerifier(SECRET).verify_header(header)
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
        encode({"sub": 42, "exp": int(time.time()) + 60}),
        encode({"sub": "u", "exp": int(time.time()) + 60}, secret=SECRET, algorithm="HS512"),  # other alg
        jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, None, algorithm="none"),  # unsigned
        "a" * 9000,
    ],
)
async def test_rejected_tokens(token: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        await CallerVerifier(SECRET).verify(token)
    assert 'error="invalid_token"' in caught.value.headers["WWW-Authenticate"]


async def test_expired_says_so_without_echoing_the_token() -> None:
    token = encode({"sub": "u", "exp": int(time.time()) - 3600})
    with pytest.raises(Unauthorized) as caught:
        await CallerVerifier(SECRET).verify(token)
    assert "expired" in caught.value.detail
    assert token not in caught.value.detail


async def test_audience_enforced_only_when_configured() -> None:
    with_aud = mint_caller_token(SECRET, "u", audience="ccbridge")
    assert (await CallerVerifier(SECRET).verify(with_aud)).user_id == "u"
    assert (await CallerVerifier(SECRET, audience="ccbridge").verify(with_aud)).user_id == "u"
    with pytest.raises(ForbiddenToken) as missing:
        await CallerVerifier(SECRET, audience="ccbridge").verify(mint_caller_token(SECRET, "u"))
    assert missing.value.status == 403 and "aud" in missing.value.detail
    with pytest.raises(ForbiddenToken):
        await CallerVerifier(SECRET, audience="other").verify(with_aud)


async def test_issuer_enforced_only_when_configured() -> None:
    token = mint_caller_token(SECRET, "u", issuer="https://platform.example")
    assert (await CallerVerifier(SECRET, issuer="https://platform.example").verify(token)).user_id == "u"
    with pytest.raises(ForbiddenToken):
        await CallerVerifier(SECRET, issuer="https://other.example").verify(token)
    with pytest.raises(ForbiddenToken):
        await CallerVerifier(SECRET, issuer="https://platform.example").verify(mint_caller_token(SECRET, "u"))


async def test_forged_token_with_the_right_audience_is_401_not_403() -> None:
    forged = mint_caller_token("f" * 64, "u", audience="other")
    with pytest.raises(Unauthorized):
        await CallerVerifier(SECRET, audience="ccbridge").verify(forged)


def test_repr_hides_the_secret() -> None:
    assert SECRET not in repr(CallerVerifier(SECRET))


# --- asymmetric keys ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [SigningKey.rsa, SigningKey.ec])
async def test_public_key_verifies_its_tokens(make) -> None:
    signer = make()
    verifier = CallerVerifier(public_key=load_public_key(signer.public_pem()), algorithms=ASYM)
    assert (await verifier.verify(signer.token("user-7"))).user_id == "user-7"
    with pytest.raises(Unauthorized):
        await verifier.verify(make().token("user-7"))  # another key
    with pytest.raises(Unauthorized):  # HS256 is refused when no secret is configured
        await verifier.verify(mint_caller_token(SECRET, "user-7"))


async def test_algorithm_confusion_is_refused() -> None:
    """An HS256 token 'signed' with the public key's PEM must never pass."""
    signer = SigningKey.rsa()
    pem = signer.public_pem()
    verifier = CallerVerifier(public_key=load_public_key(pem), algorithms=ASYM)
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "u", "exp": int(time.time()) + 60}).encode())
    sig = b64(hmac.new(pem.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(Unauthorized):
        await verifier.verify(f"{head}.{body}.{sig}")


async def test_secret_and_public_key_together() -> None:
    signer = SigningKey.ec()
    verifier = CallerVerifier(SECRET, public_key=load_public_key(signer.public_pem()), algorithms=ASYM)
    assert (await verifier.verify(signer.token("a"))).user_id == "a"
    assert (await verifier.verify(mint_caller_token(SECRET, "b"))).user_id == "b"


async def test_asymmetric_audience_and_issuer() -> None:
    signer = SigningKey.rsa()
    verifier = CallerVerifier(
        public_key=load_public_key(signer.public_pem()), audience="ccbridge", issuer="https://idp.example",
        algorithms=ASYM,
    )
    good = signer.token("u", aud="ccbridge", iss="https://idp.example")
    assert (await verifier.verify(good)).user_id == "u"
    with pytest.raises(ForbiddenToken):
        await verifier.verify(signer.token("u", aud="elsewhere", iss="https://idp.example"))


def test_public_key_loading(tmp_path) -> None:
    signer = SigningKey.rsa()
    path = tmp_path / "caller.pem"
    path.write_text(signer.public_pem())
    assert load_public_key(str(path)).public_numbers() == signer.private_key.public_key().public_numbers()
    for bad in ("-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n", str(tmp_path / "missing.pem")):
        with pytest.raises(ValueError):
            load_public_key(bad)
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    assert algorithms_for_key(ed, ASYM) == ("EdDSA",)


def test_algorithms_must_fit_the_key() -> None:
    signer = SigningKey.rsa()
    with pytest.raises(ValueError):
        CallerVerifier(public_key=load_public_key(signer.public_pem()), algorithms=("ES256",))
    with pytest.raises(ValueError):
        CallerVerifier()


def test_settings_choose_the_verifier(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("AUTH_JWT_SECRET", "AUTH_JWT_PUBLIC_KEY", "AUTH_JWKS_URL", "AUTH_JWT_ALGORITHMS"):
        monkeypatch.delenv(name, raising=False)
    used: list[str] = []

    def dev() -> str:
        used.append("dev")
        return "d" * 40

    assert "hs256" in repr(build_verifier(AuthSettings(data_dir=tmp_path), dev)) and used == ["dev"]
    signer = SigningKey.rsa()
    only_key = build_verifier(AuthSettings(data_dir=tmp_path, jwt_public_key=signer.public_pem()), dev)
    assert "public_key" in repr(only_key) and "hs256" not in repr(only_key) and used == ["dev"]
    with pytest.raises(ValueError):
        AuthSettings(jwt_algorithms="HS256")
    with pytest.raises(ValueError):
        AuthSettings(jwks_url="file:///etc/passwd")
