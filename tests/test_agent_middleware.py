"""``CostGuardMiddleware`` in LangChain 1.x agents (``create_agent``): the same budget and loop guard as the
callback handler, read from the same ledger run, ending the agent politely or raising.

Real ``ChatOpenAI`` against the stub server; exact request counts. See ``runaway.py`` for the prices.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelCallLimitMiddleware, ModelRetryMiddleware, ToolCallLimitMiddleware
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

import costobs_callbacks
from costobs_callbacks import (
    Budget,
    BudgetExceededError,
    ConfigurationError,
    CostGuardMiddleware,
    CostTracker,
    LoopDetectedError,
    LoopPolicy,
    RunAborted,
)

from .runaway import CALL_USD, PRICES, USAGE, StubReply, calls_tool, chat, new_args

LIMIT_TEXT = "This request hit its cost limit."


@pytest.fixture
def tracker(cost_tracker_factory) -> CostTracker:
    return cost_tracker_factory(prices=PRICES)


def search_tool() -> tuple[Any, list[str]]:
    ran: list[str] = []

    @tool
    def search(q: str) -> str:
        """Search the web."""
        ran.append(q)
        return "nothing"

    return search, ran


def final_state(mode: str, agent: Any, config: Any, text: str = "find everything") -> dict[str, Any]:
    """The agent's final state, however it is driven."""
    inputs = {"messages": [("user", text)]}
    if mode == "invoke":
        return agent.invoke(inputs, config=config)  # type: ignore[no-any-return]
    if mode == "ainvoke":
        return asyncio.run(agent.ainvoke(inputs, config=config))  # type: ignore[no-any-return]
    if mode == "stream":
        return list(agent.stream(inputs, config=config, stream_mode="values"))[-1]  # type: ignore[no-any-return]

    async def consume() -> dict[str, Any]:
        return [state async for state in agent.astream(inputs, config=config, stream_mode="values")][-1]

    return asyncio.run(consume())


SCENARIOS = {
    # name: (responder args, budget of the middleware, requests, reason, limit, spent)
    "max_llm_calls": ("new", Budget(max_llm_calls=3), 3, "max_llm_calls", "3", "3"),
    "max_tool_calls": ("new", Budget(max_tool_calls=2), 3, "max_tool_calls", "2", "2"),
    "max_cost_usd": ("new", Budget(max_cost_usd="0.001"), 3, "max_cost_usd", "0.001", "0.000900000"),
    "tool_repeat": ("same", None, 4, "tool_repeat", "4", "4"),
}


@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "astream"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_on_limit_end_finishes_the_agent_with_a_message_the_product_can_show(tracker, stub_openai, scenario, mode):
    args, budget, requests, reason, limit, spent = SCENARIOS[scenario]
    search, ran = search_tool()
    stub_openai.responder = calls_tool("search", new_args() if args == "new" else (lambda: {"q": "same"}))
    guard = CostGuardMiddleware(tracker, budget=budget, on_limit="end")
    agent = create_agent(chat(stub_openai), [search], middleware=[guard])
    cfg = tracker.config(feature="research")
    out = final_state(mode, agent, cfg)  # no exception
    assert stub_openai.count() == requests
    last = out["messages"][-1]
    assert isinstance(last, AIMessage)
    assert (last.content, last.tool_calls) == (LIMIT_TEXT, [])
    rid = str(cfg["run_id"])
    facts = last.response_metadata["costobs"]
    assert (facts["run_id"], facts["reason"], facts["limit"], facts["spent"]) == (rid, reason, limit, spent)
    assert facts["spent_usd"] == str(tracker.run_cost(rid).cost_usd)
    assert facts["error"].startswith(f"run {rid} ")
    rc = tracker.run_cost(rid)
    assert (rc.status, rc.reason, rc.llm_calls, rc.cost_usd) == ("aborted", reason, requests, requests * CALL_USD)
    if reason in ("max_tool_calls", "tool_repeat"):  # the refused tool call is answered, then the agent ends
        refused = out["messages"][-2]
        assert isinstance(refused, ToolMessage)
        assert (refused.status, refused.content) == ("error", f"Not run: {facts['error']}")
        assert len(ran) == requests - 1


@pytest.mark.parametrize("mode", ["invoke", "astream"])
def test_on_limit_raise_raises_the_stop(tracker, stub_openai, mode):
    search, ran = search_tool()
    stub_openai.responder = calls_tool("search", new_args())
    agent = create_agent(chat(stub_openai), [search],
                         middleware=[CostGuardMiddleware(tracker, budget=Budget(max_llm_calls=2))])
    cfg = tracker.config()
    with pytest.raises(BudgetExceededError) as info:
        final_state(mode, agent, cfg)
    assert (stub_openai.count(), info.value.reason, info.value.run_id) == (2, "max_llm_calls", str(cfg["run_id"]))
    assert len(ran) == 2
    assert tracker.run_cost(cfg["run_id"]).status == "aborted"


# -- retry middleware inside the agent ----------------------------------------------------------------------------


def _retrying_agent(stub, tracker: CostTracker, guard: CostGuardMiddleware | None) -> Any:
    search, _ = search_tool()
    stub.responder = calls_tool("search", new_args())
    retry = ModelRetryMiddleware(max_retries=2, initial_delay=0.0, jitter=False)  # retries any Exception
    return create_agent(chat(stub), [search], middleware=[guard, retry] if guard else [retry])


def test_without_the_guard_a_retry_middleware_swallows_the_stop(tracker, stub_openai):
    """What the middleware is for: ModelRetryMiddleware retries the stop (each retry refused before sending
    anything) and then turns it into an ordinary reply; the app never learns that the run was stopped."""
    agent = _retrying_agent(stub_openai, tracker, None)
    cfg = tracker.config(budget=Budget(max_llm_calls=2))
    out = agent.invoke({"messages": [("user", "go")]}, config=cfg)
    assert stub_openai.count() == 2
    assert str(out["messages"][-1].content).startswith("Model call failed after 3 attempts with BudgetExceededError")
    assert tracker.run_cost(cfg["run_id"]).status == "aborted"


def test_the_guard_outside_a_retry_middleware_still_raises_or_ends(tracker, stub_openai):
    agent = _retrying_agent(stub_openai, tracker, CostGuardMiddleware(tracker, budget={"max_llm_calls": 2}))
    with pytest.raises(BudgetExceededError):
        agent.invoke({"messages": [("user", "go")]}, config=tracker.config())
    assert stub_openai.count() == 2

    stub_openai.reset()
    guard = CostGuardMiddleware(tracker, budget={"max_llm_calls": 2}, on_limit="end")
    out = _retrying_agent(stub_openai, tracker, guard).invoke({"messages": [("user", "go")]},
                                                              config=tracker.config())
    assert (stub_openai.count(), out["messages"][-1].content) == (2, LIMIT_TEXT)


# -- where the budget comes from ----------------------------------------------------------------------------------


def _count_until_stopped(stub, tracker: CostTracker, config: Any, **guard: Any) -> int:
    search, _ = search_tool()
    stub.reset()
    stub.responder = calls_tool("search", new_args())
    agent = create_agent(chat(stub), [search], middleware=[CostGuardMiddleware(tracker, on_limit="end", **guard)])
    agent.invoke({"messages": [("user", "go")]}, config=config)
    return stub.count()


def test_the_middleware_budget_replaces_the_tracker_default_but_not_the_runs_own(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=PRICES, budget=Budget(max_llm_calls=5))
    mw = Budget(max_llm_calls=2)
    assert _count_until_stopped(stub_openai, tracker, tracker.config()) == 5  # the tracker's default
    assert _count_until_stopped(stub_openai, tracker, tracker.config(), budget=mw) == 2  # the middleware's
    assert _count_until_stopped(stub_openai, tracker, tracker.config(budget=Budget(max_llm_calls=3)), budget=mw) == 3
    meta = {"callbacks": [tracker.langchain_handler()], "metadata": {"costobs_budget": {"max_llm_calls": 4}}}
    assert _count_until_stopped(stub_openai, tracker, meta, budget=mw) == 4


def test_the_middleware_loop_policy(tracker, stub_openai):
    search, ran = search_tool()
    stub_openai.responder = calls_tool("search", lambda: {"q": "same"})
    guard = CostGuardMiddleware(tracker, loops=LoopPolicy(max_identical_tool_calls=2))
    agent = create_agent(chat(stub_openai), [search], middleware=[guard])
    with pytest.raises(LoopDetectedError) as info:
        agent.invoke({"messages": [("user", "go")]}, config=tracker.config())
    assert (stub_openai.count(), len(ran), info.value.limit) == (2, 1, 2)


def test_a_message_function_gets_the_stop(tracker, stub_openai):
    guard = CostGuardMiddleware(tracker, budget=Budget(max_cost_usd="0.0003"), on_limit="end",
                                message=lambda err: f"Stopped ({err.reason}) after ${err.spent_usd:.4f}.")
    search, _ = search_tool()
    stub_openai.responder = calls_tool("search", new_args())
    out = create_agent(chat(stub_openai), [search], middleware=[guard]).invoke(
        {"messages": [("user", "go")]}, config=tracker.config())
    assert (stub_openai.count(), out["messages"][-1].content) == (1, "Stopped (max_cost_usd) after $0.0003.")


# -- agents as tools of agents ------------------------------------------------------------------------------------


def test_nested_agents_both_end_politely_and_buy_nothing_more(tracker, stub_openai):
    def respond(req: dict[str, Any]) -> StubReply:
        msgs = req["messages"]
        if msgs[0]["content"].startswith("expert:"):
            return StubReply("", tool_calls=[("search", {"q": f"e{len(msgs)}"})], usage=USAGE)
        return StubReply("", tool_calls=[("ask_expert", {"question": f"q{len(msgs)}"})], usage=USAGE)

    search, _ = search_tool()
    expert = create_agent(chat(stub_openai), [search], middleware=[CostGuardMiddleware(tracker, on_limit="end")])

    @tool
    def ask_expert(question: str) -> str:
        """Ask the expert agent."""
        return str(expert.invoke({"messages": [("user", f"expert: {question}")]})["messages"][-1].content)

    stub_openai.responder = respond
    boss = create_agent(chat(stub_openai), [ask_expert],
                        middleware=[CostGuardMiddleware(tracker, budget=Budget(max_llm_calls=3), on_limit="end")])
    cfg = tracker.config()
    out = boss.invoke({"messages": [("user", "research this")]}, config=cfg)
    # boss 1, expert 2, expert 3; the expert's 4th call is refused: the expert ends with the message, which is
    # the tool's answer to the boss, whose next model call ends the boss with the message too.
    assert stub_openai.count() == 3
    tool_answer, final = out["messages"][-2:]
    assert (tool_answer.type, tool_answer.content, final.content) == ("tool", LIMIT_TEXT, LIMIT_TEXT)
    rc = tracker.run_cost(cfg["run_id"])
    assert (rc.status, rc.reason, rc.llm_calls, rc.cost_usd) == ("aborted", "max_llm_calls", 3, 3 * CALL_USD)


# -- beside LangChain's own limit middleware ----------------------------------------------------------------------


def test_beside_langchains_call_limit_middlewares(tracker, stub_openai):
    search, _ = search_tool()
    stub_openai.responder = calls_tool("search", new_args())
    stack = [
        CostGuardMiddleware(tracker, budget=Budget(max_cost_usd="0.0006"), on_limit="end"),
        ModelCallLimitMiddleware(run_limit=10, exit_behavior="end"),
        ToolCallLimitMiddleware(run_limit=10, exit_behavior="end"),
    ]
    cfg = tracker.config()
    out = create_agent(chat(stub_openai), [search], middleware=stack).invoke({"messages": [("user", "go")]},
                                                                              config=cfg)
    assert (stub_openai.count(), out["messages"][-1].content) == (2, LIMIT_TEXT)
    assert tracker.run_cost(cfg["run_id"]).reason == "max_cost_usd"

    # LangChain's counter stops first: a normal end, the run is not aborted.
    stub_openai.reset()
    stub_openai.responder = calls_tool("search", new_args())
    stack = [CostGuardMiddleware(tracker, budget=Budget(max_llm_calls=5), on_limit="end"),
             ModelCallLimitMiddleware(run_limit=2, exit_behavior="end")]
    cfg = tracker.config()
    out = create_agent(chat(stub_openai), [search], middleware=stack).invoke({"messages": [("user", "go")]},
                                                                              config=cfg)
    assert stub_openai.count() == 2
    assert out["messages"][-1].content == "Model call limits exceeded: run limit (2/2)"
    assert (tracker.run_cost(cfg["run_id"]).status, tracker.run_cost(cfg["run_id"]).reason) == ("ok", None)


# -- misuse -------------------------------------------------------------------------------------------------------


def test_the_middleware_needs_the_trackers_handler_on_the_run(tracker, stub_openai):
    search, _ = search_tool()
    agent = create_agent(chat(stub_openai), [search], middleware=[CostGuardMiddleware(tracker)])
    with pytest.raises(ConfigurationError, match=r"needs the tracker's LangChain handler on the run: invoke the agent "
                                                 r"with config=tracker\.config\(\.\.\.\)"):
        agent.invoke({"messages": [("user", "go")]})
    assert stub_openai.count() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"on_limit": "explode"}, "on_limit must be 'raise' or 'end', not 'explode'"),
        ({"message": 42}, "message must be a str or a function of the RunAborted returning one"),
        ({"budget": {"max_llm_calls": 0}}, "invalid Budget: max_llm_calls: Value error, must be > 0"),
        ({"loops": {"max_depth": 0}}, "invalid LoopPolicy: max_depth: Input should be greater than or equal to 1"),
    ],
)
def test_bad_arguments_fail_at_construction(tracker, kwargs, message):
    with pytest.raises(ConfigurationError) as info:
        CostGuardMiddleware(tracker, **kwargs)
    assert str(info.value) == message


def test_exported_from_the_package_root():
    assert "CostGuardMiddleware" in costobs_callbacks.__all__
    assert costobs_callbacks.CostGuardMiddleware is CostGuardMiddleware
    assert issubclass(BudgetExceededError, RunAborted)
