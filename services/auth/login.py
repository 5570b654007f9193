"""Use cases: start a login (PKCE + state, pending login stored) and complete it (exchange the
pasted code, seal the tokens to the vault, publish `tokens.issued`); the seed-compatible
`code#verifier` exchange; a long-lived `claude setup-token` token handed to the vault as is.

Order in `complete_login` is deliberate:
1. the vault key must be known before anything is spent (a code is single use upstream);
2. the pending login is consumed with compare-and-set before the exchange, so a code#state can
   be exchanged at most once even with many replicas racing;
3. if the token endpoint fails transiently (429, 5xx, timeout, unreachable) the login is put
   back, so the same paste can be retried after Retry-After; a rejection with `invalid_grant`
   (a typo in the paste, most often: the real code was never spent) puts it back too, for at
   most `code_attempts` rejected pastes in all; any other rejection leaves it consumed;
4. tokens only leave this process sealed to the vault's key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal
from urllib.parse import urlencode

from services.auth.domain import (
    CREATE_API_KEY_SCOPE,
    SETUP_TOKEN_LIFETIME_S,
    SETUP_TOKEN_SCOPES,
    CodeExchange,
    LegacyPaste,
    PastedCode,
    PendingLogin,
    PkcePair,
    TokenGrant,
    is_valid_state,
    new_state,
    to_ms,
)
from services.auth.errors import (
    ForeignState,
    InvalidCode,
    InvalidState,
    StoreUnavailable,
    UpstreamError,
    VaultKeyUnavailable,
)
from services.auth.ports import Clock, EventPublisher, OAuthClient, PendingStore, VaultKeys
from shared import subjects
from shared.events import AccountInfo, TokenBundle, TokensIssued, new_event_id
from shared.logging import get_logger
from shared.sealing import Recipient, seal_tokens

log = get_logger(__name__)

INVALID_GRANT = "invalid_grant"


@dataclass(frozen=True)
class LoginPolicy:
    authorize_url: str
    redirect_uri: str
    client_id: str
    scopes: tuple[str, ...]
    ttl: timedelta = timedelta(minutes=10)
    console_authorize_url: str | None = None  # None: the claude.ai one serves both
    legacy_redirect_uri: str | None = None  # None: redirect_uri
    max_pending_per_caller: int | None = 5
    code_attempts: int = 3  # pastes refused with invalid_grant before the login is used up

    def authorize_url_for(self, account_type: str) -> str:
        if account_type == "console" and self.console_authorize_url:
            return self.console_authorize_url
        return self.authorize_url

    def scopes_for(self, *, create_api_key: bool) -> tuple[str, ...]:
        if create_api_key and CREATE_API_KEY_SCOPE not in self.scopes:
            return (*self.scopes, CREATE_API_KEY_SCOPE)
        return self.scopes


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


def build_authorize_url(
    policy: LoginPolicy,
    pkce: PkcePair,
    state: str,
    *,
    account_type: str = "claude_ai",
    scopes: tuple[str, ...] | None = None,
) -> str:
    """The query the real CLI sends, in its order."""
    query = urlencode(
        {
            "code": "true",
            "client_id": policy.client_id,
            "response_type": "code",
            "redirect_uri": policy.redirect_uri,
            "scope": " ".join(scopes or policy.scopes),
            "code_challenge": pkce.challenge,
            "code_challenge_method": pkce.method,
            "state": state,
        }
    )
    base = policy.authorize_url_for(account_type)
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}{query}"


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

    async def start_login(
        self, user_id: str, *, account_type: str = "claude_ai", create_api_key: bool = False
    ) -> LoginStarted:
        pkce = PkcePair.generate()
        state = new_state()
        now = self.clock()
        scopes = self.policy.scopes_for(create_api_key=create_api_key)
        login = PendingLogin(
            state=state,
            user_id=user_id,
            verifier=pkce.verifier,
            redirect_uri=self.policy.redirect_uri,
            client_id=self.policy.client_id,
            scopes=scopes,
            created_at=now,
            expires_at=now + self.policy.ttl,
            account_type=account_type,
        )
        await self.pending.put(login, limit=self.policy.max_pending_per_caller)
        log.info(
            "login started", user_id=user_id, account_type=account_type, scopes=" ".join(scopes),
            login_expires_at=login.expires_at.isoformat(),
        )
        url = build_authorize_url(self.policy, pkce, state, account_type=account_type, scopes=scopes)
        return LoginStarted(url, state, login.expires_at)

    def _vault_key(self) -> Recipient:
        vault = self.vault_keys.current()
        if vault is None:
            raise VaultKeyUnavailable()
        return vault

    async def complete_legacy(self, user_id: str, paste: LegacyPaste) -> Connected:
        """Seed-compatible exchange: the client made the PKCE pair itself and used the verifier
        as the OAuth `state`, so the same value goes out as `code_verifier` and `state`. There is
        no pending login here: the code is single use at the server, and we send it once."""
        vault = self._vault_key()
        redirect_uri = self.policy.legacy_redirect_uri or self.policy.redirect_uri
        try:
            grant = await self.oauth.exchange_code(
                CodeExchange(
                    code=paste.code,
                    code_verifier=paste.verifier,
                    state=paste.verifier,
                    redirect_uri=redirect_uri,
                    client_id=self.policy.client_id,
                )
            )
        except UpstreamError as exc:
            log.warning("legacy code exchange failed", user_id=user_id, outcome=exc.slug, retryable=exc.retryable)
            raise
        connected = await self._hand_to_vault(user_id, self.policy.scopes, grant, vault)
        log.info("legacy login completed", user_id=user_id, event_id=connected.event_id,
                 scopes=" ".join(connected.scopes))
        return connected

    async def connect_setup_token(self, user_id: str, token: str) -> Connected:
        """A `claude setup-token` token: access only (no refresh token), `user:inference`, ~1 year.
        It is not checked upstream (its only scope cannot read the profile); the vault stores it
        as an access-only connection."""
        vault = self._vault_key()
        grant = TokenGrant(
            access_token=token, refresh_token=None, expires_in=SETUP_TOKEN_LIFETIME_S, scopes=SETUP_TOKEN_SCOPES
        )
        connected = await self._hand_to_vault(user_id, SETUP_TOKEN_SCOPES, grant, vault, kind="setup_token")
        log.info("setup token handed to the vault", user_id=user_id, event_id=connected.event_id)
        return connected

    async def complete_login(self, user_id: str, paste: PastedCode) -> Connected:
        vault = self._vault_key()
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
            # A refused code is the person's mistake (a typo, a stale paste): info. The server
            # failing us is worth a warning.
            refused = exc if isinstance(exc, InvalidCode) else None
            (log.info if refused else log.warning)(
                "code exchange failed", user_id=user_id, outcome=exc.slug, retryable=exc.retryable,
                oauth_error=refused.oauth_error if refused else None,
            )
            if exc.retryable:
                await self._restore(login)
                raise
            if refused is not None and refused.oauth_error == INVALID_GRANT:
                raise await self._after_rejected_code(login) from None
            raise

        connected = await self._hand_to_vault(user_id, login.scopes, grant, vault)
        log.info(
            "login completed", user_id=user_id, event_id=connected.event_id, subject=subjects.TOKENS_ISSUED,
            scopes=" ".join(connected.scopes),
        )
        return connected

    async def _hand_to_vault(
        self,
        user_id: str,
        requested_scopes: tuple[str, ...],
        grant: TokenGrant,
        vault: Recipient,
        *,
        kind: Literal["oauth", "setup_token"] = "oauth",
    ) -> Connected:
        now = self.clock()
        now_ms = to_ms(now)
        expires_at_ms = now_ms + grant.expires_in * 1000
        scopes = grant.scopes or requested_scopes
        event_id = new_event_id()
        bundle = TokenBundle(
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            expires_at=expires_at_ms,
            scopes=list(scopes),
        )
        sealed = seal_tokens(bundle, vault, event_id=event_id, user_id=user_id, kind=kind)
        has_account = any((grant.account_uuid, grant.email, grant.organization_uuid, grant.organization_name))
        event = TokensIssued(
            event_id=event_id,
            user_id=user_id,
            kind=kind,
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

    async def _after_rejected_code(self, login: PendingLogin) -> InvalidCode:
        """`invalid_grant`: most often a typo in the paste, and the real code was never spent
        upstream. The login (state, PKCE verifier) is put back for a few more pastes within its
        life; the error says how many are left (`attempts_left`, 0 = start a new login)."""
        rejected = login.rejected_codes + 1
        left = self.policy.code_attempts - rejected
        if left > 0 and not login.expired(self.clock()) and await self._restore(replace(login, rejected_codes=rejected)):
            tries = "1 try" if left == 1 else f"{left} tries"
            return InvalidCode(
                "The authorization server rejected this code. Check that you copied all of it and paste it "
                f"again ({tries} left), or start a new login.",
                oauth_error=INVALID_GRANT, attempts_left=left,
            )
        return InvalidCode(oauth_error=INVALID_GRANT, attempts_left=0)

    async def _restore(self, login: PendingLogin) -> bool:
        try:
            await self.pending.restore(login)
        except StoreUnavailable:
            log.warning("could not put a login back after a failed exchange")
            return False
        return True

    async def _discard(self, state: str, revision: int) -> None:
        try:
            await self.pending.consume(state, revision)
        except StoreUnavailable:
            pass
