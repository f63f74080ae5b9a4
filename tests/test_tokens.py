"""Token accounting (``costobs_callbacks._tokens``) through both adapters' prompt operations: the exact count of a
request and the upper bound a budget's pre-call estimate tries first.

The bound must never be below the count (a budget would let through a call it should refuse), and where it says it
is the count, it must be it. Messages are the frameworks' own (LangChain ``HumanMessage`` / ``AIMessage`` with text,
content parts and tool calls; LlamaIndex ``ChatMessage`` with text and tool-call blocks), texts random, non-ASCII
included.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from llama_index.core.base.llms.types import ChatMessage, TextBlock, ToolCallBlock

from costobs_callbacks import _tokens
from costobs_callbacks._tokens import count_text
from costobs_callbacks.integrations.langchain import MESSAGES, STRINGS
from costobs_callbacks.integrations.llamaindex.payloads import OPS, Prompt, Tools

MODELS = ("gpt-4o-mini", "gpt-4", "some-local-model")
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)  # lone surrogates: not text an LLM gets
_ARGS = st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), _TEXT, st.booleans()), max_size=3)
_TOOLS = st.none() | st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text("abcdefgh_", min_size=1, max_size=10), "description": _TEXT})}), min_size=1, max_size=2)


@pytest.fixture(autouse=True)
def _cold_cache():
    _tokens._COUNTS.clear()
    yield
    _tokens._COUNTS.clear()


def tok(text: str, model: str) -> int:
    n, exact = count_text(text, model)
    assert exact  # the encodings are available offline in this environment (llama-index-core ships them)
    return n


# -- LangChain messages --------------------------------------------------------------------------------


@st.composite
def lc_message(draw: Any) -> Any:
    kind = draw(st.sampled_from(["human", "system", "ai", "ai_tools", "tool", "parts"]))
    text = draw(_TEXT)
    # an id names one message wherever it appears (LangGraph's): unique here
    kw: dict[str, Any] = {"id": f"msg-{draw(st.uuids())}"} if draw(st.booleans()) else {}
    if kind == "human":
        return HumanMessage(text, **kw)
    if kind == "system":
        return SystemMessage(text, **kw)
    if kind == "tool":
        return ToolMessage(text, tool_call_id="call_1", **kw)
    if kind == "parts":  # list-of-parts content: text parts and an image part (not counted)
        parts: list[Any] = [{"type": "text", "text": text}, draw(_TEXT),
                            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
        return HumanMessage(parts, **kw)
    calls = [] if kind == "ai" else draw(st.lists(
        st.builds(lambda n, a, i: {"name": n, "args": a, "id": i, "type": "tool_call"},
                  st.text("abcdefgh_", min_size=1, max_size=10), _ARGS, st.text("0123456789", min_size=1, max_size=4)),
        min_size=1, max_size=3))
    return AIMessage(text, tool_calls=calls, **kw)


def lc_expected(model: str, messages: list[Any], tools: Any) -> int:
    """3 + per message (4 + text + tool calls' JSON) + the tools' JSON, recomputed here."""
    n = 3
    for m in messages:
        c = m.content
        text = c if isinstance(c, str) else "".join(
            p if isinstance(p, str) else p["text"] for p in c if isinstance(p, str) or "text" in p)
        n += 4 + (tok(text, model) if text else 0)
        tc = getattr(m, "tool_calls", None)
        if tc:
            n += tok(json.dumps([{"name": t["name"], "args": t["args"]} for t in tc], default=str), model)
    if tools:
        n += tok(json.dumps(tools, default=str), model)
    return n


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MODELS), st.lists(lc_message(), max_size=5), _TOOLS, st.booleans())
def test_langchain_bound_is_never_below_the_count_and_exact_where_it_says(model, messages, tools, warm):
    _tokens._COUNTS.clear()
    prompt, extra = [messages], ({"tools": tools} if tools else {}, {})
    if warm:  # some texts counted before (another call sent them), some not
        MESSAGES.count_tokens(model, [messages[: len(messages) // 2]], ({}, {}))
    bound, bound_exact = MESSAGES.token_upper_bound(model, prompt, extra)
    n, exact = MESSAGES.count_tokens(model, prompt, extra)
    assert exact
    assert n == lc_expected(model, messages, tools)
    assert bound >= n
    if bound_exact:
        assert bound == n
    # once counted, the bound is the count, and says so
    assert MESSAGES.token_upper_bound(model, prompt, extra) == (n, True)
    assert MESSAGES.count_tokens(model, prompt, extra) == (n, True)  # remembered: the same answer


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(MODELS), st.lists(_TEXT, max_size=4))
def test_langchain_string_prompts_bound(model, prompts):
    bound, bound_exact = STRINGS.token_upper_bound(model, prompts, None)
    n, exact = STRINGS.count_tokens(model, prompts, None)
    assert exact and n == sum(tok(p, model) for p in prompts if p)
    assert bound >= n and (not bound_exact or bound == n)
    assert STRINGS.token_upper_bound(model, prompts, None) == (n, True)


# -- LlamaIndex prompts --------------------------------------------------------------------------------


@st.composite
def li_message(draw: Any) -> ChatMessage:
    role = draw(st.sampled_from(["user", "system", "assistant", "tool"]))
    texts = draw(st.lists(_TEXT, max_size=2))
    calls = draw(st.lists(st.tuples(st.text("abcdefgh_", min_size=1, max_size=10), _ARGS), max_size=2))
    raw_calls = draw(st.booleans()) and not calls and role == "assistant"
    blocks: list[Any] = [TextBlock(text=t) for t in texts]
    blocks += [ToolCallBlock(tool_name=n, tool_kwargs=a, tool_call_id="c") for n, a in calls]
    if raw_calls:  # tool calls the OpenAI way, in additional_kwargs (arguments as JSON text)
        ak = {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
        return ChatMessage(role=role, blocks=blocks, additional_kwargs=ak)
    return ChatMessage(role=role, blocks=blocks)


def li_expected(model: str, messages: list[ChatMessage], tools: Any) -> int:
    n = 3
    for m in messages:
        text = "\n".join(b.text for b in m.blocks if isinstance(b, TextBlock))
        n += 4 + (tok(text, model) if text else 0)
        calls = [{"name": b.tool_name, "args": b.tool_kwargs} for b in m.blocks if isinstance(b, ToolCallBlock)]
        if not calls and m.additional_kwargs.get("tool_calls"):
            calls = [{"name": "f", "args": {"x": 1}}]
        if calls:
            n += tok(json.dumps(calls, default=str), model)
    if tools:
        n += tok(json.dumps(tools, default=str), model)
    return n


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MODELS), st.lists(li_message(), max_size=5), _TOOLS, st.booleans())
def test_llamaindex_bound_is_never_below_the_count_and_exact_where_it_says(model, messages, tools, warm):
    _tokens._COUNTS.clear()
    extra = Tools(tools) if tools else None
    if warm:
        OPS.count_tokens(model, Prompt(messages[: len(messages) // 2]), None)
    bound, bound_exact = OPS.token_upper_bound(model, Prompt(messages), extra)
    n, exact = OPS.count_tokens(model, Prompt(messages), extra)
    assert exact and n == li_expected(model, messages, tools)
    assert bound >= n and (not bound_exact or bound == n)
    assert OPS.token_upper_bound(model, Prompt(messages), extra) == (n, True)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(MODELS), _TEXT, _TOOLS)
def test_llamaindex_completion_prompt_bound(model, prompt, tools):
    _tokens._COUNTS.clear()
    extra = Tools(tools) if tools else None
    bound, bound_exact = OPS.token_upper_bound(model, prompt, extra)
    n, exact = OPS.count_tokens(model, prompt, extra)
    expected = (tok(prompt, model) if prompt else 0) + (tok(json.dumps(tools, default=str), model) if tools else 0)
    assert exact and n == expected
    assert bound >= n and (not bound_exact or bound == n)


# -- the bound counts bytes ----------------------------------------------------------------------------

# Rare CJK (Extension B) characters: 4 UTF-8 bytes each, and more than one token each, so a bound counting one token
# per character would be below the count.
RARE = "".join(chr(0x20000 + 37 * i) for i in range(40))


@pytest.mark.parametrize("model", MODELS)
def test_the_upper_bound_counts_utf8_bytes_not_characters(model):
    n = tok(RARE, model)
    assert len(RARE) < n <= len(RARE.encode("utf-8"))  # what makes this test able to fail
    bound_lc, exact_lc = MESSAGES.token_upper_bound(model, [[HumanMessage(RARE)]], ({}, {}))
    bound_li, exact_li = OPS.token_upper_bound(model, Prompt([ChatMessage(role="user", content=RARE)]), None)
    assert (bound_lc, exact_lc) == (bound_li, exact_li) == (3 + 4 + len(RARE.encode("utf-8")), False)
    assert STRINGS.token_upper_bound(model, [RARE], None) == (len(RARE.encode("utf-8")), False)
    assert OPS.token_upper_bound(model, RARE + "é", None) == (len((RARE + "é").encode("utf-8")), False)
    assert MESSAGES.count_tokens(model, [[HumanMessage(RARE)]], ({}, {})) == (3 + 4 + n, True)
    assert bound_lc >= 3 + 4 + n


def test_a_message_with_an_id_is_counted_once_wherever_it_appears():
    """LangGraph gives every state message an id: an agent's history is counted once, message by message."""
    model = "gpt-4o-mini"
    m = AIMessage("the weather is sunny", id="m-1", tool_calls=[{"name": "w", "args": {"c": "Paris"}, "id": "1"}])
    n, _ = MESSAGES.count_tokens(model, [[m]], ({}, {}))
    assert _tokens._COUNTS[("m-1", 0, model)] == (n - 7, True)
    assert MESSAGES.token_upper_bound(model, [[HumanMessage("x"), m]], ({}, {}))[0] == n + 4 + len("x")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60) | st.just("x" * (_tokens.MAX_EXACT_CHARS + 1)),
       model=st.sampled_from((*MODELS, None)), loaded=st.booleans())
def test_the_remembered_count_is_count_text_with_the_encoder_loaded_or_not(text: str, model: str | None,
                                                                          loaded: bool) -> None:
    """``count`` calls the loaded encoder itself on a cache miss (a prompt seen for the first time, on the app's
    thread); it must give what ``count_text`` gives for every text (lone surrogates and texts too long to tokenize
    included), before the encoding is loaded and after, and again from its cache."""
    want = count_text(text, model)
    _tokens._COUNTS.clear()
    saved = dict(_tokens._encoders)
    if not loaded:
        _tokens._encoders.clear()
    try:
        assert _tokens.count(text, model) == want
        assert _tokens.count(text, model) == want  # remembered
    finally:
        _tokens._encoders.update(saved)
