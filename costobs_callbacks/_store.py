"""SQLAlchemy storage: tables, batch writes, queries. Dialect-neutral SQLAlchemy 2.x Core.

Money is integer nano-USD (``BIGINT``), exact on every database; unit prices are stored as decimal
text for audit. Times are naive UTC; ``hour`` is the span's start in whole hours since the epoch, so
hourly and daily buckets are integer arithmetic on any dialect.
"""

from __future__ import annotations

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
from operator import attrgetter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ._events import UsageDetail, nanos_to_usd
from ._exceptions import ConfigurationError
from ._export import PoisonBatch
from ._ledger import Run, RunCost, Span

__all__ = ["ROLLUP_KEYS", "RollupRow", "Store", "migrations_dir"]

logger = logging.getLogger("costobs_callbacks")

HEAD_REVISION = "0002"

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

ROLLUP_KEYS: dict[str, sa.ColumnElement[Any]] = {
    "feature": spans.c.feature,
    "route": spans.c.route,
    "tenant_id": spans.c.tenant_id,
    "user": spans.c.user_hash,
    "model": spans.c.model,
    "provider": spans.c.provider,
    "kind": spans.c.kind,
    "name": spans.c.name,
    "status": spans.c.status,
    "prompt_version": spans.c.prompt_version,
}

_CALL_KINDS = ("llm", "embedding", "tool", "retriever")
_LLM_KINDS = ("llm", "embedding")


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
        """Write finished spans and the summaries of their runs in one transaction (all or nothing:
        the exporter retries a failed batch whole). With ``fit``, every value is first made to fit its
        column; returns how many spans that changed.

        Items are finished ``Span`` objects and, for runs refused before any span, ``Run`` objects.
        Each run touched by the batch gets one upsert: its totals grow by the batch's spans, and its
        status, reason and end are read from the live run (the root span of a run ends it).
        """
        self.ensure_schema()
        sqlite_fast = self._fast and self.dialect == "sqlite"
        span_rows, run_rows, changed = self._rows(
            items, self._span_row_fn, _sqlite_run_tuple if sqlite_fast else _run_row, fit)
        if run_rows:
            self._insert(span_rows, run_rows, sqlite_fast)
        return changed

    def _rows(self, items: Sequence[Any], make_row: Any, make_run: Any, fit: bool) -> tuple[list[Any], list[Any], int]:
        """A batch's span rows (``make_row`` per span) and its runs' summary rows (``make_run`` per run), values
        made to fit with ``fit``, and how many spans that changed."""
        span_rows: list[Any] = []
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
        return span_rows, run_rows, changed

    def _insert(self, span_rows: list[Any], run_rows: list[Any], sqlite_fast: bool) -> None:
        """One transaction: the span rows inserted, the run rows upserted (their totals grow by the batch's)."""
        with self.engine.begin() as conn:
            if sqlite_fast:
                # Many rows per statement: sqlite3 releases and retakes the GIL at every step, and a
                # busy app thread makes each retake wait up to the switch interval (5 ms); one step per
                # few hundred rows keeps the writer from starving behind the app.
                if span_rows:
                    self._sqlite_many(conn, _SQLITE_SPAN_HEAD, len(_SPAN_COLS), span_rows, "")
                self._sqlite_many(conn, _SQLITE_RUN_HEAD, len(_RUN_COLS), run_rows, _SQLITE_RUN_TAIL)
                return
            if span_rows:
                if self._span_insert_sql is not None:
                    # the hot write: straight to the driver's executemany, rows prepared as tuples
                    conn.exec_driver_sql(self._span_insert_sql, span_rows)
                else:
                    conn.execute(sa.insert(spans), span_rows)
            if self.dialect == "postgresql":
                conn.execute(self._upsert_runs(), run_rows)
            else:
                self._merge_runs_portable(conn, run_rows)

    # -- spooled batches (``_spool``): rows kept while the database is away, written when it is back ------

    def batch_rows(self, items: Sequence[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """A batch as the rows it would write, in a form any backend can write later and JSON keeps: span rows
        in ``_SPAN_COLS`` order and run rows in ``_RUN_COLS`` order, times as epoch seconds, flags as booleans,
        a run's attributes as a dict. Built now, from the live runs (their status as it is now)."""
        span_rows, run_rows, _ = self._rows(items, _neutral_span, _neutral_run, False)
        return span_rows, run_rows

    def write_rows(self, span_rows: Sequence[Sequence[Any]], run_rows: Sequence[Sequence[Any]], *,
                   fit: bool = True) -> None:
        """Write rows from ``batch_rows`` in one transaction, as ``write_batch`` writes a batch: refused for their
        content, written again made to fit (flagged ``sanitized``); refused still (or at once without ``fit``),
        ``PoisonBatch``."""
        self.ensure_schema()
        sqlite_fast = self._fast and self.dialect == "sqlite"
        sp, rr = _from_neutral(span_rows, run_rows, self._fast, self.dialect)
        try:
            self._insert(sp, rr, sqlite_fast)
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
            rid_at = _SPAN_COLS.index("run_id")
            rids = [r[rid_at] for r in span_rows]
            changed = _fit_rows(sp, rr, rids, hits, [r[0] for r in run_rows])
            try:
                self._insert(sp, rr, sqlite_fast)
            except Exception as exc2:
                if not _is_data_error(exc2):
                    raise
                orig = getattr(exc2, "orig", None)
                raise PoisonBatch(str(orig if orig is not None else exc2)) from exc2
            self.sanitized += changed

    def _sqlite_many(self, conn: Connection, head: str, ncols: int, rows: Sequence[tuple[Any, ...]],
                     tail: str) -> None:
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
            conn.exec_driver_sql(sql, tuple(chain.from_iterable(chunk)))
            i += size

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

    def _merge_runs_portable(self, conn: Connection, run_rows: list[dict[str, Any]]) -> None:
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

    def _existing_runs(self, conn: Connection, run_ids: Iterable[str]) -> set[str]:
        ids = list(run_ids)
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            found.update(conn.execute(sa.select(runs.c.run_id).where(runs.c.run_id.in_(chunk))).scalars())
        return found

    # -- queries --------------------------------------------------------------------------------

    def run_cost(self, run_id: str) -> RunCost | None:
        self.ensure_schema()
        run_id = _fit_text(run_id)
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().first()
            if row is None:
                return None

            def model_costs(split: bool) -> Any:
                return sa.select(spans.c.model, *_sum(sa.func.coalesce(spans.c.cost_nanos, 0), "cost", split)) \
                    .where(spans.c.run_id == run_id, spans.c.kind.in_(_LLM_KINDS), spans.c.model.is_not(None),
                           spans.c.cache_hit.is_(False), spans.c.unpriced.is_(False)) \
                    .group_by(spans.c.model)

            by_model = {r["model"]: nanos_to_usd(_summed(r, "cost")) or Decimal(0)
                        for r in self._sums(conn, model_costs)}
            unpriced_models = tuple(sorted(conn.execute(
                sa.select(spans.c.model).distinct()
                .where(spans.c.run_id == run_id, spans.c.unpriced.is_(True), spans.c.model.is_not(None))
            ).scalars()))
        attrs: dict[str, Any] = {"feature": row["feature"]}
        for k, col in (("route", "route"), ("tenant_id", "tenant_id"), ("user", "user_hash"),
                       ("prompt_version", "prompt_version")):
            if row[col] is not None:
                attrs[k] = row[col]
        attrs.update(row["attributes"] or {})
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
            attributes=attrs,
            reason=row["reason"],
            estimated_calls=int(row["estimated_calls"]),
        )

    def rollup(
        self,
        by: Sequence[str],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        bucket: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> list[RollupRow]:
        self.ensure_schema()
        out: list[RollupRow] = []
        with self.engine.connect() as conn:
            rows = self._sums(conn, lambda split: self._rollup_query(by, since, until, bucket, where, split))
            for r in rows:
                b = r.get("bucket")
                if b is not None:
                    hours = int(b) * (24 if bucket == "day" else 1)
                    bstart: datetime | None = datetime.fromtimestamp(hours * 3600, UTC)
                else:
                    bstart = None
                n = int(r["lat_n"] or 0)
                out.append(RollupRow(
                    key={k: r[f"k_{k}"] for k in by},
                    bucket_start=bstart,
                    cost_usd=nanos_to_usd(_summed(r, "cost")) or Decimal(0),
                    input_tokens=_summed(r, "inp"),
                    output_tokens=_summed(r, "out"),
                    cache_read_tokens=_summed(r, "cr"),
                    cache_write_tokens=_summed(r, "cw"),
                    reasoning_tokens=_summed(r, "rsn"),
                    llm_calls=int(r["llm"]),
                    tool_calls=int(r["tool"]),
                    runs=int(r["runs"]),
                    avg_latency_ms=(float(r["lat_sum"]) / n) if n else None,
                    max_latency_ms=float(r["lat_max"]) if r["lat_max"] is not None else None,
                    unpriced_calls=int(r["unpriced"]),
                    estimated_calls=int(r["est"]),
                    cache_hits=int(r["hits"]),
                    saved_usd=nanos_to_usd(_summed(r, "saved")) or Decimal(0),
                ))
        if rows and "cost" not in rows[0]:  # summed in halves: the database ordered them by the high half only
            out.sort(key=attrgetter("cost_usd"), reverse=True)
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

    def _rollup_query(self, by: Sequence[str], since: datetime | None, until: datetime | None, bucket: str | None,
                      where: Mapping[str, Any] | None, split: bool) -> Any:
        s = spans.c
        keys = [ROLLUP_KEYS[k].label(f"k_{k}") for k in by]
        group: list[Any] = list(keys)
        bucket_col = None
        if bucket == "hour":
            bucket_col = s.hour.label("bucket")
        elif bucket == "day":
            bucket_col = (s.hour // 24).label("bucket")
        if bucket_col is not None:
            group.append(bucket_col)
        not_hit = s.cache_hit.is_(False)

        def tok(col: Any, name: str) -> list[Any]:
            return _sum(sa.case((not_hit, col), else_=0), name, split)

        is_call = s.kind.in_(_CALL_KINDS)
        cols = [
            *group,
            *_sum(s.cost_nanos, "cost", split),
            *tok(s.input_tokens, "inp"),
            *tok(s.output_tokens, "out"),
            *tok(s.cache_read_tokens, "cr"),
            *tok(s.cache_write_tokens, "cw"),
            *tok(s.reasoning_tokens, "rsn"),
            sa.func.coalesce(sa.func.sum(sa.case((s.kind.in_(_LLM_KINDS), 1), else_=0)), 0).label("llm"),
            sa.func.coalesce(sa.func.sum(sa.case((s.kind == "tool", 1), else_=0)), 0).label("tool"),
            sa.func.count(sa.distinct(s.run_id)).label("runs"),
            sa.func.sum(sa.case((is_call, s.latency_ms), else_=None)).label("lat_sum"),
            sa.func.sum(sa.case((is_call, 1), else_=0)).label("lat_n"),
            sa.func.max(sa.case((is_call, s.latency_ms), else_=None)).label("lat_max"),
            sa.func.coalesce(sa.func.sum(sa.case((s.unpriced.is_(True), 1), else_=0)), 0).label("unpriced"),
            sa.func.coalesce(sa.func.sum(sa.case((s.estimated.is_(True), 1), else_=0)), 0).label("est"),
            sa.func.coalesce(sa.func.sum(sa.case((s.cache_hit.is_(True), 1), else_=0)), 0).label("hits"),
            *_sum(s.saved_nanos, "saved", split),
        ]
        q = sa.select(*cols)
        if since is not None:
            q = q.where(s.start_at >= _naive_utc(since))
        if until is not None:
            q = q.where(s.start_at < _naive_utc(until))
        for k, v in (where or {}).items():
            col = ROLLUP_KEYS[k]
            if isinstance(v, (list, tuple, set, frozenset)):
                vals = [_where_text(x) for x in v]
                listed = col.in_([x for x in vals if x is not None])
                q = q.where(sa.or_(listed, col.is_(None)) if None in vals else listed)
            elif v is None:
                q = q.where(col.is_(None))
            else:
                q = q.where(col == _where_text(v))
        if group:
            q = q.group_by(*group)
        return q.order_by(sa.desc(cols[len(group)]))

    def spans_of(self, run_id: str) -> list[dict[str, Any]]:
        """Every stored span of a run, oldest first (for audits and the CLI)."""
        self.ensure_schema()
        run_id = _fit_text(run_id)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(spans).where(spans.c.run_id == run_id).order_by(spans.c.id)).mappings()
            return [dict(r) for r in rows]

    def close(self) -> None:
        self.engine.dispose()


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
    "web_search_requests",
)
_SQLITE_SPAN_HEAD = f"INSERT INTO costobs_spans ({', '.join(_SPAN_COLS)}) VALUES "
_NO_PRICES: tuple[str | None, ...] = (None, None, None, None, None)
_price_text: dict[Any, tuple[str | None, ...]] = {}


def _prices_of(pr: Any) -> tuple[str | None, ...]:
    """The audit columns of a ``UnitPrices``, formatted once per distinct price (not once per span)."""
    if pr is None:
        return _NO_PRICES
    hit = _price_text.get(pr)
    if hit is None:
        hit = (_txt(pr.source, 64), _dec(pr.input), _dec(pr.output), _dec(pr.cache_read), _dec(pr.cache_write))
        if len(_price_text) > 4096:
            _price_text.clear()
        _price_text[pr] = hit
    return hit


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
    )


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
