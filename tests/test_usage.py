"""Provider usage, every shape, through one parser (``_usage``): what each adapter records and what it costs.

Real clients talk HTTP to the stub: ``langchain_anthropic.ChatAnthropic`` to its Anthropic ``/v1/messages``,
``ChatOpenAI`` and LlamaIndex's ``OpenAI`` to its chat completions. No Anthropic LLM for LlamaIndex is installed,
so the LlamaIndex side of Anthropic's usage runs through a real ``CustomLLM`` that returns Anthropic's raw usage in
``raw``, as such an LLM does, and through ``_usage.from_raw`` directly. Catalog prices (genai-prices) are used
where the point is the catalog's own rates (1-hour cache writes, web searches, service tiers).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import llama_index.core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_anthropic import ChatAnthropic
from langchain_openai import ChatOpenAI, OpenAI
from llama_index.core import Settings
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai import OpenAI as LlamaOpenAI

from costobs_callbacks import CostTracker, _usage
from costobs_callbacks._events import UsageDetail
from costobs_callbacks._pricing import MAX_TOKENS

try:
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from stub_openai import StubReply, StubUsage

SONNET = "claude-sonnet-4-20250514"

# claude-sonnet-4 (catalog): $3 in, $15 out, $0.3 cache read, $3.75 5-minute write, $6 1-hour write, $10/1000 searches
ONE_HOUR_USAGE = {  # Anthropic's input_tokens is the uncached prompt: 10k in all = 2k + 2k read + 6k written
    "input_tokens": 2000, "output_tokens": 1000, "cache_read_input_tokens": 2000, "cache_creation_input_tokens": 6000,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 6000},
}
# 2000 * 3 + 2000 * 0.3 + 6000 * 6 + 1000 * 15 = 6000 + 600 + 36000 + 15000 = 57600 USD-per-MTok-tokens
ONE_HOUR_USD = Decimal("0.0576")


@pytest.fixture(autouse=True)
def _settings_isolated():
    saved = (Settings._callback_manager, Settings._llm, Settings._embed_model)
    Settings._callback_manager = None
    yield
    Settings._callback_manager, Settings._llm, Settings._embed_model = saved


@pytest.fixture
def tracker(cost_tracker_factory) -> CostTracker:
    return cost_tracker_factory()  # catalog prices


def anthropic(stub: Any, **kw: Any) -> ChatAnthropic:
    return ChatAnthropic(model=SONNET, base_url=stub.url, api_key="sk-test", max_retries=0, **kw)  # type: ignore[call-arg]


def only_span(tracker: CostTracker, run_id: Any) -> dict[str, Any]:
    (span,) = tracker.spans(run_id)
    return span


def llm_spans(tracker: CostTracker, run_id: Any) -> list[dict[str, Any]]:
    return [s for s in tracker.spans(run_id) if s["kind"] == "llm"]


def run_cfg(tracker: CostTracker) -> dict[str, Any]:
    return dict(tracker.config(feature="usage", run_id=uuid.uuid4()))


# --------------------------------------------------------------------------------------------------
# Anthropic cache lifetimes and web searches (defect 5)
# --------------------------------------------------------------------------------------------------


def test_langchain_anthropic_one_hour_cache_writes_at_their_own_price(tracker, stub_openai):
    stub_openai.enqueue(StubReply("hi", raw_usage=ONE_HOUR_USAGE, model=SONNET))
    cfg = run_cfg(tracker)
    anthropic(stub_openai).invoke("hello", config=cfg)
    assert stub_openai.last_request()["path"] == "/v1/messages"
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    assert rc.cost_usd == ONE_HOUR_USD  # not 0.0396 (the writes at the 5-minute price), nor less
    assert (rc.input_tokens, rc.output_tokens, rc.cache_read_tokens, rc.cache_write_tokens) == (10_000, 1000, 2000,
                                                                                                6000)
    span = only_span(tracker, cfg["run_id"])
    assert span["flags"] is None and span["estimated"] is False
    assert span["cost_nanos"] == 57_600_000


def test_langchain_anthropic_stream_one_hour_writes(tracker, stub_openai):
    stub_openai.enqueue(StubReply("hi there, streamed", raw_usage=ONE_HOUR_USAGE, model=SONNET))
    cfg = run_cfg(tracker)
    text = "".join(str(c.content) for c in anthropic(stub_openai).stream("hello", config=cfg))
    assert text == "hi there, streamed"
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None and rc.cost_usd == ONE_HOUR_USD


def test_langchain_anthropic_five_minute_writes_and_web_searches(tracker, stub_openai):
    usage = {**ONE_HOUR_USAGE, "cache_creation": {"ephemeral_5m_input_tokens": 6000, "ephemeral_1h_input_tokens": 0},
             "server_tool_use": {"web_search_requests": 3}, "service_tier": "standard"}
    stub_openai.enqueue(StubReply("hi", raw_usage=usage, model=SONNET))
    cfg = run_cfg(tracker)
    anthropic(stub_openai).invoke("hello", config=cfg)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    # 6000 + 600 + 6000 * 3.75 + 15000 = 44100 -> $0.0441, + 3 searches at $0.01
    assert rc.cost_usd == Decimal("0.0441") + Decimal("0.03")
    assert only_span(tracker, cfg["run_id"])["flags"] is None


class _AnthropicRawLLM(llama_index.core.llms.CustomLLM):
    """A LlamaIndex LLM that returns what an Anthropic LLM's response carries in ``raw``: the message, its usage."""

    usage: dict[str, Any] = {}

    @property
    def metadata(self) -> Any:
        from llama_index.core.llms import LLMMetadata

        return LLMMetadata(model_name=SONNET)

    @llama_index.core.llms.callbacks.llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        from llama_index.core.llms import CompletionResponse

        return CompletionResponse(text="ok", raw={"id": "msg_1", "type": "message", "model": SONNET,
                                                  "usage": self.usage})

    @llama_index.core.llms.callbacks.llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        raise NotImplementedError


def test_llamaindex_anthropic_raw_usage_one_hour_writes_and_searches(cost_tracker_factory):
    tracker = cost_tracker_factory()
    tracker.instrument_llamaindex()
    try:
        llm = _AnthropicRawLLM(usage={**ONE_HOUR_USAGE, "server_tool_use": {"web_search_requests": 2}})
        with tracker.run(feature="li") as run:
            assert llm.complete("hello").text == "ok"
            live = run.cost
        assert live.cost_usd == ONE_HOUR_USD + Decimal("0.02")
        assert (live.input_tokens, live.cache_read_tokens, live.cache_write_tokens, live.estimated_calls) == (
            10_000, 2000, 6000, 0)
    finally:
        tracker.uninstrument_llamaindex()


def test_raw_anthropic_usage_to_one_form():
    parsed = _usage.from_raw({"model": SONNET, "usage": {**ONE_HOUR_USAGE, "server_tool_use": {
        "web_search_requests": 3, "web_fetch_requests": None}, "service_tier": "standard"}})
    assert parsed == _usage.Parsed((10_000, 1000, 2000, 6000, 0), (), UsageDetail(6000, None, 3))
    # an SDK object, as the anthropic client returns it
    from anthropic.types import Usage

    obj = Usage.model_validate(ONE_HOUR_USAGE)
    assert _usage.from_raw(type("Msg", (), {"usage": obj})()) == _usage.Parsed((10_000, 1000, 2000, 6000, 0), (),
                                                                               UsageDetail(6000))
    # writes given only by lifetime; a breakdown above the total is flagged and the larger billed
    only_lifetimes = {"input_tokens": 10, "output_tokens": 1,
                      "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 6}}
    assert _usage.from_mapping(only_lifetimes) == _usage.Parsed((20, 1, 0, 10, 0), (), UsageDetail(6))
    over = {**only_lifetimes, "cache_creation_input_tokens": 5}
    assert _usage.from_mapping(over) == _usage.Parsed((20, 1, 0, 10, 0), ("malformed_usage",), UsageDetail(6))


def test_langchain_usage_metadata_shapes():
    # langchain-anthropic 1.7: writes by lifetime, its cache_creation set to 0
    um = {"input_tokens": 10_000, "output_tokens": 1000, "total_tokens": 11_000,
          "input_token_details": {"cache_read": 2000, "cache_creation": 0, "ephemeral_5m_input_tokens": 1000,
                                  "ephemeral_1h_input_tokens": 5000}}
    assert _usage.from_langchain(um) == _usage.Parsed((10_000, 1000, 2000, 6000, 0), (), UsageDetail(5000))
    # langchain-anthropic 1.2: the same, its cache_creation the total of the two (was counted twice: 12,000 writes)
    um12 = {**um, "input_token_details": {**um["input_token_details"], "cache_creation": 6000}}
    assert _usage.from_langchain(um12) == _usage.Parsed((10_000, 1000, 2000, 6000, 0), (), UsageDetail(5000))
    # no write of either lifetime: cache_creation is the writes
    none = {**um, "input_token_details": {"cache_read": 2000, "cache_creation": 6000, "ephemeral_5m_input_tokens": 0,
                                          "ephemeral_1h_input_tokens": 0}}
    assert _usage.from_langchain(none) == _usage.Parsed((10_000, 1000, 2000, 6000, 0))
    # langchain-openai in the flex tier names its counts after the tier
    flex = {"input_tokens": 100, "output_tokens": 50, "input_token_details": {"flex_cache_read": 40, "flex": 60},
            "output_token_details": {"flex_reasoning": 10, "flex": 40}}
    assert _usage.from_langchain(flex, {"service_tier": "flex"}) == _usage.Parsed((100, 50, 40, 0, 10), (),
                                                                                   UsageDetail(0, "flex"))
    assert _usage.from_langchain(flex) == _usage.Parsed((100, 50, 40, 0, 10), (), UsageDetail(0, "flex"))
    plain = {"input_tokens": 12, "output_tokens": 3, "input_token_details": {"audio": 0, "cache_read": 2},
             "output_token_details": {"audio": 0, "reasoning": 1}}
    assert _usage.from_langchain(plain, {"service_tier": "default"}) == _usage.Parsed((12, 3, 2, 0, 1))
    assert _usage.from_langchain({"input_tokens": 0, "output_tokens": 0}) is None  # a stream without usage
    with pytest.raises(ValueError):
        _usage.from_langchain({"input_tokens": "many", "output_tokens": 1})


# --------------------------------------------------------------------------------------------------
# OpenAI service tiers
# --------------------------------------------------------------------------------------------------

# gpt-5 (catalog): $1.25 in, $0.125 cache read, $10 out; flex: $0.625, $0.0625, $5
FLEX_USAGE = StubUsage(10_000, 1000, cached_tokens=2000)


def gpt5(stub: Any, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model="gpt-5", max_retries=0, **kw)


@pytest.mark.parametrize(
    ("tier", "usd", "flags"),
    [
        # 8000 * 0.625 + 2000 * 0.0625 + 1000 * 5 = 10125
        ("flex", Decimal("0.010125"), None),
        # 8000 * 2.5 + 2000 * 0.25 + 1000 * 20 = 40500
        ("priority", Decimal("0.0405"), None),
        # no catalog price for "scale": the standard one, 8000 * 1.25 + 2000 * 0.125 + 1000 * 10 = 20250, flagged
        ("scale", Decimal("0.02025"), "tier_unpriced"),
        ("default", Decimal("0.02025"), None),
    ],
)
def test_langchain_openai_service_tier_priced_at_its_rate(tracker, stub_openai, tier, usd, flags):
    stub_openai.enqueue(StubReply("ok", usage=FLEX_USAGE, model="gpt-5", service_tier=tier))
    cfg = run_cfg(tracker)
    gpt5(stub_openai).invoke("hello", config=cfg)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None and rc.cost_usd == usd
    assert rc.cache_read_tokens == 2000  # read from flex_cache_read too
    assert only_span(tracker, cfg["run_id"])["flags"] == flags


def test_llamaindex_openai_service_tier(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory()
    tracker.instrument_llamaindex()
    try:
        stub_openai.enqueue(StubReply("ok", usage=FLEX_USAGE, model="gpt-5", service_tier="flex"),
                            StubReply("ok", usage=FLEX_USAGE, model="gpt-5", service_tier="scale"))
        llm = LlamaOpenAI(api_base=stub_openai.base_url, api_key="sk-test", model="gpt-5", max_retries=0)
        with tracker.run(feature="li") as run:
            llm.chat([ChatMessage(role="user", content="hi")])
            live = run.cost
        assert live.cost_usd == Decimal("0.010125")
        with tracker.run(feature="li") as run2:
            llm.chat([ChatMessage(role="user", content="hi")])
            live2 = run2.cost
        assert live2.cost_usd == Decimal("0.02025")
        (span,) = llm_spans(tracker, run2.run_id)
        assert span["flags"] == "tier_unpriced"
    finally:
        tracker.uninstrument_llamaindex()


# --------------------------------------------------------------------------------------------------
# Silent zeros and absurd counts (defect 3)
# --------------------------------------------------------------------------------------------------

MINI_PRICES = {"gpt-4o-mini": {"input": "0.15", "output": "0.6", "cache_read": "0.075"}}


def mini(stub: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model="gpt-4o-mini", max_retries=0)


def test_langchain_null_prompt_tokens_is_flagged_and_estimated(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=MINI_PRICES)
    stub_openai.enqueue(StubReply("ok", raw_usage={"prompt_tokens": None, "completion_tokens": 7, "total_tokens": 7}))
    cfg = run_cfg(tracker)
    mini(stub_openai).invoke("hello there", config=cfg)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    span = only_span(tracker, cfg["run_id"])
    assert span["flags"] == "malformed_usage,estimated" and span["estimated"] is True
    # the prompt counted as the estimate counts it: 3 + 4 + tokens("hello there") = 9; the reported 7 kept
    assert (rc.input_tokens, rc.output_tokens) == (9, 7)
    assert rc.cost_usd == (9 * Decimal("0.15") + 7 * Decimal("0.6")) / 1_000_000


def test_legacy_completion_without_completion_tokens_is_flagged_and_estimated(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices={"gpt-3.5-turbo-instruct": {"input": "1.5", "output": "2"}})
    stub_openai.enqueue(StubReply("one two three", raw_usage={"prompt_tokens": 12}))
    cfg = run_cfg(tracker)
    OpenAI(base_url=stub_openai.base_url, api_key="sk-test", model="gpt-3.5-turbo-instruct",
           max_retries=0).invoke("hello", config=cfg)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    span = only_span(tracker, cfg["run_id"])
    assert span["flags"] == "malformed_usage,estimated"
    assert (rc.input_tokens, rc.output_tokens) == (12, 3)  # "one two three": 3 tokens, counted
    assert rc.cost_usd == (12 * Decimal("1.5") + 3 * Decimal(2)) / 1_000_000


def test_cache_reads_above_the_input_are_flagged_and_clamped(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=MINI_PRICES)
    stub_openai.enqueue(StubReply("ok", usage=StubUsage(100, 10, cached_tokens=500)))
    cfg = run_cfg(tracker)
    mini(stub_openai).invoke("hello", config=cfg)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    assert only_span(tracker, cfg["run_id"])["flags"] == "malformed_usage"
    assert (rc.input_tokens, rc.cache_read_tokens) == (100, 100)
    assert rc.cost_usd == (100 * Decimal("0.075") + 10 * Decimal("0.6")) / 1_000_000


def test_an_absurd_count_is_flagged_implausible_and_capped(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=MINI_PRICES)
    stub_openai.enqueue(StubReply("ok", usage=StubUsage(10**15, 5)))
    cfg = run_cfg(tracker)
    mini(stub_openai).invoke("hello", config=cfg)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    assert only_span(tracker, cfg["run_id"])["flags"] == "implausible"
    assert rc.input_tokens == MAX_TOKENS
    assert rc.cost_usd == (MAX_TOKENS * Decimal("0.15") + 5 * Decimal("0.6")) / 1_000_000  # $150, not $150M


def test_llamaindex_null_prompt_tokens_is_flagged_and_estimated(cost_tracker_factory, stub_openai):
    tracker = cost_tracker_factory(prices=MINI_PRICES)
    tracker.instrument_llamaindex()
    try:
        stub_openai.enqueue(StubReply("ok", raw_usage={"prompt_tokens": None, "completion_tokens": 4,
                                                       "total_tokens": 4}))
        llm = LlamaOpenAI(api_base=stub_openai.base_url, api_key="sk-test", model="gpt-4o-mini", max_retries=0)
        with tracker.run(feature="li") as run:
            llm.chat([ChatMessage(role="user", content="hello there")])
            live = run.cost
        (span,) = llm_spans(tracker, run.run_id)
        assert span["flags"] == "malformed_usage,estimated" and span["estimated"] is True
        assert (live.input_tokens, live.output_tokens) == (9, 4)
    finally:
        tracker.uninstrument_llamaindex()


@pytest.mark.parametrize(
    ("usage", "tokens", "flags", "missing"),
    [
        ({"prompt_tokens": 10}, (10, 0, 0, 0, 0), ("malformed_usage",), _usage.MISSING_OUTPUT),
        ({"prompt_tokens": None, "completion_tokens": 5}, (0, 5, 0, 0, 0), ("malformed_usage",),
         _usage.MISSING_INPUT),
        ({"prompt_tokens": 0, "completion_tokens": 5}, (0, 5, 0, 0, 0), ("malformed_usage",), _usage.MISSING_INPUT),
        ({"input_tokens": None, "output_tokens": None}, (0, 0, 0, 0, 0), ("malformed_usage",), 3),
        ({"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 9}},
         (10, 5, 0, 0, 5), ("malformed_usage",), 0),
        ({"prompt_tokens": 10**15, "completion_tokens": 10**9},
         (MAX_TOKENS, 10**9, 0, 0, 0), ("implausible",), 0),
        ({"input_tokens": 10, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 4},
          "output_tokens_details": {"reasoning_tokens": 1}}, (10, 2, 4, 0, 1), (), 0),  # OpenAI Responses
    ],
)
def test_malformed_mappings(usage, tokens, flags, missing):
    parsed = _usage.from_mapping(usage)
    assert parsed is not None
    assert (parsed.tokens, parsed.flags, parsed.missing) == (tokens, flags, missing)


def test_complete_takes_only_the_missing_parts_from_the_estimate():
    p = _usage.Parsed((0, 5, 30, 10, 0), ("malformed_usage",), None, _usage.MISSING_INPUT)
    assert _usage.complete(p, (25, 99, 0, 0, 0)) == (40, 5, 30, 10, 0)  # at least the cache counts
    q = _usage.Parsed((12, 0, 0, 0, 4), ("malformed_usage",), None, _usage.MISSING_OUTPUT)
    assert _usage.complete(q, (99, 3, 0, 0, 0)) == (12, 3, 0, 0, 3)


COUNT = st.one_of(st.none(), st.integers(0, 10**16))


@settings(max_examples=300, deadline=None)
@given(inp=COUNT, out=COUNT, cr=COUNT, cw=COUNT, rsn=COUNT, w1h=COUNT)
def test_parsed_counts_are_always_coherent(inp, out, cr, cw, rsn, w1h):
    """Whatever a provider sends: cache counts within the input, reasoning within the output, nothing above
    MAX_TOKENS, every oddity flagged."""
    u = {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": cr, "cache_creation_input_tokens": cw,
         "cache_creation": {"ephemeral_1h_input_tokens": w1h}, "output_tokens_details": {"thinking_tokens": rsn}}
    parsed = _usage.from_mapping(u)
    if parsed is None:
        assert not any((inp, out, cr, cw, w1h)) and inp is not None and out is not None
        return
    i, o, r, w, t = _usage.complete(parsed, (0, 0, 0, 0, 0))  # what the adapter records, estimate or not
    assert 0 <= r + w <= i <= MAX_TOKENS and 0 <= t <= o <= MAX_TOKENS
    detail = parsed.detail or UsageDetail()
    assert detail.cache_write_1h <= parsed.tokens[3]
    odd = inp is None or out is None or max(x or 0 for x in (inp, out, cr, cw, rsn, w1h)) > _usage.PLAUSIBLE_TOKENS
    if odd:
        assert parsed.flags


SMALL = st.one_of(st.none(), st.integers(-2, 300), st.just("7"), st.just(True))
DETAIL_KEYS = st.sampled_from(["audio", "cache_read", "cache_creation", "ephemeral_5m_input_tokens",
                               "ephemeral_1h_input_tokens", "flex_cache_read", "flex", "priority_cache_read"])
OUT_KEYS = st.sampled_from(["audio", "reasoning", "flex_reasoning", "flex"])


@settings(max_examples=500, deadline=None)
@given(
    inp=st.integers(1, 400), out=st.integers(0, 400),
    itd=st.none() | st.dictionaries(DETAIL_KEYS, SMALL, max_size=4),
    otd=st.none() | st.dictionaries(OUT_KEYS, SMALL, max_size=3),
    tier=st.none() | st.sampled_from(["default", "auto", "flex", "priority", "scale", "Flex"]),
    raw=st.none() | st.fixed_dictionaries({}, optional={
        "server_tool_use": st.none() | st.fixed_dictionaries({"web_search_requests": SMALL}),
        "service_tier": st.none() | st.sampled_from(["standard", "priority", "batch"]),
    }),
)
def test_the_handlers_shortcut_reads_what_the_parser_reads(inp, out, itd, otd, tier, raw):
    """common_langchain (the LangChain handler's shortcut) and from_langchain: where the shortcut answers, the
    parser gives the same counts with nothing to flag and no detail."""
    um: dict[str, Any] = {"input_tokens": inp, "output_tokens": out}
    if itd is not None:
        um["input_token_details"] = itd
    if otd is not None:
        um["output_token_details"] = otd
    rm: dict[str, Any] = {"model_name": "m"}
    if tier is not None:
        rm["service_tier"] = tier
    if raw is not None:
        rm["usage"] = raw
    short = _usage.common_langchain(um, rm)
    if short is None:
        return
    assert _usage.from_langchain(um, rm) == _usage.Parsed(short)
