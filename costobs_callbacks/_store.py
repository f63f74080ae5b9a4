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

from ._events import nanos_to_usd
from ._exceptions import ConfigurationError
from ._export import PoisonBatch
from ._ledger import Run, RunCost, Span

__all__ = ["ROLLUP_KEYS", "RollupRow", "Store", "migrations_dir"]

logger = logging.getLogger("costobs_callbacks")

HEAD_REVISION = "0001"

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
        """Write a batch; a row the database refuses raises ``PoisonBatch`` (the exporter then splits
        the batch), anything else (the database is down) propagates and is retried."""
        try:
            self._write_batch(items)
        except (sa.exc.DataError, sa.exc.IntegrityError) as exc:
            raise PoisonBatch(str(exc.orig) if exc.orig is not None else str(exc)) from exc

    def _write_batch(self, items: Sequence[Any]) -> None:
        """Write finished spans and the summaries of their runs in one transaction (all or nothing:
        the exporter retries a failed batch whole).

        Items are finished ``Span`` objects and, for runs refused before any span, ``Run`` objects.
        Each run touched by the batch gets one upsert: its totals grow by the batch's spans, and its
        status, reason and end are read from the live run (the root span of a run ends it).
        """
        self.ensure_schema()
        make_row = self._span_row_fn
        span_rows: list[Any] = []
        # run id -> [run, *the batch's totals in _RUN_SUMS order]
        runs_seen: dict[str, list[Any]] = {}
        for it in items:
            if isinstance(it, Span):
                run = it.run
                rid = run.run_id
                acc = runs_seen.get(rid)
                if acc is None:
                    acc = runs_seen[rid] = [run, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
                span_rows.append(make_row(it))
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
        if not runs_seen:
            return
        if self.dialect == "sqlite":
            run_rows: list[Any] = [_sqlite_run_tuple(acc) for acc in runs_seen.values()]
        else:
            run_rows = [_run_row(acc) for acc in runs_seen.values()]
        with self.engine.begin() as conn:
            if self.dialect == "sqlite":
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
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        ins = dialect_insert(runs)
        ex = ins.excluded
        c = runs.c
        add = {k: getattr(c, k) + getattr(ex, k) for k in _RUN_SUMS}
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
            values: dict[str, Any] = {k: getattr(c, k) + sa.bindparam(f"d_{k}", type_=sa.BigInteger())
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
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().first()
            if row is None:
                return None
            by_model = {
                m: nanos_to_usd(int(n or 0)) or Decimal(0)
                for m, n in conn.execute(
                    sa.select(spans.c.model, sa.func.sum(sa.func.coalesce(spans.c.cost_nanos, 0)))
                    .where(spans.c.run_id == run_id, spans.c.kind.in_(_LLM_KINDS), spans.c.model.is_not(None),
                           spans.c.cache_hit.is_(False), spans.c.unpriced.is_(False))
                    .group_by(spans.c.model)
                )
            }
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

        def tok(col: Any) -> Any:
            return sa.func.coalesce(sa.func.sum(sa.case((not_hit, col), else_=0)), 0)

        is_call = s.kind.in_(_CALL_KINDS)
        cols = [
            *group,
            sa.func.coalesce(sa.func.sum(s.cost_nanos), 0).label("cost"),
            tok(s.input_tokens).label("inp"),
            tok(s.output_tokens).label("out"),
            tok(s.cache_read_tokens).label("cr"),
            tok(s.cache_write_tokens).label("cw"),
            tok(s.reasoning_tokens).label("rsn"),
            sa.func.coalesce(sa.func.sum(sa.case((s.kind.in_(_LLM_KINDS), 1), else_=0)), 0).label("llm"),
            sa.func.coalesce(sa.func.sum(sa.case((s.kind == "tool", 1), else_=0)), 0).label("tool"),
            sa.func.count(sa.distinct(s.run_id)).label("runs"),
            sa.func.sum(sa.case((is_call, s.latency_ms), else_=None)).label("lat_sum"),
            sa.func.sum(sa.case((is_call, 1), else_=0)).label("lat_n"),
            sa.func.max(sa.case((is_call, s.latency_ms), else_=None)).label("lat_max"),
            sa.func.coalesce(sa.func.sum(sa.case((s.unpriced.is_(True), 1), else_=0)), 0).label("unpriced"),
            sa.func.coalesce(sa.func.sum(sa.case((s.estimated.is_(True), 1), else_=0)), 0).label("est"),
            sa.func.coalesce(sa.func.sum(sa.case((s.cache_hit.is_(True), 1), else_=0)), 0).label("hits"),
            sa.func.coalesce(sa.func.sum(s.saved_nanos), 0).label("saved"),
        ]
        q = sa.select(*cols)
        if since is not None:
            q = q.where(s.start_at >= _naive_utc(since))
        if until is not None:
            q = q.where(s.start_at < _naive_utc(until))
        for k, v in (where or {}).items():
            col = ROLLUP_KEYS[k]
            if v is None:
                q = q.where(col.is_(None))
            elif isinstance(v, (list, tuple, set, frozenset)):
                q = q.where(col.in_(list(v)))
            else:
                q = q.where(col == v)
        if group:
            q = q.group_by(*group)
        q = q.order_by(sa.desc("cost"))
        out: list[RollupRow] = []
        with self.engine.connect() as conn:
            for r in conn.execute(q).mappings():
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
                    cost_usd=nanos_to_usd(int(r["cost"])) or Decimal(0),
                    input_tokens=int(r["inp"]),
                    output_tokens=int(r["out"]),
                    cache_read_tokens=int(r["cr"]),
                    cache_write_tokens=int(r["cw"]),
                    reasoning_tokens=int(r["rsn"]),
                    llm_calls=int(r["llm"]),
                    tool_calls=int(r["tool"]),
                    runs=int(r["runs"]),
                    avg_latency_ms=(float(r["lat_sum"]) / n) if n else None,
                    max_latency_ms=float(r["lat_max"]) if r["lat_max"] is not None else None,
                    unpriced_calls=int(r["unpriced"]),
                    estimated_calls=int(r["est"]),
                    cache_hits=int(r["hits"]),
                    saved_usd=nanos_to_usd(int(r["saved"])) or Decimal(0),
                ))
        return out

    def spans_of(self, run_id: str) -> list[dict[str, Any]]:
        """Every stored span of a run, oldest first (for audits and the CLI)."""
        self.ensure_schema()
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(spans).where(spans.c.run_id == run_id).order_by(spans.c.id)).mappings()
            return [dict(r) for r in rows]

    def close(self) -> None:
        self.engine.dispose()

    # -- for `costobs db` -------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None: no costobs tables); reads only."""
        return self._current_revision()


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


def _naive_utc(dt: datetime) -> datetime:
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


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
_SQLITE_RUN_TAIL = (
    " ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(f"{k} = costobs_runs.{k} + excluded.{k}" for k in _RUN_SUMS)
    + ", status = excluded.status, reason = excluded.reason, ended_at = excluded.ended_at"
)


def _sqlite_run_tuple(acc: list[Any]) -> tuple[Any, ...]:
    """A run's summary row for SQLite, in ``_RUN_COLS`` order: ``acc`` is ``[run, *totals]`` (see
    ``_write_batch``); its status, reason and end as the run has them now."""
    run = acc[0]
    status = run.status
    ended = run.ended_wall if status != "running" else 0.0
    attrs = run.attributes
    return (
        run.run_id, run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version,
        json.dumps(dict(attrs)) if attrs else None, status, run.aborted.reason if run.aborted is not None else None,
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
    "route", "tenant_id", "user_hash", "prompt_version",
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
    back; the date and time of a whole second are formatted once (spans come in bursts)."""
    sec = int(ts)
    us = int((ts - sec) * 1_000_000 + 0.5)
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
        _txt(",".join(sp.flags), 256) if sp.flags else None,
        *_RUN_ATTRIBUTION(run),
    )


_NO_USAGE = (0, 0, 0, 0, 0)
_RUN_ATTRIBUTION = attrgetter("feature", "route", "tenant_id", "user_hash", "prompt_version")


def _span_row(sp: Span) -> dict[str, Any]:
    """One span as a Core parameter dict (the portable path, for dialects without a fast path)."""
    return dict(zip(_SPAN_COLS, _span_tuple(sp, _utc, bool), strict=True))


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
