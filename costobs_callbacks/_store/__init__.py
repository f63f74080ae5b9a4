"""SQLAlchemy storage: the spans, the runs' totals and the hourly rollups of one database. Dialect-neutral
SQLAlchemy 2.x Core, with a fast path each for SQLite and PostgreSQL.

The data flow, module by module: ``schema`` (the tables, their columns in row order, the query keys) ->
``fitting`` (values made to fit their columns, data errors told from outages) -> ``rows`` (a batch of the
ledger's spans and runs as span, run and rollup rows, or in the spool's neutral form) -> ``writes`` (a batch in
one transaction: run and rollup upserts per dialect) -> ``queries`` (``run_cost``, ``spend``, ``top_runs``,
``rollup``, ``spans_of``); ``applied`` (the ids of the batches applied, so that each is applied once);
``migrate`` (Alembic, under a lock) and ``store`` (``Store``: one database, all of the above on its engine).

Every batch adds its spans to the hourly rollup table (``costobs_rollups_hourly``) and to the rollups by one key
(``costobs_rollups_keyed``, ``keyed``: by hour and by day) in the same transaction, so ``rollup()`` reads hours or
days, not spans.
"""

from .migrate import _backfill_rollups, _sqlite_write_lock, migrations_dir
from .queries import RollupRow, run_matches
from .rows import _tier_variant
from .schema import (
    _ROLLUP_COLS,
    HEAD_REVISION,
    ROLLUP_KEYS,
    RUN_KEYS,
    batches,
    meta_kv,
    metadata,
    rollups,
    rollups_keyed,
    runs,
    spans,
)
from .store import Store

__all__ = [
    "HEAD_REVISION", "ROLLUP_KEYS", "RUN_KEYS", "RollupRow", "Store", "_ROLLUP_COLS", "_backfill_rollups",
    "_sqlite_write_lock", "_tier_variant", "batches", "meta_kv", "metadata", "migrations_dir", "rollups",
    "rollups_keyed",
    "run_matches", "runs", "spans",
]
