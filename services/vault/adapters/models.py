"""The vault's tables (SQLAlchemy 2 declarative models), one `metadata` for Alembic.

The schema is owned by the migrations in `services/vault/migrations/`; these models must match
them exactly (tests/integration/test_vault_migrations.py compares the two on SQLite and
PostgreSQL).

- `connections`: one row per person — state, scopes, expiries, version, the refresher's
  schedule and lease. No secret.
- `sealed_secrets`: the encrypted tokens of a connection (envelope: KEK id, wrapped data key,
  nonce, ciphertext), 1:1 with `connections` (FK, ON DELETE CASCADE). Kept apart so that
  everything that does not need a token (the refresher's scan, status queries, metrics,
  reporting) never reads ciphertext, rotation touches one narrow table, and a revoke deletes
  exactly the row that holds the data key.
- `processed_events`: ids of consumed events (idempotency), with a retention cleanup.
- `revocations`: tombstones — when a user was last revoked, so a late `tokens.issued` from
  before that moment cannot bring the tokens back.
- `audit_log`: who did what, when, to whom — never a token, key or ciphertext.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class ConnectionRow(Base):
    __tablename__ = "connections"

    user_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    expires_at: Mapped[int] = mapped_column(BigInteger, doc="Access-token expiry, ms since the epoch.")
    refresh_token_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, doc="Login expiry (ms).")
    account: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    version: Mapped[int] = mapped_column(Integer)
    issued_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, doc="occurred_at of the tokens.issued that started this login."
    )
    refreshable: Mapped[bool] = mapped_column(
        Boolean, server_default=false(), doc="oauth with a refresh token: the refresher's business."
    )
    refresh_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_refresh_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, doc="Backoff gate (ms).")
    last_refresh_error: Mapped[str | None] = mapped_column(String(64), nullable=True)
    refreshed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    login_warned_for: Mapped[int | None] = mapped_column(
        BigInteger, nullable=True, doc="The refresh_token_expires_at a tokens.login_expiring was sent for."
    )
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[int | None] = mapped_column(BigInteger, nullable=True, doc="Refresh lease expiry (ms).")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        Index("ix_connections_refresh_due", "refreshable", "expires_at"),
        Index("ix_connections_login_expiry", "refresh_token_expires_at"),
    )


class SealedSecretRow(Base):
    __tablename__ = "sealed_secrets"

    user_id: Mapped[str] = mapped_column(
        String(256), ForeignKey("connections.user_id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, doc="= connections.version; bound into the AAD.")
    kek_id: Mapped[str] = mapped_column(String(64), index=True)
    wrapped_data_key: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProcessedEventRow(Base):
    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(128))
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class RevocationRow(Base):
    __tablename__ = "revocations"

    user_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    event_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128), doc="Who: vault:<instance>, operator:<user>@<host>, …")
    action: Mapped[str] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str | None] = mapped_column(String(256), nullable=True, index=True)
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    event_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kek_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class SandboxLeaseRow(Base):
    """A person's lease of their credentials to one sandbox: the newest grant seen (ms epoch)."""

    __tablename__ = "sandbox_leases"
    __table_args__ = (Index("ix_sandbox_leases_sweep", "ended_at", "expires_at"),)

    user_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    sandbox_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    jti: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    ended_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    announced: Mapped[bool] = mapped_column(Boolean, default=True)
    last_released_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


metadata = Base.metadata

__all__ = [
    "AuditRow",
    "Base",
    "ConnectionRow",
    "SandboxLeaseRow",
    "ProcessedEventRow",
    "RevocationRow",
    "SealedSecretRow",
    "metadata",
    "utcnow",
]
