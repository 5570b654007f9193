"""Grants and sandbox leases in the vault (use cases on the in-memory store, a controlled clock):
nothing is read or sealed for a request whose grant does not check out, the newest grant for a
sandbox governs it, an end voids older grants, expiry ends the lease and is announced once —
and the attacks from the least-authority review: relabelled sealed boxes, publisher clocks in the
future."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.vault.adapters.audit_writer import AuditWriter
from services.vault.errors import GrantInvalid, GrantRequired, InvalidEvent, RefreshTransient, UnopenableBox
from services.vault.leases import Leases
from services.vault.trust import TrustedRequesters, TrustStore
from services.vault.use_cases import Vault
from shared import subjects
from shared.delivery import Breakers
from shared.events import (
    GrantEnded,
    GrantIssued,
    GrantRevoked,
    GrantsListRequest,
    TokensRevoked,
)
from shared.grants import GrantSigner
from shared.sealing import KeyPair
from tests.grants import SIGNER, grant_for, verifier
from tests.vault_fixtures import (
    FakePublisher,
    FakeStore,
    FakeTokenEndpoint,
    canary,
    credentials_request,
    issued_event,
    new_user,
    open_reply,
)

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    @property
    def s(self) -> int:
        return int(self.now.timestamp())

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class World:
    clock: Clock = field(default_factory=Clock)
    store: FakeStore = field(default_factory=FakeStore)
    publisher: FakePublisher = field(default_factory=FakePublisher)
    endpoint: FakeTokenEndpoint = field(default_factory=FakeTokenEndpoint)
    vault_key: KeyPair = field(default_factory=KeyPair.generate)
    requester: KeyPair = field(default_factory=KeyPair.generate)
    required: bool = True
    audit_grants: bool = True
    vault: Any = None

    def __post_init__(self) -> None:
        uow = self.store.unit_of_work
        self.vault = Vault(
            unit_of_work=uow,
            read_for_release=self.store.read_for_release,
            leases=Leases(unit_of_work=uow, verifier=verifier(), required=self.required, publisher=self.publisher,
                          clock=self.clock),
            keypair=self.vault_key,
            trusted=TrustStore.fixed(TrustedRequesters.of([self.requester.recipient])),
            clock=self.clock,
            token_endpoint=self.endpoint,
            revoke_backoff_s=0.0,
            audit=AuditWriter(uow),
            audit_grants=self.audit_grants,
        )

    @property
    def leases(self) -> Leases:
        return self.vault.leases

    async def connect(self, user: str, *, refresh: str | None = None) -> str:
        access = canary("access")
        await self.vault.store_issued_tokens(issued_event(self.vault_key.recipient, user_id=user, access_token=access,
                                                          refresh_token=refresh or canary("refresh")))
        return access

    def grant(self, user: str, sbx: str, mode: str = "access_only", *, ttl_s: int = 3600, at: Clock | None = None,
              signer: GrantSigner = SIGNER) -> str:
        return grant_for(user, sbx, mode, ttl_s=ttl_s, now_s=(at or self.clock).s, signer=signer)

    async def ask(self, user: str, sbx: str, grant: str | None, mode: str = "access_only") -> Any:
        request = credentials_request(self.requester, user_id=user, sandbox_id=sbx, grant=grant or False,
                                      mode=mode)
        return await self.vault.release_credentials(request)

    def ended(self) -> list[GrantEnded]:
        return self.publisher.of(subjects.GRANTS_ENDED)


@pytest.fixture
def world() -> World:
    return World()


# --- the request's grant --------------------------------------------------------------------
async def test_a_request_without_a_grant_gets_nothing(world: World) -> None:
    user = new_user()
    await world.connect(user)
    with pytest.raises(GrantRequired):
        await world.ask(user, "sbx-1", None)
    assert world.store.sandbox_leases == {}


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("forged", "signed by a key the vault does not trust"),
        ("other_person", "grant is for another person"),
        ("other_sandbox", "grant is for another sandbox"),
        ("weaker_mode", "mode file is not within the lease (access_only)"),
        ("expired", "grant expired"),
        ("future", "grant issued in the future"),
        ("tampered", "bad signature"),
    ],
)
async def test_a_grant_that_does_not_check_out_releases_nothing(world: World, case: str, detail: str) -> None:
    """Publishing sandbox.created is not enough: the person must have granted THIS sandbox."""
    user, mallory = new_user(), new_user()
    await world.connect(user)
    mode = "access_only"
    if case == "forged":
        grant = world.grant(user, "sbx-1", signer=GrantSigner.generate())
    elif case == "other_person":
        grant = world.grant(mallory, "sbx-1")
    elif case == "other_sandbox":
        grant = world.grant(user, "sbx-other")
    elif case == "weaker_mode":
        grant, mode = world.grant(user, "sbx-1", "access_only"), "file"
    elif case == "expired":
        grant = world.grant(user, "sbx-1", ttl_s=60)
        world.clock.advance(61)
    elif case == "future":
        grant = grant_for(user, "sbx-1", now_s=world.clock.s + 3600)
    else:
        header, payload, signature = world.grant(user, "sbx-1").split(".")
        other = world.grant(user, "sbx-1", "file").split(".")[1]  # a stronger payload, the old signature
        grant = f"{header}.{other}.{signature}"
        assert payload != other
    with pytest.raises(GrantInvalid) as info:
        await world.ask(user, "sbx-1", grant, mode)
    assert info.value.detail == detail
    if case == "weaker_mode":  # a genuine grant: remembered as the sandbox's (access_only) lease
        assert [lease.mode for lease in world.store.sandbox_leases.values()] == ["access_only"]
    else:  # nothing remembered from a grant that is not genuine, current, and this person's for this sandbox
        assert world.store.sandbox_leases == {}


async def test_a_good_grant_releases_and_is_remembered_as_the_lease(world: World) -> None:
    user = new_user()
    access = await world.connect(user)
    reply = await world.ask(user, "sbx-1", world.grant(user, "sbx-1", "file"), "file")
    assert open_reply(reply, world.requester, user_id=user, sandbox_id="sbx-1").access_token == access
    assert reply.lease_expires_at == (world.clock.s + 3600) * 1000
    lease = world.store.sandbox_leases[(user, "sbx-1")]
    assert (lease.mode, lease.ended_at, lease.expires_at) == ("file", None, reply.lease_expires_at)


async def test_by_default_the_refresh_token_stays_in_the_vault(world: World) -> None:
    user = new_user()
    await world.connect(user)
    reply = await world.ask(user, "sbx-1", world.grant(user, "sbx-1"))  # access_only: the default everywhere
    assert open_reply(reply, world.requester, user_id=user, sandbox_id="sbx-1").refresh_token is None


async def test_grants_off_releases_without_a_grant(world: World) -> None:
    off = World(required=False)
    user = new_user()
    await off.connect(user)
    assert (await off.ask(user, "sbx-1", None)).ok


# --- the newest grant governs a sandbox ------------------------------------------------------
async def test_a_newer_grant_extends_a_live_sandbox_that_still_holds_the_old_one(world: World) -> None:
    user = new_user()
    await world.connect(user)
    first = world.grant(user, "sbx-1", ttl_s=600)
    assert (await world.ask(user, "sbx-1", first)).ok
    world.clock.advance(300)
    longer = world.grant(user, "sbx-1", ttl_s=3600)
    assert await world.leases.record_grant(GrantIssued(user_id=user, sandbox_id="sbx-1", grant=longer)) == "recorded"
    world.clock.advance(400)  # the first grant has expired; the sandbox still presents it (re-injection)
    reply = await world.ask(user, "sbx-1", first)
    assert reply.ok and reply.lease_expires_at == (T0.timestamp() + 300 + 3600) * 1000
    # without the newer grant, the same expired grant gets nothing (another sandbox: no lease)
    with pytest.raises(GrantInvalid, match="grant expired"):
        await world.ask(user, "sbx-2", world.grant(user, "sbx-2", ttl_s=60, at=Clock(world.clock.now - timedelta(
            seconds=120))))


async def test_a_newer_shorter_grant_shortens_the_lease_of_a_live_sandbox(world: World) -> None:
    user = new_user()
    await world.connect(user)
    long = world.grant(user, "sbx-1", ttl_s=3600)
    assert (await world.ask(user, "sbx-1", long)).ok
    world.clock.advance(1)
    short = world.grant(user, "sbx-1", ttl_s=60)
    await world.leases.record_grant(GrantIssued(user_id=user, sandbox_id="sbx-1", grant=short))
    world.clock.advance(61)
    with pytest.raises(GrantInvalid, match="lease of this sandbox has expired"):
        await world.ask(user, "sbx-1", long)  # the old, longer grant no longer counts


async def test_a_newer_narrower_grant_narrows_the_mode(world: World) -> None:
    user = new_user()
    await world.connect(user)
    wide = world.grant(user, "sbx-1", "file")
    assert (await world.ask(user, "sbx-1", wide, "file")).ok
    world.clock.advance(1)
    await world.leases.record_grant(GrantIssued(user_id=user, sandbox_id="sbx-1",
                                                grant=world.grant(user, "sbx-1", "access_only")))
    with pytest.raises(GrantInvalid, match="not within the lease"):
        await world.ask(user, "sbx-1", wide, "file")
    assert (await world.ask(user, "sbx-1", wide, "access_only")).ok


async def test_grants_issued_that_does_not_verify_is_poison(world: World) -> None:
    user = new_user()
    forged = world.grant(user, "sbx-1", signer=GrantSigner.generate())
    with pytest.raises(InvalidEvent):
        await world.leases.record_grant(GrantIssued(user_id=user, sandbox_id="sbx-1", grant=forged))
    relabelled = world.grant(user, "sbx-1")
    with pytest.raises(InvalidEvent):  # a genuine grant, relabelled with another sandbox
        await world.leases.record_grant(GrantIssued(user_id=user, sandbox_id="sbx-2", grant=relabelled))
    assert world.store.sandbox_leases == {}


# --- ending a lease ----------------------------------------------------------------------------
async def test_ending_a_lease_stops_releases_and_announces_it(world: World) -> None:
    user = new_user()
    await world.connect(user)
    grant = world.grant(user, "sbx-1")
    assert (await world.ask(user, "sbx-1", grant)).ok
    world.clock.advance(5)
    assert await world.leases.end(GrantRevoked(user_id=user, sandbox_id="sbx-1", occurred_at=world.clock())) == "ended"
    with pytest.raises(GrantInvalid, match="ended"):
        await world.ask(user, "sbx-1", grant)
    [ended] = world.ended()
    assert (ended.sandbox_id, ended.reason, ended.ended_at) == ("sbx-1", "grant_ended", world.clock.s * 1000)
    assert world.store.sandbox_leases[(user, "sbx-1")].announced
    assert await world.leases.sweep() == {"expired": 0, "announced": 0}  # announced once
    world.clock.advance(2)  # a grant signed after the end starts a new lease
    assert (await world.ask(user, "sbx-1", world.grant(user, "sbx-1"))).ok


async def test_ending_a_lease_before_its_grant_arrived_voids_that_grant(world: World) -> None:
    """DELETE can overtake sandbox.created: the grant signed before it must not work later."""
    user = new_user()
    await world.connect(user)
    grant = world.grant(user, "sbx-1")
    world.clock.advance(3)
    await world.leases.end(GrantRevoked(user_id=user, sandbox_id="sbx-1", occurred_at=world.clock()))
    with pytest.raises(GrantInvalid, match="this grant was ended"):
        await world.ask(user, "sbx-1", grant)


async def test_a_lease_end_dated_in_the_future_is_clamped_to_now(world: World) -> None:
    """A publisher's clock (or a forged event) must not void grants the person signs later."""
    user = new_user()
    await world.connect(user)
    await world.leases.end(GrantRevoked(user_id=user, sandbox_id="sbx-1",
                                        occurred_at=world.clock() + timedelta(days=3650)))
    world.clock.advance(2)
    assert (await world.ask(user, "sbx-1", world.grant(user, "sbx-1"))).ok


async def test_expiry_ends_the_lease_once_and_a_lost_announcement_is_sent_again(world: World) -> None:
    user = new_user()
    await world.connect(user)
    assert (await world.ask(user, "sbx-1", world.grant(user, "sbx-1", ttl_s=60))).ok
    world.clock.advance(30)
    assert await world.leases.sweep() == {"expired": 0, "announced": 0}
    world.clock.advance(31)
    world.publisher.failing = True  # the bus is down when the lease ends
    assert await world.leases.sweep() == {"expired": 1, "announced": 0}
    assert not world.store.sandbox_leases[(user, "sbx-1")].announced
    world.publisher.failing = False
    assert await world.leases.sweep() == {"expired": 0, "announced": 1}
    assert await world.leases.sweep() == {"expired": 0, "announced": 0}
    [ended] = world.ended()
    assert (ended.reason, ended.ended_at) == ("lease_expired", (T0.timestamp() + 60) * 1000)


@pytest.mark.parametrize("audit_grants", [True, False], ids=["audited", "VAULT_AUDIT_GRANTS=false"])
async def test_live_grants_are_listed_with_their_last_injection(audit_grants: bool) -> None:
    world = World(audit_grants=audit_grants)
    user, other = new_user(), new_user()
    await world.connect(user)
    await world.connect(other)
    for sbx, ttl in (("sbx-a", 600), ("sbx-b", 60)):
        assert (await world.ask(user, sbx, world.grant(user, sbx, ttl_s=ttl))).ok
    assert (await world.ask(other, "sbx-o", world.grant(other, "sbx-o"))).ok
    assert isinstance(world.vault.audit_sink, AuditWriter)
    await world.vault.audit_sink.flush()
    granted = [e.action for e, _ in world.store.audit if e.action == "credentials_granted"]
    assert len(granted) == (3 if audit_grants else 0)
    listed = (await world.leases.list_live(GrantsListRequest(user_id=user))).grants
    assert [(g.sandbox_id, g.mode, g.last_injected_at) for g in listed] == [
        ("sbx-b", "access_only", world.clock.s * 1000), ("sbx-a", "access_only", world.clock.s * 1000)]
    world.clock.advance(61)
    assert [g.sandbox_id for g in (await world.leases.list_live(GrantsListRequest(user_id=user))).grants] == ["sbx-a"]


# --- relabelled boxes, clamped revocations, revoking at the provider ---------------------------------
async def test_a_sealed_box_relabelled_with_another_user_stores_nothing(world: World) -> None:
    """The same tokens.issued box republished with user_id=mallory must not give mallory alice's
    tokens: the box is bound to its user (and kind)."""
    alice, mallory = new_user(), new_user()
    event = issued_event(world.vault_key.recipient, user_id=alice, access_token=canary())
    for forged in (event.model_copy(update={"user_id": mallory}), event.model_copy(update={"kind": "setup_token"})):
        with pytest.raises(UnopenableBox):
            await world.vault.store_issued_tokens(forged)
    assert mallory not in world.store.connections and alice not in world.store.connections


async def test_a_revocation_dated_in_the_future_does_not_lock_the_person_out(world: World) -> None:
    user = new_user()
    await world.connect(user)
    await world.vault.revoke(TokensRevoked(user_id=user, occurred_at=world.clock() + timedelta(days=3650)))
    world.clock.advance(1)
    assert (await world.vault.store_issued_tokens(
        issued_event(world.vault_key.recipient, user_id=user, access_token=canary()))).outcome == "stored"


async def test_disconnect_revokes_the_login_at_the_oauth_server_with_retries(world: World) -> None:
    user, refresh = new_user(), canary("refresh")
    await world.connect(user, refresh=refresh)
    world.endpoint.revoke_script = [RefreshTransient("503"), RefreshTransient("timeout")]
    assert (await world.vault.revoke(TokensRevoked(user_id=user))).outcome == "revoked"
    assert world.endpoint.revoked == [refresh]  # third attempt
    assert user not in world.store.connections  # shredded first, whatever the provider says
    actions = [(e.action, e.outcome) for e, _ in world.store.audit if e.user_id == user]
    assert ("provider_revoke", "ok") in actions
    assert refresh not in repr(world.store.audit)


async def test_a_provider_that_stays_down_is_audited_and_the_vault_copy_is_gone(world: World) -> None:
    user = new_user()
    await world.connect(user)
    world.endpoint.revoke_script = [RefreshTransient("503")] * 3
    await world.vault.revoke(TokensRevoked(user_id=user))
    assert world.endpoint.revoked == [] and user not in world.store.connections
    assert ("provider_revoke", "error") in [(e.action, e.outcome) for e, _ in world.store.audit]


def test_the_vault_finds_auths_grant_key_when_auth_starts_after_it(tmp_path) -> None:
    """The vault may start before auth has written `auth.grant.pub`: the first grant naming an
    unknown key re-reads the keys (at most once per interval) instead of being refused."""
    from services.vault.trust import GrantKeys
    from shared.grants import GrantError, load_or_create_signer

    ticks = iter(range(0, 100))
    keys = GrantKeys(None, tmp_path, min_interval_s=10, clock=lambda: float(next(ticks)))
    assert len(keys) == 0
    signer = load_or_create_signer(tmp_path)  # auth starts now
    token = grant_for("u", "sbx-1", signer=signer)
    assert keys.verify(token, now_s=datetime.now(UTC).timestamp()).sub == "u"
    stranger = grant_for("u", "sbx-1", signer=GrantSigner.generate())
    with pytest.raises(GrantError, match="does not trust"):  # re-read (nothing new), still refused
        keys.verify(stranger, now_s=datetime.now(UTC).timestamp())


async def test_grants_are_ordered_to_the_millisecond(world: World) -> None:
    """Grant, End, grant again within one second: the first grant is void, the last one is a new
    lease — and of two grants signed in the same second, the later one governs."""
    user = new_user()
    await world.connect(user)
    before_end = grant_for(user, "sbx-1", now_s=world.clock.s + 0.100)
    world.clock.advance(0.400)
    await world.leases.end(GrantRevoked(user_id=user, sandbox_id="sbx-1", occurred_at=world.clock()))
    after_end = grant_for(user, "sbx-1", now_s=world.clock.now.timestamp() + 0.001)
    world.clock.advance(0.1)
    with pytest.raises(GrantInvalid, match="this grant was ended"):
        await world.ask(user, "sbx-1", before_end)
    assert (await world.ask(user, "sbx-1", after_end)).ok
    longer = grant_for(user, "sbx-1", ttl_s=3600, now_s=world.clock.now.timestamp())
    shorter = grant_for(user, "sbx-1", ttl_s=60, now_s=world.clock.now.timestamp() + 0.002)  # same second, later
    await world.leases.record_grant(GrantIssued(user_id=user, sandbox_id="sbx-1", grant=shorter))
    assert await world.leases.record_grant(GrantIssued(user_id=user, sandbox_id="sbx-1", grant=longer)) == "older"
    world.clock.advance(61)
    with pytest.raises(GrantInvalid, match="expired"):
        await world.ask(user, "sbx-1", longer)


# --- vault.credentials.get version 2: a batch -----------------------------------------------------
async def test_a_batch_is_answered_item_by_item_from_one_read_and_one_box(world: World) -> None:
    from shared.events import CredentialsBatchRequest, CredentialsItem, ReleasedItems
    from shared.sealing import open_sealed

    alice, bob, nobody = new_user(), new_user(), new_user()
    tokens = {alice: await world.connect(alice), bob: await world.connect(bob)}
    reads: list[int] = []
    real_read = world.store.read_for_release

    async def counted(wanted, keyring=None):
        reads.append(len(wanted))
        return await real_read(wanted, keyring)

    world.vault._read_for_release = counted
    items = [
        CredentialsItem(user_id=alice, sandbox_id="sbx-a1", grant=world.grant(alice, "sbx-a1")),
        CredentialsItem(user_id=alice, sandbox_id="sbx-a2", grant=world.grant(alice, "sbx-a2", "file"), mode="file"),
        CredentialsItem(user_id=bob, sandbox_id="sbx-b1", grant=world.grant(bob, "sbx-b1")),
        CredentialsItem(user_id=nobody, sandbox_id="sbx-n1", grant=world.grant(nobody, "sbx-n1")),
        CredentialsItem(user_id=bob, sandbox_id="sbx-b2"),  # no grant
        CredentialsItem(user_id=bob, sandbox_id="sbx-b3", grant=world.grant(alice, "sbx-b3")),  # alice's grant
    ]
    request = CredentialsBatchRequest(requester_key_id=world.requester.key_id,
                                      requester_public_key=world.requester.recipient.public_b64, items=items)
    commits = world.store.commits
    reply = await world.vault.release_batch(request)

    assert [(r.request_id, r.ok, r.error) for r in reply.items] == [
        (items[0].request_id, True, None), (items[1].request_id, True, None), (items[2].request_id, True, None),
        (items[3].request_id, False, "not_connected"), (items[4].request_id, False, "grant_required"),
        (items[5].request_id, False, "grant_invalid")]
    assert reads == [4]  # one read for every item whose grant checked out
    assert world.store.commits == commits + 1  # the four new leases in one transaction
    assert reply.sealed is not None
    opened = ReleasedItems.model_validate_json(open_sealed(
        reply.sealed, world.requester, subject=subjects.VAULT_CREDENTIALS_GET, message_id=request.request_id))
    assert [(i.request_id, i.user_id, i.sandbox_id, i.bundle.access_token) for i in opened.items] == [
        (items[0].request_id, alice, "sbx-a1", tokens[alice]), (items[1].request_id, alice, "sbx-a2", tokens[alice]),
        (items[2].request_id, bob, "sbx-b1", tokens[bob])]
    assert [i.bundle.refresh_token is not None for i in opened.items] == [False, True, False]
    for secret in tokens.values():
        assert secret not in reply.model_dump_json()


async def test_a_batch_from_an_untrusted_requester_is_refused_whole(world: World) -> None:
    from services.vault.errors import UnauthorizedRequester
    from shared.events import CredentialsBatchRequest, CredentialsItem

    user = new_user()
    await world.connect(user)
    stranger = KeyPair.generate()
    request = CredentialsBatchRequest(requester_key_id=stranger.key_id, requester_public_key=stranger.recipient.public_b64,
                                      items=[CredentialsItem(user_id=user, sandbox_id="sbx-1",
                                                             grant=world.grant(user, "sbx-1"))])
    with pytest.raises(UnauthorizedRequester):
        await world.vault.release_batch(request)
    assert world.store.sandbox_leases == {}


async def test_while_the_database_is_down_requests_are_answered_at_once(world: World) -> None:
    """The first request finds the database down; the next ones are answered `unavailable` at
    once without touching it, until a probe finds it back."""
    from services.vault.errors import StoreUnavailable

    user = new_user()
    await world.connect(user)
    grant = world.grant(user, "sbx-1")
    reads = 0
    real_read = world.store.read_for_release

    async def counted(wanted, keyring=None):
        nonlocal reads
        reads += 1
        return await real_read(wanted, keyring)

    world.vault._read_for_release = counted
    world.vault.breakers = Breakers(probe_interval_s=0.05)
    world.store.unavailable = True
    for _ in range(5):
        with pytest.raises(StoreUnavailable):
            await world.ask(user, "sbx-1", grant)
    assert reads == 1
    world.store.unavailable = False
    await asyncio.sleep(0.06)
    assert (await world.ask(user, "sbx-1", grant)).ok and reads == 2
    assert world.vault.breakers["database"].state == "closed"
