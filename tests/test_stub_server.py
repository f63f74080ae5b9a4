"""The OpenAI stub server, exercised through the real clients over HTTP.

Besides proving the stub works, these tests pin down *how each client maps
usage* (langchain-openai 1.7, llama-index-llms-openai 0.8, openai 2.x) -- the
facts the callback handlers are written against.  Values are exact.
"""

import base64
import http.client
import json
import struct
from typing import Any

import openai
import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_core.outputs import LLMResult
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel

try:
    from .stub_openai import EMBEDDING_DIM, StubReply, StubUsage, embedding_vector
except ImportError:
    from stub_openai import EMBEDDING_DIM, StubReply, StubUsage, embedding_vector

SERVED = "gpt-4o-mini-2024-07-18"
USAGE = StubUsage(12, 7, cached_tokens=4, reasoning_tokens=2)

# langchain's AIMessage.usage_metadata for USAGE
LC_USAGE = {
    "input_tokens": 12,
    "output_tokens": 7,
    "total_tokens": 19,
    "input_token_details": {"cache_read": 4},
    "output_token_details": {"reasoning": 2},
}
# response_metadata["token_usage"] / llm_output["token_usage"]: the openai
# pydantic CompletionUsage.model_dump(), None-filled for fields not sent.
LC_TOKEN_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 7,
    "total_tokens": 19,
    "prompt_tokens_details": {
        "audio_tokens": None,
        "cache_write_tokens": None,
        "cached_tokens": 4,
    },
    "completion_tokens_details": {
        "accepted_prediction_tokens": None,
        "audio_tokens": None,
        "reasoning_tokens": 2,
        "rejected_prediction_tokens": None,
    },
}


class GetWeather(BaseModel):
    """Get the weather for a city."""

    city: str


class EndRecorder(BaseCallbackHandler):
    """Keeps every LLMResult handed to on_llm_end."""

    def __init__(self) -> None:
        self.results: list[LLMResult] = []

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.results.append(response)


@pytest.fixture(scope="module")
def client(stub_server):
    """A raw openai client (one per module: building one costs ~40 ms)."""
    with openai.OpenAI(base_url=stub_server.base_url, api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
def chat(stub_openai):
    return ChatOpenAI(
        base_url=stub_openai.base_url,
        api_key="sk-test",
        model="gpt-4o-mini",
        max_retries=0,
    )


def _aggregate(chunks):
    out = chunks[0]
    for c in chunks[1:]:
        out += c
    return out


# --------------------------------------------------------------------------
# The stub itself
# --------------------------------------------------------------------------


def test_raw_client_chat_records_requests_and_echoes_model(stub_openai, client):
    stub_openai.enqueue(StubReply("hi there", usage=USAGE, model=SERVED))
    resp = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.model == SERVED
    assert resp.choices[0].message.content == "hi there"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 2},
    }
    # default reply: content "ok", usage 10/5, request's model echoed
    resp = client.chat.completions.create(
        model="m-x", messages=[{"role": "user", "content": "again"}]
    )
    assert (resp.model, resp.choices[0].message.content) == ("m-x", "ok")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (10, 5)
    assert stub_openai.count() == 2
    assert stub_openai.requests[0] == {
        "path": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_queue_is_fifo_shared_then_responder_then_default(stub_openai, client):
    stub_openai.enqueue(StubReply("first"), StubReply("second"))
    msgs = [{"role": "user", "content": "q"}]
    assert client.completions.create(model="m", prompt="p").choices[0].text == "first"
    out = client.chat.completions.create(model="m", messages=msgs)
    assert out.choices[0].message.content == "second"
    stub_openai.responder = lambda req: StubReply(
        f"echo:{req['messages'][-1]['content']}"
    )
    out = client.chat.completions.create(model="m", messages=msgs)
    assert out.choices[0].message.content == "echo:q"
    assert stub_openai.count("/completions") == 3  # suffix matches both
    assert stub_openai.count("/chat/completions") == 2
    stub_openai.reset()
    assert (stub_openai.requests, stub_openai.responder, stub_openai.pending) == (
        [],
        None,
        0,
    )
    out = client.chat.completions.create(model="m", messages=msgs)
    assert out.choices[0].message.content == "ok"


def test_raw_client_stream_usage_chunk_only_when_requested(stub_openai, client):
    msgs = [{"role": "user", "content": "q"}]
    stub_openai.enqueue(
        StubReply("abcdef", usage=USAGE), StubReply("abcdef", usage=USAGE)
    )
    chunks = list(client.chat.completions.create(model="m", messages=msgs, stream=True))
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abcdef"
    assert chunks[-1].choices[0].finish_reason == "stop"

    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=msgs,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.total_tokens) == (12, 19)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_legacy_completions_streaming(stub_openai, client):
    stub_openai.enqueue(StubReply("legacy text", usage=StubUsage(3, 2)))
    chunks = list(
        client.completions.create(
            model="m", prompt="p", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "legacy text"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_embeddings_float_and_base64(stub_openai, client):
    # the openai client silently asks for base64 and decodes it
    resp = client.embeddings.create(model="e", input=["one two", "three"])
    assert stub_openai.last_request()["encoding_format"] == "base64"
    assert [d.embedding for d in resp.data] == [
        embedding_vector("one two"),
        embedding_vector("three"),
    ]
    assert len(resp.data[0].embedding) == EMBEDDING_DIM
    assert resp.usage.model_dump() == {"prompt_tokens": 3, "total_tokens": 3}

    stub_openai.embedding_usage = lambda texts: 100 * len(texts)
    resp = client.embeddings.create(model="e", input="solo", encoding_format="float")
    assert resp.data[0].embedding == embedding_vector("solo")
    assert resp.usage.prompt_tokens == 100
    assert stub_openai.count("/embeddings") == 2
    assert stub_openai.count() == 0  # embeddings never consume the chat queue


def test_http_level_keepalive_sse_and_errors(stub_openai):
    conn = http.client.HTTPConnection("127.0.0.1", stub_openai.port, timeout=5)
    try:
        body = json.dumps({"model": "m", "messages": [], "stream": True})
        conn.request("POST", "/v1/chat/completions", body)
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"

        # same connection (keep-alive): unknown path -> 404 JSON
        conn.request("POST", "/v1/nope", "{}")
        resp = conn.getresponse()
        assert resp.status == 404
        assert (
            json.loads(resp.read())["error"]["message"] == "Unknown path: POST /v1/nope"
        )

        conn.request(
            "POST",
            "/v1/embeddings",
            json.dumps({"input": "a b c", "encoding_format": "base64"}),
        )
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        raw = base64.b64decode(payload["data"][0]["embedding"])
        assert list(struct.unpack(f"<{EMBEDDING_DIM}f", raw)) == embedding_vector(
            "a b c"
        )
        assert payload["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    finally:
        conn.close()


def test_error_status_and_malformed_usage(stub_openai, client):
    msgs = [{"role": "user", "content": "q"}]
    stub_openai.enqueue(
        StubReply(status=429, error_message="slow down"),
        StubReply(usage=None),
        StubReply(raw_usage={"prompt_tokens": "seven"}),
    )
    with pytest.raises(openai.RateLimitError, match="slow down"):
        client.chat.completions.create(model="m", messages=msgs)
    assert client.chat.completions.create(model="m", messages=msgs).usage is None
    # the openai client does not validate: garbage passes through verbatim
    bad = client.chat.completions.create(model="m", messages=msgs).usage
    assert (bad.prompt_tokens, bad.completion_tokens) == ("seven", None)


# --------------------------------------------------------------------------
# langchain-openai ChatOpenAI
# --------------------------------------------------------------------------


def test_lc_invoke_usage_metadata_and_llm_output(stub_openai, chat):
    rec = EndRecorder()
    stub_openai.enqueue(StubReply("hello", usage=USAGE, model=SERVED))
    msg = chat.invoke("hi", config={"callbacks": [rec]})

    assert msg.content == "hello"
    assert msg.usage_metadata == LC_USAGE
    assert msg.response_metadata == {
        "token_usage": LC_TOKEN_USAGE,
        "model_provider": "openai",
        "model_name": SERVED,  # the *served* model, not the requested one
        "system_fingerprint": "fp_stub",
        "id": "chatcmpl-stub1",
        "finish_reason": "stop",
        "logprobs": None,
    }
    # on_llm_end (non-streaming): usage in llm_output AND on the message
    (result,) = rec.results
    assert result.llm_output == {
        "token_usage": LC_TOKEN_USAGE,
        "model_provider": "openai",
        "model_name": SERVED,
        "system_fingerprint": "fp_stub",
        "id": "chatcmpl-stub1",
    }
    (gen,) = result.generations[0]
    assert gen.generation_info == {"finish_reason": "stop", "logprobs": None}
    assert gen.message.usage_metadata == LC_USAGE


def test_lc_zero_details_and_missing_usage(stub_openai, chat):
    stub_openai.enqueue(
        StubReply(usage=StubUsage(10, 5)),
        StubReply(usage=None),
        StubReply(raw_usage={"prompt_tokens": 3, "completion_tokens": 2}),
        StubReply(raw_usage={"prompt_tokens": "seven", "completion_tokens": 2}),
    )
    # zero cached/reasoning tokens are reported as 0, not omitted
    assert chat.invoke("a").usage_metadata == {
        "input_tokens": 10,
        "output_tokens": 5,
        "total_tokens": 15,
        "input_token_details": {"cache_read": 0},
        "output_token_details": {"reasoning": 0},
    }
    # no usage at all: usage_metadata None, response_metadata["token_usage"] None
    msg = chat.invoke("b")
    assert msg.usage_metadata is None
    assert msg.response_metadata["token_usage"] is None
    # partial usage: total computed by langchain, details empty dicts
    msg = chat.invoke("c")
    assert msg.usage_metadata == {
        "input_tokens": 3,
        "output_tokens": 2,
        "total_tokens": 5,
        "input_token_details": {},
        "output_token_details": {},
    }
    assert msg.response_metadata["token_usage"]["total_tokens"] is None
    # garbage usage makes langchain-openai itself raise (before any on_llm_end)
    with pytest.raises(TypeError):
        chat.invoke("d")


def test_lc_stream_with_and_without_usage(stub_openai, chat):
    rec = EndRecorder()
    stub_openai.enqueue(
        *(StubReply("hello world", usage=USAGE, model=SERVED) for _ in range(3))
    )

    chunks = list(chat.stream("hi", stream_usage=True, config={"callbacks": [rec]}))
    assert stub_openai.requests[-1]["stream_options"] == {"include_usage": True}
    # usage arrives on exactly one chunk (from the choices=[] usage chunk)
    assert [c.usage_metadata for c in chunks if c.usage_metadata] == [LC_USAGE]
    agg = _aggregate(chunks)
    assert agg.content == "hello world"
    assert agg.usage_metadata == LC_USAGE
    assert agg.response_metadata == {
        "model_provider": "openai",
        "finish_reason": "stop",
        "model_name": SERVED,
        "system_fingerprint": "fp_stub",
    }
    # on_llm_end (streaming): llm_output is None; usage only on the message
    (result,) = rec.results
    assert result.llm_output is None
    (gen,) = result.generations[0]
    assert gen.generation_info == {
        "finish_reason": "stop",
        "model_name": SERVED,
        "system_fingerprint": "fp_stub",
    }
    assert gen.message.usage_metadata == LC_USAGE

    chunks = list(chat.stream("hi", stream_usage=False))
    assert "stream_options" not in stub_openai.requests[-1]
    assert _aggregate(chunks).usage_metadata is None

    # with a custom base_url the default is OFF (stream_usage resolves to None)
    chunks = list(chat.stream("hi"))
    assert "stream_options" not in stub_openai.requests[-1]
    assert _aggregate(chunks).usage_metadata is None


def test_lc_streaming_true_generate_llm_output(stub_openai):
    """streaming=True: generate()'s return value gets a synthetic llm_output with
    an EMPTY token_usage; the callback's on_llm_end sees llm_output=None."""
    rec = EndRecorder()
    llm = ChatOpenAI(
        base_url=stub_openai.base_url,
        api_key="sk-test",
        model="gpt-4o-mini",
        max_retries=0,
        streaming=True,
        stream_usage=True,
    )
    stub_openai.enqueue(StubReply("x", usage=USAGE, model=SERVED))
    res = llm.generate([[HumanMessage("hi")]], callbacks=[rec])
    assert res.llm_output == {
        "token_usage": {},
        "model_name": "gpt-4o-mini",
    }  # requested
    assert rec.results[0].llm_output is None
    gen = res.generations[0][0]
    assert gen.generation_info == {
        "finish_reason": "stop",
        "model_name": SERVED,
        "system_fingerprint": "fp_stub",
    }
    assert gen.message.usage_metadata == LC_USAGE


def test_lc_tool_calls_invoke_and_stream(stub_openai, chat):
    tools_llm = chat.bind_tools([GetWeather])
    stub_openai.enqueue(
        StubReply(
            "", tool_calls=[("GetWeather", {"city": "Paris"})], usage=StubUsage(20, 8)
        ),
        StubReply(
            "",
            tool_calls=[
                ("GetWeather", {"city": "Paris"}),
                ("GetWeather", {"city": "Rome"}),
            ],
            usage=StubUsage(20, 8),
        ),
    )
    msg = tools_llm.invoke("weather?")
    assert stub_openai.requests[-1]["tools"][0]["function"]["name"] == "GetWeather"
    assert msg.tool_calls == [
        {
            "name": "GetWeather",
            "args": {"city": "Paris"},
            "id": "call_1",
            "type": "tool_call",
        }
    ]
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert msg.usage_metadata["total_tokens"] == 28

    agg = _aggregate(list(tools_llm.stream("weather?", stream_usage=True)))
    assert agg.tool_calls == [
        {
            "name": "GetWeather",
            "args": {"city": "Paris"},
            "id": "call_2",
            "type": "tool_call",
        },
        {
            "name": "GetWeather",
            "args": {"city": "Rome"},
            "id": "call_3",
            "type": "tool_call",
        },
    ]
    assert agg.response_metadata["finish_reason"] == "tool_calls"
    assert agg.usage_metadata["total_tokens"] == 28


@pytest.mark.asyncio
async def test_lc_ainvoke_and_astream(stub_openai, chat):
    stub_openai.enqueue(
        StubReply("a", usage=USAGE, model=SERVED),
        StubReply("bcd", usage=USAGE, model=SERVED),
    )
    msg = await chat.ainvoke("hi")
    assert msg.usage_metadata == LC_USAGE
    assert msg.response_metadata["model_name"] == SERVED
    chunks = [c async for c in chat.astream("hi", stream_usage=True)]
    agg = _aggregate(chunks)
    assert (agg.content, agg.usage_metadata) == ("bcd", LC_USAGE)


def test_lc_server_error_raises(stub_openai, chat):
    stub_openai.enqueue(StubReply(status=500))
    with pytest.raises(openai.InternalServerError):
        chat.invoke("hi")
    assert stub_openai.count() == 1  # max_retries=0: no retry


def test_lc_embeddings(stub_openai):
    emb = OpenAIEmbeddings(
        base_url=stub_openai.base_url,
        api_key="sk-test",
        model="text-embedding-3-small",
        check_embedding_ctx_length=False,
    )
    assert emb.embed_documents(["a b", "c"]) == [
        embedding_vector("a b"),
        embedding_vector("c"),
    ]
    assert emb.embed_query("q") == embedding_vector("q")
    assert stub_openai.requests[0] == {
        "path": "/v1/embeddings",
        "input": ["a b", "c"],
        "model": "text-embedding-3-small",
        "encoding_format": "base64",
    }


# --------------------------------------------------------------------------
# llama-index OpenAI LLM
# --------------------------------------------------------------------------


@pytest.fixture
def li_openai():
    mod = pytest.importorskip("llama_index.llms.openai")
    return mod.OpenAI


@pytest.fixture
def li_msgs():
    from llama_index.core.llms import ChatMessage

    return [ChatMessage(role="user", content="hi")]


def _li(li_openai, stub, **kw):
    return li_openai(
        api_base=stub.base_url,
        api_key="sk-test",
        model="gpt-4o-mini",
        max_retries=0,
        **kw,
    )


def test_li_chat_raw_is_openai_object(stub_openai, li_openai, li_msgs):
    from openai.types.chat import ChatCompletion
    from openai.types.completion_usage import CompletionUsage

    llm = _li(li_openai, stub_openai)
    stub_openai.enqueue(StubReply("hello", usage=USAGE, model=SERVED))
    resp = llm.chat(li_msgs)
    assert resp.message.content == "hello"
    # raw is the openai pydantic ChatCompletion -- NOT a dict: raw["usage"] fails
    assert isinstance(resp.raw, ChatCompletion)
    with pytest.raises(TypeError):
        resp.raw["usage"]
    assert resp.raw.model == SERVED
    assert isinstance(resp.raw.usage, CompletionUsage)
    assert resp.raw.usage.prompt_tokens_details.cached_tokens == 4
    assert resp.raw.usage.completion_tokens_details.reasoning_tokens == 2
    # dict(raw) works (pydantic iteration), its "usage" is still the object
    assert dict(resp.raw)["usage"] is resp.raw.usage
    # the counts llama-index copies out: no cached/reasoning details
    assert resp.additional_kwargs == {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
    }
    assert stub_openai.requests[-1] == {
        "path": "/v1/chat/completions",
        "messages": [{"role": "user", "content": "hi"}],
        "model": "gpt-4o-mini",
        "stream": False,
        "temperature": 0.1,
    }

    stub_openai.enqueue(StubReply(usage=None))
    resp = llm.chat(li_msgs)
    assert (resp.raw.usage, resp.additional_kwargs) == (None, {})


def test_li_complete_chat_model_and_legacy_model(stub_openai, li_openai):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    stub_openai.enqueue(
        StubReply("c1", usage=USAGE), StubReply("c2", usage=StubUsage(4, 2))
    )
    # a chat model: complete() goes through /chat/completions
    resp = _li(li_openai, stub_openai).complete("hi")
    assert resp.text == "c1"
    assert stub_openai.requests[-1]["path"] == "/v1/chat/completions"
    assert isinstance(resp.raw, ChatCompletion)
    assert resp.additional_kwargs == {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
    }

    # a non-chat model (max_tokens set so no tiktoken download): /completions
    legacy = li_openai(
        api_base=stub_openai.base_url,
        api_key="sk-test",
        model="gpt-3.5-turbo-instruct",
        max_retries=0,
        max_tokens=16,
    )
    resp = legacy.complete("hi")
    assert resp.text == "c2"
    assert stub_openai.requests[-1]["path"] == "/v1/completions"
    assert isinstance(resp.raw, Completion)
    assert resp.additional_kwargs == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "total_tokens": 6,
    }


def test_li_stream_chat_usage_needs_stream_options(stub_openai, li_openai, li_msgs):
    from openai.types.chat import ChatCompletionChunk

    stub_openai.enqueue(
        *(StubReply("hello", usage=USAGE, model=SERVED) for _ in range(2))
    )

    # default: llama-index does NOT ask for stream usage -> none anywhere
    parts = list(_li(li_openai, stub_openai).stream_chat(li_msgs))
    assert "stream_options" not in stub_openai.requests[-1]
    assert parts[-1].message.content == "hello"
    assert all(p.raw.usage is None and p.additional_kwargs == {} for p in parts)

    # constructor additional_kwargs: sent only on streaming calls
    llm = _li(
        li_openai,
        stub_openai,
        additional_kwargs={"stream_options": {"include_usage": True}},
    )
    parts = list(llm.stream_chat(li_msgs))
    assert stub_openai.requests[-1]["stream_options"] == {"include_usage": True}
    last = parts[-1]
    # the final ChatResponse wraps the choices=[] usage chunk
    assert isinstance(last.raw, ChatCompletionChunk)
    assert last.raw.choices == []
    assert (last.delta, last.message.content) == ("", "hello")
    assert last.raw.usage.prompt_tokens_details.cached_tokens == 4
    assert last.raw.usage.completion_tokens_details.reasoning_tokens == 2
    assert last.additional_kwargs == {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
    }
    assert all(p.raw.usage is None and p.additional_kwargs == {} for p in parts[:-1])

    # ...and is dropped from non-streaming calls (OpenAI would reject it)
    stub_openai.enqueue(StubReply())
    llm.chat(li_msgs)
    assert "stream_options" not in stub_openai.requests[-1]

    # per-call kwarg works as well
    stub_openai.enqueue(StubReply(usage=USAGE))
    parts = list(
        _li(li_openai, stub_openai).stream_chat(
            li_msgs, stream_options={"include_usage": True}
        )
    )
    assert parts[-1].raw.usage.total_tokens == 19


def test_li_stream_chat_tool_calls(stub_openai, li_openai, li_msgs):
    stub_openai.enqueue(StubReply("", tool_calls=[("get_weather", {"city": "Paris"})]))
    llm = _li(li_openai, stub_openai)
    last = list(llm.stream_chat(li_msgs))[-1]
    (sel,) = llm.get_tool_calls_from_response(last, error_on_no_tool_call=True)
    assert (sel.tool_id, sel.tool_name, sel.tool_kwargs) == (
        "call_1",
        "get_weather",
        {"city": "Paris"},
    )


@pytest.mark.asyncio
async def test_li_achat_and_astream_chat(stub_openai, li_openai, li_msgs):
    llm = _li(
        li_openai,
        stub_openai,
        additional_kwargs={"stream_options": {"include_usage": True}},
    )
    stub_openai.enqueue(
        StubReply("a", usage=USAGE, model=SERVED), StubReply("bc", usage=USAGE)
    )
    resp = await llm.achat(li_msgs)
    assert (resp.message.content, resp.raw.model, resp.raw.usage.total_tokens) == (
        "a",
        SERVED,
        19,
    )
    parts = [p async for p in await llm.astream_chat(li_msgs)]
    assert parts[-1].message.content == "bc"
    assert parts[-1].additional_kwargs == {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "total_tokens": 19,
    }


def test_li_embeddings_if_installed(stub_openai):
    mod = pytest.importorskip("llama_index.embeddings.openai")
    emb = mod.OpenAIEmbedding(
        api_base=stub_openai.base_url, api_key="sk-test", max_retries=0
    )
    assert emb.get_text_embedding_batch(["a b", "c"]) == [
        embedding_vector("a b"),
        embedding_vector("c"),
    ]


def test_delay_forced_stream_usage_and_broken_responder(stub_openai, client):
    msgs = [{"role": "user", "content": "q"}]
    stub_openai.enqueue(StubReply(delay_s=0.15), StubReply(stream_usage=True))
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="m", messages=msgs, timeout=0.02)
    # a provider that sends the usage chunk although it was not asked for
    chunks = list(client.chat.completions.create(model="m", messages=msgs, stream=True))
    assert (chunks[-1].choices, chunks[-1].usage.total_tokens) == ([], 15)

    def broken(req):
        raise RuntimeError("boom")

    stub_openai.responder = broken
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.chat.completions.create(model="m", messages=msgs)
