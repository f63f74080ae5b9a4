"""Per-run budgets stop runaway agents before they spend.

A stub model that calls a tool with new arguments every turn never stops on its own; each test runs it in
a real LangGraph graph with the real ``ChatOpenAI`` and asserts the exact number of requests the stub
received, the exact recorded cost and what the caller sees. Costs: see ``runaway.py`` (one call of 100 in /
20 out tokens costs $0.0003).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.tools import tool
from langgraph.types import RetryPolicy
from pydantic import ValidationError

from costobs_callbacks import (
    Budget,
    BudgetExceededError,
    BudgetWarning,
    ConfigurationError,
    CostTracker,
    LoopDetectedError,
    RunAborted,
)

from .runaway import (
    CALL_USD,
    GRAPH_VARIANTS,
    MODES,
    PRICES,
    USAGE,
    StubReply,
    StubUsage,
    calls_tool,
    chat,
    drive,
    new_args,
    tool_loop_graph,
)

# Every mode on the plain graph; the sticky-abort variants (ToolNode(handle_tool_errors=True), a node
# RetryPolicy that retries everything) sync and async.
VARIANT_MODES = [
    *(("plain", m) for m in MODES),
    ("handle_tool_errors", "invoke"),
    ("retry_policy", "ainvoke"),
]


@pytest.fixture
def tracker(cost_tracker_factory) -> CostTracker:
    return cost_tracker_factory(prices=PRICES)


def search_tool() -> tuple[Any, list[str]]:
    """A ``search`` tool that records every execution."""
    ran: list[str] = []

    @tool
    def search(q: str) -> str:
        """Search the web."""
        ran.append(q)
        return f"nothing about {q}"

    return search, ran


def runaway(stub, variant: str = "plain", **chat_kw: Any) -> tuple[Any, list[str]]:
    """The runaway agent: the stub calls ``search`` with new arguments every turn."""
    search, ran = search_tool()
    stub.responder = calls_tool("search", new_args())
    return tool_loop_graph(chat(stub, **chat_kw), [search], **GRAPH_VARIANTS[variant]), ran


def stop(mode: str, graph: Any, config: Any, exc: type[RunAborted] = BudgetExceededError) -> RunAborted:
    with pytest.raises(exc) as info:
        drive(mode, graph, "find everything", config)
    return info.value


# -- count limits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "mode"), VARIANT_MODES)
def test_max_llm_calls_refuses_the_call_that_would_exceed_it(tracker, stub_openai, variant, mode):
    graph, ran = runaway(stub_openai, variant)
    cfg = tracker.config(feature="research", budget=Budget(max_llm_calls=3))
    err = stop(mode, graph, cfg)
    assert stub_openai.count() == 3  # the 4th request was never sent
    assert len(ran) == 3
    rid = str(cfg["run_id"])
    assert (err.run_id, err.reason, err.limit, err.spent, err.spent_usd) == (rid, "max_llm_calls", 3, 3, 3 * CALL_USD)
    assert str(err) == f"run {rid} refused LLM call 4 (m-1): max_llm_calls=3; spent $0.0009"
    rc = tracker.run_cost(rid)
    assert (rc.status, rc.reason, rc.llm_calls, rc.tool_calls, rc.cost_usd) == (
        "aborted", "max_llm_calls", 3, 3, 3 * CALL_USD)


@pytest.mark.parametrize(("variant", "mode"), VARIANT_MODES)
def test_max_tool_calls_refuses_the_call_that_would_exceed_it(tracker, stub_openai, variant, mode):
    graph, ran = runaway(stub_openai, variant)
    cfg = tracker.config(budget=Budget(max_tool_calls=2))
    err = stop(mode, graph, cfg)
    # 3 model calls asked for 3 tools; the 3rd tool was refused at its start. Under ToolNode(handle_tool_errors)
    # the refusal became a ToolMessage and the next model step raised again before sending anything.
    assert (stub_openai.count(), len(ran)) == (3, 2)
    assert (err.reason, err.limit, err.spent, err.detail) == ("max_tool_calls", 2, 2, {"tool": "search"})
    rc = tracker.run_cost(cfg["run_id"])
    assert (rc.status, rc.reason, rc.llm_calls, rc.tool_calls, rc.cost_usd) == (
        "aborted", "max_tool_calls", 3, 2, 3 * CALL_USD)


# -- cost ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "mode"), VARIANT_MODES)
def test_max_cost_usd_refuses_a_call_whose_estimate_would_pass_it(tracker, stub_openai, variant, mode):
    graph, ran = runaway(stub_openai, variant)
    cfg = tracker.config(budget=Budget(max_cost_usd="0.001"))
    err = stop(mode, graph, cfg)
    # 3 calls spent $0.0009; the 4th call's prompt alone (> 100 tokens at $1/M) would pass $0.001.
    assert (stub_openai.count(), len(ran)) == (3, 3)
    prompt_tokens = err.detail["prompt_tokens"]
    assert prompt_tokens > 100
    assert err.detail["estimate_usd"] == prompt_tokens * Decimal("0.000001")
    assert (err.reason, err.limit, err.spent) == ("max_cost_usd", Decimal("0.001"), 3 * CALL_USD)
    assert f"({prompt_tokens} prompt tokens, no max_tokens)" in str(err)
    rc = tracker.run_cost(cfg["run_id"])
    assert (rc.status, rc.reason, rc.llm_calls, rc.cost_usd) == ("aborted", "max_cost_usd", 3, 3 * CALL_USD)


def test_a_call_that_crosses_the_limit_is_recorded_and_the_run_stops(tracker, stub_openai):
    graph, ran = runaway(stub_openai)
    big = StubUsage(100, 100)  # $0.0011: more than the estimate of its prompt could know
    stub_openai.enqueue(*(StubReply("", tool_calls=[("search", {"q": f"x{i}"})], usage=u)
                          for i, u in enumerate([USAGE, USAGE, big])))
    cfg = tracker.config(budget=Budget(max_cost_usd="0.001"))
    err = stop("invoke", graph, cfg)
    spent = 2 * CALL_USD + Decimal("0.0011")
    assert (stub_openai.count(), len(ran)) == (3, 2)  # the crossing call's tool never ran
    assert (err.reason, err.spent, err.spent_usd) == ("max_cost_usd", spent, spent)
    assert str(err) == f"run {cfg['run_id']} spent $0.0017, past max_cost_usd=$0.001, after llm 'm-1'; stopped"
    # Persisted: the run, aborted with its reason, and every call that was paid for, the crossing one too.
    rc = tracker.run_cost(cfg["run_id"])
    assert (rc.status, rc.reason, rc.cost_usd, rc.llm_calls, rc.output_tokens) == (
        "aborted", "max_cost_usd", spent, 3, 140)
    llm_spans = [s for s in tracker.spans(cfg["run_id"]) if s["kind"] == "llm"]
    assert [s["cost_nanos"] for s in llm_spans] == [300_000, 300_000, 1_100_000]


def test_with_max_tokens_set_a_run_never_spends_more_than_its_budget(tracker, stub_openai):
    # Each reply uses its whole max_tokens: 10 in / 100 out = $0.00101. The pre-call estimate (the prompt at
    # the input price + max_tokens at the output price) refuses the 3rd call: $0.00202 + > $0.001 > $0.0025.
    search, ran = search_tool()
    stub_openai.responder = calls_tool("search", new_args(), usage=StubUsage(10, 100))
    graph = tool_loop_graph(chat(stub_openai, max_tokens=100), [search])
    budget = Decimal("0.0025")
    cfg = tracker.config(budget=Budget(max_cost_usd=budget))
    err = stop("invoke", graph, cfg)
    assert (stub_openai.count(), len(ran)) == (2, 2)
    assert [r["max_completion_tokens"] for r in stub_openai.requests] == [100, 100]
    spent = 2 * Decimal("0.00101")
    assert (err.reason, err.spent) == ("max_cost_usd", spent)
    assert err.detail["estimate_usd"] == err.detail["prompt_tokens"] * Decimal("0.000001") + Decimal("0.001")
    assert spent + err.detail["estimate_usd"] > budget
    assert "max_tokens=100" in str(err)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc.cost_usd == spent <= budget


@pytest.mark.parametrize("variant", GRAPH_VARIANTS)
def test_tool_prices_count_and_a_priced_tool_that_would_pass_the_limit_is_refused(
    cost_tracker_factory, stub_openai, variant
):
    # Cheap model (a call: 100 x $0.01/M + 20 x $0.1/M = $0.000003), pricey tool ($0.0004 a call).
    tracker = cost_tracker_factory(prices={"m-1": {"input": "0.01", "output": "0.1"}}, tool_prices={"search": "0.0004"})
    graph, ran = runaway(stub_openai, variant)
    cfg = tracker.config(budget=Budget(max_cost_usd="0.001"))
    err = stop("invoke", graph, cfg)
    # turn 3: $0.000809 spent, the 3rd search ($0.0004) would make $0.001209 > $0.001: refused at its start
    assert (stub_openai.count(), len(ran)) == (3, 2)
    assert (err.reason, err.spent, err.detail["tool"], err.detail["estimate_usd"]) == (
        "max_cost_usd", Decimal("0.000809"), "search", Decimal("0.0004"))
    rc = tracker.run_cost(cfg["run_id"])
    assert (rc.cost_usd, rc.llm_calls, rc.tool_calls, rc.status) == (Decimal("0.000809"), 3, 2, "aborted")


# -- stops are sticky ---------------------------------------------------------------------------------------------


def test_run_aborted_is_a_runtime_error_that_langgraph_does_not_retry():
    err = BudgetExceededError("stop", run_id="r", reason="max_cost_usd")
    assert isinstance(err, RuntimeError)
    assert RetryPolicy().retry_on(err) is False  # type: ignore[operator]


def test_a_stopped_run_refuses_again_when_its_config_is_reused(tracker, stub_openai):
    graph, ran = runaway(stub_openai)
    cfg = tracker.config(budget=Budget(max_llm_calls=2))
    first = stop("invoke", graph, cfg)
    again = stop("invoke", graph, cfg)  # the same run_id continues the same (stopped) run
    assert (stub_openai.count(), len(ran)) == (2, 2)
    assert (again.reason, again.run_id, str(again)) == (first.reason, first.run_id, str(first))
    assert again is not first


# -- the budget covers the whole tree, whatever its source --------------------------------------------------------


def test_the_budget_covers_an_agent_used_as_a_tool_of_another(tracker, stub_openai):
    def respond(req: dict[str, Any]) -> StubReply:
        msgs = req["messages"]
        if msgs[0]["content"].startswith("expert:"):  # the inner agent: look it up, then answer
            if msgs[-1]["role"] == "tool":
                return StubReply("42", usage=USAGE)
            return StubReply("", tool_calls=[("lookup", {"k": "x"})], usage=USAGE)
        return StubReply("", tool_calls=[("ask_expert", {"question": f"q{len(msgs)}"})], usage=USAGE)

    @tool
    def lookup(k: str) -> str:
        """Look a key up."""
        return "v"

    expert = create_agent(chat(stub_openai), [lookup])

    @tool
    def ask_expert(question: str) -> str:
        """Ask the expert agent."""
        out = expert.invoke({"messages": [("user", f"expert: {question}")]})
        return str(out["messages"][-1].content)

    stub_openai.responder = respond
    boss = create_agent(chat(stub_openai), [ask_expert])
    cfg = tracker.config(budget=Budget(max_llm_calls=4))
    err = stop("invoke", boss, cfg)
    # boss 1, expert 2, expert 3 (answers), boss 4; the expert's next call would be the 5th: refused
    assert stub_openai.count() == 4
    assert (err.reason, err.run_id) == ("max_llm_calls", str(cfg["run_id"]))
    rc = tracker.run_cost(cfg["run_id"])
    assert (rc.llm_calls, rc.tool_calls, rc.cost_usd) == (4, 3, 4 * CALL_USD)


def test_budget_from_plain_metadata_without_the_helper(tracker, stub_openai):
    graph, _ = runaway(stub_openai)
    rid = uuid.uuid4()
    cfg = {"callbacks": [tracker.langchain_handler()], "metadata": {"costobs_budget": {"max_llm_calls": 2}},
           "run_id": rid}
    err = stop("invoke", graph, cfg)
    assert (stub_openai.count(), err.reason, err.run_id) == (2, "max_llm_calls", str(rid))


def test_budget_of_a_tracker_run_scope(tracker, stub_openai):
    graph, _ = runaway(stub_openai)
    with pytest.raises(BudgetExceededError) as info, tracker.run(feature="scoped", budget={"max_llm_calls": 2}) as run:
        drive("invoke", graph, "go", {"callbacks": [tracker.langchain_handler()]})
    assert (stub_openai.count(), info.value.run_id) == (2, run.run_id)
    rc = tracker.run_cost(run.run_id)
    assert (rc.status, rc.reason, rc.llm_calls, rc.attributes["feature"]) == ("aborted", "max_llm_calls", 2, "scoped")


def test_the_tracker_default_budget_and_a_runs_own_budget_replacing_it(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=PRICES, budget=Budget(max_llm_calls=2))
    graph, _ = runaway(stub_openai)
    stop("invoke", graph, tracker.config())
    assert stub_openai.count() == 2
    stub_openai.reset()
    graph, _ = runaway(stub_openai)
    stop("invoke", graph, tracker.config(budget=Budget(max_llm_calls=5)))
    assert stub_openai.count() == 5


def test_an_invalid_budget_in_plain_metadata_is_logged_and_ignored(tracker, stub_openai, caplog):
    """Run metadata is a payload, not configuration: a bad budget there is logged, not raised into the app.
    (``tracker.config(budget=...)`` validates eagerly and raises.) The loop guard still stops the agent."""
    stub_openai.responder = calls_tool("search", lambda: {"q": "same"})
    search, _ = search_tool()
    graph = tool_loop_graph(chat(stub_openai), [search])
    cfg = {"callbacks": [tracker.langchain_handler()], "metadata": {"costobs_budget": {"max_llm_calls": 0}}}
    with caplog.at_level(logging.ERROR, logger="costobs_callbacks"), pytest.raises(LoopDetectedError):
        drive("invoke", graph, "go", cfg)
    assert "ignoring invalid costobs_budget in run metadata: invalid Budget: max_llm_calls: Value error, must be > 0" \
        in caplog.text


# -- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_cost_usd": -1}, "max_cost_usd: Value error, must be > 0 (a zero or negative budget allows nothing)"),
        ({"max_cost_usd": 0}, "max_cost_usd: Value error, must be > 0 (a zero or negative budget allows nothing)"),
        ({"max_cost_usd": float("nan")}, "max_cost_usd: Value error, must be finite (NaN and infinity are not limits)"),
        ({"max_cost_usd": "inf"}, "max_cost_usd: Value error, must be finite (NaN and infinity are not limits)"),
        ({"max_cost_usd": "ten"}, "max_cost_usd: Value error, not a number: 'ten'"),
        ({"max_cost_usd": True}, "max_cost_usd: Value error, must be a number of USD, not a bool"),
        ({"max_llm_calls": 0}, "max_llm_calls: Value error, must be > 0"),
        ({"max_llm_calls": True}, "max_llm_calls: Value error, must be a number, not a bool"),
        ({"max_llm_calls": 2.5}, "max_llm_calls: Input should be a valid integer, got a number with a fractional part"),
        ({"max_tokens": -5}, "max_tokens: Value error, must be > 0"),
        ({"max_tool_calls": -1}, "max_tool_calls: Value error, must be >= 0"),
        ({"max_seconds": 0}, "max_seconds: Value error, must be a finite number > 0"),
        ({"max_seconds": float("nan")}, "max_seconds: Value error, must be a finite number > 0"),
        ({"warn_at": 0}, "warn_at: Value error, must be in (0, 1]"),
        ({"warn_at": float("nan")}, "warn_at: Value error, must be in (0, 1]"),
        ({"max_dollars": 1}, "max_dollars: Extra inputs are not permitted"),
    ],
)
def test_invalid_budget_values_are_rejected_with_a_message_naming_the_field(cost_tracker_factory, fields, message):
    with pytest.raises(ValidationError) as info:
        Budget(**fields)
    assert str(info.value).splitlines()[1] == message.split(":")[0]
    tracker = cost_tracker_factory()
    with pytest.raises(ConfigurationError) as cfg_info:
        tracker.config(budget=fields)
    assert str(cfg_info.value) == f"invalid Budget: {message}"
    with pytest.raises(ConfigurationError, match="invalid Budget: "):
        CostTracker(budget=fields, user_salt="test-salt", database_url="sqlite://")


def test_zero_tool_calls_is_a_valid_limit_that_forbids_tools(tracker, stub_openai):
    graph, ran = runaway(stub_openai)
    err = stop("invoke", graph, tracker.config(budget=Budget(max_tool_calls=0)))
    assert (stub_openai.count(), len(ran), err.reason) == (1, 0, "max_tool_calls")


# -- time ---------------------------------------------------------------------------------------------------------


def test_max_seconds_stops_the_run_at_its_next_step(tracker, stub_openai):
    slow_after = 1

    @tool
    def search(q: str) -> str:
        """Search the web (slowly, from the second call on)."""
        nonlocal slow_after
        if slow_after == 0:
            time.sleep(1.2)
        slow_after -= 1
        return "..."

    stub_openai.responder = calls_tool("search", new_args())
    graph = tool_loop_graph(chat(stub_openai), [search])
    cfg = tracker.config(budget=Budget(max_seconds=1.0))
    err = stop("invoke", graph, cfg)
    # the 2nd tool call started in time and ran 1.2 s; the graph's next step found the run out of time
    assert (stub_openai.count(), err.reason, err.limit) == (2, "max_seconds", 1.0)
    assert err.spent > 1.0
    assert tracker.run_cost(cfg["run_id"]).status == "aborted"


# -- soft limits --------------------------------------------------------------------------------------------------


def test_the_warning_hook_is_called_once_per_limit_before_the_stop(cost_tracker_factory, stub_openai):
    seen: list[BudgetWarning] = []
    tracker = cost_tracker_factory(prices=PRICES, on_budget_warning=seen.append)
    graph, _ = runaway(stub_openai)
    budget = Budget(max_llm_calls=4, max_tool_calls=8, max_cost_usd="0.0016", warn_at=0.5)
    cfg = tracker.config(feature="warned", budget=budget)
    err = stop("invoke", graph, cfg)
    assert (stub_openai.count(), err.reason) == (4, "max_llm_calls")
    rid = str(cfg["run_id"])
    assert [(w.run_id, w.limit_name, w.limit, w.spent) for w in seen] == [
        (rid, "max_llm_calls", 4, 2),  # after the 2nd call: 2/4
        (rid, "max_cost_usd", Decimal("0.0016"), Decimal("0.0009")),  # after the 3rd: $0.0009 >= $0.0008
        (rid, "max_tool_calls", 8, 4),  # after the 4th tool
    ]
    assert seen[0].attributes == {"feature": "warned"}


def test_a_failing_warning_hook_never_breaks_the_run(cost_tracker_factory, stub_openai, caplog):
    def broken(w: BudgetWarning) -> None:
        raise KeyError("oops")

    tracker = cost_tracker_factory(prices=PRICES, on_budget_warning=broken)
    graph, _ = runaway(stub_openai)
    with caplog.at_level(logging.ERROR, logger="costobs_callbacks"):
        err = stop("invoke", graph, tracker.config(budget=Budget(max_llm_calls=2, warn_at=0.5)))
    assert (stub_openai.count(), err.reason) == (2, "max_llm_calls")
    assert "on_budget_warning hook failed" in caplog.text


# -- concurrency --------------------------------------------------------------------------------------------------


def _first_words(stub) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in stub.requests:
        key = r["messages"][0]["content"]
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_concurrent_async_runs_each_stop_at_their_own_budget(tracker, stub_openai):
    graph, _ = runaway(stub_openai)
    limits = {f"run-{n}": n for n in range(1, 9)}
    cfgs = {name: tracker.config(budget=Budget(max_llm_calls=n)) for name, n in limits.items()}

    async def one(name: str) -> BaseException | None:
        try:
            await graph.ainvoke({"messages": [("user", name)]}, config=cfgs[name])
        except RunAborted as exc:
            return exc
        return None

    async def all_runs() -> list[BaseException | None]:
        return await asyncio.gather(*(one(name) for name in limits))

    errors = asyncio.run(all_runs())
    assert all(isinstance(e, BudgetExceededError) and e.reason == "max_llm_calls" for e in errors)
    assert _first_words(stub_openai) == limits
    for name, n in limits.items():
        rc = tracker.run_cost(cfgs[name]["run_id"])
        assert (rc.llm_calls, rc.cost_usd, rc.status) == (n, n * CALL_USD, "aborted")


def test_concurrent_threaded_runs_each_stop_at_their_own_budget(tracker, stub_openai):
    graph, _ = runaway(stub_openai)
    limits = {f"run-{n}": n for n in range(1, 7)}
    cfgs = {name: tracker.config(budget=Budget(max_tool_calls=n)) for name, n in limits.items()}

    def one(name: str) -> str:
        with pytest.raises(BudgetExceededError) as info:
            graph.invoke({"messages": [("user", name)]}, config=cfgs[name])
        return info.value.reason

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(one, limits)) == ["max_tool_calls"] * len(limits)
    assert _first_words(stub_openai) == {name: n + 1 for name, n in limits.items()}
    for name, n in limits.items():
        rc = tracker.run_cost(cfgs[name]["run_id"])
        assert (rc.tool_calls, rc.llm_calls, rc.cost_usd) == (n, n + 1, (n + 1) * CALL_USD)


def test_parallel_tool_calls_never_pass_a_count_limit_together(tracker, stub_openai):
    """ToolNode runs one message's tool calls in parallel threads: the count check and the count are one step."""
    search, ran = search_tool()
    stub_openai.responder = lambda req: StubReply(
        "", tool_calls=[("search", {"q": f"p{i}"}) for i in range(6)], usage=USAGE)
    graph = tool_loop_graph(chat(stub_openai), [search])
    err = stop("invoke", graph, tracker.config(budget=Budget(max_tool_calls=4)))
    assert (stub_openai.count(), len(ran), err.reason) == (1, 4, "max_tool_calls")
