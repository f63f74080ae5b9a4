"""The tables, the order of their columns in the rows the write paths build, and the keys the queries read.

Money is integer nano-USD (``BIGINT``), exact on every database; unit prices are stored as decimal text for audit.
Times are naive UTC; ``hour`` is the span's start in whole hours since the epoch, so hourly and daily buckets are
integer arithmetic on any dialect. ``HEAD_REVISION`` is the Alembic revision these tables are (``migrate``).
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

__all__ = ["HEAD_REVISION", "ROLLUP_KEYS", "RUN_KEYS", "batches", "meta_kv", "metadata", "rollups", "rollups_keyed",
           "runs", "spans"]

HEAD_REVISION = "0007"

metadata = sa.MetaData()

_BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

spans = sa.Table(
    "costobs_spans",
    metadata,
    sa.Column("id", _BigInt, primary_key=True, autoincrement=True),
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
    sa.Column("cache_write_1h_tokens", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("service_tier", sa.String(32)),
    sa.Column("web_search_requests", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("tier", sa.String(256)),
    sa.Column("variant", sa.String(256)),
    sa.Column("opens_run", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Index("ix_costobs_spans_run_id", "run_id"),
    sa.Index("ix_costobs_spans_hour", "hour"),
    sa.Index("ix_costobs_spans_feature_hour", "feature", "hour"),
    sa.Index("ix_costobs_spans_tenant_hour", "tenant_id", "hour"),
)

runs = sa.Table(
    "costobs_runs",
    metadata,
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
    sa.Index("ix_costobs_runs_started_at", "started_at"),
)

meta_kv = sa.Table(
    "costobs_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(512), nullable=False),
)

batches = sa.Table(
    "costobs_batches",
    metadata,
    sa.Column("batch_id", sa.String(32).with_variant(sa.String(32, collation="C"), "postgresql"), primary_key=True),
)
"""The ids of the batches applied (``applied``: exactly once), each inserted in its batch's transaction. An id is
32 hex digits that begin with the time the batch was formed, so that text order is time order (bytewise: the
``C`` collation on PostgreSQL, SQLite's default) and pruning takes a range of the primary key."""

_RSUMS = ("cost", "inp", "out", "cr", "cw", "rsn", "saved")
"""The rollup's money and token sums, each kept in two BIGINT halves (``<name>_hi`` the sum of the figures'
high 32 bits, ``<name>_lo`` of their low 32 bits): a group's total may pass BIGINT (figures held at its ceiling),
its halves do not."""

_RCOUNTS = ("llm_calls", "tool_calls", "runs", "calls", "unpriced_calls", "estimated_calls", "cache_hits",
            "latency_us")

rollups = sa.Table(
    "costobs_rollups_hourly",
    metadata,
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
    *(sa.Column(f"{n}_{h}", sa.BigInteger(), nullable=False, server_default="0") for n in _RSUMS for h in ("hi", "lo")),
    *(sa.Column(n, sa.BigInteger(), nullable=False, server_default="0") for n in _RCOUNTS),
    sa.Column("latency_max_ms", sa.Float()),
    sa.PrimaryKeyConstraint("hour", "gkey", name="pk_costobs_rollups_hourly"),
    sa.Index("ix_costobs_rollups_feature_hour", "feature", "hour"),
    sa.Index("ix_costobs_rollups_tenant_hour", "tenant_id", "hour"),
)
"""One row per hour and combination of the rollup keys, kept by every batch in the transaction of its spans.

Keys may be NULL, and a unique index does not match NULLs (on SQLite, nor on PostgreSQL before 15's ``NULLS NOT
DISTINCT``): the conflict target is ``(hour, gkey)``, ``gkey`` a digest of the keys with NULL told apart from any
text (``_gkey``). The key columns keep their values as the spans have them, NULLs included, for the queries."""

rollups_keyed = sa.Table(
    "costobs_rollups_keyed",
    metadata,
    sa.Column("dim", sa.String(16), nullable=False),
    sa.Column("grain", sa.Integer(), nullable=False),
    sa.Column("bucket", sa.Integer(), nullable=False),
    sa.Column("vkey", sa.String(32), nullable=False),
    sa.Column("value", sa.String(256)),
    *(sa.Column(f"{n}_{h}", sa.BigInteger(), nullable=False, server_default="0") for n in _RSUMS for h in ("hi", "lo")),
    *(sa.Column(n, sa.BigInteger(), nullable=False, server_default="0") for n in _RCOUNTS),
    sa.Column("latency_max_ms", sa.Float()),
    sa.PrimaryKeyConstraint("dim", "grain", "bucket", "vkey", name="pk_costobs_rollups_keyed"),
)
"""The hourly rollups summed by one key (``dim``, one of ``keyed.KEYED``) and its value, per hour (``grain`` 1,
``bucket`` the hour) and per UTC day (``grain`` 24, ``bucket`` the day): see ``keyed``. ``vkey`` is the value's
digest (``_gkey``), NULL told apart."""

_RKEY_COLS = ("feature", "route", "tenant_id", "tier", "user_hash", "model", "provider", "kind", "name", "status",
              "prompt_version", "variant")
"""The rollup table's key columns (beside ``hour``), in its order."""

ROLLUP_KEYS: dict[str, sa.ColumnElement[Any]] = {
    "feature": spans.c.feature,
    "route": spans.c.route,
    "tenant_id": spans.c.tenant_id,
    "tier": spans.c.tier,
    "variant": spans.c.variant,
    "user": spans.c.user_hash,
    "model": spans.c.model,
    "provider": spans.c.provider,
    "kind": spans.c.kind,
    "name": spans.c.name,
    "status": spans.c.status,
    "prompt_version": spans.c.prompt_version,
}

RUN_KEYS: dict[str, sa.ColumnElement[Any]] = {
    "feature": runs.c.feature,
    "route": runs.c.route,
    "tenant_id": runs.c.tenant_id,
    "user": runs.c.user_hash,
    "prompt_version": runs.c.prompt_version,
}
"""The rollup keys that are a run's own attribution (its summary row's columns; ``RunCost.attributes``' keys)."""

_CALL_KINDS = ("llm", "embedding", "tool", "retriever")
_LLM_KINDS = ("llm", "embedding")

_MODEL_KEYS = frozenset({"model", "provider"})
"""Keys only model calls carry: a rollup by one counts the model calls (LLM and embedding spans) alone."""

_ROLLUP_COL_OF = {k: ("user_hash" if k == "user" else k) for k in ROLLUP_KEYS}
"""A rollup key's column, in the spans table and in the rollup table alike."""


# -- the rows the write paths build: their columns in order, and the positions read by name ---------------

_BIG_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1

_RUN_SUMS = (
    "cost_nanos", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
    "llm_calls", "tool_calls", "unpriced_calls", "estimated_calls", "span_count", "invocations",
)
_RUN_COLS = (
    "run_id", "feature", "route", "tenant_id", "user_hash", "prompt_version", "attributes", "status", "reason",
    "started_at", "ended_at", *_RUN_SUMS,
)
_BIG_SUMS = frozenset(_RUN_SUMS[:6])
"""The BIGINT totals of a run (money and tokens); the others are INTEGER counts."""

_SPAN_COLS: tuple[str, ...] = (
    "span_id", "parent_id", "run_id", "kind", "name", "model", "provider", "start_at", "end_at", "hour",
    "latency_ms", "status", "error", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "cost_nanos", "tree_cost_nanos", "unpriced", "estimated", "cache_hit", "saved_nanos",
    "price_source", "price_input", "price_output", "price_cache_read", "price_cache_write", "flags", "feature",
    "route", "tenant_id", "user_hash", "prompt_version", "cache_write_1h_tokens", "service_tier",
    "web_search_requests", "tier", "variant", "opens_run",
)

_ROLLUP_ADDS: tuple[str, ...] = (*(f"{n}_{h}" for n in _RSUMS for h in ("hi", "lo")), *_RCOUNTS)
_ROLLUP_COLS: tuple[str, ...] = ("hour", "gkey", *_RKEY_COLS, *_ROLLUP_ADDS, "latency_max_ms")

_I_COST = _SPAN_COLS.index("cost_nanos")
_I_TOK = _SPAN_COLS.index("input_tokens")
_I_SAVED = _SPAN_COLS.index("saved_nanos")
_I_HIT = _SPAN_COLS.index("cache_hit")
_I_KIND = _SPAN_COLS.index("kind")
_I_LAT = _SPAN_COLS.index("latency_ms")
_I_UNPRICED = _SPAN_COLS.index("unpriced")
_I_EST = _SPAN_COLS.index("estimated")
_I_OPENS = _SPAN_COLS.index("opens_run")
assert _SPAN_COLS[_I_TOK:_I_TOK + 5] == ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                                         "reasoning_tokens")
_FLAGS_AT = _SPAN_COLS.index("flags")
_START_AT, _END_AT = _SPAN_COLS.index("start_at"), _SPAN_COLS.index("end_at")
_BOOL_AT = tuple(_SPAN_COLS.index(c) for c in ("unpriced", "estimated", "cache_hit"))
_ATTRS_AT = _RUN_COLS.index("attributes")
_RUN_START_AT, _RUN_END_AT = _RUN_COLS.index("started_at"), _RUN_COLS.index("ended_at")
_INVOCATIONS_AT = _RUN_COLS.index("invocations")


def _json_text(value: Any) -> str:
    """JSON as the store writes it: characters as they are, not ``\\u`` escapes (see ``Store.__init__``)."""
    return json.dumps(value, ensure_ascii=False)
