"""The login use cases with hand-written fakes: ordering, single use, error mapping, sealing."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from services.auth.adapters.pending_store import InMemoryPendingStore
from services.auth.domain import CodeExchange, PastedCode, TokenGrant, to_ms
from services.auth.errors import (
    BusUnavailable,
    ForeignState,
    InvalidCode,
    InvalidState,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    VaultKeyUnavailable,
)
from services.auth.login import LoginPolicy, LoginService
from shared import subjects
from shared.events import Event, TokenBundle, TokensIssued
from shared.sealing import KeyPair, Recipient, open_sealed

ACCESS = "sk-ant-oat01-unit-access-token-value"
REFRESH = "sk-ant-ort01-unit-refresh-token-value"


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FakeOAuth:
    grant: TokenGrant | None = None
    error: UpstreamError | None = None
    requests: list[CodeExchange] = field(default_factory=list)

    async def exchange_code(self, request: CodeExchange) -> TokenGrant:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        assert self.grant is not None
        return self.grant

    async def aclose(self) -> None:
        pass


@dataclass
class FakeVaultKeys:
    recipient: Recipient | None

    def current(self) -> Recipient | None:
        return self.recipient


@dataclass
class FakePublisher:
    fail: bool = False
    published: list[tuple[str, Event]] = field(default_factory=list)

    async def publish(self, subject: str, event: Event) -> None:
        if self.fail:
            raise BusUnavailable()
        self.published.append((subject, event))


def a_grant(**overrides: object) -> TokenGrant:
    values: dict[str, object] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "expires_in": 28800,
        "refresh_token_expires_in": 2592000,
        "scopes": ("user:profile", "user:inference"),
        "account_uuid": "acc-1",
        "email": "a@example.com",
        "organization_uuid": "org-1",
        "organization_name": "Org",
    }
    values.update(overrides)
    return TokenGrant(**values)  # type: ignore[arg-type]


@dataclass
class World:
    service: LoginService
    pending: InMemoryPendingStore
    oauth: FakeOAuth
    vault: FakeVaultKeys
    publisher: FakePublisher
    clock: FakeClock
    vault_key: KeyPair


@pytest.fixture
def world() -> World:
    key = KeyPair.generate()
    pending, oauth, vault, publisher, clock = (
        InMemoryPendingStore(), FakeOAuth(grant=a_grant()), FakeVaultKeys(key.recipient), FakePublisher(), FakeClock()
    )
    policy = LoginPolicy(
        authorize_url="https://claude.example/authorize",
        redirect_uri="https://platform.example/callback",
        client_id="client-1",
        scopes=("user:profile", "user:inference", "user:sessions:claude_code"),
    )
    service = LoginService(
        policy=policy, pending=pending, oauth=oauth, vault_keys=vault, publisher=publisher, clock=clock
    )
    return World(service, pending, oauth, vault, publisher, clock, key)


async def test_start_login_stores_a_bound_pending_login(world: World) -> None:
    started = await world.service.start_login("user-1")
    stored = await world.pending.get(started.state)
    assert stored is not None
    assert stored.login.user_id == "user-1"
    assert stored.login.redirect_uri == "https://platform.example/callback"
    assert started.expires_at == world.clock.now + timedelta(minutes=10)
    assert stored.login.verifier not in started.authorize_url
    assert f"state={started.state}" in started.authorize_url


async def test_complete_login_seals_tokens_for_the_vault_only(world: World) -> None:
    started = await world.service.start_login("user-1")
    connected = await world.service.complete_login("user-1", PastedCode(code="the-code", state=started.state))

    request = world.oauth.requests[0]
    assert (request.code, request.state, request.client_id) == ("the-code", started.state, "client-1")
    assert request.redirect_uri == "https://platform.example/callback"
    stored_verifier_challenge = started.authorize_url.split("code_challenge=")[1].split("&")[0]
    from services.auth.domain import s256_challenge

    assert s256_challenge(request.code_verifier) == stored_verifier_challenge

    [(subject, event)] = world.publisher.published
    assert subject == subjects.TOKENS_ISSUED
    assert isinstance(event, TokensIssued)
    assert event.user_id == "user-1"
    now_ms = to_ms(world.clock.now)
    assert event.expires_at == now_ms + 28800 * 1000
    assert event.refresh_token_expires_at == now_ms + 2592000 * 1000
    assert event.scopes == ["user:profile", "user:inference"]
    assert event.account is not None and event.account.email == "a@example.com"
    assert ACCESS not in event.model_dump_json() and REFRESH not in event.model_dump_json()
    bundle = TokenBundle.model_validate_json(
        open_sealed(event.sealed, world.vault_key, subject=subjects.TOKENS_ISSUED, message_id=event.event_id)
    )
    assert (bundle.access_token, bundle.refresh_token, bundle.expires_at) == (ACCESS, REFRESH, event.expires_at)
    assert connected.event_id == event.event_id
    assert connected.expires_at_ms == event.expires_at
    assert len(world.pending) == 0


async def test_requested_scopes_used_when_the_server_sends_none(world: World) -> None:
    world.oauth.grant = a_grant(scopes=None, account_uuid=None, email=None, organization_uuid=None,
                                organization_name=None, refresh_token_expires_in=None)
    started = await world.service.start_login("u")
    connected = await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    event = world.publisher.published[0][1]
    assert connected.scopes == ("user:profile", "user:inference", "user:sessions:claude_code")
    assert event.account is None and event.refresh_token_expires_at is None


async def test_second_use_is_invalid_state(world: World) -> None:
    started = await world.service.start_login("u")
    await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    with pytest.raises(InvalidState):
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert len(world.oauth.requests) == 1


async def test_unknown_and_malformed_states(world: World) -> None:
    for state in ("Zm9vYmFyYmF6cXV4cXV1eHF1dXg", "bad state!", "x"):
        with pytest.raises(InvalidState):
            await world.service.complete_login("u", PastedCode(code="c", state=state))
    assert world.oauth.requests == []


async def test_other_caller_is_forbidden_and_does_not_burn_the_login(world: World) -> None:
    started = await world.service.start_login("owner")
    with pytest.raises(ForeignState) as caught:
        await world.service.complete_login("intruder", PastedCode(code="c", state=started.state))
    assert caught.value.status == 403
    assert world.oauth.requests == []
    await world.service.complete_login("owner", PastedCode(code="c", state=started.state))


async def test_expired_login(world: World) -> None:
    started = await world.service.start_login("u")
    world.clock.now += timedelta(minutes=10, seconds=1)
    with pytest.raises(InvalidState) as caught:
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert "expired" in caught.value.detail
    assert world.oauth.requests == []
    assert len(world.pending) == 0


async def test_missing_vault_key_spends_nothing(world: World) -> None:
    world.vault.recipient = None
    started = await world.service.start_login("u")
    with pytest.raises(VaultKeyUnavailable) as caught:
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert caught.value.status == 503
    assert world.oauth.requests == []
    assert await world.pending.get(started.state) is not None


async def test_rejected_code_consumes_the_login(world: World) -> None:
    world.oauth.error = InvalidCode()
    started = await world.service.start_login("u")
    with pytest.raises(InvalidCode) as caught:
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert (caught.value.status, caught.value.slug) == (400, "invalid-code")
    assert await world.pending.get(started.state) is None
    assert world.publisher.published == []


@pytest.mark.parametrize(
    ("error", "status"),
    [(UpstreamRateLimited(12), 503), (UpstreamUnavailable(), 502), (UpstreamTimeout(), 504)],
)
async def test_transient_upstream_failure_keeps_the_login_for_a_retry(
    world: World, error: UpstreamError, status: int
) -> None:
    world.oauth.error = error
    started = await world.service.start_login("u")
    with pytest.raises(UpstreamError) as caught:
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert caught.value.status == status
    assert world.publisher.published == []
    world.oauth.error = None
    connected = await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert connected.scopes


async def test_rate_limit_carries_retry_after() -> None:
    assert UpstreamRateLimited(12).headers == {"Retry-After": "12"}


async def test_bad_response_is_not_retryable(world: World) -> None:
    world.oauth.error = UpstreamBadResponse()
    started = await world.service.start_login("u")
    with pytest.raises(UpstreamBadResponse):
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert await world.pending.get(started.state) is None


async def test_bus_failure_surfaces_as_503(world: World) -> None:
    world.publisher.fail = True
    started = await world.service.start_login("u")
    with pytest.raises(BusUnavailable) as caught:
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert caught.value.status == 503


async def test_lost_race_is_invalid_state(world: World) -> None:
    started = await world.service.start_login("u")
    stored = await world.pending.get(started.state)
    assert stored is not None

    class RacingStore(InMemoryPendingStore):
        async def consume(self, state: str, revision: int) -> bool:
            return False  # another replica consumed it between get and delete

    racing = RacingStore()
    await racing.put(stored.login)
    world.service.pending = racing
    with pytest.raises(InvalidState):
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert world.oauth.requests == []
