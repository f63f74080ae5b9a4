"""LlamaIndex adapter: a thin translator from llama-index-core's events to the ledger.

Two LlamaIndex mechanisms are used, each for what it can do:

* The **instrumentation module** (a span handler on the root dispatcher) sees every span with its parent id:
  it builds the run tree and opens the spans of retrievers, query engines, synthesizers, chat engines,
  workflows (``FunctionAgent``, ``AgentWorkflow``) and tools (``FunctionTool.acall``: agents emit no other
  tool event). ``Dispatcher.event`` and the span hooks swallow every exception a handler raises, so nothing
  raised there can stop a run. An event handler costs embedding calls from their start and end events, an
  LLM whose component has no legacy handler from its start and end events (keyed by span id, so a stream
  that ends after its span closed is still matched), and bills what a stream sent before the app stopped
  reading from its progress events. LlamaIndex calls it for every event of the process, so it is on the
  dispatcher only while one of these needs it (``_Adapter.hold_events``).
* A **legacy callback handler** (``CallbackManager``): its exceptions propagate, and LlamaIndex calls it at
  an LLM call's start, before the request is sent, and at its end (for a stream, when the stream is read to
  its end or closed). ``instrument()`` installs it on ``Settings.callback_manager`` and, at the first span of
  any component (LLM, embedding, retriever, query engine ...), on that component's own ``callback_manager``,
  so components built before ``instrument()`` or before ``Settings.callback_manager`` was set are covered
  too. An LLM call opens at its legacy start (where a guard's refusal reaches the caller) and is costed at its
  legacy end (so a call that takes the run past its budget raises to the caller at once). The legacy handler
  also raises, at any start, the ``RunAborted`` a guard decided in the instrumentation handlers.

The legacy handler also works alone (``tracker.llamaindex_handler()`` in a manager the app wires itself,
without ``instrument()``): it then costs and guards from the legacy events only.

All of it runs on the app's thread for every span and event, so the hot path is kept short: what a span of a
given ``Class.method`` needs is decided once per class (``_PLANS``; most spans are transparent), events are
routed by their class (``_ROUTES``), a chat call's messages are read once for the loop guard and both
estimates (``_Prompt``), tool schemas are built only when an estimate needs them (``_Tools``), and token
counts are remembered by text hash (``_tokens.count``, the LangChain adapter's too), so a history resent with
every call of an agent is tokenized once. A call whose provider reports usage tokenizes nothing at its end; a
``max_cost_usd`` budget reads its prompt before it is sent, and tokenizes it only if an upper bound of its
tokens (one a UTF-8 byte for a text not counted before) does not fit. A model called on its own (no tracked
span above it, no ``tracker.run()`` around it) under a tracker policy that cannot refuse such a call opens
nothing at its start and is recorded whole at its end (``Ledger.record_llm``).
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.chat_engine.types import BaseChatEngine
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.embedding import (
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    SparseEmbeddingEndEvent,
)
from llama_index.core.instrumentation.events.exception import ExceptionEvent
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.settings import Settings
from llama_index.core.tools.types import BaseTool
from llama_index_instrumentation import get_dispatcher
from pydantic import BaseModel, Field

from .. import _usage
from .._errors import Faults
from .._events import TokenUsage, UsageDetail
from .._exceptions import RunAborted
from .._ledger import Span, Tokens, _again, current_scope
from .._pricing import provider_from_name, provider_id
from .._tokens import chat_token_bound, chat_tokens, count, count_text, known_or_bytes

try:  # llama-index-workflows: FunctionAgent / AgentWorkflow runs
    import workflows as _workflows

    _WORKFLOW: type | None = _workflows.Workflow
except ImportError:  # pragma: no cover - installed with llama-index-core 0.14
    _WORKFLOW = None

if TYPE_CHECKING:
    from .._ledger import Ledger
    from .._tracker import CostTracker

__all__ = ["CostLlamaIndexHandler", "instrument", "legacy_handler", "uninstrument"]

logger = logging.getLogger("costobs_callbacks")

_STREAM_METHODS = frozenset({"stream_chat", "astream_chat", "stream_complete", "astream_complete"})
_TOOL_METHODS = frozenset({"call", "acall", "__call__"})
_QUERY_METHODS = frozenset({"query", "aquery"})
_RETRIEVE_METHODS = frozenset({"retrieve", "aretrieve"})
_SYNTH_METHODS = frozenset({"synthesize", "asynthesize"})
_CHAT_ENGINE_METHODS = frozenset({"chat", "achat", "stream_chat", "astream_chat"})
# Legacy event types costed or traced by the stand-alone handler (the rest is ingestion noise).
_LEGACY_CHAINS = frozenset({
    CBEventType.QUERY, CBEventType.SYNTHESIZE, CBEventType.SUB_QUESTION, CBEventType.AGENT_STEP,
    CBEventType.RERANKING, CBEventType.TREE,
})
_UUID_LEN = 36
# Enum members as module constants: reading them off their class goes through the enum machinery each time.
_EV_LLM = CBEventType.LLM
_EV_EMBEDDING = CBEventType.EMBEDDING
_EV_EXCEPTION = CBEventType.EXCEPTION
_EV_RETRIEVE = CBEventType.RETRIEVE
_EV_FUNCTION_CALL = CBEventType.FUNCTION_CALL
_P_PROMPT = EventPayload.PROMPT
_P_MESSAGES = EventPayload.MESSAGES
_P_KWARGS = EventPayload.ADDITIONAL_KWARGS
_P_SERIALIZED = EventPayload.SERIALIZED
_P_RESPONSE = EventPayload.RESPONSE
_P_COMPLETION = EventPayload.COMPLETION
_P_EXCEPTION = EventPayload.EXCEPTION
_P_CHUNKS = EventPayload.CHUNKS
_P_TOOL = EventPayload.TOOL
_P_FUNCTION_CALL = EventPayload.FUNCTION_CALL
_EMPTY: Mapping[str, Any] = {}


# -- prompt operations -------------------------------------------------------------------------------


def _calls_json(calls: list[dict[str, Any]]) -> str:
    return json.dumps(calls, default=str) if calls else ""


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


def _tool_calls_json(msg: Any) -> str:
    """A message's tool calls as ``[{"name", "args"}]`` JSON ("" when it has none)."""
    calls: list[dict[str, Any]] = []
    for block in getattr(msg, "blocks", None) or ():
        if isinstance(block, ToolCallBlock):
            calls.append({"name": block.tool_name, "args": _args(block.tool_kwargs)})
    if not calls:
        ak = getattr(msg, "additional_kwargs", None)
        if isinstance(ak, Mapping) and ak:
            calls = _raw_tool_calls(ak.get("tool_calls"))
    return _calls_json(calls)


def _args(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _message_text(msg: Any) -> str:
    if isinstance(msg, ChatMessage):
        return msg.content or ""
    c = getattr(msg, "content", msg)
    return c if isinstance(c, str) else str(c)


def _message_parts(msg: Any) -> tuple[Any, str, str]:
    """A message's role, text and tool calls (JSON, "" without), read in one pass over a ``ChatMessage``'s
    blocks (its ``content`` property and the tool-call lookups would each walk them again)."""
    if type(msg) is not ChatMessage:
        return getattr(msg, "role", None), _message_text(msg), _tool_calls_json(msg)
    blocks = msg.blocks
    if len(blocks) == 1 and type(blocks[0]) is TextBlock:  # the common case: one text block
        text: str = blocks[0].text
        calls: list[dict[str, Any]] = []
    else:
        texts: list[str] = []
        calls = []
        for block in blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolCallBlock):
                calls.append({"name": block.tool_name, "args": _args(block.tool_kwargs)})
        text = "\n".join(texts)  # what ChatMessage.content gives ("" for None)
    if not calls:
        ak = msg.additional_kwargs
        if ak:
            calls = _raw_tool_calls(ak.get("tool_calls"))
    return msg.role, text, _calls_json(calls)


class _Prompt:
    """The messages of a chat call, each read once (for the loop guard's signature, the pre-call budget
    estimate and the end estimate alike). Held only while the call is in flight."""

    __slots__ = ("_parts", "messages")

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages
        self._parts: tuple[tuple[Any, str, str], ...] | None = None

    def parts(self) -> tuple[tuple[Any, str, str], ...]:
        p = self._parts
        if p is None:
            p = self._parts = tuple(_message_parts(m) for m in self.messages)
        return p


class _Tools:
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


def _as_prompt(prompt: Any) -> _Prompt:
    """A chat prompt (a ``_Prompt``, or a message list an app's own code passed) as a ``_Prompt``."""
    return prompt if isinstance(prompt, _Prompt) else _Prompt(list(prompt or ()))


def _tools_of(raw: Any) -> _Tools | None:
    return _Tools(raw) if raw else None


class _LlamaOps:
    """Prompt operations on what a LlamaIndex LLM call sends: a message list (chat, as a ``_Prompt``) or a
    prompt string (completion), plus the request's tools (a ``_Tools``). Never stored, never exported.

    Tokens: ``_tokens.chat_tokens``' accounting of a chat request (a completion's prompt is one text), each text
    counted with the model's own tiktoken encoding."""

    @staticmethod
    def signature(model: str | None, prompt: Any) -> int:
        if isinstance(prompt, str):
            return hash((model, prompt))
        return hash((model, _as_prompt(prompt).parts()))

    @staticmethod
    def count_tokens(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        tools = _tools_json(extra)
        if isinstance(prompt, str):
            total, exact = count(prompt, model)
            if tools:
                n, ok = count(tools, model)
                total, exact = total + n, exact and ok
            return total, exact
        return chat_tokens(model, _as_prompt(prompt).parts(), _TEXT_AND_CALLS, tools)

    @staticmethod
    def token_upper_bound(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        """An upper bound of ``count_tokens`` without running a tokenizer, and whether it is that count
        (``_tokens.chat_token_bound``)."""
        tools = _tools_json(extra)
        if isinstance(prompt, str):
            total, exact = known_or_bytes(prompt, model)
            if tools:
                n, ok = known_or_bytes(tools, model)
                total, exact = total + n, exact and ok
            return total, exact
        return chat_token_bound(model, _as_prompt(prompt).parts(), _TEXT_AND_CALLS, tools)


_TEXT_AND_CALLS = operator.itemgetter(1, 2)
"""A ``_Prompt`` part's text and tool calls (``_tokens.chat_tokens``' ``parts``)."""


def _tools_json(extra: Any) -> str:
    if not extra:
        return ""
    return extra.json() if isinstance(extra, _Tools) else json.dumps(extra, default=str)


OPS = _LlamaOps()


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


def _response_text(resp: Any) -> str:
    """What a model produced (text and tool calls), for an output estimate."""
    if isinstance(resp, ChatResponse):
        _role, text, calls = _message_parts(resp.message)
        return text + calls if calls else text
    if isinstance(resp, CompletionResponse):
        return resp.text or ""
    return ""


# -- usage ---------------------------------------------------------------------------------------------


def usage_from_dict(u: Mapping[str, Any], service_tier: Any = None) -> _usage.Parsed | None:
    """A provider's usage mapping (OpenAI, OpenAI Responses, Anthropic) -> ``_usage.Parsed``; ``None`` if it
    holds no usage; ``ValueError`` on garbage (see ``_usage.from_mapping``)."""
    return _usage.from_mapping(u, service_tier)


def usage_of(resp: Any) -> _usage.Parsed | None:
    """The usage a LlamaIndex response carries: ``response.raw`` (the provider's own response, e.g. an openai
    ``ChatCompletion`` or an Anthropic message, or a dict: its ``usage`` and ``service_tier``), else the counts
    copied into ``additional_kwargs``."""
    raw = getattr(resp, "raw", None)
    if raw is not None:
        parsed = _usage.from_raw(raw)
        if parsed is not None:
            return parsed
    ak = getattr(resp, "additional_kwargs", None)
    if ak and isinstance(ak, Mapping):
        return _usage.from_mapping(ak)
    return None


def _span_provider(track: _Track) -> str | None:
    span = track.span
    return span.provider if span is not None else track.provider


def _served_model(resp: Any) -> str | None:
    raw = getattr(resp, "raw", None)
    if raw is None:
        return None
    m = raw.get("model") if isinstance(raw, Mapping) else getattr(raw, "model", None)
    return m if isinstance(m, str) and m else None


# -- naming ----------------------------------------------------------------------------------------------


def _provider_of(cls: type | None) -> str | None:
    """``llama_index.llms.openai.base`` -> ``openai`` (as ``_pricing.provider_id`` names it); ``None`` for core,
    mock and ``*_like`` classes."""
    mod = getattr(cls, "__module__", "") or ""
    parts = mod.split(".")
    if len(parts) >= 3 and parts[0] == "llama_index" and parts[1] in ("llms", "embeddings"):
        p = parts[2]
        return None if p.endswith("_like") else provider_id(p)
    return None


@functools.lru_cache(maxsize=256)
def _class_info(cls: type) -> tuple[str, str | None]:
    """A component class's name and provider (the instrumentation handlers see the instance)."""
    return cls.__name__, _provider_of(cls)


def _identity(cls: type | None, model_dict: Mapping[str, Any], default: str) -> tuple[str, str | None, str | None]:
    """A call's span name, model and provider, from its component's class (seen by the span handler) and the
    model dict its event carries."""
    cls_name: str | None
    if cls is not None:
        cls_name, provider = _class_info(cls)
    else:
        cls_name, provider = None, _provider_from_class_name(model_dict.get("class_name"))
    return cls_name or str(model_dict.get("class_name") or default), _model_of(model_dict, cls_name), provider


_IDENTITIES: dict[tuple[Any, Any, Any, Any], tuple[str, str | None, str | None]] = {}
"""``(component class, model, model_name, class_name of its model dict)`` -> ``_identity``'s answer: read on every
LLM call's start, the same for every call of a component."""
_MAX_IDENTITIES = 1024


def _remember_identity(key: tuple[Any, Any, Any, Any],
                       ident: tuple[str, str | None, str | None]) -> tuple[str, str | None, str | None]:
    try:
        if len(_IDENTITIES) >= _MAX_IDENTITIES:
            _IDENTITIES.clear()
        _IDENTITIES[key] = ident
    except TypeError:  # an unhashable model field: not remembered
        pass
    return ident


def _provider_from_class_name(name: Any) -> str | None:
    """For the stand-alone handler (it sees only ``to_payload()``): ``openai_llm`` -> ``openai``."""
    return provider_from_name(name) if isinstance(name, str) else None


def _model_of(model_dict: Any, cls_name: str | None) -> str | None:
    """The model a call names: ``model`` / ``model_name`` of ``to_payload()``, else the class name
    (``MockLLM``, ``MockEmbedding``: price them under that name)."""
    if type(model_dict) is dict or isinstance(model_dict, Mapping):
        v = model_dict.get("model")
        if isinstance(v, str) and v and v != "unknown":
            return v
        v = model_dict.get("model_name")
        if isinstance(v, str) and v and v != "unknown":
            return v
        if cls_name is None:
            cn = model_dict.get("class_name")
            return cn if isinstance(cn, str) and cn else None
    return cls_name


def _max_tokens(kwargs: Mapping[str, Any], model_dict: Any) -> int | None:
    if kwargs:
        for k in ("max_tokens", "max_completion_tokens"):
            v = kwargs.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    v = model_dict.get("num_output") if type(model_dict) is dict or isinstance(model_dict, Mapping) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _key(span_id: str) -> str:
    """The ledger key of a LlamaIndex span: the uuid of ``Class.method-<uuid4>`` (ids stay short)."""
    if len(span_id) > _UUID_LEN + 1 and span_id[-_UUID_LEN - 1] == "-":
        return span_id[-_UUID_LEN:]
    return span_id[:64]


@functools.lru_cache(maxsize=256)
def _is_openai_compatible(cls: type) -> bool:
    return any((getattr(k, "__module__", "") or "").startswith("llama_index.llms.openai") for k in cls.__mro__)


_TRACED: tuple[tuple[type, frozenset[str], str], ...] = (
    (BaseRetriever, _RETRIEVE_METHODS, "retriever"),
    (BaseQueryEngine, _QUERY_METHODS, "chain"),
    (BaseSynthesizer, _SYNTH_METHODS, "chain"),
    (BaseChatEngine, _CHAT_ENGINE_METHODS, "chain"),
    *(((_WORKFLOW, frozenset({"run"}), "chain"),) if _WORKFLOW is not None else ()),
)
"""Spans opened as ledger spans (besides LLM and embedding calls and tools): base class, methods, kind."""

_SPAN_OTHER, _SPAN_LLM, _SPAN_TOOL, _SPAN_TRACED = 0, 1, 2, 3


class _Plan:
    """What ``span_enter`` does for one ``Class.method`` span: decided once per class (most spans are
    transparent and cost a dict lookup and a ``_Node``)."""

    __slots__ = ("cls", "embedding", "hookable", "kind", "label", "node_cls", "stream_check", "what")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.node_cls: type | None = None  # the instance's class (None: a function's span)
        self.what = _SPAN_OTHER
        self.kind = ""
        self.label = ""
        self.hookable = False  # instances may carry a callback manager to put the legacy handler on
        self.stream_check = False  # an OpenAI-compatible LLM's streaming method
        self.embedding = False  # an embedding model's span: its calls are costed from instrumentation events


_PLANS: dict[str, _Plan] = {}
_MAX_PLANS = 4096


def _plan_for(instance: Any, head: str) -> _Plan:
    """Decide (and cache) the plan of a span of ``instance`` named ``head`` (``Class.method``); the caller
    looks in ``_PLANS`` first."""
    cls: type = type(instance)
    plan = _Plan(cls)
    if instance is not None:
        method = head.rsplit(".", 1)[-1]
        plan.node_cls = cls
        plan.label = cls.__name__
        plan.hookable = _hookable(cls)
        if isinstance(instance, BaseLLM):
            plan.what = _SPAN_LLM
            plan.stream_check = method in _STREAM_METHODS and _is_openai_compatible(cls)
        elif isinstance(instance, BaseEmbedding):
            plan.embedding = True
        elif isinstance(instance, BaseTool) and method in _TOOL_METHODS:
            plan.what = _SPAN_TOOL
        else:
            for base, methods, k in _TRACED:
                if method in methods and isinstance(instance, base):
                    plan.what, plan.kind = _SPAN_TRACED, k
                    break
        if getattr(instance, "__class__", cls) is not cls:
            return plan  # a proxy: its isinstance answers may differ between instances; not cached
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[head] = plan
    return plan


def _hookable(cls: type) -> bool:
    """Can instances of ``cls`` have a ``callback_manager``? A pydantic model without such a field would
    make every ``getattr`` of it fail through pydantic's slow ``__getattr__``."""
    try:
        if not issubclass(cls, BaseModel) or hasattr(cls, "callback_manager"):
            return True
        return "callback_manager" in cls.model_fields or cls.model_config.get("extra") == "allow"
    except Exception:  # an exotic class: look on every span, as for any other
        return True


# -- state -----------------------------------------------------------------------------------------------


class _Track:
    """One span we opened in the ledger, with what its end needs.

    Most fields keep their class-level default for the whole call: only what differs is set on the
    instance (a call creates one of these, and a transparent span a ``_Node``, on the app's thread)."""

    open_children = 0
    exited = False
    ended = False
    exit_status = "ok"
    exit_error: BaseException | None = None
    event_id: str | None = None
    span_id: str | None = None
    model: str | None = None
    prompt: Any = None
    tools: Any = None
    partial: Any = None
    inner_prompt: Any = None
    inner_usage: _usage.Parsed | None = None
    ctx_token: Any = None
    stream_usage_requested = False
    holds = False  # a stream being read: it needs its progress events (see _Adapter.hold_events)
    # A lone LLM call (see Ledger.lone_calls): no ledger span until it ends (``span`` is None meanwhile).
    lone = False
    name = ""
    provider: str | None = None
    start_wall = 0.0
    start_perf = 0.0

    def __init__(self, key: str, parent: _Track | None, kind: str, span: Span | None, node: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.node = node
        self.kind = kind
        self.span = span


def _lone_track(key: str, node: _Node | None, name: str, model: str | None, provider: str | None,
                prompt: str | _Prompt, tools: _Tools | None, start_wall: float, start_perf: float) -> _Track:
    """The track of a lone LLM call (see ``Ledger.lone_calls``): no ledger span until it ends, its start kept here."""
    track = _Track(key, None, "llm", None, node)
    track.lone = True
    track.name = name
    track.provider = provider
    track.model = model
    track.prompt = prompt
    track.tools = tools
    track.start_wall = start_wall
    track.start_perf = start_perf
    return track


class _Node:
    """A LlamaIndex instrumentation span in flight (most are transparent: only the anchor matters)."""

    parent: _Node | None = None
    track: _Track | None = None
    refused: RunAborted | None = None
    refused_raised = False
    emb: list[_Track] | None = None  # embedding calls open in this span (rare: made on the first one)
    stream_usage_ok = False  # an OpenAI-compatible LLM's streaming method, stream_options unset
    legacy = False  # an LLM's span whose callback manager has our legacy handler: the call opens at its legacy start
    holds = False  # it needs the instrumentation events while open (see _Adapter.hold_events)
    start_wall = 0.0
    start_perf = 0.0

    def __init__(self, id_: str, parent: _Node | None, name: str, cls: type | None) -> None:
        self.id = id_
        self.name = name
        self.cls = cls
        if parent is not None:
            self.parent = parent
        else:  # a top node: the start of the chain it may be opened as (see _Adapter.anchor)
            self.start_wall = time.time()
            self.start_perf = time.perf_counter()


class _Adapter:
    """Everything one tracker needs to follow LlamaIndex."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.instrumented = False
        self.request_stream_usage = False
        self.nodes: dict[str, _Node] = {}
        self.llm_tracks: dict[str, _Track] = {}  # LLM span id -> its track (outlives the span for streams)
        self.nested: dict[str, _Track] = {}  # span id of an LLM call made inside another -> the outer call
        self.nested_events: dict[str, _Track] = {}  # legacy event id of such a call -> the outer call
        self.event_holds = 0  # what needs the event handler now (see hold_events)
        self.events: dict[str, _Track | None] = {}  # legacy event id -> track (None: a nested call)
        # the stand-alone handler's LLM call open in this context (CustomLLM.chat calls complete)
        self.legacy_llm: ContextVar[_Track | None] = ContextVar(f"costobs_li_llm_{id(self)}", default=None)
        self.orphans: list[_Track] = []  # embedding calls outside any known span (instrumented mid-call)
        self.lock = threading.RLock()
        self.managers: weakref.WeakSet[CallbackManager] = weakref.WeakSet()
        self.created_settings_manager: CallbackManager | None = None
        self.fault = Faults(ledger, "LlamaIndex")  # our own bug or a payload we could not read: count, log, carry on
        self.span_handler = _SpanHandler(self)
        self.event_handler = _EventHandler(self)
        self.legacy = CostLlamaIndexHandler(self)

    # -- the event handler, on the dispatcher only while needed --------------------------------------

    def hold_events(self) -> None:
        """Something needs the instrumentation events: put the event handler on the root dispatcher (if it is not).

        An LLM call whose component has our legacy handler is costed from the legacy events alone, so the event
        handler, which LlamaIndex calls for every event of the process, is on the dispatcher only while something
        needs it: an embedding model's span (embeddings are costed from their events), the span of an LLM whose
        manager does not have the legacy handler, and a stream being read (its progress events: what streamed is
        billed if the app stops reading). Each holder releases once (``release_events``)."""
        with self.lock:
            self.event_holds += 1
            if self.event_holds == 1 and self.instrumented:
                root = get_dispatcher()
                if self.event_handler not in root.event_handlers:
                    root.add_event_handler(self.event_handler)  # appended in place: a dispatch under way is unharmed

    def release_events(self) -> None:
        with self.lock:
            self.event_holds -= 1
            if self.event_holds <= 0:
                self.event_holds = 0
                self._unhook_events()

    def _unhook_events(self) -> None:
        """Off the root dispatcher (a new list: a dispatch iterating the old one in another thread is unharmed)."""
        root = get_dispatcher()
        if self.event_handler in root.event_handlers:
            root.event_handlers = [h for h in root.event_handlers if h is not self.event_handler]

    # -- opening and closing ledger spans ------------------------------------------------------------

    def open(self, key: str, parent: _Track | None, kind: str, name: str, node: _Node | None,
             **kw: Any) -> _Track:
        pk = parent.key if parent is not None else None
        span = (self.ledger.start_llm(key, pk, name, None, kind=kind, **kw) if kind == "embedding"
                else self.ledger.start_span(key, pk, kind, name, **kw))
        track = _Track(key, parent, kind, span, node)
        if parent is not None:
            with self.lock:
                parent.open_children += 1
        return track

    def open_llm(self, key: str, parent: _Track | None, name: str, node: _Node | None, model: str | None,
                 provider: str | None, prompt: str | _Prompt, tools: _Tools | None, max_tokens: int | None) -> _Track:
        """``open`` for an LLM call (its hot path: no keyword packing), its request kept for the end estimate."""
        # start_llm(span_id, parent_id, name, meta, model, provider, prompt, prompt_ops, extra, max_tokens)
        span = self.ledger.start_llm(key, parent.key if parent is not None else None, name, None, model, provider,
                                     prompt, OPS, tools, max_tokens)
        track = _Track(key, parent, "llm", span, node)
        if parent is not None:
            with self.lock:
                parent.open_children += 1
        track.model = model
        track.prompt = prompt
        track.tools = tools
        return track

    def finish(self, track: _Track, **kw: Any) -> None:
        """End a track (once); raises the ledger's ``RunAborted`` after releasing its parents."""
        with self.lock:
            if track.ended:
                return
            track.ended = True
        try:
            self.ledger.end(track.key, **kw)
        finally:
            self._release(track.parent)

    def _release(self, parent: _Track | None) -> None:
        """A child ended: end the parents whose span exited while a stream below them was open."""
        while parent is not None:
            with self.lock:
                parent.open_children -= 1
                ready = parent.exited and parent.open_children <= 0 and not parent.ended
                if ready:
                    parent.ended = True
            if not ready:
                return
            try:
                self.ledger.end(parent.key, status=parent.exit_status, error=parent.exit_error)
            except RunAborted:
                pass  # sticky: the run's next start raises it
            except Exception as exc:
                self.fault("release", exc)
            parent = parent.parent

    def exit_track(self, track: _Track, status: str, error: BaseException | None) -> None:
        with self.lock:
            if track.ended:
                return
            if track.open_children > 0:  # a stream below is still open: end when it ends
                track.exited = True
                track.exit_status = status
                track.exit_error = error
                return
            track.ended = True
        try:
            self.ledger.end(track.key, status=status, error=error)
        finally:
            self._release(track.parent)

    def anchor(self, node: _Node | None, include_self: bool) -> _Track | None:
        """The nearest tracked ancestor of ``node``. Outside ``tracker.run()``, an untracked top-level
        span (``VectorStoreIndex`` building, a user's own ``@dispatcher.span``) is opened as a chain when
        the first costed call below it starts, so that its calls form one run."""
        n = node if include_self else (node.parent if node is not None else None)
        top: _Node | None = None
        while n is not None:
            if n.track is not None and n.refused is None:
                return n.track
            top = n
            n = n.parent
        if top is None or top.refused is not None or current_scope.get() is not None:
            return None
        with self.lock:
            if top.track is not None:
                return top.track
            try:
                track = self.open(_key(top.id), None, "chain", top.name, top)
            except RunAborted as err:
                top.refused = err
                return None
            assert track.span is not None
            track.span.start_wall = top.start_wall
            track.span.start_perf = top.start_perf
            top.track = track
            return track

    # -- instrumentation: spans ----------------------------------------------------------------------

    def open_span(self, node: _Node, plan: _Plan, id_: str, bound_args: Any, instance: Any) -> None:
        """What a span that is not transparent opens (see ``_Plan``), once ``_SpanHandler.span_enter`` has made its
        node (and put our legacy handler on the component's callback manager)."""
        what = plan.what
        if what == _SPAN_LLM:
            if plan.stream_check:
                ak = getattr(instance, "additional_kwargs", None)
                node.stream_usage_ok = not (isinstance(ak, Mapping) and "stream_options" in ak)
            return  # the LLM call opens at its (legacy, else instrumentation) start event, which carries the request
        if what == _SPAN_TOOL:
            label = _tool_name(instance) or plan.label
            up = self.anchor(node, include_self=False)
            if up is not None and up.kind == "tool" and up.span is not None and up.span.name == label:
                return  # FunctionTool.__call__ -> call: one call
            tool_args = _tool_args(instance, bound_args)
            try:
                node.track = self.open(_key(id_), up, "tool", label, node, tool_args=tool_args)
            except RunAborted as err:  # the tool runs anyway; the run stops at its next LLM call
                node.refused = err
            return
        up = self.anchor(node, include_self=False)
        try:
            node.track = self.open(_key(id_), up, plan.kind, plan.label, node)
        except RunAborted as err:
            node.refused = err

    def span_exit(self, id_: str, status: str, error: BaseException | None) -> None:
        node = self.nodes.pop(id_, None)
        if node is not None:
            self.exit_node(node, id_, status, error)

    def exit_node(self, node: _Node, id_: str, status: str, error: BaseException | None) -> None:
        """A span exited (its node out of ``nodes``): end what it opened, give back its hold on the events."""
        try:
            self._exit_node(node, id_, status, error)
        finally:
            if node.holds:
                node.holds = False
                self.release_events()

    def _exit_node(self, node: _Node, id_: str, status: str, error: BaseException | None) -> None:
        if error is not None:
            self.nested.pop(id_, None)
        if node.emb:
            for t in list(node.emb):  # an embedding call cut short by an exception
                node.emb.remove(t)
                self._finish_quietly(t, status="error" if error is not None else "ok", error=error)
        track = node.track
        if track is None or track.node is not node:
            return
        if track.kind == "llm":
            if not track.ended:
                if error is not None:  # failed before any end event (no legacy handler)
                    self.finish_llm(track, None, error, quiet=True)
                else:
                    self.stream_open(id_, track)
            return  # a stream's call ends at its end event, after its span exited
        try:
            self.exit_track(track, status, error)
        except RunAborted:
            pass  # sticky
        except Exception as exc:
            self.fault("span_exit", exc)

    def stream_open(self, span_id: str, track: _Track) -> None:
        """An LLM call's span exited before its end: a stream, read from now on (its progress, end and exception
        events are matched by span id; a call opened at its instrumentation start event is there already). It
        holds the event handler on the dispatcher until it ends."""
        with self.lock:
            if track.ended:  # ended meanwhile in another thread
                return
            self.llm_tracks[span_id] = track
            if not track.holds:
                track.holds = True
                self.hold_events()

    def _finish_quietly(self, track: _Track, **kw: Any) -> None:
        try:
            self.finish(track, **kw)
        except RunAborted:
            pass
        except Exception as exc:
            self.fault("finish", exc)

    # -- instrumentation: LLM events -------------------------------------------------------------------

    def enclosing_llm(self, node: _Node | None) -> _Track | None:
        n = node.parent if node is not None else None
        while n is not None:
            if n.track is not None:
                t = n.track
                return t if t.kind == "llm" and not t.ended else None
            n = n.parent
        return None

    def llm_start(self, event: LLMChatStartEvent | LLMCompletionStartEvent) -> None:
        """An LLM call's start whose span cannot count on our legacy handler (see ``legacy_llm_start``)."""
        sid = event.span_id
        node = self.nodes.get(sid) if sid else None
        if node is not None and node.legacy:
            return  # opened at its legacy start, next
        if sid is not None and sid in self.llm_tracks:
            return  # a second start event in the same span: the first call is the one
        prompt: str | _Prompt = (
            _Prompt(list(event.messages)) if isinstance(event, LLMChatStartEvent) else str(event.prompt)
        )
        kwargs = event.additional_kwargs or _EMPTY
        raw_tools = kwargs.get("tools")
        tools = _Tools(raw_tools) if raw_tools else None
        parent = node.parent if node is not None else None
        outer = self.enclosing_llm(node) if parent is not None else None
        if outer is not None:  # CustomLLM.chat -> complete, acomplete -> complete: one call, not two
            if sid is not None:
                self.nested[sid] = outer
            if node is not None:
                node.track = outer
            if outer.inner_prompt is None:
                outer.inner_prompt = (prompt, tools)
            return
        model_dict = event.model_dict
        name, model, provider = _identity(node.cls if node is not None else None, model_dict, "llm")
        up = self.anchor(node, include_self=False) if parent is not None else None  # a top-level call: no anchor
        key = _key(sid) if sid else event.id_
        try:
            track = self.open_llm(key, up, name, node, model, provider, prompt, tools, _max_tokens(kwargs, model_dict))
        except RunAborted as err:
            if node is not None:
                node.refused = err
            return
        track.span_id = sid
        if node is not None:
            node.track = track
        if sid is not None:
            self.llm_tracks[sid] = track

    def llm_progress(self, event: LLMChatInProgressEvent | LLMCompletionInProgressEvent) -> None:
        span_id = event.span_id
        if span_id is None:
            return
        track = self.llm_tracks.get(span_id)
        if track is not None:
            track.partial = event.response

    def llm_end_event(self, event: LLMChatEndEvent | LLMCompletionEndEvent) -> None:
        if not self.llm_tracks and not self.nested:
            return  # ended at its legacy end event, just before (the common case), or not ours
        span_id = event.span_id
        if span_id is None:
            return
        outer = self.nested.pop(span_id, None) if self.nested else None
        if outer is not None:
            if outer.inner_usage is None:
                try:
                    outer.inner_usage = usage_of(event.response)
                except (ValueError, TypeError):
                    pass
            return
        track = self.llm_tracks.get(span_id)
        if track is not None and not track.ended:
            self.finish_llm(track, event.response, None, quiet=True)

    def llm_exception(self, event: ExceptionEvent) -> None:
        span_id = event.span_id
        if span_id is None:
            return
        self.nested.pop(span_id, None)
        track = self.llm_tracks.get(span_id)
        if track is not None and not track.ended:
            self.finish_llm(track, None, event.exception, quiet=True)

    def finish_llm(self, track: _Track, response: Any, error: BaseException | None, *, quiet: bool) -> None:
        """Cost an LLM call from its response (or what streamed before an error) and end it. Raises
        the ledger's ``RunAborted`` (the run is past its budget now) unless ``quiet``."""
        if track.span_id is not None and self.llm_tracks:
            self.llm_tracks.pop(track.span_id, None)
        if track.event_id is not None:
            self.events.pop(track.event_id, None)
        status = "ok"
        flags: tuple[str, ...] = ()
        if error is not None:
            if isinstance(error, GeneratorExit):
                flags = ("stream_closed",)  # the app stopped reading; what streamed is billed
            else:
                status = "error"
        try:
            resp = response if response is not None else track.partial
            usage: Tokens | None = None
            detail: UsageDetail | None = None
            parsed: _usage.Parsed | None = None
            model: str | None = None
            if resp is not None:
                if getattr(resp, "raw", None) is not None:
                    model = _served_model(resp)
                    reported = True
                else:
                    reported = bool(getattr(resp, "additional_kwargs", None))
                if reported:  # else usage_of would find nothing (MockLLM, a CustomLLM)
                    try:
                        parsed = usage_of(resp)
                    except (ValueError, TypeError):
                        flags += ("malformed_usage",)
            if parsed is None and track.inner_usage is not None:
                parsed = track.inner_usage
            estimated = False
            if parsed is not None:
                flags += tuple(f for f in parsed.flags if f not in flags)
                detail = parsed.detail
                usage = parsed.tokens
                if parsed.missing:  # a count the provider left out: estimated, never a silent 0
                    est, exact = self._estimate(track, model, resp)
                    usage = _usage.complete(parsed, est)
                    estimated = True
                    flags += ("estimated",) if exact else ("estimated", "estimate:chars")
                if detail is not None and detail.service_tier is not None and not self.ledger.prices.has_tier(
                        model or track.model, _span_provider(track), detail.service_tier):
                    flags += ("tier_unpriced",)
            elif status == "ok" or resp is not None:
                usage, exact = self._estimate(track, model, resp)
                estimated = True
                flags += ("estimated",) if exact else ("estimated", "estimate:chars")
                if track.stream_usage_requested:
                    flags += ("no_stream_usage",)
        except Exception as exc:  # a payload we could not read: end the span anyway
            self.fault("llm end", exc)
            usage, model, estimated, detail = None, None, False, None
            flags += ("internal_error",)
        # drop the app's messages now (only what was set: the rest are class defaults)
        track.prompt = track.tools = None
        if track.partial is not None or track.inner_prompt is not None:
            track.partial = track.inner_prompt = None
        with self.lock:
            if track.ended:
                return
            track.ended = True
            if track.holds:
                track.holds = False
                self.release_events()
        if track.lone:
            if status == "ok" and usage is not None:
                # record_llm(key, name, model, provider, start_wall, start_perf, tokens, served, estimated, flags)
                self.ledger.record_llm(track.key, track.name, track.model, track.provider, track.start_wall,
                                       track.start_perf, usage, model, estimated, flags, detail)
                return
            self._open_lone(track)
        try:
            if status == "ok" and usage is not None:
                # end_llm(span key, tokens, model, estimated, flags): the ledger's short path
                self.ledger.end_llm(track.key, usage, model, estimated, flags, detail)
            else:
                # end(span_id, status, error, usage, model, estimated, cache_hit, flags, detail)
                u = None if usage is None else TokenUsage(*usage)
                self.ledger.end(track.key, status, error if status == "error" else None, u, model, estimated, False,
                                flags, detail)
        except RunAborted:
            if quiet or isinstance(error, RunAborted):
                return
            raise
        finally:
            if track.parent is not None:
                self._release(track.parent)

    @staticmethod
    def _estimate(track: _Track, model: str | None, resp: Any) -> tuple[Tokens, bool]:
        m = model or track.model
        if track.inner_prompt is not None:  # what a CustomLLM really sent: its inner call's prompt
            prompt, tools = track.inner_prompt
        else:
            prompt, tools = track.prompt, track.tools
        inp, ok_in = count(prompt, m) if tools is None and type(prompt) is str else OPS.count_tokens(m, prompt, tools)
        out, ok_out = count(resp.text or "" if type(resp) is CompletionResponse else _response_text(resp), m)
        return (inp, out, 0, 0, 0), ok_in and ok_out

    # -- instrumentation: embeddings ---------------------------------------------------------------------

    def embedding_start(self, event: EmbeddingStartEvent) -> None:
        sid = event.span_id
        node = self.nodes.get(sid) if sid else None
        n = node.parent if node is not None else None
        while n is not None:  # an embedding call made inside another one is the same call
            if n.emb:
                return
            if n.track is not None:
                break
            n = n.parent
        name, model, provider = _identity(node.cls if node is not None else None, event.model_dict, "embedding")
        up = self.anchor(node, include_self=True)
        try:
            track = self.open(event.id_, up, "embedding", name, node, model=model,
                              provider=provider)
        except RunAborted as err:
            if node is not None:
                node.refused = err
            return
        track.model = model
        if node is not None:
            if node.emb is None:
                node.emb = []
            node.emb.append(track)
        else:
            self.orphans.append(track)

    def embedding_end(self, event: EmbeddingEndEvent | SparseEmbeddingEndEvent) -> None:
        span_id, chunks = event.span_id, event.chunks
        node = self.nodes.get(span_id) if span_id else None
        pending = node.emb if node is not None else self.orphans
        if not pending:
            return
        track = pending.pop(0)  # batches end in the order they started
        self.finish_embedding(track, chunks, quiet=True)

    def finish_embedding(self, track: _Track, chunks: Any, *, quiet: bool) -> None:
        if track.event_id is not None:
            self.events.pop(track.event_id, None)
        node = track.node
        if node is not None and node.emb and track in node.emb:
            node.emb.remove(track)
        usage, exact = _count_chunks(chunks, track.model)
        flags = ["estimated"] if exact else ["estimated", "estimate:chars"]
        try:
            self.finish(track, usage=usage, estimated=True, flags=flags)
        except RunAborted:
            if not quiet:
                raise

    # -- the legacy handler's side -------------------------------------------------------------------

    def raise_if_stopped(self, node: _Node | None) -> None:
        """Raise the refusal of the span a legacy event starts in (or of its ancestors), or the abort
        of its run: this is where a guard's decision reaches the app."""
        n = node
        while n is not None:
            err = n.refused
            if err is not None:
                if not n.refused_raised:
                    n.refused_raised = True
                    raise err
                raise _again(err)
            if n.track is not None:
                span = n.track.span  # None: a lone call, which nothing can stop
                if span is not None and span.run.aborted is not None:
                    raise _again(span.run.aborted)
                return
            n = n.parent
        scope = current_scope.get()
        if scope is not None and scope.run.aborted is not None:
            raise _again(scope.run.aborted)

    def legacy_start_instrumented(self, event_type: CBEventType, payload: Any, event_id: str) -> None:
        sid = active_span_id.get()
        node = self.nodes.get(sid) if sid else None
        if node is not None and node.legacy and event_type is _EV_LLM:
            self.legacy_llm_start(node, sid, payload, event_id)  # type: ignore[arg-type]  # node: sid is set
            return
        track = node.track if node is not None and node.refused is None else None
        if track is None:
            self.raise_if_stopped(node)
        elif track.span is not None and track.span.run.aborted is not None:  # raise_if_stopped's first step, inline
            raise _again(track.span.run.aborted)
        if event_type == _EV_LLM:
            if sid is None:
                return
            track = self.llm_tracks.get(sid)
            if track is None or track.event_id is not None:
                return
            track.event_id = event_id
            self.events[event_id] = track
            if self.request_stream_usage and node is not None and node.stream_usage_ok and isinstance(payload, dict):
                kw = payload.get(_P_KWARGS)
                if isinstance(kw, dict) and "stream_options" not in kw:
                    kw["stream_options"] = {"include_usage": True}  # the very dict the call is made with
                    track.stream_usage_requested = True
        elif event_type == _EV_EMBEDDING and node is not None and node.emb:
            for t in reversed(node.emb):
                if t.event_id is None:
                    t.event_id = event_id
                    self.events[event_id] = t
                    break

    def legacy_llm_start(self, node: _Node, sid: str, payload: Any, event_id: str) -> None:
        """An LLM call's start, from its legacy event, for a call whose span has our handler on its manager (all of
        them, but for a component without a manager; the instrumentation start event, just before, is left alone).
        The call opens here, where a guard's refusal reaches the caller before the request is sent.

        A call made on its own (no tracked span above it, no ``tracker.run()`` scope) when nothing in the tracker's
        policy could refuse it (``Ledger.lone_calls``) opens nothing in the ledger: it is recorded whole at its end
        (``Ledger.record_llm``), its start times kept here."""
        track = node.track
        if track is not None or node.refused is not None:
            # A second call in this span (or this handler twice in a manager): the first call is the one, but a
            # run stopped meanwhile (or a refused first call) stops it too.
            self.raise_if_stopped(node)
            return
        p: Mapping[Any, Any] = payload if type(payload) is dict or isinstance(payload, Mapping) else _EMPTY
        pr = p.get(_P_PROMPT)
        if pr is not None:
            prompt: str | _Prompt = pr if type(pr) is str else str(pr)
        else:
            msgs = p.get(_P_MESSAGES)
            prompt = _Prompt(list(msgs)) if msgs is not None else ""
        kw = p.get(_P_KWARGS)
        if kw is None or not (type(kw) is dict or isinstance(kw, Mapping)):
            kw = _EMPTY
        raw_tools = kw.get("tools")
        tools = _Tools(raw_tools) if raw_tools else None
        parent = node.parent
        if parent is not None:
            outer = self.enclosing_llm(node)
            if outer is not None:  # CustomLLM.chat -> complete, acomplete -> complete: one call, not two
                self.nested_events[event_id] = outer  # its end gives the outer call its usage (legacy_end)
                node.track = outer
                if outer.inner_prompt is None:
                    outer.inner_prompt = (prompt, tools)
                return
        md = p.get(_P_SERIALIZED)
        if md is None or not (type(md) is dict or isinstance(md, Mapping)):
            md = _EMPTY
        # _identity(node.cls, md, "llm"), remembered by what it reads
        ident_key = (node.cls, md.get("model"), md.get("model_name"), md.get("class_name"))
        try:
            ident = _IDENTITIES.get(ident_key)
        except TypeError:  # an unhashable field
            ident = None
        if ident is None:
            ident = _remember_identity(ident_key, _identity(node.cls, md, "llm"))
        name, model, provider = ident
        key = sid[-36:] if len(sid) > 37 and sid[-37] == "-" else _key(sid)  # _key, inline (36: _UUID_LEN)
        if parent is None and self.ledger.lone_calls and current_scope.get() is None:
            # started when its span did (a top node's clock: see _Node)
            track = _lone_track(key, node, name, model, provider, prompt, tools, node.start_wall, node.start_perf)
        else:
            up = self.anchor(node, include_self=False) if parent is not None else None
            if kw:
                max_tokens = _max_tokens(kw, md)
            else:  # _max_tokens without kwargs, inline
                n = md.get("num_output")
                max_tokens = n if type(n) is int and n > 0 else None
            if up is None:  # open_llm for a call without a parent of ours (in a tracker.run() scope), inline
                try:
                    # start_llm(span_id, parent_id, name, meta, model, provider, prompt, prompt_ops, extra, max_tokens)
                    span = self.ledger.start_llm(key, None, name, None, model, provider, prompt, OPS, tools,
                                                 max_tokens)
                except RunAborted as err:
                    node.refused = err
                    node.refused_raised = True
                    raise
                track = _Track(key, None, "llm", span, node)
                track.model = model
                track.prompt = prompt
                track.tools = tools
            else:
                try:
                    track = self.open_llm(key, up, name, node, model, provider, prompt, tools, max_tokens)
                except RunAborted as err:
                    node.refused = err
                    node.refused_raised = True
                    raise
        track.span_id = sid
        track.event_id = event_id
        node.track = track
        self.events[event_id] = track
        if self.request_stream_usage and node.stream_usage_ok and type(kw) is dict and "stream_options" not in kw:
            kw["stream_options"] = {"include_usage": True}  # the very dict the call is made with
            track.stream_usage_requested = True

    def _open_lone(self, track: _Track) -> None:
        """Open a lone call's span after all, with its start times (an end that is not the short one). Its
        request is not needed: no budget estimate can apply to it (see ``Ledger.lone_calls``)."""
        # start_llm(span_id, parent_id, name, meta, model, provider): a root
        span = self.ledger.start_llm(track.key, None, track.name, None, track.model, track.provider, root=True)
        span.start_wall = span.run.started_wall = track.start_wall
        span.start_perf = span.run.started_perf = track.start_perf
        track.span = span
        track.lone = False

    def legacy_start_alone(self, event_type: CBEventType, payload: Any, event_id: str, parent_id: str) -> None:
        events = self.events
        if event_id in events:
            return  # the handler sits twice in one manager
        parent = events.get(parent_id) if parent_id else None
        p: Mapping[Any, Any] = payload if type(payload) is dict or isinstance(payload, Mapping) else _EMPTY
        if event_type == _EV_LLM:
            kw = p.get(_P_KWARGS) or _EMPTY
            if not (type(kw) is dict or isinstance(kw, Mapping)):
                kw = _EMPTY
            outer = self.legacy_llm.get()
            if outer is not None and not outer.ended:  # CustomLLM.chat -> complete
                events[event_id] = None
                if outer.inner_prompt is None:
                    pr = p.get(_P_PROMPT)
                    outer.inner_prompt = (str(pr) if pr is not None else _Prompt(list(p.get(_P_MESSAGES) or ())),
                                          _tools_of(kw.get("tools")))
                return
            msgs = p.get(_P_MESSAGES)
            prompt: str | _Prompt = _Prompt(list(msgs)) if msgs is not None else str(p.get(_P_PROMPT) or "")
            md = p.get(_P_SERIALIZED) or _EMPTY
            tools = _tools_of(kw.get("tools"))
            cls_name = md.get("class_name") if type(md) is dict or isinstance(md, Mapping) else None
            model = _model_of(md, None)
            if parent is None and self.ledger.lone_calls and current_scope.get() is None:
                track = _lone_track(event_id, None, str(cls_name or "llm"), model, _provider_from_class_name(cls_name),
                                    prompt, tools, time.time(), time.perf_counter())
            else:
                track = self.open_llm(event_id, parent, str(cls_name or "llm"), None, model,
                                      _provider_from_class_name(cls_name), prompt, tools, _max_tokens(kw, md))
            track.event_id = event_id
            track.ctx_token = self.legacy_llm.set(track)
        elif event_type == _EV_EMBEDDING:
            md = p.get(_P_SERIALIZED) or _EMPTY
            model = _model_of(md, None)
            cls_name = md.get("class_name") if isinstance(md, Mapping) else None
            track = self.open(event_id, parent, "embedding", str(cls_name or "embedding"), None, model=model,
                              provider=_provider_from_class_name(cls_name))
            track.model, track.event_id = model, event_id
        elif event_type == _EV_RETRIEVE:
            track = self.open(event_id, parent, "retriever", "retrieve", None)
        elif event_type == _EV_FUNCTION_CALL:
            tool = p.get(_P_TOOL)
            name = getattr(tool, "name", None) or "tool"
            track = self.open(event_id, parent, "tool", str(name), None, tool_args=p.get(_P_FUNCTION_CALL))
        elif event_type in _LEGACY_CHAINS:
            track = self.open(event_id, parent, "chain", event_type.value, None)
        else:
            return
        events[event_id] = track

    def legacy_end(self, event_type: CBEventType, payload: Any, event_id: str) -> None:
        track = self.events.pop(event_id, None)
        if track is None:  # not ours, or a nested call
            outer = self.nested_events.pop(event_id, None) if self.nested_events else None
            if outer is not None and outer.inner_usage is None and isinstance(payload, Mapping):
                resp = payload.get(_P_RESPONSE)
                if resp is None:
                    resp = payload.get(_P_COMPLETION)
                if resp is not None:
                    try:
                        outer.inner_usage = usage_of(resp)
                    except (ValueError, TypeError):
                        pass
            return
        if track.ended:
            return
        track.event_id = None  # popped
        p: Mapping[Any, Any] = payload if type(payload) is dict or isinstance(payload, Mapping) else _EMPTY
        error = p.get(_P_EXCEPTION)
        if error is not None and not isinstance(error, BaseException):
            error = None
        kind = track.kind
        if kind == "llm":
            if track.ctx_token is not None:
                try:
                    self.legacy_llm.reset(track.ctx_token)
                except ValueError:  # a stream ending in another context
                    pass
                track.ctx_token = None
            resp = p.get(_P_RESPONSE)
            if resp is None:
                resp = p.get(_P_COMPLETION)
            self.finish_llm(track, resp, error, quiet=False)
        elif kind == "embedding":
            if error is not None:
                self.finish(track, status="error", error=error)
            else:
                self.finish_embedding(track, p.get(_P_CHUNKS), quiet=False)
        else:
            try:
                self.finish(track, status="error" if error is not None else "ok", error=error)
            except RunAborted:
                if isinstance(error, RunAborted):
                    return
                raise

    # -- managers --------------------------------------------------------------------------------------

    def hook(self, instance: Any) -> bool:
        """Put the legacy handler on a component's own callback manager (once): a component built before
        ``instrument()`` or before ``Settings.callback_manager`` was set has a manager without it. Returns whether
        the component's manager has it now."""
        try:
            cm = getattr(instance, "callback_manager", None)
        except Exception:
            return False
        if cm is None or not isinstance(cm, CallbackManager):
            return False
        if self.legacy not in cm.handlers:
            cm.add_handler(self.legacy)
            self.managers.add(cm)
        return True


def _count_chunks(chunks: Any, model: str | None) -> tuple[TokenUsage, bool]:
    total, exact = 0, True
    if isinstance(chunks, str):
        chunks = [chunks]
    for c in chunks or ():
        n, ok = count_text(c if isinstance(c, str) else str(c), model)
        total += n
        exact = exact and ok
    return TokenUsage(input=total), exact


def _tool_name(tool: Any) -> str | None:
    try:
        meta = tool.metadata
        name = meta.get_name() if hasattr(meta, "get_name") else getattr(meta, "name", None)
    except Exception:
        return None
    return name if isinstance(name, str) and name else None


def _tool_args(tool: Any, bound_args: Any) -> Any:
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


# -- the handlers ------------------------------------------------------------------------------------


class _SpanHandler(BaseSpanHandler[Any]):
    """Instrumentation span handler: builds the run tree and opens chain, retriever and tool spans."""

    # A field, not a pydantic private attribute: those are read through pydantic's ``__getattr__``, which
    # cost more than the rest of a transparent span's handling.
    costobs_adapter: Any = Field(default=None, exclude=True, repr=False)

    def __init__(self, adapter: _Adapter) -> None:
        super().__init__()
        self.costobs_adapter = adapter

    @classmethod
    def class_name(cls) -> str:
        return "CostObsSpanHandler"

    def span_enter(self, id_: str, bound_args: Any, instance: Any = None, parent_id: str | None = None,
                   tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        a: _Adapter = self.costobs_adapter
        try:  # _Adapter.span_enter, inline: this runs for every span of the app
            head = id_[:-37] if len(id_) > 37 else id_  # "Class.method" (37: "-" and _UUID_LEN)
            plan = _PLANS.get(head)
            if plan is None or plan.cls is not type(instance):
                plan = _plan_for(instance, head)
            nodes = a.nodes
            node = _Node(id_, nodes.get(parent_id) if parent_id else None, head, plan.node_cls)
            nodes[id_] = node
            what = plan.what
            if plan.hookable:
                hooked = a.hook(instance)
                if what == _SPAN_LLM:
                    node.legacy = hooked
            if plan.embedding or (what == _SPAN_LLM and not node.legacy):  # costed from instrumentation events
                node.holds = True
                a.hold_events()
            if what != _SPAN_OTHER and (what != _SPAN_LLM or plan.stream_check):
                a.open_span(node, plan, id_, bound_args, instance)
        except Exception as exc:
            a.fault("span_enter", exc)

    def span_exit(self, id_: str, bound_args: Any, instance: Any = None, result: Any = None,
                  **kwargs: Any) -> None:
        a: _Adapter = self.costobs_adapter
        try:
            node = a.nodes.pop(id_, None)
            if node is None:
                return
            if not node.emb and not node.holds:
                track = node.track
                # A transparent span: nothing to end; an LLM call's span: the call ends at its end event.
                if track is None:
                    return
                if track.kind == "llm":
                    if not track.ended and track.node is node:
                        a.stream_open(id_, track)
                    return
            a.exit_node(node, id_, "ok", None)
        except Exception as exc:
            a.fault("span_exit", exc)

    def span_drop(self, id_: str, bound_args: Any, instance: Any = None, err: BaseException | None = None,
                  **kwargs: Any) -> None:
        a: _Adapter = self.costobs_adapter
        try:
            a.span_exit(id_, "error", err if err is not None else RuntimeError("span dropped"))
        except Exception as exc:
            a.fault("span_drop", exc)

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


_Route = Callable[[_Adapter, Any], None]
_ROUTE_ORDER: tuple[tuple[tuple[type, ...], _Route], ...] = (
    ((LLMChatInProgressEvent, LLMCompletionInProgressEvent), _Adapter.llm_progress),
    ((LLMChatStartEvent, LLMCompletionStartEvent), _Adapter.llm_start),
    ((LLMChatEndEvent, LLMCompletionEndEvent), _Adapter.llm_end_event),
    ((ExceptionEvent,), _Adapter.llm_exception),
    ((EmbeddingStartEvent,), _Adapter.embedding_start),
    ((EmbeddingEndEvent, SparseEmbeddingEndEvent), _Adapter.embedding_end),
)
_ROUTES: dict[type, _Route | None] = {}
"""Event class -> what handles it (``None``: ignored), decided once per class from ``_ROUTE_ORDER``."""


def _route_of(event_type: type) -> _Route | None:
    route: _Route | None = None
    for types, fn in _ROUTE_ORDER:
        if issubclass(event_type, types):
            route = fn
            break
    _ROUTES[event_type] = route
    return route


class _EventHandler(BaseEventHandler):
    """Instrumentation event handler: embedding calls, LLM calls without the legacy handler and streams' progress,
    matched to their spans by span id. On the root dispatcher only while needed (``_Adapter.hold_events``)."""

    costobs_adapter: Any = Field(default=None, exclude=True, repr=False)

    def __init__(self, adapter: _Adapter) -> None:
        super().__init__()
        self.costobs_adapter = adapter

    @classmethod
    def class_name(cls) -> str:
        return "CostObsEventHandler"

    def handle(self, event: Any, **kwargs: Any) -> None:
        t = type(event)
        try:
            route = _ROUTES[t]
        except KeyError:
            route = _route_of(t)
        if route is None:
            return
        a: _Adapter = self.costobs_adapter
        try:
            route(a, event)
        except RunAborted:
            pass  # cannot reach the app from here; the run is aborted (sticky)
        except Exception as exc:
            a.fault(t.__name__, exc)


class CostLlamaIndexHandler(BaseCallbackHandler):
    """The legacy ``CallbackManager`` handler of one tracker (``tracker.llamaindex_handler()``).

    After ``instrument()`` it opens LLM calls at their start, where a guard's refusal (or an earlier decision of
    the instrumentation handlers) raises, and costs them at their end (so a budget passed by a call raises to the
    caller at once). Without ``instrument()`` it costs and guards from the legacy events alone. Only a
    deliberate ``RunAborted`` ever escapes it.
    """

    def __init__(self, adapter: _Adapter) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        self._adapter = adapter

    def __repr__(self) -> str:
        return f"<CostLlamaIndexHandler instrumented={self._adapter.instrumented}>"

    def __deepcopy__(self, memo: dict[int, Any]) -> CostLlamaIndexHandler:
        return self  # shared state by design

    def __copy__(self) -> CostLlamaIndexHandler:
        return self

    def on_event_start(self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "",
                       parent_id: str = "", **kwargs: Any) -> str:
        if event_type == _EV_EXCEPTION:
            return event_id
        a = self._adapter
        try:
            if a.instrumented:
                if event_type is _EV_LLM:  # legacy_start_instrumented's first step, inline (the common case)
                    sid = active_span_id.get()
                    node = a.nodes.get(sid) if sid else None
                    if node is not None and node.legacy:
                        a.legacy_llm_start(node, sid, payload, event_id)  # type: ignore[arg-type]  # sid is set
                        return event_id
                a.legacy_start_instrumented(event_type, payload, event_id)
            else:
                a.legacy_start_alone(event_type, payload, event_id, parent_id)
        except RunAborted:
            raise
        except Exception as exc:
            a.fault(f"on_event_start({event_type})", exc)
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "",
                     **kwargs: Any) -> None:
        if event_type is _EV_EXCEPTION:
            return
        a = self._adapter
        try:
            if event_type is _EV_LLM and type(payload) is dict and _P_EXCEPTION not in payload:
                # legacy_end's commonest case, inline: an LLM call of ours ended with its response
                track = a.events.pop(event_id, None)
                if track is not None and track.kind == "llm" and track.ctx_token is None and not track.ended:
                    track.event_id = None  # popped
                    resp = payload.get(_P_RESPONSE)
                    a.finish_llm(track, resp if resp is not None else payload.get(_P_COMPLETION), None, quiet=False)
                    return
                if track is not None:
                    a.events[event_id] = track  # the general path, next
            a.legacy_end(event_type, payload, event_id)
        except RunAborted:
            raise
        except Exception as exc:
            a.fault(f"on_event_end({event_type})", exc)

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None) -> None:
        return None


# -- public entry points (called by CostTracker) --------------------------------------------------------

_ADAPTERS: weakref.WeakKeyDictionary[CostTracker, _Adapter] = weakref.WeakKeyDictionary()
_ADAPTERS_LOCK = threading.Lock()


def _adapter(tracker: CostTracker) -> _Adapter:
    with _ADAPTERS_LOCK:
        a = _ADAPTERS.get(tracker)
        if a is None:
            a = _ADAPTERS[tracker] = _Adapter(tracker.ledger)
        return a


def instrument(tracker: CostTracker, *, request_stream_usage: bool = False) -> None:
    """Follow every LlamaIndex call of this process for ``tracker`` (idempotent)."""
    a = _adapter(tracker)
    root = get_dispatcher()
    with a.lock:
        a.request_stream_usage = bool(request_stream_usage)
        if not a.instrumented:
            if a.span_handler not in root.span_handlers:
                root.add_span_handler(a.span_handler)
            a.instrumented = True  # the event handler goes on the dispatcher while needed (see hold_events)
            if a.event_holds > 0 and a.event_handler not in root.event_handlers:
                root.add_event_handler(a.event_handler)
    cm = Settings._callback_manager
    if cm is None:
        cm = CallbackManager([])
        Settings.callback_manager = cm
        a.created_settings_manager = cm
    if a.legacy not in cm.handlers:
        cm.add_handler(a.legacy)
        a.managers.add(cm)


def uninstrument(tracker: CostTracker) -> None:
    """Stop following LlamaIndex for ``tracker``: handlers removed from the dispatcher and from every
    callback manager they were put on. Calls in flight are no longer tracked."""
    with _ADAPTERS_LOCK:
        a = _ADAPTERS.get(tracker)
    if a is None:
        return
    root = get_dispatcher()
    with a.lock:
        root.span_handlers = [h for h in root.span_handlers if h is not a.span_handler]
        a._unhook_events()
        # what held the event handler is no longer followed: none of it may release a later hold
        for node in list(a.nodes.values()):
            node.holds = False
        for track in list(a.llm_tracks.values()):
            track.holds = False
        a.event_holds = 0
        a.instrumented = False
        a.request_stream_usage = False
    for manager in list(a.managers):
        if a.legacy in manager.handlers:
            manager.remove_handler(a.legacy)
    a.managers = weakref.WeakSet()
    cm = Settings._callback_manager
    if cm is not None and a.legacy in cm.handlers:
        cm.remove_handler(a.legacy)
    if cm is not None and cm is a.created_settings_manager and not cm.handlers:
        Settings._callback_manager = None  # leave Settings as we found it
    a.created_settings_manager = None
    a.nodes.clear()
    a.llm_tracks.clear()
    a.nested.clear()
    a.nested_events.clear()


def legacy_handler(tracker: CostTracker) -> CostLlamaIndexHandler:
    """The tracker's legacy ``CallbackManager`` handler (one per tracker)."""
    return _adapter(tracker).legacy
