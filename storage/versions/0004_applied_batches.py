"""The ids of the batches applied, so that a batch is applied once (see ``costobs_callbacks/_store/applied.py``):
a retried or replayed batch whose first write committed unheard is not written again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # bytewise order on PostgreSQL too (the ids begin with their time: prune deletes a range)
    pg = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "costobs_batches",
        sa.Column("batch_id", sa.String(32, collation="C") if pg else sa.String(32), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("costobs_batches")
