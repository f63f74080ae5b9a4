"""The store's fast write paths give what its general path gives, on both databases, to the last digit.

Four stores take the same batches: SQLite's fast path (rows to sqlite3, many per statement), PostgreSQL's (binary
COPY: the spans into their table, the run and rollup rows through temporary tables and one upsert each), and the
general path (SQLAlchemy Core alone, ``Store._portable``) on SQLite and on PostgreSQL. Every table they write must
hold the same rows: the spans (every column), the runs' totals, the hourly rollups and the keyed rollups; and
``run_cost`` and ``rollup`` must answer alike.

The workloads are random (``tests/test_store_paths.py``'s calls: lone surrogates, NUL characters, long text, counts
past BIGINT and INTEGER, ``None`` fields, any unicode), made by the real ledger, cut into random batches, some of
which arrive again (a retry of a batch whose COMMIT went through unheard, a spool replay): each is applied once.
Root spans reuse span ids across runs (LangChain gives a config's root calls its run id, so one span id), which
every path must store as the separate spans they are. Batches the database refuses are fitted and bisected by a
real ``BatchExporter`` per store, as in production.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costobs_callbacks import LoopPolicy, PriceBook
from costobs_callbacks._events import TokenUsage
from costobs_callbacks._export import Batch, BatchExporter
from costobs_callbacks._ledger import Ledger
from costobs_callbacks._store import Store, rollups, rollups_keyed, runs, spans
from costobs_callbacks._store.schema import _SPAN_COLS
from tests.test_store_paths import PRICES, _make, call

SHARED_IDS = [uuid.UUID(int=i + 1) for i in range(3)]
"""Span ids that several runs' root spans take (one after the other, as a LangChain config's run id)."""

workload = st.lists(st.tuples(call, st.one_of(st.none(), st.sampled_from(SHARED_IDS))), min_size=1, max_size=8)
plan = st.tuples(
    st.lists(st.integers(1, 6), min_size=1, max_size=8),  # batch sizes, in items (the last one takes the rest)
    st.lists(st.integers(0, 20), max_size=4),  # batches that arrive again (index modulo the count), in that order
)


@pytest.fixture
def stores(tmp_path: Path, postgres_database: Callable[[], str]) -> Iterator[list[Store]]:
    made = [Store(f"sqlite:///{tmp_path}/fast.db"), Store(f"sqlite:///{tmp_path}/core.db"),
            Store(postgres_database()), Store(postgres_database())]
    made[1]._portable()
    made[3]._portable()
    assert [(s.dialect, s._path) for s in made] == [("sqlite", "sqlite"), ("sqlite", "core"), ("postgresql", "pg"),
                                                     ("postgresql", "core")]
    for s in made:
        s.ensure_schema()
    yield made
    for s in made:
        s.close()


def _table(store: Store, table: sa.Table, skip: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """Every row of ``table`` (but the columns in ``skip``), sorted: what the paths must agree on."""
    cols = [c for c in table.c if c.name not in skip]
    with store.engine.connect() as conn:
        return sorted((tuple(r) for r in conn.execute(sa.select(*cols))), key=repr)


def _batches(items: list[Any], sizes: list[int], again: list[int]) -> list[Batch]:
    """``items`` cut into batches of ``sizes`` (the last one takes the rest), then those of ``again`` once more
    (the same batch, its id with it)."""
    out: list[Batch] = []
    i = 0
    for n in sizes:
        if i >= len(items):
            break
        out.append(Batch(items[i:i + n]))
        i += n
    if i < len(items):
        out.append(Batch(items[i:]))
    return out + [out[k % len(out)] for k in again]


def test_the_fast_paths_store_what_the_general_path_stores(stores: list[Store]) -> None:
    made: list[Any] = []
    source = BatchExporter(made.extend, schedule_delay=3600)
    ledger = Ledger(prices=PriceBook(PRICES), exporter=source, user_salt=b"salt", loops=LoopPolicy(enabled=False))
    sinks = [BatchExporter(s.write_batch, schedule_delay=3600, retry_deadline=5.0) for s in stores]
    seen: list[int] = [0, 0]  # examples with a batch that arrived again, with a shared span id

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
    @given(workload, plan)
    def check(calls: list[tuple[dict[str, Any], uuid.UUID | None]], cuts: tuple[list[int], list[int]]) -> None:
        run_ids = [_make(ledger, c, sid) for c, sid in calls]
        assert source.force_flush(10)
        items = list(made)
        made.clear()
        batches = _batches(items, *cuts)
        seen[0] += bool(cuts[1])
        seen[1] += any(sid is not None for _, sid in calls)
        before = [(e.stats.exported, e.stats.failed, e.stats.refused, s.duplicates, s.sanitized)
                  for e, s in zip(sinks, stores, strict=True)]
        for e in sinks:
            for b in batches:
                e._write(b)  # the exporter's own write: retried, fitted, bisected as in production
        counts = [(e.stats.exported - b[0], e.stats.failed - b[1], e.stats.refused - b[2], s.duplicates - b[3],
                   s.sanitized - b[4]) for e, s, b in zip(sinks, stores, before, strict=True)]
        assert counts[1] == counts[0] == counts[2] == counts[3]
        assert counts[0][1] == 0, "a row was refused even once fitted"
        general = stores[3]
        for table, skip in ((spans, ("id",)), (runs, ()), (rollups, ()), (rollups_keyed, ())):
            want = _table(general, table, skip)
            for s in stores[:3]:
                assert _table(s, table, skip) == want, (s.dialect, s._path, table.name)
        for rid in run_ids:
            rc = [s.run_cost(rid) for s in stores]
            assert rc[0] == rc[1] == rc[2] == rc[3]
        for by, bucket in ((("feature", "model"), None), (("tenant_id",), "hour"), ((), "day"), (("user",), None)):
            r = [sorted(s.rollup(by, bucket=bucket), key=repr) for s in stores]
            assert r[0] == r[1] == r[2] == r[3]

    try:
        check()
        # the strategies reached what they meant to: replays, shared span ids, values fitted, batches applied once
        assert seen[0] > 0 and seen[1] > 0
        assert stores[0].sanitized > 0
        assert stores[0].duplicates > 0
        assert len({(s.sanitized, s.duplicates) for s in stores}) == 1
    finally:
        for e in (source, *sinks):
            e.shutdown()


def test_a_span_id_stored_before_is_a_span_of_its_own_and_a_replayed_batch_is_applied_once(
        stores: list[Store]) -> None:
    """Two runs whose root spans share an id: both spans stored, each run opened once; the first batch sent again
    (its COMMIT unheard) adds nothing, on every path."""
    made: list[Any] = []
    ledger = Ledger(prices=PriceBook(PRICES), exporter=type("L", (), {"emit": staticmethod(made.append)})(),
                    user_salt=b"salt", loops=LoopPolicy(enabled=False))
    sid = SHARED_IDS[0]
    rids = []
    for n in (1, 2):
        rid = f"run-{n}"
        ledger.start_llm(sid, None, "chat", {"feature": "f"}, "m-a", None, root=True, run_id=rid)
        ledger.end(sid, "ok", None, TokenUsage(1000 * n, 10 * n, 0, 0, 0))
        rids.append(rid)
    first, second = Batch(made[:1]), Batch(made[1:])
    for s in stores:
        s.write_batch(first)
        s.write_batch(second)
        s.write_batch(first)
        with s.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(spans)).scalar_one() == 2
        costs = [s.run_cost(r) for r in rids]
        # m-a: $2 per million input tokens, $8 per million output tokens
        assert [(c.cost_usd, c.llm_calls) for c in costs if c is not None] == [(Decimal("0.00208"), 1),
                                                                              (Decimal("0.00416"), 1)]
        (row,) = s.rollup(("feature",))
        assert (row.runs, row.llm_calls, row.input_tokens, row.cost_usd) == (2, 2, 3000, Decimal("0.00624"))
        assert s.duplicates == 1


def test_a_runs_second_invocation_in_a_later_batch_does_not_open_it_again(stores: list[Store]) -> None:
    """Rows are made presuming a batch's first root span of a run opens it; the run's upsert corrects a root whose
    run the store held already (a second invocation of one run id, in a later batch): on every path, written as a
    batch and as spooled rows, that span is stored with ``opens_run`` false and the run counted once."""
    made: list[Any] = []
    ledger = Ledger(prices=PriceBook(PRICES), exporter=type("L", (), {"emit": staticmethod(made.append)})(),
                    user_salt=b"salt", loops=LoopPolicy(enabled=False))
    for n in (1, 2, 3):  # three invocations of one run: each its own root span, each in its own batch
        sid = uuid.UUID(int=100 + n)
        ledger.start_llm(sid, None, "chat", {"feature": "f"}, "m-a", None, root=True, run_id="run-x")
        ledger.end(sid, "ok", None, TokenUsage(1000, 10, 0, 0, 0))
    assert len(made) == 3
    for s in stores:
        s.write_batch(Batch(made[:1]))
        s.write_batch(Batch(made[1:2]))
        s.write_rows([("spooled-3", *s.batch_rows(made[2:]))])  # a spooled batch, replayed
        with s.engine.connect() as conn:
            opens = sorted(tuple(r) for r in conn.execute(sa.select(spans.c.span_id, spans.c.opens_run)))
        assert opens == [(str(uuid.UUID(int=101)), True), (str(uuid.UUID(int=102)), False),
                         (str(uuid.UUID(int=103)), False)], (s.dialect, s._path)
        (row,) = s.rollup(("feature",))
        assert (row.runs, row.llm_calls, row.input_tokens) == (1, 3, 3000), (s.dialect, s._path)
        rc = s.run_cost("run-x")
        assert rc is not None and (rc.cost_usd, rc.llm_calls) == (Decimal("0.00624"), 3)
    general = stores[3]
    for table, skip in ((spans, ("id",)), (runs, ()), (rollups, ()), (rollups_keyed, ())):
        want = _table(general, table, skip)
        for s in stores[:3]:
            assert _table(s, table, skip) == want, (s.dialect, s._path, table.name)


@pytest.mark.parametrize("searches", [2**31, -(2**31) - 1, -(2**40)])
def test_a_count_past_integer_is_fitted_alike_on_every_path(stores: list[Store], searches: int) -> None:
    """Binary COPY would store an int past INTEGER wrapped around: PostgreSQL's fast path refuses it and stores it
    fitted (held at the column's bound, the span flagged ``sanitized``), as its INSERT does. (SQLite's integers
    are 64 bits wide: both of its paths store the count as it is.)"""
    made: list[Any] = []
    ledger = Ledger(prices=PriceBook(PRICES), exporter=type("L", (), {"emit": staticmethod(made.append)})(),
                    user_salt=b"salt", loops=LoopPolicy(enabled=False))
    sid = uuid.uuid4()
    ledger.start_llm(sid, None, "chat", {"feature": "f"}, "m-a", None, root=True, run_id="r")
    ledger.end(sid, "ok", None, TokenUsage(100, 10, 0, 0, 0))
    for s in stores:
        span_rows, run_rows = s.batch_rows(made)
        at = _SPAN_COLS.index("web_search_requests")
        odd = [(*r[:at], searches, *r[at + 1:]) for r in span_rows]
        s.write_rows([(None, odd, run_rows)])
    got = [_table(s, spans, ("id",)) for s in stores]
    assert got[0] == got[1]
    assert got[2] == got[3]
    cols = [c.name for c in spans.c if c.name != "id"]
    at, flags = cols.index("web_search_requests"), cols.index("flags")
    assert [(r[at], r[flags]) for r in got[0]] == [(searches, None)]
    assert [(r[at], r[flags]) for r in got[2]] == [(2**31 - 1 if searches > 0 else -(2**31 - 1), "sanitized")]


def test_a_role_that_may_not_create_temporary_tables_is_written_through_core(
        postgres_admin_url: str, postgres_database: Callable[[], str]) -> None:
    """PostgreSQL grants TEMPORARY to every role by default; where a database revokes it, the first batch fails
    once (retried by the exporter) and the store writes through SQLAlchemy Core from then on: nothing is lost."""
    from tests.pg import _admin, drop_database

    url = postgres_database()
    db = sa.engine.make_url(url).database
    role = f"costobs_no_temp_{uuid.uuid4().hex[:12]}"
    admin = _admin(postgres_admin_url)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
            conn.exec_driver_sql(f'REVOKE TEMPORARY ON DATABASE "{db}" FROM PUBLIC')
        in_db = _admin(url)
        try:
            with in_db.connect() as conn:
                conn.exec_driver_sql(f'GRANT CREATE, USAGE ON SCHEMA public TO "{role}"')
        finally:
            in_db.dispose()
        store = Store(sa.engine.make_url(url).set(username=role).render_as_string(hide_password=False))
        made: list[Any] = []
        ledger = Ledger(prices=PriceBook(PRICES), exporter=type("L", (), {"emit": staticmethod(made.append)})(),
                        user_salt=b"salt", loops=LoopPolicy(enabled=False))
        sid = uuid.uuid4()
        ledger.start_llm(sid, None, "chat", {"feature": "f"}, "m-a", None, root=True, run_id="r")
        ledger.end(sid, "ok", None, TokenUsage(1000, 10, 0, 0, 0))
        sink = BatchExporter(store.write_batch, schedule_delay=3600, retry_deadline=5.0)
        try:
            assert store._path == "pg"
            sink._write(Batch(made))
            assert (sink.stats.exported, sink.stats.failed, sink.stats.retries, store._path) == (1, 0, 1, "core")
            cost = store.run_cost("r")
            assert cost is not None and cost.cost_usd == Decimal("0.00208")
        finally:
            sink.shutdown()
            store.close()
    finally:
        drop_database(postgres_admin_url, url)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()


def test_sqlites_fast_path_stores_every_null_as_null_wherever_it_sits_in_a_batch(tmp_path: Path) -> None:
    """SQLite's fast path binds most NULLs as a float NaN (sqlite3's ``None`` goes through an adapter lookup), in the
    columns where the batch's first rows hold ``None``; a ``None`` in another column binds through the adapter. Both
    must store NULL, and every other value as it is: the batch's first 40 runs have a route and no error, the next
    40 an error and no route (their NULL routes are past the rows read for the swap), and the stored tables must be
    the general path's."""
    made: list[Any] = []
    source = BatchExporter(made.extend, schedule_delay=3600)
    ledger = Ledger(prices=PriceBook(PRICES), exporter=source, user_salt=b"salt", loops=LoopPolicy(enabled=False))
    for i in range(80):
        sid = uuid.uuid4()
        meta = {"feature": "f", **({"route": "/r", "tenant_id": f"t{i % 3}"} if i < 40 else {})}
        ledger.start_llm(sid, None, "Chat", meta, "m-a", "prov")
        ledger.end(sid, "ok" if i < 40 else "error", None if i < 40 else ValueError("bad"),
                   TokenUsage(100 + i, 10, 0, 0, 0), model="m-a")
    assert source.force_flush(10)
    source.shutdown()
    fast, core = Store(f"sqlite:///{tmp_path}/fast.db"), Store(f"sqlite:///{tmp_path}/core.db")
    core._portable()
    try:
        for s in (fast, core):
            s.write_batch(Batch(made))
        assert fast._path == "sqlite"
        for table, skip in ((spans, ("id",)), (runs, ()), (rollups, ()), (rollups_keyed, ())):
            assert _table(fast, table, skip) == _table(core, table, skip), table.name
        with fast.engine.connect() as conn:
            got = conn.execute(sa.text(
                "SELECT count(*), sum(route IS NULL), sum(error IS NULL), sum(parent_id IS NULL), "
                "sum(flags IS NULL), sum(typeof(route) = 'real' OR typeof(error) = 'real' OR typeof(parent_id) = "
                "'real' OR typeof(flags) = 'real' OR typeof(service_tier) = 'real') FROM costobs_spans")).one()
            assert tuple(got) == (80, 40, 40, 80, 80, 0)
            assert conn.execute(sa.text("SELECT count(*) FROM costobs_runs WHERE reason IS NULL AND route IS NULL "
                                        "AND attributes IS NULL")).scalar() == 40
    finally:
        fast.close()
        core.close()


def test_an_apps_float_adapter_does_not_turn_the_stores_nulls_into_text(tmp_path: Path) -> None:
    """sqlite3's adapters are process-wide. An app that adapts floats (to text, say) would get the NaN the fast path
    binds for NULL, and store what it makes of it: with such an adapter the store binds ``None`` as it is. The
    adapter here records what it sees. (A process of its own: registering an adapter for a built-in type makes
    sqlite3 adapt every value, for good.)"""
    script = f"""
import sqlite3, uuid
seen = []
sqlite3.register_adapter(float, lambda f: seen.append(f) or f)
from costobs_callbacks import LoopPolicy, PriceBook
from costobs_callbacks._events import TokenUsage
from costobs_callbacks._export import Batch, BatchExporter
from costobs_callbacks._ledger import Ledger
from costobs_callbacks._store import Store
made = []
source = BatchExporter(made.extend, schedule_delay=3600)
ledger = Ledger(prices=PriceBook({{"m-a": {{"input": "2", "output": "8"}}}}), exporter=source, user_salt=b"s",
                loops=LoopPolicy(enabled=False))
for i in range(5):
    sid = uuid.uuid4()
    ledger.start_llm(sid, None, "Chat", {{"feature": "f"}}, "m-a", "prov")
    ledger.end(sid, "ok", None, TokenUsage(100, 10, 0, 0, 0), model="m-a")
source.force_flush(10)
source.shutdown()
store = Store("sqlite:///{tmp_path}/app.db")
assert store._path == "sqlite"
store.write_batch(Batch(made))
con = sqlite3.connect("{tmp_path}/app.db")
print(con.execute("SELECT count(*), sum(error IS NULL), sum(parent_id IS NULL), sum(route IS NULL) "
                  "FROM costobs_spans").fetchone(), len(seen) > 0, any(f != f for f in seen))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(5, 5, 5, 5) True False"  # NULLs stored; the adapter saw floats, never a NaN
