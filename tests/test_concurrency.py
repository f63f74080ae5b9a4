"""Many runs at once through ONE handler: threads, asyncio tasks, LangGraph agents. Each run gets its own
token counts (the stub derives them from a marker in the prompt), feature and tenant; every run's figures
must come out exact, with nothing leaking from one run into another."""

from __future__ import annotations

import asyncio
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import httpx
import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig, RunnableLambda, RunnableParallel
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from costobs_callbacks import CostTracker

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-conc"
PRICES = {MODEL: {"input": "1.1", "output": "4.4", "cache_read": "0.11"}}
TOOL_PRICES = {"search": "0.0031"}
MARK = re.compile(r"\[\[p=(\d+) c=(\d+) k=(\d+)\]\]")
THREADS = 16
RUNS_PER_THREAD = 4
TASKS = 50


def usd(inp: int, out: int, cached: int = 0) -> Decimal:
    p = PRICES[MODEL]
    raw = ((inp - cached) * Decimal(p["input"]) + cached * Decimal(p["cache_read"]) + out * Decimal(p["output"]))
    return (raw / Decimal(1_000_000)).quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)


def marker(p: int, c: int, k: int) -> str:
    return f"[[p={p} c={c} k={k}]]"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def responder(req: dict[str, Any]) -> StubReply:
    """Usage from the marker in the newest message carrying one; cached = k % 5."""
    for msg in reversed(req["messages"]):
        m = MARK.search(_text(msg.get("content") or ""))
        if m:
            p, c, k = map(int, m.groups())
            return StubReply(f"answer {k}", usage=StubUsage(p, c, cached_tokens=k % 5))
    raise AssertionError("no marker in request")


@pytest.fixture
def tracker(cost_tracker_factory, stub_openai) -> CostTracker:
    stub_openai.responder = responder
    return cost_tracker_factory(prices=PRICES, tool_prices=TOOL_PRICES, export_delay=0.05)


@pytest.fixture
def http_clients() -> Iterator[Callable[[], httpx.Client]]:
    """Sync HTTP clients holding at most 5 connections: the stub keeps socketserver's listen backlog of 5,
    and a burst of 16 connects overflows it (connection resets). The runs still overlap in the handler."""
    made: list[httpx.Client] = []

    def make() -> httpx.Client:
        made.append(httpx.Client(timeout=30, limits=httpx.Limits(max_connections=5)))
        return made[-1]

    yield make
    for c in made:
        c.close()


def chat(stub: StubOpenAI, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0, **kw)


class Expect:
    """What each run should cost, and the per-feature / per-tenant totals."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict[str, dict[str, Any]] = {}

    def add(self, cfg: RunnableConfig, calls: list[tuple[int, int, int]], tools: int = 0) -> None:
        meta = cfg["metadata"]
        cost = sum((usd(p, c, k % 5) for p, c, k in calls), Decimal(0)) + tools * Decimal(TOOL_PRICES["search"])
        with self.lock:
            self.runs[str(cfg["run_id"])] = {
                "feature": meta["feature"], "tenant_id": meta["tenant_id"], "cost": cost,
                "input": sum(p for p, _, _ in calls), "output": sum(c for _, c, _ in calls),
                "cached": sum(k % 5 for _, _, k in calls), "llm_calls": len(calls), "tool_calls": tools,
            }

    def check(self, tracker: CostTracker) -> None:
        assert tracker.flush(30)
        for rid, e in self.runs.items():
            rc = tracker.run_cost(rid)
            assert rc is not None, rid
            got = (rc.cost_usd, rc.input_tokens, rc.output_tokens, rc.cache_read_tokens, rc.llm_calls, rc.tool_calls,
                   rc.status, rc.attributes)
            want = (e["cost"], e["input"], e["output"], e["cached"], e["llm_calls"], e["tool_calls"], "ok",
                    {"feature": e["feature"], "tenant_id": e["tenant_id"]})
            assert got == want, rid
            assert rc.by_model == {MODEL: e["cost"] - e["tool_calls"] * Decimal(TOOL_PRICES["search"])}
        for key in ("feature", "tenant_id"):
            want_cost: dict[str, Decimal] = defaultdict(Decimal)
            want_runs: dict[str, int] = defaultdict(int)
            want_calls: dict[str, int] = defaultdict(int)
            for e in self.runs.values():
                want_cost[e[key]] += e["cost"]
                want_runs[e[key]] += 1
                want_calls[e[key]] += e["llm_calls"]
            rows = tracker.rollup(by=key)
            assert {r.key[key]: r.cost_usd for r in rows} == dict(want_cost)
            assert {r.key[key]: r.runs for r in rows} == dict(want_runs)
            assert {r.key[key]: r.llm_calls for r in rows} == dict(want_calls)
        stats = tracker.stats
        assert (stats["internal_errors"], stats["dropped"], stats["failed"], stats["open_runs"]) == (0, 0, 0, 0)


def test_threads_many_runs_one_handler(tracker, stub_openai, http_clients):
    llm = chat(stub_openai, http_client=http_clients())
    prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("user", "{q}")])
    chain = prompt | llm
    expect = Expect()
    barrier = threading.Barrier(THREADS)

    def two_calls(x: dict[str, Any], config: RunnableConfig) -> str:
        a = chain.invoke({"q": x["q1"]}, config=config)
        b = chain.invoke({"q": x["q2"]}, config=config)
        return f"{a.content}|{b.content}"

    two = RunnableLambda(two_calls)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(RUNS_PER_THREAD):
            k = t * RUNS_PER_THREAD + i
            cfg = tracker.config(feature=f"feat-{k % 4}", tenant_id=f"tenant-{k % 3}")
            calls = [(100 + 7 * k, 10 + k % 13, k)]
            if k % 2:
                calls.append((50 + 3 * k, 1 + k % 7, k + 1))
                out = two.invoke({"q1": marker(*calls[0]), "q2": marker(*calls[1])}, config=cfg)
                assert out == f"answer {k}|answer {k + 1}"
            else:
                assert chain.invoke({"q": marker(*calls[0])}, config=cfg).content == f"answer {k}"
            expect.add(cfg, calls)

    with ThreadPoolExecutor(THREADS) as pool:
        for f in [pool.submit(worker, t) for t in range(THREADS)]:
            f.result()
    assert len(expect.runs) == THREADS * RUNS_PER_THREAD
    assert stub_openai.count() == sum(e["llm_calls"] for e in expect.runs.values())
    expect.check(tracker)


async def test_asyncio_tasks_at_once_one_handler(tracker, stub_openai):
    # a fresh async client (langchain-openai caches one across event loops); at most 5 connections (see
    # http_clients)
    http = httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=5))
    llm = chat(stub_openai, http_async_client=http)
    expect = Expect()
    start = asyncio.Event()

    async def one(k: int) -> None:
        cfg = tracker.config(feature=f"afeat-{k % 5}", tenant_id=f"atenant-{k % 2}")
        calls = [(200 + 11 * k, 3 + k % 17, k)]
        await start.wait()
        if k % 3 == 0:  # a streamed call with usage
            parts = [c async for c in llm.astream(marker(*calls[0]), stream_usage=True, config=cfg)]
            assert "".join(str(p.content) for p in parts) == f"answer {k}"
        else:
            assert (await llm.ainvoke(marker(*calls[0]), config=cfg)).content == f"answer {k}"
        if k % 4 == 1:  # a second invocation continues the same run
            calls.append((20 + k, 2, k + 2))
            await llm.ainvoke(marker(*calls[1]), config=cfg)
        expect.add(cfg, calls)

    tasks = [asyncio.create_task(one(k)) for k in range(TASKS)]
    await asyncio.sleep(0)
    start.set()
    try:
        await asyncio.gather(*tasks)
    finally:
        await http.aclose()
    assert len(expect.runs) == TASKS
    expect.check(tracker)


def test_parallel_branches_inside_one_run(tracker, stub_openai, http_clients):
    """One run, 12 LLM calls at once on executor threads (RunnableParallel and a batch inside it): the run's
    counters and the root's tree cost take every call exactly once."""
    llm = chat(stub_openai, http_client=http_clients())
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    branches = {f"b{i}": (lambda d, i=i: {"q": marker(400 + i, 7 + i, i)}) | prompt | llm for i in range(6)}

    def batch_more(_: Any, config: RunnableConfig) -> list[str]:
        outs = llm.batch([marker(900 + i, 3 * i, 100 + i) for i in range(6)], config=config)
        return [str(o.content) for o in outs]

    fan = RunnableParallel(**branches, more=RunnableLambda(batch_more))
    cfg = tracker.config(feature="fan", tenant_id="one")
    out = fan.invoke({}, config=cfg)
    assert out["more"] == [f"answer {100 + i}" for i in range(6)]
    calls = [(400 + i, 7 + i, i) for i in range(6)] + [(900 + i, 3 * i, 100 + i) for i in range(6)]
    expect = Expect()
    expect.add(cfg, calls)
    expect.check(tracker)
    spans = tracker.spans(cfg["run_id"])
    (root,) = [s for s in spans if s["parent_id"] is None]
    assert root["tree_cost_nanos"] == sum(s["cost_nanos"] or 0 for s in spans) == int(
        expect.runs[str(cfg["run_id"])]["cost"] / Decimal("1e-9"))


@tool
def search(query: str) -> str:
    """Search."""
    return f"found {query}"


def agent_responder(req: dict[str, Any]) -> StubReply:
    """First call of a run: call `search` (echoing the marker); after the tool answered: the final reply."""
    msgs = req["messages"]
    last = msgs[-1]
    m = MARK.search(_text(msgs[0 if msgs[0]["role"] == "user" else 1].get("content") or ""))
    assert m is not None
    p, c, k = map(int, m.groups())
    if last["role"] == "tool":
        return StubReply(f"answer {k}", usage=StubUsage(p + 40, c + 1, cached_tokens=(k + 1) % 5))
    return StubReply("", tool_calls=[("search", {"query": f"q{k}"})], usage=StubUsage(p, c, cached_tokens=k % 5))


def test_agents_in_threads_tool_spans_stay_in_their_run(tracker, stub_openai, http_clients):
    try:
        from langchain.agents import create_agent
    except ImportError:  # pragma: no cover
        from langgraph.prebuilt import create_react_agent as create_agent
    stub_openai.responder = agent_responder
    agent = create_agent(chat(stub_openai, http_client=http_clients()), [search])
    expect = Expect()
    n_threads, per = 8, 3

    def worker(t: int) -> None:
        for i in range(per):
            k = t * per + i
            cfg = tracker.config(feature=f"agent-{k % 2}", tenant_id=f"at-{k % 3}")
            p, c = 300 + 13 * k, 5 + k % 11
            out = agent.invoke({"messages": [("user", f"task {marker(p, c, k)}")]}, config=cfg)
            assert out["messages"][-1].content == f"answer {k}"
            expect.add(cfg, [(p, c, k), (p + 40, c + 1, k + 1)], tools=1)

    with ThreadPoolExecutor(n_threads) as pool:
        for f in [pool.submit(worker, t) for t in range(n_threads)]:
            f.result()
    expect.check(tracker)
    for rid in expect.runs:
        spans = tracker.spans(rid)
        assert {s["run_id"] for s in spans} == {rid}
        by_id = {s["span_id"]: s for s in spans}
        (tool_span,) = [s for s in spans if s["kind"] == "tool"]
        cur = tool_span
        while cur["parent_id"] is not None:
            cur = by_id[cur["parent_id"]]
        assert cur["span_id"] == rid
        assert cur["tree_cost_nanos"] == sum(s["cost_nanos"] or 0 for s in spans)
