"""One bad value never sinks a batch: a figure past BIGINT or text the database cannot encode is stored
sanitised and flagged, what the database still refuses is lost alone and counted. Real path: ChatOpenAI
against the stub server, a ``CostTracker`` on SQLite and on PostgreSQL, all 201 spans in one batch.

Most bad values are made to fit before they reach the store (attribution text in the ledger, usage counts where
they are parsed); the store fits the rest (a served model's name) and whatever reaches it through the ledger's
own API (figures past BIGINT are made here that way: ``Ledger.start`` / ``end_llm`` with the counts given)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from langchain_openai import ChatOpenAI

from costobs_callbacks import CostTracker
from costobs_callbacks._events import TokenUsage

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-sound"
PRICES = {MODEL: {"input": "2", "output": "8"}}
BIG = 2**63 - 1
GOOD = 200


def usd(inp: int, out: int) -> Decimal:
    raw = (inp * Decimal(PRICES[MODEL]["input"]) + out * Decimal(PRICES[MODEL]["output"])) / Decimal(1_000_000)
    return raw.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)


def chat(stub: StubOpenAI) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0)


# what the bad call is: (its reply, its attribution)
BAD: dict[str, tuple[StubReply, dict[str, str]]] = {
    "surrogate-feature": (StubReply("ok", usage=StubUsage(10, 2)), {"feature": "bad\udcff"}),
    "surrogate-attribute": (StubReply("ok", usage=StubUsage(10, 2)), {"feature": "bad", "note": "x\udcff\U0001f600"}),
    "surrogate-model": (StubReply("ok", usage=StubUsage(10, 2), model="m\udcffx"), {"feature": "bad"}),
    "implausible-usage": (StubReply("ok", usage=StubUsage(5 * 10**15, 0)), {"feature": "bad"}),
    "cost-past-bigint": (StubReply("unused"), {"feature": "bad"}),  # 5 * 10^15 tokens: 10^19 nano-USD
    "tokens-past-bigint": (StubReply("unused"), {"feature": "bad"}),
}
DIRECT = {"cost-past-bigint": (10, 0, 0, 0, 0), "tokens-past-bigint": (2**64, 3, 0, 0, 0)}
"""Figures handed to the ledger as they are (no provider payload parsed): what the store must fit itself. Pricing
counts at most 10^9 tokens of a kind, so a cost past BIGINT comes from a cost reported at run time (``add_cost``)."""
SANITISED_BY_STORE = {"surrogate-model", "cost-past-bigint", "tokens-past-bigint"}


@pytest.mark.parametrize("case", list(BAD))
def test_one_bad_span_among_200_good_ones_costs_nothing_else(database_url: str, stub_openai: StubOpenAI,
                                                             case: str) -> None:
    reply, attribution = BAD[case]
    # one batch: nothing is written before the flush
    with CostTracker(database_url, user_salt="s", prices=PRICES, export_delay=3600) as tracker:
        llm = chat(stub_openai)
        good_ids = []
        for i in range(GOOD):
            if i == GOOD // 2:
                bad_cfg = tracker.config(**attribution)
                if case in DIRECT:
                    tracker.ledger.start_llm(bad_cfg["run_id"], None, "ChatOpenAI", bad_cfg["metadata"], MODEL, None)
                    if case == "cost-past-bigint":
                        tracker.ledger.add_cost(bad_cfg["run_id"], 10**19)
                    tracker.ledger.end_llm(bad_cfg["run_id"].int, DIRECT[case], MODEL)
                else:
                    stub_openai.enqueue(reply)
                    llm.invoke("hi", config=bad_cfg)
            stub_openai.enqueue(StubReply("ok", usage=StubUsage(10, 2)))
            cfg = tracker.config(feature="good")
            llm.invoke("hi", config=cfg)
            good_ids.append(cfg["run_id"])
        assert tracker.exporter.pending() == GOOD + 1
        assert tracker.flush(30)
        stats = tracker.stats
        assert (stats["exported"], stats["failed"], stats["refused"], stats["retries"]) == (GOOD + 1, 0, 0, 0)
        assert stats["sanitized"] == (1 if case in SANITISED_BY_STORE else 0)

        (row,) = tracker.rollup(by=["feature"], where={"feature": "good"})
        assert (row.cost_usd, row.llm_calls, row.runs) == (GOOD * usd(10, 2), GOOD, GOOD)
        assert (row.input_tokens, row.output_tokens) == (GOOD * 10, GOOD * 2)
        for rid in good_ids[::37]:
            rc = tracker.run_cost(rid)
            assert rc is not None and (rc.cost_usd, rc.input_tokens, rc.output_tokens) == (usd(10, 2), 10, 2)
        with tracker.store.engine.connect() as conn:
            n, total = conn.execute(sa.text(
                "SELECT COUNT(*), SUM(cost_nanos) FROM costobs_runs WHERE feature = 'good'")).one()
        assert (n, int(total)) == (GOOD, GOOD * int(usd(10, 2) * 10**9))

        (span,) = tracker.spans(bad_cfg["run_id"])
        assert ("implausible" if case == "implausible-usage" else "sanitized") in span["flags"].split(",")
        rc = tracker.run_cost(bad_cfg["run_id"])
        assert rc is not None
        if case == "surrogate-feature":
            assert span["feature"] == rc.attributes["feature"] == "bad\ufffd"
            assert rc.cost_usd == usd(10, 2)
        elif case == "surrogate-attribute":
            assert rc.attributes == {"feature": "bad", "note": "x\ufffd\U0001f600"}
            assert rc.cost_usd == usd(10, 2)
        elif case == "surrogate-model":
            assert span["model"] == "m\ufffdx" and rc.unpriced_models == ("m\ufffdx",)
            assert (rc.input_tokens, rc.unpriced_calls) == (10, 1)
        elif case == "implausible-usage":  # counts past 10^9 are held there where usage is read
            assert (span["input_tokens"], span["cost_nanos"]) == (10**9, int(usd(10**9, 0) * 10**9))
            assert rc.cost_usd == usd(10**9, 0) and rc.input_tokens == 10**9
        elif case == "cost-past-bigint":
            assert (span["cost_nanos"], span["input_tokens"]) == (BIG, 10)
            assert rc.cost_usd == Decimal(BIG).scaleb(-9) and rc.input_tokens == 10
        else:
            assert (span["input_tokens"], span["output_tokens"], span["cost_nanos"]) == (BIG, 3, 2_000_000_024_000)
            assert (rc.input_tokens, rc.output_tokens) == (BIG, 3)
        # a group holding a clamped figure still sums (SQLite's SUM() raises on an overflow)
        everything = tracker.rollup(by=())
        assert everything[0].llm_calls == GOOD + 1


def test_a_run_saturates_instead_of_overflowing(database_url: str, stub_openai: StubOpenAI) -> None:
    """Two calls of one run, each past BIGINT, written in two batches: the run's stored total stays at the
    ceiling (an overflowing ``total + delta`` would refuse every later span of the run)."""
    with CostTracker(database_url, user_salt="s", prices=PRICES, export_delay=3600) as tracker:
        rid = uuid.uuid4()
        llm = chat(stub_openai)
        for _ in range(2):
            with tracker.run(feature="huge", run_id=rid):  # figures given to the ledger as they are
                key = uuid.uuid4()
                tracker.ledger.start_llm(key, None, "ChatOpenAI", None, MODEL, None)
                tracker.ledger.add_cost(key, 5 * 10**18)  # priced: 10^9 tokens at most, $2,000
                tracker.ledger.end_llm(key.int, (5 * 10**15, 0, 0, 0, 0), MODEL)
            assert tracker.flush(10)
        stub_openai.enqueue(StubReply("ok", usage=StubUsage(10, 2)))
        with tracker.run(feature="huge", run_id=rid):
            llm.invoke("hi", config={"callbacks": [tracker.langchain_handler()]})
        assert tracker.flush(10)
        assert (tracker.stats["failed"], tracker.stats["retries"]) == (0, 0)
        rc = tracker.store.run_cost(str(rid))
        assert rc is not None
        assert (rc.cost_usd, rc.input_tokens, rc.llm_calls) == (Decimal(BIG).scaleb(-9), 10**16 + 10, 3)
        spans = tracker.spans(rid)
        assert sum(1 for s in spans if s["kind"] == "llm") == 3
        # the rollup sums past 64 bits exactly (SQLite's SUM() would raise), most expensive first
        stub_openai.enqueue(StubReply("ok", usage=StubUsage(10, 2)))
        llm.invoke("hi", config=tracker.config(feature="small"))
        rows = tracker.rollup(by=["feature"])
        assert [(r.key["feature"], r.cost_usd, r.input_tokens) for r in rows] == [
            ("huge", Decimal(2 * (5 * 10**18 + 2 * 10**12) + 36_000).scaleb(-9), 10**16 + 10),
            ("small", usd(10, 2), 10)]


def test_what_the_database_still_refuses_is_lost_alone(tmp_path: Any, stub_openai: StubOpenAI) -> None:
    """A row refused for its content even after sanitising (here a trigger) is isolated by bisection: only
    it is lost, counted as refused, and its 200 batch-mates are stored."""
    with CostTracker(f"sqlite:///{tmp_path}/c.db", user_salt="s", prices=PRICES, export_delay=3600) as tracker:
        with tracker.store.engine.begin() as conn:
            conn.execute(sa.text(
                "CREATE TRIGGER refuse BEFORE INSERT ON costobs_spans WHEN NEW.feature = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        llm = chat(stub_openai)
        for i in range(GOOD + 1):
            stub_openai.enqueue(StubReply("ok", usage=StubUsage(10, 2)))
            llm.invoke("hi", config=tracker.config(feature="poison" if i == 7 else "good"))
        assert tracker.flush(30)
        stats = tracker.stats
        assert (stats["exported"], stats["failed"], stats["refused"], stats["retries"]) == (GOOD, 1, 1, 0)
        (row,) = tracker.rollup(by=["feature"])
        assert (row.key, row.cost_usd, row.llm_calls) == ({"feature": "good"}, GOOD * usd(10, 2), GOOD)


def test_text_too_long_for_its_column_is_cut_on_postgresql(postgres_database: Callable[[], str]) -> None:
    """A value longer than its column (here a run id from the ledger's own API, which takes any text) is refused
    by PostgreSQL; it is stored cut to the column and flagged, and its batch-mates are stored as they are."""
    with CostTracker(postgres_database(), user_salt="s", prices=PRICES, export_delay=3600) as t:
        ledger = t.ledger
        for rid in ("r" * 80, "fine"):
            ledger.start_llm(f"s-{rid}", None, "ChatOpenAI", {"feature": "f"}, MODEL, "openai", root=True,
                             run_id=rid)
            ledger.end(f"s-{rid}", "ok", None, TokenUsage(10, 2))
        assert t.flush(10)
        assert (t.stats["exported"], t.stats["failed"], t.stats["sanitized"]) == (2, 0, 1)
        (cut,) = t.spans("r" * 64)
        assert "sanitized" in cut["flags"] and cut["cost_nanos"] == 36_000
        (fine,) = t.spans("fine")
        assert fine["flags"] is None and fine["cost_nanos"] == 36_000
        rc = t.run_cost("r" * 64)
        assert rc is not None and rc.cost_usd == usd(10, 2)
