"""Rows from the ledger's objects: a batch of finished spans (and of runs refused before any span) as span rows,
run summary rows and hourly rollup rows.

Each write path takes its own form of a row: tuples in ``_SPAN_COLS`` / ``_RUN_COLS`` order with the driver's
times and booleans for the fast paths (SQLite's text times, PostgreSQL's datetimes), Core parameter dicts for
the portable path, and the neutral form the spool keeps (epoch seconds, booleans, attributes as a dict), turned
into either of the others when it is written (``_from_neutral``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal
from operator import attrgetter, itemgetter
from typing import Any

from .._events import UsageDetail
from .._ledger import Run, Span
from .fitting import _fit_rows, _fit_span_row, _txt
from .schema import (
    _ATTRS_AT,
    _BOOL_AT,
    _CALL_KINDS,
    _END_AT,
    _I_COST,
    _I_EST,
    _I_HIT,
    _I_KIND,
    _I_LAT,
    _I_OPENS,
    _I_SAVED,
    _I_TOK,
    _I_UNPRICED,
    _INT_MAX,
    _INVOCATIONS_AT,
    _LLM_KINDS,
    _RKEY_COLS,
    _RUN_COLS,
    _RUN_END_AT,
    _RUN_START_AT,
    _RUN_SUMS,
    _SPAN_COLS,
    _START_AT,
    _json_text,
)

__all__: list[str] = []


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


# -- a batch as rows ------------------------------------------------------------------------------------

def _batch_rows(items: Sequence[Any], make_row: Any, make_run: Any,
                fit: bool) -> tuple[list[Any], list[Any], int, dict[str, int]]:
    """A batch's span rows (``make_row`` per span) and its runs' summary rows (``make_run`` per run), values
    made to fit with ``fit``, how many spans that changed, and the row of each run's first root span.

    That first root span is presumed to open its run (``opens_run``): it does unless the store holds a root span
    of the run already, which only the run's upsert tells (``writes._open_runs`` corrects the few it does not)."""
    span_rows: list[Any] = []
    first_root: dict[str, int] = {}  # run id -> the row of its first root span in the batch
    fitted: list[tuple[str, bool]] = []  # with ``fit``: per span row, its run id and whether it was changed
    # run id -> [run, *the batch's totals in _RUN_SUMS order, its first root span and that span's row (or None)]
    runs_seen: dict[str, list[Any]] = {}
    cols_of: dict[int, tuple[Any, ...]] = {}  # id(run) -> _run_cols(run), each run object read once per batch
    last_run: Run | None = None
    rid = ""
    acc: list[Any] = []
    cols: tuple[Any, ...] = ()
    for it in items:
        if isinstance(it, Span):
            run = it.run
            if run is not last_run:  # (a run's spans come in a row, but runs in flight interleave)
                last_run = run
                found = cols_of.get(id(run))
                if found is None:
                    found = cols_of[id(run)] = _run_cols(run)
                cols = found
                rid = cols[0]
                acc = runs_seen.get(rid)  # type: ignore[assignment]
                if acc is None:
                    acc = runs_seen[rid] = [run, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None, None]
            opens = it.is_root and rid not in first_root
            if opens:
                first_root[rid] = len(span_rows)
            row = make_row(it, cols, opens)
            if fit:
                row, hit = _fit_span_row(row)
                fitted.append((rid, hit))
            span_rows.append(row)
            if opens:
                acc[13] = it
                acc[14] = row
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
            runs_seen[it.run_id] = [it, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, None, None]
    run_rows: list[Any] = [make_run(acc) for acc in runs_seen.values()]
    changed = 0
    if fit:
        changed = _fit_rows(span_rows, run_rows, [rid for rid, _ in fitted], [hit for _, hit in fitted],
                            list(runs_seen))
    return span_rows, run_rows, changed, first_root


# -- span rows ------------------------------------------------------------------------------------------

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
    sec = _trunc(ts)
    us = _round((ts - sec) * 1e6)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:  # (before 1970)
        sec, us = sec - 1, us + 1_000_000
    head = _second_text.get(sec)
    if head is None:
        head = time.strftime("%Y-%m-%d %H:%M:%S.", time.gmtime(sec))
        if len(_second_text) > 4096:
            _second_text.clear()
        _second_text[sec] = head
    return head + _DIGITS3[us // 1000] + _DIGITS3[us % 1000]  # (a third faster than formatting ``us``)


_DIGITS3 = [f"{i:03d}" for i in range(1000)]

_trunc = math.trunc
"""``int(x)`` of a number (toward zero), in half its instructions: ``int`` is a type, called through its
constructor. The exporter's thread truncates several times a span."""

_round = float.__round__
"""``round(x)`` of a float (half to even), in half its instructions: ``round`` looks its argument's ``__round__``
up at every call."""

_AS_INT = (0, 1)
"""A boolean as SQLite stores it, by indexing (``_AS_INT[flag]``: a tenth of ``int(flag)``'s instructions)."""
_AS_BOOL = (False, True)
"""A boolean as is, by indexing, for the paths whose drivers take booleans."""


_PG_EPOCH = 946_684_800
"""2000-01-01 in epoch seconds: PostgreSQL's binary timestamps count microseconds from it."""
_FIRST_SECOND, _END_SECOND = -62_135_596_800, 253_402_300_800
"""The seconds ``datetime`` can hold (years 1 to 9999)."""


def _pg_micros(ts: float) -> int:
    """A time as PostgreSQL's binary ``timestamp`` holds it (microseconds since 2000-01-01 UTC, an int64), for
    binary COPY: the same microseconds as ``_utc`` (rounded as ``_sqlite_dt`` rounds them), without a ``datetime``
    per value. A time ``datetime`` cannot hold is refused as ``_utc`` refuses it."""
    sec = _trunc(ts)
    if not _FIRST_SECOND <= sec < _END_SECOND:
        raise ValueError(f"timestamp {ts!r} out of range")
    return (sec - _PG_EPOCH) * 1_000_000 + _round((ts - sec) * 1e6)


def _run_cols(run: Run) -> tuple[Any, ...]:
    """What every span row of ``run`` holds of it: its id, its flags, its attribution and its tier and variant."""
    attrs = run.attributes
    return run.run_id, run.flags, _RUN_ATTRIBUTION(run), _tier_variant(attrs) if attrs else _NO_TIER


def _span_tuple(sp: Span, dt: Any, flag: tuple[Any, Any], cols: tuple[Any, ...] | None = None,
                opens: bool = False) -> tuple[Any, ...]:
    """One span as a row of ``_SPAN_COLS``; ``dt`` adapts times to the driver, and ``flag`` booleans (``_AS_INT`` or
    ``_AS_BOOL``, indexed by the span's booleans); ``cols`` are
    its run's (``_run_cols``: read once per run by ``_batch_rows``); ``opens``, whether it opens its run."""
    rid, run_flags, attribution, tier_variant = cols if cols is not None else _run_cols(sp.run)
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
    return (
        sp.span_id, parent.span_id if parent is not None and parent.exported else sp.export_parent_id,
        rid, sp.kind, name or "", model or None, provider or None,
        dt(start), dt(sp.end_wall), _trunc(start // 3600), sp.latency_ms, sp.status,
        _txt(sp.error, 128) if sp.error else None,
        *(t if t is not None else _NO_USAGE), sp.cost_nanos, sp.tree_cost,
        flag[sp.unpriced], flag[sp.estimated], flag[sp.cache_hit], sp.saved_nanos, *_prices_of(sp.prices),
        _flags_of(sp, run_flags) if run_flags or sp.flags else None, *attribution,
        *(_NO_DETAIL if sp.detail is None else _detail_cols(sp.detail)), *tier_variant, flag[opens],
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


def _span_row(sp: Span, cols: tuple[Any, ...] | None = None, opens: bool = False) -> dict[str, Any]:
    """One span as a Core parameter dict (the portable path, for dialects without a fast path)."""
    return dict(zip(_SPAN_COLS, _span_tuple(sp, _utc, _AS_BOOL, cols, opens), strict=True))


# -- run rows -------------------------------------------------------------------------------------------

def _run_tuple(acc: list[Any], dt: Any) -> tuple[Any, ...]:
    """A run's summary row as a tuple of ``_RUN_COLS``: ``acc`` is ``[run, *totals, root span, its row]`` (see
    ``_batch_rows``); its status, reason and end as the run has them now; its attributes as JSON text as the engine
    writes it (``_json_text``); its times through ``dt``.

    A time equal to its root span's (a run of one model call starts with it; a run ends with its root span) is
    taken from the root's row, where ``dt`` made it already: a time's text costs several thousand instructions, a
    tenth of a one-call run's row."""
    run = acc[0]
    status = run.status
    ended = run.ended_wall if status != "running" else 0.0
    attrs = run.attributes
    started = run.started_wall
    sp = acc[13]
    if sp is None:
        start_at = dt(started)
        end_at = dt(ended) if ended else None
    else:
        row = acc[14]
        start_at = row[_I_START] if started == sp.start_wall else dt(started)
        end_at = None if not ended else row[_I_START + 1] if ended == sp.end_wall else dt(ended)
    return (
        run.run_id, run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version,
        _json_text(dict(attrs)) if attrs else None, status,
        run.aborted.reason if run.aborted is not None else None, start_at, end_at, *acc[1:13],
    )


_I_START = _SPAN_COLS.index("start_at")  # (end_at follows it)


def _sqlite_run_tuple(acc: list[Any]) -> tuple[Any, ...]:
    """A run's summary row for SQLite (``_run_tuple``, times as SQLite's text)."""
    return _run_tuple(acc, _sqlite_dt)


def _pg_run_tuple(acc: list[Any]) -> tuple[Any, ...]:
    """A run's summary row for PostgreSQL's binary COPY (``_run_tuple``, times as ``_pg_micros``)."""
    return _run_tuple(acc, _pg_micros)


def _run_row(acc: list[Any]) -> dict[str, Any]:
    """A run's summary row as a Core parameter dict (the portable path); ``acc`` as for ``_run_tuple``."""
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
    row.update(zip(_RUN_SUMS, acc[1:13], strict=True))
    return row


# -- the neutral form (the spool's) ---------------------------------------------------------------------

def _neutral_span(sp: Span, cols: tuple[Any, ...] | None = None, opens: bool = False) -> tuple[Any, ...]:
    return _span_tuple(sp, float, _AS_BOOL, cols, opens)


def _neutral_run(acc: list[Any]) -> tuple[Any, ...]:
    run = acc[0]
    status = run.status
    ended = run.ended_wall if status != "running" else 0.0
    return (
        run.run_id, run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version,
        dict(run.attributes) or None, status, run.aborted.reason if run.aborted is not None else None,
        float(run.started_wall), float(ended) if ended else None, *acc[1:13],
    )


def _merge_neutral(parts: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> tuple[list[Any], list[Any]]:
    """Several batches' neutral rows as one: span rows in order, one run row per run (a run upserted twice in one
    statement is refused by PostgreSQL): its totals summed, its status, reason and end the latest batch's."""
    if len(parts) == 1:
        return list(parts[0][0]), list(parts[0][1])
    spans: list[Any] = []
    runs: dict[Any, list[Any]] = {}
    for sp, rr in parts:
        spans.extend(sp)
        for r in rr:
            old = runs.get(r[0])
            if old is None:
                runs[r[0]] = list(r)
                continue
            old[7:11] = [*r[7:9], *old[9:10], *r[10:11]]  # status, reason, (started kept), ended: the latest
            for i in range(11, len(r)):
                old[i] += r[i]
    return spans, list(runs.values())


def _from_neutral(span_rows: Sequence[Sequence[Any]], run_rows: Sequence[Sequence[Any]],
                  path: str) -> tuple[list[Any], list[Any]]:
    """Rows of ``Store.batch_rows`` as the store's write path ``path`` takes them: ``"sqlite"`` (``_span_tuple``
    with SQLite's times and ``_sqlite_run_tuple``), ``"pg"`` (``_span_tuple`` with ``_pg_micros`` and
    ``_pg_run_tuple``) or ``"core"`` (``_span_row`` and ``_run_row``)."""
    sqlite = path == "sqlite"
    dt: Any = _sqlite_dt if sqlite else _pg_micros if path == "pg" else _utc
    sp: list[Any] = []
    for r in span_rows:
        v = list(r)
        v[_START_AT], v[_END_AT] = dt(v[_START_AT]), dt(v[_END_AT])
        if sqlite:
            for i in _BOOL_AT:
                v[i] = int(v[i])
        sp.append(tuple(v) if path != "core" else dict(zip(_SPAN_COLS, v, strict=True)))
    rr: list[Any] = []
    for r in run_rows:
        v = list(r)
        v[_RUN_START_AT] = dt(v[_RUN_START_AT])
        if v[_RUN_END_AT] is not None:
            v[_RUN_END_AT] = dt(v[_RUN_END_AT])
        if path != "core":
            attrs = v[_ATTRS_AT]
            v[_ATTRS_AT] = _json_text(attrs) if attrs else None
            rr.append(tuple(v))
        else:
            rr.append(dict(zip(_RUN_COLS, v, strict=True)))
    return sp, rr


# -- the hourly rollup ------------------------------------------------------------------------------------

_RKEY_OF = itemgetter(*(_SPAN_COLS.index(c) for c in ("hour", *_RKEY_COLS)))
"""A span row's rollup group: its hour and its rollup keys."""
_HALF_MASK = 2**32 - 1


def _gkey(keys: Sequence[Any]) -> str:
    """The digest of a group's keys (without its hour), NULL told apart from every text: the rollup's conflict
    target beside ``hour`` (see ``rollups``). Migration 0003 fills the table with it too: it must not change.
    Remembered for the groups seen lately (the same ones come back batch after batch)."""
    k = keys if type(keys) is tuple else tuple(keys)
    found = _gkeys.get(k)
    if found is None:
        found = _blake2b(_json_ascii(k).encode("ascii"), digest_size=16).hexdigest()
        if len(_gkeys) >= 65_536:
            _gkeys.clear()
        _gkeys[k] = found
    return found


_gkeys: dict[tuple[Any, ...], str] = {}


_json_ascii = json.JSONEncoder().encode  # (a tuple as a JSON array, every character outside ASCII escaped)
_blake2b = hashlib.blake2b


def _rollup_groups(span_rows: Sequence[Any]) -> dict[tuple[Any, ...], list[Any]]:
    """A batch's hourly rollups from its span rows as stored: (hour, *rollup keys) -> sums in ``_rollup_tuple``'s
    order (``runs``, index 9, counts the rows that open their run: ``writes._open_runs`` keeps it so)."""
    key_of = _RKEY_OF
    lat_us = _trunc  # a latency in whole microseconds, truncated as ``_micros`` has the raw spans read it
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
        if r[_I_OPENS]:
            g[9] += 1
        if r[_I_UNPRICED]:
            g[11] += 1
        if r[_I_EST]:
            g[12] += 1
    return groups


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
