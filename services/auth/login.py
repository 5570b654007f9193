"""Use cases: start a login (PKCE + state, pending login stored) and complete it (exchange the
pasted code, seal the tokens to the vault, publish `tokens.issued`).

Order in `complete_login` is deliberate:
1. the vault key must be known before anything is spent (a code is single use upstream);
2. the pending login is consumed with compare-and-set before the exchange, so a code#state can
   be exchanged at most once even with many replicas racing;
3. if the token endpoint fails transiently (429, 5xx, timeout, unreachable) the login is put
   back, so the same paste can be retried after Retry-After; a rejection (`invalid_grant`)
   leaves it consumed;
4. tokens only leave this process sealed to the vault's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode

from services.auth.domain import (
    CodeExchange,
    PastedCode,
    PendingLogin,
    PkcePair,
    TokenGrant,
    is_valid_state,
    new_state,
    to_ms,
)
from services.auth.errors import ForeignState, InvalidState, StoreUnavailable, UpstreamError, VaultKeyUnavailable
from services.auth.ports import Clock, EventPublisher, OAuthClient, PendingStore, VaultKeys
from shared import subjects
from shared.events import AccountInfo, TokenBundle, TokensIssued, new_event_id
from shared.logging import get_logger
from shared.sealing import Recipient, seal

log = get_logger(__name__)


@dataclass(frozen=True)
class LoginPolicy:
    authorize_url: str
    redirect_uri: str
    client_id: str
    scopes: tuple[str, ...]
    ttl: timedelta = timedelta(minutes=10)


@dataclass(frozen=True)
class LoginStarted:
    authorize_url: str
    state: str
    expires_at: datetime


@dataclass(frozen=True)
class Connected:
    event_id: str
    expires_at: datetime
    expires_at_ms: int
    scopes: tuple[str, ...]


def build_authorize_url(policy: LoginPolicy, pkce: PkcePair, state: str) -> str:
    """The query the real CLI sends, in its order."""
    query = urlencode(
        {
            "code": "true",
            "client_id": policy.client_id,
            "response_type": "code",
            "redirect_uri": policy.redirect_uri,
            "scope": " ".join(policy.scopes),
            "code_challenge": pkce.challenge,
            "code_challenge_method": pkce.method,
            "state": state,
        }
    )
    separator = "&" if "?" in policy.authorize_url else "?"
    return f"{policy.authorize_url}{separator}{query}"


class LoginService:
    def __init__(
        self,
        *,
        policy: LoginPolicy,
        pending: PendingStore,
        oauth: OAuthClient,
        vault_keys: VaultKeys,
        publisher: EventPublisher,
        clock: Clock,
    ) -> None:
        self.policy = policy
        self.pending = pending
        self.oauth = oauth
        self.vault_keys = vault_keys
        self.publisher = publisher
        self.clock = clock

    async def start_login(self, user_id: str) -> LoginStarted:
        pkce = PkcePair.generate()
        state = new_state()
        now = self.clock()
        login = PendingLogin(
            state=state,
            user_id=user_id,
            verifier=pkce.verifier,
            redirect_uri=self.policy.redirect_uri,
            client_id=self.policy.client_id,
            scopes=self.policy.scopes,
            created_at=now,
            expires_at=now + self.policy.ttl,
        )
        await self.pending.put(login)
        log.info("login started", user_id=user_id, login_expires_at=login.expires_at.isoformat())
        return LoginStarted(build_authorize_url(self.policy, pkce, state), state, login.expires_at)

    async def complete_login(self, user_id: str, paste: PastedCode) -> Connected:
        vault = self.vault_keys.current()
        if vault is None:
            raise VaultKeyUnavailable()
        if not is_valid_state(paste.state):
            raise InvalidState()
        stored = await self.pending.get(paste.state)
        if stored is None:
            raise InvalidState()
        login = stored.login
        if login.user_id != user_id:
            log.warning("login state presented by another caller", user_id=user_id)
            raise ForeignState()
        if login.expired(self.clock()):
            await self._discard(login.state, stored.revision)
            raise InvalidState("This login has expired: start a new login.")
        if not await self.pending.consume(login.state, stored.revision):
            raise InvalidState()

        try:
            grant = await self.oauth.exchange_code(
                CodeExchange(
                    code=paste.code,
                    code_verifier=login.verifier,
                    state=login.state,
                    redirect_uri=login.redirect_uri,
                    client_id=login.client_id,
                )
            )
        except UpstreamError as exc:
            log.warning("code exchange failed", user_id=user_id, outcome=exc.slug, retryable=exc.retryable)
            if exc.retryable:
                await self._restore(login)
            raise

        connected = await self._hand_to_vault(user_id, login, grant, vault)
        log.info(
            "login completed", user_id=user_id, event_id=connected.event_id, subject=subjects.TOKENS_ISSUED,
            scopes=" ".join(connected.scopes),
        )
        return connected

    async def _hand_to_vault(self, user_id: str, login: PendingLogin, grant: TokenGrant, vault: Recipient) -> Connected:
        now = self.clock()
        now_ms = to_ms(now)
        expires_at_ms = now_ms + grant.expires_in * 1000
        scopes = grant.scopes or login.scopes
        event_id = new_event_id()
        bundle = TokenBundle(
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            expires_at=expires_at_ms,
            scopes=list(scopes),
        )
        sealed = seal(bundle.model_dump_json().encode(), vault, subject=subjects.TOKENS_ISSUED, message_id=event_id)
        has_account = any((grant.account_uuid, grant.email, grant.organization_uuid, grant.organization_name))
        event = TokensIssued(
            event_id=event_id,
            user_id=user_id,
            occurred_at=now,
            sealed=sealed,
            scopes=list(scopes),
            expires_at=expires_at_ms,
            refresh_token_expires_at=(
                now_ms + grant.refresh_token_expires_in * 1000 if grant.refresh_token_expires_in is not None else None
            ),
            account=AccountInfo(
                account_uuid=grant.account_uuid,
                email=grant.email,
                organization_uuid=grant.organization_uuid,
                organization_name=grant.organization_name,
            )
            if has_account
            else None,
        )
        await self.publisher.publish(subjects.TOKENS_ISSUED, event)
        return Connected(
            event_id=event_id,
            expires_at=now + timedelta(seconds=grant.expires_in),
            expires_at_ms=expires_at_ms,
            scopes=tuple(scopes),
        )

    async def _restore(self, login: PendingLogin) -> None:
        try:
            await self.pending.restore(login)
        except StoreUnavailable:
            log.warning("could not put a login back after a transient upstream failure")

    async def _discard(self, state: str, revision: int) -> None:
        try:
            await self.pending.consume(state, revision)
        except StoreUnavailable:
            pass
