"""The shortcuts of the handler's hot path give the same answers as the full path.

A run's attribution is remembered per distinct metadata values; LangChain's run ids are keyed by their
integers; ended runs are forgotten in batches; a new run's first model call skips checks that cannot refuse
it. Each test drives real ``ChatOpenAI`` calls through the stub server and checks the figures the slow path
would give.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import uuid
from decimal import Decimal
from typing import Any

import pytest
from langchain_openai import ChatOpenAI

from costobs_callbacks import Budget, BudgetExceededError, CostTracker, LoopPolicy, RunCost
from costobs_callbacks._ledger import core as ledger_mod

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-hot"
PRICES = {MODEL: {"input": "2", "output": "8"}}


def usd(inp: int, out: int) -> Decimal:
    return (inp * Decimal(2) + out * Decimal(8)) / Decimal(1_000_000)


def chat(stub: StubOpenAI, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0, **kw)


def rc(tracker: CostTracker, run_id: Any) -> RunCost:
    out = tracker.run_cost(run_id)
    assert out is not None
    return out


def user_hash(uid: str) -> str:
    return hmac.new(b"test-salt", uid.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def tracker(cost_tracker_factory) -> CostTracker:
    return cost_tracker_factory(prices=PRICES)


class Tier(enum.Enum):
    GOLD = "gold"


def test_remembered_attribution_equals_the_full_path_for_every_value_kind(tracker, stub_openai):
    """The same metadata twice (remembered), then values the memo must not confuse: another user, an int and a
    bool that are equal as keys, a float, an enum, a value that is not an attribute at all, and NUL bytes."""
    llm = chat(stub_openai)
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"feature": "f", "user_id": "u-1", "tenant_id": "t"}, {"feature": "f", "user": user_hash("u-1"),
                                                                "tenant_id": "t"}),
        ({"feature": "f", "user_id": "u-1", "tenant_id": "t"}, {"feature": "f", "user": user_hash("u-1"),
                                                                "tenant_id": "t"}),
        ({"feature": "f", "user_id": "u-2", "tenant_id": "t"}, {"feature": "f", "user": user_hash("u-2"),
                                                                "tenant_id": "t"}),
        ({"feature": "f", "shard": 1}, {"feature": "f", "shard": 1}),
        ({"feature": "f", "shard": True}, {"feature": "f", "shard": True}),
        ({"feature": "f", "shard": 1.5}, {"feature": "f", "shard": 1.5}),
        ({"feature": "f", "shard": Tier.GOLD}, {"feature": "f"}),  # an object is not an attribute value
        ({"feature": "f", "shard": ["a"]}, {"feature": "f"}),
        ({"feature": 7, "route": "r"}, {"feature": "7", "route": "r"}),
        ({"feature": "f\x00x", "route": "r\x00"}, {"feature": "fx", "route": "r"}),
        ({"feature": "", "tenant_id": "t"}, {"feature": "unattributed", "tenant_id": "t"}),
        ({"tenant_id": "t"}, {"feature": "unattributed", "tenant_id": "t"}),
        ({"feature": "f", "user_id": 42}, {"feature": "f", "user": user_hash("42")}),
    ]
    stub_openai.enqueue(*[StubReply("ok", usage=StubUsage(10, 2)) for _ in cases])
    for meta, expected in cases:
        rid = uuid.uuid4()
        llm.invoke("hi", config={"callbacks": [tracker.langchain_handler()], "metadata": meta, "run_id": rid})
        got = rc(tracker, rid)
        assert got.attributes == expected, meta
        assert got.cost_usd == usd(10, 2)


def test_a_policy_in_metadata_still_applies_when_its_attribution_is_remembered(tracker, stub_openai):
    llm = chat(stub_openai)
    stub_openai.enqueue(*[StubReply("ok", usage=StubUsage(100, 10)) for _ in range(4)])
    for _ in range(2):  # the second run reuses what the first worked out
        cfg = tracker.config(feature="p", budget=Budget(max_llm_calls=1))
        llm.invoke("one", config=cfg)
        with pytest.raises(BudgetExceededError):
            llm.invoke("two", config=cfg)
        got = rc(tracker, cfg["run_id"])
        assert (got.status, got.reason, got.llm_calls, got.cost_usd) == ("aborted", "max_llm_calls", 1, usd(100, 10))
    assert len(stub_openai.requests) == 2


def test_run_ids_as_uuid_text_or_other_text_name_the_same_runs(tracker, stub_openai):
    llm = chat(stub_openai)
    stub_openai.enqueue(StubReply("a", usage=StubUsage(10, 1)), StubReply("b", usage=StubUsage(20, 2)))
    cfg = tracker.config(feature="k")
    llm.invoke("hi", config=cfg)
    rid = cfg["run_id"]
    live = tracker.ledger.recent_run(str(rid))
    assert live is not None and live.run_id == str(rid)
    assert tracker.ledger.recent_run(str(rid).upper()) is live
    # the same run continued with the id given as text
    llm.invoke("again", config={**cfg, "run_id": uuid.UUID(str(rid))})
    for key in (rid, str(rid), str(rid).upper()):
        got = rc(tracker, key)
        assert (got.llm_calls, got.cost_usd, got.run_id) == (2, usd(10, 1) + usd(20, 2), str(rid))
    # a tracker.run() scope named by a text that is not a UUID
    stub_openai.enqueue(StubReply("c", usage=StubUsage(5, 5)))
    with tracker.run(feature="k", run_id="batch-7") as scope:
        llm.invoke("hi", config={"callbacks": [tracker.langchain_handler()]})
    assert scope.run_id == "batch-7"
    assert rc(tracker, "batch-7").cost_usd == usd(5, 5)


def test_ended_runs_are_forgotten_by_the_exporter_and_the_newest_continue(tracker, stub_openai, monkeypatch):
    """Ended runs are remembered (a second invocation with the same run_id continues one) and forgotten oldest
    first: by the exporter's thread after each batch, or by the app's at a hard cap should the exporter stall."""
    monkeypatch.setattr(ledger_mod, "_RECENT_RUNS", 8)
    monkeypatch.setattr(ledger_mod, "_RECENT_HARD_CAP", 16)
    llm = chat(stub_openai)
    n = 30
    stub_openai.enqueue(*[StubReply("ok", usage=StubUsage(10, 1)) for _ in range(n + 1)])
    cfgs = [tracker.config(feature="lru") for _ in range(n)]
    for cfg in cfgs:
        llm.invoke("hi", config=cfg)
        assert len(tracker.ledger.recent) <= 16
    assert tracker.flush(5)
    remembered = [c["run_id"] for c in cfgs if tracker.ledger.recent_run(c["run_id"]) is not None]
    assert remembered == [c["run_id"] for c in cfgs[-8:]]
    # the newest continues in memory; the figures agree with the database either way
    llm.invoke("more", config=cfgs[-1])
    assert rc(tracker, cfgs[-1]["run_id"]).llm_calls == 2
    assert tracker.flush(5)
    oldest = tracker.run_cost(cfgs[0]["run_id"])
    assert oldest is not None and (oldest.llm_calls, oldest.status) == (1, "ok")


@pytest.mark.parametrize("loops", [None, LoopPolicy(enabled=False), LoopPolicy(max_identical_model_requests=2)])
def test_first_call_shortcut_counts_the_call_like_the_full_path(cost_tracker_factory, stub_openai, loops):
    """A new run whose root is a model call skips the checks that cannot refuse it, and is still counted: the
    same figures as any other call, and a continued run keeps counting from there."""
    tracker = cost_tracker_factory(prices=PRICES, loops=loops)
    llm = chat(stub_openai)
    stub_openai.enqueue(*[StubReply("same", usage=StubUsage(10, 1)) for _ in range(3)])
    cfg = tracker.config(feature="first")
    for i in range(3):  # identical requests, each its own invocation of one run: never a loop
        llm.invoke("the same prompt", config=cfg)
        got = rc(tracker, cfg["run_id"])
        assert (got.llm_calls, got.cost_usd, got.status) == (i + 1, (i + 1) * usd(10, 1), "ok")
    assert len(stub_openai.requests) == 3


def test_first_call_with_a_budget_is_refused_by_its_estimate(cost_tracker_factory, stub_openai):
    """With a budget the first call's cost estimate is checked before it is sent: this one cannot fit (its prompt
    plus max_tokens=1000 at $8 per million output tokens, past $0.001)."""
    tracker = cost_tracker_factory(prices=PRICES, budget=Budget(max_cost_usd=Decimal("0.001")))
    cfg = tracker.config(feature="first")
    with pytest.raises(BudgetExceededError):
        chat(stub_openai, max_tokens=1000).invoke("hi", config=cfg)
    assert stub_openai.requests == []
    got = rc(tracker, cfg["run_id"])
    assert (got.status, got.llm_calls, got.cost_usd) == ("aborted", 0, Decimal(0))


@pytest.mark.parametrize("budget", [
    Budget(max_cost_usd=Decimal("0.01"), max_llm_calls=2, max_tokens=10_000),
    Budget(max_cost_usd=Decimal("0.01"), max_seconds=60),  # max_seconds: the full checks
])
def test_first_call_with_a_budget_that_fits_holds_its_estimate_until_it_ends(cost_tracker_factory, stub_openai,
                                                                            budget):
    """A first call that fits holds its estimate of the run's budget while in flight and gives it back when it
    ends, whichever path it took; the run then counts on from the call."""
    tracker = cost_tracker_factory(prices=PRICES, budget=budget)
    stub_openai.enqueue(StubReply("ok", usage=StubUsage(10, 5)), StubReply("ok", usage=StubUsage(10, 5)))
    cfg = tracker.config(feature="fits")
    held = []
    real_end = tracker.ledger.end_llm

    def spy(key: Any, *a: Any) -> Any:
        held.append(tracker.ledger.spans[key].run.reserved_nanos)
        return real_end(key, *a)

    tracker.ledger.end_llm = spy  # type: ignore[method-assign]
    llm = chat(stub_openai, max_tokens=100)
    llm.invoke("hi", config=cfg)
    run = tracker.ledger.recent_run(cfg["run_id"])
    assert run is not None and held[0] > 0 and run.reserved_nanos == 0
    got = rc(tracker, cfg["run_id"])
    assert (got.status, got.llm_calls, got.cost_usd) == ("ok", 1, usd(10, 5))
    llm.invoke("again", config=cfg)
    assert (rc(tracker, cfg["run_id"]).llm_calls, run.reserved_nanos) == (2, 0)


def test_max_llm_calls_on_a_run_continued_by_direct_model_calls(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=PRICES)
    llm = chat(stub_openai)
    stub_openai.enqueue(*[StubReply("ok", usage=StubUsage(10, 1)) for _ in range(3)])
    cfg = tracker.config(feature="cap", budget=Budget(max_llm_calls=2))
    llm.invoke("a", config=cfg)
    llm.invoke("b", config=cfg)
    with pytest.raises(BudgetExceededError):
        llm.invoke("c", config=cfg)
    assert len(stub_openai.requests) == 2
    assert rc(tracker, cfg["run_id"]).llm_calls == 2


def test_run_ids_made_here_are_time_ordered_uuid7(tracker):
    """``tracker.config()`` and ``tracker.run()`` make LangChain-style UUIDv7 ids: time-ordered (kind to the
    database's indexes) and made without a system call (``uuid4``'s ``os.urandom`` gives up the GIL on every
    call, and a CPU-bound app doing so starves the exporter's thread of it)."""
    ids = [tracker.config(feature="x")["run_id"] for _ in range(50)]
    assert all(isinstance(i, uuid.UUID) and i.version == 7 for i in ids)
    stamps = [i.int >> 80 for i in ids]  # the 48-bit millisecond timestamp
    assert stamps == sorted(stamps) and len(set(ids)) == 50
    with tracker.run(feature="x") as scope:
        pass
    assert uuid.UUID(scope.run_id).version == 7


def test_identical_requests_from_concurrent_invocations_of_one_run_are_counted(tracker, stub_openai):
    """Invocations of one run overlap: a root call that ends while another root of its run is still open counts
    its request for the loop guard (its signature was deferred to its end), so the third identical request of
    the run is refused before it is sent (the default max_identical_model_requests=3); and no call's cost is
    lost although the overlapping roots share one span id."""
    import threading
    import time as _time

    from costobs_callbacks import LoopDetectedError

    llm = chat(stub_openai)
    stub_openai.enqueue(StubReply("slow", usage=StubUsage(10, 1), delay_s=1.5),
                        StubReply("a", usage=StubUsage(10, 1)), StubReply("b", usage=StubUsage(10, 1)))
    cfg = tracker.config(feature="overlap")
    outcome: list[Any] = []

    def slow_call() -> None:
        try:
            outcome.append(llm.invoke("the same prompt", config=cfg).content)
        except BaseException as exc:  # reported by the assertion below
            outcome.append(exc)

    slow = threading.Thread(target=slow_call)
    slow.start()
    deadline = _time.monotonic() + 10
    while not stub_openai.requests and _time.monotonic() < deadline:
        _time.sleep(0.01)
    assert len(stub_openai.requests) == 1  # the slow call is in flight: the run stays open
    llm.invoke("the same prompt", config=cfg)  # its first identical request: counted at its end
    llm.invoke("the same prompt", config=cfg)  # the second
    with pytest.raises(LoopDetectedError):
        llm.invoke("the same prompt", config=cfg)  # the third: refused, never sent
    slow.join(10)
    assert outcome == ["slow"]
    assert len(stub_openai.requests) == 3
    got = rc(tracker, cfg["run_id"])
    # every call's cost is kept although the overlapping roots share one span id (LangChain gives each
    # invocation the config's run_id)
    assert (got.llm_calls, got.cost_usd, got.input_tokens, got.status) == (3, 3 * usd(10, 1), 30, "aborted")
    assert sorted(s["cost_nanos"] for s in tracker.spans(cfg["run_id"])) == [28_000] * 3
    assert tracker.stats["internal_errors"] == 0 and not tracker.ledger.same_id and not tracker.ledger.spans
