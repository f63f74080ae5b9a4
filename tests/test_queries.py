"""Query arguments: every bad one is a ``ConfigurationError`` naming it, before the database is asked; odd
but valid ones (naive times, ``None`` in a list, text as the ledger stores it) give exact answers on every
backend. Spans come from real ChatOpenAI calls to the stub server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest
from langchain_openai import ChatOpenAI

from costobs_callbacks import ConfigurationError, CostTracker

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-query"
PRICES = {MODEL: {"input": "2", "output": "8"}}


def usd(inp: int, out: int) -> Decimal:
    raw = (inp * Decimal(2) + out * Decimal(8)) / Decimal(1_000_000)
    return raw.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)


def call(tracker: CostTracker, stub: StubOpenAI, inp: int, out: int, **attribution: Any) -> Any:
    stub.enqueue(StubReply("ok", usage=StubUsage(inp, out)))
    cfg = tracker.config(**attribution)
    ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0).invoke("hi", config=cfg)
    return cfg["run_id"]


@pytest.fixture
def tracker(cost_tracker_factory: Any, stub_openai: StubOpenAI) -> CostTracker:
    t: CostTracker = cost_tracker_factory(prices=PRICES)
    call(t, stub_openai, 10, 2, feature="f")
    return t


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"where": {"feature": {"a": 1}}}, r"where\['feature'\]"),
    ({"where": {"feature": 3}}, r"where\['feature'\]"),
    ({"where": {"feature": ["a", 3]}}, r"where\['feature'\]"),
    ({"where": {"nope": "a"}}, "'nope' in where"),
    ({"where": {("feature",): "a"}}, "in where"),
    ({"where": ["feature"]}, "where must be a mapping"),
    ({"since": "yesterday"}, "since must be a datetime"),
    ({"until": 123}, "until must be a datetime"),
    ({"since": datetime(2026, 1, 1).date()}, "since must be a datetime"),
    ({"since": datetime(2026, 1, 2, tzinfo=UTC), "until": datetime(2026, 1, 1)}, "since .* is after until"),
    ({"by": None}, "by must be"),
    ({"by": 7}, "by must be"),
    ({"by": [["feature"]]}, r"\['feature'\] in by"),
    ({"by": ["feature", "feature"]}, "duplicate rollup key in by"),
    ({"by": {"feature": 1}}, "by must be"),
    ({"bucket": "week"}, "bucket must be"),
])
def test_bad_rollup_arguments_name_themselves(tracker: CostTracker, kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        tracker.rollup(**kwargs)


@pytest.mark.parametrize("run_id", [None, 123, b"abc", "", "r" * 65, "a\x00b", {"id": 1}, ["x"]],
                         ids=["none", "int", "bytes", "empty", "too-long", "nul", "dict", "list"])
def test_bad_run_ids_name_themselves(tracker: CostTracker, run_id: Any) -> None:
    with pytest.raises(ConfigurationError, match="run_id"):
        tracker.run_cost(run_id)
    with pytest.raises(ConfigurationError, match="run_id"):
        tracker.spans(run_id)


def test_unknown_run_ids_are_none(tracker: CostTracker) -> None:
    assert tracker.run_cost("never-seen") is None and tracker.spans("never-seen") == []
    assert tracker.run_cost(uuid.uuid4()) is None and tracker.run_cost("r" * 64) is None


def test_naive_times_are_utc(tracker: CostTracker, stub_openai: StubOpenAI) -> None:
    now = datetime.now(UTC)
    naive = now.replace(tzinfo=None)
    plus5 = timezone(timedelta(hours=5))
    one = [usd(10, 2)]
    assert [r.cost_usd for r in tracker.rollup(since=naive - timedelta(minutes=5))] == one
    assert [r.cost_usd for r in tracker.rollup(since=(now - timedelta(minutes=5)).astimezone(plus5))] == one
    assert tracker.rollup(since=naive + timedelta(minutes=5)) == []
    assert tracker.rollup(until=naive - timedelta(minutes=5)) == []
    assert tracker.rollup(until=(now - timedelta(minutes=5)).astimezone(plus5)) == []
    # the naive moment read as local time would be hours away on any machine not on UTC: pinned as UTC
    window = tracker.rollup(since=naive - timedelta(minutes=5), until=naive + timedelta(minutes=5))
    assert [r.cost_usd for r in window] == one
    assert tracker.rollup(since=naive, until=naive) == []  # an empty window is a question, not an error


def test_where_values_match_as_stored(database_url: str, stub_openai: StubOpenAI) -> None:
    with CostTracker(database_url, user_salt="s", prices=PRICES) as t:
        call(t, stub_openai, 10, 2, feature="f", route="r1")
        call(t, stub_openai, 20, 4, feature="f")
        call(t, stub_openai, 30, 6, feature="bad\udcff", route="a\x00b")
        call(t, stub_openai, 40, 8, feature="long" + "x" * 400)

        def cost(**where: Any) -> Decimal:
            return sum((r.cost_usd for r in t.rollup(by=(), where=where)), Decimal(0))

        assert cost(route=["r1", None]) == usd(10, 2) + usd(20, 4) + usd(40, 8)
        assert cost(route=[None]) == cost(route=None) == usd(20, 4) + usd(40, 8)
        assert cost(route=("r1",)) == cost(route="r1") == usd(10, 2)
        assert t.rollup(by=["feature"], where={"route": []}) == []
        # text as the store keeps it: NULs dropped, lone surrogates U+FFFD, cut to 256 characters
        assert cost(route="a\x00b") == cost(route="ab") == usd(30, 6)
        assert cost(feature="bad\udcff") == cost(feature="bad\ufffd") == usd(30, 6)
        assert cost(feature="long" + "x" * 400) == cost(feature=("long" + "x" * 400)[:256]) == usd(40, 8)
        assert cost(feature={"f", "nothing"}) == usd(10, 2) + usd(20, 4)
        assert cost() == usd(10, 2) + usd(20, 4) + usd(30, 6) + usd(40, 8)
