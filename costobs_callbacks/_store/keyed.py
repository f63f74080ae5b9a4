"""Rollups by one key: the hourly rollups summed per key value, by hour and by day, kept as batches land.

The hourly rollup table (``costobs_rollups_hourly``) has a row per hour and combination of all twelve keys, the user
among them: in an app with many users and tenants nearly every run makes rows of its own, so it holds about half as
many rows as there are spans (567,176 rows for 1,000,000 spans over 30 days in ``bench/rollup_latency.py``), and a
month by tenant read from it took 0.6 s on SQLite. The questions dashboards and spend caps ask most are by one key:
a feature by hour, a tenant's month, a plan's day, a model's week. ``costobs_rollups_keyed`` answers them with a
number of rows in proportion to the answer: per key in ``KEYED`` (the low-cardinality ones; a user's figures stay in
the hourly table) and per value, one row per hour (``grain`` 1) and one per day (``grain`` 24, UTC days). A window
is read from the day rows for its whole days and from the hour rows for the hours at its ends.

The rows are sums of the batch's hourly rollup rows (the same halves, counts and maxima), upserted in the same
transaction after them, so the three sources give the same figures to the last digit (``tests/test_rollups.py``).
``rollup(by=())`` (``spend``) reads the ``feature`` rows: every span has a feature. ``model`` rows count model calls
only, as a rollup by ``model`` does; a ``where`` on ``model`` alone matches other spans too (a chain's ``None``), so
it is not answered here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from .rows import _gkey
from .schema import _LLM_KINDS, _MODEL_KEYS, _ROLLUP_ADDS, _ROLLUP_COLS, _RSUMS, rollups, rollups_keyed

__all__ = ["COLS", "KEYED", "TAIL", "backfill", "dim_of", "query", "write"]

KEYED = ("feature", "tenant_id", "tier", "model")
"""The keys with rows of their own: those of few values (a user's are as many as the runs)."""

_AT = {c: i for i, c in enumerate(_ROLLUP_COLS)}
_KEY_AT = tuple((k, _AT[k]) for k in KEYED)
_KIND_AT = _AT["kind"]
_A0, _A1 = _AT[_ROLLUP_ADDS[0]], _AT[_ROLLUP_ADDS[-1]] + 1
_MAX_AT = _AT["latency_max_ms"]
COLS: tuple[str, ...] = ("dim", "grain", "bucket", "vkey", "value", *_ROLLUP_ADDS, "latency_max_ms")
_T = "costobs_rollups_keyed"
_HEAD = f"INSERT INTO {_T} ({', '.join(COLS)}) VALUES "
_NULLS = tuple(i for i, c in enumerate(COLS) if rollups_keyed.c[c].nullable)
"""Where a keyed row may hold ``None`` (bound as NULL: see ``Writes._sqlite_many``)."""
TAIL = (
    " ON CONFLICT (dim, grain, bucket, vkey) DO UPDATE SET "
    + ", ".join(f"{k} = {_T}.{k} + excluded.{k}" for k in _ROLLUP_ADDS)
    + f", latency_max_ms = CASE WHEN excluded.latency_max_ms IS NULL THEN {_T}.latency_max_ms"
    f" WHEN {_T}.latency_max_ms IS NULL OR excluded.latency_max_ms > {_T}.latency_max_ms"
    f" THEN excluded.latency_max_ms ELSE {_T}.latency_max_ms END"
)
"""The keyed upsert's conflict clause, the same text on SQLite and PostgreSQL."""


def rows(roll_rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The keyed rows of a batch's hourly rollup rows (in ``_ROLLUP_COLS`` order), hours then days, sorted by their
    primary key: concurrent writers lock the rows they share in one order."""
    hourly: dict[tuple[str, int, Any], list[Sequence[Any]]] = {}
    for r in roll_rows:
        h = r[0]
        llm = r[_KIND_AT] in _LLM_KINDS
        for dim, at in _KEY_AT:
            if dim in _MODEL_KEYS and not llm:
                continue
            k = (dim, h, r[at])
            found = hourly.get(k)
            if found is None:
                hourly[k] = [r]
            else:
                found.append(r)
    vkeys: dict[Any, str] = {}
    hours = []
    for (dim, h, v), members in hourly.items():
        vk = vkeys.get(v)
        if vk is None:
            vk = vkeys[v] = _gkey((v,))
        hours.append((dim, 1, h, vk, v, *_sums(members, _A0, _A1, _MAX_AT)))
    return _with_days(hours)


def _with_days(hours: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Keyed hour rows and the day rows they sum to, sorted by their primary key."""
    daily: dict[tuple[str, int, str], list[tuple[Any, ...]]] = {}
    for row in hours:
        k = (row[0], row[2] // 24, row[3])
        found = daily.get(k)
        if found is None:
            daily[k] = [row]
        else:
            found.append(row)
    a0, a1 = 5, 5 + len(_ROLLUP_ADDS)
    out = list(hours)
    for (dim, d, vk), members in daily.items():
        out.append((dim, 24, d, vk, members[0][4], *_sums(members, a0, a1, a1)))
    out.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
    return out


def _sums(members: Sequence[Sequence[Any]], a0: int, a1: int, at_max: int) -> list[Any]:
    if len(members) == 1:
        m = members[0]
        return [*m[a0:a1], m[at_max]]
    sums: list[Any] = [sum(col) for col in zip(*(m[a0:a1] for m in members), strict=True)]
    highest = [m[at_max] for m in members if m[at_max] is not None]
    sums.append(max(highest) if highest else None)
    return sums


def write(store: Any, conn: sa.Connection, roll_rows: Sequence[Sequence[Any]], sqlite_fast: bool) -> None:
    """Upsert the keyed rows of a batch's hourly rollup rows, on the write path the store took for those."""
    keyed = rows(roll_rows)
    if not keyed:
        return
    if sqlite_fast:
        store._sqlite_many(conn, _HEAD, len(COLS), keyed, TAIL, _NULLS)
    elif store._path == "pg":
        store._pg_upsert(conn, "keyed", keyed)
    else:
        _merge_portable(conn, keyed)


def _merge_portable(conn: sa.Connection, keyed: list[tuple[Any, ...]]) -> None:
    """The keyed upsert in SQLAlchemy Core alone: the rows already stored grow, the others are inserted."""
    t = rollups_keyed.c
    have: set[tuple[str, int, int, str]] = set()
    for i in range(0, len(keyed), 500):
        part = keyed[i:i + 500]
        have.update((d, int(g), int(b), vk) for d, g, b, vk in conn.execute(
            sa.select(t.dim, t.grain, t.bucket, t.vkey).where(
                t.dim.in_({r[0] for r in part}), t.bucket.in_({r[2] for r in part}),
                t.vkey.in_({r[3] for r in part}))))
    new = [dict(zip(COLS, r, strict=True)) for r in keyed if r[:4] not in have]
    old = [r for r in keyed if r[:4] in have]
    if new:
        conn.execute(sa.insert(rollups_keyed), new)
    if old:
        values: dict[str, Any] = {k: t[k] + sa.bindparam(f"d_{k}", type_=sa.BigInteger()) for k in _ROLLUP_ADDS}
        cur, new_max = t.latency_max_ms, sa.cast(sa.bindparam("d_latency_max_ms", type_=sa.Float()), sa.Float())
        values["latency_max_ms"] = sa.case((new_max.is_(None), cur),
                                           (sa.or_(cur.is_(None), new_max > cur), new_max), else_=cur)
        at = {k: i for i, k in enumerate(COLS)}
        params = [{"p_dim": r[0], "p_grain": r[1], "p_bucket": r[2], "p_vkey": r[3],
                   **{f"d_{k}": r[at[k]] for k in (*_ROLLUP_ADDS, "latency_max_ms")}} for r in old]
        conn.execute(sa.update(rollups_keyed).where(
            t.dim == sa.bindparam("p_dim"), t.grain == sa.bindparam("p_grain"), t.bucket == sa.bindparam("p_bucket"),
            t.vkey == sa.bindparam("p_vkey")).values(values), params)


# -- reading ---------------------------------------------------------------------------------------------------

def dim_of(by: Sequence[str], where: Mapping[str, Any] | None) -> str | None:
    """The key whose rows answer a rollup by ``by`` filtered by ``where`` (window and bucket aside), or None.
    ``by=()`` with no ``where``: ``feature``, whose rows sum to the total."""
    named: set[str] = {*by, *(where or ())}
    if len(by) > 1 or len(named) > 1:
        return None
    if not named:
        return "feature"
    (dim,) = named
    if dim not in KEYED or (dim in _MODEL_KEYS and dim not in by):
        return None
    return dim


def query(dim: str, by: Sequence[str], since: datetime | None, until: datetime | None, bucket: str | None,
          where: Mapping[str, Any] | None) -> Any:
    """A rollup from the keyed rows of ``dim`` (see ``dim_of``) in a window of whole hours: the same columns as
    the store's other rollup queries. Whole days are read from the day rows (unless the bucket is an hour), the
    hours at the window's ends from the hour rows; each part is a range of the table's primary key."""
    from .queries import _hour_index, _match  # (imported here: the queries read these rows through this module)

    t = rollups_keyed.c
    h0 = None if since is None else _hour_index(since)
    h1 = None if until is None else _hour_index(until)
    parts: list[tuple[int, int | None, int | None]] = []  # (grain, first bucket, end bucket)
    d0 = None if h0 is None else -(-h0 // 24)
    d1 = None if h1 is None else h1 // 24
    if bucket == "hour" or (d0 is not None and d1 is not None and d0 >= d1):
        parts.append((1, h0, h1))
    else:
        parts.append((24, d0, d1))
        if h0 is not None and d0 is not None and h0 < d0 * 24:
            parts.append((1, h0, d0 * 24))
        if h1 is not None and d1 is not None and d1 * 24 < h1:
            parts.append((1, d1 * 24, h1))
    selects = []
    for grain, lo, hi in parts:
        b = t.bucket if bucket != "day" else (t.bucket // 24 if grain == 1 else t.bucket)
        q = sa.select(t.value.label("value"), b.label("b"), *(t[c] for c in (*_ROLLUP_ADDS, "latency_max_ms"))) \
            .where(t.dim == dim, t.grain == grain)
        if lo is not None:
            q = q.where(t.bucket >= lo)
        if hi is not None:
            q = q.where(t.bucket < hi)
        if where:
            for v in where.values():
                q = q.where(_match(t.value, v))
        selects.append(q)
    sub = (selects[0] if len(selects) == 1 else sa.union_all(*selects)).subquery("keyed")
    c = sub.c

    def total(col: Any, name: str) -> Any:
        return sa.func.coalesce(sa.func.sum(col), 0).label(name)

    group: list[Any] = [c.value.label(f"k_{dim}")] if by else []
    if bucket in ("hour", "day"):
        group.append(c.b.label("bucket"))
    cols = [
        *group,
        *(total(c[f"{n}_{h}"], f"{n}_{h}") for n in _RSUMS for h in ("hi", "lo")),
        total(c.llm_calls, "llm"),
        total(c.tool_calls, "tool"),
        total(c.runs, "runs"),
        total(c.latency_us, "lat_us"),
        total(c.calls, "lat_n"),
        sa.func.max(c.latency_max_ms).label("lat_max"),
        total(c.unpriced_calls, "unpriced"),
        total(c.estimated_calls, "est"),
        total(c.cache_hits, "hits"),
    ]
    q = sa.select(*cols)
    if group:
        q = q.group_by(*group)
    return q


def backfill(conn: sa.Connection) -> int:
    """Fill the keyed rows from the hourly rollup table (migration 0006), key by key; returns how many it wrote."""
    r = rollups.c
    hours: list[tuple[Any, ...]] = []
    for dim in KEYED:
        q = sa.select(r.hour, r[dim], *(sa.func.sum(r[c]) for c in _ROLLUP_ADDS), sa.func.max(r.latency_max_ms)) \
            .group_by(r.hour, r[dim])
        if dim in _MODEL_KEYS:
            q = q.where(r.kind.in_(_LLM_KINDS))
        for h, v, *figures in conn.execute(q):
            *adds, most = figures
            hours.append((dim, 1, int(h), _gkey((v,)), v, *(int(a) for a in adds),
                          None if most is None else float(most)))
    keyed = _with_days(hours)
    for i in range(0, len(keyed), 500):
        conn.execute(sa.insert(rollups_keyed), [dict(zip(COLS, k, strict=True)) for k in keyed[i:i + 500]])
    return len(keyed)
