"""Leases: the newest grant per (user, sandbox), whether it ended, and whether that end was
announced (grants.ended).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sandbox_leases",
        sa.Column("user_id", sa.String(256), nullable=False),
        sa.Column("sandbox_id", sa.String(128), nullable=False),
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column("announced", sa.Boolean(), nullable=False),
        sa.Column("last_released_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("user_id", "sandbox_id", name="pk_sandbox_leases"),
    )
    op.create_index("ix_sandbox_leases_sweep", "sandbox_leases", ["ended_at", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_sandbox_leases_sweep", table_name="sandbox_leases")
    op.drop_table("sandbox_leases")
