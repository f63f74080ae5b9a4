"""What a LlamaIndex call carries, read for the ledger: a request (a prompt string, or chat messages, and the
tools beside it) as ``PromptOps`` for the loop guard's signature, the budget's estimate and the end estimate; a
response as text (an output estimate) and as usage (read by ``_usage``, the one module that parses provider usage);
a legacy event's payload as a request; a tool call's name and arguments. Nothing here is stored or exported."""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, TextBlock, ToolCallBlock
from llama_index.core.callbacks import EventPayload

from ... import _usage
from ..._events import TokenUsage
from ..._tokens import chat_token_bound, chat_tokens, texts_token_bound, texts_tokens

__all__ = ["EMPTY", "OPS", "Prompt", "Request", "Tools", "chunks_tokens", "max_tokens", "message_parts", "request",
           "response_text", "served_model", "tool_args", "tool_name", "usage_of"]

EMPTY: Mapping[str, Any] = {}  # read-only

# Enum members as module constants: reading them off their class goes through the enum machinery each time.
P_PROMPT = EventPayload.PROMPT
P_MESSAGES = EventPayload.MESSAGES
P_KWARGS = EventPayload.ADDITIONAL_KWARGS
P_SERIALIZED = EventPayload.SERIALIZED
P_RESPONSE = EventPayload.RESPONSE
P_COMPLETION = EventPayload.COMPLETION
P_EXCEPTION = EventPayload.EXCEPTION
P_CHUNKS = EventPayload.CHUNKS
P_TOOL = EventPayload.TOOL
P_FUNCTION_CALL = EventPayload.FUNCTION_CALL


# -- messages --------------------------------------------------------------------------------------------


def _args(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _raw_tool_calls(raw_calls: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for tc in raw_calls or ():
        fn = tc.get("function") if isinstance(tc, Mapping) else getattr(tc, "function", None)
        if isinstance(fn, Mapping):
            name, args = fn.get("name"), fn.get("arguments")
        else:
            name, args = getattr(fn, "name", None), getattr(fn, "arguments", None)
        calls.append({"name": name, "args": _args(args)})
    return calls


def message_parts(msg: Any) -> tuple[Any, str, str]:
    """A message's role, text and tool calls (``[{"name", "args"}]`` JSON, "" without), read in one pass over a
    ``ChatMessage``'s blocks (its ``content`` property and the tool-call lookups would each walk them again)."""
    calls: list[dict[str, Any]] = []
    role: Any
    if type(msg) is ChatMessage:
        blocks = msg.blocks
        if len(blocks) == 1 and type(blocks[0]) is TextBlock:  # the common case: one text block
            text: str = blocks[0].text
        else:
            texts: list[str] = []
            for block in blocks:
                if isinstance(block, TextBlock):
                    texts.append(block.text)
                elif isinstance(block, ToolCallBlock):
                    calls.append({"name": block.tool_name, "args": _args(block.tool_kwargs)})
            text = "\n".join(texts)  # what ChatMessage.content gives ("" for None)
        role = msg.role
    else:
        role = getattr(msg, "role", None)
        if isinstance(msg, ChatMessage):
            text = msg.content or ""
        else:
            c = getattr(msg, "content", msg)
            text = c if isinstance(c, str) else str(c)
        for block in getattr(msg, "blocks", None) or ():
            if isinstance(block, ToolCallBlock):
                calls.append({"name": block.tool_name, "args": _args(block.tool_kwargs)})
    if not calls:
        ak = getattr(msg, "additional_kwargs", None)
        if isinstance(ak, Mapping) and ak:
            calls = _raw_tool_calls(ak.get("tool_calls"))
    return role, text, json.dumps(calls, default=str) if calls else ""


class Prompt:
    """The messages of a chat call, each read once (for the loop guard's signature, the pre-call budget
    estimate and the end estimate alike). Held only while the call is in flight."""

    __slots__ = ("_parts", "messages")

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages
        self._parts: tuple[tuple[Any, str, str], ...] | None = None

    def parts(self) -> tuple[tuple[Any, str, str], ...]:
        p = self._parts
        if p is None:
            p = self._parts = tuple(message_parts(m) for m in self.messages)
        return p


class Tools:
    """The ``tools`` of a request, turned into the JSON the provider receives only when an estimate needs
    it (building function schemas is costly, and a provider that reports usage never needs it)."""

    __slots__ = ("_json", "raw")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._json: str | None = None

    def json(self) -> str:
        j = self._json
        if j is None:
            schemas = _tool_schemas(self.raw)
            j = self._json = json.dumps(schemas, default=str) if schemas else ""
        return j


def _tool_schemas(tools: Any) -> list[Any] | None:
    """The ``tools`` of a request as the JSON the provider receives (OpenAI function schemas)."""
    if not tools or not isinstance(tools, Sequence) or isinstance(tools, str):
        return None
    out: list[Any] = []
    for t in tools:
        if isinstance(t, Mapping):
            out.append(dict(t))
            continue
        meta = getattr(t, "metadata", None)
        to_openai = getattr(meta, "to_openai_tool", None)
        out.append(to_openai() if callable(to_openai) else str(t))
    return out


def _as_prompt(prompt: Any) -> Prompt:
    """A chat prompt (a ``Prompt``, or a message list an app's own code passed) as a ``Prompt``."""
    return prompt if isinstance(prompt, Prompt) else Prompt(list(prompt or ()))


def _tools_json(extra: Any) -> str:
    if not extra:
        return ""
    return extra.json() if isinstance(extra, Tools) else json.dumps(extra, default=str)


_TEXT_AND_CALLS = operator.itemgetter(1, 2)
"""A ``Prompt`` part's text and tool calls (``_tokens.chat_tokens``' ``parts``)."""


class _LlamaOps:
    """``PromptOps`` on what a LlamaIndex LLM call sends: a message list (chat, as a ``Prompt``) or a prompt string
    (completion), with the request's tools (a ``Tools``) as ``extra``. Token counts are ``_tokens``' accounting
    (``chat_tokens`` for a chat request; a completion's prompt is one text)."""

    @staticmethod
    def signature(model: str | None, prompt: Any) -> int:
        if isinstance(prompt, str):
            return hash((model, prompt))
        return hash((model, _as_prompt(prompt).parts()))

    @staticmethod
    def count_tokens(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        if isinstance(prompt, str):
            return texts_tokens(model, (prompt, _tools_json(extra)))
        return chat_tokens(model, _as_prompt(prompt).parts(), _TEXT_AND_CALLS, _tools_json(extra))

    @staticmethod
    def token_upper_bound(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        """An upper bound of ``count_tokens`` without running a tokenizer, and whether it is that count
        (``_tokens.chat_token_bound``)."""
        if isinstance(prompt, str):
            return texts_token_bound(model, (prompt, _tools_json(extra)))
        return chat_token_bound(model, _as_prompt(prompt).parts(), _TEXT_AND_CALLS, _tools_json(extra))


OPS = _LlamaOps()


# -- requests ----------------------------------------------------------------------------------------------


Request = tuple["str | Prompt", "Tools | None", Mapping[str, Any], Mapping[str, Any]]
"""A legacy LLM start's request: prompt, tools, the call's keyword arguments, the model's ``to_payload()``."""


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if type(v) is dict or isinstance(v, Mapping) else EMPTY


def request(payload: Any) -> Request:
    """What a legacy LLM start event's payload says of the request."""
    p = payload if type(payload) is dict else _mapping(payload)
    pr = p.get(P_PROMPT)
    if pr is not None:
        prompt: str | Prompt = pr if type(pr) is str else str(pr)
    else:
        msgs = p.get(P_MESSAGES)
        prompt = Prompt(list(msgs)) if msgs is not None else ""
    kw = p.get(P_KWARGS)
    if type(kw) is not dict:
        kw = _mapping(kw)
    md = p.get(P_SERIALIZED)
    if type(md) is not dict:
        md = _mapping(md)
    raw_tools = kw.get("tools") if kw else None
    return prompt, Tools(raw_tools) if raw_tools else None, kw, md


def max_tokens(kwargs: Mapping[str, Any], model_dict: Mapping[str, Any]) -> int | None:
    """The output limit of a call: its own ``max_tokens`` (or ``max_completion_tokens``), else its model's
    ``num_output``."""
    if kwargs:
        for k in ("max_tokens", "max_completion_tokens"):
            v = kwargs.get(k)
            if type(v) is int and v > 0:
                return v
    v = model_dict.get("num_output")
    return v if type(v) is int and v > 0 else None


# -- responses ---------------------------------------------------------------------------------------------


def response_text(resp: Any) -> str:
    """What a model produced (text and tool calls), for an output estimate."""
    if type(resp) is CompletionResponse:
        return resp.text or ""
    if isinstance(resp, ChatResponse):
        _role, text, calls = message_parts(resp.message)
        return text + calls if calls else text
    if isinstance(resp, CompletionResponse):
        return resp.text or ""
    return ""


def usage_of(resp: Any) -> _usage.Parsed | None:
    """The usage a LlamaIndex response carries: ``response.raw`` (the provider's own response, e.g. an openai
    ``ChatCompletion`` or an Anthropic message, or a dict: its ``usage`` and ``service_tier``), else the counts
    copied into ``additional_kwargs``. ``None``: no report; ``ValueError`` / ``TypeError``: a malformed one."""
    raw = getattr(resp, "raw", None)
    if raw is not None:
        parsed = _usage.from_raw(raw)
        if parsed is not None:
            return parsed
    ak = getattr(resp, "additional_kwargs", None)
    if ak and isinstance(ak, Mapping):
        return _usage.from_mapping(ak)
    return None


def served_model(resp: Any) -> str | None:
    """The model that served a response, as the provider's raw response names it."""
    raw = getattr(resp, "raw", None)
    if raw is None:
        return None
    m = raw.get("model") if isinstance(raw, Mapping) else getattr(raw, "model", None)
    return m if isinstance(m, str) and m else None


def chunks_tokens(chunks: Any, model: str | None) -> tuple[TokenUsage, bool]:
    """An embedding call's input tokens, counted from the chunks it embedded."""
    if isinstance(chunks, str):
        chunks = (chunks,)
    total, exact = texts_tokens(model, (c if isinstance(c, str) else str(c) for c in chunks or ()))
    return TokenUsage(input=total), exact


# -- tools -------------------------------------------------------------------------------------------------


def tool_name(tool: Any) -> str | None:
    try:
        meta = tool.metadata
        name = meta.get_name() if hasattr(meta, "get_name") else getattr(meta, "name", None)
    except Exception:
        return None
    return name if isinstance(name, str) and name else None


def tool_args(tool: Any, bound_args: Any) -> Any:
    """A tool call's arguments (the workflow ``Context`` a tool may take left out)."""
    arguments = getattr(bound_args, "arguments", None)
    if not isinstance(arguments, Mapping):
        return None
    ctx_param = getattr(tool, "ctx_param_name", None)
    out: dict[str, Any] = {}
    for k, v in arguments.items():
        if k == "self":
            continue
        if k == "kwargs" and isinstance(v, Mapping):
            out.update({kk: vv for kk, vv in v.items() if kk != ctx_param})
        elif k == "args":
            if v:
                out["args"] = list(v)
        elif k != ctx_param:
            out[k] = v
    return out
