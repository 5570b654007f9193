"""The vault's domain: one `Connection` per user (the aggregate), its credentials as a value
object whose repr never shows a token, the rules for what may leave the vault, when a
connection is due for a refresh and how long to back off, and audit entries.

Pure Python: no I/O, no crypto, no SQL. The store encrypts `Credentials` at rest; use cases
seal them for the bus.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, get_args

from services.vault.errors import GrantInvalid, ReconnectRequired
from shared.delivery import Backoff
from shared.grants import GrantClaims, mode_allows
from shared.logging import redact_text

ConnectionState = Literal["connected", "refresh_failed", "reconnect_required"]
ConnectionKind = Literal["oauth", "setup_token"]
CredentialMode = Literal["file", "access_only", "env"]

CONNECTION_STATES: tuple[str, ...] = get_args(ConnectionState)
CONNECTION_KINDS: tuple[str, ...] = get_args(ConnectionKind)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The secret part of a connection. repr/str show only which tokens are present."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        refresh = "<hidden>" if self.refresh_token else None
        return f"Credentials(access_token=<hidden>, refresh_token={refresh})"

    __str__ = __repr__

    def without_refresh_token(self) -> Credentials:
        return replace(self, refresh_token=None)

    # Serialised only to be encrypted by the keyring, never stored or sent as is.
    def to_bytes(self) -> bytes:
        return json.dumps({"access_token": self.access_token, "refresh_token": self.refresh_token}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Credentials:
        doc = json.loads(raw)
        return cls(access_token=doc["access_token"], refresh_token=doc.get("refresh_token"))


@dataclass(frozen=True, slots=True)
class Account:
    """Non-secret profile facts sent with the tokens."""

    account_uuid: str | None = None
    email: str | None = None
    organization_uuid: str | None = None
    organization_name: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "account_uuid": self.account_uuid,
            "email": self.email,
            "organization_uuid": self.organization_uuid,
            "organization_name": self.organization_name,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any] | None) -> Account | None:
        if not doc:
            return None
        return cls(**{k: doc.get(k) for k in ("account_uuid", "email", "organization_uuid", "organization_name")})


@dataclass(frozen=True, slots=True)
class Release:
    """Credentials released for one request, in the shape the requested mode allows."""

    credentials: Credentials
    expires_at: int
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RefreshedTokens:
    """What a successful refresh returned, already in the vault's units (ms epoch)."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: int
    scopes: tuple[str, ...] | None = None
    refresh_token_expires_at: int | None = None
    account: Account | None = None

    def __repr__(self) -> str:
        return f"RefreshedTokens(expires_at={self.expires_at}, rotated={self.refresh_token is not None})"


@dataclass(frozen=True, slots=True)
class IssuedLogin:
    """What a login (`tokens.issued`) brings: the tokens from the sealed box and the facts around
    them. `issued_at` is when the person logged in (never in the future: the vault's clock caps it)."""

    kind: ConnectionKind
    credentials: Credentials
    scopes: tuple[str, ...]
    expires_at: int
    refresh_token_expires_at: int | None
    account: Account | None
    issued_at: datetime | None = None


def login_supersedes(occurred_at: datetime, current_issued_at: datetime | None) -> bool:
    """Whether a login that happened at `occurred_at` replaces the one issued at
    `current_issued_at` (an older tokens.issued arriving late must not overwrite a newer login)."""
    return current_issued_at is None or occurred_at >= current_issued_at


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    """Everything about a connection except its secret (read without decrypting)."""

    user_id: str
    kind: ConnectionKind
    state: ConnectionState
    scopes: tuple[str, ...]
    expires_at: int
    refresh_token_expires_at: int | None
    account: Account | None
    version: int
    issued_at: datetime | None = None
    kek_id: str | None = None
    created_at: datetime | None = None


@dataclass(eq=False)
class Connection:
    """A person's Claude account as the vault holds it. `version` counts changes (1 = first):
    every change of credentials or state bumps it (and re-encrypts the secret under it)."""

    user_id: str
    kind: ConnectionKind
    state: ConnectionState
    credentials: Credentials
    scopes: tuple[str, ...]
    expires_at: int
    refresh_token_expires_at: int | None = None
    account: Account | None = None
    version: int = 1
    created_at: datetime | None = None
    updated_at: datetime | None = None
    issued_at: datetime | None = None
    refresh_failures: int = 0
    next_refresh_at: int | None = None
    last_refresh_error: str | None = None
    refreshed_at: datetime | None = None
    login_warned_for: int | None = None

    def __repr__(self) -> str:  # dataclass repr would be fine (Credentials hides), but be explicit
        return (
            f"Connection(user_id={self.user_id!r}, kind={self.kind!r}, state={self.state!r}, "
            f"version={self.version}, expires_at={self.expires_at})"
        )

    @classmethod
    def connect(cls, user_id: str, login: IssuedLogin, *, now: datetime, version: int = 1) -> Connection:
        """A first connection for this user (`version` > 1 when it replaces a row that could not
        be read any more)."""
        return cls(
            user_id=user_id,
            kind=login.kind,
            state="connected",
            credentials=login.credentials,
            scopes=login.scopes,
            expires_at=login.expires_at,
            refresh_token_expires_at=login.refresh_token_expires_at,
            account=login.account,
            version=version,
            created_at=now,
            updated_at=now,
            issued_at=login.issued_at or now,
        )

    def reconnect(self, login: IssuedLogin, *, now: datetime) -> None:
        """The person connected again: new tokens replace the old ones, whatever the state."""
        self.kind = login.kind
        self.credentials = login.credentials
        self.scopes = login.scopes
        self.expires_at = login.expires_at
        self.refresh_token_expires_at = login.refresh_token_expires_at
        self.account = login.account or self.account
        self.state = "connected"
        self.issued_at = login.issued_at or now
        self.refresh_failures = 0
        self.next_refresh_at = None
        self.last_refresh_error = None
        self.login_warned_for = None
        self._changed(now)

    def supersedes(self, occurred_at: datetime) -> bool:
        return login_supersedes(occurred_at, self.issued_at)

    # --- refresh ------------------------------------------------------------------
    @property
    def can_refresh(self) -> bool:
        return self.kind == "oauth" and self.credentials.refresh_token is not None

    @property
    def refreshable(self) -> bool:
        """The refresher's business: can refresh and is not waiting for a new login."""
        return self.can_refresh and self.state != "reconnect_required"

    def refresh_due(self, now_ms: int, margin_ms: int) -> bool:
        return (
            self.refreshable
            and self.expires_at - margin_ms <= now_ms
            and (self.next_refresh_at is None or self.next_refresh_at <= now_ms)
        )

    def refreshed(self, tokens: RefreshedTokens, now: datetime) -> None:
        """A refresh succeeded. A response without a refresh token keeps the current one."""
        self.credentials = Credentials(
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token or self.credentials.refresh_token,
        )
        self.expires_at = tokens.expires_at
        if tokens.scopes:
            self.scopes = tuple(tokens.scopes)
        if tokens.refresh_token_expires_at is not None:
            self.refresh_token_expires_at = tokens.refresh_token_expires_at
        self.account = tokens.account or self.account
        self.state = "connected"
        self.refresh_failures = 0
        self.next_refresh_at = None
        self.last_refresh_error = None
        self.refreshed_at = now
        self._changed(now)

    def refresh_failed(self, error: str, *, retry_at_ms: int, now: datetime) -> None:
        """A transient failure (429, 5xx, timeout): keep serving the current access token while
        it lasts, try again at `retry_at_ms`."""
        if self.state != "reconnect_required":
            self.state = "refresh_failed"
        self.refresh_failures += 1
        self.next_refresh_at = retry_at_ms
        self.last_refresh_error = error[:64]
        self._changed(now)

    def require_reconnect(self, reason: str, now: datetime) -> None:
        """The refresh token is dead (`invalid_grant`): only a new login helps."""
        self.state = "reconnect_required"
        self.next_refresh_at = None
        self.last_refresh_error = reason[:64]
        self._changed(now)

    # --- login expiry ----------------------------------------------------------------
    def login_warning_due(self, now_ms: int, warn_before_ms: int) -> bool:
        return (
            self.refresh_token_expires_at is not None
            and self.state != "reconnect_required"
            and self.refresh_token_expires_at - warn_before_ms <= now_ms
            and self.login_warned_for != self.refresh_token_expires_at
        )

    def _changed(self, now: datetime) -> None:
        self.version += 1
        self.updated_at = now

    def summary(self) -> ConnectionSummary:
        return ConnectionSummary(
            user_id=self.user_id,
            kind=self.kind,
            state=self.state,
            scopes=self.scopes,
            expires_at=self.expires_at,
            refresh_token_expires_at=self.refresh_token_expires_at,
            account=self.account,
            version=self.version,
            issued_at=self.issued_at,
            created_at=self.created_at,
        )

    def release(self, mode: CredentialMode) -> Release:
        """What may leave the vault for `mode`. Only `file` ever carries the refresh token:
        whoever holds a refresh token can rotate it and log everybody else out."""
        if self.state == "reconnect_required":
            raise ReconnectRequired(f"user {self.user_id} must connect again")
        credentials = self.credentials if mode == "file" else self.credentials.without_refresh_token()
        return Release(credentials=credentials, expires_at=self.expires_at, scopes=self.scopes)


# --- leases ------------------------------------------------------------------------
LeaseEndReason = Literal["lease_expired", "grant_ended"]


@dataclass(eq=False)
class SandboxLease:
    """A person's lease of their credentials to one sandbox: the newest grant the vault has
    seen for (user, sandbox), and whether it has ended. Times in ms epoch.

    Rules: the newest grant (by `iat`, then `jti`) wins — a later one extends or shortens the
    lease, widens or narrows its mode. Ending a lease voids every grant signed up to the moment it
    ended (grants carry milliseconds); a grant signed after it starts the lease again."""

    user_id: str
    sandbox_id: str
    jti: str
    mode: CredentialMode
    issued_at: int
    expires_at: int
    ended_at: int | None = None
    end_reason: LeaseEndReason | None = None
    announced: bool = True
    """False while the end of this lease still has to be published (grants.ended)."""
    last_released_at: int | None = None

    @classmethod
    def of(cls, claims: GrantClaims) -> SandboxLease:
        return cls(user_id=claims.sub, sandbox_id=claims.sbx, jti=claims.jti, mode=claims.mode,
                   issued_at=claims.iat_ms, expires_at=claims.exp_ms)

    @classmethod
    def ended_before_seen(cls, user_id: str, sandbox_id: str, at_ms: int, reason: LeaseEndReason) -> SandboxLease:
        """The person ended a lease whose grant never reached the vault: remember the end, so
        that grant is void when it arrives."""
        lease = cls(user_id=user_id, sandbox_id=sandbox_id, jti="", mode="access_only", issued_at=0, expires_at=at_ms)
        lease.end(at_ms, reason)
        return lease

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def voids(self, claims: GrantClaims) -> bool:
        """A grant signed up to the moment this lease ended is void."""
        return self.ended_at is not None and claims.iat_ms <= self.ended_at

    def offer(self, claims: GrantClaims) -> bool:
        """Take `claims` if it is a newer, non-void grant for this lease. True if it changed."""
        if self.voids(claims) or not claims.newer_than(self.issued_at, self.jti):
            return False
        self.jti, self.mode = claims.jti, claims.mode
        self.issued_at, self.expires_at = claims.iat_ms, claims.exp_ms
        self.ended_at, self.end_reason, self.announced = None, None, True
        return True

    def check(self, mode: CredentialMode, now_ms: int) -> None:
        """May credentials in `mode` be released under this lease now?"""
        if self.ended_at is not None:
            raise GrantInvalid("the lease of this sandbox has ended")
        if self.expires_at <= now_ms:
            raise GrantInvalid("the lease of this sandbox has expired")
        if not mode_allows(self.mode, mode):
            raise GrantInvalid(f"mode {mode} is not within the lease ({self.mode})")

    def end(self, at_ms: int, reason: LeaseEndReason) -> bool:
        """End the lease (once; an earlier end stands). True if this call ended it."""
        if self.ended_at is not None:
            return False
        self.ended_at, self.end_reason, self.announced = at_ms, reason, False
        return True

    def expire_if_due(self, now_ms: int) -> bool:
        """A lease past its expiry ends at its expiry."""
        return self.ended_at is None and self.expires_at <= now_ms and self.end(self.expires_at, "lease_expired")


def refresh_backoff_s(
    failures: int,
    *,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before the next attempt after `failures` consecutive failures (>= 1): exponential,
    capped, with "equal jitter" (half fixed, half random) so replicas and users spread out but
    never retry at once; at least what the server asked for with Retry-After (capped)."""
    delay = Backoff(base_s, cap_s).delay(failures, rng)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay


# --- audit -------------------------------------------------------------------------
AuditValue = str | int | float | bool | None


def _clean(value: AuditValue, limit: int = 200) -> AuditValue:
    if isinstance(value, str):
        return redact_text(value)[:limit]
    return value


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit log: who did what to whose connection, and how it went.

    Only identifiers and outcomes: strings are passed through the token redactor and cut to
    size, and `detail` accepts scalars only, so a secret cannot ride along by accident."""

    actor: str
    action: str
    outcome: str = "ok"
    user_id: str | None = None
    reason: str | None = None
    event_id: str | None = None
    kek_id: str | None = None
    version: int | None = None
    detail: Mapping[str, AuditValue] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "actor", str(_clean(self.actor, 128)))
        object.__setattr__(self, "action", str(_clean(self.action, 64)))
        object.__setattr__(self, "outcome", str(_clean(self.outcome, 32)))
        object.__setattr__(self, "reason", _clean(self.reason))
        if self.detail is not None:
            cleaned: dict[str, AuditValue] = {}
            for key, value in self.detail.items():
                if not isinstance(value, (str, int, float, bool, type(None))):
                    raise TypeError("audit detail values must be scalars")
                cleaned[str(key)[:64]] = _clean(value)
            object.__setattr__(self, "detail", cleaned)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An audit entry as stored (with its id and time)."""

    id: int
    at: datetime
    entry: AuditEntry
