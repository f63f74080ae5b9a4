"""LlamaIndex: attribution, costs, budgets and the loop guard, through the real framework.

Real ``llama_index.llms.openai.OpenAI`` clients talk HTTP to the local stub server; MockLLM /
MockEmbedding pipelines run over real in-memory ``VectorStoreIndex`` instances; FunctionAgent runs are real
llama-index workflows. Figures are exact: provider usage where the stub reports it, otherwise the
documented estimate (3 + per message 4 + text + tool calls, + the tools' JSON; the model's own
tiktoken encoding), recomputed here from what the stub actually received.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import threading
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import llama_index.core
import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.callbacks import CallbackManager
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.llms import ChatMessage, MockLLM
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai import OpenAI

from costobs_callbacks import Budget, BudgetExceededError, CostTracker, LoopDetectedError, RunAborted
from costobs_callbacks.integrations.llamaindex.instrument import adapter_of

pytestmark = pytest.mark.filterwarnings(  # llama-index-workflows inspects pydantic agents
    "ignore::pydantic.warnings.PydanticDeprecationWarning"
)

try:
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from stub_openai import StubReply, StubUsage

M = Decimal(1_000_000)
P_MINI = (Decimal("0.15"), Decimal("0.60"), Decimal("0.075"))
P_4O = (Decimal("2.5"), Decimal("10"), Decimal("1.25"))
P_MOCK = (Decimal("1"), Decimal("2"), Decimal("1"))
P_EMB = Decimal("0.02")
PRICES = {
    "gpt-4o-mini": {"input": P_MINI[0], "output": P_MINI[1], "cache_read": P_MINI[2]},
    "gpt-4o": {"input": P_4O[0], "output": P_4O[1], "cache_read": P_4O[2]},
    "MockLLM": {"input": P_MOCK[0], "output": P_MOCK[1], "cache_read": P_MOCK[2]},
    "MockEmbedding": {"input": P_EMB, "output": "0", "cache_read": "0"},
}
TOOL_PRICE = Decimal("0.01")


def cost(inp: int, out: int, prices: tuple[Decimal, Decimal, Decimal] = P_MINI, cached: int = 0) -> Decimal:
    return ((inp - cached) * prices[0] + cached * prices[2] + out * prices[1]) / M


# -- tokens, recomputed independently ----------------------------------------------------------------

_STATIC = Path(llama_index.core.__file__).parent / "_static" / "tiktoken_cache"


def _encoding(name: str) -> tiktoken.Encoding:
    """tiktoken encodings from the copies llama-index-core ships (no network)."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_STATIC)
    try:
        return tiktoken.get_encoding(name)
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


O200K = _encoding("o200k_base")
CL100K = _encoding("cl100k_base")


def tok(text: str) -> int:
    return len(O200K.encode_ordinary(text))


def calls_json(calls: list[tuple[str, dict[str, Any]]]) -> str:
    return json.dumps([{"name": n, "args": a} for n, a in calls])


def request_tokens(req: dict[str, Any]) -> int:
    """Everything a chat request carries: 3 + per message (4 + content + tool calls) + the tools."""
    n = 3
    for m in req["messages"]:
        n += 4 + tok(m.get("content") or "")
        if m.get("tool_calls"):
            n += tok(calls_json([(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                 for c in m["tool_calls"]]))
    if req.get("tools"):
        n += tok(json.dumps(req["tools"]))
    return n


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _settings_isolated():
    saved = (Settings._callback_manager, Settings._llm, Settings._embed_model)
    Settings._callback_manager = None
    yield
    Settings._callback_manager, Settings._llm, Settings._embed_model = saved


def _tracker(tmp_path: Path, **kw: Any) -> CostTracker:
    kw.setdefault("prices", PRICES)
    kw.setdefault("tool_prices", {"get_weather": TOOL_PRICE})
    return CostTracker(f"sqlite:///{tmp_path}/costs.db", user_salt="test-salt", **kw)


@pytest.fixture
def tracker(tmp_path):
    t = _tracker(tmp_path)
    yield t
    t.uninstrument_llamaindex()
    assert t.stats["internal_errors"] == 0  # nothing we could not read, no bug of ours swallowed
    t.close()


@pytest.fixture
def tr(tracker):
    """An instrumented tracker."""
    tracker.instrument_llamaindex()
    return tracker


def openai_llm(stub: Any, model: str = "gpt-4o-mini", **kw: Any) -> OpenAI:
    return OpenAI(api_base=stub.base_url, api_key="sk-test", model=model, max_retries=0, **kw)


def msgs(text: str = "hi") -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def get_weather(city: str) -> str:
    """Get the weather for a city."""
    return f"sunny in {city}"


def weather_tool() -> FunctionTool:
    return FunctionTool.from_defaults(get_weather)


def spans_by_kind(tracker: CostTracker, run_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in tracker.spans(run_id):
        out.setdefault(s["kind"], []).append(s)
    return out


# -- LLM calls: chat, complete, sync, async, streaming -------------------------------------------------


def test_chat_exact_usage_served_model_and_cache(tr, stub_openai):
    stub_openai.enqueue(StubReply("hello", usage=StubUsage(120, 7, cached_tokens=100, reasoning_tokens=2),
                                  model="gpt-4o-mini-2024-07-18"))
    llm = openai_llm(stub_openai)
    with tr.run(feature="chat", user_id="u-1", tenant_id="acme") as run:
        assert llm.chat(msgs()).message.content == "hello"
        live = run.cost
    expected = cost(120, 7, cached=100)
    assert (live.cost_usd, live.input_tokens, live.output_tokens) == (expected, 120, 7)
    assert (live.cache_read_tokens, live.reasoning_tokens, live.llm_calls, live.estimated_calls) == (100, 2, 1, 0)
    assert live.by_model == {"gpt-4o-mini-2024-07-18": expected}
    assert live.attributes["tenant_id"] == "acme" and live.attributes["user"] != "u-1"
    stored = tr.run_cost(run.run_id)
    assert (stored.cost_usd, stored.status, stored.llm_calls) == (expected, "ok", 1)
    (llm_span,) = spans_by_kind(tr, run.run_id)["llm"]
    assert (llm_span["name"], llm_span["model"], llm_span["provider"]) == ("OpenAI", "gpt-4o-mini-2024-07-18", "openai")
    assert llm_span["parent_id"] == run.run_id


def test_complete_and_async_calls(tr, stub_openai):
    stub_openai.enqueue(StubReply("c1", usage=StubUsage(11, 3)), StubReply("c2", usage=StubUsage(13, 5)),
                        StubReply("c3", usage=StubUsage(17, 2)))
    llm = openai_llm(stub_openai)

    async def go() -> Any:
        async with tr.run(feature="complete") as run:
            assert llm.complete("hi").text == "c1"
            assert (await llm.acomplete("hi")).text == "c2"
            assert (await llm.achat(msgs())).message.content == "c3"
            return run.cost

    live = asyncio.run(go())
    assert (live.llm_calls, live.input_tokens, live.output_tokens) == (3, 41, 10)
    assert live.cost_usd == cost(11, 3) + cost(13, 5) + cost(17, 2)
    assert stub_openai.count() == 3


def test_stream_without_usage_is_estimated_after_its_span_closed(tr, stub_openai):
    """Pitfall: the streamed LLM span exits before the stream is read; the end is matched by span id."""
    stub_openai.enqueue(StubReply("hello world, streamed", usage=StubUsage(99, 99)))
    llm = openai_llm(stub_openai)
    with tr.run(feature="stream") as run:
        gen = llm.stream_chat(msgs("stream me"))
        assert run.cost.llm_calls == 1 and run.cost.output_tokens == 0  # span exited, call still open
        parts = list(gen)
        live = run.cost
    assert parts[-1].message.content == "hello world, streamed"
    assert "stream_options" not in stub_openai.requests[-1]
    inp, out = request_tokens(stub_openai.requests[-1]), tok("hello world, streamed")
    assert inp == 3 + 4 + tok("stream me")
    assert (live.input_tokens, live.output_tokens, live.estimated_calls) == (inp, out, 1)
    assert live.cost_usd == cost(inp, out)
    (span,) = spans_by_kind(tr, run.run_id)["llm"]
    assert span["estimated"] and span["flags"] == "estimated"


def test_stream_with_usage_from_stream_options(tr, stub_openai):
    stub_openai.enqueue(StubReply("abc", usage=StubUsage(12, 7, cached_tokens=4)),
                        StubReply("defg", usage=StubUsage(20, 3)))
    llm = openai_llm(stub_openai, additional_kwargs={"stream_options": {"include_usage": True}})

    async def go() -> Any:
        async with tr.run(feature="stream") as run:
            assert list(llm.stream_chat(msgs()))[-1].message.content == "abc"
            assert [p async for p in await llm.astream_chat(msgs())][-1].message.content == "defg"
            return run.cost

    live = asyncio.run(go())
    assert (live.input_tokens, live.output_tokens, live.cache_read_tokens) == (32, 10, 4)
    assert (live.cost_usd, live.estimated_calls) == (cost(12, 7, cached=4) + cost(20, 3), 0)


def test_request_stream_usage_asks_openai_llms_for_stream_usage(tracker, stub_openai):
    tracker.instrument_llamaindex(request_stream_usage=True)
    stub_openai.enqueue(StubReply("abc", usage=StubUsage(12, 7)), StubReply("xyz", usage=StubUsage(5, 1)))
    llm = openai_llm(stub_openai)
    with tracker.run(feature="stream") as run:
        list(llm.stream_complete("hi"))
        llm.chat(msgs())  # not a stream: nothing added (OpenAI rejects stream_options there)
        live = run.cost
    assert stub_openai.requests[0]["stream_options"] == {"include_usage": True}
    assert "stream_options" not in stub_openai.requests[1]
    assert (live.input_tokens, live.output_tokens, live.estimated_calls) == (17, 8, 0)
    assert live.cost_usd == cost(12, 7) + cost(5, 1)


def test_abandoned_stream_is_recorded(tr, stub_openai):
    stub_openai.enqueue(StubReply("one two three four five six", usage=StubUsage(9, 9)))
    llm = openai_llm(stub_openai)
    with tr.run(feature="stream") as run:
        gen = llm.stream_chat(msgs())
        first = next(gen)
        gen.close()
        live = run.cost
    assert live.llm_calls == 1 and live.estimated_calls == 1
    assert live.output_tokens == tok(first.message.content or "")
    (span,) = spans_by_kind(tr, run.run_id)["llm"]
    assert span["status"] == "ok" and "stream_closed" in span["flags"]


def test_provider_error_is_recorded_and_propagates_unchanged(tr, stub_openai):
    import openai

    stub_openai.enqueue(StubReply(status=500))
    llm = openai_llm(stub_openai)
    with pytest.raises(openai.InternalServerError), tr.run(feature="err") as run:
        llm.chat(msgs())
    (span,) = spans_by_kind(tr, run.run_id)["llm"]
    assert (span["status"], span["error"], span["cost_nanos"]) == ("error", "InternalServerError", None)
    assert tr.run_cost(run.run_id).status == "error"
    assert tr.stats["internal_errors"] == 0


# -- lone calls: a model called on its own is recorded whole at its end ---------------------------------

_SPAN_FIELDS = ("kind", "name", "model", "provider", "status", "error", "input_tokens", "output_tokens",
                "cache_read_tokens", "cost_nanos", "tree_cost_nanos", "estimated", "cache_hit", "flags", "unpriced",
                "price_source", "price_input", "price_output", "price_cache_read")


def _lone_calls(llm: OpenAI) -> None:
    llm.complete("hi")
    llm.chat(msgs("hello"))
    asyncio.run(llm.achat(msgs("async")))
    list(llm.stream_chat(msgs("stream me")))  # the stub sends no stream usage: estimated
    gen = llm.stream_chat(msgs("abandoned"))
    next(gen)
    gen.close()


def _lone_replies() -> list[StubReply]:
    return [StubReply("c1", usage=StubUsage(11, 3, cached_tokens=4)), StubReply("c2", usage=StubUsage(13, 5)),
            StubReply("c3", usage=StubUsage(17, 2)), StubReply("streamed words", usage=StubUsage(99, 99)),
            StubReply("one two three four", usage=StubUsage(99, 99))]


def _lone_runs(tracker: CostTracker) -> list[str]:
    return [r.run_id for r in tracker.ledger.recent.values() if r.feature == "unattributed"]


def _row(span: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(span[k] for k in _SPAN_FIELDS)


def test_lone_calls_are_recorded_as_the_same_calls_in_a_run(tr, stub_openai):
    """A call with no tracked span above it and no ``tracker.run()`` around it, under a policy that cannot refuse
    it, opens nothing at its start and is recorded whole at its end (``Ledger.record_llm``): each is a run of its
    own with the figures, spans and flags the same call gets inside a run."""
    stub_openai.enqueue(*_lone_replies())
    _lone_calls(openai_llm(stub_openai))
    lone = _lone_runs(tr)
    assert len(lone) == 5
    # what this process remembers of each (run_cost's answer when the database is down), then what it stored
    live = [tr.ledger.recent_run(rid).snapshot() for rid in lone]
    stub_openai.enqueue(*_lone_replies())
    with tr.run(feature="in-run") as run:
        _lone_calls(openai_llm(stub_openai))  # a new client: the last one's async client died with its loop
    ref = tr.run_cost(run.run_id)
    inp = [11, 13, 17, request_tokens(stub_openai.requests[3]), request_tokens(stub_openai.requests[4])]
    assert sum(c.input_tokens for c in live) == ref.input_tokens == sum(inp)
    assert sum(c.output_tokens for c in live) == ref.output_tokens
    assert sum(c.cost_usd for c in live) == ref.cost_usd
    assert (sum(c.cache_read_tokens for c in live), sum(c.estimated_calls for c in live)) == (4, 2)
    assert [(c.llm_calls, c.status, c.attributes) for c in live] == [(1, "ok", {"feature": "unattributed"})] * 5
    assert live[0].cost_usd == cost(11, 3, cached=4) and live[0].by_model == {"gpt-4o-mini": cost(11, 3, cached=4)}
    tr.flush()
    stored = [tr.run_cost(rid) for rid in lone]
    assert stored == live
    lone_spans = [tr.spans(rid) for rid in lone]
    assert all(len(s) == 1 for s in lone_spans)
    in_run = spans_by_kind(tr, run.run_id)["llm"]
    assert sorted(_row(s[0]) for s in lone_spans) == sorted(_row(s) for s in in_run)
    for rid, (span,) in zip(lone, lone_spans, strict=True):
        assert (span["run_id"], span["parent_id"], span["feature"]) == (rid, None, "unattributed")
        # the span keeps LlamaIndex's id (a uuid4); its run is named by a UUIDv7, in time order for the store's indexes
        assert (uuid.UUID(span["span_id"]).version, uuid.UUID(rid).version) == (4, 7)
        assert span["latency_ms"] > 0 and span["start_at"] <= span["end_at"]
    assert lone == sorted(lone)
    assert "stream_closed" in lone_spans[4][0]["flags"]


def test_lone_call_errors_and_unpriced_models_take_the_general_end(tr, stub_openai):
    import openai

    stub_openai.enqueue(StubReply(status=500), StubReply("x", usage=StubUsage(7, 2), model="gpt-unpriced-x"))
    with pytest.raises(openai.InternalServerError):
        openai_llm(stub_openai).chat(msgs())
    openai_llm(stub_openai).complete("hi")  # served by a model without a price
    err_run, unpriced_run = _lone_runs(tr)
    assert tr.run_cost(err_run).status == "error"
    u = tr.run_cost(unpriced_run)
    assert (u.unpriced_calls, u.unpriced_models, u.cost_usd, u.input_tokens) == (1, ("gpt-unpriced-x",), 0, 7)
    tr.flush()
    (err,) = tr.spans(err_run)
    assert (err["status"], err["error"], err["cost_nanos"], err["latency_ms"] > 0) == (
        "error", "InternalServerError", None, True)
    (unp,) = tr.spans(unpriced_run)
    assert (unp["cost_nanos"], unp["unpriced"], unp["input_tokens"], unp["output_tokens"]) == (None, True, 7, 2)


def test_lone_calls_from_many_threads_and_tasks_are_each_their_own_run(tr):
    prompts = [f"thread {i} call {j}" for i in range(8) for j in range(25)]
    llm = MockLLM()

    def worker(i: int) -> None:
        for j in range(25):
            llm.complete(f"thread {i} call {j}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    async def tasks() -> None:
        await asyncio.gather(*(llm.acomplete(f"task {k}") for k in range(20)))

    asyncio.run(tasks())
    prompts += [f"task {k}" for k in range(20)]
    lone = _lone_runs(tr)
    assert len(lone) == len(set(lone)) == 220
    live = [tr.ledger.recent_run(rid).snapshot() for rid in lone]
    assert sorted(c.input_tokens for c in live) == sorted(tok(p) for p in prompts)  # MockLLM echoes its prompt
    assert all((c.llm_calls, c.output_tokens, c.status) == (1, c.input_tokens, "ok") for c in live)
    assert sum(c.cost_usd for c in live) == sum(cost(tok(p), tok(p), P_MOCK) for p in prompts)
    tr.flush()
    assert sum(r.llm_calls for r in tr.rollup("feature")) == 220


@pytest.mark.parametrize("policy", ["budget", "require"])
def test_a_policy_that_can_refuse_a_first_call_checks_it_before_it_is_sent(tmp_path, stub_openai, policy):
    """No lone shortcut when the tracker's own policy could refuse a call made on its own: it is checked at its
    start, before the request leaves."""
    kw: dict[str, Any] = {
        "budget": {"budget": Budget(max_cost_usd=Decimal("0.000001"))},
        "require": {"require": ("feature",)},
    }[policy]
    with _tracker(tmp_path, **kw) as t:
        t.instrument_llamaindex()
        try:
            assert not t.ledger.lone_calls
            llm = openai_llm(stub_openai, max_tokens=4000)
            with pytest.raises(RunAborted) as ei:
                llm.complete("a prompt long enough to cost more than the budget allows " * 20)
            assert ei.value.reason == {"budget": "max_cost_usd", "require": "missing_attribution"}[policy]
            assert stub_openai.count() == 0
        finally:
            t.uninstrument_llamaindex()


def test_which_tracker_policies_let_lone_calls_skip_their_start(tmp_path):
    from costobs_callbacks import LoopPolicy

    cases = [({}, True), ({"loops": LoopPolicy(max_identical_model_requests=2)}, True),
             ({"budget": Budget(max_seconds=60)}, False), ({"budget": Budget(max_llm_calls=3)}, False)]
    for i, (kw, lone) in enumerate(cases):
        with CostTracker(f"sqlite:///{tmp_path}/p{i}.db", user_salt="s", **kw) as t:
            assert t.ledger.lone_calls is lone, kw


def test_concurrent_async_runs_are_exact_without_cross_talk(tr, stub_openai):
    def responder(req: dict[str, Any]) -> StubReply:
        i = int(req["messages"][-1]["content"].split()[-1])
        return StubReply(f"answer {i}", usage=StubUsage(100 + i, 10 + i), delay_s=0.01 * (5 - i))

    stub_openai.responder = responder
    llm = openai_llm(stub_openai)

    async def one(i: int) -> tuple[str, Any]:
        async with tr.run(feature="gather", user_id=f"u{i}") as run:
            await llm.achat(msgs(f"question {i}"))
            await asyncio.sleep(0)
            await llm.achat(msgs(f"question {i}"))
            return run.run_id, run.cost

    async def go() -> list[tuple[str, Any]]:
        return await asyncio.gather(*(one(i) for i in range(5)))

    results = asyncio.run(go())
    assert len({rid for rid, _ in results}) == 5
    for i, (rid, live) in enumerate(results):
        assert (live.llm_calls, live.input_tokens, live.output_tokens) == (2, 2 * (100 + i), 2 * (10 + i))
        assert live.cost_usd == 2 * cost(100 + i, 10 + i)
        assert tr.run_cost(rid).cost_usd == live.cost_usd


def test_threads_with_copied_context_and_langchain_share_the_scope(tr, stub_openai):
    from langchain_openai import ChatOpenAI

    stub_openai.enqueue(StubReply("a", usage=StubUsage(10, 1)), StubReply("b", usage=StubUsage(20, 2)))
    llm = openai_llm(stub_openai)
    chat = ChatOpenAI(base_url=stub_openai.base_url, api_key="sk-test", model="gpt-4o-mini", max_retries=0)
    with tr.run(feature="mixed") as run:
        ctx = contextvars.copy_context()
        t = threading.Thread(target=ctx.run, args=(llm.chat, msgs()))
        t.start()
        t.join()
        chat.invoke("hi", config={"callbacks": [tr.langchain_handler()]})
        live = run.cost
    assert (live.llm_calls, live.input_tokens, live.output_tokens) == (2, 30, 3)
    assert live.cost_usd == cost(10, 1) + cost(20, 2)
    kinds = spans_by_kind(tr, run.run_id)
    assert sorted(s["name"] for s in kinds["llm"]) == ["ChatOpenAI", "OpenAI"]


def test_several_models_in_one_run_each_priced(tr, stub_openai):
    """Pitfall: one handler per model. Here one tracker prices every model of a run separately."""
    stub_openai.enqueue(StubReply("m", usage=StubUsage(10, 2)), StubReply("o", usage=StubUsage(30, 4)))
    mini, big, mock = openai_llm(stub_openai), openai_llm(stub_openai, model="gpt-4o"), MockLLM(max_tokens=3)
    with tr.run(feature="multi") as run:
        mini.chat(msgs())
        big.chat(msgs())
        out = mock.complete("ping").text
        live = run.cost
    assert out == "text text text"
    mock_cost = cost(tok("ping"), tok(out), P_MOCK)
    assert live.by_model == {"gpt-4o-mini": cost(10, 2), "gpt-4o": cost(30, 4, P_4O), "MockLLM": mock_cost}
    assert live.cost_usd == cost(10, 2) + cost(30, 4, P_4O) + mock_cost


def test_gpt4o_is_counted_with_its_own_encoding(tr, stub_openai):
    """Pitfall: gpt-4o tokenized with cl100k_base. It is o200k_base."""
    text = "Überraschung! Ωμέγα — 東京の天気は晴れです。 def f(x): return x**2"
    assert tok(text) != len(CL100K.encode_ordinary(text))
    stub_openai.enqueue(StubReply(text, usage=None))
    llm = openai_llm(stub_openai, model="gpt-4o")
    with tr.run(feature="enc") as run:
        llm.chat(msgs(text))
        live = run.cost
    assert (live.input_tokens, live.output_tokens) == (3 + 4 + tok(text), tok(text))
    assert live.cost_usd == cost(3 + 4 + tok(text), tok(text), P_4O)


# -- pitfalls of CustomLLM / MockLLM ---------------------------------------------------------------------


def test_custom_llm_chat_calling_complete_is_one_call(tr):
    llm = MockLLM()
    with tr.run(feature="mock") as run:
        reply = llm.chat(msgs("count me once")).message.content
        live = run.cost
    # MockLLM echoes the prompt chat() built and sent to complete(): that prompt is what is counted
    assert "count me once" in reply
    assert (live.llm_calls, live.input_tokens, live.output_tokens) == (1, tok(reply), tok(reply))
    assert live.cost_usd == cost(tok(reply), tok(reply), P_MOCK)
    (span,) = spans_by_kind(tr, run.run_id)["llm"]
    assert (span["name"], span["model"], span["estimated"]) == ("MockLLM", "MockLLM", True)


class _ReportingLLM(llama_index.core.llms.CustomLLM):
    """A custom LLM whose complete() reports its usage in ``raw``, as a provider's response does, and whose chat()
    calls it and hands back a chat response without it."""

    @llama_index.core.llms.callbacks.llm_chat_callback()
    def chat(self, messages: Any, **kwargs: Any) -> Any:
        from llama_index.core.llms import ChatResponse

        reply = self.complete(" ".join(str(m.content) for m in messages))
        return ChatResponse(message=ChatMessage(role="assistant", content=reply.text))

    @property
    def metadata(self) -> Any:
        from llama_index.core.llms import LLMMetadata

        return LLMMetadata(model_name="MockLLM")

    @llama_index.core.llms.callbacks.llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        from llama_index.core.llms import CompletionResponse

        return CompletionResponse(text="ok", raw={"usage": {"prompt_tokens": 21, "completion_tokens": 4}})

    @llama_index.core.llms.callbacks.llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError


def test_custom_llm_chat_takes_the_usage_its_inner_complete_reported(tr):
    with tr.run(feature="custom") as run:
        assert _ReportingLLM().chat(msgs("hello")).message.content == "ok"
        live = run.cost
    assert (live.llm_calls, live.input_tokens, live.output_tokens, live.estimated_calls) == (1, 21, 4, 0)
    assert live.cost_usd == cost(21, 4, P_MOCK)


def test_the_event_handler_is_on_the_dispatcher_only_while_needed(tr, stub_openai):
    """LLM calls are costed from the legacy events; the instrumentation event handler, which LlamaIndex calls for
    every event of the process, is put on the dispatcher only while a stream is read, an embedding model works, or
    an LLM without the legacy handler on its manager runs."""
    handler = adapter_of(tr).event_handler
    root = get_dispatcher()
    stub_openai.enqueue(StubReply("a", usage=StubUsage(5, 1)), StubReply("one two three", usage=StubUsage(9, 9)),
                        StubReply("b", usage=StubUsage(6, 2)))
    llm = openai_llm(stub_openai)
    with tr.run(feature="events") as run:
        llm.chat(msgs())
        assert handler not in root.event_handlers
        gen = llm.stream_chat(msgs("stream"))
        assert handler in root.event_handlers  # the stream's progress events: what streamed is billed on a close
        first = next(gen)
        gen.close()
        assert handler not in root.event_handlers
        # a component whose callback manager is not set when its span starts: LlamaIndex makes it one (from
        # Settings, where instrument_llamaindex() put the legacy handler), after our span handler has looked
        bare = openai_llm(stub_openai)
        bare.__dict__["callback_manager"] = None
        bare.chat(msgs())
        assert handler not in root.event_handlers
        MockEmbedding(embed_dim=4).get_text_embedding("some text")
        assert handler not in root.event_handlers
        live = run.cost
    assert (live.llm_calls, live.estimated_calls) == (4, 2)  # the closed stream and the embedding
    streamed_in, streamed_out = request_tokens(stub_openai.requests[1]), tok(first.message.content or "")
    assert live.input_tokens == 5 + streamed_in + 6 + tok("some text")
    assert live.output_tokens == 1 + streamed_out + 2
    assert live.cost_usd == cost(5, 1) + cost(streamed_in, streamed_out) + cost(6, 2) + tok("some text") * P_EMB / M


def test_custom_llm_stream_chat_and_achat_once(tr):
    llm = MockLLM(max_tokens=4)

    async def go() -> Any:
        async with tr.run(feature="mock") as run:
            streamed = list(llm.stream_chat(msgs("a")))[-1].message.content
            await llm.achat(msgs("b"))
            return run.cost, streamed

    live, streamed = asyncio.run(go())
    assert streamed == "text text text"  # MockLLM's last streamed text (its deltas say one more "text")
    assert live.llm_calls == 2
    assert live.output_tokens == tok(streamed) + tok("text text text text")


def _rag(emb: MockEmbedding, llm: MockLLM) -> Any:
    docs = [Document(text="The sky is blue."), Document(text="Grass is green.")]
    return VectorStoreIndex.from_documents(docs, embed_model=emb).as_query_engine(llm=llm, similarity_top_k=1)


def test_rag_pipeline_embeddings_retrieval_and_synthesis(tr):
    emb, llm = MockEmbedding(embed_dim=8), MockLLM()
    with tr.run(feature="ingest") as ingest:
        qe = _rag(emb, llm)
        live = ingest.cost
    emb_tokens = tok("The sky is blue.") + tok("Grass is green.")
    assert (live.llm_calls, live.input_tokens, live.cost_usd) == (1, emb_tokens, emb_tokens * P_EMB / M)
    with tr.run(feature="rag-answer", tenant_id="acme") as run:
        answer = qe.query("What colour is the sky?").response
        live = run.cost
    q = tok("What colour is the sky?")
    assert "What colour is the sky?" in answer  # MockLLM echoes its prompt
    assert (live.llm_calls, live.estimated_calls) == (2, 2)  # the query's embedding and one completion
    assert (live.input_tokens, live.output_tokens) == (q + tok(answer), tok(answer))
    assert live.cost_usd == q * P_EMB / M + cost(tok(answer), tok(answer), P_MOCK)
    assert live.by_model == {"MockEmbedding": q * P_EMB / M, "MockLLM": cost(tok(answer), tok(answer), P_MOCK)}
    names = {s["name"]: s for s in tr.spans(run.run_id)}  # the run tree, from LlamaIndex's spans
    assert {n: s["kind"] for n, s in names.items()} == {
        "rag-answer": "run", "RetrieverQueryEngine": "chain", "VectorIndexRetriever": "retriever",
        "MockEmbedding": "embedding", "CompactAndRefine": "chain", "MockLLM": "llm",
    }
    assert names["RetrieverQueryEngine"]["parent_id"] == run.run_id
    assert names["VectorIndexRetriever"]["parent_id"] == names["RetrieverQueryEngine"]["span_id"]
    assert names["MockEmbedding"]["parent_id"] == names["VectorIndexRetriever"]["span_id"]
    assert names["CompactAndRefine"]["parent_id"] == names["RetrieverQueryEngine"]["span_id"]
    assert names["MockLLM"]["parent_id"] == names["CompactAndRefine"]["span_id"]
    assert names["RetrieverQueryEngine"]["tree_cost_nanos"] == int(live.cost_usd * 10**9)


def test_aquery_is_not_counted_twice(tr):
    """Pitfall: counts double on aquery (MockLLM.acomplete calls complete)."""
    qe = _rag(MockEmbedding(embed_dim=8), MockLLM())
    with tr.run(feature="sync") as sync_run:
        qe.query("Where is the grass?")
        sync = sync_run.cost

    async def go() -> Any:
        async with tr.run(feature="async") as run:
            await qe.aquery("Where is the grass?")
            return run.cost

    live = asyncio.run(go())
    assert (live.llm_calls, live.input_tokens, live.output_tokens, live.cost_usd) == (
        sync.llm_calls, sync.input_tokens, sync.output_tokens, sync.cost_usd)
    assert live.llm_calls == 2


def test_ingestion_outside_a_scope_is_one_run(tr):
    emb = MockEmbedding(embed_dim=8, embed_batch_size=2)
    texts = ["one", "two", "three", "four", "five"]
    VectorStoreIndex.from_documents([Document(text=t) for t in texts], embed_model=emb)
    tr.flush()
    rows = tr.rollup(by=("feature",))
    (row,) = rows
    assert row.key == {"feature": "unattributed"}
    assert (row.runs, row.llm_calls, row.input_tokens) == (1, 3, sum(tok(t) for t in texts))


def test_totals_are_running_sums(tr):
    """Pitfall: totals re-summed from every stored event on each access. Here finished calls are not
    kept in memory; the run's totals are counters."""
    llm = MockLLM(max_tokens=1)
    prompts = [f"prompt {i}" for i in range(60)]
    with tr.run(feature="many") as run:
        for p in prompts:
            llm.complete(p)
        assert len(tr.ledger.spans) == 1  # only the open scope
        live = run.cost
    assert (live.llm_calls, live.output_tokens) == (60, 60 * tok("text"))
    assert live.input_tokens == sum(tok(p) for p in prompts)


def test_a_call_with_no_usage_in_a_run_is_counted_after_it_ends_and_exactly(tmp_path):
    """MockLLM reports no usage (its reply repeats the prompt). A call admitted in a ``tracker.run()`` scope (and a
    lone call) is
    recorded at its end with its prompt and reply left to count (``Ledger.record_scoped_llm``'s ``later``): the
    app's thread does not tokenize them; the exporter does before it writes the span, or whatever reads the run's
    totals first. A prompt over ``LATER_MAX_CHARS`` is counted at once. The live totals, the stored spans and the
    scope's tree cost are the exact counts either way."""
    from costobs_callbacks.integrations.llamaindex.calls import LATER_MAX_CHARS

    t = _tracker(tmp_path, export_delay=3600)  # nothing is written until flush(): the reads below settle
    t.instrument_llamaindex()
    try:
        llm = MockLLM()
        short = "What is the capital of France? Answer in one short sentence."
        long = "word " * (LATER_MAX_CHARS // 5 + 1)
        with t.run(feature="later") as scope:
            run = scope._span.run  # type: ignore[union-attr]
            llm.complete(short)
            assert [s.pending is not None for s in (run.pending or {})] == [True]
            assert (run.input, run.output, run.cost_nanos) == (0, 0, 0)  # not counted yet
            llm.complete(long)
            assert len(run.pending or {}) == 1  # the long prompt: counted at once
            assert (run.input, run.output) == (tok(long), tok(long))
            live = scope.cost
            assert not run.pending
        t.flush()
        want_in = tok(short) + tok(long)
        assert live is not None
        assert (live.llm_calls, live.input_tokens, live.output_tokens, live.estimated_calls) == (
            2, want_in, want_in, 2)
        assert live.cost_usd == cost(want_in, want_in, P_MOCK)
        kinds = spans_by_kind(t, scope.run_id)
        calls = sorted(kinds["llm"], key=lambda s: s["input_tokens"])
        assert [(s["input_tokens"], s["output_tokens"], s["flags"], s["estimated"]) for s in calls] == [
            (tok(short), tok(short), "estimated", True), (tok(long), tok(long), "estimated", True)]
        assert [Decimal(s["cost_nanos"]).scaleb(-9) for s in calls] == [
            cost(tok(short), tok(short), P_MOCK), cost(tok(long), tok(long), P_MOCK)]
        (root,) = kinds["run"]
        assert Decimal(root["tree_cost_nanos"]).scaleb(-9) == live.cost_usd
        stored = t.run_cost(scope.run_id)
        assert stored is not None and (stored.cost_usd, stored.input_tokens) == (live.cost_usd, want_in)
        lone = "A call on its own, outside any scope: its run ends with it."
        llm.complete(lone)  # a lone call: left for later too
        (lone_run,) = [r for r in t.ledger.recent.values() if r.feature == "unattributed"]
        assert list(lone_run.pending or {}) and lone_run.input == 0
        t.flush()  # the exporter settles it before writing it
        assert not lone_run.pending and lone_run.input == tok(lone)
        stored = t.run_cost(lone_run.run_id)
        assert stored is not None
        assert (stored.input_tokens, stored.output_tokens, stored.estimated_calls, stored.cost_usd) == (
            tok(lone), tok(lone), 1, cost(tok(lone), tok(lone), P_MOCK))
    finally:
        t.uninstrument_llamaindex()
        assert t.stats["internal_errors"] == 0
        t.close()


def test_count_later_false_counts_every_call_when_it_ends(tmp_path):
    """``CostTracker(count_later=False)``: nothing is left for the exporter's thread; the figures are the same."""
    from costobs_callbacks import ConfigurationError

    with pytest.raises(ConfigurationError, match="count_later"):
        _tracker(tmp_path, count_later="no")
    t = _tracker(tmp_path, count_later=False, export_delay=3600)
    t.instrument_llamaindex()
    try:
        prompt = "What is the capital of France? Answer in one short sentence."
        with t.run(feature="now") as scope:
            run = scope._span.run  # type: ignore[union-attr]
            MockLLM().complete(prompt)
            assert not run.pending and (run.input, run.output) == (tok(prompt), tok(prompt))
        t.flush()
        stored = t.run_cost(scope.run_id)
        assert stored is not None and stored.cost_usd == cost(tok(prompt), tok(prompt), P_MOCK)
    finally:
        t.uninstrument_llamaindex()
        t.close()


def test_calls_counted_later_from_many_threads_are_each_counted_once(tmp_path):
    """Six threads make calls in one run (copied context) while a seventh reads its totals and the exporter
    writes every few milliseconds: each call is settled by whichever thread comes first, and counted once; the
    live totals at the end, the stored run and the stored spans all equal the exact sums."""
    t = _tracker(tmp_path, export_delay=0.002)
    t.instrument_llamaindex()
    try:
        llm = MockLLM()
        prompts = [[f"thread {i} asks question number {j} about item {i * j}" for j in range(40)] for i in range(6)]
        reads: list[int] = []
        stop = threading.Event()
        with t.run(feature="threads") as scope:
            def ask(mine: list[str]) -> None:
                for p in mine:
                    llm.complete(p)

            def read() -> None:
                while not stop.is_set():
                    c = scope.cost
                    assert c is not None
                    reads.append(c.llm_calls)

            reader = threading.Thread(target=contextvars.copy_context().run, args=(read,))
            reader.start()
            workers = [threading.Thread(target=contextvars.copy_context().run, args=(ask, mine)) for mine in prompts]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            stop.set()
            reader.join()
            live = scope.cost
        t.flush()
        want = sum(tok(p) for mine in prompts for p in mine)
        assert live is not None and reads
        assert (live.llm_calls, live.input_tokens, live.output_tokens) == (240, want, want)
        assert live.cost_usd == cost(want, want, P_MOCK)
        stored = t.run_cost(scope.run_id)
        assert stored is not None
        assert (stored.llm_calls, stored.input_tokens, stored.output_tokens, stored.cost_usd) == (
            240, want, want, live.cost_usd)
        kinds = spans_by_kind(t, scope.run_id)
        assert sorted(s["input_tokens"] for s in kinds["llm"]) == sorted(tok(p) for mine in prompts for p in mine)
        assert Decimal(kinds["run"][0]["tree_cost_nanos"]).scaleb(-9) == live.cost_usd
    finally:
        t.uninstrument_llamaindex()
        assert t.stats["internal_errors"] == 0
        t.close()


def test_identical_model_requests_stop_the_run(tr):
    llm = MockLLM(max_tokens=1)
    with pytest.raises(LoopDetectedError) as ei, tr.run(feature="same"):
        for _ in range(5):
            llm.complete("same question")
    assert ei.value.reason == "model_repeat"
    assert tr.run_cost(ei.value.run_id).llm_calls == 2


# -- construction order, uninstrument, the stand-alone handler ----------------------------------------


def test_llm_built_before_instrument_and_before_settings_manager_reports_and_is_stopped(tracker, stub_openai):
    assert Settings._callback_manager is None
    llm = openai_llm(stub_openai)  # its CallbackManager was built with no handler at all
    mock = MockLLM()
    tracker.instrument_llamaindex()
    stub_openai.enqueue(StubReply("a", usage=StubUsage(10, 5)))
    with pytest.raises(BudgetExceededError) as ei, tracker.run(feature="old", budget=Budget(max_llm_calls=2)) as run:
        llm.chat(msgs())
        mock.complete("x")
        llm.chat(msgs())  # refused before it is sent
    assert ei.value.reason == "max_llm_calls"
    assert stub_openai.count() == 1
    stored = tracker.run_cost(run.run_id)
    assert (stored.status, stored.llm_calls) == ("aborted", 2)
    assert stored.cost_usd == cost(10, 5) + cost(tok("x"), tok("x"), P_MOCK)


def test_uninstrument_stops_tracking(tracker, stub_openai):
    llm = openai_llm(stub_openai)
    tracker.instrument_llamaindex()
    stub_openai.enqueue(StubReply("a", usage=StubUsage(10, 5)), StubReply("b", usage=StubUsage(10, 5)))
    llm.chat(msgs())
    handler = tracker.llamaindex_handler()
    assert handler in llm.callback_manager.handlers and handler in Settings.callback_manager.handlers
    tracker.uninstrument_llamaindex()
    assert handler not in llm.callback_manager.handlers
    assert Settings._callback_manager is None  # the manager instrument() created is gone again
    dispatcher = get_dispatcher()
    assert all("CostObs" not in type(h).__name__ for h in [*dispatcher.span_handlers, *dispatcher.event_handlers])
    with tracker.run(feature="after", budget=Budget(max_llm_calls=1)) as run:
        llm.chat(msgs())
        MockLLM().complete("x")
    assert tracker.run_cost(run.run_id).llm_calls == 0
    (row,) = [r for r in tracker.rollup(by=("feature",)) if r.key == {"feature": "unattributed"}]
    assert row.llm_calls == 1


def test_standalone_legacy_handler(tracker):
    """Without instrument(): the handler in a manager the app wires itself costs and guards."""
    handler = tracker.llamaindex_handler()
    llm = MockLLM(callback_manager=CallbackManager([handler]))
    with pytest.raises(BudgetExceededError), tracker.run(feature="legacy", budget=Budget(max_llm_calls=2)) as run:
        reply = llm.chat(msgs("legacy")).message.content  # chat -> complete: one call
        streamed = list(llm.stream_chat(msgs("again")))[-1].message.content
        llm.complete("refused")
    stored = tracker.run_cost(run.run_id)
    assert (stored.llm_calls, stored.status) == (2, "aborted")
    assert stored.input_tokens == tok(reply) + tok(streamed)
    assert stored.cost_usd == cost(tok(reply), tok(reply), P_MOCK) + cost(tok(streamed), tok(streamed), P_MOCK)


def test_standalone_legacy_handler_records_lone_calls_as_calls_in_a_run(tracker, stub_openai):
    """Without instrument(), a call with no traced event above it and no tracker.run() is a lone call too."""
    handler = tracker.llamaindex_handler()
    replies = [StubReply("c1", usage=StubUsage(11, 3, cached_tokens=4)), StubReply("abc def", usage=StubUsage(9, 9))]
    stub_openai.enqueue(*replies, *replies)
    llm = openai_llm(stub_openai, callback_manager=CallbackManager([handler]))

    def calls() -> None:
        llm.complete("hi")
        list(llm.stream_chat(msgs("stream me")))  # no stream usage: estimated

    calls()
    lone = _lone_runs(tracker)
    live = [tracker.ledger.recent_run(rid).snapshot() for rid in lone]
    with tracker.run(feature="in-run") as run:
        calls()
    ref = tracker.run_cost(run.run_id)
    assert [(c.llm_calls, c.status) for c in live] == [(1, "ok")] * 2
    assert sum(c.cost_usd for c in live) == ref.cost_usd == cost(11, 3, cached=4) + cost(
        request_tokens(stub_openai.requests[1]), tok("abc def"))
    assert (sum(c.input_tokens for c in live), sum(c.estimated_calls for c in live)) == (
        ref.input_tokens, ref.estimated_calls)
    assert [tracker.run_cost(rid) for rid in lone] == live
    assert sorted(_row(tracker.spans(rid)[0]) for rid in lone) == sorted(
        _row(s) for s in spans_by_kind(tracker, run.run_id)["llm"])


# -- agents: tools, tool prices, budgets and the loop guard ------------------------------------------


def test_function_agent_with_tool_estimates_everything_the_request_carries(tr, stub_openai):
    """Pitfall: agents' tool schemas missed. FunctionAgent streams without usage: estimated, tools in."""
    stub_openai.enqueue(StubReply("", tool_calls=[("get_weather", {"city": "Paris"})], usage=StubUsage(1, 1)),
                        StubReply("It is sunny in Paris.", usage=StubUsage(1, 1)))
    agent = FunctionAgent(tools=[weather_tool()], llm=openai_llm(stub_openai))

    async def go() -> Any:
        async with tr.run(feature="agent", user_id="u-9") as run:
            result = await agent.run("What is the weather in Paris?")
            return run, run.cost, str(result)

    run, live, result = asyncio.run(go())
    assert result == "It is sunny in Paris."
    r1, r2 = stub_openai.requests
    assert r1["tools"] and r2["messages"][-1] == {"role": "tool", "content": "sunny in Paris", "tool_call_id": "call_1"}
    in1, in2 = request_tokens(r1), request_tokens(r2)
    assert in1 > tok(json.dumps(r1["tools"])) > 20  # the schema is counted
    out1, out2 = tok(calls_json([("get_weather", {"city": "Paris"})])), tok("It is sunny in Paris.")
    assert (live.llm_calls, live.tool_calls, live.estimated_calls) == (2, 1, 2)
    assert (live.input_tokens, live.output_tokens) == (in1 + in2, out1 + out2)
    assert live.cost_usd == cost(in1, out1) + cost(in2, out2) + TOOL_PRICE
    spans = tr.spans(run.run_id)
    by_kind = {k: [s for s in spans if s["kind"] == k] for k in ("run", "chain", "llm", "tool")}
    (agent_span,) = by_kind["chain"]
    assert agent_span["name"] == "FunctionAgent" and agent_span["parent_id"] == run.run_id
    assert all(s["parent_id"] == agent_span["span_id"] for s in by_kind["llm"] + by_kind["tool"])
    (tool,) = by_kind["tool"]
    assert (tool["name"], Decimal(tool["cost_nanos"]) / 10**9) == ("get_weather", TOOL_PRICE)
    assert agent_span["tree_cost_nanos"] == int(live.cost_usd * 10**9)


def _looping_agent(stub: Any, same_args: bool = False) -> FunctionAgent:
    n = iter(range(10_000))

    def responder(req: dict[str, Any]) -> StubReply:
        city = "Paris" if same_args else f"city-{next(n)}"
        return StubReply("", tool_calls=[("get_weather", {"city": city})], usage=StubUsage(50, 20))

    stub.responder = responder
    return FunctionAgent(tools=[weather_tool()], llm=openai_llm(stub))


def test_agent_loop_stopped_by_budget_before_max_iterations(tmp_path, stub_openai):
    prices = {"gpt-4o-mini": {"input": "0", "output": "10", "cache_read": "0"}}
    with _tracker(tmp_path, prices=prices, tool_prices={}) as t:
        t.instrument_llamaindex(request_stream_usage=True)
        try:
            agent = _looping_agent(stub_openai)

            async def go() -> Any:
                async with t.run(feature="loop", budget=Budget(max_cost_usd="0.0005")) as run:
                    await agent.run("loop forever", max_iterations=20)
                return run

            with pytest.raises(BudgetExceededError) as ei:
                asyncio.run(go())
        finally:
            t.uninstrument_llamaindex()
        # each call costs 20 * $10/M = $0.0002: the third takes the run past $0.0005 and raises at its end
        assert stub_openai.count() == 3
        assert all(r["stream_options"] == {"include_usage": True} for r in stub_openai.requests)
        err = ei.value
        assert (err.reason, err.spent_usd) == ("max_cost_usd", Decimal("0.0006"))
        stored = t.run_cost(err.run_id)
        assert (stored.status, stored.reason, stored.llm_calls, stored.tool_calls) == ("aborted", "max_cost_usd", 3, 2)
        assert (stored.cost_usd, stored.estimated_calls) == (Decimal("0.0006"), 0)


def test_agent_call_refused_before_sending_by_its_estimate(tmp_path, stub_openai):
    prices = {"gpt-4o-mini": {"input": "1", "output": "0", "cache_read": "0"}}
    with _tracker(tmp_path, prices=prices, tool_prices={}) as t:
        t.instrument_llamaindex(request_stream_usage=True)
        try:
            agent = _looping_agent(stub_openai)

            async def go() -> None:
                async with t.run(feature="est", budget=Budget(max_cost_usd="0.00015")):
                    await agent.run("loop")

            with pytest.raises(BudgetExceededError) as ei:
                asyncio.run(go())
        finally:
            t.uninstrument_llamaindex()
    # call 1 (estimated at its prompt's tokens, < 150) costs 50 * $1/M; call 2's estimate (its messages and
    # the tools, > 100 tokens) would take the run past $0.00015: refused before it is sent
    assert stub_openai.count() == 1
    (r1,) = stub_openai.requests
    assert request_tokens(r1) < 150
    call = {"function": {"name": "get_weather", "arguments": json.dumps({"city": "city-0"})}}
    r2 = {"messages": [*r1["messages"], {"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "content": "sunny in city-0"}], "tools": r1["tools"]}
    assert ei.value.detail["prompt_tokens"] == request_tokens(r2) > 100
    assert ei.value.spent_usd == Decimal("0.00005")


def test_max_tool_calls_takes_effect_at_the_next_llm_call(tr, stub_openai):
    agent = _looping_agent(stub_openai)

    async def go() -> None:
        async with tr.run(feature="tools", budget=Budget(max_tool_calls=1)):
            await agent.run("loop")

    with pytest.raises(BudgetExceededError) as ei:
        asyncio.run(go())
    assert ei.value.reason == "max_tool_calls"
    assert stub_openai.count() == 2  # the second tool call was refused (it ran: LlamaIndex cannot stop it)
    stored = tr.run_cost(ei.value.run_id)
    assert (stored.tool_calls, stored.status) == (1, "aborted")


def test_identical_tool_calls_stop_the_agent(tr, stub_openai):
    agent = _looping_agent(stub_openai, same_args=True)

    async def go() -> None:
        async with tr.run(feature="stuck"):
            await agent.run("loop")

    with pytest.raises(LoopDetectedError) as ei:
        asyncio.run(go())
    assert ei.value.reason == "tool_repeat" and isinstance(ei.value, RunAborted)
    assert stub_openai.count() == 4  # the 4th identical call is refused; the 5th LLM call never goes out
    stored = tr.run_cost(ei.value.run_id)
    assert (stored.llm_calls, stored.tool_calls) == (4, 3)


def test_query_engine_stopped_by_budget(tr):
    qe = _rag(MockEmbedding(embed_dim=8), MockLLM())
    with pytest.raises(BudgetExceededError) as ei, tr.run(feature="q", budget=Budget(max_llm_calls=1)):
        qe.query("What colour is the sky?")  # the embedding is call 1; the completion is refused
    assert ei.value.reason == "max_llm_calls"


def test_a_call_that_passes_the_budget_raises_at_its_end(tr, stub_openai):
    stub_openai.enqueue(StubReply("long answer", usage=StubUsage(100, 20)),
                        StubReply("long streamed answer", usage=StubUsage(100, 20)))
    llm = openai_llm(stub_openai, additional_kwargs={"stream_options": {"include_usage": True}})
    with pytest.raises(BudgetExceededError) as ei, tr.run(feature="b1", budget=Budget(max_tokens=50)):
        llm.chat(msgs())
    assert (ei.value.reason, ei.value.spent) == ("max_tokens", 120)
    assert tr.run_cost(ei.value.run_id).cost_usd == cost(100, 20)
    seen: list[str] = []
    with pytest.raises(BudgetExceededError) as ei, tr.run(feature="b2", budget=Budget(max_tokens=50)):
        for part in llm.stream_chat(msgs()):  # raised where the stream is read, once it ends
            seen.append(part.delta or "")
    assert "".join(seen) == "long streamed answer"
    assert (ei.value.reason, stub_openai.count()) == ("max_tokens", 2)
    assert tr.run_cost(ei.value.run_id).cost_usd == cost(100, 20)


def test_embeddings_are_stopped_too(tr):
    emb = MockEmbedding(embed_dim=8, embed_batch_size=1)
    docs = [Document(text="first"), Document(text="second")]
    with pytest.raises(BudgetExceededError) as ei, tr.run(feature="ingest", budget=Budget(max_llm_calls=1)):
        VectorStoreIndex.from_documents(docs, embed_model=emb)
    assert ei.value.reason == "max_llm_calls"
    stored = tr.run_cost(ei.value.run_id)
    assert (stored.llm_calls, stored.input_tokens, stored.status) == (1, tok("first"), "aborted")


def test_missing_attribution_reaches_the_caller(tmp_path, stub_openai):
    with _tracker(tmp_path, require=("feature",)) as t:
        t.instrument_llamaindex()
        try:
            with pytest.raises(RunAborted) as ei:
                MockLLM().complete("no feature")
            assert ei.value.reason == "missing_attribution"
            with t.run(feature="ok") as run:
                MockLLM().complete("x")
            assert t.run_cost(run.run_id).llm_calls == 1
        finally:
            t.uninstrument_llamaindex()


def test_streaming_query_answer_read_inside_the_scope(tr):
    """A streaming query engine calls its LLM lazily, when the answer is read (outside the query's span):
    read inside ``tracker.run()``, it belongs to the run."""
    qe = VectorStoreIndex.from_documents([Document(text="The sky is blue.")], embed_model=MockEmbedding(
        embed_dim=8)).as_query_engine(llm=MockLLM(), streaming=True)
    with tr.run(feature="stream-rag") as run:
        answer = "".join(qe.query("What colour is the sky?").response_gen)
        live = run.cost
    q = tok("What colour is the sky?")
    assert (live.llm_calls, live.output_tokens) == (2, tok(answer))
    assert live.cost_usd == q * P_EMB / M + cost(tok(answer), tok(answer), P_MOCK)


def test_streaming_chat_engine_outside_a_scope_ends_with_its_stream(tr):
    """The chat engine's span exits before its answer streams: its run stays open until the stream ends."""
    from llama_index.core.chat_engine import SimpleChatEngine

    engine = SimpleChatEngine.from_defaults(llm=MockLLM())
    response = engine.stream_chat("Tell me about the sky")
    answer = "".join(response.response_gen)
    for _ in range(200):  # LlamaIndex finishes the stream in its own thread
        if not tr.ledger.open_run_ids():
            break
        threading.Event().wait(0.01)
    tr.flush()
    (row,) = tr.rollup(by=("feature",))
    assert (row.runs, row.llm_calls, row.output_tokens) == (1, 1, tok(answer))
    assert row.cost_usd == cost(tok(answer), tok(answer), P_MOCK)
    rid = row_run_id(tr)
    names = {s["name"]: s for s in tr.spans(rid)}
    root, llm = names["SimpleChatEngine"], names["MockLLM"]
    assert root["run_id"] == rid and root["parent_id"] is None and llm["parent_id"] == root["span_id"]
    assert (uuid.UUID(rid).version, uuid.UUID(root["span_id"]).version) == (7, 4)  # a run id in time order
    assert root["end_at"] >= llm["end_at"] and root["tree_cost_nanos"] == int(row.cost_usd * 10**9)
    assert tr.run_cost(rid).status == "ok"


def row_run_id(tracker: CostTracker) -> str:
    import sqlalchemy as sa

    with tracker.store.engine.connect() as conn:
        (rid,) = conn.execute(sa.text("select run_id from costobs_runs")).scalars()
    return str(rid)


def test_agent_workflow_run(tr, stub_openai):
    from llama_index.core.agent.workflow import AgentWorkflow

    stub_openai.enqueue(StubReply("", tool_calls=[("get_weather", {"city": "Rome"})], usage=StubUsage(40, 9)),
                        StubReply("Sunny.", usage=StubUsage(60, 2)))
    tr.instrument_llamaindex(request_stream_usage=True)
    agent = FunctionAgent(name="weather", description="weather", tools=[weather_tool()],
                          llm=openai_llm(stub_openai))
    flow = AgentWorkflow(agents=[agent], root_agent="weather")

    async def go() -> Any:
        async with tr.run(feature="workflow") as run:
            await flow.run(user_msg="Rome?")
            return run, run.cost

    run, live = asyncio.run(go())
    assert (live.llm_calls, live.tool_calls, live.estimated_calls) == (2, 1, 0)
    assert live.cost_usd == cost(40, 9) + cost(60, 2) + TOOL_PRICE
    (chain,) = spans_by_kind(tr, run.run_id)["chain"]
    assert chain["name"] == "AgentWorkflow"


def test_close_uninstruments(tmp_path, stub_openai):
    t = _tracker(tmp_path)
    t.instrument_llamaindex()
    handler = t.llamaindex_handler()
    t.close()
    dispatcher = get_dispatcher()
    assert all("CostObs" not in type(h).__name__ for h in [*dispatcher.span_handlers, *dispatcher.event_handlers])
    assert Settings._callback_manager is None or handler not in Settings._callback_manager.handlers
    MockLLM().complete("after close")  # nothing of the closed tracker runs


def test_standalone_handler_on_settings_manager_traces_a_query(tracker):
    """Without instrument(): the handler on a Settings manager the app sets traces the legacy tree."""
    Settings.callback_manager = CallbackManager([tracker.llamaindex_handler()])
    qe = _rag(MockEmbedding(embed_dim=8), MockLLM())  # built after: they share Settings' handlers
    with tracker.run(feature="legacy-rag") as run:
        answer = qe.query("What colour is the sky?").response
        live = run.cost
    q = tok("What colour is the sky?")
    assert (live.llm_calls, live.input_tokens, live.output_tokens) == (2, q + tok(answer), tok(answer))
    assert live.cost_usd == q * P_EMB / M + cost(tok(answer), tok(answer), P_MOCK)
    spans = {s["kind"] + ":" + s["name"]: s for s in tracker.spans(run.run_id)}
    assert set(spans) == {"run:legacy-rag", "chain:query", "retriever:retrieve", "embedding:MockEmbedding",
                          "chain:synthesize", "llm:MockLLM"}
    assert spans["embedding:MockEmbedding"]["parent_id"] == spans["retriever:retrieve"]["span_id"]
    assert spans["llm:MockLLM"]["parent_id"] == spans["chain:synthesize"]["span_id"]
    assert spans["chain:query"]["parent_id"] == run.run_id


# -- the three ways an LLM call opens give the same records ---------------------------------------------


class _UsageLLM(llama_index.core.llms.CustomLLM):
    """A custom LLM replying ``reply`` to ``complete`` and ``chat``, with ``usage`` (prompt, completion tokens) in
    its ``raw`` as a provider's response carries it, or no usage at all (``None``: the call is estimated)."""

    reply: str = "ok"
    usage: tuple[int, int] | None = None

    @property
    def metadata(self) -> Any:
        from llama_index.core.llms import LLMMetadata

        return LLMMetadata(model_name="MockLLM")

    def _raw(self) -> Any:
        for probe in _DURING_CALL:
            probe()
        return None if self.usage is None else {"usage": {"prompt_tokens": self.usage[0],
                                                          "completion_tokens": self.usage[1]}}

    @llama_index.core.llms.callbacks.llm_chat_callback()
    def chat(self, messages: Any, **kwargs: Any) -> Any:
        from llama_index.core.llms import ChatResponse

        return ChatResponse(message=ChatMessage(role="assistant", content=self.reply), raw=self._raw())

    @llama_index.core.llms.callbacks.llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        from llama_index.core.llms import CompletionResponse

        return CompletionResponse(text=self.reply, raw=self._raw())

    @llama_index.core.llms.callbacks.llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError


_DURING_CALL: list[Any] = []
"""What ``_UsageLLM`` calls while a call is in flight (a test's look at the adapter's state)."""
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # lone surrogates: not text an LLM gets


def _bare(llm: Any) -> Any:
    """``llm`` with no callback manager, so that LlamaIndex makes it one at the call, from ``Settings`` (cleared by
    the caller): no legacy handler, the call opens at its instrumentation start event."""
    llm.__dict__["callback_manager"] = None
    return llm


def test_the_three_llm_starts_record_the_same_calls(tr):
    """A call opened at its legacy start (the common case), at its instrumentation start event (an LLM whose manager
    has no legacy handler) and a lone call recorded whole at its end (``Ledger.record_llm``) give the same stored
    span and the same run totals, with or without provider usage, for chat and completion prompts alike."""
    adapter = adapter_of(tr)
    root = get_dispatcher()
    fields = _SPAN_FIELDS

    def totals(rc: Any) -> tuple[Any, ...]:
        return (rc.cost_usd, rc.input_tokens, rc.output_tokens, rc.llm_calls, rc.estimated_calls, rc.by_model,
                rc.status, rc.unpriced_calls)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompt=_TEXT, reply=_TEXT, chat=st.booleans(),
           usage=st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), echo=st.booleans())
    def check(prompt: str, reply: str, chat: bool, usage: tuple[int, int] | None, echo: bool) -> None:
        if echo:  # a reply that repeats its prompt (MockLLM's): the count cache answers the second count
            reply = prompt
        def call(llm: Any) -> None:
            if chat:
                llm.chat(msgs(prompt))
            else:
                llm.complete(prompt)

        runs = []
        with tr.run(feature="p") as run:  # the legacy start
            call(_UsageLLM(reply=reply, usage=usage))
        runs.append(run.run_id)
        saved = Settings._callback_manager
        Settings._callback_manager = None
        held: list[bool] = []
        _DURING_CALL.append(lambda: held.append(adapter.event_handler in root.event_handlers))
        try:
            with tr.run(feature="p") as run:  # the instrumentation start event
                call(_bare(_UsageLLM(reply=reply, usage=usage)))
        finally:
            Settings._callback_manager = saved
            _DURING_CALL.clear()
        assert held == [True]  # the event handler was on: the call was costed from its events
        runs.append(run.run_id)
        before = set(_lone_runs(tr))
        call(_UsageLLM(reply=reply, usage=usage))  # a lone call
        (lone,) = set(_lone_runs(tr)) - before
        live = tr.ledger.recent_run(lone).snapshot()
        rows = []
        for rid in runs:
            (span,) = spans_by_kind(tr, rid)["llm"]
            rows.append(tuple(span[k] for k in fields))
        (lone_span,) = tr.spans(lone)
        rows.append(tuple(lone_span[k] for k in fields))
        assert rows[0] == rows[1] == rows[2]
        t = [totals(tr.run_cost(rid)) for rid in runs] + [totals(live), totals(tr.run_cost(lone))]
        assert t[0] == t[1] == t[2] == t[3]
        # and the figures are the ones the call had: the provider's, else the documented estimate
        estimated_in = 3 + 4 + tok(prompt) if chat else tok(prompt)
        if usage is not None and usage != (0, 0):
            inp, out = usage
            if inp == 0:  # an input of 0 beside output tokens is malformed: the input is estimated (see _usage)
                inp = estimated_in
        else:
            inp, out = estimated_in, tok(reply)
        assert (rows[0][6], rows[0][7]) == (inp, out)
        assert t[0][0] == cost(inp, out, P_MOCK)

    check()


# -- the four LLM starts, pinned to one another ------------------------------------------------------------


class _PayloadLLM(_UsageLLM):
    """``_UsageLLM`` whose ``raw`` response carries ``usage`` as given: any value, a provider's report or garbage
    (``None``: no ``raw`` at all, the call is estimated)."""

    usage: Any = None

    def _raw(self) -> Any:
        return None if self.usage is None else {"usage": self.usage}


_COUNT = st.one_of(st.integers(0, 3000), st.none(), st.sampled_from([-3, "12", "x", True, 10**15, 2.5, 10**9 + 1]))
_USAGE = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={"prompt_tokens": _COUNT, "completion_tokens": _COUNT,
                                        "total_tokens": _COUNT,
                                        "prompt_tokens_details": st.fixed_dictionaries(
                                            {}, optional={"cached_tokens": _COUNT})}),
    st.fixed_dictionaries({"input_tokens": _COUNT, "output_tokens": _COUNT},
                          optional={"cache_read_input_tokens": _COUNT, "cache_creation_input_tokens": _COUNT}),
    st.sampled_from(["garbage", [1, 2], 7]),
)
_ROLE = st.sampled_from(["system", "user", "assistant", "tool"])
_TOOL_CALL = st.builds(lambda n, a: {"id": "c1", "type": "function", "function": {"name": n, "arguments": a}},
                       st.sampled_from(["get_weather", "search"]), st.sampled_from(['{"city": "Paris"}', "{}", "oops"]))


@st.composite
def _messages(draw: Any) -> list[ChatMessage]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        calls = draw(st.lists(_TOOL_CALL, max_size=2))
        out.append(ChatMessage(role=draw(_ROLE), content=draw(_TEXT),
                               additional_kwargs={"tool_calls": calls} if calls else {}))
    return out


_PROMPT = st.one_of(_TEXT, _messages())
"""A completion's prompt string, or a chat's messages."""


def _outcome(call: Any) -> Any:
    try:
        call()
    except RunAborted as err:
        return type(err).__name__, err.reason
    return None


def test_the_four_llm_starts_record_the_same_calls_and_take_the_same_decisions(tr, tmp_path):
    """An LLM call opened at its legacy start after ``instrument()`` (the common case), at its instrumentation start
    event (an LLM whose manager has no legacy handler), at the legacy start of the handler alone (no
    ``instrument()``), and a lone call recorded whole at its end (``Ledger.record_llm``), under the instrumented and
    the stand-alone handler alike: for the same random requests (completion prompts, chat messages with tool calls),
    usage payloads (malformed ones included) and budgets at their boundaries, each stores the same spans, keeps the
    same run totals and takes the same decisions (which call is refused, where the run stops)."""
    (tmp_path / "alone").mkdir()
    alone = _tracker(tmp_path / "alone")
    root = get_dispatcher()
    adapter = adapter_of(tr)

    def totals(rc: Any) -> tuple[Any, ...]:
        return (rc.cost_usd, rc.input_tokens, rc.output_tokens, rc.cache_read_tokens, rc.cache_write_tokens,
                rc.llm_calls, rc.estimated_calls, rc.by_model, rc.status, rc.reason, rc.unpriced_calls)

    def rows(tracker: CostTracker, run_id: str) -> list[tuple[Any, ...]]:
        return [_row(s) for s in spans_by_kind(tracker, run_id).get("llm", [])]

    def unnamed(rs: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [r[:1] + r[2:] for r in rs]

    def lone_rows(tracker: CostTracker, before: set[str]) -> list[tuple[Any, ...]]:
        runs = [r for r in tracker.ledger.recent.values() if r.feature == "unattributed" and r.run_id not in before]
        runs.sort(key=lambda r: r.started_perf)
        return [_row(s) for r in runs for s in tracker.spans(r.run_id)]

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prompts=st.tuples(_PROMPT, _PROMPT), reply=_TEXT, usage=_USAGE,
           max_tokens=st.none() | st.integers(1, 500),
           budget=st.none() | st.tuples(st.sampled_from(["first", "both", "any"]), st.integers(-1, 1),
                                        st.integers(1, 10**7)),
           echo=st.booleans())
    def check(prompts: tuple[Any, Any], reply: str, usage: Any, max_tokens: int | None,
              budget: tuple[str, int, int] | None, echo: bool) -> None:
        if isinstance(prompts[0], str) == isinstance(prompts[1], str) and prompts[0] == prompts[1]:
            prompts = (prompts[0], prompts[1] + "!" if isinstance(prompts[1], str) else
                       [*prompts[1], ChatMessage(role="user", content="again")])
        kw = {} if max_tokens is None else {"max_tokens": max_tokens}

        def calls(make: Any) -> list[Any]:
            """The two calls, each on an LLM of its own (LlamaIndex gives a bare LLM a manager at its first call)."""
            return [(lambda p=p: make().complete(p, **kw) if isinstance(p, str) else make().chat(p, **kw))
                    for p in prompts]

        if echo and isinstance(prompts[0], str):  # a reply that repeats the first prompt (MockLLM's)
            reply = prompts[0]

        def llm() -> _PayloadLLM:
            return _PayloadLLM(reply=reply, usage=usage)

        tr.instrument_llamaindex()
        with tr.run(feature="probe") as probe:  # what the two calls cost, unlimited
            for c in calls(llm):
                c()
        spent = [Decimal(r[9]) for r in rows(tr, probe.run_id)]
        limit: Budget | None = None
        if budget is not None and max_tokens is not None:
            which, delta, anything = budget
            nanos = {"first": spent[0], "both": sum(spent), "any": Decimal(anything)}[which] + delta
            limit = Budget(max_cost_usd=nanos / 10**9) if nanos > 0 else None

        def scoped(tracker: CostTracker, make: Any) -> tuple[str, list[Any]]:
            with tracker.run(feature="p", budget=limit) as run:
                decisions = [_outcome(c) for c in calls(make)]
            return run.run_id, decisions

        run_a, decisions_a = scoped(tr, llm)  # the legacy start, instrumented
        saved = Settings._callback_manager
        Settings._callback_manager = None
        try:  # the instrumentation start event: no legacy handler on the LLM's manager
            run_b, decisions_b = scoped(tr, lambda: _bare(llm()))
        finally:
            Settings._callback_manager = saved
        assert adapter.event_handler not in root.event_handlers
        lone_a: list[Any] = []
        if limit is None:  # a lone call
            before = {r.run_id for r in tr.ledger.recent.values()}
            for c in calls(llm):
                c()
            lone_a = lone_rows(tr, before)
        tr.uninstrument_llamaindex()

        def wired() -> _PayloadLLM:
            return _PayloadLLM(reply=reply, usage=usage, callback_manager=CallbackManager([alone.llamaindex_handler()]))

        run_c, decisions_c = scoped(alone, wired)  # the legacy start of the handler alone
        lone_c: list[Any] = []
        if limit is None:
            before = {r.run_id for r in alone.ledger.recent.values()}
            for c in calls(wired):
                c()
            lone_c = lone_rows(alone, before)

        assert decisions_a == decisions_c
        assert decisions_b == [None, None]  # nothing can reach the app without a legacy handler
        recorded = rows(tr, run_a)
        assert rows(tr, run_b) == recorded
        assert unnamed(rows(alone, run_c)) == unnamed(recorded)  # alone, a call is named by its payload's class_name
        assert totals(tr.run_cost(run_a)) == totals(tr.run_cost(run_b)) == totals(alone.run_cost(run_c))
        if limit is None:
            assert decisions_a == [None, None]
            assert lone_a == recorded
            assert unnamed(lone_c) == unnamed(recorded)
        else:
            cost_a = tr.run_cost(run_a).cost_usd
            stopped = [d for d in decisions_a if d is not None]
            assert all(d == ("BudgetExceededError", "max_cost_usd") for d in stopped)
            # "at most" is inclusive: a run that spends exactly its limit is not stopped by its spending
            if cost_a <= limit.max_cost_usd:
                assert all(r[4] == "ok" for r in recorded)

    try:
        check()
    finally:
        alone.close()


# -- a step inside an LLM call opened on its own -----------------------------------------------------------


class _ToolInsideLLM(_UsageLLM):
    """A custom LLM that calls a tool while its call is in flight (an LLM wrapping an agent, a router)."""

    @llama_index.core.llms.callbacks.llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        from llama_index.core.llms import CompletionResponse

        weather_tool().call(city="Paris")
        return CompletionResponse(text=self.reply, raw=self._raw())


@pytest.mark.parametrize("scoped", [True, False])
def test_a_tool_called_inside_an_llm_call_is_its_child_in_its_run(tr, scoped):
    """The tool's span is the LLM call's child, in the call's run, whether the call was opened at its start or, in a
    ``tracker.run()`` scope or on its own, is recorded whole at its end (its span then opens when the tool's does)."""
    llm = _ToolInsideLLM(usage=(30, 5))
    if scoped:
        with tr.run(feature="tool-inside") as run:
            llm.complete("weather?")
        rid = run.run_id
    else:
        before = set(_lone_runs(tr))
        llm.complete("weather?")
        (rid,) = set(_lone_runs(tr)) - before
    by_kind = spans_by_kind(tr, rid)
    (call,) = by_kind["llm"]
    (tool,) = by_kind["tool"]
    assert tool["parent_id"] == call["span_id"]
    assert (call["input_tokens"], call["output_tokens"]) == (30, 5)
    rc = tr.run_cost(rid)
    assert (rc.llm_calls, rc.tool_calls, rc.cost_usd) == (1, 1, cost(30, 5, P_MOCK) + TOOL_PRICE)
