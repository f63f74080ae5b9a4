"""SQLAlchemy storage: tables, batch writes, queries. Dialect-neutral SQLAlchemy 2.x Core.

Money is integer nano-USD (``BIGINT``), exact on every database; unit prices are stored as decimal
text for audit. Times are naive UTC; ``hour`` is the span's start in whole hours since the epoch, so
hourly and daily buckets are integer arithmetic on any dialect. Every batch also adds its spans to the hourly
rollup table (``costobs_rollups_hourly``) and to the rollups by one key (``costobs_rollups_keyed``, see
``_rollup_keys``) in the same transaction, so ``rollup()`` reads hours or days, not spans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal
from itertools import chain
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles

from ._events import UsageDetail, nanos_to_usd
from ._exceptions import ConfigurationError
from ._export import PoisonBatch
from ._ledger import Run, RunCost, Span

__all__ = ["ROLLUP_KEYS", "RUN_KEYS", "RollupRow", "Store", "migrations_dir", "run_matches"]

logger = logging.getLogger("costobs_callbacks")

HEAD_REVISION = "0006"

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
"""The hourly rollups summed by one key (``dim``, one of ``_rollup_keys.KEYED``) and its value, per hour (``grain``
1, ``bucket`` the hour) and per UTC day (``grain`` 24, ``bucket`` the day): see ``_rollup_keys``. ``vkey`` is the
value's digest (``_gkey``), NULL told apart."""

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


@dataclass(frozen=True, slots=True)
class RollupRow:
    """One group of a rollup: costs beside latency, so the costly slow calls show first."""

    key: dict[str, Any]
    bucket_start: datetime | None
    cost_usd: Decimal
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    llm_calls: int
    tool_calls: int
    runs: int
    avg_latency_ms: float | None
    """Mean latency of the group's calls (LLM, embedding, tool and retriever spans)."""
    max_latency_ms: float | None
    unpriced_calls: int = 0
    estimated_calls: int = 0
    cache_hits: int = 0
    saved_usd: Decimal = Decimal(0)
    """What LangChain's own LLM cache saved (calls served from it cost $0)."""


def migrations_dir() -> Path:
    """The Alembic scripts: inside the wheel at ``costobs_callbacks/_storage``, in a checkout at ``storage/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_storage", here.parent / "storage"):
        if (cand / "env.py").exists():
            return cand
    raise RuntimeError("costobs-callbacks: the storage migrations are missing from this installation")


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def _dec(d: Decimal | None) -> str | None:
    """A unit price for its 40-character audit column. A longer one (an override with more digits) is
    rounded to 30 decimal places, the precision costs are computed with; too long a value would fail
    its whole batch on databases that enforce lengths."""
    if d is None:
        return None
    s = str(d)
    if len(s) > 40:
        s = format(d.quantize(Decimal("1e-30"), ROUND_HALF_EVEN, Context(prec=80)).normalize(Context(prec=80)), "f")
    return s[:40]


class Store:
    """One database. Thread-safe (SQLAlchemy's pool); writes come from the exporter's thread."""

    def __init__(self, url: str, *, engine_kwargs: Mapping[str, Any] | None = None) -> None:
        self.url = url
        try:
            u = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigurationError(f"invalid database_url {url!r}: {exc}") from None
        kwargs: dict[str, Any] = {"future": True}
        if u.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        if u.get_backend_name() in ("sqlite", "postgresql", "mysql", "mariadb"):
            # JSON with its characters as they are: text the driver cannot encode is refused as in any other
            # column (and sanitised alike, see write_batch), not hidden in a \u escape PostgreSQL refuses
            kwargs["json_serializer"] = _json_text
        if engine_kwargs:
            kwargs.update(engine_kwargs)
        try:
            self.engine: Engine = sa.create_engine(u, **kwargs)
        except (ImportError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise ConfigurationError(f"cannot use database_url {url!r}: {exc}") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self.sanitized = 0
        """Spans stored with a value made to fit its column (flagged ``sanitized``)."""
        # Spans are the bulk of every write: for the dialects we test, rows go to the driver as tuples
        # (SQLAlchemy Core's per-row parameter processing cost more than the insert itself).
        self._span_insert_sql: str | None = None
        self._span_row_fn: Any = _span_row
        self._sql_cache: dict[tuple[str, int], str] = {}
        self._sqlite_max_vars = 999  # SQLite's limit before 3.32; raised below when the library says so
        if self.dialect == "sqlite":
            try:
                import sqlite3

                probe = sqlite3.connect(":memory:")
                self._sqlite_max_vars = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                probe.close()
            except Exception:
                pass
        cols = ", ".join(_SPAN_COLS)
        if self.dialect == "sqlite" and self.engine.dialect.paramstyle == "qmark":
            self._span_insert_sql = f"INSERT INTO costobs_spans ({cols}) VALUES ({', '.join('?' * len(_SPAN_COLS))})"
            self._span_row_fn = lambda sp: _span_tuple(sp, _sqlite_dt, int)
        elif self.dialect == "postgresql" and self.engine.dialect.paramstyle in ("format", "pyformat"):
            self._span_insert_sql = f"INSERT INTO costobs_spans ({cols}) VALUES ({', '.join(['%s'] * len(_SPAN_COLS))})"
            self._span_row_fn = lambda sp: _span_tuple(sp, _utc, bool)
        self._fast = self._span_insert_sql is not None
        # PostgreSQL's rollup upsert takes a column per parameter (arrays, unnested): the driver adapts a few
        # dozen lists, not a few dozen values per group
        self._rollup_upsert_sql = (
            f"INSERT INTO costobs_rollups_hourly ({', '.join(_ROLLUP_COLS)}) SELECT * FROM unnest("
            + ", ".join(f"%s::{_PG_ARRAY[c]}[]" for c in _ROLLUP_COLS) + ")" + _ROLLUP_TAIL
            if self.dialect == "postgresql" else "")

    def _portable(self) -> None:
        """Write through SQLAlchemy Core alone, as for a dialect without a fast path (tests compare the two)."""
        self._fast = False
        self._span_insert_sql = None
        self._span_row_fn = _span_row

    # -- schema ---------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Bring the database to the newest migration (Alembic), once per process."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self._current_revision() != HEAD_REVISION:
                self._upgrade()
            self._schema_ready = True

    def _current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("costobs_alembic_version"):
                return None
            row = conn.execute(sa.text("SELECT version_num FROM costobs_alembic_version")).first()
            return row[0] if row else None

    def _upgrade(self) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir()))
        cfg.set_main_option("version_table", "costobs_alembic_version")
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    if self.dialect == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
                    elif self.dialect == "sqlite":
                        _sqlite_write_lock(conn)
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                return
            except Exception:
                # another process may have migrated at the same moment
                if self._current_revision() == HEAD_REVISION:
                    return
                if attempt == 2:
                    raise

    def get_or_create_salt(self) -> bytes:
        """The user-id salt kept in the database, so every process hashes ids alike."""
        self.ensure_schema()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(meta_kv.c.value).where(meta_kv.c.key == "user_salt")).first()
            if row is not None:
                return bytes.fromhex(row[0])
            salt = secrets.token_hex(32)
            try:
                conn.execute(sa.insert(meta_kv).values(key="user_salt", value=salt))
            except sa.exc.IntegrityError:
                pass
        with self.engine.connect() as conn:
            val = conn.execute(sa.select(meta_kv.c.value).where(meta_kv.c.key == "user_salt")).scalar_one()
        return bytes.fromhex(val)

    # -- writes (exporter thread) -----------------------------------------------------------------

    def write_batch(self, items: Sequence[Any]) -> None:
        """Write a batch. A batch refused for its content (a figure past the column's range, text the driver
        cannot encode, a value the database rejects) is written again with every value made to fit (see
        ``_fit_row``), the spans so changed flagged ``sanitized``; if the database still refuses it,
        ``PoisonBatch`` makes the exporter bisect it, so only the refused rows are lost. Anything else (the
        database is down) propagates and is retried.

        Values are made to fit only after a refusal: the common batch pays nothing for it, and the outcome
        is the same, since the drivers refuse exactly what does not fit (ints past BIGINT, lone surrogates)."""
        try:
            self._write_batch(items, False)
        except Exception as exc:
            if not _is_data_error(exc):
                raise
            logger.info("costobs: a batch of %d was refused (%r); writing it sanitised", len(items), exc)
            try:
                self.sanitized += self._write_batch(items, True)
            except Exception as exc2:
                if not _is_data_error(exc2):
                    raise
                orig = getattr(exc2, "orig", None)
                raise PoisonBatch(str(orig if orig is not None else exc2)) from exc2

    def _write_batch(self, items: Sequence[Any], fit: bool) -> int:
        """Write finished spans, the summaries of their runs and their hourly rollups in one transaction (all or
        nothing: the exporter retries a failed batch whole). With ``fit``, every value is first made to fit its
        column; returns how many spans that changed.

        Items are finished ``Span`` objects and, for runs refused before any span, ``Run`` objects.
        Each run touched by the batch gets one upsert: its totals grow by the batch's spans, and its
        status, reason and end are read from the live run (the root span of a run ends it).
        """
        self.ensure_schema()
        sqlite_fast = self._fast and self.dialect == "sqlite"
        span_rows, run_rows, changed, first_root = self._rows(
            items, self._span_row_fn, _sqlite_run_tuple if sqlite_fast else _run_row, fit)
        if run_rows:
            self._insert(span_rows, run_rows, sqlite_fast, first_root)
        return changed

    def _rows(self, items: Sequence[Any], make_row: Any, make_run: Any,
              fit: bool) -> tuple[list[Any], list[Any], int, dict[str, int]]:
        """A batch's span rows (``make_row`` per span) and its runs' summary rows (``make_run`` per run), values
        made to fit with ``fit``, how many spans that changed, and the row of each run's first root span."""
        span_rows: list[Any] = []
        first_root: dict[str, int] = {}  # run id -> the row of its first root span in the batch
        fitted: list[tuple[str, bool]] = []  # with ``fit``: per span row, its run id and whether it was changed
        # run id -> [run, *the batch's totals in _RUN_SUMS order]
        runs_seen: dict[str, list[Any]] = {}
        for it in items:
            if isinstance(it, Span):
                run = it.run
                rid = run.run_id
                acc = runs_seen.get(rid)
                if acc is None:
                    acc = runs_seen[rid] = [run, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
                row = make_row(it)
                if fit:
                    row, hit = _fit_span_row(row)
                    fitted.append((rid, hit))
                if it.is_root and rid not in first_root:
                    first_root[rid] = len(span_rows)
                span_rows.append(row)
                if it.cost_nanos:
                    acc[1] += it.cost_nanos
                t = it.tokens
                if t is not None and not it.cache_hit:
                    acc[2] += t[0]
                    acc[3] += t[1]
                    acc[4] += t[2]
                    acc[5] += t[3]
                    acc[6] += t[4]
                kind = it.kind
                if kind in _LLM_KINDS:
                    acc[7] += 1
                    if it.unpriced:
                        acc[9] += 1
                    if it.estimated:
                        acc[10] += 1
                elif kind == "tool":
                    acc[8] += 1
                acc[11] += 1
                if it.is_root:
                    acc[12] += 1
            elif isinstance(it, Run) and it.run_id not in runs_seen:
                runs_seen[it.run_id] = [it, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        run_rows: list[Any] = [make_run(acc) for acc in runs_seen.values()]
        changed = 0
        if fit:
            changed = _fit_rows(span_rows, run_rows, [rid for rid, _ in fitted], [hit for _, hit in fitted],
                                list(runs_seen))
        return span_rows, run_rows, changed, first_root

    def _insert(self, span_rows: list[Any], run_rows: list[Any], sqlite_fast: bool, first_root: dict[str, int]) -> None:
        """One transaction: the run rows upserted (their totals grow by the batch's), the span rows inserted, the
        batch's hourly rollups upserted (from the span rows as stored, fitted values included)."""
        key_of = _RKEY_OF
        groups = _rollup_groups(span_rows)
        roots = _batch_invocations(run_rows)
        with self.engine.begin() as conn:
            # The runs first: their upsert tells which runs had no root span stored (``invocations`` was 0), and
            # the batch's first root span of each of those opens its run (``opens_run``, the rollup's ``runs``).
            # Read from the write itself, in the batch's transaction, so concurrent writers of one run and a
            # batch written again after a rollback count it once.
            stored: Sequence[Any]
            if sqlite_fast:
                # Many rows per statement: sqlite3 releases and retakes the GIL at every step, and a
                # busy app thread makes each retake wait up to the switch interval (5 ms); one step per
                # few hundred rows keeps the writer from starving behind the app.
                stored = self._sqlite_many(conn, _SQLITE_RUN_HEAD, len(_RUN_COLS), run_rows, _SQLITE_RUN_TAIL)
            elif self.dialect == "postgresql":
                # (read after the upsert, whose row locks keep other writers of these runs waiting until commit;
                # a RETURNING would make SQLAlchemy send one statement of every row, parsed afresh per batch)
                conn.execute(self._upsert_runs(), run_rows)
                ids = list(first_root)
                if not ids:
                    stored = ()
                elif self._span_insert_sql is not None:
                    stored = conn.exec_driver_sql(
                        "SELECT run_id, invocations FROM costobs_runs WHERE run_id = ANY(%s)", (ids,)).all()
                else:
                    stored = list(self._existing_runs(conn, ids).items())
            else:
                stored = self._merge_runs_portable(conn, run_rows)
            if not span_rows:
                return
            for rid, total in stored:
                at = first_root.get(rid)
                if at is not None and int(total) == roots[rid]:  # (a run's batch invocations: its roots)
                    row = span_rows[at]
                    if type(row) is tuple:
                        # True on PostgreSQL (booleans), 1 on SQLite (ints); rows written again keep their type
                        row = span_rows[at] = (*row[:_I_OPENS], True if type(row[_I_OPENS]) is bool else 1,
                                               *row[_I_OPENS + 1:])
                    else:
                        row["opens_run"] = True
                        row = tuple(row.values())
                    groups[key_of(row)][9] += 1
            roll_rows = [_rollup_tuple(k, g) for k, g in groups.items()]
            if sqlite_fast:
                self._sqlite_many(conn, _SQLITE_SPAN_HEAD, len(_SPAN_COLS), span_rows, "")
                self._sqlite_many(conn, _ROLLUP_HEAD, len(_ROLLUP_COLS), roll_rows, _ROLLUP_TAIL)
            else:
                if self._span_insert_sql is not None:
                    # the hot write: straight to the driver's executemany, rows prepared as tuples
                    conn.exec_driver_sql(self._span_insert_sql, span_rows)
                else:
                    conn.execute(sa.insert(spans), span_rows)
                if self.dialect == "postgresql" and self._span_insert_sql is not None:
                    if roll_rows:
                        conn.exec_driver_sql(self._rollup_upsert_sql, tuple(map(list, zip(*roll_rows, strict=True))))
                else:
                    self._merge_rollups_portable(conn, roll_rows)
            # last: every batch shares its keys' rows, and their locks are held from here to the commit
            _rollup_keys.write(self, conn, roll_rows, sqlite_fast)

    # -- spooled batches (``_spool``): rows kept while the database is away, written when it is back ------

    def batch_rows(self, items: Sequence[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """A batch as the rows it would write, in a form any backend can write later and JSON keeps: span rows
        in ``_SPAN_COLS`` order and run rows in ``_RUN_COLS`` order, times as epoch seconds, flags as booleans,
        a run's attributes as a dict. Built now, from the live runs (their status as it is now). The first root
        span of each run carries ``None`` for ``opens_run`` (``write_rows`` decides it when the rows are written)."""
        span_rows, run_rows, _, first_root = self._rows(items, _neutral_span, _neutral_run, False)
        for at in first_root.values():
            row = span_rows[at]
            span_rows[at] = (*row[:_I_OPENS], None, *row[_I_OPENS + 1:])
        return span_rows, run_rows

    def write_rows(self, span_rows: Sequence[Sequence[Any]], run_rows: Sequence[Sequence[Any]], *,
                   fit: bool = True) -> None:
        """Write rows from ``batch_rows`` in one transaction, as ``write_batch`` writes a batch: refused for their
        content, written again made to fit (flagged ``sanitized``); refused still (or at once without ``fit``),
        ``PoisonBatch``."""
        self.ensure_schema()
        sqlite_fast = self._fast and self.dialect == "sqlite"
        first_root: dict[str, int] = {}
        unmarked: list[Sequence[Any]] = []
        rid_at = _SPAN_COLS.index("run_id")
        for i, r in enumerate(span_rows):
            if r[_I_OPENS] is None:
                first_root.setdefault(r[rid_at], i)
                r = (*r[:_I_OPENS], False, *r[_I_OPENS + 1:])
            unmarked.append(r)
        sp, rr = _from_neutral(unmarked, run_rows, self._fast, self.dialect)
        try:
            self._insert(sp, rr, sqlite_fast, first_root)
        except Exception as exc:
            if not _is_data_error(exc):
                raise
            if not fit:
                raise PoisonBatch(str(getattr(exc, "orig", None) or exc)) from exc
            sp = [list(r) if isinstance(r, tuple) else r for r in sp]
            hits = []
            for i, r in enumerate(sp):
                sp[i], hit = _fit_span_row(tuple(r) if isinstance(r, list) else r)
                hits.append(hit)
            rids = [r[rid_at] for r in unmarked]
            changed = _fit_rows(sp, rr, rids, hits, [r[0] for r in run_rows])
            try:
                self._insert(sp, rr, sqlite_fast, first_root)
            except Exception as exc2:
                if not _is_data_error(exc2):
                    raise
                orig = getattr(exc2, "orig", None)
                raise PoisonBatch(str(orig if orig is not None else exc2)) from exc2
            self.sanitized += changed

    def _sqlite_many(self, conn: Connection, head: str, ncols: int, rows: Sequence[tuple[Any, ...]],
                     tail: str) -> list[Any]:
        """Insert ``rows``, many per statement; the rows a ``RETURNING`` tail returns."""
        out: list[Any] = []
        returning = "RETURNING" in tail
        # Chunks come in a few fixed sizes (1024, 512, 256, 64, 16, 4, 1 rows): sqlite3 caches every distinct
        # statement it prepares, and one per batch remainder would pile up large compiled programs.
        group = "(" + ",".join("?" * ncols) + ")"
        i, n = 0, len(rows)
        while i < n:
            size = next(z for z in _CHUNK_SIZES if z <= n - i and z * ncols <= self._sqlite_max_vars)
            chunk = rows[i:i + size]
            key = (head, size)
            sql = self._sql_cache.get(key)
            if sql is None:
                sql = self._sql_cache[key] = head + ",".join([group] * size) + tail
            res = conn.exec_driver_sql(sql, tuple(chain.from_iterable(chunk)))
            if returning:
                out.extend(res.all())
            i += size
        return out

    def _upsert_runs(self) -> Any:
        """PostgreSQL's run upsert (SQLite's is ``_SQLITE_RUN_TAIL``): totals grow by the batch's, saturating."""
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        ins = pg_insert(runs)
        ex = ins.excluded
        c = runs.c
        add = {k: _grow(getattr(c, k), getattr(ex, k), k) for k in _RUN_SUMS}
        return ins.on_conflict_do_update(
            index_elements=[c.run_id],
            set_={**add, "status": ex.status, "reason": ex.reason, "ended_at": ex.ended_at},
        )

    def _merge_runs_portable(self, conn: Connection, run_rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
        """The run upsert in SQLAlchemy Core alone; returns each run's id and its ``invocations`` now."""
        existing = self._existing_runs(conn, [r["run_id"] for r in run_rows])
        new = [r for r in run_rows if r["run_id"] not in existing]
        old = [r for r in run_rows if r["run_id"] in existing]
        if new:
            conn.execute(sa.insert(runs), new)
        if old:
            c = runs.c
            values: dict[str, Any] = {k: _grow(getattr(c, k), sa.bindparam(f"d_{k}", type_=sa.BigInteger()), k)
                                      for k in _RUN_SUMS}
            values.update(status=sa.bindparam("d_status"), reason=sa.bindparam("d_reason"),
                          ended_at=sa.bindparam("d_ended_at"))
            params = [{"rid": r["run_id"], **{f"d_{k}": r[k] for k in (*_RUN_SUMS, "status", "reason", "ended_at")}}
                      for r in old]
            conn.execute(sa.update(runs).where(c.run_id == sa.bindparam("rid")).values(values), params)
        return [(r["run_id"], existing.get(r["run_id"], 0) + r["invocations"]) for r in run_rows]

    def _merge_rollups_portable(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """The rollup upsert in SQLAlchemy Core alone: the groups already stored grow, the others are inserted."""
        if not rows:
            return
        r = rollups.c
        have: set[tuple[int, str]] = set()
        for i in range(0, len(rows), 500):
            hours = {row[0] for row in rows[i:i + 500]}
            keys = [row[1] for row in rows[i:i + 500]]
            have.update((int(h), g) for h, g in conn.execute(
                sa.select(r.hour, r.gkey).where(r.hour.in_(hours), r.gkey.in_(keys))))
        new = [dict(zip(_ROLLUP_COLS, row, strict=True)) for row in rows if (row[0], row[1]) not in have]
        old = [row for row in rows if (row[0], row[1]) in have]
        if new:
            conn.execute(sa.insert(rollups), new)
        if old:
            values: dict[str, Any] = {k: getattr(r, k) + sa.bindparam(f"d_{k}", type_=sa.BigInteger())
                                      for k in _ROLLUP_ADDS}
            cur, new_max = r.latency_max_ms, sa.bindparam("d_latency_max_ms", type_=sa.Float())
            values["latency_max_ms"] = sa.case((new_max.is_(None), cur),
                                               (sa.or_(cur.is_(None), new_max > cur), new_max), else_=cur)
            at = {k: i for i, k in enumerate(_ROLLUP_COLS)}
            params = [{"p_hour": row[0], "p_gkey": row[1],
                       **{f"d_{k}": row[at[k]] for k in (*_ROLLUP_ADDS, "latency_max_ms")}} for row in old]
            conn.execute(sa.update(rollups).where(r.hour == sa.bindparam("p_hour"), r.gkey == sa.bindparam("p_gkey"))
                         .values(values), params)

    def _existing_runs(self, conn: Connection, run_ids: Iterable[str]) -> dict[str, int]:
        """The runs stored among ``run_ids``, each with its ``invocations``."""
        ids = list(run_ids)
        found: dict[str, int] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            found.update((rid, int(n)) for rid, n in conn.execute(
                sa.select(runs.c.run_id, runs.c.invocations).where(runs.c.run_id.in_(chunk))))
        return found

    # -- queries --------------------------------------------------------------------------------

    def run_cost(self, run_id: str, where: Mapping[str, Any] | None = None) -> RunCost | None:
        """A run's stored totals; ``None`` if it is not stored, or does not match ``where`` (``RUN_KEYS`` only,
        values as for ``rollup``)."""
        self.ensure_schema()
        run_id = _fit_text(run_id)
        q = sa.select(runs).where(runs.c.run_id == run_id)
        for k, v in (where or {}).items():
            if k not in RUN_KEYS:
                raise ConfigurationError(f"run_cost's where takes {', '.join(RUN_KEYS)}, not {k!r}")
            q = q.where(_match(RUN_KEYS[k], v))
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
            if row is None:
                return None
            by_model, unpriced_models = self._models_of(conn, [spans.c.run_id == run_id]).get(run_id, ({}, ()))
        return RunCost(
            run_id=run_id,
            cost_usd=nanos_to_usd(int(row["cost_nanos"])) or Decimal(0),
            input_tokens=int(row["input_tokens"]),
            output_tokens=int(row["output_tokens"]),
            cache_read_tokens=int(row["cache_read_tokens"]),
            cache_write_tokens=int(row["cache_write_tokens"]),
            reasoning_tokens=int(row["reasoning_tokens"]),
            llm_calls=int(row["llm_calls"]),
            tool_calls=int(row["tool_calls"]),
            unpriced_calls=int(row["unpriced_calls"]),
            by_model=by_model,
            unpriced_models=unpriced_models,
            status=row["status"],
            attributes=_run_attributes(row),
            reason=row["reason"],
            estimated_calls=int(row["estimated_calls"]),
        )

    def _models_of(
        self, conn: Connection, filters: Sequence[Any],
    ) -> dict[str, tuple[dict[str, Decimal], tuple[str, ...]]]:
        """Per run of the spans matching ``filters``: its priced cost by model, and its unpriced models (sorted)."""
        s = spans.c

        def model_costs(split: bool) -> Any:
            return sa.select(s.run_id, s.model, *_sum(sa.func.coalesce(s.cost_nanos, 0), "cost", split)) \
                .where(*filters, s.kind.in_(_LLM_KINDS), s.model.is_not(None), s.cache_hit.is_(False),
                       s.unpriced.is_(False)) \
                .group_by(s.run_id, s.model)

        out: dict[str, tuple[dict[str, Decimal], tuple[str, ...]]] = {}
        for r in self._sums(conn, model_costs):
            out.setdefault(r["run_id"], ({}, ()))[0][r["model"]] = nanos_to_usd(_summed(r, "cost")) or Decimal(0)
        unpriced: dict[str, list[str]] = {}
        for rid, model in conn.execute(
            sa.select(s.run_id, s.model).distinct().where(*filters, s.unpriced.is_(True), s.model.is_not(None))
        ):
            unpriced.setdefault(rid, []).append(model)
        for rid, models in unpriced.items():
            out[rid] = (out.get(rid, ({}, ()))[0], tuple(sorted(models)))
        return out

    def spend(
        self, *, since: datetime | None = None, until: datetime | None = None, where: Mapping[str, Any] | None = None,
    ) -> Decimal:
        """The total cost of the spans started in ``[since, until)`` matching ``where`` (as ``rollup`` takes them):
        ``rollup(by=())``'s cost, so read from the rollup tables whenever they hold the answer."""
        rows = self.rollup((), since=since, until=until, where=where)
        return rows[0].cost_usd if rows else Decimal(0)

    def top_runs(
        self, n: int, *, since: datetime | None = None, until: datetime | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> list[RunCost]:
        """The ``n`` runs of the most cost among the spans started in ``[since, until)`` matching ``where``,
        costliest first (ties by run id), each counting those spans only; status and attributes from the run's row.
        """
        self.ensure_schema()
        filters = _span_filters(since, until, where)
        s = spans.c
        not_hit = s.cache_hit.is_(False)

        def query(split: bool) -> Any:
            def tok(col: Any, name: str) -> list[Any]:
                return _sum(sa.case((not_hit, col), else_=0), name, split)

            cost = _sum(sa.func.coalesce(s.cost_nanos, 0), "cost", split)
            q = sa.select(
                s.run_id, *cost, *tok(s.input_tokens, "inp"), *tok(s.output_tokens, "out"),
                *tok(s.cache_read_tokens, "cr"), *tok(s.cache_write_tokens, "cw"), *tok(s.reasoning_tokens, "rsn"),
                sa.func.sum(sa.case((s.kind.in_(_LLM_KINDS), 1), else_=0)).label("llm"),
                sa.func.sum(sa.case((s.kind == "tool", 1), else_=0)).label("tool"),
                sa.func.sum(sa.case((sa.and_(s.kind.in_(_LLM_KINDS), s.unpriced.is_(True)), 1), else_=0))
                .label("unpriced"),
                sa.func.sum(sa.case((sa.and_(s.kind.in_(_LLM_KINDS), s.estimated.is_(True)), 1), else_=0))
                .label("est"),
            ).where(*filters).group_by(s.run_id)
            if split:  # summed in halves: ordered exactly in Python (below), every group read
                return q
            return q.order_by(sa.desc(cost[0]), s.run_id).limit(n)

        with self.engine.connect() as conn:
            rows = self._sums(conn, query)
            if rows and "cost" not in rows[0]:
                rows = sorted(rows, key=lambda r: (-_summed(r, "cost"), r["run_id"]))[:n]
            ids = [r["run_id"] for r in rows]
            if not ids:
                return []
            heads = {h["run_id"]: h for h in conn.execute(sa.select(runs).where(runs.c.run_id.in_(ids))).mappings()}
            models = self._models_of(conn, [*filters, s.run_id.in_(ids)])
        out = []
        for r in rows:
            rid = r["run_id"]
            head = heads.get(rid)
            by_model, unpriced_models = models.get(rid, ({}, ()))
            out.append(RunCost(
                run_id=rid,
                cost_usd=nanos_to_usd(_summed(r, "cost")) or Decimal(0),
                input_tokens=_summed(r, "inp"),
                output_tokens=_summed(r, "out"),
                cache_read_tokens=_summed(r, "cr"),
                cache_write_tokens=_summed(r, "cw"),
                reasoning_tokens=_summed(r, "rsn"),
                llm_calls=int(r["llm"]),
                tool_calls=int(r["tool"]),
                unpriced_calls=int(r["unpriced"]),
                by_model=by_model,
                unpriced_models=unpriced_models,
                status=head["status"] if head is not None else "ok",
                attributes=_run_attributes(head) if head is not None else {},
                reason=head["reason"] if head is not None else None,
                estimated_calls=int(r["est"]),
            ))
        return out

    def rollup(
        self,
        by: Sequence[str],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        bucket: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> list[RollupRow]:
        """Costs, tokens and calls grouped by ``by`` (and by hour or day with ``bucket``), in ``[since, until)``.

        Read from the rollup tables when they hold the answer (every key is one of their columns, the window is
        whole hours, the bucket an hour, a day or none: from the rows by one key when that is the only key named,
        see ``_rollup_keys``, else from the hourly rows), from the raw spans otherwise: the figures are the same
        either way. A run counts once (``runs``), in the group of the span that opened it (its first root
        span) and so in the window of that span's hour. A rollup by ``model`` or ``provider`` counts model calls
        only (a chain or tool span carries neither, and adds no ``None`` row)."""
        table = bucket in (None, "hour", "day") and _on_the_hour(since) and _on_the_hour(until) \
            and all(k in _ROLLUP_COL_OF for k in (*by, *(where or ())))
        return self._rollup(by, since, until, bucket, where, table)

    def _rollup(self, by: Sequence[str], since: datetime | None, until: datetime | None, bucket: str | None,
                where: Mapping[str, Any] | None, table: bool, keyed: bool = True) -> list[RollupRow]:
        """``rollup`` from the rollup tables (``table``: the keyed rows of one key when they hold the answer and
        ``keyed``, else the hourly rows) or from the raw spans (the tests compare the three)."""
        self.ensure_schema()
        out: list[RollupRow] = []
        dim = _rollup_keys.dim_of(by, where) if table and keyed else None
        with self.engine.connect() as conn:
            if dim is not None:
                rows: list[Any] = _dict_rows(conn.execute(_rollup_keys.query(dim, by, since, until, bucket, where)))
            elif table:
                rows = _dict_rows(conn.execute(_table_rollup_query(by, since, until, bucket, where)))
            else:
                rows = self._sums(conn, lambda split: _raw_rollup_query(by, since, until, bucket, where, split))
            starts: dict[Any, datetime | None] = {None: None}  # a bucket's start, made once per bucket
            keys = [(k, f"k_{k}") for k in by]
            for r in rows:
                b = r.get("bucket")
                bstart = starts.get(b)
                if bstart is None and b is not None:
                    hours = int(b) * (24 if bucket == "day" else 1)
                    bstart = starts[b] = datetime.fromtimestamp(hours * 3600, UTC)
                n = int(r["lat_n"] or 0)
                cost, inp, out_t, cr, cw, rsn, saved = [
                    int(r[s]) if s in r else int(r[hi]) * _HALF + int(r[lo]) for s, hi, lo in _HALVES]
                out.append(RollupRow(
                    key={k: r[col] for k, col in keys},
                    bucket_start=bstart,
                    cost_usd=nanos_to_usd(cost) or Decimal(0),
                    input_tokens=inp,
                    output_tokens=out_t,
                    cache_read_tokens=cr,
                    cache_write_tokens=cw,
                    reasoning_tokens=rsn,
                    llm_calls=int(r["llm"]),
                    tool_calls=int(r["tool"]),
                    runs=int(r["runs"]),
                    avg_latency_ms=int(r["lat_us"]) / (1000 * n) if n else None,
                    max_latency_ms=float(r["lat_max"]) if r["lat_max"] is not None else None,
                    unpriced_calls=int(r["unpriced"]),
                    estimated_calls=int(r["est"]),
                    cache_hits=int(r["hits"]),
                    saved_usd=nanos_to_usd(saved) or Decimal(0),
                ))
        # costliest first; among equal costs by key and bucket, so that every source gives one order
        out.sort(key=lambda r: (-r.cost_usd, [(v is None, str(v)) for v in r.key.values()],
                                r.bucket_start or _EPOCH_UTC))
        return out

    def _sums(self, conn: Connection, query: Any) -> list[Any]:
        """The rows of ``query(False)``; on SQLite, whose ``SUM()`` raises on an overflow past 64 bits (a group
        holding figures sanitised to BIGINT's ceiling), those of ``query(True)``, which sums each figure in
        two halves (see ``_sum``): exact either way."""
        try:
            return list(conn.execute(query(False)).mappings())
        except sa.exc.OperationalError as exc:
            if self.dialect != "sqlite" or "integer overflow" not in str(exc):
                raise
        conn.rollback()
        return list(conn.execute(query(True)).mappings())

    def spans_of(self, run_id: str, where: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every stored span of a run matching ``where`` (as ``rollup`` takes it), oldest first (for audits and
        the CLI)."""
        self.ensure_schema()
        run_id = _fit_text(run_id)
        q = sa.select(spans).where(spans.c.run_id == run_id, *_span_filters(None, None, where)).order_by(spans.c.id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def close(self) -> None:
        self.engine.dispose()

    # -- for `costobs db` -------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None: no costobs tables); reads only."""
        return self._current_revision()


def _on_the_hour(dt: datetime | None) -> bool:
    if dt is None:
        return True
    d = _naive_utc(dt)
    return (d.minute, d.second, d.microsecond) == (0, 0, 0)


def _hour_index(dt: datetime) -> int:
    """A whole hour as the ``hour`` column counts it (hours since the epoch, UTC)."""
    return int((_naive_utc(dt) - _EPOCH).total_seconds()) // 3600


_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=UTC)


def _filtered(q: Any, t: sa.Table, by: Sequence[str], since: datetime | None, until: datetime | None,
              where: Mapping[str, Any] | None) -> Any:
    """``q`` restricted to the window and ``where`` (on the spans or the rollup table, ``t``). A window on whole
    hours is read by the ``hour`` column (the hour a span counts in, on both tables), any other by start time."""
    for bound, op in ((since, "ge"), (until, "lt")):
        if bound is None:
            continue
        if _on_the_hour(bound):
            h = _hour_index(bound)
            q = q.where(t.c.hour >= h if op == "ge" else t.c.hour < h)
        else:
            start = spans.c.start_at
            q = q.where(start >= _naive_utc(bound) if op == "ge" else start < _naive_utc(bound))
    for k, v in (where or {}).items():
        q = q.where(_match(t.c[_ROLLUP_COL_OF[k]], v))
    if _MODEL_KEYS.intersection(by):
        q = q.where(t.c.kind.in_(_LLM_KINDS))
    return q


def _grouping(t: sa.Table, by: Sequence[str], bucket: str | None) -> list[Any]:
    group: list[Any] = [t.c[_ROLLUP_COL_OF[k]].label(f"k_{k}") for k in by]
    if bucket == "hour":
        group.append(t.c.hour.label("bucket"))
    elif bucket == "day":
        group.append((t.c.hour // 24).label("bucket"))
    return group


class _micros(sa.sql.expression.FunctionElement[int]):
    """Milliseconds (a float) as whole microseconds, truncated toward zero as ``int(ms * 1000.0)`` does in the
    write path: ``CAST`` truncates on SQLite, rounds on PostgreSQL (hence ``trunc`` there)."""

    type = sa.BigInteger()
    inherit_cache = True
    name = "costobs_micros"


@compiles(_micros)
def _micros_default(element: Any, compiler: Any, **kw: Any) -> str:
    return f"CAST(({compiler.process(element.clauses, **kw)}) * 1000 AS BIGINT)"


@compiles(_micros, "postgresql")
def _micros_pg(element: Any, compiler: Any, **kw: Any) -> str:
    return f"CAST(trunc(({compiler.process(element.clauses, **kw)}) * 1000) AS BIGINT)"


def _raw_rollup_query(by: Sequence[str], since: datetime | None, until: datetime | None, bucket: str | None,
                      where: Mapping[str, Any] | None, split: bool, every_span: bool = False) -> Any:
    """A rollup from the raw spans (see ``Store.rollup``). Migration 0003 fills the rollup table with it too
    (``every_span``: by every key, the spans without a model included, as the rollup table holds them)."""
    s = spans.c
    group = _grouping(spans, by, bucket)
    not_hit = s.cache_hit.is_(False)

    def tok(col: Any, name: str) -> list[Any]:
        return _sum(sa.case((not_hit, col), else_=0), name, split)

    def count(cond: Any, name: str) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((cond, 1), else_=0)), 0).label(name)

    is_call = s.kind.in_(_CALL_KINDS)
    cols = [
        *group,
        *_sum(s.cost_nanos, "cost", split),
        *tok(s.input_tokens, "inp"),
        *tok(s.output_tokens, "out"),
        *tok(s.cache_read_tokens, "cr"),
        *tok(s.cache_write_tokens, "cw"),
        *tok(s.reasoning_tokens, "rsn"),
        count(s.kind.in_(_LLM_KINDS), "llm"),
        count(s.kind == "tool", "tool"),
        count(s.opens_run.is_(True), "runs"),
        sa.func.coalesce(sa.func.sum(sa.case((is_call, _micros(s.latency_ms)), else_=0)), 0).label("lat_us"),
        count(is_call, "lat_n"),
        sa.func.max(sa.case((is_call, s.latency_ms), else_=None)).label("lat_max"),
        count(s.unpriced.is_(True), "unpriced"),
        count(s.estimated.is_(True), "est"),
        count(s.cache_hit.is_(True), "hits"),
        *_sum(s.saved_nanos, "saved", split),
    ]
    q = _filtered(sa.select(*cols), spans, () if every_span else by, since, until, where)
    if group:
        q = q.group_by(*group)
    return q.order_by(sa.desc(cols[len(group)]))


def _backfill_rollups(conn: Connection) -> int:
    """Fill the rollup table from the spans stored (migration 0003); returns how many groups it wrote."""
    by = [("user" if c == "user_hash" else c) for c in _RKEY_COLS]
    rows = []
    found: list[Any] = list(conn.execute(_raw_rollup_query(by, None, None, "hour", None, True, every_span=True))
                            .mappings())
    for r in found:
        key = (int(r["bucket"]), *(r[f"k_{k}"] for k in by))
        g = [*(_summed(r, n) for n in _RSUMS), *(int(r[n]) for n in ("llm", "tool", "runs", "lat_n", "unpriced", "est",
                                                                    "hits", "lat_us")), r["lat_max"]]
        rows.append(dict(zip(_ROLLUP_COLS, _rollup_tuple(key, g), strict=True)))
    for i in range(0, len(rows), 500):
        conn.execute(sa.insert(rollups), rows[i:i + 500])
    return len(rows)


def _table_rollup_query(by: Sequence[str], since: datetime | None, until: datetime | None, bucket: str | None,
                        where: Mapping[str, Any] | None) -> Any:
    """A rollup from the hourly rollup table; the same columns as ``_raw_rollup_query``'s, sums in halves."""
    r = rollups.c
    group = _grouping(rollups, by, bucket)

    def total(col: Any, name: str) -> Any:
        return sa.func.coalesce(sa.func.sum(col), 0).label(name)

    cols = [
        *group,
        *(total(r[f"{n}_{h}"], f"{n}_{h}") for n in _RSUMS for h in ("hi", "lo")),
        total(r.llm_calls, "llm"),
        total(r.tool_calls, "tool"),
        total(r.runs, "runs"),
        total(r.latency_us, "lat_us"),
        total(r.calls, "lat_n"),
        sa.func.max(r.latency_max_ms).label("lat_max"),
        total(r.unpriced_calls, "unpriced"),
        total(r.estimated_calls, "est"),
        total(r.cache_hits, "hits"),
    ]
    q = _filtered(sa.select(*cols), rollups, by, since, until, where)
    if group:
        q = q.group_by(*group)
    return q


def _sqlite_write_lock(conn: sa.Connection) -> None:
    """Take SQLite's write lock for the whole migration, so that processes migrating a fresh file at the same
    moment run one after the other (the others then find it migrated). Python's sqlite3 driver opens no
    transaction before DDL, so without this each ``CREATE TABLE`` commits on its own and a second process could
    see half a schema. A driver already in a transaction keeps it (and the retries in ``_upgrade``)."""
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except sa.exc.OperationalError as exc:
        if "within a transaction" not in str(exc):
            raise
        logger.debug("costobs: SQLite migration runs in the driver's own transaction: %r", exc)


_HALF = 2**32


def _sum(x: Any, name: str, split: bool) -> list[Any]:
    """``SUM(x)`` labelled ``name`` (0 for no rows); with ``split``, ``SUM(x / 2^32)`` and ``SUM(x % 2^32)``
    (integer division, truncating on both databases): neither overflows, and ``_summed`` joins them exactly."""
    if not split:
        return [sa.func.coalesce(sa.func.sum(x), 0).label(name)]
    return [sa.func.coalesce(sa.func.sum(x // _HALF), 0).label(f"{name}_hi"),
            sa.func.coalesce(sa.func.sum(x % _HALF), 0).label(f"{name}_lo")]


_HALVES = tuple((n, f"{n}_hi", f"{n}_lo") for n in _RSUMS)
"""Each money and token sum of a rollup row: its name (the raw spans' one column) and its halves' columns."""


def _dict_rows(result: Any) -> list[dict[str, Any]]:
    """A result's rows as plain dicts, fetched at once (a row mapping's lookups cost more than the query's own work
    on a rollup's few thousand rows)."""
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result.all()]


def _summed(row: Mapping[str, Any], name: str) -> int:
    if name in row:
        return int(row[name])
    return int(row[f"{name}_hi"]) * _HALF + int(row[f"{name}_lo"])


def _where_text(v: Any) -> str | None:
    """A ``where`` value as the column holds it: without NUL characters, encodable, at most 256 characters
    (what the ledger and ``_span_tuple`` store of an attribution value or a name)."""
    if v is None:
        return None
    return _fit_text(_txt(v, 256))


def _match(col: Any, v: Any) -> Any:
    """``col`` matching a checked ``where`` value: a text (equal to it as stored, ``_where_text``), ``None`` (no
    value), or a list of those (any of them)."""
    if isinstance(v, (list, tuple, set, frozenset)):
        vals = [_where_text(x) for x in v]
        listed = col.in_([x for x in vals if x is not None])
        return sa.or_(listed, col.is_(None)) if None in vals else listed
    if v is None:
        return col.is_(None)
    return col == _where_text(v)


def _span_filters(since: datetime | None, until: datetime | None, where: Mapping[str, Any] | None) -> list[Any]:
    """The clauses of spans started in ``[since, until)`` matching ``where`` (``ROLLUP_KEYS``), as ``rollup``'s.
    A window is also given in whole hours, one either side to spare (``start_at`` is rounded to the microsecond,
    ``hour`` is not): the same rows, found through the hour indexes."""
    s = spans.c
    out: list[Any] = []
    if since is not None:
        out.append(s.start_at >= _naive_utc(since))
        out.append(s.hour >= int(since.timestamp() // 3600) - 1)
    if until is not None:
        out.append(s.start_at < _naive_utc(until))
        out.append(s.hour <= int(until.timestamp() // 3600) + 1)
    for k, v in (where or {}).items():
        out.append(_match(ROLLUP_KEYS[k], v))
    return out


def run_matches(cost: RunCost, where: Mapping[str, Any] | None) -> bool:
    """Whether a run's ``RunCost`` (its ``attributes``) matches a checked ``where`` of ``RUN_KEYS``, as its stored
    row would (see ``_match``)."""
    attrs = cost.attributes
    for k, v in (where or {}).items():
        have = attrs.get(k)
        if isinstance(v, (list, tuple, set, frozenset)):
            if have not in [_where_text(x) for x in v]:
                return False
        elif have != _where_text(v):
            return False
    return True


def _run_attributes(row: Any) -> dict[str, Any]:
    """``RunCost.attributes`` of a run's stored row."""
    attrs: dict[str, Any] = {"feature": row["feature"]}
    for k, col in (("route", "route"), ("tenant_id", "tenant_id"), ("user", "user_hash"),
                   ("prompt_version", "prompt_version")):
        if row[col] is not None:
            attrs[k] = row[col]
    attrs.update(row["attributes"] or {})
    return attrs


def _naive_utc(dt: datetime) -> datetime:
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


_BIG_MAX = 2**63 - 1
_INT_MAX = 2**31 - 1

_RUN_SUMS = (
    "cost_nanos", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens",
    "llm_calls", "tool_calls", "unpriced_calls", "estimated_calls", "span_count", "invocations",
)


_CHUNK_SIZES = (1024, 512, 256, 64, 16, 4, 1)

_RUN_COLS = (
    "run_id", "feature", "route", "tenant_id", "user_hash", "prompt_version", "attributes", "status", "reason",
    "started_at", "ended_at", *_RUN_SUMS,
)
_SQLITE_RUN_HEAD = f"INSERT INTO costobs_runs ({', '.join(_RUN_COLS)}) VALUES "
_BIG_SUMS = frozenset(_RUN_SUMS[:6])
"""The BIGINT totals of a run (money and tokens); the others are INTEGER counts."""


def _sqlite_grow(k: str) -> str:
    if k not in _BIG_SUMS:
        return f"{k} = costobs_runs.{k} + excluded.{k}"
    return (f"{k} = CASE WHEN excluded.{k} > 0 AND costobs_runs.{k} > {_BIG_MAX} - excluded.{k} THEN {_BIG_MAX} "
            f"WHEN excluded.{k} < 0 AND costobs_runs.{k} < -{_BIG_MAX} - excluded.{k} THEN -{_BIG_MAX} "
            f"ELSE costobs_runs.{k} + excluded.{k} END")


_SQLITE_RUN_TAIL = (
    " ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(_sqlite_grow(k) for k in _RUN_SUMS)
    + ", status = excluded.status, reason = excluded.reason, ended_at = excluded.ended_at"
    " RETURNING run_id, invocations"
)


def _grow(total: Any, delta: Any, k: str) -> Any:
    """``total + delta`` for a run's stored total, saturating at BIGINT's bounds (``±(2^63 - 1)``) for money and
    tokens: a run that reached one (a figure sanitised to it) stays there, instead of refusing every later span
    of the run. (``_SQLITE_RUN_TAIL`` is the same in SQLite's text.)"""
    if k not in _BIG_SUMS:
        return total + delta
    return sa.case((sa.and_(delta > 0, total > _BIG_MAX - delta), sa.literal(_BIG_MAX, sa.BigInteger())),
                   (sa.and_(delta < 0, total < -_BIG_MAX - delta), sa.literal(-_BIG_MAX, sa.BigInteger())),
                   else_=total + delta)


def _sqlite_run_tuple(acc: list[Any]) -> tuple[Any, ...]:
    """A run's summary row for SQLite, in ``_RUN_COLS`` order: ``acc`` is ``[run, *totals]`` (see
    ``_write_batch``); its status, reason and end as the run has them now; its attributes as JSON text as the
    engine writes it (``_json_text``)."""
    run = acc[0]
    status = run.status
    ended = run.ended_wall if status != "running" else 0.0
    attrs = run.attributes
    return (
        run.run_id, run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version,
        _json_text(dict(attrs)) if attrs else None, status,
        run.aborted.reason if run.aborted is not None else None,
        _sqlite_dt(run.started_wall), _sqlite_dt(ended) if ended else None, *acc[1:],
    )


def _run_row(acc: list[Any]) -> dict[str, Any]:
    """A run's summary row as a Core parameter dict (the portable path); ``acc`` as for ``_sqlite_run_tuple``."""
    run = acc[0]
    status = run.status
    ended = run.ended_wall if status != "running" else 0.0
    row = {
        "run_id": run.run_id,
        "feature": run.feature,
        "route": run.route,
        "tenant_id": run.tenant_id,
        "user_hash": run.user_hash,
        "prompt_version": run.prompt_version,
        "attributes": dict(run.attributes) or None,
        "status": status,
        "reason": run.aborted.reason if run.aborted is not None else None,
        "started_at": _utc(run.started_wall),
        "ended_at": _utc(ended) if ended else None,
    }
    row.update(zip(_RUN_SUMS, acc[1:], strict=True))
    return row


def _txt(s: str, n: int) -> str:
    """Text from a framework or provider, fit for a column: NUL characters dropped (PostgreSQL refuses
    them, and one bad row would fail its whole batch), cut to ``n`` characters."""
    return (s.replace("\x00", "") if "\x00" in s else s)[:n]


_SPAN_COLS: tuple[str, ...] = (
    "span_id", "parent_id", "run_id", "kind", "name", "model", "provider", "start_at", "end_at", "hour",
    "latency_ms", "status", "error", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "cost_nanos", "tree_cost_nanos", "unpriced", "estimated", "cache_hit", "saved_nanos",
    "price_source", "price_input", "price_output", "price_cache_read", "price_cache_write", "flags", "feature",
    "route", "tenant_id", "user_hash", "prompt_version", "cache_write_1h_tokens", "service_tier",
    "web_search_requests", "tier", "variant", "opens_run",
)
_SQLITE_SPAN_HEAD = f"INSERT INTO costobs_spans ({', '.join(_SPAN_COLS)}) VALUES "
_NO_PRICES: tuple[str | None, ...] = (None, None, None, None, None)
_price_text: dict[int, tuple[Any, tuple[str | None, ...]]] = {}


def _prices_of(pr: Any) -> tuple[str | None, ...]:
    """The audit columns of a ``UnitPrices``, formatted once per price object (not once per span). Keyed by the
    object itself, not by its value: ``0.6`` and ``0.60`` are equal prices, each audited as it was written."""
    if pr is None:
        return _NO_PRICES
    hit = _price_text.get(id(pr))
    if hit is None or hit[0] is not pr:
        hit = (pr, (_txt(pr.source, 64), _dec(pr.input), _dec(pr.output), _dec(pr.cache_read), _dec(pr.cache_write)))
        if len(_price_text) > 4096:
            _price_text.clear()
        _price_text[id(pr)] = hit
    return hit[1]


_second_text: dict[int, str] = {}


def _sqlite_dt(ts: float) -> str:
    """SQLAlchemy's own SQLite DATETIME text (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC), so Core reads it
    back; the date and time of a whole second are formatted once (spans come in bursts). Microseconds are
    rounded as ``datetime.fromtimestamp`` rounds them (half to even), so every path stores the same time."""
    sec = int(ts)
    us = round((ts - sec) * 1_000_000)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    head = _second_text.get(sec)
    if head is None:
        head = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(sec))
        if len(_second_text) > 4096:
            _second_text.clear()
        _second_text[sec] = head
    return f"{head}.{us:06d}"


def _span_tuple(sp: Span, dt: Any, flag: Any) -> tuple[Any, ...]:
    """One span as a row of ``_SPAN_COLS``; ``dt`` and ``flag`` adapt times and booleans to the driver."""
    run = sp.run
    t = sp.tokens
    name = sp.name
    if name and (len(name) > 256 or "\x00" in name):
        name = _txt(name, 256)
    model = sp.model
    if model and (len(model) > 256 or "\x00" in model):
        model = _txt(model, 256)
    provider = sp.provider
    if provider and (len(provider) > 64 or "\x00" in provider):
        provider = _txt(provider, 64)
    start = sp.start_wall
    parent = sp.parent
    # (attrgetter reads several attributes in one C call: this runs for every span, on the exporter's thread)
    return (
        sp.span_id, parent.span_id if parent is not None and parent.exported else sp.export_parent_id,
        run.run_id, sp.kind, name or "", model or None, provider or None,
        dt(start), dt(sp.end_wall), int(start // 3600), sp.latency_ms, sp.status,
        _txt(sp.error, 128) if sp.error else None,
        *(t if t is not None else _NO_USAGE), sp.cost_nanos, sp.tree_cost,
        flag(sp.unpriced), flag(sp.estimated), flag(sp.cache_hit), sp.saved_nanos, *_prices_of(sp.prices),
        _flags_of(sp, run.flags),
        *_RUN_ATTRIBUTION(run), *(_NO_DETAIL if sp.detail is None else _detail_cols(sp.detail)),
        *(_tier_variant(attrs) if (attrs := run.attributes) else _NO_TIER),
        flag(False),  # opens_run: set by _write_batch, which learns it from the run's upsert
    )


_NO_TIER = (None, None)


def _tier_variant(attrs: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """A run's ``tier`` (the customer's plan) and ``variant`` attributes, as rollup keys: text (a number or a
    boolean as its text), cut to the column."""
    tier = attrs.get("tier")
    variant = attrs.get("variant")
    return (None if tier is None else _txt(tier if type(tier) is str else str(tier), 256),
            None if variant is None else _txt(variant if type(variant) is str else str(variant), 256))


def _flags_of(sp: Span, run_flags: tuple[str, ...]) -> str | None:
    """A span's flags column: its own flags, then its run's (``truncated``, ``sanitized`` attribution: every span
    of the run carries them), comma-separated."""
    own = sp.flags
    if not run_flags:
        return _txt(",".join(own), 256) if own else None
    return _txt(",".join(dict.fromkeys((*(own or ()), *run_flags))), 256)


_NO_USAGE = (0, 0, 0, 0, 0)
_NO_DETAIL = (0, None, 0)


def _detail_cols(d: UsageDetail) -> tuple[Any, ...]:
    """A span's ``UsageDetail`` as its three columns. ``web_search_requests`` is an INTEGER: a count past it is
    held at its ceiling here, on every database (SQLite would store it, PostgreSQL refuse it)."""
    tier = d.service_tier
    if tier is not None:
        tier = _txt(tier if isinstance(tier, str) else str(tier), 32) or None
    n = d.web_search_requests
    return d.cache_write_1h, tier, n if n <= _INT_MAX else _INT_MAX
_RUN_ATTRIBUTION = attrgetter("feature", "route", "tenant_id", "user_hash", "prompt_version")


# -- the hourly rollup ------------------------------------------------------------------------------------

_RKEY_OF = itemgetter(*(_SPAN_COLS.index(c) for c in ("hour", *_RKEY_COLS)))
"""A span row's rollup group: its hour and its rollup keys."""
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

_ROLLUP_ADDS: tuple[str, ...] = (*(f"{n}_{h}" for n in _RSUMS for h in ("hi", "lo")), *_RCOUNTS)
_ROLLUP_COLS: tuple[str, ...] = ("hour", "gkey", *_RKEY_COLS, *_ROLLUP_ADDS, "latency_max_ms")
_ROLLUP_HEAD = f"INSERT INTO costobs_rollups_hourly ({', '.join(_ROLLUP_COLS)}) VALUES "
_T = "costobs_rollups_hourly"
_ROLLUP_TAIL = (
    " ON CONFLICT (hour, gkey) DO UPDATE SET "
    + ", ".join(f"{k} = {_T}.{k} + excluded.{k}" for k in _ROLLUP_ADDS)
    + f", latency_max_ms = CASE WHEN excluded.latency_max_ms IS NULL THEN {_T}.latency_max_ms"
    f" WHEN {_T}.latency_max_ms IS NULL OR excluded.latency_max_ms > {_T}.latency_max_ms"
    f" THEN excluded.latency_max_ms ELSE {_T}.latency_max_ms END"
)
"""The rollup upsert, the same text on SQLite and PostgreSQL (``ON CONFLICT DO UPDATE``)."""
_HALF_MASK = 2**32 - 1
_PG_ARRAY = {c: "bigint" for c in _ROLLUP_ADDS} | {c: "text" for c in ("gkey", *_RKEY_COLS)} \
    | {"hour": "integer", "latency_max_ms": "float8"}


def _gkey(keys: Sequence[Any]) -> str:
    """The digest of a group's keys (without its hour), NULL told apart from every text: the rollup's conflict
    target beside ``hour`` (see ``rollups``). Migration 0003 fills the table with it too: it must not change."""
    return _blake2b(_json_ascii(keys).encode("ascii"), digest_size=16).hexdigest()


_json_ascii = json.JSONEncoder().encode  # (a tuple as a JSON array, every character outside ASCII escaped)
_blake2b = hashlib.blake2b


def _rollup_groups(span_rows: Sequence[Any]) -> dict[tuple[Any, ...], list[Any]]:
    """A batch's hourly rollups from its span rows as stored: (hour, *rollup keys) -> sums in ``_rollup_tuple``'s
    order (``runs``, index 9, is added by ``Store._insert`` once it knows which spans open their run)."""
    key_of = _RKEY_OF
    lat_us = int  # a latency in whole microseconds, truncated as ``_micros`` has the raw spans read it
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for row in span_rows:
        r = row if type(row) is tuple else tuple(row.values())
        gk = key_of(r)
        g = groups.get(gk)
        if g is None:
            g = groups[gk] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None]
        v = r[_I_COST]
        if v:
            g[0] += v
        if r[_I_HIT]:
            g[13] += 1
        else:
            g[1] += r[_I_TOK]
            g[2] += r[_I_TOK + 1]
            g[3] += r[_I_TOK + 2]
            g[4] += r[_I_TOK + 3]
            g[5] += r[_I_TOK + 4]
        v = r[_I_SAVED]
        if v:
            g[6] += v
        kind = r[_I_KIND]
        if kind in _CALL_KINDS:
            lat = r[_I_LAT]
            g[10] += 1
            g[14] += lat_us(lat * 1000.0)
            if g[15] is None or lat > g[15]:
                g[15] = lat
            if kind in _LLM_KINDS:
                g[7] += 1
            elif kind == "tool":
                g[8] += 1
        if r[_I_UNPRICED]:
            g[11] += 1
        if r[_I_EST]:
            g[12] += 1
    return groups


_INVOCATIONS_AT = _RUN_COLS.index("invocations")


def _batch_invocations(run_rows: Sequence[Any]) -> dict[str, int]:
    """Run id -> its root spans in the batch (the ``invocations`` its run row adds), tuple or dict rows."""
    out: dict[str, int] = {}
    for r in run_rows:
        if type(r) is dict:
            out[r["run_id"]] = r["invocations"]
        else:
            out[r[0]] = r[_INVOCATIONS_AT]
    return out


def _rollup_tuple(key: tuple[Any, ...], g: Sequence[Any]) -> tuple[Any, ...]:
    """A rollup row in ``_ROLLUP_COLS`` order: ``key`` is ``(hour, *keys)``, ``g`` the group's sums (cost, the five
    token counts, saved, then ``_RCOUNTS``, then the latency maximum); each money or token sum in its halves."""
    c, i, o, r, w, n, v = g[0], g[1], g[2], g[3], g[4], g[5], g[6]
    m = _HALF_MASK
    keys = key[1:]
    return (key[0], _gkey(keys), *keys, c >> 32, c & m, i >> 32, i & m, o >> 32, o & m, r >> 32, r & m, w >> 32,
            w & m, n >> 32, n & m, v >> 32, v & m, *g[7:])


def _span_row(sp: Span) -> dict[str, Any]:
    """One span as a Core parameter dict (the portable path, for dialects without a fast path)."""
    return dict(zip(_SPAN_COLS, _span_tuple(sp, _utc, bool), strict=True))


# -- values made to fit their columns (a batch the database refused) ------------------------------------

_INT32_COLS = frozenset({"hour", "web_search_requests", *_RUN_SUMS[6:]})
_BIGINT_COLS = frozenset({
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_nanos",
    "tree_cost_nanos", "saved_nanos", "cache_write_1h_tokens",
})


def _kinds(cols: Sequence[str]) -> str:
    """Per column: ``b`` a BIGINT, ``i`` an INTEGER, ``t`` anything else (text is fitted, other values kept)."""
    return "".join("i" if c in _INT32_COLS else "b" if c in _BIGINT_COLS else "t" for c in cols)


_SPAN_KINDS = _kinds(_SPAN_COLS)
_RUN_KINDS = _kinds(_RUN_COLS)
_SPAN_LENS: tuple[int | None, ...] = tuple(getattr(spans.c[c].type, "length", None) for c in _SPAN_COLS)
_RUN_LENS: tuple[int | None, ...] = tuple(getattr(runs.c[c].type, "length", None) for c in _RUN_COLS)
_FLAGS_AT = _SPAN_COLS.index("flags")
_ATTRS_AT = _RUN_COLS.index("attributes")


def _fit_text(s: str) -> str:
    """Text every database takes: surrogate pairs joined, lone surrogates replaced by U+FFFD (UTF-8 cannot
    encode them), NUL characters dropped (PostgreSQL refuses them); the same object when it already is."""
    if "\x00" in s:
        s = s.replace("\x00", "")
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return s


def _fit_int(v: int, ceiling: int) -> int:
    return ceiling if v > ceiling else -ceiling if v < -ceiling else v


def _fit_json(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Run attributes (text, numbers, booleans, ``None``) with their text made encodable."""
    return {_fit_text(k): _fit_text(v) if isinstance(v, str) else v for k, v in attrs.items()}


def _fit_row(row: Sequence[Any], kinds: str, lens: Sequence[int | None]) -> tuple[list[Any], bool]:
    """A row with every value made to fit its column, and whether any changed: integers held inside their
    column's range, text made encodable (``_fit_text``) and cut to the column's length. Booleans, times and
    floats are kept."""
    out = list(row)
    changed = False
    for i, v in enumerate(row):
        tv = type(v)
        if tv is str:
            nv: Any = _fit_text(v)
            n = lens[i]
            if n is not None and len(nv) > n:
                nv = nv[:n]
        elif tv is int:
            nv = _fit_int(v, _INT_MAX if kinds[i] == "i" else _BIG_MAX)
        else:
            continue
        if nv is not v and nv != v:
            out[i] = nv
            changed = True
    return out, changed


def _fit_span_row(row: tuple[Any, ...] | dict[str, Any]) -> tuple[Any, bool]:
    """A span's row (a tuple of ``_SPAN_COLS`` or a Core dict) made to fit (``_fit_row``), flagged ``sanitized``
    if anything changed; and whether it did."""
    vals, changed = _fit_row(tuple(row.values()) if isinstance(row, dict) else row, _SPAN_KINDS, _SPAN_LENS)
    if changed:
        _add_flag(vals)
    if isinstance(row, dict):
        return dict(zip(_SPAN_COLS, vals, strict=True)), changed
    return tuple(vals), changed


def _add_flag(vals: list[Any]) -> None:
    flags = vals[_FLAGS_AT]
    vals[_FLAGS_AT] = _txt(f"{flags},sanitized" if flags else "sanitized", 256)


def _flag_sanitized(row: tuple[Any, ...] | dict[str, Any]) -> Any:
    """A span's row flagged ``sanitized`` (its run's values were made to fit)."""
    vals = list(row.values()) if isinstance(row, dict) else list(row)
    _add_flag(vals)
    return dict(zip(_SPAN_COLS, vals, strict=True)) if isinstance(row, dict) else tuple(vals)


def _fit_run_row(row: tuple[Any, ...] | dict[str, Any]) -> tuple[Any, bool]:
    """A run's row (``_sqlite_run_tuple`` or ``_run_row``) made to fit (``_fit_row``; JSON text as text, the
    attributes of a Core row by value), and whether anything changed."""
    if isinstance(row, dict):
        attrs = row["attributes"]
        vals, changed = _fit_row(tuple(row[k] for k in _RUN_COLS), _RUN_KINDS, _RUN_LENS)
        if attrs:
            fitted = _fit_json(attrs)
            if fitted != attrs:
                vals[_ATTRS_AT] = fitted
                changed = True
        return dict(zip(_RUN_COLS, vals, strict=True)), changed
    text = row[_ATTRS_AT]
    vals, changed = _fit_row(row, _RUN_KINDS, _RUN_LENS)
    if text is not None:  # by value, as for a Core row (the text's \u0000 escapes are NULs too)
        attrs = json.loads(text)
        fitted = _fit_json(attrs)
        vals[_ATTRS_AT] = _json_text(fitted)
        changed = changed or fitted != attrs
    return tuple(vals), changed


def _fit_rows(span_rows: list[Any], run_rows: list[Any], span_runs: Sequence[str], span_hits: Sequence[bool],
              run_ids: Sequence[str]) -> int:
    """Run rows made to fit in place; the span rows of a run so changed flagged ``sanitized`` (their own values
    were fitted already: ``span_hits``). Returns how many spans were changed or flagged."""
    dirty = set()
    for i, rid in enumerate(run_ids):
        run_rows[i], hit = _fit_run_row(run_rows[i])
        if hit:
            dirty.add(rid)
    changed = 0
    for i, (rid, hit) in enumerate(zip(span_runs, span_hits, strict=True)):
        if not hit and rid in dirty:
            span_rows[i] = _flag_sanitized(span_rows[i])
            hit = True
        changed += hit
    return changed


def _neutral_span(sp: Span) -> tuple[Any, ...]:
    return _span_tuple(sp, float, bool)


def _neutral_run(acc: list[Any]) -> tuple[Any, ...]:
    run = acc[0]
    status = run.status
    ended = run.ended_wall if status != "running" else 0.0
    return (
        run.run_id, run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version,
        dict(run.attributes) or None, status, run.aborted.reason if run.aborted is not None else None,
        float(run.started_wall), float(ended) if ended else None, *acc[1:],
    )


_START_AT, _END_AT = _SPAN_COLS.index("start_at"), _SPAN_COLS.index("end_at")
_BOOL_AT = tuple(_SPAN_COLS.index(c) for c in ("unpriced", "estimated", "cache_hit"))
_RUN_START_AT, _RUN_END_AT = _RUN_COLS.index("started_at"), _RUN_COLS.index("ended_at")


def _from_neutral(span_rows: Sequence[Sequence[Any]], run_rows: Sequence[Sequence[Any]], fast: bool,
                  dialect: str) -> tuple[list[Any], list[Any]]:
    """Rows of ``Store.batch_rows`` as this store's write path takes them (``_span_tuple``/``_span_row`` and
    ``_sqlite_run_tuple``/``_run_row``)."""
    sqlite_fast = fast and dialect == "sqlite"
    dt: Any = _sqlite_dt if sqlite_fast else _utc
    sp: list[Any] = []
    for r in span_rows:
        v = list(r)
        v[_START_AT], v[_END_AT] = dt(v[_START_AT]), dt(v[_END_AT])
        if sqlite_fast:
            for i in _BOOL_AT:
                v[i] = int(v[i])
        sp.append(tuple(v) if fast else dict(zip(_SPAN_COLS, v, strict=True)))
    rr: list[Any] = []
    for r in run_rows:
        v = list(r)
        v[_RUN_START_AT] = dt(v[_RUN_START_AT])
        if v[_RUN_END_AT] is not None:
            v[_RUN_END_AT] = dt(v[_RUN_END_AT])
        if sqlite_fast:
            attrs = v[_ATTRS_AT]
            v[_ATTRS_AT] = _json_text(attrs) if attrs else None
            rr.append(tuple(v))
        else:
            rr.append(dict(zip(_RUN_COLS, v, strict=True)))
    return sp, rr


def _is_data_error(exc: BaseException) -> bool:
    """The batch was refused for its content (retrying it as it is cannot help), not for the database's state:
    a value the driver cannot bind (an int past 64 bits, text it cannot encode) or the database refuses (out
    of range, too long, a constraint)."""
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError, OverflowError, UnicodeError)):
        return True
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        return isinstance(exc.orig, (OverflowError, UnicodeError, ValueError, TypeError))
    return False


def _json_text(value: Any) -> str:
    """JSON as the store writes it: characters as they are, not ``\\u`` escapes (see ``Store.__init__``)."""
    return json.dumps(value, ensure_ascii=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
    except Exception:  # a read-only or in-memory database
        pass
    finally:
        cur.close()


from . import _rollup_keys  # noqa: E402  (it reads this module's tables and helpers: imported once they exist)
