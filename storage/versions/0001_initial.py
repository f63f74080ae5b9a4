"""Initial schema: spans, per-run summaries, metadata (the user-id salt).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "costobs_spans",
        sa.Column("id", BigInt, primary_key=True, autoincrement=True),
        sa.Column("span_id", sa.String(64), nullable=False),
        sa.Column("parent_id", sa.String(64)),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(256)),
        sa.Column("model", sa.String(256)),
        sa.Column("provider", sa.String(64)),
        sa.Column("start_at", sa.DateTime(), nullable=False),
        sa.Column("end_at", sa.DateTime(), nullable=False),
        sa.Column("hour", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.String(128)),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cost_nanos", sa.BigInteger()),
        sa.Column("tree_cost_nanos", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("unpriced", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("estimated", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("cache_hit", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("saved_nanos", sa.BigInteger()),
        sa.Column("price_source", sa.String(64)),
        sa.Column("price_input", sa.String(40)),
        sa.Column("price_output", sa.String(40)),
        sa.Column("price_cache_read", sa.String(40)),
        sa.Column("price_cache_write", sa.String(40)),
        sa.Column("flags", sa.String(256)),
        sa.Column("feature", sa.String(256), nullable=False),
        sa.Column("route", sa.String(256)),
        sa.Column("tenant_id", sa.String(256)),
        sa.Column("user_hash", sa.String(64)),
        sa.Column("prompt_version", sa.String(256)),
    )
    op.create_index("ix_costobs_spans_run_id", "costobs_spans", ["run_id"])
    op.create_index("ix_costobs_spans_hour", "costobs_spans", ["hour"])
    op.create_index("ix_costobs_spans_feature_hour", "costobs_spans", ["feature", "hour"])
    op.create_index("ix_costobs_spans_tenant_hour", "costobs_spans", ["tenant_id", "hour"])
    op.create_table(
        "costobs_runs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("feature", sa.String(256), nullable=False),
        sa.Column("route", sa.String(256)),
        sa.Column("tenant_id", sa.String(256)),
        sa.Column("user_hash", sa.String(64)),
        sa.Column("prompt_version", sa.String(256)),
        sa.Column("attributes", sa.JSON()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64)),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime()),
        sa.Column("invocations", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("cost_nanos", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("llm_calls", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("tool_calls", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("unpriced_calls", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("estimated_calls", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("span_count", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_costobs_runs_started_at", "costobs_runs", ["started_at"])
    op.create_table(
        "costobs_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(512), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("costobs_meta")
    op.drop_index("ix_costobs_runs_started_at", table_name="costobs_runs")
    op.drop_table("costobs_runs")
    for ix in ("ix_costobs_spans_tenant_hour", "ix_costobs_spans_feature_hour", "ix_costobs_spans_hour",
               "ix_costobs_spans_run_id"):
        op.drop_index(ix, table_name="costobs_spans")
    op.drop_table("costobs_spans")
