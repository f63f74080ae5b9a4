"""LlamaIndex adapter: a thin translator from llama-index-core's events to the ledger.

Two LlamaIndex mechanisms are used, each for what it can do:

* The **instrumentation module** (a span handler and an event handler on the root dispatcher) sees
  everything, with parent ids: LLM chat / completion start and end events keyed by their span id
  (so a stream that ends after its span closed is still matched), embedding events, and the spans
  of retrievers, query engines, synthesizers, chat engines, workflows (``FunctionAgent``,
  ``AgentWorkflow``) and tools (``FunctionTool.acall``: agents emit no other tool event). It is where
  the run tree is built and every call is costed. But ``Dispatcher.event`` and the span hooks
  swallow every exception a handler raises, so nothing raised there can stop a run.
* A **legacy callback handler** (``CallbackManager``): its exceptions propagate, and LlamaIndex calls
  it right after the instrumentation start event of an LLM call and before the request is sent, and
  at the call's end (for a stream, when the stream is exhausted). ``instrument()`` installs it on
  ``Settings.callback_manager`` and, lazily at the first span of any component (LLM, embedding,
  retriever, query engine ...), on that component's own ``callback_manager``, so components built
  before ``instrument()`` or before ``Settings.callback_manager`` was set are covered too. It raises
  the ``RunAborted`` a guard decided in the instrumentation handlers, and does the LLM end accounting
  itself so that a call that takes the run past its budget raises to the caller at once.

The legacy handler also works alone (``tracker.llamaindex_handler()`` in a manager the app wires
itself, without ``instrument()``): it then costs and guards from the legacy events only.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, ToolCallBlock
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
from pydantic import PrivateAttr

from .._events import TokenUsage
from .._exceptions import RunAborted
from .._ledger import Span, _again, current_scope
from .._tokens import count_text

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


# -- prompt operations -------------------------------------------------------------------------------


def _tool_calls_json(msg: Any) -> str:
    """A message's tool calls as ``[{"name", "args"}]`` JSON ("" when it has none)."""
    calls: list[dict[str, Any]] = []
    for block in getattr(msg, "blocks", None) or ():
        if isinstance(block, ToolCallBlock):
            calls.append({"name": block.tool_name, "args": _args(block.tool_kwargs)})
    if not calls:
        ak = getattr(msg, "additional_kwargs", None)
        raw_calls = ak.get("tool_calls") if isinstance(ak, Mapping) else None
        for tc in raw_calls or ():
            fn = tc.get("function") if isinstance(tc, Mapping) else getattr(tc, "function", None)
            if isinstance(fn, Mapping):
                name, args = fn.get("name"), fn.get("arguments")
            else:
                name, args = getattr(fn, "name", None), getattr(fn, "arguments", None)
            calls.append({"name": name, "args": _args(args)})
    return json.dumps(calls, default=str) if calls else ""


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


class _LlamaOps:
    """Prompt operations on what a LlamaIndex LLM call sends: a message list (chat) or a prompt string
    (completion), plus the request's tool schemas. Never stored, never exported.

    Token count of a chat request: 3 + sum over messages of (4 + text + tool calls) + the tools' JSON
    (OpenAI's cookbook accounting), each counted with the model's own tiktoken encoding."""

    @staticmethod
    def signature(model: str | None, prompt: Any) -> int:
        if isinstance(prompt, str):
            return hash((model, prompt))
        parts: list[Any] = [model]
        for m in prompt or ():
            parts.append((str(getattr(m, "role", "")), _message_text(m), _tool_calls_json(m)))
        return hash(tuple(parts))

    @staticmethod
    def count_tokens(model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]:
        if isinstance(prompt, str):
            total, exact = count_text(prompt, model)
        else:
            total, exact = 3, True
            for m in prompt or ():
                n, ok = count_text(_message_text(m), model)
                total += n + 4
                exact = exact and ok
                tc = _tool_calls_json(m)
                if tc:
                    n, ok = count_text(tc, model)
                    total += n
                    exact = exact and ok
        if extra:
            n, ok = count_text(json.dumps(extra, default=str), model)
            total += n
            exact = exact and ok
        return total, exact


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
        return _message_text(resp.message) + _tool_calls_json(resp.message)
    if isinstance(resp, CompletionResponse):
        return resp.text or ""
    return ""


# -- usage ---------------------------------------------------------------------------------------------


def _int(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, bool):
        raise ValueError("bool is not a token count")
    if isinstance(v, int):
        n = v
    elif (isinstance(v, float) and v.is_integer()) or (isinstance(v, str) and v.strip().isdigit()):
        n = int(v)
    else:
        raise ValueError(f"not a token count: {v!r}")
    if n < 0:
        raise ValueError(f"negative token count: {n}")
    return n


def _as_dict(obj: Any) -> Mapping[str, Any] | None:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        d = dump()
        return d if isinstance(d, Mapping) else None
    d = getattr(obj, "__dict__", None)
    return d if isinstance(d, Mapping) else None


def usage_from_dict(u: Mapping[str, Any]) -> TokenUsage | None:
    """A provider's usage mapping -> ``TokenUsage``: OpenAI (``prompt_tokens``...), Anthropic
    (``input_tokens`` excluding its cache tokens) or the OpenAI Responses API style. ``None`` if it
    holds no count; raises ``ValueError`` on garbage."""
    if "prompt_tokens" in u or "completion_tokens" in u:
        ptd = _as_dict(u.get("prompt_tokens_details")) or {}
        ctd = _as_dict(u.get("completion_tokens_details")) or {}
        usage = TokenUsage(
            input=_int(u.get("prompt_tokens")),
            output=_int(u.get("completion_tokens")),
            cache_read=_int(ptd.get("cached_tokens")),
            cache_write=_int(ptd.get("cache_creation_tokens") or ptd.get("cache_write_tokens")),
            reasoning=_int(ctd.get("reasoning_tokens")),
        )
    elif "input_tokens" in u or "output_tokens" in u:
        if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:  # Anthropic
            cr = _int(u.get("cache_read_input_tokens"))
            cw = _int(u.get("cache_creation_input_tokens"))
            usage = TokenUsage(input=_int(u.get("input_tokens")) + cr + cw, output=_int(u.get("output_tokens")),
                               cache_read=cr, cache_write=cw)
        else:
            itd = _as_dict(u.get("input_tokens_details")) or {}
            otd = _as_dict(u.get("output_tokens_details")) or {}
            usage = TokenUsage(input=_int(u.get("input_tokens")), output=_int(u.get("output_tokens")),
                               cache_read=_int(itd.get("cached_tokens")),
                               reasoning=_int(otd.get("reasoning_tokens")))
    else:
        return None
    if usage.input == 0 and usage.output == 0:
        return None  # an all-zero report (a stream without usage) is no report
    return usage


def usage_of(resp: Any) -> TokenUsage | None:
    """The usage a LlamaIndex response carries: ``response.raw.usage`` (the provider's own object,
    e.g. an openai ``ChatCompletion``, or a dict), else the counts copied into ``additional_kwargs``."""
    raw = getattr(resp, "raw", None)
    u = raw.get("usage") if isinstance(raw, Mapping) else getattr(raw, "usage", None)
    d = _as_dict(u)
    if d:
        usage = usage_from_dict(d)
        if usage is not None:
            return usage
    ak = getattr(resp, "additional_kwargs", None)
    if isinstance(ak, Mapping):
        return usage_from_dict(ak)
    return None


def _served_model(resp: Any) -> str | None:
    raw = getattr(resp, "raw", None)
    m = raw.get("model") if isinstance(raw, Mapping) else getattr(raw, "model", None)
    return m if isinstance(m, str) and m else None


# -- naming ----------------------------------------------------------------------------------------------


def _provider_of(cls: type | None) -> str | None:
    """``llama_index.llms.openai.base`` -> ``openai``; ``None`` for core, mock and ``*_like`` classes."""
    mod = getattr(cls, "__module__", "") or ""
    parts = mod.split(".")
    if len(parts) >= 3 and parts[0] == "llama_index" and parts[1] in ("llms", "embeddings"):
        p = parts[2]
        return None if p.endswith("_like") else p
    return None


def _provider_from_class_name(name: Any) -> str | None:
    """For the stand-alone handler (it sees only ``to_payload()``): ``openai_llm`` -> ``openai``."""
    if not isinstance(name, str):
        return None
    n = name.lower()
    if "like" in n:
        return None
    for p in ("azure", "openai", "anthropic", "gemini", "bedrock", "mistral", "groq", "cohere"):
        if p in n:
            return p
    return None


def _model_of(model_dict: Any, cls_name: str | None) -> str | None:
    """The model a call names: ``model`` / ``model_name`` of ``to_payload()``, else the class name
    (``MockLLM``, ``MockEmbedding``: price them under that name)."""
    if isinstance(model_dict, Mapping):
        for k in ("model", "model_name"):
            v = model_dict.get(k)
            if isinstance(v, str) and v and v != "unknown":
                return v
        if cls_name is None:
            cn = model_dict.get("class_name")
            return cn if isinstance(cn, str) and cn else None
    return cls_name


def _max_tokens(kwargs: Mapping[str, Any], model_dict: Any) -> int | None:
    for v in (kwargs.get("max_tokens"), kwargs.get("max_completion_tokens"),
              model_dict.get("num_output") if isinstance(model_dict, Mapping) else None):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _key(span_id: str) -> str:
    """The ledger key of a LlamaIndex span: the uuid of ``Class.method-<uuid4>`` (ids stay short)."""
    if len(span_id) > _UUID_LEN + 1 and span_id[-_UUID_LEN - 1] == "-":
        return span_id[-_UUID_LEN:]
    return span_id[:64]


def _method_of(span_id: str) -> tuple[str, str]:
    """``("Class.method", "method")`` of a span id."""
    head = span_id[:-_UUID_LEN - 1] if len(span_id) > _UUID_LEN + 1 else span_id
    return head, head.rsplit(".", 1)[-1]


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


# -- state -----------------------------------------------------------------------------------------------


class _Track:
    """One span we opened in the ledger, with what its end needs."""

    __slots__ = (
        "ctx_token", "ended", "event_id", "exit_error", "exit_status", "exited", "inner_prompt", "inner_usage", "key",
        "kind", "model", "node", "open_children", "parent", "partial", "prompt", "span", "span_id",
        "stream_usage_requested", "tools",
    )

    def __init__(self, key: str, parent: _Track | None, kind: str, span: Span, node: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.node = node
        self.kind = kind
        self.span = span
        self.open_children = 0
        self.exited = False
        self.ended = False
        self.exit_status = "ok"
        self.exit_error: BaseException | None = None
        self.event_id: str | None = None
        self.span_id: str | None = None
        self.model: str | None = None
        self.prompt: Any = None
        self.tools: Any = None
        self.partial: Any = None
        self.inner_prompt: Any = None
        self.inner_usage: TokenUsage | None = None
        self.ctx_token: Any = None
        self.stream_usage_requested = False


class _Node:
    """A LlamaIndex instrumentation span in flight (most are transparent: only the anchor matters)."""

    __slots__ = (
        "cls", "emb", "id", "method", "name", "parent", "refused", "refused_raised", "start_perf", "start_wall",
        "stream_usage_ok", "track",
    )

    def __init__(self, id_: str, parent: _Node | None, name: str, method: str, cls: type | None) -> None:
        self.id = id_
        self.parent = parent
        self.name = name
        self.method = method
        self.cls = cls
        self.track: _Track | None = None
        self.refused: RunAborted | None = None
        self.refused_raised = False
        self.emb: list[_Track] = []
        self.stream_usage_ok = False  # an OpenAI-compatible LLM's streaming method, stream_options unset
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
        self.events: dict[str, _Track | None] = {}  # legacy event id -> track (None: a nested call)
        # the stand-alone handler's LLM call open in this context (CustomLLM.chat calls complete)
        self.legacy_llm: ContextVar[_Track | None] = ContextVar(f"costobs_li_llm_{id(self)}", default=None)
        self.orphans: list[_Track] = []  # embedding calls outside any known span (instrumented mid-call)
        self.lock = threading.RLock()
        self.managers: weakref.WeakSet[CallbackManager] = weakref.WeakSet()
        self.created_settings_manager: CallbackManager | None = None
        self.internal_errors = 0
        self._last_log = 0.0
        self.span_handler = _SpanHandler(self)
        self.event_handler = _EventHandler(self)
        self.legacy = CostLlamaIndexHandler(self)

    # -- faults ----------------------------------------------------------------------------------

    def fault(self, hook: str, exc: BaseException) -> None:
        """Our own bug or a payload we could not read: count, log (rate-limited), carry on."""
        self.internal_errors += 1
        self.ledger.internal_errors += 1
        now = time.monotonic()
        if now - self._last_log > 5.0:
            self._last_log = now
            logger.warning("costobs: internal error in LlamaIndex %s (%d so far): %r", hook, self.internal_errors,
                           exc, exc_info=exc)

    # -- opening and closing ledger spans ------------------------------------------------------------

    def open(self, key: str, parent: _Track | None, kind: str, name: str, node: _Node | None,
             **kw: Any) -> _Track:
        span = self.ledger.start(key, parent.key if parent is not None else None, kind, name, **kw)
        track = _Track(key, parent, kind, span, node)
        if parent is not None:
            with self.lock:
                parent.open_children += 1
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
            track.span.start_wall = top.start_wall
            track.span.start_perf = top.start_perf
            top.track = track
            return track

    # -- instrumentation: spans ----------------------------------------------------------------------

    def span_enter(self, id_: str, bound_args: Any, instance: Any, parent_id: str | None) -> None:
        parent = self.nodes.get(parent_id) if parent_id else None
        cls = type(instance) if instance is not None else None
        name, method = _method_of(id_)
        node = _Node(id_, parent, name, method, cls)
        self.nodes[id_] = node
        if instance is None:
            return
        self.hook(instance)
        kind: str | None = None
        tool_args: Any = None
        label = cls.__name__ if cls is not None else name
        if isinstance(instance, BaseLLM):
            if method in _STREAM_METHODS and _is_openai_compatible(type(instance)):
                ak = getattr(instance, "additional_kwargs", None)
                node.stream_usage_ok = not (isinstance(ak, Mapping) and "stream_options" in ak)
            return  # the LLM span opens at its start event, which carries the request
        if isinstance(instance, BaseTool) and method in _TOOL_METHODS:
            kind = "tool"
            label = _tool_name(instance) or label
            up = self.anchor(node, include_self=False)
            if up is not None and up.kind == "tool" and up.span.name == label:
                return  # FunctionTool.__call__ -> call: one call
            tool_args = _tool_args(instance, bound_args)
            try:
                node.track = self.open(_key(id_), up, "tool", label, node, tool_args=tool_args)
            except RunAborted as err:  # the tool runs anyway; the run stops at its next LLM call
                node.refused = err
            return
        for base, methods, k in _TRACED:
            if method in methods and isinstance(instance, base):
                kind = k
                break
        if kind is None:
            return
        up = self.anchor(node, include_self=False)
        try:
            node.track = self.open(_key(id_), up, kind, label, node)
        except RunAborted as err:
            node.refused = err

    def span_exit(self, id_: str, status: str, error: BaseException | None) -> None:
        node = self.nodes.pop(id_, None)
        if node is None:
            return
        if error is not None:
            self.nested.pop(id_, None)
        for t in list(node.emb):  # an embedding call cut short by an exception
            node.emb.remove(t)
            self._finish_quietly(t, status="error" if error is not None else "ok", error=error)
        track = node.track
        if track is None or track.node is not node:
            return
        if track.kind == "llm":
            if error is not None and not track.ended:  # failed before any end event (no legacy handler)
                self.finish_llm(track, None, error, quiet=True)
            return  # a stream's call ends at its end event, after its span exited
        try:
            self.exit_track(track, status, error)
        except RunAborted:
            pass  # sticky
        except Exception as exc:
            self.fault("span_exit", exc)

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
        sid = event.span_id
        node = self.nodes.get(sid) if sid else None
        is_chat = isinstance(event, LLMChatStartEvent)
        prompt: Any = list(event.messages) if isinstance(event, LLMChatStartEvent) else event.prompt
        kwargs = event.additional_kwargs or {}
        tools = _tool_schemas(kwargs.get("tools"))
        if sid is not None and sid in self.llm_tracks:
            return  # a second start event in the same span: the first call is the one
        outer = self.enclosing_llm(node)
        if outer is not None:  # CustomLLM.chat -> complete, acomplete -> complete: one call, not two
            if sid is not None:
                self.nested[sid] = outer
            if node is not None:
                node.track = outer
            if outer.inner_prompt is None:
                outer.inner_prompt = (prompt, tools)
            return
        cls = node.cls if node is not None else None
        cls_name = cls.__name__ if cls is not None else None
        model = _model_of(event.model_dict, cls_name)
        provider = _provider_of(cls) if cls is not None else _provider_from_class_name(
            event.model_dict.get("class_name"))
        up = self.anchor(node, include_self=False)
        key = _key(sid) if sid else event.id_
        try:
            track = self.open(key, up, "llm", cls_name or str(event.model_dict.get("class_name") or "llm"), node,
                              model=model, provider=provider, prompt=prompt if is_chat else str(prompt),
                              prompt_ops=OPS, extra=tools, max_tokens=_max_tokens(kwargs, event.model_dict))
        except RunAborted as err:
            if node is not None:
                node.refused = err
            return
        track.model = model
        track.prompt = prompt
        track.tools = tools
        track.span_id = sid
        if node is not None:
            node.track = track
        if sid is not None:
            self.llm_tracks[sid] = track

    def llm_progress(self, span_id: str | None, response: Any) -> None:
        if span_id is None:
            return
        track = self.llm_tracks.get(span_id)
        if track is not None:
            track.partial = response

    def llm_end_event(self, span_id: str | None, response: Any) -> None:
        if span_id is None:
            return
        outer = self.nested.pop(span_id, None)
        if outer is not None:
            if outer.inner_usage is None:
                try:
                    outer.inner_usage = usage_of(response)
                except (ValueError, TypeError):
                    pass
            return
        track = self.llm_tracks.get(span_id)
        if track is not None and not track.ended:
            self.finish_llm(track, response, None, quiet=True)

    def llm_exception(self, span_id: str | None, error: BaseException) -> None:
        if span_id is None:
            return
        self.nested.pop(span_id, None)
        track = self.llm_tracks.get(span_id)
        if track is not None and not track.ended:
            self.finish_llm(track, None, error, quiet=True)

    def finish_llm(self, track: _Track, response: Any, error: BaseException | None, *, quiet: bool) -> None:
        """Cost an LLM call from its response (or what streamed before an error) and end it. Raises
        the ledger's ``RunAborted`` (the run is past its budget now) unless ``quiet``."""
        if track.span_id is not None:
            self.llm_tracks.pop(track.span_id, None)
        if track.event_id is not None:
            self.events.pop(track.event_id, None)
        status = "ok"
        flags: list[str] = []
        if error is not None:
            if isinstance(error, GeneratorExit):
                flags.append("stream_closed")  # the app stopped reading; what streamed is billed
            else:
                status = "error"
        try:
            resp = response if response is not None else track.partial
            usage: TokenUsage | None = None
            model = _served_model(resp)
            if resp is not None:
                try:
                    usage = usage_of(resp)
                except (ValueError, TypeError):
                    flags.append("malformed_usage")
            if usage is None and track.inner_usage is not None:
                usage = track.inner_usage
            estimated = False
            if usage is None and (status == "ok" or resp is not None):
                usage, exact = self._estimate(track, model, resp)
                estimated = True
                flags.append("estimated")
                if not exact:
                    flags.append("estimate:chars")
                if track.stream_usage_requested:
                    flags.append("no_stream_usage")
        except Exception as exc:  # a payload we could not read: end the span anyway
            self.fault("llm end", exc)
            usage, model, estimated = None, None, False
            flags.append("internal_error")
        track.prompt = track.tools = track.partial = track.inner_prompt = None  # drop the app's messages now
        try:
            self.finish(track, status=status, error=error if status == "error" else None, usage=usage,
                        model=model, estimated=estimated, flags=flags)
        except RunAborted:
            if quiet or isinstance(error, RunAborted):
                return
            raise

    @staticmethod
    def _estimate(track: _Track, model: str | None, resp: Any) -> tuple[TokenUsage, bool]:
        m = model or track.model
        if track.inner_prompt is not None:  # what a CustomLLM really sent: its inner call's prompt
            prompt, tools = track.inner_prompt
        else:
            prompt, tools = track.prompt, track.tools
        inp, ok_in = OPS.count_tokens(m, prompt, tools)
        out, ok_out = count_text(_response_text(resp), m)
        return TokenUsage(input=inp, output=out), ok_in and ok_out

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
        cls = node.cls if node is not None else None
        cls_name = cls.__name__ if cls is not None else None
        model = _model_of(event.model_dict, cls_name)
        provider = _provider_of(cls) if cls is not None else _provider_from_class_name(
            event.model_dict.get("class_name"))
        up = self.anchor(node, include_self=True)
        try:
            track = self.open(event.id_, up, "embedding", cls_name or "embedding", node, model=model,
                              provider=provider)
        except RunAborted as err:
            if node is not None:
                node.refused = err
            return
        track.model = model
        if node is not None:
            node.emb.append(track)
        else:
            self.orphans.append(track)

    def embedding_end(self, span_id: str | None, chunks: Sequence[str]) -> None:
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
        if node is not None and track in node.emb:
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
                aborted = n.track.span.run.aborted
                if aborted is not None:
                    raise _again(aborted)
                return
            n = n.parent
        scope = current_scope.get()
        if scope is not None and scope.run.aborted is not None:
            raise _again(scope.run.aborted)

    def legacy_start_instrumented(self, event_type: CBEventType, payload: Any, event_id: str) -> None:
        sid = active_span_id.get()
        node = self.nodes.get(sid) if sid else None
        self.raise_if_stopped(node)
        if event_type == CBEventType.LLM and sid is not None:
            track = self.llm_tracks.get(sid)
            if track is None or track.event_id is not None:
                return
            track.event_id = event_id
            self.events[event_id] = track
            if self.request_stream_usage and node is not None and node.stream_usage_ok and isinstance(payload, dict):
                kw = payload.get(EventPayload.ADDITIONAL_KWARGS)
                if isinstance(kw, dict) and "stream_options" not in kw:
                    kw["stream_options"] = {"include_usage": True}  # the very dict the call is made with
                    track.stream_usage_requested = True
        elif event_type == CBEventType.EMBEDDING and node is not None:
            for t in reversed(node.emb):
                if t.event_id is None:
                    t.event_id = event_id
                    self.events[event_id] = t
                    break

    def legacy_start_alone(self, event_type: CBEventType, payload: Any, event_id: str, parent_id: str) -> None:
        if event_id in self.events:
            return  # the handler sits twice in one manager
        parent = self.events.get(parent_id) if parent_id else None
        p = payload if isinstance(payload, Mapping) else {}
        if event_type == CBEventType.LLM:
            outer = self.legacy_llm.get()
            if outer is not None and not outer.ended:  # CustomLLM.chat -> complete
                self.events[event_id] = None
                if outer.inner_prompt is None:
                    pr = p.get(EventPayload.PROMPT)
                    msgs = p.get(EventPayload.MESSAGES)
                    kw = p.get(EventPayload.ADDITIONAL_KWARGS) or {}
                    outer.inner_prompt = (str(pr) if pr is not None else list(msgs or ()),
                                          _tool_schemas(kw.get("tools")) if isinstance(kw, Mapping) else None)
                return
            md = p.get(EventPayload.SERIALIZED) or {}
            msgs = p.get(EventPayload.MESSAGES)
            prompt: Any = list(msgs) if msgs is not None else str(p.get(EventPayload.PROMPT) or "")
            kw = p.get(EventPayload.ADDITIONAL_KWARGS) or {}
            kw = kw if isinstance(kw, Mapping) else {}
            tools = _tool_schemas(kw.get("tools"))
            cls_name = md.get("class_name") if isinstance(md, Mapping) else None
            model = _model_of(md, None)
            track = self.open(event_id, parent, "llm", str(cls_name or "llm"), None, model=model,
                              provider=_provider_from_class_name(cls_name), prompt=prompt, prompt_ops=OPS,
                              extra=tools, max_tokens=_max_tokens(kw, md))
            track.model, track.prompt, track.tools, track.event_id = model, prompt, tools, event_id
            track.ctx_token = self.legacy_llm.set(track)
        elif event_type == CBEventType.EMBEDDING:
            md = p.get(EventPayload.SERIALIZED) or {}
            model = _model_of(md, None)
            cls_name = md.get("class_name") if isinstance(md, Mapping) else None
            track = self.open(event_id, parent, "embedding", str(cls_name or "embedding"), None, model=model,
                              provider=_provider_from_class_name(cls_name))
            track.model, track.event_id = model, event_id
        elif event_type == CBEventType.RETRIEVE:
            track = self.open(event_id, parent, "retriever", "retrieve", None)
        elif event_type == CBEventType.FUNCTION_CALL:
            tool = p.get(EventPayload.TOOL)
            name = getattr(tool, "name", None) or "tool"
            track = self.open(event_id, parent, "tool", str(name), None, tool_args=p.get(EventPayload.FUNCTION_CALL))
        elif event_type in _LEGACY_CHAINS:
            track = self.open(event_id, parent, "chain", event_type.value, None)
        else:
            return
        self.events[event_id] = track

    def legacy_end(self, event_type: CBEventType, payload: Any, event_id: str) -> None:
        if event_id not in self.events:
            return
        track = self.events.pop(event_id)
        if track is None or track.ended:
            return
        p = payload if isinstance(payload, Mapping) else {}
        error = p.get(EventPayload.EXCEPTION)
        error = error if isinstance(error, BaseException) else None
        if track.kind == "llm":
            if track.ctx_token is not None:
                try:
                    self.legacy_llm.reset(track.ctx_token)
                except ValueError:  # a stream ending in another context
                    pass
                track.ctx_token = None
            resp = p.get(EventPayload.RESPONSE)
            if resp is None:
                resp = p.get(EventPayload.COMPLETION)
            self.finish_llm(track, resp, error, quiet=False)
        elif track.kind == "embedding":
            if error is not None:
                self.finish(track, status="error", error=error)
            else:
                self.finish_embedding(track, p.get(EventPayload.CHUNKS), quiet=False)
        else:
            try:
                self.finish(track, status="error" if error is not None else "ok", error=error)
            except RunAborted:
                if isinstance(error, RunAborted):
                    return
                raise

    # -- managers --------------------------------------------------------------------------------------

    def hook(self, instance: Any) -> None:
        """Put the legacy handler on a component's own callback manager (once): a component built before
        ``instrument()`` or before ``Settings.callback_manager`` was set has a manager without it."""
        try:
            cm = getattr(instance, "callback_manager", None)
        except Exception:
            return
        if isinstance(cm, CallbackManager) and self.legacy not in cm.handlers:
            cm.add_handler(self.legacy)
            self.managers.add(cm)


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

    _adapter: Any = PrivateAttr(default=None)

    def __init__(self, adapter: _Adapter) -> None:
        super().__init__()
        self._adapter = adapter

    @classmethod
    def class_name(cls) -> str:
        return "CostObsSpanHandler"

    def span_enter(self, id_: str, bound_args: Any, instance: Any = None, parent_id: str | None = None,
                   tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        try:
            self._adapter.span_enter(id_, bound_args, instance, parent_id)
        except Exception as exc:
            self._adapter.fault("span_enter", exc)

    def span_exit(self, id_: str, bound_args: Any, instance: Any = None, result: Any = None,
                  **kwargs: Any) -> None:
        try:
            self._adapter.span_exit(id_, "ok", None)
        except Exception as exc:
            self._adapter.fault("span_exit", exc)

    def span_drop(self, id_: str, bound_args: Any, instance: Any = None, err: BaseException | None = None,
                  **kwargs: Any) -> None:
        try:
            self._adapter.span_exit(id_, "error", err if err is not None else RuntimeError("span dropped"))
        except Exception as exc:
            self._adapter.fault("span_drop", exc)

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


class _EventHandler(BaseEventHandler):
    """Instrumentation event handler: LLM and embedding calls, matched to their spans by span id."""

    _adapter: Any = PrivateAttr(default=None)

    def __init__(self, adapter: _Adapter) -> None:
        super().__init__()
        self._adapter = adapter

    @classmethod
    def class_name(cls) -> str:
        return "CostObsEventHandler"

    def handle(self, event: Any, **kwargs: Any) -> None:
        a: _Adapter = self._adapter
        try:
            if isinstance(event, (LLMChatInProgressEvent, LLMCompletionInProgressEvent)):
                a.llm_progress(event.span_id, event.response)
            elif isinstance(event, (LLMChatStartEvent, LLMCompletionStartEvent)):
                a.llm_start(event)
            elif isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
                a.llm_end_event(event.span_id, event.response)
            elif isinstance(event, ExceptionEvent):
                a.llm_exception(event.span_id, event.exception)
            elif isinstance(event, EmbeddingStartEvent):
                a.embedding_start(event)
            elif isinstance(event, (EmbeddingEndEvent, SparseEmbeddingEndEvent)):
                a.embedding_end(event.span_id, event.chunks)
        except RunAborted:
            pass  # cannot reach the app from here; the run is aborted (sticky)
        except Exception as exc:
            a.fault(type(event).__name__, exc)


class CostLlamaIndexHandler(BaseCallbackHandler):
    """The legacy ``CallbackManager`` handler of one tracker (``tracker.llamaindex_handler()``).

    After ``instrument()`` it raises the guards' decisions at LLM and other starts and costs LLM ends
    (so a budget passed by a call raises to the caller at once). Without ``instrument()`` it costs and
    guards from the legacy events alone. Only a deliberate ``RunAborted`` ever escapes it.
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
        if event_type == CBEventType.EXCEPTION:
            return event_id
        a = self._adapter
        try:
            if a.instrumented:
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
        if event_type == CBEventType.EXCEPTION:
            return
        a = self._adapter
        try:
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
            if a.event_handler not in root.event_handlers:
                root.add_event_handler(a.event_handler)
            a.instrumented = True
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
        root.event_handlers = [h for h in root.event_handlers if h is not a.event_handler]
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


def legacy_handler(tracker: CostTracker) -> CostLlamaIndexHandler:
    """The tracker's legacy ``CallbackManager`` handler (one per tracker)."""
    return _adapter(tracker).legacy
