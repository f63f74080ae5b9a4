"""Rollups by one key (``costobs_rollups_keyed``): the hourly rollups summed per key value, by hour and by UTC day,
so that a rollup by one key reads as many rows as its answer has (see ``costobs_callbacks._store.keyed``).

The table is filled from the hourly rollups already stored, so an upgraded database answers as before.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_SUMS = ("cost", "inp", "out", "cr", "cw", "rsn", "saved")
_COUNTS = ("llm_calls", "tool_calls", "runs", "calls", "unpriced_calls", "estimated_calls", "cache_hits", "latency_us")


def upgrade() -> None:
    from costobs_callbacks._store.keyed import backfill

    op.create_table(
        "costobs_rollups_keyed",
        sa.Column("dim", sa.String(16), nullable=False),
        sa.Column("grain", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("vkey", sa.String(32), nullable=False),
        sa.Column("value", sa.String(256)),
        *(sa.Column(f"{n}_{h}", sa.BigInteger(), nullable=False, server_default="0")
          for n in _SUMS for h in ("hi", "lo")),
        *(sa.Column(n, sa.BigInteger(), nullable=False, server_default="0") for n in _COUNTS),
        sa.Column("latency_max_ms", sa.Float()),
        sa.PrimaryKeyConstraint("dim", "grain", "bucket", "vkey", name="pk_costobs_rollups_keyed"),
    )
    backfill(op.get_bind())


def downgrade() -> None:
    op.drop_table("costobs_rollups_keyed")
