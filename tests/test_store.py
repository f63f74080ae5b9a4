"""Storage on every backend (SQLite file, PostgreSQL): exact sums, replicas sharing one store,
migrations, the shared salt. Spans come from real LangChain runs through the handler."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from langchain_core.prompts import ChatPromptTemplate

from costobs_callbacks import CostTracker
from costobs_callbacks._store import HEAD_REVISION
from costobs_callbacks.testing import FakeChatModel

PRICES = {"m-small": {"input": "0.15", "output": "0.6", "cache_read": "0.075"},
          "m-big": {"input": "2.5", "output": "10"}}


def _usage_cost(inp: int, out: int, cached: int, model: str) -> Decimal:
    p = {k: Decimal(v) for k, v in PRICES[model].items()}
    return ((inp - cached) * p["input"] + cached * p.get("cache_read", p["input"]) + out * p["output"]) / 10**6


def _chain(model: FakeChatModel):  # type: ignore[no-untyped-def]
    return ChatPromptTemplate.from_messages([("user", "{q}")]) | model


def _expected(model: FakeChatModel, question: str) -> tuple[int, int, int]:
    """The fake model's usage for a one-message prompt (see FakeChatModel._generate)."""
    inp = max(8, len(question) // 4)
    out = max(4, len(f"Here is what I found about {question[:40]}... " * 3) // 4)
    return inp, out, int(inp * model.cached_fraction)


def test_runs_rollups_and_spans_are_exact(database_url: str) -> None:
    small = FakeChatModel(model_name="m-small", cached_fraction=0.5)
    big = FakeChatModel(model_name="m-big")
    expected_total = Decimal(0)
    expected_by_feature: dict[str, Decimal] = {}
    with CostTracker(database_url, prices=PRICES, user_salt="s") as tracker:
        ids = []
        for i in range(40):
            model = small if i % 3 else big
            feature = ["chat", "summarize", "search"][i % 3]
            q = "question " * (i + 1)
            cfg = tracker.config(feature=feature, tenant_id=f"t{i % 2}", user_id=f"u{i % 5}")
            _chain(model).invoke({"q": q}, config=cfg)
            inp, out, cached = _expected(model, q)
            c = _usage_cost(inp, out, cached, model.model_name)
            expected_total += c
            expected_by_feature[feature] = expected_by_feature.get(feature, Decimal(0)) + c
            ids.append((cfg["run_id"], c, inp, out, cached))
        tracker.flush()
        for rid, c, inp, out, cached in ids:
            rc = tracker.run_cost(rid)
            assert rc is not None and rc.status == "ok"
            assert rc.cost_usd == c.quantize(Decimal("1e-9"))
            assert (rc.input_tokens, rc.output_tokens, rc.cache_read_tokens, rc.llm_calls) == (inp, out, cached, 1)
        rows = tracker.rollup(by=["feature"])
        assert {r.key["feature"]: r.cost_usd for r in rows} == {
            f: v.quantize(Decimal("1e-9")) for f, v in expected_by_feature.items()
        }
        assert sum(r.runs for r in rows) == 40
        # a rollup equals the sum of its spans, to the last digit
        with sa.create_engine(database_url).connect() as conn:
            span_sum = conn.execute(sa.text("SELECT SUM(cost_nanos) FROM costobs_spans")).scalar_one()
            run_sum = conn.execute(sa.text("SELECT SUM(cost_nanos) FROM costobs_runs")).scalar_one()
        assert int(span_sum) == int(run_sum) == int(sum(r.cost_usd for r in rows) * 10**9)
        assert sum(r.cost_usd for r in rows) == sum(c.quantize(Decimal("1e-9")) for _, c, *_ in ids)
        # buckets and filters
        hour = tracker.rollup(by=["tenant_id"], bucket="hour")
        day = tracker.rollup(by=["tenant_id"], bucket="day")
        assert sum(r.cost_usd for r in hour) == sum(r.cost_usd for r in day) == sum(r.cost_usd for r in rows)
        now = datetime.now(UTC)
        assert all(r.bucket_start is not None and r.bucket_start <= now for r in hour)
        assert tracker.rollup(by=["feature"], since=now + timedelta(hours=1)) == []
        only = tracker.rollup(by=["model"], where={"feature": ["chat", "search"]})
        assert sum(r.llm_calls for r in only) == 40 - len([i for i in range(40) if i % 3 == 1])


def test_replicas_share_one_store_and_continue_each_others_runs(database_url: str) -> None:
    """Two trackers (as two app replicas would) write one store at once; a run started on one and
    continued on the other adds up."""
    model = FakeChatModel(model_name="m-small")
    a = CostTracker(database_url, prices=PRICES, user_salt="s")
    b = CostTracker(database_url, prices=PRICES, user_salt="s")
    try:
        shared = a.config(feature="chat")
        _chain(model).invoke({"q": "first half"}, config=shared)
        a.flush()
        cfg_b = b.config(feature="chat", run_id=shared["run_id"])
        _chain(model).invoke({"q": "second half"}, config=cfg_b)
        b.flush()

        def work(tr: CostTracker, n: int) -> None:
            for i in range(n):
                _chain(model).invoke({"q": f"q{i}"}, config=tr.config(feature="bulk"))

        threads = [threading.Thread(target=work, args=(tr, 50)) for tr in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.flush()
        b.flush()
        rc = a.store.run_cost(str(shared["run_id"]))
        assert rc is not None
        c1 = _usage_cost(*_expected(model, "first half"), "m-small")
        c2 = _usage_cost(*_expected(model, "second half"), "m-small")
        assert rc.llm_calls == 2
        assert rc.cost_usd == (c1.quantize(Decimal("1e-9")) + c2.quantize(Decimal("1e-9")))
        bulk = b.rollup(by=["feature"], where={"feature": "bulk"})
        assert bulk[0].runs == 200 and bulk[0].llm_calls == 200
        per_thread = sum(_usage_cost(*_expected(model, f"q{i}"), "m-small").quantize(Decimal("1e-9"))
                         for i in range(50))
        assert bulk[0].cost_usd == 4 * per_thread
        with a.store.engine.connect() as conn:
            inv = conn.execute(sa.text("SELECT invocations FROM costobs_runs WHERE run_id = :r"),
                               {"r": str(shared["run_id"])}).scalar_one()
        assert inv == 2
    finally:
        a.close()
        b.close()


def test_migrations_run_once_and_the_salt_is_shared(database_url: str) -> None:
    with CostTracker(database_url) as t1:
        cfg = t1.config(feature="f", user_id="alice")
        _chain(FakeChatModel(model_name="m-small")).invoke({"q": "x"}, config=cfg)
        t1.flush()
        h1 = t1.run_cost(cfg["run_id"]).attributes["user"]  # type: ignore[union-attr]
    with CostTracker(database_url) as t2:  # a second process / replica, no salt configured
        cfg2 = t2.config(feature="f", user_id="alice")
        _chain(FakeChatModel(model_name="m-small")).invoke({"q": "x"}, config=cfg2)
        t2.flush()
        h2 = t2.run_cost(cfg2["run_id"]).attributes["user"]  # type: ignore[union-attr]
        with t2.store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM costobs_alembic_version")).scalar_one() \
                == HEAD_REVISION
            assert conn.execute(sa.text("SELECT COUNT(*) FROM costobs_meta")).scalar_one() == 1
    assert h1 == h2 and "alice" not in h1 and len(h1) == 64


def test_sqlite_binds_nulls_through_our_adapter_and_leaves_an_apps_own_alone(tmp_path):
    """The store gives sqlite3 an adapter for ``None`` (its adapter search raises and clears an AttributeError per
    NULL otherwise); one the app registered first is kept, and NULLs are stored as NULL either way."""
    import sqlite3

    key = (type(None), sqlite3.PrepareProtocol)
    before = sqlite3.adapters.pop(key, None)
    try:
        def apps_own(value: None) -> None:
            return None

        sqlite3.register_adapter(type(None), apps_own)
        CostTracker(f"sqlite:///{tmp_path}/a.db").close()
        assert sqlite3.adapters[key] is apps_own
        del sqlite3.adapters[key]
        tracker = CostTracker(f"sqlite:///{tmp_path}/b.db")
        assert sqlite3.adapters[key] is not apps_own and sqlite3.adapters[key](None) is None
        FakeChatModel().invoke("hi", config=tracker.config(feature="nulls"))
        tracker.flush()
        (span,) = tracker.spans(tracker.top_runs(n=1)[0].run_id)
        assert span["route"] is None and span["tenant_id"] is None and span["error"] is None
        tracker.close()
    finally:
        sqlite3.adapters.pop(key, None)
        if before is not None:
            sqlite3.adapters[key] = before


def test_sqlite_connections_are_in_wal_mode_with_a_16_mib_page_cache(tmp_path):
    """Every connection of a SQLite store: WAL, ``synchronous=NORMAL``, a page cache of up to 16 MiB (a full
    batch's dirty pages fit, instead of spilling to the WAL before the commit), and 16 KiB pages in a new file."""
    tracker = CostTracker(f"sqlite:///{tmp_path}/c.db")
    try:
        with tracker.store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 1  # NORMAL
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar_one() == -16 * 1024  # KiB
            assert conn.exec_driver_sql("PRAGMA page_size").scalar_one() == 16 * 1024
    finally:
        tracker.close()


def test_a_sqlite_file_made_with_4_kib_pages_keeps_them_and_every_row(tmp_path):
    """A database made before the store chose 16 KiB pages (SQLite's default 4 KiB, in WAL mode) is opened as it
    is: its pages stay 4 KiB, its rows are read and new ones written beside them."""
    path = tmp_path / "old.db"
    first = CostTracker(f"sqlite:///{path}")
    first.close()
    with sqlite3.connect(path) as raw:  # the same schema, rebuilt with 4 KiB pages, as an older file has them
        raw.execute("PRAGMA journal_mode=DELETE")
        raw.execute("PRAGMA page_size=4096")
        raw.execute("VACUUM")
        raw.execute("PRAGMA journal_mode=WAL")
        assert raw.execute("PRAGMA page_size").fetchone() == (4096,)
    tracker = CostTracker(f"sqlite:///{path}", prices={"m-old": {"input": "1", "output": "2"}})
    try:
        tracker.record_usage(model="m-old", input_tokens=1_000_000, output_tokens=0, feature="before")
        tracker.flush()
    finally:
        tracker.close()
    again = CostTracker(f"sqlite:///{path}", prices={"m-old": {"input": "1", "output": "2"}})
    try:
        again.record_usage(model="m-old", input_tokens=0, output_tokens=1_000_000, feature="after")
        again.flush()
        with again.store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA page_size").scalar_one() == 4096
        assert {r.key["feature"]: r.cost_usd for r in again.rollup(by=("feature",))} == {
            "before": Decimal("1"), "after": Decimal("2")}
    finally:
        again.close()
