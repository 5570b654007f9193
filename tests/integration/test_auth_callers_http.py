"""Caller authentication over real HTTP: HS256 with audience/issuer, a PEM public key, and a
JWKS served by a real HTTP server (PyJWKClient fetches it), including rotation, an unknown
`kid` flood, and the JWKS being down."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from services.auth.app import AuthService
from services.auth.callers import mint_caller_token
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.auth_fixtures import (
    JWT_SECRET,
    SigningKey,
    assert_problem,
    bearer,
    new_user,
    serving,
    settings_for,
)

REPO = Path(__file__).resolve().parents[2]


class Jwks:
    """The platform's IdP: publishes its keys at /.well-known/jwks.json and counts fetches."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.broken = False
        self.app = FastAPI()

        @self.app.get("/.well-known/jwks.json")
        async def jwks() -> JSONResponse:
            self.fetches += 1
            if self.broken:
                return JSONResponse({"error": "down"}, status_code=500)
            return JSONResponse({"keys": [key.jwk() for key in self.keys]})


async def login(http: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> httpx.Response:
    return await http.post(f"{base_url}/v1/claude-code/login", headers=headers)


async def test_hs256_audience_and_issuer_over_http(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    settings = settings_for(nats_url, tmp_path, standin, vault_key, jwt_audience="ccbridge",
                            jwt_issuer="https://platform.example")
    async with AuthService(settings) as auth:
        user = new_user()
        good = bearer(user, audience="ccbridge", issuer="https://platform.example")
        assert (await login(http, auth.base_url, good)).status_code == 201
        for headers in (
            bearer(user, audience="elsewhere", issuer="https://platform.example"),
            bearer(user, audience="ccbridge", issuer="https://evil.example"),
            bearer(user),
        ):
            assert_problem(await login(http, auth.base_url, headers), 403, "forbidden-token")
        forged = bearer(user, secret="forged-secret-" + "f" * 40, audience="ccbridge", issuer="https://platform.example")
        response = await login(http, auth.base_url, forged)
        assert_problem(response, 401, "unauthorized")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        expired = {"Authorization": "Bearer " + mint_caller_token(JWT_SECRET, user, ttl_s=-600, audience="ccbridge",
                                                                  issuer="https://platform.example")}
        body = assert_problem(await login(http, auth.base_url, expired), 401, "unauthorized")
        assert "expired" in body["detail"]
        metrics = (await http.get(f"{auth.base_url}/metrics")).text
        assert 'ccbridge_auth_rejections_total{reason="forbidden_token"} 3.0' in metrics
        assert 'ccbridge_auth_rejections_total{reason="unauthorized"} 2.0' in metrics


async def test_pem_public_key_over_http(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    signer = SigningKey.ec()
    pem_file = tmp_path / "platform.pem"
    pem_file.write_text(signer.public_pem())
    settings = settings_for(nats_url, tmp_path, standin, vault_key, jwt_secret=None, jwt_public_key=str(pem_file),
                            state_secret="state-secret-" + "s" * 40)
    async with AuthService(settings) as auth:
        user = new_user()
        assert (await login(http, auth.base_url, signer.bearer(user, with_kid=False))).status_code == 201
        assert_problem(await login(http, auth.base_url, SigningKey.ec().bearer(user)), 401, "unauthorized")
        assert_problem(await login(http, auth.base_url, bearer(user)), 401, "unauthorized")  # HS256: no secret here
    assert not (settings.keys_dir / "auth-jwt.secret").exists()  # no dev secret was needed


@pytest.fixture
async def idp() -> AsyncIterator[tuple[Jwks, str]]:
    jwks = Jwks(SigningKey.rsa(), SigningKey.ec())
    async with serving(jwks.app) as base:
        yield jwks, f"{base}/.well-known/jwks.json"


async def test_jwks_keys_rotation_and_unknown_kids(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient,
    idp: tuple[Jwks, str],
) -> None:
    jwks, url = idp
    settings = settings_for(nats_url, tmp_path, standin, vault_key, jwt_secret=None, jwks_url=url,
                            jwt_audience="ccbridge", state_secret="state-secret-" + "s" * 40)
    async with AuthService(settings) as auth:
        user = new_user()
        for key in jwks.keys:
            assert (await login(http, auth.base_url, key.bearer(user, aud="ccbridge"))).status_code == 201
        assert jwks.fetches == 1  # cached
        assert_problem(await login(http, auth.base_url, jwks.keys[0].bearer(user, aud="other")), 403, "forbidden-token")
        assert_problem(await login(http, auth.base_url, jwks.keys[0].bearer(user, with_kid=False, aud="ccbridge")),
                       401, "unauthorized")

        stranger = SigningKey.rsa()  # not published: a flood of unknown kids costs at most one refetch
        for _ in range(5):
            assert_problem(await login(http, auth.base_url, stranger.bearer(user, aud="ccbridge")), 401, "unauthorized")
        assert jwks.fetches <= 2


async def test_jwks_rotation_is_picked_up(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient,
    idp: tuple[Jwks, str],
) -> None:
    jwks, url = idp
    settings = settings_for(nats_url, tmp_path, standin, vault_key, jwt_secret=None, jwks_url=url,
                            jwks_cooldown_s=0, state_secret="state-secret-" + "s" * 40)
    async with AuthService(settings) as auth:
        user = new_user()
        assert (await login(http, auth.base_url, jwks.keys[0].bearer(user))).status_code == 201
        rotated = SigningKey.ec()
        jwks.keys.append(rotated)
        assert (await login(http, auth.base_url, rotated.bearer(user))).status_code == 201


async def test_jwks_down_is_503_not_401(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient,
    idp: tuple[Jwks, str],
) -> None:
    jwks, url = idp
    jwks.broken = True
    settings = settings_for(nats_url, tmp_path, standin, vault_key, jwt_secret=None, jwks_url=url,
                            state_secret="state-secret-" + "s" * 40, jwks_timeout=2)
    async with AuthService(settings) as auth:
        response = await login(http, auth.base_url, jwks.keys[0].bearer(new_user()))
        assert_problem(response, 503, "caller-keys-unavailable")
        assert response.headers["retry-after"] == "5"
        jwks.broken = False
        assert (await login(http, auth.base_url, jwks.keys[0].bearer(new_user()))).status_code == 201


def test_a_bad_public_key_stops_the_process_with_a_message(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "OAUTH_", "VAULT_"))},
        "CCBRIDGE_DATA_DIR": str(tmp_path),
        "NATS_URL": "nats://127.0.0.1:1",
        "AUTH_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----",
    }
    done = subprocess.run([sys.executable, "-m", "services.auth"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "AUTH_JWT_PUBLIC_KEY" in done.stderr and "Traceback" not in done.stderr
