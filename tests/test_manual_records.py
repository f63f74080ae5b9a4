"""``tracker.record_usage`` / ``record_cost``: spend no framework saw, priced, attributed and stored as a framework
call's is; backdated by ``at``; added to a run by ``run_id`` (a LangChain run's included); every bad argument a
``ConfigurationError`` naming it, with nothing recorded. Real SQLite and PostgreSQL, real ChatOpenAI calls to the
stub server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from langchain_openai import ChatOpenAI

from costobs_callbacks import BudgetExceededError, ConfigurationError, CostTracker

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-rec"
PRICES = {MODEL: {"input": "2", "output": "8", "cache_read": "0.5", "cache_write": "3"}}


def lc_call(tracker: CostTracker, stub: StubOpenAI, inp: int, out: int, cfg: Any) -> None:
    stub.enqueue(StubReply("ok", usage=StubUsage(inp, out)))
    ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0).invoke("hi", config=cfg)


def nanos(usd: str) -> int:
    return int(Decimal(usd).scaleb(9))


def test_record_usage_is_priced_stored_and_attributed(database_url: str) -> None:
    with CostTracker(database_url, user_salt="s") as t:
        rc = t.record_usage(model="gpt-4o", input_tokens=12_000, output_tokens=800, feature="nightly-batch",
                            tenant_id="acme", user_id="alice@example.com", route="/batch", prompt_version="v3",
                            shard=7, dry=False)
        # gpt-4o: $2.50 in, $10 out per million
        assert rc.cost_usd == Decimal("0.038")
        assert (rc.input_tokens, rc.output_tokens, rc.llm_calls, rc.tool_calls) == (12_000, 800, 1, 0)
        assert rc.by_model == {"gpt-4o": Decimal("0.038")} and rc.status == "ok"
        t.flush()
        stored = t.run_cost(rc.run_id)
        assert stored == rc
        assert stored.attributes == {"feature": "nightly-batch", "tenant_id": "acme", "route": "/batch",
                                     "prompt_version": "v3", "user": t.ledger.hash_user("alice@example.com"),
                                     "shard": 7, "dry": False}
        [sp] = t.spans(rc.run_id)
        assert sp["kind"] == "llm" and sp["model"] == "gpt-4o" and sp["cost_nanos"] == 38_000_000
        assert sp["unpriced"] is False and sp["flags"] == "manual" and sp["parent_id"] is None
        assert sp["tenant_id"] == "acme" and sp["feature"] == "nightly-batch"
        assert sp["user_hash"] == t.ledger.hash_user("alice@example.com")
        assert "alice" not in repr(sp) and "alice" not in repr(stored)
        assert t.spend(since=datetime(2026, 11, 1, tzinfo=UTC), where={"tenant_id": "acme"}) == Decimal("0.038")
        assert t.top_runs(n=10, where={"tenant_id": "acme"}) == [stored]


def test_record_usage_prices_cache_and_reasoning_as_a_framework_call(cost_tracker_factory: Any) -> None:
    t = cost_tracker_factory(prices=PRICES)
    rc = t.record_usage(model=MODEL, input_tokens=1000, output_tokens=100, cache_read_tokens=600,
                        cache_write_tokens=100, reasoning_tokens=40)
    # (1000 - 600 - 100) * 2 + 600 * 0.5 + 100 * 3 + 100 * 8, per million
    assert rc.cost_usd == Decimal("0.002")
    assert t.prices.price_nanos(MODEL, None, (1000, 100, 600, 100, 40))[0] == nanos("0.002")
    assert (rc.cache_read_tokens, rc.cache_write_tokens, rc.reasoning_tokens) == (600, 100, 40)


def test_unknown_model_is_unpriced_never_zero(database_url: str) -> None:
    with CostTracker(database_url, user_salt="s") as t:
        rc = t.record_usage(model="no-such-model-xyz", input_tokens=10, output_tokens=5, feature="f")
        assert rc.unpriced_calls == 1 and rc.unpriced_models == ("no-such-model-xyz",) and rc.by_model == {}
        t.flush()
        [sp] = t.spans(rc.run_id)
        assert sp["unpriced"] is True and sp["cost_nanos"] is None
        assert (sp["input_tokens"], sp["output_tokens"]) == (10, 5)
        assert t.run_cost(rc.run_id) == rc
        [row] = t.rollup(by="model")
        assert row.unpriced_calls == 1 and row.input_tokens == 10


def test_record_cost_is_exact_and_ignores_tool_prices(database_url: str) -> None:
    with CostTracker(database_url, user_salt="s", tool_prices={"serp": "1"}) as t:
        a = t.record_cost(usd=Decimal("0.0125"), name="serp", feature="search")
        b = t.record_cost(usd=0.1, name="serp", feature="search")
        c = t.record_cost(usd="2", name="gpu-hour", feature="search")
        d = t.record_cost(usd=0, name="free", feature="search")
        e = t.record_cost(usd=Decimal("0.0000000015"), name="tiny", feature="search")  # half to even
        assert [x.cost_usd for x in (a, b, c, d, e)] == [Decimal("0.0125"), Decimal("0.1"), Decimal(2), 0,
                                                         Decimal("0.000000002")]
        assert all(x.tool_calls == 1 and x.llm_calls == 0 for x in (a, b, c, d, e))
        t.flush()
        [sp] = t.spans(a.run_id)
        assert sp["kind"] == "tool" and sp["name"] == "serp" and sp["cost_nanos"] == 12_500_000
        assert sp["flags"] == "manual"
        assert t.spend(where={"feature": "search"}) == Decimal("2.112500002")


def test_at_backdates_span_hour_and_run(database_url: str) -> None:
    now = datetime.now(UTC)
    this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    last_month = (this_month - timedelta(days=1)).replace(day=1)
    at = last_month + timedelta(days=3, hours=5, minutes=7, seconds=1, microseconds=250)
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t:
        rc = t.record_usage(model=MODEL, input_tokens=1000, output_tokens=0, at=at.astimezone(timezone(
            timedelta(hours=-7))), tenant_id="acme")
        t.record_cost(usd="0.5", name="api", tenant_id="acme")  # now
        t.flush()
        [sp] = t.spans(rc.run_id)
        naive = at.replace(tzinfo=None)
        assert sp["start_at"] == naive and sp["end_at"] == naive
        assert sp["hour"] == int(at.timestamp() // 3600)
        with t.store.engine.connect() as conn:
            import sqlalchemy as sa

            from costobs_callbacks._store import runs

            started, ended = conn.execute(sa.select(runs.c.started_at, runs.c.ended_at)
                                          .where(runs.c.run_id == rc.run_id)).one()
        assert started == naive and ended == naive
        assert t.spend(since=last_month, until=this_month) == Decimal("0.002")
        assert t.spend(since=this_month) == Decimal("0.5")
        assert t.spend(since=at + timedelta(microseconds=1), until=this_month) == 0
        assert t.spend(since=at, until=at + timedelta(microseconds=1)) == Decimal("0.002")
        [row] = t.rollup(by="tenant_id", since=last_month, until=this_month, bucket="hour")
        assert row.bucket_start == at.replace(minute=0, second=0, microsecond=0)
        assert [r.run_id for r in t.top_runs(since=last_month, until=this_month)] == [rc.run_id]


def test_same_run_id_twice_adds_both(database_url: str) -> None:
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t:
        rid = "import-2026-10"
        first = t.record_usage(model=MODEL, input_tokens=1000, output_tokens=100, run_id=rid, feature="import")
        second = t.record_cost(usd="0.25", name="storage", run_id=rid)  # gives no attribution: keeps the run's
        assert first.cost_usd == Decimal("0.0028") and second.cost_usd == Decimal("0.2528")
        assert (second.llm_calls, second.tool_calls, second.input_tokens) == (1, 1, 1000)
        t.flush()
        stored = t.run_cost(rid)
        assert stored is not None and stored.cost_usd == Decimal("0.2528")
        assert stored.attributes == {"feature": "import"}
        assert [s["feature"] for s in t.spans(rid)] == ["import", "import"]
        assert t.spend(where={"feature": "import"}) == Decimal("0.2528")


def test_record_adds_to_a_langchain_run(database_url: str, stub_openai: StubOpenAI) -> None:
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t:
        cfg = t.config(feature="chat", tenant_id="acme")
        lc_call(t, stub_openai, 100, 20, cfg)  # 100 * 2 + 20 * 8 = 360 per million
        rc = t.record_usage(model=MODEL, input_tokens=1000, output_tokens=100, run_id=cfg["run_id"])
        assert rc.run_id == str(cfg["run_id"]) and rc.cost_usd == Decimal("0.00316")
        t.record_cost(usd="0.01", name="serp", run_id=str(cfg["run_id"]).upper())
        lc_call(t, stub_openai, 100, 20, cfg)  # the config reused after the records: the same run goes on
        t.flush()
        stored = t.run_cost(cfg["run_id"])
        assert stored is not None
        assert stored.cost_usd == Decimal("0.00036") * 2 + Decimal("0.0028") + Decimal("0.01")
        assert (stored.llm_calls, stored.tool_calls, stored.input_tokens) == (3, 1, 1200)
        assert stored.attributes == {"feature": "chat", "tenant_id": "acme"}
        spans = t.spans(cfg["run_id"])
        assert len(spans) == 4 and {s["tenant_id"] for s in spans} == {"acme"}
        assert sorted(s["flags"] or "" for s in spans) == ["", "", "manual", "manual"]


def test_record_joins_an_open_run_live(database_url: str) -> None:
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t:
        with t.run(feature="agent", tenant_id="acme") as run:
            rc = t.record_usage(model=MODEL, input_tokens=1000, output_tokens=100, run_id=run.run_id,
                                feature="ignored")  # an open run keeps its attribution
            assert rc.status == "running" and rc.cost_usd == Decimal("0.0028")
            t.record_cost(usd="0.5", name="api", run_id=run.run_id)
            live = run.cost
            assert live is not None and live.cost_usd == Decimal("0.5028") and live.status == "running"
        t.flush()
        stored = t.run_cost(run.run_id)
        assert stored is not None and stored.cost_usd == Decimal("0.5028") and stored.status == "ok"
        assert {s["feature"] for s in t.spans(run.run_id)} == {"agent"}


def test_record_continues_a_run_stored_by_another_process(database_url: str) -> None:
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t:
        rid = t.record_cost(usd="1.5", name="api", feature="f").run_id
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t2:
        part = t2.record_cost(usd="0.25", name="api", run_id=rid, feature="f")
        assert part.cost_usd == Decimal("0.25")  # this process's part; the database has the whole
        stored = t2.run_cost(rid)
        assert stored is not None and stored.cost_usd == Decimal("1.75") and stored.tool_calls == 2


def test_record_past_its_runs_budget_aborts_the_run_not_the_record(cost_tracker_factory: Any,
                                                                   stub_openai: StubOpenAI) -> None:
    t = cost_tracker_factory(prices=PRICES)
    with t.run(feature="agent", budget={"max_cost_usd": "0.01"}) as run:
        rc = t.record_cost(usd="0.02", name="api", run_id=run.run_id)  # recorded, not raised
        assert rc.status == "aborted" and rc.cost_usd == Decimal("0.02")
        with pytest.raises(BudgetExceededError):
            # the run's next call is refused before it is sent
            lc_call(t, stub_openai, 10, 2, {"callbacks": [t.langchain_handler()]})
    assert stub_openai.count() == 0
    t.flush()
    stored = t.run_cost(run.run_id)
    assert stored is not None and stored.status == "aborted" and stored.cost_usd == Decimal("0.02")


def test_required_attribution_is_checked_before_recording(cost_tracker_factory: Any) -> None:
    t = cost_tracker_factory(require=("tenant_id",))
    with pytest.raises(ConfigurationError, match="tenant_id"):
        t.record_cost(usd="1", name="api", feature="f")
    ok = t.record_cost(usd="1", name="api", tenant_id="acme")
    t.record_cost(usd="2", name="api", run_id=ok.run_id)  # adds to a run that has it
    t.flush()
    assert t.spend() == Decimal(3) and t.stats["failed"] == 0
    assert [r.cost_usd for r in t.top_runs()] == [Decimal(3)]


_NAIVE = datetime(2026, 10, 1, 12, 0)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"input_tokens": -1}, "input_tokens"),
    ({"output_tokens": -5}, "output_tokens"),
    ({"cache_read_tokens": -1}, "cache_read_tokens"),
    ({"cache_write_tokens": -1}, "cache_write_tokens"),
    ({"reasoning_tokens": -1}, "reasoning_tokens"),
    ({"input_tokens": 1.5}, "input_tokens"),
    ({"input_tokens": "10"}, "input_tokens"),
    ({"input_tokens": True}, "input_tokens"),
    ({"output_tokens": None}, "output_tokens"),
    ({"input_tokens": 10**9 + 1}, "input_tokens"),
    ({"cache_read_tokens": 80, "cache_write_tokens": 30}, "cache_read_tokens \\+ cache_write_tokens"),
    ({"reasoning_tokens": 11}, "reasoning_tokens"),
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"provider": 3}, "provider"),
    ({"at": _NAIVE}, "at must be timezone-aware"),
    ({"at": "2026-10-01"}, "at must be a datetime"),
    ({"at": _NAIVE.date()}, "at must be a datetime"),
    ({"run_id": ""}, "run_id"),
    ({"run_id": "r" * 65}, "run_id"),
    ({"run_id": 12}, "run_id"),
    ({"run_id": "a\x00b"}, "run_id"),
    ({"feature": ["a"]}, "feature"),
    ({"tenant_id": {"id": 1}}, "tenant_id"),
    ({"user_id": b"alice"}, "user_id"),
    ({"shard": object()}, "shard"),
    ({"user": "alice"}, "'user'"),
    ({"user_hash": "x"}, "'user_hash'"),
    ({"costobs_budget": {"max_cost_usd": 1}}, "costobs_budget"),
    ({"ls_provider": "x"}, "ls_provider"),
])
def test_bad_record_usage_arguments_name_themselves(cost_tracker_factory: Any, kwargs: dict[str, Any],
                                                    named: str) -> None:
    t = cost_tracker_factory(prices=PRICES)
    args: dict[str, Any] = {"model": MODEL, "input_tokens": 100, "output_tokens": 10, **kwargs}
    with pytest.raises(ConfigurationError, match=named):
        t.record_usage(**args)
    assert t.ledger.runs == {} and t.ledger.recent == {} and t.stats["pending"] == 0
    t.flush()
    assert t.top_runs() == [] and t.spend() == 0


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"usd": -0.01}, "usd must be 0 or more"),
    ({"usd": Decimal("-1")}, "usd must be 0 or more"),
    ({"usd": float("nan")}, "usd must be a finite"),
    ({"usd": float("inf")}, "usd must be a finite"),
    ({"usd": Decimal("NaN")}, "usd must be a finite"),
    ({"usd": Decimal("sNaN")}, "usd must be a finite"),
    ({"usd": Decimal("Infinity")}, "usd must be a finite"),
    ({"usd": "Infinity"}, "usd must be a finite"),
    ({"usd": "lots"}, "usd must be a number"),
    ({"usd": None}, "usd must be"),
    ({"usd": True}, "usd must be"),
    ({"usd": 10**11}, "usd is too large"),
    ({"name": ""}, "name"),
    ({"name": 5}, "name"),
    ({"at": _NAIVE}, "at must be timezone-aware"),
    ({"run_id": b"x"}, "run_id"),
    ({"tier": [1]}, "tier"),
])
def test_bad_record_cost_arguments_name_themselves(cost_tracker_factory: Any, kwargs: dict[str, Any],
                                                   named: str) -> None:
    t = cost_tracker_factory()
    args: dict[str, Any] = {"usd": "0.5", "name": "api", **kwargs}
    with pytest.raises(ConfigurationError, match=named):
        t.record_cost(**args)
    assert t.ledger.runs == {} and t.ledger.recent == {}
    t.flush()
    assert t.top_runs() == [] and t.spend() == 0


def test_record_ids_and_attribute_values_as_elsewhere(cost_tracker_factory: Any) -> None:
    t = cost_tracker_factory()
    rid = uuid.uuid4()
    a = t.record_cost(usd="1", name="api", run_id=rid, feature="f", tenant_id=42, ratio=0.5, on=True, none=None)
    assert a.run_id == str(rid)
    assert a.attributes == {"feature": "f", "tenant_id": "42", "ratio": 0.5, "on": True}
    t.flush()
    assert t.run_cost(rid, where={"tenant_id": "42"}) is not None


def test_a_closed_tracker_refuses_records(database_url: str) -> None:
    t = CostTracker(database_url, user_salt="s")
    t.close()
    with pytest.raises(ConfigurationError, match="record_usage: this tracker is closed"):
        t.record_usage(model="gpt-4o", input_tokens=1, output_tokens=1)
    with pytest.raises(ConfigurationError, match="record_cost: this tracker is closed"):
        t.record_cost(usd=1, name="api")


def test_a_backdated_record_is_priced_as_of_its_moment(cost_tracker_factory: Any) -> None:
    """o3 went from $10 / $40 to $2 / $8 per million on 2025-06-10 (the catalog's effective dates)."""
    t = cost_tracker_factory()
    before = t.record_usage(model="o3", provider="openai", input_tokens=1_000_000, output_tokens=1000,
                            at=datetime(2025, 6, 9, 23, 59, tzinfo=UTC))
    after = t.record_usage(model="o3", provider="openai", input_tokens=1_000_000, output_tokens=1000,
                           at=datetime(2025, 6, 10, tzinfo=UTC))
    now = t.record_usage(model="o3", provider="openai", input_tokens=1_000_000, output_tokens=1000)
    assert before.cost_usd == Decimal("10.04") and after.cost_usd == Decimal("2.008")
    assert now.cost_usd == Decimal(t.prices.price_nanos("o3", "openai", (1_000_000, 1000, 0, 0, 0))[0]).scaleb(-9)
    t.flush()
    assert [s["price_input"] for s in t.spans(before.run_id) + t.spans(after.run_id)] == ["10", "2"]


def test_concurrent_records_of_one_run_all_count(cost_tracker_factory: Any) -> None:
    import threading

    t = cost_tracker_factory(prices=PRICES)
    rid = "shared-run"
    t.record_cost(usd="0", name="open", run_id=rid, feature="f")
    barrier = threading.Barrier(8)

    def work(k: int) -> None:
        barrier.wait()
        for i in range(150):
            if i % 2:
                t.record_cost(usd="0.001", name="api", run_id=rid)
            else:
                t.record_usage(model=MODEL, input_tokens=1000, output_tokens=100, run_id=rid)
            t.record_cost(usd="0.5", name="own", feature="g")  # a run of its own each time

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.flush()
    rc = t.run_cost(rid)
    assert rc is not None and (rc.llm_calls, rc.tool_calls) == (8 * 75, 1 + 8 * 75)
    assert rc.cost_usd == 8 * 75 * (Decimal("0.001") + Decimal("0.0028"))
    assert rc.attributes == {"feature": "f"} and rc.status == "ok"
    assert t.spend(where={"feature": "g"}) == Decimal("0.5") * 8 * 150
    assert len(t.top_runs(n=10_000, where={"feature": "g"})) == 8 * 150
    assert t.stats["failed"] == 0 and t.ledger.runs == {}
