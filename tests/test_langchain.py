"""LangChain / LangGraph end to end: the real ``ChatOpenAI`` over HTTP to the stub, real graphs, a real
SQLite file. Every figure is exact: costs are computed by hand from the override prices below and the
token counts the stub reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from langchain_core.callbacks import adispatch_custom_event, dispatch_custom_event
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from costobs_callbacks import ConfigurationError, CostTracker, MissingAttributionError, RunAborted, RunCost
from costobs_callbacks._tokens import count_text

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

SERVED = "gpt-4o-mini-2024-07-18"
"""What the stub says it served when ``gpt-4o-mini`` is requested (like OpenAI does)."""
TOOLS_MODEL = "costobs-tools-model"
UNKNOWN = "costobs-no-such-model-xyz"

PRICES: dict[str, dict[str, str]] = {
    SERVED: {"input": "0.15", "output": "0.6", "cache_read": "0.075"},
    TOOLS_MODEL: {"input": "2.5", "output": "10", "cache_read": "1.25"},
    "m-a": {"input": "1", "output": "3"},
    "m-b": {"input": "0.4", "output": "1.6"},
}
TOOL_PRICES = {"search": 0.004}  # a float, as apps write it: priced exactly via its text
NANO = Decimal("1e-9")
MILLION = Decimal(1_000_000)


def usd(model: str, inp: int, out: int, cached: int = 0, prices: dict[str, dict[str, str]] = PRICES) -> Decimal:
    """The cost of one call, by the book: uncached input, cache reads, output (reasoning included)."""
    p = prices[model]
    cache_price = Decimal(p.get("cache_read", p["input"]))
    raw = ((inp - cached) * Decimal(p["input"]) + cached * cache_price + out * Decimal(p["output"])) / MILLION
    return raw.quantize(NANO, rounding=ROUND_HALF_EVEN)


def nanos(amount: Decimal) -> int:
    return int(amount / NANO)


@pytest.fixture
def tracker(cost_tracker_factory) -> CostTracker:
    return cost_tracker_factory(prices=PRICES, tool_prices=TOOL_PRICES)


def chat(stub: StubOpenAI, model: str = "gpt-4o-mini", **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=model, max_retries=0, **kw)


@pytest.fixture
async def ahttp():
    """A fresh async HTTP client per test: langchain-openai caches one per base_url across event loops, and
    a kept-alive connection from a closed loop fails in the next test's loop."""
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def rc_of(tracker: CostTracker, cfg: RunnableConfig) -> RunCost:
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    return rc


def by_key(rows: list[Any], key: str) -> dict[Any, Any]:
    return {r.key[key]: r for r in rows}


# --------------------------------------------------------------------------------------------------
# 1-3. A single call: invoke, streams, cached and reasoning tokens
# --------------------------------------------------------------------------------------------------


def test_invoke_exact_cost_keyed_by_served_model(tracker, stub_openai):
    stub_openai.enqueue(StubReply("hello", usage=StubUsage(1200, 300, cached_tokens=200, reasoning_tokens=50),
                                  model=SERVED))
    cfg = tracker.config(feature="chat")
    msg = chat(stub_openai).invoke("hi", config=cfg)
    assert msg.content == "hello"
    assert stub_openai.last_request()["model"] == "gpt-4o-mini"

    rc = rc_of(tracker, cfg)
    # 1000 uncached * 0.15 + 200 cached * 0.075 + 300 out * 0.6 = 345 USD per million
    expected = Decimal("0.000345")
    assert usd(SERVED, 1200, 300, 200) == expected
    assert rc.cost_usd == expected
    assert (rc.input_tokens, rc.output_tokens, rc.cache_read_tokens, rc.cache_write_tokens, rc.reasoning_tokens) == (
        1200, 300, 200, 0, 50,
    )
    assert (rc.llm_calls, rc.tool_calls, rc.unpriced_calls, rc.estimated_calls) == (1, 0, 0, 0)
    assert rc.by_model == {SERVED: expected}  # the served name, not the requested "gpt-4o-mini"
    assert rc.status == "ok"
    assert rc.attributes == {"feature": "chat"}

    (span,) = tracker.spans(cfg["run_id"])
    assert span["span_id"] == str(cfg["run_id"])
    assert (span["kind"], span["model"], span["provider"], span["status"]) == ("llm", SERVED, "openai", "ok")
    assert (span["price_source"], span["price_input"], span["price_output"], span["price_cache_read"]) == (
        "override", "0.15", "0.6", "0.075",
    )
    assert span["cost_nanos"] == span["tree_cost_nanos"] == 345_000
    assert span["estimated"] is False and span["flags"] is None


def test_override_for_undated_name_prices_the_dated_served_model(cost_tracker_factory, stub_openai):
    """Decision: an override keyed by the undated name ("gpt-4o-mini") prices the dated model the provider
    served ("gpt-4o-mini-2024-07-18"); the call is still recorded under the served name. An override for
    the exact served name wins over the undated one."""
    undated = {"gpt-4o-mini": {"input": "7", "output": "11"}}
    tracker = cost_tracker_factory("undated.db", prices=undated)
    stub_openai.enqueue(StubReply("a", usage=StubUsage(100, 10), model=SERVED))
    cfg = tracker.config(feature="undated")
    chat(stub_openai).invoke("hi", config=cfg)
    rc = rc_of(tracker, cfg)
    assert rc.cost_usd == usd("gpt-4o-mini", 100, 10, prices=undated) == Decimal("0.00081")
    assert rc.by_model == {SERVED: Decimal("0.00081")}
    assert tracker.spans(cfg["run_id"])[0]["model"] == SERVED

    both = cost_tracker_factory("both.db", prices={**undated, **PRICES})
    stub_openai.enqueue(StubReply("a", usage=StubUsage(100, 10), model=SERVED))
    cfg = both.config(feature="undated")
    chat(stub_openai).invoke("hi", config=cfg)
    assert rc_of(both, cfg).cost_usd == usd(SERVED, 100, 10) == Decimal("0.000021")


def test_cached_tokens_use_cache_read_price_or_input_price_when_none_given(cost_tracker_factory, stub_openai):
    prices = {"m-cache": {"input": "3", "output": "15", "cache_read": "0.3"},
              "m-nocache": {"input": "3", "output": "15"}}
    tracker = cost_tracker_factory(prices=prices)
    stub_openai.enqueue(
        StubReply("x", usage=StubUsage(1000, 100, cached_tokens=800)),
        StubReply("x", usage=StubUsage(1000, 100, cached_tokens=800)),
    )
    c1, c2 = tracker.config(feature="c"), tracker.config(feature="c")
    chat(stub_openai, "m-cache").invoke("hi", config=c1)
    chat(stub_openai, "m-nocache").invoke("hi", config=c2)
    # 200 * 3 + 800 * 0.3 + 100 * 15 = 2340 per million; without a cache price: 1000 * 3 + 1500 = 4500
    assert rc_of(tracker, c1).cost_usd == Decimal("0.00234")
    assert rc_of(tracker, c2).cost_usd == Decimal("0.0045")
    assert rc_of(tracker, c1).cache_read_tokens == 800


def test_reasoning_tokens_counted_and_billed_as_output(tracker, stub_openai):
    stub_openai.enqueue(StubReply("thought", usage=StubUsage(40, 900, reasoning_tokens=850), model=SERVED))
    cfg = tracker.config(feature="reason")
    chat(stub_openai).invoke("think", config=cfg)
    rc = rc_of(tracker, cfg)
    assert (rc.output_tokens, rc.reasoning_tokens) == (900, 850)
    assert rc.cost_usd == usd(SERVED, 40, 900) == Decimal("0.000546")


def test_stream_with_stream_usage_exact(tracker, stub_openai):
    stub_openai.enqueue(StubReply("hello streaming world", usage=StubUsage(321, 45, cached_tokens=21,
                                                                            reasoning_tokens=5), model=SERVED))
    cfg = tracker.config(feature="stream")
    chunks = list(chat(stub_openai).stream("hi", stream_usage=True, config=cfg))
    assert "".join(str(c.content) for c in chunks) == "hello streaming world"
    rc = rc_of(tracker, cfg)
    assert rc.cost_usd == usd(SERVED, 321, 45, 21) == Decimal("0.000073575")
    assert (rc.input_tokens, rc.output_tokens, rc.cache_read_tokens, rc.reasoning_tokens) == (321, 45, 21, 5)
    assert (rc.llm_calls, rc.estimated_calls) == (1, 0)
    assert rc.by_model == {SERVED: Decimal("0.000073575")}


def _o200k() -> Any:
    import tiktoken

    assert count_text("warm", "gpt-4o")[1], "o200k_base must be available offline (seeded by costobs)"
    return tiktoken.get_encoding("o200k_base")


def test_stream_without_stream_usage_is_estimated_with_tiktoken(tracker, stub_openai):
    enc = _o200k()
    prompt = "Summarise the quarterly report in three sentences, please."
    completion = "Revenue rose 12%. Costs fell. Margins widened to a record."
    stub_openai.enqueue(StubReply(completion, usage=StubUsage(9999, 9999), model=SERVED))
    cfg = tracker.config(feature="stream")
    chunks = list(chat(stub_openai).stream(prompt, config=cfg))  # no stream_usage: the stub sends none
    assert "stream_options" not in stub_openai.last_request()
    assert "".join(str(c.content) for c in chunks) == completion

    out_tokens = len(enc.encode(completion))
    # our rule for chat prompts (OpenAI's cookbook): per message its tokens + 4, plus 3 for the reply
    in_tokens = len(enc.encode(prompt)) + 4 + 3
    rc = rc_of(tracker, cfg)
    assert rc.estimated_calls == 1
    assert (rc.input_tokens, rc.output_tokens) == (in_tokens, out_tokens)
    assert rc.cost_usd == usd(SERVED, in_tokens, out_tokens)
    (span,) = tracker.spans(cfg["run_id"])
    assert span["estimated"] is True
    assert span["flags"] == "estimated"
    assert span["model"] == SERVED  # the served name comes with the stream's chunks


def test_missing_usage_non_stream_is_estimated(tracker, stub_openai):
    enc = _o200k()
    stub_openai.enqueue(StubReply("no usage here at all", usage=None, model=SERVED))
    cfg = tracker.config(feature="nousage")
    chat(stub_openai).invoke("count me", config=cfg)
    rc = rc_of(tracker, cfg)
    assert rc.estimated_calls == 1
    assert rc.output_tokens == len(enc.encode("no usage here at all"))
    assert rc.input_tokens == len(enc.encode("count me")) + 7


# --------------------------------------------------------------------------------------------------
# 4. Tools: agents, a hand-built graph, tool prices and tools reporting their own cost
# --------------------------------------------------------------------------------------------------


@tool
def search(query: str) -> str:
    """Search the web."""
    return f"results for {query}"


@tool
def lookup(key: str) -> str:
    """Look a key up in a paid database (reports its own cost)."""
    dispatch_custom_event("costobs.cost", {"usd": 0.0025})
    return f"value of {key}"


TOOL_SCRIPT_USAGE = (StubUsage(50, 10), StubUsage(80, 5))
LLM_USD = usd(TOOLS_MODEL, 50, 10) + usd(TOOLS_MODEL, 80, 5)  # 225 + 250 per million
TOOLS_USD = Decimal("0.004") + Decimal("0.0025")
RUN_USD = LLM_USD + TOOLS_USD


def _script_tools(stub: StubOpenAI) -> None:
    stub.enqueue(
        StubReply("", tool_calls=[("search", {"query": "llm costs"}), ("lookup", {"key": "k1"})],
                  usage=TOOL_SCRIPT_USAGE[0]),
        StubReply("final answer", usage=TOOL_SCRIPT_USAGE[1]),
    )


def _assert_tool_run(tracker: CostTracker, run_id: uuid.UUID, root_name: str | None = None) -> None:
    assert (Decimal("0.000475"), Decimal("0.006975")) == (LLM_USD, RUN_USD)
    rc = tracker.run_cost(run_id)
    assert rc is not None
    assert rc.cost_usd == RUN_USD
    assert (rc.llm_calls, rc.tool_calls, rc.input_tokens, rc.output_tokens) == (2, 2, 130, 15)
    assert rc.by_model == {TOOLS_MODEL: LLM_USD}
    assert rc.status == "ok"

    spans = tracker.spans(run_id)
    rid = str(run_id)
    assert {s["run_id"] for s in spans} == {rid}
    by_id = {s["span_id"]: s for s in spans}
    assert len(by_id) == len(spans)
    roots = [s for s in spans if s["parent_id"] is None]
    assert [r["span_id"] for r in roots] == [rid]
    root = roots[0]
    if root_name is not None:
        assert root["name"] == root_name
    assert root["tree_cost_nanos"] == nanos(RUN_USD)
    assert sum(s["cost_nanos"] or 0 for s in spans) == nanos(RUN_USD)

    tools = {s["name"]: s for s in spans if s["kind"] == "tool"}
    assert set(tools) == {"search", "lookup"}
    assert tools["search"]["cost_nanos"] == 4_000_000  # tool_prices
    assert tools["lookup"]["cost_nanos"] == 2_500_000  # reported by the tool itself
    for t in tools.values():
        chain, cur = [], t
        while cur["parent_id"] is not None:
            cur = by_id[cur["parent_id"]]  # every parent is stored
            chain.append(cur["kind"])
        assert cur is root and chain  # reaches the root through the graph's nodes
    llms = [s for s in spans if s["kind"] == "llm"]
    assert sorted(s["cost_nanos"] for s in llms) == [225_000, 250_000]
    assert all(s["model"] == TOOLS_MODEL for s in llms)


def _agent_factory() -> Any:
    try:
        from langchain.agents import create_agent
    except ImportError:  # pragma: no cover - langchain < 1.0
        from langgraph.prebuilt import create_react_agent as create_agent
    return create_agent


def test_prebuilt_agent_with_priced_and_self_reporting_tools(tracker, stub_openai):
    agent = _agent_factory()(chat(stub_openai, TOOLS_MODEL), [search, lookup])
    _script_tools(stub_openai)
    cfg = tracker.config(feature="agent", tenant_id="acme")
    out = agent.invoke({"messages": [("user", "what do LLMs cost?")]}, config=cfg)
    assert out["messages"][-1].content == "final answer"
    assert stub_openai.count() == 2
    _assert_tool_run(tracker, cfg["run_id"], root_name="LangGraph")
    for s in tracker.spans(cfg["run_id"]):
        assert (s["feature"], s["tenant_id"]) == ("agent", "acme")


def _hand_built_graph(llm: ChatOpenAI) -> Any:
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    bound = llm.bind_tools([search, lookup])

    def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode([search, lookup]))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: END})
    g.add_edge("tools", "agent")
    return g.compile()


def test_hand_built_state_graph_with_tool_node(tracker, stub_openai):
    graph = _hand_built_graph(chat(stub_openai, TOOLS_MODEL))
    _script_tools(stub_openai)
    cfg = tracker.config(feature="graph")
    out = graph.invoke({"messages": [("user", "go")]}, config=cfg)
    assert out["messages"][-1].content == "final answer"
    _assert_tool_run(tracker, cfg["run_id"], root_name="LangGraph")


async def test_hand_built_state_graph_ainvoke(tracker, stub_openai, ahttp):
    graph = _hand_built_graph(chat(stub_openai, TOOLS_MODEL, http_async_client=ahttp))
    _script_tools(stub_openai)
    cfg = tracker.config(feature="graph")
    out = await graph.ainvoke({"messages": [("user", "go")]}, config=cfg)
    assert out["messages"][-1].content == "final answer"
    _assert_tool_run(tracker, cfg["run_id"], root_name="LangGraph")


@tool
async def alookup(key: str) -> str:
    """Look a key up, asynchronously (reports its own cost)."""
    await adispatch_custom_event("costobs.cost", {"usd": "0.0025"})
    return f"value of {key}"


@pytest.mark.parametrize("mode", ["events", "messages", "updates"])
async def test_agent_astream_modes_with_async_tool(tracker, stub_openai, ahttp, mode):
    agent = _agent_factory()(chat(stub_openai, TOOLS_MODEL, http_async_client=ahttp, stream_usage=True),
                             [search, alookup])
    stub_openai.enqueue(
        StubReply("", tool_calls=[("search", {"query": "q"}), ("alookup", {"key": "k"})], usage=StubUsage(50, 10)),
        StubReply("final answer", usage=StubUsage(80, 5)),
    )
    cfg = tracker.config(feature=f"astream-{mode}")
    inp = {"messages": [("user", "go")]}
    if mode == "events":
        names = [ev["event"] async for ev in agent.astream_events(inp, config=cfg, version="v2")]
        assert "on_tool_end" in names
    else:
        assert [c async for c in agent.astream(inp, config=cfg, stream_mode=mode)]
    rc = rc_of(tracker, cfg)
    assert (rc.cost_usd, rc.llm_calls, rc.tool_calls, rc.estimated_calls) == (RUN_USD, 2, 2, 0)
    assert rc.by_model == {TOOLS_MODEL: LLM_USD}


# --------------------------------------------------------------------------------------------------
# 5. Attribution through nested chains
# --------------------------------------------------------------------------------------------------


def test_nested_chains_inherit_root_attribution(tracker, stub_openai):
    stub_openai.enqueue(StubReply("inner says hi", usage=StubUsage(30, 6), model=SERVED))
    llm = chat(stub_openai)
    inner = ChatPromptTemplate.from_messages([("user", "{q}")]) | llm | StrOutputParser()

    def call_inner(d: dict[str, str], config: RunnableConfig) -> str:
        return inner.invoke(d, config=config)

    outer = RunnableLambda(lambda x: {"q": x}) | RunnableLambda(call_inner) | RunnableLambda(str.upper)
    cfg = tracker.config(feature="nest", route="/ask", tenant_id="t-1", user_id="alice", prompt_version="v3",
                         experiment="b")
    cfg["metadata"].update({"ls_fake_key": "x", "langgraph_node": "n", "langsmith_project": "p"})
    assert outer.invoke("hello", config=cfg) == "INNER SAYS HI"

    rc = rc_of(tracker, cfg)
    alice = hmac.new(b"test-salt", b"alice", hashlib.sha256).hexdigest()
    assert rc.attributes == {"feature": "nest", "route": "/ask", "tenant_id": "t-1", "user": alice,
                             "prompt_version": "v3", "experiment": "b"}
    assert rc.cost_usd == usd(SERVED, 30, 6) and rc.llm_calls == 1
    spans = tracker.spans(cfg["run_id"])
    assert len(spans) >= 7 and [s["kind"] for s in spans].count("llm") == 1
    for s in spans:
        assert (s["feature"], s["route"], s["tenant_id"], s["user_hash"], s["prompt_version"]) == (
            "nest", "/ask", "t-1", alice, "v3",
        )
    with tracker.store.engine.connect() as conn:
        attrs = conn.execute(sa.text("SELECT attributes FROM costobs_runs WHERE run_id = :r"),
                             {"r": str(cfg["run_id"])}).scalar_one()
    assert "experiment" in attrs and "ls_" not in attrs and "langgraph" not in attrs and "langsmith" not in attrs


def test_graph_metadata_never_becomes_attributes(tracker, stub_openai):
    graph = _hand_built_graph(chat(stub_openai, TOOLS_MODEL))
    stub_openai.enqueue(StubReply("done", usage=StubUsage(5, 1)))
    cfg = tracker.config(feature="g", team="search")
    graph.invoke({"messages": [("user", "go")]}, config=cfg)
    assert rc_of(tracker, cfg).attributes == {"feature": "g", "team": "search"}


def test_reserved_attribute_names_refused(tracker):
    for bad in ("ls_model_name", "langgraph_step", "costobs_budget"):
        with pytest.raises(ConfigurationError):
            tracker.config(feature="x", **{bad: 1})


# --------------------------------------------------------------------------------------------------
# 6. ainvoke, astream, batch, abatch
# --------------------------------------------------------------------------------------------------


async def test_ainvoke_and_astream(tracker, stub_openai, ahttp):
    stub_openai.enqueue(
        StubReply("a", usage=StubUsage(11, 3), model=SERVED),
        StubReply("bcd", usage=StubUsage(17, 9, cached_tokens=7), model=SERVED),
    )
    c1, c2 = tracker.config(feature="async"), tracker.config(feature="async")
    llm = chat(stub_openai, http_async_client=ahttp)
    await llm.ainvoke("hi", config=c1)
    parts = [c async for c in llm.astream("hi", stream_usage=True, config=c2)]
    assert "".join(str(p.content) for p in parts) == "bcd"
    r1, r2 = rc_of(tracker, c1), rc_of(tracker, c2)
    assert (r1.cost_usd, r1.input_tokens, r1.output_tokens) == (usd(SERVED, 11, 3), 11, 3)
    assert (r2.cost_usd, r2.cache_read_tokens, r2.estimated_calls) == (usd(SERVED, 17, 9, 7), 7, 0)


def test_batch_without_run_id_each_item_is_its_own_run(tracker, stub_openai):
    stub_openai.responder = lambda req: StubReply("r", usage=StubUsage(10 * len(req["messages"][0]["content"]), 2))
    handler = tracker.langchain_handler()
    chat(stub_openai, "m-a").batch(["a", "bb", "ccc"], config={"callbacks": [handler], "metadata": {"feature": "bt"}})
    (row,) = tracker.rollup(by="feature", where={"feature": "bt"})
    assert (row.runs, row.llm_calls, row.input_tokens, row.output_tokens) == (3, 3, 60, 6)
    assert row.cost_usd == usd("m-a", 60, 6)


def test_batch_with_tracker_config_run_id(tracker, stub_openai):
    """LangChain uses a config's run_id for the FIRST item only (and warns); the other items get their own
    runs with the same attribution. To keep one run_id per item pass a list of configs."""
    stub_openai.responder = lambda req: StubReply("r", usage=StubUsage(10 * len(req["messages"][0]["content"]), 2))
    cfg = tracker.config(feature="bt1")
    with pytest.warns(RuntimeWarning, match="first element of the batch"):
        chat(stub_openai, "m-a").batch(["a", "bb", "ccc"], config=cfg)
    first = rc_of(tracker, cfg)
    assert (first.llm_calls, first.input_tokens) == (1, 10)
    (row,) = tracker.rollup(by="feature", where={"feature": "bt1"})
    assert (row.runs, row.llm_calls, row.input_tokens) == (3, 3, 60)

    cfgs = [tracker.config(feature="bt2") for _ in range(3)]
    chat(stub_openai, "m-a").batch(["a", "bb", "ccc"], config=cfgs)  # type: ignore[arg-type]
    assert [rc_of(tracker, c).input_tokens for c in cfgs] == [10, 20, 30]
    assert [rc_of(tracker, c).cost_usd for c in cfgs] == [usd("m-a", n, 2) for n in (10, 20, 30)]


async def test_abatch(tracker, stub_openai, ahttp):
    stub_openai.responder = lambda req: StubReply("r", usage=StubUsage(10 * len(req["messages"][0]["content"]), 2))
    cfgs = [tracker.config(feature="abt", tenant_id=f"t{i}") for i in range(4)]
    await chat(stub_openai, "m-b", http_async_client=ahttp).abatch(["a", "bb", "ccc", "dddd"], config=cfgs)  # type: ignore[arg-type]
    for i, c in enumerate(cfgs):
        rc = rc_of(tracker, c)
        assert (rc.input_tokens, rc.cost_usd, rc.attributes["tenant_id"]) == (10 * (i + 1), usd("m-b", 10 * (i + 1), 2),
                                                                             f"t{i}")
    (row,) = tracker.rollup(by="feature", where={"feature": "abt"})
    assert (row.runs, row.llm_calls, row.cost_usd) == (4, 4, sum(usd("m-b", 10 * n, 2) for n in range(1, 5)))


# --------------------------------------------------------------------------------------------------
# 7. Run continuation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flush_between", [False, True])
def test_same_config_twice_continues_the_run(tracker, stub_openai, flush_between):
    stub_openai.enqueue(StubReply("1", usage=StubUsage(100, 20), model=SERVED),
                        StubReply("2", usage=StubUsage(100, 20), model=SERVED))
    llm = chat(stub_openai)
    cfg = tracker.config(feature="cont", tenant_id="t")
    llm.invoke("first", config=cfg)
    if flush_between:
        assert tracker.flush(5)
        once = rc_of(tracker, cfg)
        assert (once.llm_calls, once.cost_usd) == (1, usd(SERVED, 100, 20))
    llm.invoke("second", config=cfg)
    rc = rc_of(tracker, cfg)
    assert rc.cost_usd == 2 * usd(SERVED, 100, 20) == Decimal("0.000054")
    assert (rc.llm_calls, rc.input_tokens, rc.output_tokens) == (2, 200, 40)
    assert rc.by_model == {SERVED: Decimal("0.000054")}
    assert (rc.status, rc.attributes) == ("ok", {"feature": "cont", "tenant_id": "t"})
    spans = tracker.spans(cfg["run_id"])
    assert len(spans) == 2 and all(s["span_id"] == str(cfg["run_id"]) for s in spans)
    with tracker.store.engine.connect() as conn:
        inv, n = conn.execute(sa.text("SELECT invocations, span_count FROM costobs_runs WHERE run_id = :r"),
                              {"r": str(cfg["run_id"])}).one()
    assert (inv, n) == (2, 2)
    (row,) = tracker.rollup(by="feature", where={"feature": "cont"})
    assert (row.runs, row.llm_calls, row.cost_usd) == (1, 2, Decimal("0.000054"))


def test_live_run_cost_while_the_run_is_open(tracker, stub_openai):
    stub_openai.enqueue(StubReply("1", usage=StubUsage(100, 20), model=SERVED),
                        StubReply("2", usage=StubUsage(300, 40), model=SERVED))
    llm = chat(stub_openai)
    seen: list[RunCost] = []

    def step(x: str, config: RunnableConfig) -> str:
        llm.invoke(x, config=config)
        live = tracker.run_cost(config["metadata"]["probe"])
        assert live is not None
        seen.append(live)
        return str(llm.invoke(x, config=config).content)

    cfg = tracker.config(feature="live")
    cfg["metadata"]["probe"] = str(cfg["run_id"])
    assert RunnableLambda(step).invoke("go", config=cfg) == "2"
    (live,) = seen
    assert (live.status, live.llm_calls, live.cost_usd, live.input_tokens) == ("running", 1, usd(SERVED, 100, 20), 100)
    final = rc_of(tracker, cfg)
    assert (final.status, final.llm_calls, final.cost_usd) == ("ok", 2, usd(SERVED, 100, 20) + usd(SERVED, 300, 40))


# --------------------------------------------------------------------------------------------------
# 8. Unattributed runs and required attribution
# --------------------------------------------------------------------------------------------------


def test_unattributed_run_in_rollup(tracker, stub_openai):
    stub_openai.enqueue(StubReply("x", usage=StubUsage(10, 10)), StubReply("y", usage=StubUsage(20, 10)))
    llm = chat(stub_openai, "m-a")
    llm.invoke("no metadata", config={"callbacks": [tracker.langchain_handler()]})
    llm.invoke("empty config", config=tracker.config())
    rows = tracker.rollup(by=["feature"])
    assert [r.key for r in rows] == [{"feature": "unattributed"}]
    assert (rows[0].runs, rows[0].cost_usd) == (2, usd("m-a", 10, 10) + usd("m-a", 20, 10))


def test_require_raises_before_any_request(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=PRICES, require=("feature",))
    llm = chat(stub_openai, "m-a")
    cfg = tracker.config(tenant_id="t")
    with pytest.raises(MissingAttributionError) as ei:
        llm.invoke("hi", config=cfg)
    assert isinstance(ei.value, RunAborted) and ei.value.reason == "missing_attribution"
    assert stub_openai.count() == 0
    rc = rc_of(tracker, cfg)
    assert (rc.status, rc.reason, rc.llm_calls, rc.cost_usd) == ("aborted", "missing_attribution", 0, 0)
    # also for a chain: refused at its first callback, before the model is reached
    with pytest.raises(MissingAttributionError):
        (ChatPromptTemplate.from_messages([("user", "{q}")]) | llm).invoke({"q": "x"}, config=tracker.config())
    assert stub_openai.count() == 0
    stub_openai.enqueue(StubReply("ok", usage=StubUsage(1, 1)))
    llm.invoke("hi", config=tracker.config(feature="f"))
    assert stub_openai.count() == 1


# --------------------------------------------------------------------------------------------------
# 9. LangChain's own LLM cache
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def llm_cache():
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import get_llm_cache, set_llm_cache

    before = get_llm_cache()
    set_llm_cache(InMemoryCache())
    yield
    set_llm_cache(before)


def test_llm_cache_hit_costs_nothing_and_reports_saving(tracker, stub_openai, llm_cache):
    stub_openai.enqueue(StubReply("cached answer", usage=StubUsage(400, 100, cached_tokens=100), model=SERVED))
    llm = chat(stub_openai)
    c1, c2 = tracker.config(feature="cache"), tracker.config(feature="cache")
    assert llm.invoke("identical", config=c1).content == "cached answer"
    assert llm.invoke("identical", config=c2).content == "cached answer"
    assert stub_openai.count() == 1
    first = usd(SERVED, 400, 100, 100)
    assert rc_of(tracker, c1).cost_usd == first == Decimal("0.0001125")
    hit = rc_of(tracker, c2)
    assert (hit.cost_usd, hit.input_tokens, hit.output_tokens, hit.by_model) == (0, 0, 0, {})
    (span,) = tracker.spans(c2["run_id"])
    assert (span["cache_hit"], span["cost_nanos"], span["saved_nanos"]) == (True, 0, nanos(first))
    (row,) = tracker.rollup(by="feature")
    assert (row.cost_usd, row.saved_usd, row.cache_hits, row.llm_calls, row.input_tokens) == (first, first, 1, 2, 400)


# --------------------------------------------------------------------------------------------------
# 10. Unknown models
# --------------------------------------------------------------------------------------------------


def test_unknown_model_unpriced_tokens_kept_warned_once(tracker, stub_openai, caplog):
    caplog.set_level(logging.WARNING, logger="costobs_callbacks")
    stub_openai.responder = lambda req: StubReply("?", usage=StubUsage(40, 8))
    llm = chat(stub_openai, UNKNOWN)
    cfgs = [tracker.config(feature="unk") for _ in range(3)]
    for c in cfgs:
        llm.invoke("hi", config=c)
    for c in cfgs:
        rc = rc_of(tracker, c)
        assert (rc.cost_usd, rc.unpriced_calls, rc.input_tokens, rc.output_tokens) == (0, 1, 40, 8)
        (span,) = tracker.spans(c["run_id"])
        assert (span["cost_nanos"], span["unpriced"], span["model"], span["input_tokens"]) == (None, True, UNKNOWN, 40)
    (row,) = tracker.rollup(by="model")
    assert (row.key, row.unpriced_calls, row.llm_calls, row.cost_usd, row.input_tokens) == (
        {"model": UNKNOWN}, 3, 3, 0, 120,
    )
    warned = [r for r in caplog.records if UNKNOWN in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


# --------------------------------------------------------------------------------------------------
# 11. Rollups
# --------------------------------------------------------------------------------------------------


RUNS = [  # feature, tenant, user, model, input, output
    ("search", "acme", "u1", "m-a", 1000, 100),
    ("search", "acme", "u2", "m-b", 500, 50),
    ("search", "globex", "u1", "m-a", 300, 30),
    ("chat", "globex", "u3", "m-b", 2000, 700),
    ("chat", None, "u3", "m-a", 10, 1),
]


@pytest.fixture
def rollup_data(tracker, stub_openai):
    def reply(req: dict[str, Any]) -> StubReply:
        return StubReply("r", usage=StubUsage(*map(int, req["messages"][0]["content"].split())))

    stub_openai.responder = reply
    for feature, tenant, user, model, inp, out in RUNS:
        chat(stub_openai, model).invoke(f"{inp} {out}",
                                        config=tracker.config(feature=feature, tenant_id=tenant, user_id=user))
    return tracker


def _expected(key: Any) -> dict[Any, Decimal]:
    out: dict[Any, Decimal] = {}
    for r in RUNS:
        k = key(r)
        out[k] = out.get(k, Decimal(0)) + usd(r[3], r[4], r[5])
    return out


def test_rollup_by_keys_exact(rollup_data):
    t = rollup_data
    feat = t.rollup(by=["feature"])
    assert {r.key["feature"]: r.cost_usd for r in feat} == _expected(lambda r: r[0])
    assert [r.key["feature"] for r in feat] == ["search", "chat"]  # most expensive first
    s = by_key(feat, "feature")["search"]
    assert (s.runs, s.llm_calls, s.input_tokens, s.output_tokens, s.tool_calls) == (3, 3, 1800, 180, 0)
    assert s.avg_latency_ms is not None and s.max_latency_ms is not None and s.max_latency_ms >= s.avg_latency_ms

    assert {r.key["model"]: r.cost_usd for r in t.rollup(by="model")} == _expected(lambda r: r[3])
    assert {r.key["tenant_id"]: r.cost_usd for r in t.rollup(by="tenant_id")} == _expected(lambda r: r[1])

    def h(u: str) -> str:
        return hmac.new(b"test-salt", u.encode(), hashlib.sha256).hexdigest()

    assert {r.key["user"]: r.cost_usd for r in t.rollup(by="user")} == _expected(lambda r: h(r[2]))
    two = t.rollup(by=["feature", "tenant_id"])
    assert {(r.key["feature"], r.key["tenant_id"]): r.cost_usd for r in two} == _expected(lambda r: (r[0], r[1]))

    total = t.rollup(by=[])
    assert len(total) == 1 and total[0].key == {} and total[0].runs == 5
    with t.store.engine.connect() as conn:
        span_sum = conn.execute(sa.text("SELECT SUM(cost_nanos) FROM costobs_spans")).scalar_one()
    assert total[0].cost_usd == sum(_expected(lambda r: 0).values()) == Decimal(span_sum) * NANO
    assert sum(r.cost_usd for r in feat) == total[0].cost_usd


def test_rollup_where_filters(rollup_data):
    t = rollup_data
    (row,) = t.rollup(by="feature", where={"tenant_id": "acme"})
    assert (row.key, row.cost_usd, row.runs) == ({"feature": "search"}, usd("m-a", 1000, 100) + usd("m-b", 500, 50), 2)
    (row,) = t.rollup(by="feature", where={"tenant_id": None})
    assert (row.key, row.cost_usd) == ({"feature": "chat"}, usd("m-a", 10, 1))
    rows = t.rollup(by="tenant_id", where={"feature": "search", "model": ["m-a"]})
    assert {r.key["tenant_id"]: r.cost_usd for r in rows} == {"acme": usd("m-a", 1000, 100),
                                                              "globex": usd("m-a", 300, 30)}
    assert t.rollup(by="feature", where={"feature": "nope"}) == []


def test_rollup_buckets_and_time_window(rollup_data):
    t = rollup_data
    assert t.flush(5)
    with t.store.engine.connect() as conn:
        hours = sorted(conn.execute(sa.text("SELECT DISTINCT hour FROM costobs_spans")).scalars())
        starts = conn.execute(sa.text("SELECT MIN(start_at), MAX(start_at) FROM costobs_spans")).one()
    total = _expected(lambda r: 0)[0]
    hourly = t.rollup(by="feature", bucket="hour")
    assert {r.bucket_start for r in hourly} == {datetime.fromtimestamp(h * 3600, UTC) for h in hours}
    assert sum(r.cost_usd for r in hourly) == total
    daily = t.rollup(by=[], bucket="day")
    assert {r.bucket_start for r in daily} == {datetime.fromtimestamp(h // 24 * 86400, UTC) for h in hours}
    assert sum(r.cost_usd for r in daily) == total
    for r in daily:
        assert r.bucket_start is not None and r.bucket_start.tzinfo is not None
        assert r.bucket_start.hour == 0

    lo = datetime.fromisoformat(str(starts[0])).replace(tzinfo=UTC)
    hi = datetime.fromisoformat(str(starts[1])).replace(tzinfo=UTC)
    assert sum(r.cost_usd for r in t.rollup(by="feature", since=lo - timedelta(seconds=1))) == total
    assert t.rollup(by="feature", since=hi + timedelta(seconds=1)) == []
    assert t.rollup(by="feature", until=lo) == []  # until is exclusive
    assert sum(r.cost_usd for r in t.rollup(by="feature", until=hi + timedelta(seconds=1))) == total
    # a naive datetime is UTC
    assert t.rollup(by="feature", since=(hi + timedelta(seconds=1)).replace(tzinfo=None)) == []


def test_rollup_bad_arguments(tracker):
    with pytest.raises(ConfigurationError, match="unknown rollup key"):
        tracker.rollup(by=["feature", "colour"])
    with pytest.raises(ConfigurationError, match="unknown rollup key"):
        tracker.rollup(by="feature", where={"user_id": "x"})
    with pytest.raises(ConfigurationError, match="bucket"):
        tracker.rollup(by="feature", bucket="week")
    with pytest.raises(ConfigurationError, match="duplicate"):
        tracker.rollup(by=["feature", "feature"])


# --------------------------------------------------------------------------------------------------
# 12. Privacy
# --------------------------------------------------------------------------------------------------


def test_no_prompt_completion_or_raw_user_id_in_the_database(cost_tracker_factory, stub_openai, tmp_path):
    tracker = cost_tracker_factory("private.db", prices=PRICES, tool_prices=TOOL_PRICES)
    secret_user = "user-7f3a9c-private@example.com"
    prompt_text = "PROMPT-zebra-quasar-4412 tell me"
    completion_text = "COMPLETION-marmot-nebula-9981"
    tool_arg = "TOOLARG-walrus-comet-5150"
    stub_openai.enqueue(StubReply(completion_text, usage=StubUsage(10, 4), model=SERVED),
                        StubReply(completion_text, model=SERVED),  # no stream usage: estimated from the text
                        StubReply("", tool_calls=[("search", {"query": tool_arg})], usage=StubUsage(5, 5)),
                        StubReply(completion_text, usage=StubUsage(5, 5)),
                        StubReply(status=500, error_message=f"bad request about {prompt_text}"))
    llm = chat(stub_openai)
    llm.invoke(prompt_text, config=tracker.config(feature="p", user_id=secret_user))
    list(llm.stream(prompt_text, config=tracker.config(feature="p", user_id=secret_user)))
    agent = _agent_factory()(chat(stub_openai, TOOLS_MODEL), [search])
    agent.invoke({"messages": [("user", prompt_text)]}, config=tracker.config(feature="p", user_id=secret_user))
    with pytest.raises(openai.APIError):
        llm.invoke(prompt_text, config=tracker.config(feature="p", user_id=secret_user))
    tracker.close()
    files = sorted(tmp_path.glob("private.db*"))
    assert files
    blob = b"".join(f.read_bytes() for f in files)
    assert len(blob) > 10_000
    for needle in (secret_user, prompt_text, "zebra-quasar", completion_text, "marmot-nebula", tool_arg,
                   "walrus-comet"):
        assert needle.encode() not in blob, needle
        assert needle.encode("utf-16-le") not in blob, needle
    expected_hash = hmac.new(b"test-salt", secret_user.encode(), hashlib.sha256).hexdigest()
    assert expected_hash.encode() in blob


# --------------------------------------------------------------------------------------------------
# 13. Failures and cancellation
# --------------------------------------------------------------------------------------------------


def test_failed_call_recorded_as_error(tracker, stub_openai):
    stub_openai.enqueue(StubReply(status=500))
    cfg = tracker.config(feature="fail")
    with pytest.raises(openai.InternalServerError) as ei:
        chat(stub_openai).invoke("hi", config=cfg)
    rc = rc_of(tracker, cfg)
    assert (rc.status, rc.llm_calls, rc.cost_usd, rc.input_tokens, rc.estimated_calls) == ("error", 1, 0, 0, 0)
    (span,) = tracker.spans(cfg["run_id"])
    assert (span["status"], span["error"], span["cost_nanos"]) == ("error", type(ei.value).__name__, None)
    assert tracker.stats["internal_errors"] == 0


def test_failure_inside_a_chain_fails_the_run(tracker, stub_openai):
    stub_openai.enqueue(StubReply("fine", usage=StubUsage(10, 2), model=SERVED), StubReply(status=500))
    llm = chat(stub_openai)

    def twice(x: str, config: RunnableConfig) -> str:
        first = llm.invoke(x, config=config)
        return str(llm.invoke(str(first.content), config=config).content)

    cfg = tracker.config(feature="fail")
    with pytest.raises(openai.InternalServerError):
        RunnableLambda(twice).invoke("go", config=cfg)
    rc = rc_of(tracker, cfg)
    assert (rc.status, rc.llm_calls, rc.cost_usd) == ("error", 2, usd(SERVED, 10, 2))
    spans = tracker.spans(cfg["run_id"])
    assert sorted(s["status"] for s in spans) == ["error", "error", "ok"]


async def test_astream_broken_off_early_records_what_was_consumed(tracker, stub_openai, ahttp):
    enc = _o200k()
    text = "alpha beta gamma delta epsilon zeta eta theta"
    stub_openai.enqueue(StubReply(text, usage=StubUsage(999, 999), model=SERVED))
    cfg = tracker.config(feature="cancel")
    got = ""
    agen = chat(stub_openai, http_async_client=ahttp).astream("hi", config=cfg)
    async for chunk in agen:
        got += str(chunk.content)
        if got:
            break
    await agen.aclose()
    assert got and got != text
    rc = rc_of(tracker, cfg)
    assert rc.estimated_calls == 1
    assert (rc.input_tokens, rc.output_tokens) == (len(enc.encode("hi")) + 7, len(enc.encode(got)))
    assert rc.cost_usd == usd(SERVED, rc.input_tokens, rc.output_tokens)
    (span,) = tracker.spans(cfg["run_id"])
    assert span["estimated"] is True and span["status"] == "error" and span["error"] == "GeneratorExit"


def test_sync_stream_broken_off_early_records_what_was_consumed(tracker, stub_openai):
    enc = _o200k()
    stub_openai.enqueue(StubReply("red orange yellow green blue indigo violet", usage=StubUsage(999, 999)))
    cfg = tracker.config(feature="cancel")
    got = ""
    for chunk in chat(stub_openai, "m-a").stream("hi", config=cfg):
        got += str(chunk.content)
        if got:
            break
    rc = rc_of(tracker, cfg)  # the generator was closed by the break (CPython frees it at once)
    assert (rc.estimated_calls, rc.output_tokens) == (1, len(enc.encode(got)))
    assert rc.cost_usd == usd("m-a", rc.input_tokens, rc.output_tokens)


async def test_cancelled_task_mid_stream_records_what_was_consumed(tracker, stub_openai, ahttp):
    enc = _o200k()
    text = "one two three four five six seven eight nine"
    stub_openai.enqueue(StubReply(text, usage=StubUsage(999, 999), model=SERVED))
    cfg = tracker.config(feature="cancel")
    got: list[str] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in chat(stub_openai, http_async_client=ahttp).astream("hi", config=cfg):
            got.append(str(chunk.content))
            if "".join(got):
                first.set()
                await asyncio.sleep(3600)  # the app is busy with the chunk when it is cancelled

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):  # the abandoned generator is closed by asyncio's async-generator finalizer
        if not tracker.ledger.open_run_ids():
            break
        await asyncio.sleep(0.01)
    rc = rc_of(tracker, cfg)
    assert rc.status != "running"
    assert rc.estimated_calls == 1
    assert rc.output_tokens == len(enc.encode("".join(got)))


def test_not_our_exception_when_a_tool_fails(tracker, stub_openai):
    @tool
    def broken(x: str) -> str:
        """Always fails."""
        raise RuntimeError("tool broke")

    agent = _agent_factory()(chat(stub_openai, TOOLS_MODEL), [broken])
    stub_openai.enqueue(StubReply("", tool_calls=[("broken", {"x": "1"})], usage=StubUsage(5, 5)),
                        StubReply("recovered", usage=StubUsage(5, 5)))
    cfg = tracker.config(feature="tool-fail")
    try:
        out = agent.invoke({"messages": [("user", "go")]}, config=cfg)
        assert isinstance(out["messages"][-1], AIMessage)
    except RuntimeError as exc:  # depends on the agent's error handling; never ours
        assert str(exc) == "tool broke"
    spans = tracker.spans(cfg["run_id"])
    (tspan,) = [s for s in spans if s["kind"] == "tool"]
    assert (tspan["status"], tspan["error"]) == ("error", "RuntimeError")
    assert tracker.stats["internal_errors"] == 0


def test_a_text_llm_start_keeps_the_provider(cost_tracker_factory, stub_openai):
    """``on_llm_start`` (a completion model, not a chat model) reads the provider as chat models do."""
    from langchain_openai import OpenAI

    stub_openai.enqueue(StubReply("done", usage=StubUsage(12, 3)))
    tracker = cost_tracker_factory(prices={"m-text": {"input": "1", "output": "2"}})
    llm = OpenAI(base_url=stub_openai.base_url, api_key="sk-test", model="m-text", max_retries=0)
    cfg = tracker.config(feature="complete")
    llm.invoke("say done", config=cfg)
    assert tracker.flush(10)
    [span] = tracker.spans(cfg["run_id"])
    assert (span["kind"], span["model"], span["provider"], span["input_tokens"], span["output_tokens"]) == (
        "llm", "m-text", "openai", 12, 3)
    assert span["cost_nanos"] == 18_000
