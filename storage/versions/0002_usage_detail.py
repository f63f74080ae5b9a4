"""Spans: what a provider reports beside the five token counts that changes a call's price.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMNs (SQLite takes them in place: a default makes NOT NULL valid for the rows already there)
    op.add_column("costobs_spans", sa.Column("cache_write_1h_tokens", sa.BigInteger(), nullable=False,
                                             server_default="0"))
    op.add_column("costobs_spans", sa.Column("service_tier", sa.String(32)))
    op.add_column("costobs_spans", sa.Column("web_search_requests", sa.Integer(), nullable=False,
                                             server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("costobs_spans") as batch:
        batch.drop_column("web_search_requests")
        batch.drop_column("service_tier")
        batch.drop_column("cache_write_1h_tokens")
