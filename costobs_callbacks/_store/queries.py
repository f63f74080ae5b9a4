"""Reading the store: ``run_cost``, ``spend``, ``top_runs``, ``rollup`` and ``spans_of``, their filters (a window,
``where``) and their exact sums.

``rollup`` (and so ``spend``) reads the hourly rollup table whenever it holds the answer, the raw spans otherwise:
the figures are the same either way. A sum that could pass BIGINT is read in two halves (``_sum``, ``_summed``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles

from .._events import nanos_to_usd
from .._exceptions import ConfigurationError
from .._ledger import RunCost
from . import keyed as by_key
from .fitting import _fit_text, _txt
from .schema import (
    _CALL_KINDS,
    _LLM_KINDS,
    _MODEL_KEYS,
    _ROLLUP_COL_OF,
    _RSUMS,
    ROLLUP_KEYS,
    RUN_KEYS,
    rollups,
    runs,
    spans,
)

__all__ = ["Queries", "RollupRow", "run_matches"]


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


class Queries:
    """``Store``'s queries (a mixin: the engine, the dialect and ``ensure_schema`` are the store's)."""

    engine: Engine
    dialect: str

    if TYPE_CHECKING:
        def ensure_schema(self) -> None: ...

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
        see ``keyed``, else from the hourly rows), from the raw spans otherwise: the figures are the same either
        way. A run counts once (``runs``), in the group of the span that opened it (its first root
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
        dim = by_key.dim_of(by, where) if table and keyed else None
        with self.engine.connect() as conn:
            if dim is not None:
                rows: list[Any] = _dict_rows(conn.execute(by_key.query(dim, by, since, until, bucket, where)))
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
        out.sort(key=_rollup_order)
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


# -- windows, keys and sums ------------------------------------------------------------------------------

def _rollup_order(row: RollupRow) -> tuple[Any, ...]:
    """``rollup()``'s order: the most expensive first; among equal costs, by bucket, then by the key values (None
    first), so that the rollup table and the raw spans (and any database's collation) give one order."""
    return (-row.cost_usd, row.bucket_start is not None, row.bucket_start or _NO_TIME,
            *((v is not None, str(v) if v is not None else "") for v in row.key.values()))


_NO_TIME = datetime.fromtimestamp(0, UTC)


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


def _naive_utc(dt: datetime) -> datetime:
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


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


# -- where ------------------------------------------------------------------------------------------------

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
