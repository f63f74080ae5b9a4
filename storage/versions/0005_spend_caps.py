"""Spend caps held across replicas: an account per (tenant or user, period), the leases replicas hold on it, and a
rate bucket per throttled tenant or user (see ``costobs_callbacks/_caps/accounts.py``). The hourly rollups get an
index by user, as by tenant: an account reads its period's spend from them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _key() -> list[sa.Column[object]]:
    return [
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("scope_id", sa.String(256), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("period_start", _BigInt, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "costobs_cap_accounts",
        *_key(),
        sa.Column("cap_nanos", _BigInt, nullable=False),
        sa.Column("reported_nanos", _BigInt, nullable=False, server_default="0"),
        sa.Column("rollup_nanos", _BigInt, nullable=False, server_default="0"),
        sa.Column("leased_nanos", _BigInt, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "scope_id", "period", "period_start", name="pk_costobs_cap_accounts"),
    )
    op.create_table(
        "costobs_cap_leases",
        *_key(),
        sa.Column("holder", sa.String(32), nullable=False),
        sa.Column("amount_nanos", _BigInt, nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "scope_id", "period", "period_start", "holder",
                                name="pk_costobs_cap_leases"),
    )
    op.create_table(
        "costobs_cap_buckets",
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("scope_id", sa.String(256), nullable=False),
        sa.Column("level_nanos", _BigInt, nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "scope_id", name="pk_costobs_cap_buckets"),
    )
    op.create_index("ix_costobs_rollups_user_hour", "costobs_rollups_hourly", ["user_hash", "hour"])


def downgrade() -> None:
    op.drop_index("ix_costobs_rollups_user_hour", "costobs_rollups_hourly")
    op.drop_table("costobs_cap_buckets")
    op.drop_table("costobs_cap_leases")
    op.drop_table("costobs_cap_accounts")
