"""Versioned event models for every subject in design.md.

Every event carries `event_id` (also sent as the `Nats-Msg-Id` header), `user_id` and
`schema_version`. Token material never appears here in the clear: only as a `Sealed` box
(HPKE, see `shared.sealing`) addressed to the one receiver that may open it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

SCHEMA_VERSION: Literal[1] = 1

UserId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Stable id of the person (the `sub` of the caller's JWT).",
        examples=["user-42"],
    ),
]
# A sandbox id becomes a directory name under LOCAL_SANDBOX_ROOT: no separators, no dot-dot.
SandboxId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$",
        description="The platform's sandbox id (for e2b: the sandboxID).",
        examples=["sbx-123"],
    ),
]
CredentialMode = Literal["file", "access_only", "env"]
Backend = Literal["local", "e2b"]
# A compact JWS (header.payload.signature, base64url): auth's signed grant for one sandbox.
GrantToken = Annotated[
    str,
    Field(
        min_length=16,
        max_length=4096,
        pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$",
        description="The person's grant for this sandbox: a compact JWS (EdDSA) from "
        "`POST /v1/claude-code/grants`. Required unless the vault runs with CCBRIDGE_GRANTS=off.",
        examples=["eyJhbGciOiJFZERTQSIsImtpZCI6Ij…"],
    ),
]


def new_event_id() -> str:
    return uuid.uuid4().hex


def derived_event_id(cause_event_id: str, kind: str) -> str:
    """A result event's id follows from its cause, so a retried handler publishes the
    same id again and JetStream's duplicate window drops the second copy."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"ccbridge:{kind}:{cause_event_id}").hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Payload schema version.")
    event_id: str = Field(
        default_factory=new_event_id,
        min_length=8,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Unique id; also the Nats-Msg-Id header, so JetStream drops duplicates.",
        examples=["5b1f0e9c2f6a4f4b9f3c2d6f8e1a7b90"],
    )
    user_id: UserId
    occurred_at: datetime = Field(default_factory=utcnow, description="When the event happened (UTC).")


class Sealed(BaseModel):
    """An HPKE (RFC 9180) ciphertext: only the holder of `key_id`'s private key can open it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: Literal["X25519-HKDF_SHA256-AES_256_GCM"] = "X25519-HKDF_SHA256-AES_256_GCM"
    key_id: str = Field(min_length=1, max_length=64, description="Id of the receiver's public key.")
    ciphertext: str = Field(
        min_length=1, max_length=64_000, description="base64url(enc || ciphertext), single-shot HPKE."
    )


class AccountInfo(BaseModel):
    """Non-secret profile facts returned with the tokens (when the server sends them)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    account_uuid: str | None = None
    email: str | None = None
    organization_uuid: str | None = None
    organization_name: str | None = None


class TokenBundle(BaseModel):
    """The plaintext inside a `Sealed` box of `tokens.issued` and of credential replies.

    Never logged, never put on the bus unsealed: its repr hides the tokens.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_token: str = Field(min_length=1, max_length=8192, repr=False)
    refresh_token: str | None = Field(default=None, max_length=8192, repr=False)
    expires_at: int = Field(description="Access-token expiry, milliseconds since the epoch.")
    scopes: list[str] = Field(default_factory=list)


class TokensIssued(Event):
    kind: Literal["oauth", "setup_token"] = "oauth"
    sealed: Sealed = Field(description="A TokenBundle sealed to the vault's key.")
    scopes: list[str] = Field(default_factory=list, examples=[["user:inference", "user:profile"]])
    expires_at: int = Field(description="Access-token expiry (ms epoch).", examples=[1767225600000])
    refresh_token_expires_at: int | None = Field(default=None, description="Login expiry (ms epoch).")
    account: AccountInfo | None = None


class TokensRefreshed(Event):
    """Published by the vault after a successful refresh. Carries no token: holders fetch."""

    expires_at: int
    scopes: list[str] = Field(default_factory=list)
    version: int = Field(ge=1, description="Connection version after the refresh.")


class TokensRevoked(Event):
    reason: str = Field(default="user_request", max_length=200)


class TokensReconnectRequired(Event):
    reason: str = Field(max_length=200, examples=["invalid_grant"])


class TokensLoginExpiring(Event):
    """Published by the vault once per login, a while before the login (the refresh token's
    life, ~30 days; refreshing does not extend it) lapses: the person must connect again."""

    expires_at: int = Field(description="When the login lapses (ms epoch).", examples=[1769817600000])
    state: Literal["connected", "refresh_failed", "reconnect_required"] = "connected"


class SandboxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: CredentialMode | None = Field(default=None, description="Defaults to the service setting.")
    mcp: bool = Field(default=False, description="Register the claude-code MCP server.")
    config_dir: str | None = Field(
        default=None, max_length=512, description="CLAUDE_CONFIG_DIR inside the sandbox, if used."
    )


class SandboxCreated(Event):
    sandbox_id: SandboxId
    backend: Backend = "local"
    home: str | None = Field(default=None, max_length=512, examples=["/home/user"])
    user: str | None = Field(default=None, max_length=64, pattern=r"^[a-z_][a-z0-9_-]*$", examples=["user"])
    template: str | None = Field(default=None, max_length=128, description="e2b: create from this template.")
    grant: GrantToken | None = None
    options: SandboxOptions = Field(default_factory=SandboxOptions)


class SandboxDestroyed(Event):
    sandbox_id: SandboxId


FailureReason = Literal[
    "grant_required",
    "grant_invalid",
    "not_connected",
    "reconnect_required",
    "vault_unavailable",
    "vault_error",
    "backend_error",
    "backend_unavailable",
    "sandbox_not_found",
    "invalid_event",
    "max_deliveries",
]


class SandboxCredentialsInjected(Event):
    sandbox_id: SandboxId
    cause_event_id: str = Field(description="event_id of the sandbox.created this answers.")
    backend: Backend
    mode: CredentialMode
    expires_at: int = Field(description="Access-token expiry of what was injected (ms epoch).")
    files: list[str] = Field(default_factory=list, description="Paths written inside the sandbox.")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Names of environment variables the platform must set (values never travel).",
    )
    backend_sandbox_id: str | None = Field(
        default=None,
        max_length=128,
        description="e2b: the sandboxID of the sandbox created from the event's `template`; None otherwise.",
    )
    refreshed_by: str | None = Field(
        default=None,
        max_length=64,
        description="event_id of the tokens.refreshed that caused this re-injection; None for the first injection.",
    )


class SandboxCredentialsScrubbed(Event):
    """After tokens.revoked or grants.ended: the person's credential files were removed from this sandbox."""

    sandbox_id: SandboxId
    cause_event_id: str = Field(description="event_id of the tokens.revoked this answers.")
    backend: Backend
    files: list[str] = Field(default_factory=list, description="Paths removed inside the sandbox.")
    sandbox_gone: bool = Field(
        default=False, description="True when the sandbox no longer existed, so nothing was left to remove."
    )
    reason: str = Field(
        default="user_request",
        max_length=200,
        description="Copied from tokens.revoked, or from grants.ended (`lease_expired`, `grant_ended`).",
    )


class SandboxCredentialsFailed(Event):
    sandbox_id: str = Field(max_length=256)
    cause_event_id: str
    reason: FailureReason
    detail: str = Field(default="", max_length=500)
    retryable: bool = False


# --- vault.credentials.get (core request/reply) ------------------------------
class CredentialsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(default_factory=new_event_id, min_length=8, max_length=64)
    user_id: UserId
    sandbox_id: SandboxId | None = Field(default=None, description="The sandbox the credentials are for.")
    grant: GrantToken | None = None
    mode: CredentialMode = "access_only"
    requester_key_id: str = Field(min_length=1, max_length=64)
    requester_public_key: str = Field(min_length=1, max_length=512, description="base64url raw public key.")


# `unavailable`: the vault could not answer in time (database outage, overload) — retry later.
CredentialsError = Literal[
    "not_connected",
    "reconnect_required",
    "unauthorized_requester",
    "invalid_request",
    "internal",
    "unavailable",
    "grant_required",
    "grant_invalid",
]


class CredentialsReply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    ok: bool
    error: CredentialsError | None = None
    sealed: Sealed | None = Field(default=None, description="TokenBundle sealed to the requester.")
    expires_at: int | None = None
    scopes: list[str] = Field(default_factory=list)
    detail: str = Field(default="", max_length=200, description="Why a request was refused (no secrets).")
    lease_expires_at: int | None = Field(
        default=None, description="When the sandbox's lease (its newest grant) ends (ms epoch); None without grants."
    )


# --- vault.credentials.get, version 2: many sandboxes in one request -------------------
MAX_BATCH_ITEMS = 256


class CredentialsItem(BaseModel):
    """One sandbox's part of a batched credentials request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(default_factory=new_event_id, min_length=8, max_length=64)
    user_id: UserId
    sandbox_id: SandboxId | None = None
    grant: GrantToken | None = None
    mode: CredentialMode = "access_only"


class CredentialsBatchRequest(BaseModel):
    """sandbox → vault: credentials for several sandboxes (of any people) at once. One database
    read and one sealed box answer them all; each item succeeds or fails on its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[2] = 2
    request_id: str = Field(default_factory=new_event_id, min_length=8, max_length=64)
    requester_key_id: str = Field(min_length=1, max_length=64)
    requester_public_key: str = Field(min_length=1, max_length=512, description="base64url raw public key.")
    items: list[CredentialsItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)

    @model_validator(mode="after")
    def _unique_item_ids(self) -> CredentialsBatchRequest:
        if len({item.request_id for item in self.items}) != len(self.items):
            raise ValueError("item request_ids must be unique")
        return self


class CredentialsItemResult(BaseModel):
    """The answer for one item: ok (its bundle is in the reply's sealed box), or why not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    ok: bool
    error: CredentialsError | None = None
    detail: str = Field(default="", max_length=200)
    expires_at: int | None = None
    scopes: list[str] = Field(default_factory=list)
    lease_expires_at: int | None = None


class CredentialsBatchReply(BaseModel):
    """vault → sandbox. `ok` false (with `error`) when the whole request was refused (untrusted
    requester, malformed, vault unavailable); otherwise one result per item, and `sealed` holds
    a `ReleasedItems` with the bundle of every ok item, sealed to the requester."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[2] = 2
    request_id: str
    ok: bool
    error: CredentialsError | None = None
    items: list[CredentialsItemResult] = Field(default_factory=list)
    sealed: Sealed | None = Field(default=None, description="ReleasedItems sealed to the requester.")


class ReleasedItem(BaseModel):
    """Inside the sealed box: whose bundle, for which sandbox (checked by the requester)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str
    user_id: UserId
    sandbox_id: SandboxId | None = None
    bundle: TokenBundle


class ReleasedItems(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    items: list[ReleasedItem]


def _request_version(value: Any) -> str:
    raw = value.get("schema_version") if isinstance(value, dict) else getattr(value, "schema_version", None)
    return "v2" if raw == 2 else "v1"


# What `vault.credentials.get` accepts and answers: version 1 (one sandbox) or 2 (a batch).
AnyCredentialsRequest = Annotated[
    Annotated[CredentialsRequest, Tag("v1")] | Annotated[CredentialsBatchRequest, Tag("v2")],
    Discriminator(_request_version),
]
AnyCredentialsReply = CredentialsReply | CredentialsBatchReply


# --- vault.connections.status (core request/reply) ---------------------------
ConnectionState = Literal["connected", "refresh_failed", "reconnect_required"]
ConnectionKind = Literal["oauth", "setup_token"]


class ConnectionStatusRequest(BaseModel):
    """auth → vault: what does the vault hold for this person? (No token ever in the answer.)"""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    user_id: UserId


class ConnectionStatusReply(BaseModel):
    """vault → auth. `connected` is False (and the rest empty) when the vault holds nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    connected: bool
    state: ConnectionState | None = Field(default=None, description="None when not connected.")
    kind: ConnectionKind | None = None
    scopes: list[str] = Field(default_factory=list)
    expires_at: int | None = Field(default=None, description="Access-token expiry (ms epoch).")
    refresh_token_expires_at: int | None = Field(default=None, description="Login expiry (ms epoch), if known.")
    account: AccountInfo | None = None
    version: int | None = Field(default=None, ge=1, description="Connection version (1 = first connect).")


# --- grants (leases of a person's credentials to one sandbox) -----------------------------
class GrantIssued(Event):
    """auth → vault: a grant was signed. How a newer lease (longer, shorter) reaches a sandbox
    that is already live; the vault keeps the newest grant per person and sandbox."""

    sandbox_id: SandboxId
    grant: GrantToken


class GrantRevoked(Event):
    """auth → vault: the person ended the lease of one sandbox."""

    sandbox_id: SandboxId
    reason: str = Field(default="grant_ended", max_length=200)


class GrantEnded(Event):
    """vault → sandbox service (and the platform): a lease is over; the sandbox is scrubbed.
    A grant issued after `ended_at` starts a new lease."""

    sandbox_id: SandboxId
    reason: Literal["lease_expired", "grant_ended"]
    ended_at: int = Field(description="When the lease ended (ms epoch, the vault's clock).")


class GrantsListRequest(BaseModel):
    """auth → vault: the live leases of a person."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    user_id: UserId


class GrantView(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sandbox_id: SandboxId
    mode: CredentialMode = Field(description="The strongest mode the grant allows.")
    issued_at: int = Field(description="When the newest grant was signed (ms epoch).")
    expires_at: int = Field(description="When the lease ends (ms epoch).")
    last_injected_at: int | None = Field(default=None, description="Last release of credentials (ms epoch).")


class GrantsListReply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    grants: list[GrantView] = Field(default_factory=list)


EVENT_MODELS: dict[str, type[Event]] = {}


def _register() -> None:
    from shared import subjects as s

    EVENT_MODELS.update(
        {
            s.TOKENS_ISSUED: TokensIssued,
            s.TOKENS_REFRESHED: TokensRefreshed,
            s.TOKENS_REVOKED: TokensRevoked,
            s.TOKENS_RECONNECT_REQUIRED: TokensReconnectRequired,
            s.TOKENS_LOGIN_EXPIRING: TokensLoginExpiring,
            s.SANDBOX_CREATED: SandboxCreated,
            s.SANDBOX_DESTROYED: SandboxDestroyed,
            s.SANDBOX_CREDENTIALS_INJECTED: SandboxCredentialsInjected,
            s.SANDBOX_CREDENTIALS_FAILED: SandboxCredentialsFailed,
            s.SANDBOX_CREDENTIALS_SCRUBBED: SandboxCredentialsScrubbed,
            s.GRANTS_ISSUED: GrantIssued,
            s.GRANTS_REVOKED: GrantRevoked,
            s.GRANTS_ENDED: GrantEnded,
        }
    )


_register()
