"""``spend`` and ``top_runs``, and ``where`` on every query: exact Decimals on SQLite and PostgreSQL, another
tenant's rows never seen through any query, the window as ``rollup`` reads it; bad arguments named as for
``rollup``. A property test holds both queries to a model of the records, across the exact-sum fallback (SQLite's
``SUM()`` overflows past 2^63: figures summed in halves, ordered in Python)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_openai import ChatOpenAI

from costobs_callbacks import ConfigurationError, CostTracker, RunCost

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-spend"
PRICES = {MODEL: {"input": "2", "output": "8"}}
BIG = 2**63 - 1


def usd(inp: int, out: int) -> Decimal:
    return (inp * Decimal(2) + out * Decimal(8)) / Decimal(1_000_000)


def lc_call(tracker: CostTracker, stub: StubOpenAI, inp: int, out: int, **attribution: Any) -> str:
    stub.enqueue(StubReply("ok", usage=StubUsage(inp, out)))
    cfg = tracker.config(**attribution)
    ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0).invoke("hi", config=cfg)
    return str(cfg["run_id"])


def test_where_isolates_tenants_in_every_query(database_url: str, stub_openai: StubOpenAI) -> None:
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t:
        a1 = lc_call(t, stub_openai, 100, 10, feature="chat", tenant_id="acme")
        b1 = lc_call(t, stub_openai, 1000, 100, feature="chat", tenant_id="beta")
        a2 = t.record_usage(model=MODEL, input_tokens=500, output_tokens=50, feature="batch", tenant_id="acme").run_id
        b2 = t.record_cost(usd="7", name="gpu", feature="batch", tenant_id="beta").run_id
        t.record_cost(usd="1", name="api", run_id=b1)  # keeps b1's tenant
        acme, beta = {"tenant_id": "acme"}, {"tenant_id": "beta"}
        with t.run(feature="live", tenant_id="beta") as live:
            t.record_cost(usd="0.5", name="api", run_id=live.run_id)
            assert t.run_cost(live.run_id, where=acme) is None  # open here: answered from memory, filtered
            assert t.run_cost(live.run_id, where=beta) is not None

        assert t.spend(where=acme) == usd(100, 10) + usd(500, 50)
        assert t.spend(where=beta) == usd(1000, 100) + Decimal("8.5")
        assert t.spend() == t.spend(where=acme) + t.spend(where=beta)
        assert t.spend(where={"tenant_id": ["acme", "beta"]}) == t.spend()
        assert t.spend(where={"tenant_id": "nobody"}) == 0

        for row in t.rollup(by=("feature", "tenant_id"), where=acme):
            assert row.key["tenant_id"] == "acme"
        assert sum(r.cost_usd for r in t.rollup(by="feature", where=acme)) == t.spend(where=acme)

        top = t.top_runs(where=acme)
        assert [r.run_id for r in top] == [a2, a1]  # 0.0014 > 0.00028
        assert all(r.attributes["tenant_id"] == "acme" for r in top)
        assert [r.cost_usd for r in t.top_runs(where=beta)] == [Decimal(7), usd(1000, 100) + 1, Decimal("0.5")]
        assert [r.run_id for r in t.top_runs(where=beta)] == [b2, b1, live.run_id]

        for rid in (b1, b2, live.run_id):
            assert t.run_cost(rid, where=acme) is None and t.spans(rid, where=acme) == []
            assert t.run_cost(rid, where=beta) == t.run_cost(rid)
            assert t.spans(rid, where=beta) == t.spans(rid) != []
        for rid in (a1, a2):
            assert t.run_cost(rid, where=beta) is None and t.spans(rid, where=beta) == []
            assert t.run_cost(rid, where={"tenant_id": ["beta", None]}) is None
            assert t.run_cost(rid, where={"tenant_id": ["beta", "acme"], "feature": ["chat", "batch"]}) is not None
        # a span-level key filters a run's spans
        assert [s["kind"] for s in t.spans(b1, where={"kind": "tool"})] == ["tool"]
        assert t.spans(b1, where={"model": MODEL, "tenant_id": "acme"}) == []


def test_top_runs_counts_each_runs_spans_in_the_window(database_url: str) -> None:
    now = datetime.now(UTC)
    old = now - timedelta(days=40)
    with CostTracker(database_url, user_salt="s") as t:
        r1 = t.record_cost(usd="5", name="api", at=old, feature="f").run_id
        t.record_cost(usd="1", name="api", run_id=r1)
        r2 = t.record_cost(usd="2", name="api", feature="f").run_id
        r3 = t.record_cost(usd="2", name="api", feature="g").run_id
        whole = t.top_runs()
        assert [(r.run_id, r.cost_usd, r.tool_calls) for r in whole] == [
            (r1, Decimal(6), 2), *sorted([(r2, Decimal(2), 1), (r3, Decimal(2), 1)])]  # ties by run id
        assert whole == [t.run_cost(r.run_id) for r in whole]  # no window, no filter: each whole run
        recent = t.top_runs(since=now - timedelta(days=1))
        assert [(r.run_id, r.cost_usd) for r in recent[:2]] == sorted([(r2, 2), (r3, 2)])
        assert {(r.run_id, r.cost_usd) for r in recent} == {(r1, 1), (r2, 2), (r3, 2)}
        assert [r.cost_usd for r in t.top_runs(until=now - timedelta(days=1))] == [Decimal(5)]
        assert len(t.top_runs(n=2)) == 2 and t.top_runs(n=1) == whole[:1]
        assert [r.run_id for r in t.top_runs(where={"feature": "g"})] == [r3]
        assert t.top_runs(since=now + timedelta(days=1)) == []
        assert t.spend(since=old, until=old + timedelta(microseconds=1)) == 5


def test_sums_past_bigint_stay_exact(database_url: str) -> None:
    """Figures whose sums pass 2^63 (SQLite's SUM() raises there; PostgreSQL's is NUMERIC)."""
    top = Decimal(BIG).scaleb(-9)
    with CostTracker(database_url, user_salt="s") as t:
        big = t.record_cost(usd=top, name="api", feature="f").run_id
        t.record_cost(usd=top, name="api", run_id=big)
        small = [t.record_cost(usd=Decimal(k).scaleb(-9), name="api", feature="f").run_id for k in (3, 1, 3)]
        assert t.spend() == (2 * BIG + 7) * Decimal("1e-9")
        assert t.spend(where={"feature": "f"}) == t.spend()
        runs = t.top_runs(n=3)
        tied = sorted(r for r, k in zip(small, (3, 1, 3), strict=True) if k == 3)
        assert [r.run_id for r in runs] == [big, *tied]
        assert runs[0].cost_usd == 2 * BIG * Decimal("1e-9") and runs[0].tool_calls == 2
        assert [r.cost_usd for r in runs[1:]] == [Decimal("3e-9")] * 2


@pytest.fixture
def tracker(cost_tracker_factory: Any) -> CostTracker:
    t: CostTracker = cost_tracker_factory()
    t.record_cost(usd="1", name="api", feature="f")
    return t


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"where": {"feature": 3}}, r"where\['feature'\]"),
    ({"where": {"nope": "a"}}, "'nope' in where"),
    ({"where": ["feature"]}, "where must be a mapping"),
    ({"since": "yesterday"}, "since must be a datetime"),
    ({"until": 123}, "until must be a datetime"),
    ({"since": datetime(2026, 1, 2, tzinfo=UTC), "until": datetime(2026, 1, 1)}, "since .* is after until"),
])
@pytest.mark.parametrize("query", ["spend", "top_runs", "rollup"])
def test_bad_query_arguments_name_themselves(tracker: CostTracker, query: str, kwargs: dict[str, Any],
                                             named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        getattr(tracker, query)(**kwargs)


@pytest.mark.parametrize("n", [0, -1, 1.0, "3", True, None])
def test_top_runs_n_is_a_positive_int(tracker: CostTracker, n: Any) -> None:
    with pytest.raises(ConfigurationError, match="n must be a positive int"):
        tracker.top_runs(n=n)


def test_where_of_one_run(tracker: CostTracker) -> None:
    [rc] = tracker.top_runs()
    for bad, named in (({"model": "x"}, "'model' in where is a key of each span"), ({"nope": 1}, "'nope'"),
                       ({"feature": 2}, r"where\['feature'\]"), ("feature", "where must be a mapping")):
        with pytest.raises(ConfigurationError, match=named):
            tracker.run_cost(rc.run_id, where=bad)
    with pytest.raises(ConfigurationError, match=r"where\['kind'\]"):
        tracker.spans(rc.run_id, where={"kind": 1})
    assert tracker.run_cost(rc.run_id, where={"feature": "f", "tenant_id": None}) == rc
    assert tracker.run_cost(rc.run_id, where={"route": "r"}) is None
    assert tracker.run_cost("never-seen", where={"feature": "f"}) is None


def test_naive_windows_are_utc(tracker: CostTracker) -> None:
    naive = datetime.now(UTC).replace(tzinfo=None)
    assert tracker.spend(since=naive - timedelta(minutes=5)) == 1
    assert tracker.spend(since=naive + timedelta(minutes=5)) == 0
    assert len(tracker.top_runs(until=naive + timedelta(minutes=5))) == 1


_examples = itertools.count()
_shared: dict[int, CostTracker] = {}
_DAY0 = datetime(2026, 6, 1, tzinfo=UTC)

_record = st.tuples(
    st.integers(0, 3),  # run
    st.one_of(st.integers(0, 10**6), st.sampled_from([BIG // 2, BIG // 3, BIG])),  # nano-USD
    st.integers(0, 5 * 24 * 60),  # minutes after _DAY0
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(_record, min_size=1, max_size=10),
    since=st.one_of(st.none(), st.integers(0, 5 * 24 * 60)),
    length=st.one_of(st.none(), st.integers(0, 3 * 24 * 60)),
    tenant=st.sampled_from([None, "t0", "t1", ["t0", None], [None]]),
)
def test_spend_and_top_runs_match_a_model_of_the_records(
    cost_tracker_factory: Any, records: list[tuple[int, int, int]], since: int | None, length: int | None,
    tenant: Any,
) -> None:
    t = _shared.get(id(cost_tracker_factory))
    if t is None:  # one tracker for every example (each has its own feature and run ids)
        _shared.clear()
        t = _shared[id(cost_tracker_factory)] = cost_tracker_factory("property.db")
    ex = next(_examples)
    feature = f"ex{ex}"
    tenants = {0: "t0", 1: "t1", 2: None, 3: "t0"}  # fixed per run: a run's spans carry its attribution
    for run, nanos, minute in records:
        t.record_cost(usd=Decimal(nanos).scaleb(-9), name="api", at=_DAY0 + timedelta(minutes=minute),
                      run_id=f"{feature}-{run}", feature=feature, tenant_id=tenants[run])
    start = None if since is None else _DAY0 + timedelta(minutes=since)
    end = None if length is None else (start or _DAY0) + timedelta(minutes=length)
    where: dict[str, Any] = {"feature": feature}
    if tenant is not None:
        where["tenant_id"] = tenant
    allowed = tenant if isinstance(tenant, list) else [tenant]

    def picked(run: int, minute: int) -> bool:
        at = _DAY0 + timedelta(minutes=minute)
        return ((start is None or at >= start) and (end is None or at < end)
                and (tenant is None or tenants[run] in allowed))

    per_run: dict[str, list[int]] = {}
    for run, nanos, minute in records:
        if picked(run, minute):
            per_run.setdefault(f"{feature}-{run}", []).append(nanos)
    expected = sorted(((rid, sum(v), len(v)) for rid, v in per_run.items()), key=lambda x: (-x[1], x[0]))

    assert t.spend(since=start, until=end, where=where) == Decimal(sum(x[1] for x in expected)).scaleb(-9)
    top = t.top_runs(n=10, since=start, until=end, where=where)
    assert all(isinstance(r, RunCost) for r in top)
    assert [(r.run_id, r.cost_usd, r.tool_calls) for r in top] == [
        (rid, Decimal(total).scaleb(-9), calls) for rid, total, calls in expected]
    assert t.top_runs(n=2, since=start, until=end, where=where) == top[:2]
