"""Hourly rollups kept as batches land; spans carry their run's ``tier`` and ``variant`` and which one opened it.

The rollup table is filled from the spans already stored, so an upgraded database's rollups equal its spans.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_SUMS = ("cost", "inp", "out", "cr", "cw", "rsn", "saved")
_COUNTS = ("llm_calls", "tool_calls", "runs", "calls", "unpriced_calls", "estimated_calls", "cache_hits", "latency_us")


def upgrade() -> None:
    from costobs_callbacks._store import _backfill_rollups, _tier_variant

    op.add_column("costobs_spans", sa.Column("tier", sa.String(256)))
    op.add_column("costobs_spans", sa.Column("variant", sa.String(256)))
    op.add_column("costobs_spans", sa.Column("opens_run", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "costobs_rollups_hourly",
        sa.Column("hour", sa.Integer(), nullable=False),
        sa.Column("gkey", sa.String(32), nullable=False),
        sa.Column("feature", sa.String(256), nullable=False),
        sa.Column("route", sa.String(256)),
        sa.Column("tenant_id", sa.String(256)),
        sa.Column("tier", sa.String(256)),
        sa.Column("user_hash", sa.String(64)),
        sa.Column("model", sa.String(256)),
        sa.Column("provider", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(256)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("prompt_version", sa.String(256)),
        sa.Column("variant", sa.String(256)),
        *(sa.Column(f"{n}_{h}", sa.BigInteger(), nullable=False, server_default="0")
          for n in _SUMS for h in ("hi", "lo")),
        *(sa.Column(n, sa.BigInteger(), nullable=False, server_default="0") for n in _COUNTS),
        sa.Column("latency_max_ms", sa.Float()),
        sa.PrimaryKeyConstraint("hour", "gkey", name="pk_costobs_rollups_hourly"),
    )
    op.create_index("ix_costobs_rollups_feature_hour", "costobs_rollups_hourly", ["feature", "hour"])
    op.create_index("ix_costobs_rollups_tenant_hour", "costobs_rollups_hourly", ["tenant_id", "hour"])

    conn = op.get_bind()
    spans = sa.table("costobs_spans", sa.column("id"), sa.column("run_id"), sa.column("parent_id"),
                     sa.column("tier"), sa.column("variant"), sa.column("opens_run", sa.Boolean()))
    runs = sa.table("costobs_runs", sa.column("run_id"), sa.column("attributes", sa.JSON()))
    # the run's tier and variant on each of its spans
    tagged = []
    for run_id, attrs in conn.execute(sa.select(runs.c.run_id, runs.c.attributes)
                                      .where(runs.c.attributes.is_not(None))):
        if isinstance(attrs, dict) and (attrs.get("tier") is not None or attrs.get("variant") is not None):
            tier, variant = _tier_variant(attrs)
            tagged.append({"rid": run_id, "t": tier, "v": variant})
    if tagged:
        conn.execute(sa.update(spans).where(spans.c.run_id == sa.bindparam("rid"))
                     .values(tier=sa.bindparam("t"), variant=sa.bindparam("v")), tagged)
    # the span that opened each run: its first root span (a root has no stored parent)
    first = sa.select(sa.func.min(spans.c.id)).where(spans.c.parent_id.is_(None)).group_by(spans.c.run_id)
    conn.execute(sa.update(spans).where(spans.c.id.in_(first.scalar_subquery())).values(opens_run=True))
    _backfill_rollups(conn)


def downgrade() -> None:
    op.drop_index("ix_costobs_rollups_tenant_hour", "costobs_rollups_hourly")
    op.drop_index("ix_costobs_rollups_feature_hour", "costobs_rollups_hourly")
    op.drop_table("costobs_rollups_hourly")
    with op.batch_alter_table("costobs_spans") as batch:
        batch.drop_column("opens_run")
        batch.drop_column("variant")
        batch.drop_column("tier")
