"""Grants over real HTTP and a real nats-server: the JWS verifies with shared.grants against the
public key auth leaves in <data>/keys/auth.grant.pub; grants.issued (JetStream, Nats-Msg-Id =
event_id) carries the very grant the caller got; the live list comes from `vault.grants.list`
(a vault stand-in that learns leases from what auth publishes); nobody lists or ends another
person's lease; AUTH_GRANT_PRIVATE_KEY replaces the key file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.auth.app import AuthService
from shared import subjects
from shared.events import GrantIssued
from shared.grants import GrantSigner, GrantVerifier, key_paths, trusted_public_keys
from shared.sealing import KeyPair
from standins.oauth import OAuthStandin
from tests.auth_fixtures import (
    VaultResponder,
    assert_problem,
    bearer,
    new_user,
    settings_for,
)

GRANTS = "/v1/claude-code/grants"


@pytest.fixture
async def auth(nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair) -> AsyncIterator[AuthService]:
    async with AuthService(settings_for(nats_url, tmp_path, standin, vault_key, grant_max_ttl_s=2 * 86_400)) as service:
        yield service


async def test_a_grant_verifies_against_auth_grant_pub_and_reaches_the_vault(
    auth: AuthService, nats_url: str, tmp_path: Path, http: httpx.AsyncClient, vault_responder: VaultResponder
) -> None:
    private, public = key_paths(tmp_path / "keys")
    assert private.stat().st_mode & 0o777 == 0o600 and public.exists()
    seen: asyncio.Queue = asyncio.Queue()
    nc = await nats.connect(nats_url)
    try:
        async def on_msg(msg) -> None:
            await seen.put(msg)

        await nc.jetstream().subscribe(subjects.GRANTS_ISSUED, cb=on_msg, ordered_consumer=True,
                                       config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))
        user = new_user()
        response = await http.post(f"{auth.base_url}{GRANTS}", headers=bearer(user),
                                   json={"sandbox_id": "sbx-int-1", "mode": "file", "ttl_s": 3600})
        assert response.status_code == 201, response.text
        body = response.json()

        # what a vault sharing the data dir trusts: <data>/keys/auth.grant.pub
        verifier = GrantVerifier(trusted_public_keys(None, tmp_path / "keys"))
        claims = verifier.check(body["grant"], user_id=user, sandbox_id="sbx-int-1", mode="file", now_s=time.time())
        assert (claims.sub, claims.sbx, claims.mode) == (user, "sbx-int-1", "file")
        assert claims.exp - int(claims.iat) == 3600 and abs(claims.iat - time.time()) < 30
        assert body["expires_at"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(claims.exp)))

        async def mine() -> nats.aio.msg.Msg:
            while True:
                msg = await seen.get()
                if GrantIssued.model_validate_json(msg.data).user_id == user:
                    return msg

        msg = await asyncio.wait_for(mine(), 10)
        event = GrantIssued.model_validate_json(msg.data)
        assert event.grant == body["grant"] and event.sandbox_id == "sbx-int-1"
        assert msg.headers["Nats-Msg-Id"] == event.event_id
    finally:
        await nc.close()

    await vault_responder.wait_for(lambda: (user, "sbx-int-1") in vault_responder.leases)
    listed = (await http.get(f"{auth.base_url}{GRANTS}", headers=bearer(user))).json()
    assert [(g["sandbox_id"], g["mode"]) for g in listed["grants"]] == [("sbx-int-1", "file")]
    assert listed["grants"][0]["expires_at"] == body["expires_at"].replace("+00:00", "Z")
    assert vault_responder.grant_requests[-1].user_id == user


async def test_nobody_lists_or_ends_another_persons_lease(
    auth: AuthService, http: httpx.AsyncClient, vault_responder: VaultResponder
) -> None:
    owner, intruder = new_user(), new_user()
    assert (await http.post(f"{auth.base_url}{GRANTS}", headers=bearer(owner),
                            json={"sandbox_id": "sbx-shared-name"})).status_code == 201
    await vault_responder.wait_for(lambda: (owner, "sbx-shared-name") in vault_responder.leases)

    assert (await http.get(f"{auth.base_url}{GRANTS}", headers=bearer(intruder))).json() == {"grants": []}
    ended = await http.delete(f"{auth.base_url}{GRANTS}/sbx-shared-name", headers=bearer(intruder))
    assert ended.status_code == 204
    await vault_responder.wait_for(lambda: any(e.user_id == intruder for e in vault_responder.grants_revoked))
    [event] = [e for e in vault_responder.grants_revoked if e.sandbox_id == "sbx-shared-name"]
    assert (event.user_id, event.reason) == (intruder, "grant_ended")
    owned = (await http.get(f"{auth.base_url}{GRANTS}", headers=bearer(owner))).json()["grants"]
    assert [g["sandbox_id"] for g in owned] == ["sbx-shared-name"]  # the owner's lease is untouched

    for _ in range(2):  # the owner ends it; again is fine
        assert (await http.delete(f"{auth.base_url}{GRANTS}/sbx-shared-name", headers=bearer(owner))).status_code == 204
    await vault_responder.wait_for(lambda: (owner, "sbx-shared-name") not in vault_responder.leases)
    assert (await http.get(f"{auth.base_url}{GRANTS}", headers=bearer(owner))).json() == {"grants": []}


async def test_asking_again_replaces_the_lease(
    auth: AuthService, http: httpx.AsyncClient, vault_responder: VaultResponder
) -> None:
    user = new_user()
    long = (await http.post(f"{auth.base_url}{GRANTS}", headers=bearer(user),
                            json={"sandbox_id": "sbx-renew", "ttl_s": 86_400})).json()
    await asyncio.sleep(1.1)  # iat has one-second resolution: the second grant is strictly newer
    short = (await http.post(f"{auth.base_url}{GRANTS}", headers=bearer(user),
                             json={"sandbox_id": "sbx-renew", "ttl_s": 600})).json()
    assert short["expires_at"] < long["expires_at"]
    await vault_responder.wait_for(lambda: len([e for e in vault_responder.grants_issued if e.user_id == user]) == 2)
    [lease] = (await http.get(f"{auth.base_url}{GRANTS}", headers=bearer(user))).json()["grants"]
    assert lease["expires_at"] == short["expires_at"].replace("+00:00", "Z")


async def test_limits_and_bad_input(auth: AuthService, http: httpx.AsyncClient) -> None:
    user = new_user()
    over = await http.post(f"{auth.base_url}{GRANTS}", headers=bearer(user),
                           json={"sandbox_id": "sbx-1", "ttl_s": 2 * 86_400 + 1})
    body = assert_problem(over, 422, "invalid-request")
    assert body["errors"][0]["loc"] == ["body", "ttl_s"] and str(2 * 86_400) in body["detail"]
    assert_problem(await http.post(f"{auth.base_url}{GRANTS}", headers=bearer(user), json={"sandbox_id": "../x"}),
                   422, "invalid-request")
    assert_problem(await http.delete(f"{auth.base_url}{GRANTS}/%2E%2E", headers=bearer(user)), 422, "invalid-request")
    assert_problem(await http.get(f"{auth.base_url}{GRANTS}"), 401, "unauthorized")
    ready = (await http.get(f"{auth.base_url}/readyz")).json()
    assert ready["checks"]["grant_key"] is True


async def test_a_silent_vault_is_503(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    async with VaultResponder(nats_url, mode="silent"), AuthService(
        settings_for(nats_url, tmp_path, standin, vault_key, vault_timeout=0.3)
    ) as service:
        response = await http.get(f"{service.base_url}{GRANTS}", headers=bearer(new_user()))
        assert_problem(response, 503, "vault-unavailable")
        assert response.headers["retry-after"]
    async with VaultResponder(nats_url, mode="garbage"), AuthService(
        settings_for(nats_url, tmp_path, standin, vault_key, vault_timeout=2)
    ) as service:
        assert_problem(await http.get(f"{service.base_url}{GRANTS}", headers=bearer(new_user())), 502,
                       "vault-bad-reply")


async def test_the_grant_key_can_come_from_the_environment(
    nats_url: str, tmp_path: Path, standin: OAuthStandin, vault_key: KeyPair, http: httpx.AsyncClient
) -> None:
    signer = GrantSigner.generate()
    settings = settings_for(nats_url, tmp_path, standin, vault_key, grant_private_key=signer.private_b64())
    assert signer.private_b64() not in repr(settings)
    async with AuthService(settings) as service:
        user = new_user()
        body = (await http.post(f"{service.base_url}{GRANTS}", headers=bearer(user),
                                json={"sandbox_id": "sbx-env"})).json()
    claims = GrantVerifier([signer.public_key]).verify(body["grant"], now_s=time.time())
    assert claims.sub == user and claims.exp - int(claims.iat) == 86_400
    assert not key_paths(tmp_path / "keys")[0].exists()  # nothing written with the env key
