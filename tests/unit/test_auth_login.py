"""The login use cases with hand-written fakes: ordering, single use, error mapping, sealing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest

from services.auth.adapters.pending_store import InMemoryPendingStore
from services.auth.domain import LegacyPaste, PastedCode, to_ms
from services.auth.errors import (
    BusUnavailable,
    ForeignState,
    InvalidCode,
    InvalidState,
    TooManyPendingLogins,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    VaultKeyUnavailable,
)
from services.auth.login import LoginPolicy, LoginService
from shared import subjects
from shared.events import TokenBundle, TokensIssued
from shared.sealing import KeyPair, open_tokens
from tests.auth_fixtures import ACCESS, REFRESH, FakeClock, FakeOAuth, FakePublisher, FakeVaultKeys, a_grant


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
        console_authorize_url="https://console.example/oauth/authorize",
        legacy_redirect_uri="https://console.example/oauth/code/callback",
        max_pending_per_caller=3,
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
        open_tokens(event, world.vault_key)
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


@pytest.mark.parametrize("oauth_error", [None, "invalid_request", "unauthorized_client"])
async def test_a_refusal_other_than_invalid_grant_consumes_the_login(world: World, oauth_error: str | None) -> None:
    world.oauth.error = InvalidCode(oauth_error=oauth_error)
    started = await world.service.start_login("u")
    with pytest.raises(InvalidCode) as caught:
        await world.service.complete_login("u", PastedCode(code="c", state=started.state))
    assert (caught.value.status, caught.value.slug) == (400, "invalid-code")
    assert await world.pending.get(started.state) is None
    assert world.publisher.published == []


async def test_a_typo_does_not_use_up_the_login(world: World) -> None:
    """invalid_grant (a mistyped code): the pending login is put back, with its PKCE verifier,
    and the next paste of the right code connects."""
    started = await world.service.start_login("u")
    world.oauth.error = InvalidCode(oauth_error="invalid_grant")
    with pytest.raises(InvalidCode) as caught:
        await world.service.complete_login("u", PastedCode(code="typo", state=started.state))
    assert caught.value.extensions == {"attempts_left": 2}
    assert "paste it again (2 tries left)" in caught.value.detail and "`" not in caught.value.detail
    kept = await world.pending.get(started.state)
    assert kept is not None and kept.login.rejected_codes == 1
    world.oauth.error = None
    connected = await world.service.complete_login("u", PastedCode(code="right", state=started.state))
    assert connected.scopes
    first, second = world.oauth.requests
    assert first.code_verifier == second.code_verifier and (first.code, second.code) == ("typo", "right")
    assert await world.pending.get(started.state) is None  # connected: used up


async def test_a_login_takes_three_rejected_codes_at_most(world: World) -> None:
    started = await world.service.start_login("u")
    world.oauth.error = InvalidCode(oauth_error="invalid_grant")
    left = []
    for _ in range(3):
        with pytest.raises(InvalidCode) as caught:
            await world.service.complete_login("u", PastedCode(code="typo", state=started.state))
        left.append(caught.value.extensions["attempts_left"])
    assert left == [2, 1, 0]
    assert "used up" in caught.value.detail
    assert await world.pending.get(started.state) is None
    with pytest.raises(InvalidState):
        await world.service.complete_login("u", PastedCode(code="right", state=started.state))
    assert len(world.oauth.requests) == 3


async def test_a_rejected_code_at_the_end_of_the_login_ends_it(world: World) -> None:
    started = await world.service.start_login("u")

    class SlowOAuth(FakeOAuth):
        async def exchange_code(self, request):
            world.clock.now = started.expires_at + timedelta(seconds=1)
            raise InvalidCode(oauth_error="invalid_grant")

    world.service.oauth = SlowOAuth()
    with pytest.raises(InvalidCode) as caught:
        await world.service.complete_login("u", PastedCode(code="typo", state=started.state))
    assert caught.value.extensions == {"attempts_left": 0}
    assert await world.pending.get(started.state) is None


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


# --- account types, optional scope, pending-login cap -----------------------------------------
async def test_console_account_type_uses_the_console_authorize_url(world: World) -> None:
    started = await world.service.start_login("u", account_type="console")
    assert started.authorize_url.startswith("https://console.example/oauth/authorize?code=true&")
    stored = await world.pending.get(started.state)
    assert stored is not None and stored.login.account_type == "console"
    default = await world.service.start_login("u")
    assert default.authorize_url.startswith("https://claude.example/authorize?code=true&")


async def test_create_api_key_adds_the_scope_to_url_and_login(world: World) -> None:
    from urllib.parse import parse_qs, urlsplit

    started = await world.service.start_login("u", create_api_key=True)
    scope = parse_qs(urlsplit(started.authorize_url).query)["scope"][0].split()
    assert scope[-1] == "org:create_api_key" and "user:inference" in scope
    stored = await world.pending.get(started.state)
    assert stored is not None and "org:create_api_key" in stored.login.scopes
    plain = await world.service.start_login("u")
    assert "org%3Acreate_api_key" not in plain.authorize_url and "org:create_api_key" not in plain.authorize_url


async def test_pending_logins_are_capped_per_caller(world: World) -> None:
    states = [(await world.service.start_login("capped")).state for _ in range(3)]
    with pytest.raises(TooManyPendingLogins) as caught:
        await world.service.start_login("capped")
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == "600"  # until the oldest expires
    assert (await world.service.start_login("someone-else")).state  # others are not affected
    await world.service.complete_login("capped", PastedCode(code="c", state=states[0]))  # one finished
    assert (await world.service.start_login("capped")).state
    world.clock.now += timedelta(minutes=11)  # all expired: the cap frees up
    for _ in range(3):
        await world.service.start_login("capped")


# --- the seed-compatible exchange and setup tokens ---------------------------------------------
VERIFIER = "v" * 43 + "-._~" + "w" * 10


async def test_legacy_exchange_sends_the_verifier_as_state_and_verifier(world: World) -> None:
    connected = await world.service.complete_legacy("u", LegacyPaste(code="the-code", verifier=VERIFIER))
    [request] = world.oauth.requests
    assert (request.code, request.code_verifier, request.state) == ("the-code", VERIFIER, VERIFIER)
    assert request.redirect_uri == "https://console.example/oauth/code/callback"
    assert request.client_id == "client-1"
    [(subject, event)] = world.publisher.published
    assert subject == subjects.TOKENS_ISSUED and event.kind == "oauth" and event.user_id == "u"
    assert connected.event_id == event.event_id
    assert len(world.pending) == 0  # no pending login involved


async def test_legacy_exchange_failure_publishes_nothing(world: World) -> None:
    world.oauth.error = InvalidCode()
    with pytest.raises(InvalidCode):
        await world.service.complete_legacy("u", LegacyPaste(code="c", verifier=VERIFIER))
    assert world.publisher.published == [] and len(world.oauth.requests) == 1


async def test_legacy_exchange_without_vault_key_spends_nothing(world: World) -> None:
    world.vault.recipient = None
    with pytest.raises(VaultKeyUnavailable):
        await world.service.complete_legacy("u", LegacyPaste(code="c", verifier=VERIFIER))
    assert world.oauth.requests == []


async def test_setup_token_is_an_access_only_connection_for_a_year(world: World) -> None:
    token = "sk-ant-oat01-" + "L" * 80
    connected = await world.service.connect_setup_token("u", token)
    [(subject, event)] = world.publisher.published
    assert subject == subjects.TOKENS_ISSUED
    assert isinstance(event, TokensIssued) and event.kind == "setup_token"
    now_ms = to_ms(world.clock.now)
    assert event.expires_at == now_ms + 365 * 24 * 3600 * 1000 == connected.expires_at_ms
    assert event.scopes == ["user:inference"] and event.refresh_token_expires_at is None and event.account is None
    assert token not in event.model_dump_json()
    bundle = TokenBundle.model_validate_json(
        open_tokens(event, world.vault_key)
    )
    assert (bundle.access_token, bundle.refresh_token, bundle.scopes) == (token, None, ["user:inference"])
    assert world.oauth.requests == []  # never sent anywhere but the vault


async def test_setup_token_needs_the_vault_key(world: World) -> None:
    world.vault.recipient = None
    with pytest.raises(VaultKeyUnavailable):
        await world.service.connect_setup_token("u", "sk-ant-oat01-" + "L" * 80)
    assert world.publisher.published == []
