"""Grants with hand-written fakes: the use cases (sign, publish, list, end) and the three routes
over ASGI — status codes, problem+json, least authority (only ever the caller's own leases)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.auth.adapters.pending_store import InMemoryPendingStore
from services.auth.app import build_api
from services.auth.callers import CallerVerifier, mint_caller_token
from services.auth.connections import ConnectionService
from services.auth.errors import BusUnavailable, InvalidGrantRequest, VaultBadReply
from services.auth.grants import GrantPolicy, GrantService
from services.auth.limits import Limit, RateLimiter
from services.auth.login import LoginPolicy, LoginService
from services.auth.metrics import AuthMetrics
from services.auth.problems import PROBLEM_CONTENT_TYPE
from services.auth.routes import AuthComponents
from shared import subjects
from shared.events import GrantIssued, GrantRevoked
from shared.grants import MAX_TTL_S, GrantSigner, GrantVerifier
from shared.sealing import KeyPair
from tests.auth_fixtures import (
    FakeClock,
    FakeOAuth,
    FakePublisher,
    FakeVaultGrants,
    FakeVaultKeys,
    FakeVaultStatus,
    a_grant,
    assert_problem,
)

SECRET = "unit-test-secret-" + "g" * 32


@dataclass
class World:
    service: GrantService
    signer: GrantSigner
    publisher: FakePublisher
    vault: FakeVaultGrants
    clock: FakeClock

    def verify(self, token: str):
        return GrantVerifier([self.signer.public_key]).verify(token, now_s=self.clock().timestamp())


@pytest.fixture
def world() -> World:
    signer, publisher, vault, clock = GrantSigner.generate(), FakePublisher(), FakeVaultGrants(), FakeClock()
    service = GrantService(signer=signer, publisher=publisher, vault=vault, clock=clock,
                           policy=GrantPolicy(max_ttl_s=7 * 86_400))
    return World(service, signer, publisher, vault, clock)


# --- use cases ----------------------------------------------------------------------------------
async def test_issue_signs_for_the_caller_and_publishes_the_same_grant(world: World) -> None:
    issued = await world.service.issue("user-1", "sbx-1", "env", 3600)
    claims = world.verify(issued.token)
    now = world.clock().timestamp()
    assert (claims.sub, claims.sbx, claims.mode, claims.iat, claims.exp) == (
        "user-1", "sbx-1", "env", round(now, 3), int(now) + 3600)
    assert issued.expires_at == world.clock() + timedelta(hours=1)
    [(subject, event)] = world.publisher.published
    assert subject == subjects.GRANTS_ISSUED == "grants.issued"
    assert isinstance(event, GrantIssued)
    assert (event.user_id, event.sandbox_id, event.grant, event.event_id) == (
        "user-1", "sbx-1", issued.token, issued.event_id
    )


async def test_the_default_lease_is_a_day_or_the_maximum_if_shorter(world: World) -> None:
    issued = await world.service.issue("user-1", "sbx-1", "access_only")
    assert issued.claims.exp - int(issued.claims.iat) == 86_400
    world.service.policy = GrantPolicy(max_ttl_s=3600)
    issued = await world.service.issue("user-1", "sbx-1", "access_only")
    assert issued.claims.exp - int(issued.claims.iat) == 3600


@pytest.mark.parametrize(("ttl", "limit"), [(7 * 86_400 + 1, "less_than_equal"), (59, "greater_than_equal")])
async def test_a_lease_outside_the_bounds_is_refused_and_nothing_is_signed(
    world: World, ttl: int, limit: str
) -> None:
    with pytest.raises(InvalidGrantRequest) as caught:
        await world.service.issue("user-1", "sbx-1", "access_only", ttl)
    assert caught.value.status == 422 and caught.value.slug == "invalid-request"
    [error] = caught.value.extensions["errors"]
    assert error["loc"] == ["body", "ttl_s"] and error["type"] == limit
    assert world.publisher.published == []


async def test_no_grant_when_the_vault_cannot_be_told(world: World) -> None:
    world.publisher.fail = True
    with pytest.raises(BusUnavailable) as caught:
        await world.service.issue("user-1", "sbx-1", "access_only")
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "2"}
    assert "none was issued" in caught.value.detail


async def test_a_newer_grant_for_the_same_sandbox_is_a_new_lease(world: World) -> None:
    first = await world.service.issue("user-1", "sbx-1", "access_only", 86_400)
    world.clock.now += timedelta(minutes=5)
    second = await world.service.issue("user-1", "sbx-1", "access_only", 600)  # shortens the lease
    assert second.claims.newer_than(first.claims.iat_ms, first.claims.jti)
    assert second.claims.exp < first.claims.exp
    assert [e.grant for _, e in world.publisher.published] == [first.token, second.token]


async def test_live_maps_the_vault_listing_of_the_caller_only(world: World) -> None:
    world.vault.lease("user-1", "sbx-b", expires_at=1_764_504_000_000, last_injected_at=1_764_331_202_000)
    world.vault.lease("user-1", "sbx-a", mode="file", expires_at=1_764_417_600_000)
    world.vault.lease("user-2", "sbx-c")
    leases = await world.service.live("user-1")
    assert [lease.sandbox_id for lease in leases] == ["sbx-a", "sbx-b"]  # soonest end first
    assert leases[0].mode == "file" and leases[0].last_injected_at is None
    assert leases[1].expires_at == datetime(2025, 11, 30, 12, 0, tzinfo=UTC)
    assert leases[1].last_injected_at == datetime(2025, 11, 28, 12, 0, 2, tzinfo=UTC)
    assert world.vault.asked == ["user-1"]


async def test_an_impossible_time_from_the_vault_is_a_bad_reply(world: World) -> None:
    world.vault.lease("user-1", "sbx-a", expires_at=10**20)
    with pytest.raises(VaultBadReply):
        await world.service.live("user-1")


async def test_end_publishes_grants_revoked_for_the_caller(world: World) -> None:
    event_id = await world.service.end("user-1", "sbx-1")
    [(subject, event)] = world.publisher.published
    assert subject == subjects.GRANTS_REVOKED == "grants.revoked"
    assert isinstance(event, GrantRevoked)
    assert (event.user_id, event.sandbox_id, event.reason, event.event_id) == ("user-1", "sbx-1", "grant_ended", event_id)
    world.publisher.fail = True
    with pytest.raises(BusUnavailable):
        await world.service.end("user-1", "sbx-1")


# --- the routes over ASGI -----------------------------------------------------------------------
@dataclass
class Api:
    client: httpx.AsyncClient
    world: World
    metrics: AuthMetrics


@pytest.fixture
async def api(world: World) -> AsyncIterator[Api]:
    publisher = world.publisher
    login = LoginService(
        policy=LoginPolicy("https://claude.example/authorize", "https://cb.example/cb", "client", ("user:inference",)),
        pending=InMemoryPendingStore(), oauth=FakeOAuth(grant=a_grant()),
        vault_keys=FakeVaultKeys(KeyPair.generate().recipient), publisher=publisher, clock=world.clock,
    )

    async def readiness() -> dict[str, bool]:
        return {"bus": True, "vault_key": True, "grant_key": True}

    components = AuthComponents(
        login=login, callers=CallerVerifier(SECRET), readiness=readiness,
        connections=ConnectionService(vault=FakeVaultStatus(), publisher=publisher, clock=world.clock),
        limiter=RateLimiter(per_minute=600, burst=200, limits={"grant_issue": Limit(60, 5), "status": Limit(60, 3)}),
        grants=world.service,
    )
    stats = AuthMetrics()
    app = build_api(stats, components)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://auth") as client:
        yield Api(client, world, stats)


def auth(user: str = "user-1") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_caller_token(SECRET, user)}"}


async def test_post_grant_is_201_with_a_verifiable_grant(api: Api) -> None:
    response = await api.client.post("/v1/claude-code/grants", headers=auth(), json={"sandbox_id": "sbx-123"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"grant", "sandbox_id", "mode", "expires_at"}
    assert (body["sandbox_id"], body["mode"]) == ("sbx-123", "access_only")
    claims = api.world.verify(body["grant"])
    assert (claims.sub, claims.sbx, claims.mode) == ("user-1", "sbx-123", "access_only")
    assert datetime.fromisoformat(body["expires_at"]) == datetime.fromtimestamp(claims.exp, tz=UTC)
    [(_, event)] = api.world.publisher.published
    assert event.grant == body["grant"]
    assert 'ccbridge_auth_grants_issued_total{mode="access_only"} 1.0' in api.metrics.render().decode()


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"sandbox_id": ""},
        {"sandbox_id": "../etc"},
        {"sandbox_id": "a/b"},
        {"sandbox_id": ".hidden"},
        {"sandbox_id": "x" * 129},
        {"sandbox_id": "sbx-1", "mode": "everything"},
        {"sandbox_id": "sbx-1", "ttl_s": 59},
        {"sandbox_id": "sbx-1", "ttl_s": MAX_TTL_S + 1},
        {"sandbox_id": "sbx-1", "ttl_s": "a day"},
        {"sandbox_id": "sbx-1", "user_id": "someone-else"},
    ],
)
async def test_bad_grant_requests_are_422_problems(api: Api, body: dict) -> None:
    problem = assert_problem(await api.client.post("/v1/claude-code/grants", headers=auth(), json=body), 422,
                             "invalid-request")
    assert problem["errors"]
    assert api.world.publisher.published == []


async def test_a_lease_over_grant_max_ttl_is_422_naming_the_field(api: Api) -> None:
    response = await api.client.post("/v1/claude-code/grants", headers=auth(),
                                     json={"sandbox_id": "sbx-1", "ttl_s": 7 * 86_400 + 1})
    problem = assert_problem(response, 422, "invalid-request")
    assert problem["errors"] == [{"loc": ["body", "ttl_s"], "msg": "Input should be less than or equal to 604800",
                                  "type": "less_than_equal"}]
    assert "604800" in problem["detail"]
    ok = await api.client.post("/v1/claude-code/grants", headers=auth(), json={"sandbox_id": "sbx-1", "ttl_s": 604800})
    assert ok.status_code == 201


async def test_no_grant_in_the_answer_when_the_bus_is_down(api: Api) -> None:
    api.world.publisher.fail = True
    response = await api.client.post("/v1/claude-code/grants", headers=auth(), json={"sandbox_id": "sbx-1"})
    assert_problem(response, 503, "bus-unavailable")
    assert response.headers["retry-after"] == "2" and "grant" not in response.json()
    assert "eyJ" not in response.text


async def test_get_grants_lists_the_callers_own_leases_only(api: Api) -> None:
    api.world.vault.lease("owner", "sbx-owned", last_injected_at=1_764_331_202_000)
    api.world.vault.lease("someone", "sbx-theirs")
    mine = await api.client.get("/v1/claude-code/grants", headers=auth("owner"))
    assert mine.status_code == 200
    assert mine.json() == {"grants": [{
        "sandbox_id": "sbx-owned", "mode": "access_only", "issued_at": "2025-11-28T12:00:00Z",
        "expires_at": "2025-11-29T12:00:00Z", "last_injected_at": "2025-11-28T12:00:02Z",
    }]}
    # no parameter can name another person: the vault is asked for the token's `sub`, always
    other = await api.client.get("/v1/claude-code/grants?user_id=owner", headers=auth("intruder"))
    assert other.json() == {"grants": []}
    assert api.world.vault.asked == ["owner", "intruder"]
    api.world.vault.down = True
    down = await api.client.get("/v1/claude-code/grants", headers=auth("owner"))
    assert_problem(down, 503, "vault-unavailable")
    assert down.headers["retry-after"]


async def test_delete_ends_the_callers_lease_only_and_is_idempotent(api: Api) -> None:
    for _ in range(2):
        response = await api.client.delete("/v1/claude-code/grants/sbx-123", headers=auth("intruder"))
        assert response.status_code == 204 and response.content == b""
    assert [(s, e.user_id, e.sandbox_id) for s, e in api.world.publisher.published] == [
        ("grants.revoked", "intruder", "sbx-123")
    ] * 2  # it can only ever end the intruder's own lease of sbx-123, never the owner's
    assert "ccbridge_auth_grants_ended_total 2.0" in api.metrics.render().decode()


# A literal ".." never reaches the route: clients (httpx, browsers) resolve it away before sending,
# which is why the connect page checks a sandbox id before it builds the DELETE URL.
@pytest.mark.parametrize("sandbox_id", ["%2E%2E", ".x", "a%2Fb", "x" * 129, "sbx%00", "sbx%20x"])
async def test_delete_with_a_bad_sandbox_id_is_a_4xx_problem(api: Api, sandbox_id: str) -> None:
    response = await api.client.delete(f"/v1/claude-code/grants/{sandbox_id}", headers=auth())
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    assert api.world.publisher.published == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/v1/claude-code/grants"), ("get", "/v1/claude-code/grants"), ("delete", "/v1/claude-code/grants/sbx-1")],
)
async def test_grant_routes_need_a_caller(api: Api, method: str, path: str) -> None:
    kwargs = {"json": {"sandbox_id": "sbx-1"}} if method == "post" else {}
    assert_problem(await api.client.request(method, path, **kwargs), 401, "unauthorized")


async def test_grant_issue_and_status_have_their_own_rate_limits(api: Api) -> None:
    codes = [(await api.client.post("/v1/claude-code/grants", headers=auth(), json={"sandbox_id": f"sbx-{i}"}))
             .status_code for i in range(6)]
    assert codes == [201] * 5 + [429]
    assert (await api.client.get("/v1/claude-code/grants", headers=auth())).status_code == 200  # another bucket
    statuses = [(await api.client.get("/v1/claude-code/status", headers=auth())).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = await api.client.get("/v1/claude-code/status", headers=auth())
    body = assert_problem(limited, 429, "rate-limited")
    assert int(limited.headers["retry-after"]) >= 1 and "connect" not in body["detail"]
    assert (await api.client.get("/v1/claude-code/status", headers=auth("user-2"))).status_code == 200


async def test_status_names_the_caller(api: Api) -> None:
    body = (await api.client.get("/v1/claude-code/status", headers=auth("person@example.com"))).json()
    assert body["user_id"] == "person@example.com"
