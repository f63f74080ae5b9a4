"""The store's write paths agree: SQLite's (rows as driver tuples, many per statement, its own upsert text),
PostgreSQL's (driver tuples, a Core upsert) and the portable one (SQLAlchemy Core alone, for other dialects,
here on SQLite) store the same rows and answer ``run_cost`` and ``rollup`` alike, for the same random spans,
malformed ones included: lone surrogates, NUL characters, long text, counts past BIGINT, ``None`` fields.

The spans are made by the real ledger (its ``start``/``end`` and ``record_llm`` paths) and written by a real
``BatchExporter`` per store, so batches the database refuses are fitted and bisected as in production."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from costobs_callbacks import LoopPolicy, PriceBook, RunAborted
from costobs_callbacks._events import TokenUsage, UsageDetail
from costobs_callbacks._export import BatchExporter
from costobs_callbacks._ledger import Ledger
from costobs_callbacks._store import Store, runs, spans

PRICES = {"m-a": {"input": "2", "output": "8", "cache_read": "0.2", "cache_write": "2.5"},
          "m-b": {"input": "0.15", "output": "0.6"}}

ODD = ["\udcff", "a\ud800b", "\ud83d\ude00", "x\x00y", "\x00", "é", "😀", "", " ", "\ufffd"]
chars = st.one_of(st.characters(), st.sampled_from(["\udcff", "\ud800", "\udc00", "\x00"]))
text = st.one_of(
    st.text(chars, max_size=8),
    st.sampled_from(ODD),
    st.text(st.sampled_from("ab\x00\udcffé"), min_size=250, max_size=300),
)
maybe_text = st.one_of(st.none(), text)
count = st.one_of(
    st.integers(0, 1000),
    st.integers(0, 2**66),
    st.sampled_from([2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64]),
)
# start times whose microseconds are a half: one more place the paths could round apart
start_wall = st.builds(lambda s, k: 1_764_000_000 + s + k / 2**22, st.integers(0, 10**5),
                       st.one_of(st.integers(0, 2**22 - 1), st.integers(0, 63).map(lambda m: 2**15 * (2 * m + 1))))
meta = st.fixed_dictionaries({}, optional={
    "feature": maybe_text, "route": maybe_text, "tenant_id": maybe_text, "user_id": maybe_text,
    "prompt_version": maybe_text, "note": st.one_of(text, count, st.floats(), st.booleans(), st.none()),
    text.filter(lambda k: not k.startswith(("ls_", "langgraph_", "costobs_"))): text,
})
detail = st.one_of(st.none(), st.builds(UsageDetail, cache_write_1h=count, service_tier=maybe_text,
                                        web_search_requests=count))
call = st.fixed_dictionaries({
    "lone": st.booleans(),
    "meta": meta,
    "kind": st.sampled_from(["llm", "llm", "embedding", "tool", "retriever", "chain"]),
    "name": text,
    "model": st.one_of(st.none(), st.sampled_from(["m-a", "m-b"]), text),
    "provider": maybe_text,
    "tokens": st.one_of(st.none(), st.tuples(count, count, count, count, count)),
    "detail": detail,
    "error": st.booleans(),
    "cache_hit": st.booleans(),
    "child": st.one_of(st.none(), text),
    "start": start_wall,
})


def _make(ledger: Ledger, c: dict[str, Any], sid: uuid.UUID | None = None) -> str:
    """One run made by the ledger from a drawn call, its root span's id ``sid`` if given; returns its run id."""
    tokens = c["tokens"] or (0, 0, 0, 0, 0)
    if c["lone"] and sid is None:
        key = str(uuid.uuid4())
        ledger.record_llm(key, c["name"], c["model"], c["provider"], c["start"], time.perf_counter(), tokens,
                          None, detail=c["detail"])
        return key
    rid, root = str(uuid.uuid4()), sid or uuid.uuid4()
    try:
        if c["kind"] in ("llm", "embedding"):
            ledger.start_llm(root, None, c["name"], c["meta"], c["model"], c["provider"], kind=c["kind"], root=True,
                             run_id=rid)
        else:
            ledger.start_span(root, None, c["kind"], c["name"], c["meta"], root=True, run_id=rid)
        if c["child"] is not None:
            cid = uuid.uuid4()
            ledger.start_span(cid, root, "tool", c["child"])
            ledger.end(cid, "ok")
        ledger.end(root, "error" if c["error"] else "ok", ValueError() if c["error"] else None,
                   TokenUsage(*tokens) if c["tokens"] is not None else None, cache_hit=c["cache_hit"],
                   detail=c["detail"])
    except RunAborted:  # a policy refused it (stored as such): the paths must agree on that too
        pass
    return rid


@pytest.fixture
def stores(tmp_path: Path, postgres_database: Callable[[], str]) -> Iterator[list[Store]]:
    made = [Store(f"sqlite:///{tmp_path}/fast.db"), Store(f"sqlite:///{tmp_path}/portable.db"),
            Store(postgres_database())]
    made[1]._portable()
    assert (made[0]._fast, made[1]._fast, made[2]._fast, made[2].dialect) == (True, False, True, "postgresql")
    for s in made:
        s.ensure_schema()
    yield made
    for s in made:
        s.close()


def _stored(store: Store, run_ids: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with store.engine.connect() as conn:
        span_rows = [{k: v for k, v in r.items() if k != "id"} for r in conn.execute(
            sa.select(spans).where(spans.c.run_id.in_(run_ids)).order_by(spans.c.span_id)).mappings()]
        run_rows = [dict(r) for r in conn.execute(
            sa.select(runs).where(runs.c.run_id.in_(run_ids)).order_by(runs.c.run_id)).mappings()]
    return span_rows, run_rows


def _rollup(store: Store, by: tuple[str, ...], bucket: str | None) -> list[Any]:
    return sorted(store.rollup(by, bucket=bucket), key=repr)


def test_every_write_path_stores_the_same_rows(stores: list[Store]) -> None:
    made: list[Any] = []
    source = BatchExporter(made.extend, schedule_delay=3600)
    ledger = Ledger(prices=PriceBook(PRICES), exporter=source, user_salt=b"salt", loops=LoopPolicy(enabled=False))
    sinks = [BatchExporter(s.write_batch, schedule_delay=3600, retry_deadline=5.0) for s in stores]

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
    @given(st.lists(call, min_size=1, max_size=6))
    def check(calls: list[dict[str, Any]]) -> None:
        run_ids = [_make(ledger, c) for c in calls]
        assert source.force_flush(10)
        items = list(made)
        made.clear()
        before = [(e.stats.exported, e.stats.failed, e.stats.refused) for e in sinks]
        for e in sinks:
            for it in items:
                e.emit(it)
            assert e.force_flush(30)
        counts = [(e.stats.exported - b[0], e.stats.failed - b[1], e.stats.refused - b[2])
                  for e, b in zip(sinks, before, strict=True)]
        assert counts[0] == counts[1] == counts[2]
        assert counts[0][1] == 0, "a row was refused even once fitted"
        fast, portable, pg = (_stored(s, run_ids) for s in stores)
        assert fast == pg
        assert fast == portable
        for rid in run_ids:
            rc = [s.run_cost(rid) for s in stores]
            assert rc[0] == rc[1] == rc[2]
        for by, bucket in ((("feature", "model"), None), (("tenant_id",), "hour"), ((), "day")):
            r = [_rollup(s, by, bucket) for s in stores]
            assert r[0] == r[1] == r[2]

    try:
        check()
        # the ledger made what the strategy meant: malformed values reached the store and were fitted there
        assert sum(s.sanitized for s in stores[:1]) > 0
        assert stores[0].sanitized == stores[1].sanitized == stores[2].sanitized
    finally:
        for e in (source, *sinks):
            e.shutdown()
