"""The loop guard stops stuck agents long before LangGraph's recursion limit: the same tool with the same
arguments, the same model request, short cycles, agents calling agents without end, and a hard step cap.

Real ``ChatOpenAI`` against the stub server, real LangGraph graphs; every test asserts the exact number of
requests the stub received. See ``runaway.py`` for the prices (one call: $0.0003).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Any, TypedDict

import pytest
from langchain.agents import create_agent
from langchain_core.tools import tool
from langgraph.errors import GraphRecursionError
from langgraph.graph import END, START, MessagesState, StateGraph
from pydantic import ValidationError

from costobs_callbacks import ConfigurationError, CostTracker, LoopDetectedError, LoopPolicy

from .runaway import CALL_USD, MODES, PRICES, USAGE, StubReply, calls_tool, chat, drive, new_args, tool_loop_graph


@pytest.fixture
def tracker(cost_tracker_factory) -> CostTracker:
    return cost_tracker_factory(prices=PRICES)


def tools() -> tuple[list[Any], list[tuple[str, Any]]]:
    """``search``, ``fetch``, ``parse`` and ``summarise`` tools that record every execution."""
    ran: list[tuple[str, Any]] = []

    @tool
    def search(q: str, n: int = 1) -> str:
        """Search the web."""
        ran.append(("search", q))
        return "no results"

    @tool
    def fetch(url: str) -> str:
        """Fetch a page."""
        ran.append(("fetch", url))
        return "<html>"

    @tool
    def parse(doc: str) -> str:
        """Parse a page."""
        ran.append(("parse", doc))
        return "nothing useful"

    @tool
    def summarise(text: str) -> str:
        """Summarise a text."""
        ran.append(("summarise", text))
        return "..."

    return [search, fetch, parse, summarise], ran


def stuck(stub) -> tuple[Any, list[tuple[str, Any]]]:
    """A prebuilt agent whose model always calls ``search`` with the same arguments (key order varies:
    the guard compares canonicalised arguments)."""
    ts, ran = tools()
    orders = itertools.cycle([{"q": "weather", "n": 1}, {"n": 1, "q": "weather"}])
    stub.responder = calls_tool("search", lambda: next(orders))
    return create_agent(chat(stub), ts), ran


def loop_stop(mode: str, graph: Any, config: Any) -> LoopDetectedError:
    with pytest.raises(LoopDetectedError) as info:
        drive(mode, graph, "what's the weather", config)
    return info.value


# -- the same tool call again and again ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_same_tool_call_repeated_stops_the_agent(tracker, stub_openai, mode):
    agent, ran = stuck(stub_openai)
    cfg = tracker.config(feature="weather")
    err = loop_stop(mode, agent, cfg)
    # default max_identical_tool_calls=4: three searches ran, the 4th was refused; 4 requests in all, where
    # LangGraph alone would have gone on to its recursion limit.
    assert (stub_openai.count(), ran) == (4, [("search", "weather")] * 3)
    rid = str(cfg["run_id"])
    assert (err.run_id, err.reason, err.limit, err.spent, err.spent_usd) == (rid, "tool_repeat", 4, 4, 4 * CALL_USD)
    assert err.detail == {"tool": "search", "arguments": '{"n":1,"q":"weather"}'}
    assert str(err) == (f"run {rid} called tool 'search' with the same arguments 4 times in a row "
                        "(max_identical_tool_calls=4); the call was refused")
    rc = tracker.run_cost(rid)
    assert (rc.status, rc.reason, rc.llm_calls, rc.tool_calls, rc.cost_usd) == (
        "aborted", "tool_repeat", 4, 3, 4 * CALL_USD)


def test_the_repeat_threshold_from_the_tracker_default_and_from_the_run(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=PRICES, loops=LoopPolicy(max_identical_tool_calls=5))  # Gemini CLI's 5
    agent, ran = stuck(stub_openai)
    assert loop_stop("invoke", agent, tracker.config()).limit == 5
    assert (stub_openai.count(), len(ran)) == (5, 4)

    stub_openai.reset()
    agent, ran = stuck(stub_openai)
    assert loop_stop("invoke", agent, tracker.config(loops={"max_identical_tool_calls": 3})).limit == 3
    assert (stub_openai.count(), len(ran)) == (3, 2)

    stub_openai.reset()
    agent, ran = stuck(stub_openai)
    plain = {"callbacks": [tracker.langchain_handler()], "metadata": {"costobs_loops": {"max_identical_tool_calls": 2}}}
    assert loop_stop("invoke", agent, plain).limit == 2
    assert (stub_openai.count(), len(ran)) == (2, 1)


def test_a_refused_repeat_turned_into_a_tool_message_still_stops_the_graph(tracker, stub_openai):
    ts, ran = tools()
    stub_openai.responder = calls_tool("search", lambda: {"q": "weather"})
    graph = tool_loop_graph(chat(stub_openai), ts, handle_tool_errors=True)
    err = loop_stop("invoke", graph, tracker.config())
    assert (stub_openai.count(), len(ran), err.reason) == (4, 3, "tool_repeat")


def test_without_the_loop_guard_the_agent_runs_to_langgraphs_recursion_limit(tracker, stub_openai):
    agent, ran = stuck(stub_openai)
    cfg = tracker.config(loops=LoopPolicy(enabled=False))
    cfg["recursion_limit"] = 10
    with pytest.raises(GraphRecursionError):
        drive("invoke", agent, "what's the weather", cfg)
    assert (stub_openai.count(), len(ran)) == (5, 5)
    assert tracker.run_cost(cfg["run_id"]).status == "error"


def test_a_stuck_agent_inside_a_subgraph_stops(tracker, stub_openai):
    agent, ran = stuck(stub_openai)
    outer = StateGraph(MessagesState)
    outer.add_node("research", agent)
    outer.add_edge(START, "research")
    outer.add_edge("research", END)
    err = loop_stop("astream", outer.compile(), tracker.config())
    assert (stub_openai.count(), len(ran), err.reason) == (4, 3, "tool_repeat")


# -- the same model request ---------------------------------------------------------------------------------------


class Poll(TypedDict):
    tries: int


def test_the_same_model_request_repeated_is_refused(tracker, stub_openai):
    """A graph that asks the model the very same question until it says yes (it never does)."""
    stub_openai.responder = lambda req: StubReply("not yet", usage=USAGE)
    llm = chat(stub_openai)

    def ask(state: Poll) -> Poll:
        llm.invoke([("system", "Answer yes or no."), ("user", "Is the report ready?")])
        return {"tries": state["tries"] + 1}

    g = StateGraph(Poll)
    g.add_node("ask", ask)
    g.add_edge(START, "ask")
    g.add_edge("ask", "ask")
    cfg = tracker.config()
    with pytest.raises(LoopDetectedError) as info:
        g.compile().invoke({"tries": 0}, config=cfg)
    err = info.value
    # default max_identical_model_requests=3: two identical requests answered, the third refused
    assert stub_openai.count() == 2
    assert (err.reason, err.limit, err.spent, err.detail) == ("model_repeat", 3, 3, {"model": "m-1"})
    assert str(err) == (f"run {cfg['run_id']} sent the same request to m-1 3 times "
                        "(max_identical_model_requests=3); the call was refused")


# -- short cycles -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cycle", "requests"),
    [
        (["fetch", "parse"], 6),  # A-B-A-B-A-[B refused]: OpenHands' pattern over 6 steps
        (["fetch", "parse", "summarise"], 9),  # A-B-C three times, the last one refused
    ],
)
def test_a_short_cycle_of_tool_calls_stops_the_agent(tracker, stub_openai, cycle, requests):
    ts, ran = tools()
    arg = {"fetch": {"url": "https://x.test"}, "parse": {"doc": "<html>"}, "summarise": {"text": "..."}}
    turn = itertools.cycle(cycle)

    def respond(req: dict[str, Any]) -> StubReply:
        name = next(turn)
        return StubReply("", tool_calls=[(name, arg[name])], usage=USAGE)

    stub_openai.responder = respond
    err = loop_stop("invoke", create_agent(chat(stub_openai), ts), tracker.config())
    assert (stub_openai.count(), len(ran)) == (requests, requests - 1)
    assert (err.reason, err.limit, err.detail) == ("tool_cycle", 3, {"cycle": cycle})
    assert f"repeats the tool cycle {' -> '.join(cycle)} 3 times (cycle_repeats=3)" in str(err)


# -- agents calling agents without end ----------------------------------------------------------------------------


def recursive_agent(stub, *, is_async: bool) -> Any:
    """An agent whose only tool asks the agent itself: every level asks again."""
    stub.responder = calls_tool("ask_agent", new_args_question())
    agent: Any = None

    if is_async:

        @tool
        async def ask_agent(question: str) -> str:
            """Ask the agent."""
            out = await agent.ainvoke({"messages": [("user", question)]})
            return str(out["messages"][-1].content)
    else:

        @tool
        def ask_agent(question: str) -> str:
            """Ask the agent."""
            out = agent.invoke({"messages": [("user", question)]})
            return str(out["messages"][-1].content)

    agent = create_agent(chat(stub), [ask_agent])
    return agent


def new_args_question() -> Any:
    n = itertools.count()
    return lambda: {"question": f"sub-question {next(n)}"}


@pytest.mark.parametrize(
    ("mode", "max_depth", "requests"),
    [
        # Each nested agent adds 3 levels (graph, node, call): model calls at depths 2, 5, 8, ...
        ("invoke", None, 16),  # the default max_depth=48: the graph at 48 runs, its model node (49) is refused
        ("invoke", 20, 7),
        ("ainvoke", 11, 4),
        ("astream", 11, 4),
    ],
)
def test_an_agent_calling_itself_as_a_tool_stops_at_max_depth(tracker, stub_openai, mode, max_depth, requests):
    agent = recursive_agent(stub_openai, is_async=mode.startswith("a"))
    loops = LoopPolicy() if max_depth is None else LoopPolicy(max_depth=max_depth)
    cfg = tracker.config(loops=loops)
    err = loop_stop(mode, agent, cfg)
    limit = loops.max_depth
    assert stub_openai.count() == requests
    assert (err.reason, err.limit, err.spent) == ("max_depth", limit, limit + 1)
    assert str(err).startswith(f"run {cfg['run_id']} nested {limit + 1} levels deep (max_depth={limit})")
    rc = tracker.run_cost(cfg["run_id"])
    assert (rc.llm_calls, rc.tool_calls, rc.cost_usd, rc.reason) == (requests, requests, requests * CALL_USD,
                                                                     "max_depth")


# -- the hard step cap --------------------------------------------------------------------------------------------


def test_max_steps_caps_llm_and_tool_calls_together(tracker, stub_openai):
    ts, ran = tools()
    stub_openai.responder = calls_tool("search", new_args())
    cfg = tracker.config(loops=LoopPolicy(max_steps=5))
    err = loop_stop("invoke", create_agent(chat(stub_openai), ts), cfg)
    # model, search, model, search, model: 5 steps; the 3rd search would be the 6th
    assert (stub_openai.count(), len(ran)) == (3, 2)
    assert (err.reason, err.limit, err.spent) == ("max_steps", 5, 5)
    assert str(err) == (f"run {cfg['run_id']} reached max_steps=5 LLM and tool calls; refused tool 'search'; "
                        "spent $0.0009")


# -- concurrency --------------------------------------------------------------------------------------------------


def test_one_stuck_run_does_not_stop_the_runs_beside_it(tracker, stub_openai):
    ts, _ = tools()
    counter = itertools.count()

    def respond(req: dict[str, Any]) -> StubReply:
        msgs = req["messages"]
        if msgs[0]["content"] == "stuck":
            return StubReply("", tool_calls=[("search", {"q": "same"})], usage=USAGE)
        if len(msgs) >= 5:  # the healthy runs finish after two searches
            return StubReply("done", usage=USAGE)
        return StubReply("", tool_calls=[("search", {"q": f"q{next(counter)}"})], usage=USAGE)

    stub_openai.responder = respond
    agent = create_agent(chat(stub_openai), ts)
    names = ["stuck", "ok-1", "ok-2", "ok-3"]
    cfgs = {n: tracker.config(feature=n) for n in names}

    async def main() -> list[Any]:
        return await asyncio.gather(*(agent.ainvoke({"messages": [("user", n)]}, config=cfgs[n]) for n in names),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], LoopDetectedError)
    assert [r["messages"][-1].content for r in results[1:]] == ["done"] * 3
    status = {n: (tracker.run_cost(cfgs[n]["run_id"]).status, tracker.run_cost(cfgs[n]["run_id"]).llm_calls)
              for n in names}
    assert status == {"stuck": ("aborted", 4), "ok-1": ("ok", 3), "ok-2": ("ok", 3), "ok-3": ("ok", 3)}


# -- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_identical_tool_calls": 1}, "max_identical_tool_calls"),
        ({"max_identical_model_requests": 0}, "max_identical_model_requests"),
        ({"cycle_repeats": 1}, "cycle_repeats"),
        ({"max_cycle_period": 9}, "max_cycle_period"),
        ({"max_depth": 0}, "max_depth"),
        ({"max_depth": True}, "max_depth"),
        ({"max_steps": 2.5}, "max_steps"),
        ({"max_loops": 3}, "max_loops"),
    ],
)
def test_invalid_loop_policies_are_rejected_with_a_message_naming_the_field(tracker, fields, field):
    with pytest.raises(ValidationError) as info:
        LoopPolicy(**fields)
    assert str(info.value).splitlines()[1] == field
    with pytest.raises(ConfigurationError, match=f"^invalid LoopPolicy: {field}: "):
        tracker.config(loops=fields)


def test_loop_policy_fields_can_be_switched_off_one_by_one(tracker, stub_openai):
    agent, ran = stuck(stub_openai)
    cfg = tracker.config(loops=LoopPolicy(max_identical_tool_calls=None, cycle_repeats=None, max_steps=9))
    err = loop_stop("invoke", agent, cfg)
    assert (err.reason, stub_openai.count(), len(ran)) == ("max_steps", 5, 4)
    assert uuid.UUID(err.run_id) == cfg["run_id"]
