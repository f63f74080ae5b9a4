"""The hourly rollup table: kept by every batch in the transaction of its spans, on every write path (SQLite's,
PostgreSQL's, the portable one), and read by ``rollup()`` whenever it holds the answer. Both sources give the same
figures to the last digit, for the same random workloads (real ledger spans, real exporters, real databases,
malformed values and refused batches included); a database upgraded from 0002 gets the rollups its spans make."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costobs_callbacks import LoopPolicy, PriceBook
from costobs_callbacks._events import TokenUsage
from costobs_callbacks._export import BatchExporter, PoisonBatch
from costobs_callbacks._ledger import Ledger
from costobs_callbacks._store import (
    _ROLLUP_COLS,
    ROLLUP_KEYS,
    RollupRow,
    Store,
    migrations_dir,
    rollups,
    rollups_keyed,
    runs,
    spans,
)
from tests.test_store_paths import PRICES, _make, call, maybe_text

H0 = 1_764_000_000 // 3600  # the first hour of the drawn start times (see tests.test_store_paths)

plan = st.fixed_dictionaries({}, optional={"tier": st.one_of(maybe_text, st.integers(0, 3), st.booleans()),
                                           "variant": st.one_of(maybe_text, st.sampled_from(["a", "b"]))})
workload_call = st.tuples(call, plan, st.booleans()).map(
    lambda c: {**c[0], "meta": {**c[0]["meta"], **c[1]}, "later": c[2]})
keys = st.lists(st.sampled_from(sorted(ROLLUP_KEYS)), max_size=3, unique=True)
hour = st.one_of(st.none(), st.integers(H0 - 1, H0 + 30).map(lambda h: datetime.fromtimestamp(h * 3600, UTC)))
where_value = st.one_of(st.none(), st.sampled_from(["m-a", "m-b", "llm", "tool", "ok", "error", "unattributed", "a",
                                                    "b", "0", "True", ""]))
query = st.fixed_dictionaries({
    "by": keys,
    "bucket": st.sampled_from([None, "hour", "day"]),
    "since": hour,
    "until": hour,
    "where": st.dictionaries(st.sampled_from(sorted(ROLLUP_KEYS)),
                             st.one_of(where_value, st.lists(where_value, max_size=3)), max_size=2),
})

keyed_query = st.sampled_from(["feature", "tenant_id", "tier", "model"]).flatmap(lambda k: st.fixed_dictionaries({
    "by": st.sampled_from([[k], []]),
    "bucket": st.sampled_from([None, "hour", "day"]),
    "since": hour,
    "until": hour,
    "where": st.one_of(st.just({}), st.fixed_dictionaries({k: st.one_of(where_value, st.lists(where_value,
                                                                                               max_size=3))})),
}))
"""Queries the keyed rows answer (one key of theirs), windows across day boundaries (H0 + 8 starts a UTC day)."""
_at = lambda h: datetime.fromtimestamp(h * 3600, UTC)  # noqa: E731
every_keyed = [{"by": [k], "bucket": b, "since": since, "until": until, "where": {}}
               for k in ("feature", "tenant_id", "tier", "model")
               for b, since, until in ((None, _at(H0 + 3), _at(H0 + 35)), ("day", None, None))]
"""Asked of every workload: each key of the keyed rows, on a window of a whole day with hours at both ends, and
by day on the whole table."""


def _alembic(conn: sa.Connection, verb: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("version_table", "costobs_alembic_version")
    cfg.attributes["connection"] = conn
    getattr(command, verb)(cfg, revision)


@pytest.fixture
def stores(tmp_path: Path, postgres_database: Callable[[], str]) -> Iterator[list[Store]]:
    made = [Store(f"sqlite:///{tmp_path}/fast.db"), Store(f"sqlite:///{tmp_path}/portable.db"),
            Store(postgres_database())]
    made[1]._portable()
    for s in made:
        s.ensure_schema()
    yield made
    for s in made:
        s.close()


def _both(store: Store, q: dict[str, Any]) -> tuple[list[RollupRow], list[RollupRow]]:
    """A query's answer from the rollup tables (the keyed rows where they answer it: checked equal to the hourly
    rows') and from the raw spans."""
    args = (q["by"], q["since"], q["until"], q["bucket"], q["where"])
    tables = sorted(store._rollup(*args, table=True), key=repr)
    assert tables == sorted(store._rollup(*args, table=True, keyed=False), key=repr), q
    return tables, sorted(store._rollup(*args, table=False), key=repr)


def _table(store: Store) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(sa.select(*(rollups.c[c] for c in _ROLLUP_COLS))))


def _keyed_table(store: Store) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(sa.select(rollups_keyed)))


def test_the_rollup_table_and_the_raw_spans_agree(stores: list[Store]) -> None:
    made: list[Any] = []
    source = BatchExporter(made.extend, schedule_delay=3600)
    ledger = Ledger(prices=PriceBook(PRICES), exporter=source, user_salt=b"salt", loops=LoopPolicy(enabled=False))
    sinks = [BatchExporter(s.write_batch, schedule_delay=3600, retry_deadline=5.0) for s in stores]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
    @given(st.lists(workload_call, min_size=1, max_size=8),
           st.lists(st.one_of(query, keyed_query), min_size=1, max_size=6))
    def check(calls: list[dict[str, Any]], queries: list[dict[str, Any]]) -> None:
        # two batches, the second one's groups partly the first's: the upsert adds to stored rows
        for part in (False, True):
            for c in calls:
                if c["later"] is part:
                    _make(ledger, c)
            assert source.force_flush(10)
            items = list(made)
            made.clear()
            for e in sinks:
                for it in items:
                    e.emit(it)
                assert e.force_flush(30)
        assert [e.stats.failed for e in sinks] == [0, 0, 0]
        tables = [_table(s) for s in stores]
        assert tables[0] == tables[1] == tables[2]
        keyed = [_keyed_table(s) for s in stores]
        assert keyed[0] == keyed[1] == keyed[2]
        for q in (*queries, *every_keyed, {"by": [], "bucket": None, "since": None, "until": None, "where": {}}):
            answers = [_both(s, q) for s in stores]
            for from_table, from_spans in answers:
                assert from_table == from_spans, q
            assert answers[0] == answers[1] == answers[2], q

    try:
        check()
        assert stores[0].sanitized > 0  # refused batches were fitted (and rolled back first)
    finally:
        for e in (source, *sinks):
            e.shutdown()


def test_rollup_reads_the_table_when_it_can(tmp_path: Path) -> None:
    """Seen from the outside: rows put in a rollup table alone show in the answers that read it, not in the
    others (a window off the hour, a bucket the tables cannot make; the keyed rows for one key of theirs, the hourly
    rows for the others; a window's whole days from the day rows, its ends from the hour rows)."""
    store = Store(f"sqlite:///{tmp_path}/r.db")
    store.ensure_schema()
    d0 = -(-H0 // 24) * 24  # the first hour of the first whole day after H0
    with store.engine.begin() as conn:
        conn.execute(sa.insert(rollups), [{"hour": H0, "gkey": "x" * 32, "feature": "ghost", "kind": "llm",
                                           "status": "ok", "cost_hi": 0, "cost_lo": 5_000, "llm_calls": 1}])
        # what the keyed rows alone hold: another ghost, on two days; its day rows differ from its hour rows, so
        # that an answer tells which it read
        conn.execute(sa.insert(rollups_keyed), [
            {"dim": "feature", "grain": g, "bucket": b, "vkey": "y" * 32, "value": "keyed", "cost_hi": 0,
             "cost_lo": c, "llm_calls": 1}
            for g, b, c in ((1, d0 - 1, 7), (24, d0 // 24 - 1, 700), (1, d0 + 30, 11), (24, d0 // 24 + 1, 1100))])
    t0 = datetime.fromtimestamp(H0 * 3600, UTC)
    (row,) = store.rollup(["feature", "kind"])
    assert (row.key, row.cost_usd, row.llm_calls) == ({"feature": "ghost", "kind": "llm"}, Decimal("0.000005"), 1)
    (day,) = store.rollup(["feature", "status"], since=t0, until=t0 + timedelta(hours=1), bucket="day")
    assert day.key == {"feature": "ghost", "status": "ok"}
    assert store.rollup(["feature", "kind"], since=t0 + timedelta(minutes=1)) == []
    assert store.rollup(["feature", "kind"], until=t0 + timedelta(seconds=1)) == []

    def keyed(**kw: Any) -> list[tuple[Any, Decimal]]:
        return [(r.key.get("feature"), r.cost_usd) for r in store.rollup(["feature"], **kw)]

    at = lambda h: datetime.fromtimestamp(h * 3600, UTC)  # noqa: E731
    assert keyed() == [("keyed", Decimal("0.0000018"))]  # the day rows
    assert keyed(bucket="hour") == [("keyed", Decimal("0.000000011")), ("keyed", Decimal("0.000000007"))]
    assert [(r.bucket_start, r.cost_usd) for r in store.rollup(["feature"], bucket="day")] == [
        (at(d0 + 24), Decimal("0.0000011")), (at(d0 - 24), Decimal("0.0000007"))]
    assert keyed(since=at(d0 - 1), until=at(d0 + 1)) == [("keyed", Decimal("0.000000007"))]  # two hour rows
    assert keyed(since=at(d0 - 1), until=at(d0 + 48)) == [("keyed", Decimal("0.000001107"))]  # an hour, two days
    assert [(r.bucket_start, r.cost_usd) for r in store.rollup(["feature"], since=at(d0 - 1), until=at(d0 + 48),
                                                               bucket="day")] == [
        (at(d0 + 24), Decimal("0.0000011")), (at(d0 - 24), Decimal("0.000000007"))]
    assert keyed(since=at(d0), until=at(d0 + 24)) == []  # the empty day between
    assert keyed(since=at(d0 + 24), until=at(d0 + 31)) == [("keyed", Decimal("0.000000011"))]
    assert keyed(since=at(d0 + 24), until=at(d0 + 30)) == []
    assert keyed(since=at(d0 + 24), until=at(d0 + 48)) == [("keyed", Decimal("0.0000011"))]
    assert [r.cost_usd for r in store.rollup([])] == [Decimal("0.0000018")]  # the total: the feature rows
    assert [r.cost_usd for r in store.rollup([], where={"kind": "llm"})] == [Decimal("0.000005")]
    assert store.rollup(["feature"], since=t0 + timedelta(minutes=1)) == []  # the spans
    store.close()


def _ledger_into(store: Store) -> tuple[Ledger, BatchExporter]:
    exporter = BatchExporter(store.write_batch, schedule_delay=3600, retry_deadline=5.0)
    return Ledger(prices=PriceBook(PRICES), exporter=exporter, user_salt=b"salt",
                  loops=LoopPolicy(enabled=False)), exporter


def _two_model_run(ledger: Ledger, meta: dict[str, Any]) -> str:
    rid, root = str(uuid.uuid4()), uuid.uuid4()
    ledger.start_span(root, None, "chain", "agent", meta, root=True, run_id=rid)
    for model, provider, tokens in (("m-a", "openai", TokenUsage(100, 10)), ("m-b", "anthropic", TokenUsage(50, 5))):
        sid = uuid.uuid4()
        ledger.start_llm(sid, root, "chat", None, model, provider)
        ledger.end(sid, "ok", None, tokens)
    ledger.end(root, "ok")
    return rid


def test_a_rollup_by_provider_counts_the_model_calls_only(database_url: str) -> None:
    store = Store(database_url)
    ledger, exporter = _ledger_into(store)
    _two_model_run(ledger, {"feature": "agent", "tier": "gold", "variant": "b"})
    assert exporter.force_flush(30)
    for table in (True, False):
        rows = store._rollup(["provider"], None, None, None, None, table=table)
        assert {r.key["provider"]: (r.llm_calls, r.input_tokens) for r in rows} == {"openai": (1, 100),
                                                                                   "anthropic": (1, 50)}
        (plan_row,) = store._rollup(["tier", "variant"], None, None, None, None, table=table)
        assert (plan_row.key, plan_row.runs, plan_row.llm_calls, plan_row.input_tokens) == (
            {"tier": "gold", "variant": "b"}, 1, 2, 150)
    exporter.shutdown()
    store.close()


def test_a_run_counts_once_in_the_hour_of_its_root(database_url: str) -> None:
    """A run continued later (a second root span with the run's id) and lone calls at given times: each run is
    counted once, where (and when) its first root span is."""
    store = Store(database_url)
    ledger, exporter = _ledger_into(store)
    cfg = {"feature": "cont"}
    rid = str(uuid.uuid4())
    for _ in range(2):
        sid = uuid.uuid4()
        ledger.start_llm(sid, None, "chat", cfg, "m-a", "openai", root=True, run_id=rid)
        ledger.end(sid, "ok", None, TokenUsage(10, 1))
    t = 1_764_000_000 + 3 * 3600 + 0.5
    for k in range(3):  # three lone calls in hours H0+3, H0+3 and H0+4
        ledger.record_llm(str(uuid.uuid4()), "chat", "m-b", "openai", t + k * 1800, time.perf_counter(),
                          (20, 2, 0, 0, 0), None)
    assert exporter.force_flush(30)
    for table in (True, False):
        (cont,) = store._rollup(["feature"], None, None, None, {"feature": "cont"}, table=table)
        assert (cont.runs, cont.llm_calls, cont.input_tokens) == (1, 2, 20)
        lone = store._rollup([], None, None, "hour", {"model": "m-b"}, table=table)
        assert sorted((r.bucket_start, r.runs, r.llm_calls) for r in lone if r.bucket_start is not None) == [
            (datetime.fromtimestamp((H0 + 3) * 3600, UTC), 2, 2), (datetime.fromtimestamp((H0 + 4) * 3600, UTC), 1, 1)]
    exporter.shutdown()
    store.close()


def test_a_refused_batch_leaves_no_rollup_behind(tmp_path: Path) -> None:
    """A batch whose transaction fails after its spans and rollups were written (a trigger refuses its run's
    row) changes nothing; written again, it is counted once."""
    store = Store(f"sqlite:///{tmp_path}/r.db")
    store.ensure_schema()
    made: list[Any] = []
    source = BatchExporter(made.extend, schedule_delay=3600)
    ledger = Ledger(prices=PriceBook(PRICES), exporter=source, user_salt=b"salt", loops=LoopPolicy(enabled=False))
    _two_model_run(ledger, {"feature": "retry"})
    assert source.force_flush(10)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TRIGGER no_runs BEFORE INSERT ON costobs_runs "
                             "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(PoisonBatch):
        store.write_batch(made)
    assert _table(store) == []
    assert [(r.runs, r.llm_calls) for r in store.rollup([])] == [(0, 0)]
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER no_runs")
    store.write_batch(made)
    (row,) = store.rollup([])
    assert (row.runs, row.llm_calls, row.input_tokens) == (1, 2, 150)
    assert store._rollup([], None, None, None, None, table=False) == [row]
    source.shutdown()
    store.close()


def test_an_upgraded_0002_database_gets_the_rollups_of_its_spans(database_url: str, tmp_path: Path) -> None:
    """Spans and runs written at the head (which keeps the rollups batch by batch) are copied, as 0002 holds
    them, into a database at 0002; upgraded, its rollup tables are the head's, row for row."""
    head = Store(f"sqlite:///{tmp_path}/head.db")
    ledger, exporter = _ledger_into(head)
    for i in range(4):
        _two_model_run(ledger, {"feature": f"f{i % 2}", "tenant_id": "t", "tier": ["gold", None][i % 2],
                                "variant": "b" if i == 1 else None})
    ledger.record_llm(str(uuid.uuid4()), "chat", "m-b", "openai", 1_764_000_000.25, time.perf_counter(),
                      (20, 2, 0, 0, 0), None)
    rid = str(uuid.uuid4())
    ledger.start_span("tool-root", None, "tool", "search", {"feature": "f0"}, root=True, run_id=rid)
    ledger.end("tool-root", "error", ValueError())
    assert exporter.force_flush(30)
    expected = _table(head)
    assert len(expected) > 5
    expected_keyed = _keyed_table(head)
    with head.engine.connect() as conn:
        span_rows = [{k: v for k, v in r.items() if k not in ("id", "tier", "variant", "opens_run")}
                     for r in conn.execute(sa.select(spans).order_by(spans.c.id)).mappings()]
        run_rows = [dict(r) for r in conn.execute(sa.select(runs)).mappings()]

    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        _alembic(conn, "upgrade", "0002")
    with engine.begin() as conn:
        md = sa.MetaData()
        old_spans = sa.Table("costobs_spans", md, autoload_with=conn)
        old_runs = sa.Table("costobs_runs", md, sa.Column("attributes", sa.JSON()), autoload_with=conn)
        conn.execute(sa.insert(old_spans), span_rows)
        conn.execute(sa.insert(old_runs), run_rows)
    engine.dispose()
    upgraded = Store(database_url)
    upgraded.ensure_schema()
    assert _table(upgraded) == expected
    assert _keyed_table(upgraded) == expected_keyed  # migration 0006's keyed rows: those the head keeps
    for by in ([], ["feature"], ["tier", "variant"], ["model"], ["provider", "tenant_id"], ["kind", "status"]):
        for bucket in (None, "hour"):
            assert upgraded._rollup(by, None, None, bucket, None, table=True) \
                == upgraded._rollup(by, None, None, bucket, None, table=False)
    (total,) = upgraded.rollup([])
    assert (total.runs, total.llm_calls, total.tool_calls) == (6, 9, 1)
    exporter.shutdown()
    head.close()
    upgraded.close()
