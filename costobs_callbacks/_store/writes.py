"""The write path: a batch in one transaction (its runs' rows upserted, its spans inserted, its hourly rollups
upserted), on SQLite and PostgreSQL each through its fastest form, on any other dialect through SQLAlchemy Core.

SQLite: the rows go to sqlite3 as tuples, many per statement, with the upserts' own text. PostgreSQL (psycopg 3):
binary ``COPY``, the spans straight into their table, the run and rollup rows into temporary tables (one per
table, kept by the session, emptied at each commit) upserted from there by one ``INSERT ... SELECT ... ON CONFLICT
DO UPDATE`` each. Any other dialect or driver: SQLAlchemy Core alone (``_portable``), which the tests run on
SQLite and PostgreSQL beside the fast paths.

A batch the database refuses for its content is written again with every value made to fit (``fitting``); one
refused even so raises ``PoisonBatch``, and the exporter bisects it so that only the refused rows are lost.

A batch with an id (``_export.Batch``, and the spool's records) is applied once: its transaction begins by
recording the id (``applied``), and a batch whose id is there already is not written again.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .._export import PoisonBatch
from . import keyed
from .applied import claim
from .fitting import _fit_rows, _fit_span_row, _is_data_error
from .rows import (
    _AS_BOOL,
    _AS_INT,
    _RKEY_OF,
    _batch_invocations,
    _batch_rows,
    _from_neutral,
    _merge_neutral,
    _neutral_run,
    _neutral_span,
    _pg_micros,
    _pg_run_tuple,
    _rollup_groups,
    _rollup_tuple,
    _run_row,
    _span_row,
    _span_tuple,
    _sqlite_dt,
    _sqlite_run_tuple,
)
from .schema import (
    _BIG_MAX,
    _BIG_SUMS,
    _I_OPENS,
    _INT_MAX,
    _ROLLUP_ADDS,
    _ROLLUP_COLS,
    _RUN_COLS,
    _RUN_SUMS,
    _SPAN_COLS,
    rollups,
    rollups_keyed,
    runs,
    spans,
)

__all__ = ["Writes"]

logger = logging.getLogger("costobs_callbacks")

_CHUNK_SIZES = (1024, 512, 256, 64, 16, 4, 1)

_SQLITE_SPAN_HEAD = f"INSERT INTO costobs_spans ({', '.join(_SPAN_COLS)}) VALUES "
_SQLITE_RUN_HEAD = f"INSERT INTO costobs_runs ({', '.join(_RUN_COLS)}) VALUES "


def _sqlite_grow(k: str) -> str:
    if k not in _BIG_SUMS:
        return f"{k} = costobs_runs.{k} + excluded.{k}"
    return (f"{k} = CASE WHEN excluded.{k} > 0 AND costobs_runs.{k} > {_BIG_MAX} - excluded.{k} THEN {_BIG_MAX} "
            f"WHEN excluded.{k} < 0 AND costobs_runs.{k} < -{_BIG_MAX} - excluded.{k} THEN -{_BIG_MAX} "
            f"ELSE costobs_runs.{k} + excluded.{k} END")


_RUN_UPSERT_TAIL = (
    " ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(_sqlite_grow(k) for k in _RUN_SUMS)
    + ", status = excluded.status, reason = excluded.reason, ended_at = excluded.ended_at"
    " RETURNING run_id, invocations"
)


def _grow(total: Any, delta: Any, k: str) -> Any:
    """``total + delta`` for a run's stored total, saturating at BIGINT's bounds (``±(2^63 - 1)``) for money and
    tokens: a run that reached one (a figure sanitised to it) stays there, instead of refusing every later span
    of the run. (``_RUN_UPSERT_TAIL`` is the same as text, for SQLite and PostgreSQL.)"""
    if k not in _BIG_SUMS:
        return total + delta
    return sa.case((sa.and_(delta > 0, total > _BIG_MAX - delta), sa.literal(_BIG_MAX, sa.BigInteger())),
                   (sa.and_(delta < 0, total < -_BIG_MAX - delta), sa.literal(-_BIG_MAX, sa.BigInteger())),
                   else_=total + delta)


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


def _sqlite_bind_none() -> None:
    """Have sqlite3 bind ``None`` (SQL NULL) without searching for an adapter first.

    sqlite3 binds ints, floats and text at once; any other value, ``None`` among them, goes through its adapter
    lookup, which for ``None`` ends in an ``AttributeError`` raised and cleared inside the module: about 2,400
    instructions per NULL, a sixth of the exporter thread's work on a batch (a span row has a dozen NULLs). An
    adapter registered for ``NoneType`` is found at the lookup's first step; it returns ``None``, which sqlite3
    binds as NULL, as before. It is process-wide (sqlite3's adapters are) and changes nothing a NULL binds to:
    ``{}.get`` is a C function, so the call costs no Python frame. An adapter the app registered is left alone."""
    if (type(None), sqlite3.PrepareProtocol) not in sqlite3.adapters:
        sqlite3.register_adapter(type(None), _NULL.get)


_NULL: dict[Any, None] = {}
"""Empty: ``_NULL.get(None)`` is ``None`` (see ``_sqlite_bind_none``)."""

_NAN = float("nan")
"""What ``Writes._sqlite_many`` binds for NULL: SQLite holds no NaN, and ``sqlite3_bind_double`` binds a NaN as NULL."""


def _nullable(table: sa.Table, cols: Sequence[str]) -> tuple[int, ...]:
    """The positions of ``cols`` whose column takes NULL (where a row's ``None`` may be)."""
    return tuple(i for i, c in enumerate(cols) if table.c[c].nullable)


_sqlite3_adapters: dict[Any, Any] = sqlite3.adapters
_FLOAT_ADAPTED = (float, sqlite3.PrepareProtocol)
"""sqlite3's adapter key for floats: with one registered, sqlite3 adapts every value it binds."""

_PROBE_ROWS = 32
"""How many of a batch's first rows ``Writes._sqlite_many`` reads for the columns where NULLs are."""

_SPAN_NULLS = _nullable(spans, _SPAN_COLS)
_RUN_NULLS = _nullable(runs, _RUN_COLS)
_ROLLUP_NULLS = _nullable(rollups, _ROLLUP_COLS)


def _sqlite_span_tuple(sp: Any, cols: tuple[Any, ...], opens: bool) -> tuple[Any, ...]:
    return _span_tuple(sp, _sqlite_dt, _AS_INT, cols, opens)


def _pg_span_tuple(sp: Any, cols: tuple[Any, ...], opens: bool) -> tuple[Any, ...]:
    return _span_tuple(sp, _pg_micros, _AS_BOOL, cols, opens)


_RUN_ROW = {"sqlite": _sqlite_run_tuple, "pg": _pg_run_tuple, "core": _run_row}
"""A run's summary row, per write path."""


def _open_runs(stored: Iterable[Any], first_root: dict[str, int], roots: dict[str, int], span_rows: list[Any],
               groups: dict[tuple[Any, ...], list[Any]]) -> None:
    """The batch's first root span of each run opens the run if the run had none stored (its ``invocations`` after
    the upsert, ``stored``, are the batch's own): set each one's ``opens_run`` so where it says otherwise (rows are
    made presuming it does), and its rollup group's ``runs`` with it."""
    key_of = _RKEY_OF
    for rid, total in stored:
        at = first_root.get(rid)
        if at is None:
            continue
        opens = int(total) == roots[rid]  # (a run's batch invocations: its roots)
        row = span_rows[at]
        if type(row) is tuple:
            if bool(row[_I_OPENS]) == opens:
                continue
            # a bool on PostgreSQL, an int on SQLite (the portable path's rows are dicts); rows written again keep it
            row = span_rows[at] = (*row[:_I_OPENS], opens if type(row[_I_OPENS]) is bool else int(opens),
                                   *row[_I_OPENS + 1:])
        else:
            if bool(row["opens_run"]) == opens:
                continue
            row["opens_run"] = opens
            row = tuple(row.values())
        groups[key_of(row)][9] += 1 if opens else -1


# -- PostgreSQL: binary COPY ------------------------------------------------------------------------------------

_PG_TYPES = ((sa.BigInteger, "int8"), (sa.Integer, "int4"), (sa.Float, "float8"), (sa.DateTime, "int8"),
             (sa.Boolean, "bool"), (sa.String, "text"), (sa.JSON, "text"))
"""A column's type as binary COPY takes it. A time goes as the int64 of its binary form (``_pg_micros``); JSON
as its text (the rows carry it serialised)."""


class _PgCopy(NamedTuple):
    """How rows of one table are COPYed: the statement, each column's binary type, the INTEGER columns (range
    checked first: binary COPY would wrap an int past 32 bits, where an INSERT refuses it), and for the tables
    that are upserted, the temporary table the rows go to and the upsert from it."""

    copy: str
    types: tuple[str, ...]
    int4: tuple[int, ...]
    stage: str = ""
    upsert: str = ""


def _pg_copy_spec(table: sa.Table, cols: Sequence[str], stage: str = "", order: str = "", tail: str = "") -> _PgCopy:
    types = tuple(next(n for t, n in _PG_TYPES if isinstance(table.c[c].type, t)) for c in cols)
    names = ", ".join(cols)
    return _PgCopy(
        f"COPY {stage or table.name} ({names}) FROM STDIN (FORMAT BINARY)", types,
        tuple(i for i, t in enumerate(types) if t == "int4"), stage,
        # (in the order of the key: concurrent writers lock the rows they share in one order)
        f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {stage} ORDER BY {order}{tail}" if stage else "")


_PG_SPANS = _pg_copy_spec(spans, _SPAN_COLS)
_PG_STAGED = {
    "runs": _pg_copy_spec(runs, _RUN_COLS, "costobs_stage_runs", 'run_id COLLATE "C"', _RUN_UPSERT_TAIL),
    "rollups": _pg_copy_spec(rollups, _ROLLUP_COLS, "costobs_stage_rollups", 'hour, gkey COLLATE "C"',
                             _ROLLUP_TAIL),
    "keyed": _pg_copy_spec(rollups_keyed, keyed.COLS, "costobs_stage_keyed",
                           'dim COLLATE "C", grain, bucket, vkey COLLATE "C"', keyed.TAIL),
}
_PG_STAGE = "; ".join(
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {spec.stage} (LIKE {t.name}) ON COMMIT DELETE ROWS"
    for spec, t in zip(_PG_STAGED.values(), (runs, rollups, rollups_keyed), strict=True))
"""The temporary tables the upserted rows are COPYed to: made where missing by every batch's transaction (the first
one of a session makes them; a batch rolled back takes them with it), emptied at every commit."""


def _check_int4(rows: Sequence[Sequence[Any]], at: Sequence[int]) -> None:
    """Refuse (``OverflowError``, a data error: the batch is fitted) an INTEGER column's value past its range."""
    for i in at:
        col = [r[i] for r in rows]
        if min(col) < -_INT_MAX - 1 or max(col) > _INT_MAX:
            raise OverflowError(f"a value of {i}th column is out of INTEGER's range")


class Writes:
    """``Store``'s write path (a mixin: the engine, the dialect and ``ensure_schema`` are the store's)."""

    engine: Engine
    dialect: str

    if TYPE_CHECKING:
        def ensure_schema(self) -> None: ...

    def _prepare_writes(self) -> None:
        """The write path's state, for this store's dialect and driver (called once, by ``Store.__init__``)."""
        self.sanitized = 0
        """Spans stored with a value made to fit its column (flagged ``sanitized``)."""
        self.duplicates = 0
        """Items of batches that arrived again after they were applied (a retry or a replay of a batch whose
        COMMIT went through unheard), written once."""
        self._sql_cache: dict[tuple[str, int], str] = {}
        self._sqlite_max_vars = 999  # SQLite's limit before 3.32; raised below when the library says so
        if self.dialect == "sqlite":
            try:
                probe = sqlite3.connect(":memory:")
                self._sqlite_max_vars = probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
                probe.close()
            except Exception:
                pass
        # Spans are the bulk of every write: for the dialects we test, rows go to the driver as tuples
        # (SQLAlchemy Core's per-row parameter processing cost more than the insert itself)
        if self.dialect == "sqlite" and self.engine.dialect.paramstyle == "qmark":
            _sqlite_bind_none()
            self._path = "sqlite"
            self._span_row_fn: Any = _sqlite_span_tuple
        elif self.dialect == "postgresql" and self.engine.dialect.driver == "psycopg":
            self._path = "pg"
            self._span_row_fn = _pg_span_tuple
        else:
            self._portable()
            return
        self._fast = True

    def _portable(self) -> None:
        """Write through SQLAlchemy Core alone, as for a dialect without a fast path (tests compare the two)."""
        self._path = "core"
        """The write path: ``"sqlite"`` (rows to sqlite3, many per statement), ``"pg"`` (binary COPY through
        psycopg 3), ``"core"`` (SQLAlchemy Core alone, any dialect)."""
        self._fast = False
        self._span_row_fn = _span_row

    def write_batch(self, items: Sequence[Any]) -> None:
        """Write a batch. A batch refused for its content (a figure past the column's range, text the driver
        cannot encode, a value the database rejects) is written again with every value made to fit (see
        ``_fit_row``), the spans so changed flagged ``sanitized``; if the database still refuses it,
        ``PoisonBatch`` makes the exporter bisect it, so only the refused rows are lost. Anything else (the
        database is down) propagates and is retried.

        Values are made to fit only after a refusal: the common batch pays nothing for it, and the outcome
        is the same, since the drivers refuse exactly what does not fit (ints past BIGINT, lone surrogates).

        A batch with an ``id`` (``_export.Batch``) is applied once: written again with the same id, it is left out
        (counted in ``duplicates``). Without one, it is written as it comes."""
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
        span_rows, run_rows, changed, first_root = _batch_rows(items, self._span_row_fn, _RUN_ROW[self._path], fit)
        batch_id = getattr(items, "id", None)
        if run_rows and self._insert(span_rows, run_rows, first_root, (batch_id,) if batch_id else ()) is not None:
            self.duplicates += len(items)
            return 0
        return changed

    def _insert(self, span_rows: list[Any], run_rows: list[Any], first_root: dict[str, int],
                batch_ids: Sequence[str] = ()) -> set[str] | None:
        """One transaction: the batch ids recorded, the run rows upserted (their totals grow by the batch's), the
        span rows inserted, the batch's hourly rollups upserted (from the span rows as stored, fitted values
        included), then the keyed rollups. If any of ``batch_ids`` was recorded before, nothing is written and the
        new ones are returned (the caller writes the rows of those alone); ``None``: written.

        Per path: SQLite's rows go to sqlite3 many per statement with its own upsert text; PostgreSQL's are
        COPYed in binary (``_pg_copy``): the spans straight into their table, the run and rollup rows into
        temporary tables, upserted from there by one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` each; the
        portable path writes through SQLAlchemy Core alone. The rows, and the rules that decide them (which span
        opens its run, the rollups' sums), are the same on every path: ``tests/test_write_paths.py``."""
        groups = _rollup_groups(span_rows)
        roots = _batch_invocations(run_rows)
        path = self._path
        with self.engine.begin() as conn:
            if batch_ids:
                # first: a batch applied before is written no further (see ``applied``)
                new = claim(conn, self.dialect, self._fast, batch_ids)
                if len(new) < len(batch_ids):
                    if new:
                        raise _SomeApplied(new)  # rolled back: the caller writes the new ones alone
                    return new
            # The runs first: their upsert tells which runs had no root span stored (``invocations`` was 0), and
            # the batch's first root span of each of those opens its run (``opens_run``, the rollup's ``runs``).
            # Read from the write itself, in the batch's transaction, so concurrent writers of one run and a
            # batch written again after a rollback count it once.
            stored: Sequence[Any]
            if path == "sqlite":
                # Many rows per statement: sqlite3 releases and retakes the GIL at every step, and a
                # busy app thread makes each retake wait up to the switch interval (5 ms); one step per
                # few hundred rows keeps the writer from starving behind the app.
                stored = self._sqlite_many(conn, _SQLITE_RUN_HEAD, len(_RUN_COLS), run_rows, _RUN_UPSERT_TAIL,
                                           _RUN_NULLS)
            elif path == "pg":
                # (the upsert's row locks keep other writers of these runs waiting until commit)
                stored = self._pg_upsert(conn, "runs", run_rows)
            else:
                stored = self._merge_runs_portable(conn, run_rows)
            if not span_rows:
                return None
            _open_runs(stored, first_root, roots, span_rows, groups)
            roll_rows = [_rollup_tuple(k, g) for k, g in groups.items()]
            if path == "sqlite":
                self._sqlite_many(conn, _SQLITE_SPAN_HEAD, len(_SPAN_COLS), span_rows, "", _SPAN_NULLS)
                self._sqlite_many(conn, _ROLLUP_HEAD, len(_ROLLUP_COLS), roll_rows, _ROLLUP_TAIL, _ROLLUP_NULLS)
            elif path == "pg":
                self._pg_copy(conn, _PG_SPANS, span_rows)
                self._pg_upsert(conn, "rollups", roll_rows)
            else:
                conn.execute(sa.insert(spans), span_rows)
                self._merge_rollups_portable(conn, roll_rows)
            # last: every batch shares its keys' rows, and their locks are held from here to the commit
            keyed.write(self, conn, roll_rows, path == "sqlite")
        return None

    # -- spooled batches (``_export.fallback``): rows kept while the database is away, written when it is back --

    def batch_rows(self, items: Sequence[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """A batch as the rows it would write, in a form any backend can write later and JSON keeps: span rows
        in ``_SPAN_COLS`` order and run rows in ``_RUN_COLS`` order, times as epoch seconds, flags as booleans,
        a run's attributes as a dict. Built now, from the live runs (their status as it is now). The first root
        span of each run carries ``None`` for ``opens_run`` (``write_rows`` decides it when the rows are written)."""
        span_rows, run_rows, _, first_root = _batch_rows(items, _neutral_span, _neutral_run, False)
        for at in first_root.values():
            row = span_rows[at]
            span_rows[at] = (*row[:_I_OPENS], None, *row[_I_OPENS + 1:])
        return span_rows, run_rows

    def write_rows(self, records: Sequence[tuple[str | None, Sequence[Sequence[Any]], Sequence[Sequence[Any]]]], *,
                   fit: bool = True) -> None:
        """Write spooled batches, each ``(batch id or None, span rows, run rows)`` with rows from ``batch_rows``, in
        one transaction, as ``write_batch`` writes a batch: refused for their content, written again made to fit
        (flagged ``sanitized``); refused still (or at once without ``fit``), ``PoisonBatch``. The batches the
        database holds already are left out (counted in ``duplicates``); those of the others are merged (a run
        once, its totals summed) and written."""
        self.ensure_schema()
        todo, seen = [], set()
        for r in records:
            if r[0] is not None and r[0] in seen:  # one batch twice in a group: once is enough
                self.duplicates += len(r[1]) or len(r[2])
                continue
            seen.add(r[0])
            todo.append(r)
        while todo:
            ids = [r[0] for r in todo if r[0] is not None]
            try:
                new = self._write_rows(*_merge_neutral([(r[1], r[2]) for r in todo]), ids, fit)
            except _SomeApplied as some:  # a group replayed again after a crash: rolled back, the new ones next
                new = some.new
            if new is None:
                return
            self.duplicates += sum(len(r[1]) or len(r[2]) for r in todo if r[0] is not None and r[0] not in new)
            todo = [r for r in todo if r[0] is None or r[0] in new]

    def _write_rows(self, span_rows: Sequence[Sequence[Any]], run_rows: Sequence[Sequence[Any]],
                    batch_ids: Sequence[str], fit: bool) -> set[str] | None:
        """Rows from ``batch_rows`` in one transaction (see ``write_rows``); as ``_insert`` returns."""
        first_root: dict[str, int] = {}
        unmarked: list[Sequence[Any]] = []
        rid_at = _SPAN_COLS.index("run_id")
        for i, r in enumerate(span_rows):
            if r[_I_OPENS] is None:
                # the first of a run's is presumed to open it, as ``_batch_rows`` presumes (see ``_open_runs``)
                first = first_root.setdefault(r[rid_at], i) == i
                r = (*r[:_I_OPENS], first, *r[_I_OPENS + 1:])
            unmarked.append(r)
        sp, rr = _from_neutral(unmarked, run_rows, self._path)
        try:
            return self._insert(sp, rr, first_root, batch_ids)
        except _SomeApplied:
            raise
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
                new = self._insert(sp, rr, first_root, batch_ids)
            except _SomeApplied:
                raise
            except Exception as exc2:
                if not _is_data_error(exc2):
                    raise
                orig = getattr(exc2, "orig", None)
                raise PoisonBatch(str(orig if orig is not None else exc2)) from exc2
            if new is None:
                self.sanitized += changed
            return new

    # -- per dialect ----------------------------------------------------------------------------------

    def _sqlite_many(self, conn: Connection, head: str, ncols: int, rows: Sequence[tuple[Any, ...]],
                     tail: str, nulls: Sequence[int] = ()) -> list[Any]:
        """Insert ``rows``, many per statement; the rows a ``RETURNING`` tail returns. ``nulls``: the positions
        where a row may hold ``None`` (``_nullable``).

        sqlite3 binds ints, floats and text at once, but ``None`` only after its adapter lookup (a key tuple built,
        a dict searched, the adapter called: about 1,150 instructions, even with ``_sqlite_bind_none``), and a row
        has several (a root's parent, an error, flags, the prices of a chain, a run's reason). A float NaN binds
        as SQL NULL (``sqlite3_bind_double``: SQLite stores no NaN) for about a tenth of that, the list
        comprehension that swaps it in included. The swap is made in the columns where one of the first rows holds
        ``None`` (most rows of a batch hold it where those do); a ``None`` elsewhere binds through the adapter, as
        NULL all the same. Only nullable columns are changed: a ``None`` where the schema refuses NULL stays, and
        is refused as before."""
        out: list[Any] = []
        returning = "RETURNING" in tail
        # Chunks come in a few fixed sizes (1024, 512, 256, 64, 16, 4, 1 rows): sqlite3 caches every distinct
        # statement it prepares, and one per batch remainder would pile up large compiled programs.
        group = "(" + ",".join("?" * ncols) + ")"
        nan = _NAN
        if _FLOAT_ADAPTED in _sqlite3_adapters:  # the app adapts floats: a NaN would reach its adapter, not SQLite
            nulls = ()
        probe = rows[:_PROBE_ROWS]
        nulls = [p for p in nulls if any(r[p] is None for r in probe)]
        # sqlite3's own cursor, on the transaction's connection: SQLAlchemy's result rows cost ~5 µs a run on a
        # RETURNING of a batch's runs. Its errors are raised as SQLAlchemy's, as on the other paths.
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        sql = ""
        try:
            i, n = 0, len(rows)
            while i < n:
                size = next(z for z in _CHUNK_SIZES if z <= n - i and z * ncols <= self._sqlite_max_vars)
                chunk = rows[i:i + size]
                key = (head, size)
                sql = self._sql_cache.get(key) or ""
                if not sql:
                    sql = self._sql_cache[key] = head + ",".join([group] * size) + tail
                params: list[Any] = []
                add = params.extend  # (a row at a time, copied in C: faster than chaining its values)
                for r in chunk:
                    add(r)
                for p in nulls:
                    params[p::ncols] = [nan if v is None else v for v in params[p::ncols]]
                cur.execute(sql, params)
                if returning:
                    out.extend(cur.fetchall())
                i += size
        except self.engine.dialect.loaded_dbapi.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, self.engine.dialect.loaded_dbapi.Error,
                                             dialect=self.engine.dialect) from exc
        finally:
            cur.close()
        return out

    def _pg_cursor(self, conn: Connection) -> Any:
        """A psycopg cursor on the transaction's connection (SQLAlchemy's result and parameter handling skipped)."""
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def _pg_copy(self, conn: Connection, spec: _PgCopy, rows: Sequence[Sequence[Any]],
                 returning: bool = False) -> list[Any]:
        """COPY ``rows`` as ``spec`` says; to its temporary table then upserted from it if it has one (the rows
        the upsert returns, with ``returning``). Errors as SQLAlchemy raises them (a refused value is a
        ``DataError``: the batch is fitted, as on the other paths)."""
        if not rows:
            return []
        _check_int4(rows, spec.int4)
        cur = self._pg_cursor(conn)
        statement = spec.copy
        try:
            with cur.copy(statement) as cp:
                cp.set_types(spec.types)
                write = cp.write_row
                for r in rows:
                    write(r)
            if not spec.upsert:
                return []
            statement = spec.upsert
            cur.execute(statement)
            return cur.fetchall() if returning else []
        except Exception as exc:
            raise sa.exc.DBAPIError.instance(statement, None, exc, self.engine.dialect.loaded_dbapi.Error,
                                             dialect=self.engine.dialect) from exc
        finally:
            cur.close()

    def _pg_upsert(self, conn: Connection, table: str, rows: Sequence[Sequence[Any]]) -> list[Any]:
        """Upsert ``rows`` into ``table`` (a key of ``_PG_STAGED``) through its temporary table; for the runs, each
        run's id and its ``invocations`` after the upsert."""
        if table == "runs":  # the batch's first statement after its claim: the session's staging tables
            cur = self._pg_cursor(conn)
            try:
                cur.execute(_PG_STAGE)
            except Exception as exc:
                if getattr(exc, "sqlstate", None) == "42501":  # insufficient_privilege: no TEMPORARY here
                    logger.warning("costobs: this role may not create temporary tables (%s); writing through "
                                   "SQLAlchemy Core from now on", exc)
                    self._portable()  # the batch fails this once: retried (or spooled, then replayed) that way
                raise sa.exc.DBAPIError.instance(_PG_STAGE, None, exc, self.engine.dialect.loaded_dbapi.Error,
                                                 dialect=self.engine.dialect) from exc
            finally:
                cur.close()
        return self._pg_copy(conn, _PG_STAGED[table], rows, table == "runs")

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
            cur, new_max = r.latency_max_ms, sa.cast(sa.bindparam("d_latency_max_ms", type_=sa.Float()), sa.Float())
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


class _SomeApplied(Exception):
    """Some of the batches of one transaction were applied before (and it was rolled back): ``new`` are the
    others, to be written alone."""

    def __init__(self, new: set[str]) -> None:
        super().__init__(f"{len(new)} batches not applied before")
        self.new = new
