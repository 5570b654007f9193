"""Production schema: sealed secrets in their own table, refresher schedule and lease,
revocation tombstones, audit log, retention index on processed_events.

The sealed secret moves byte for byte (no decryption needed: its AAD names user, version and
KEK id, not the table).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SECRET_COLUMNS = ("kek_id", "wrapped_data_key", "nonce", "ciphertext")
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sealed_secrets",
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=False),
        sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["connections.user_id"], name="fk_sealed_secrets_user_id_connections", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", name="pk_sealed_secrets"),
    )
    op.create_index("ix_sealed_secrets_kek_id", "sealed_secrets", ["kek_id"])
    op.execute(
        "INSERT INTO sealed_secrets (user_id, version, kek_id, wrapped_data_key, nonce, ciphertext, updated_at) "
        "SELECT user_id, version, kek_id, wrapped_data_key, nonce, ciphertext, updated_at FROM connections"
    )

    with op.batch_alter_table("connections") as batch:
        for name in SECRET_COLUMNS:
            batch.drop_column(name)
        batch.add_column(sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("refreshable", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("refresh_failures", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("next_refresh_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("last_refresh_error", sa.String(64), nullable=True))
        batch.add_column(sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("login_warned_for", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("lease_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.BigInteger(), nullable=True))
        batch.create_index("ix_connections_refresh_due", ["refreshable", "expires_at"])
        batch.create_index("ix_connections_login_expiry", ["refresh_token_expires_at"])
    # Skeleton rows: an oauth connection may refresh; the refresher learns on first decrypt
    # whether a refresh token is really there (and clears the flag if not).
    op.execute("UPDATE connections SET refreshable = (kind = 'oauth')")

    op.create_index("ix_processed_events_processed_at", "processed_events", ["processed_at"])

    op.create_table(
        "revocations",
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("user_id", name="pk_revocations"),
    )
    op.create_index("ix_revocations_revoked_at", "revocations", ["revoked_at"])

    op.create_table(
        "audit_log",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(256), nullable=True),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("event_id", sa.String(64), nullable=True),
        sa.Column("kek_id", sa.String(64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_audit_log_user_id", "audit_log", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_user_id", table_name="audit_log")
    op.drop_index("ix_audit_log_action", table_name="audit_log")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_index("ix_revocations_revoked_at", table_name="revocations")
    op.drop_table("revocations")
    op.drop_index("ix_processed_events_processed_at", table_name="processed_events")

    with op.batch_alter_table("connections") as batch:
        batch.drop_index("ix_connections_login_expiry")
        batch.drop_index("ix_connections_refresh_due")
        for name in ("lease_until", "lease_owner", "login_warned_for", "refreshed_at", "last_refresh_error",
                     "next_refresh_at", "refresh_failures", "refreshable", "issued_at"):
            batch.drop_column(name)
        batch.add_column(sa.Column("kek_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("wrapped_data_key", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("nonce", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("ciphertext", sa.LargeBinary(), nullable=True))
    for name in SECRET_COLUMNS:
        op.execute(
            f"UPDATE connections SET {name} = "
            f"(SELECT s.{name} FROM sealed_secrets s WHERE s.user_id = connections.user_id)"
        )
    # A connection without its secret is useless in the old layout.
    op.execute("DELETE FROM connections WHERE ciphertext IS NULL")
    with op.batch_alter_table("connections") as batch:
        batch.alter_column("kek_id", existing_type=sa.String(64), nullable=False)
        batch.alter_column("wrapped_data_key", existing_type=sa.LargeBinary(), nullable=False)
        batch.alter_column("nonce", existing_type=sa.LargeBinary(), nullable=False)
        batch.alter_column("ciphertext", existing_type=sa.LargeBinary(), nullable=False)
    op.drop_index("ix_sealed_secrets_kek_id", table_name="sealed_secrets")
    op.drop_table("sealed_secrets")
