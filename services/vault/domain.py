"""The vault's domain: one `Connection` per user (the aggregate), its credentials as a value
object whose repr never shows a token, and the rules for what may leave the vault.

Pure Python: no I/O, no crypto, no SQL. The store encrypts `Credentials` at rest; use cases
seal them for the bus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, get_args

from services.vault.errors import ReconnectRequired

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
class Grant:
    """Credentials released for one request, in the shape the requested mode allows."""

    credentials: Credentials
    expires_at: int
    scopes: tuple[str, ...]


@dataclass(eq=False)
class Connection:
    """A person's Claude account as the vault holds it. `version` counts changes (1 = first)."""

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

    def __repr__(self) -> str:  # dataclass repr would be fine (Credentials hides), but be explicit
        return (
            f"Connection(user_id={self.user_id!r}, kind={self.kind!r}, state={self.state!r}, "
            f"version={self.version}, expires_at={self.expires_at})"
        )

    @classmethod
    def connect(
        cls,
        *,
        user_id: str,
        kind: ConnectionKind,
        credentials: Credentials,
        scopes: tuple[str, ...] | list[str],
        expires_at: int,
        refresh_token_expires_at: int | None,
        account: Account | None,
        now: datetime,
    ) -> Connection:
        """A first connection for this user."""
        return cls(
            user_id=user_id,
            kind=kind,
            state="connected",
            credentials=credentials,
            scopes=tuple(scopes),
            expires_at=expires_at,
            refresh_token_expires_at=refresh_token_expires_at,
            account=account,
            version=1,
            created_at=now,
            updated_at=now,
        )

    def reconnect(
        self,
        *,
        kind: ConnectionKind,
        credentials: Credentials,
        scopes: tuple[str, ...] | list[str],
        expires_at: int,
        refresh_token_expires_at: int | None,
        account: Account | None,
        now: datetime,
    ) -> None:
        """The person connected again: new tokens replace the old ones, whatever the state."""
        self.kind = kind
        self.credentials = credentials
        self.scopes = tuple(scopes)
        self.expires_at = expires_at
        self.refresh_token_expires_at = refresh_token_expires_at
        self.account = account or self.account
        self.state = "connected"
        self._changed(now)

    def _changed(self, now: datetime) -> None:
        self.version += 1
        self.updated_at = now

    @property
    def can_refresh(self) -> bool:
        return self.kind == "oauth" and self.credentials.refresh_token is not None

    def grant(self, mode: CredentialMode) -> Grant:
        """What may leave the vault for `mode`. Only `file` ever carries the refresh token:
        whoever holds a refresh token can rotate it and log everybody else out."""
        if self.state == "reconnect_required":
            raise ReconnectRequired(f"user {self.user_id} must connect again")
        credentials = self.credentials if mode == "file" else self.credentials.without_refresh_token()
        return Grant(credentials=credentials, expires_at=self.expires_at, scopes=self.scopes)
