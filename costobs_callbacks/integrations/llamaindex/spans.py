"""The instrumentation span handler: every LlamaIndex span, with its parent id, builds the tree (``state.Node``); the
spans of retrievers, query engines, synthesizers, chat engines, workflows (``FunctionAgent``, ``AgentWorkflow``) and
tools (``FunctionTool.acall``: agents emit no other tool event) are opened as ledger spans; an LLM's span puts our
legacy handler on the LLM's callback manager, so that its call opens at its legacy start (``legacy``). What a span
of a ``Class.method`` needs is decided once per class (``Plan``): most spans are transparent.

``Dispatcher`` swallows every exception a span handler raises, so nothing raised here can stop a run: a refusal is
kept on the node and raised by the legacy handler at the next start below it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.callbacks import CallbackManager
from llama_index.core.chat_engine.types import BaseChatEngine
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.tools.types import BaseTool
from pydantic import BaseModel, Field

from ..._exceptions import RunAborted
from .calls import Adapter
from .identity import is_openai_compatible
from .payloads import tool_args, tool_name
from .state import Node, new_node, span_key

_new_object = object.__new__

try:  # llama-index-workflows: FunctionAgent / AgentWorkflow runs
    import workflows as _workflows

    _WORKFLOW: type | None = _workflows.Workflow
except ImportError:  # pragma: no cover - installed with llama-index-core 0.14
    _WORKFLOW = None

__all__ = ["SpanHandler"]

_STREAM_METHODS = frozenset({"stream_chat", "astream_chat", "stream_complete", "astream_complete"})
_TOOL_METHODS = frozenset({"call", "acall", "__call__"})

_TRACED: tuple[tuple[type, frozenset[str], str], ...] = (
    (BaseRetriever, frozenset({"retrieve", "aretrieve"}), "retriever"),
    (BaseQueryEngine, frozenset({"query", "aquery"}), "chain"),
    (BaseSynthesizer, frozenset({"synthesize", "asynthesize"}), "chain"),
    (BaseChatEngine, frozenset({"chat", "achat", "stream_chat", "astream_chat"}), "chain"),
    *(((_WORKFLOW, frozenset({"run"}), "chain"),) if _WORKFLOW is not None else ()),
)
"""Spans opened as ledger spans (besides LLM and embedding calls and tools): base class, methods, kind."""

SPAN_OTHER, SPAN_LLM, SPAN_TOOL, SPAN_TRACED = 0, 1, 2, 3


class Plan:
    """What ``span_enter`` does for one ``Class.method`` span: decided once per class (most spans are
    transparent and cost a dict lookup and a ``Node``)."""

    __slots__ = ("cls", "embedding", "hookable", "kind", "label", "node_cls", "stream_check", "what")

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.node_cls: type | None = None  # the instance's class (None: a function's span)
        self.what = SPAN_OTHER
        self.kind = ""
        self.label = ""
        self.hookable = False  # instances may carry a callback manager to put the legacy handler on
        self.stream_check = False  # an OpenAI-compatible LLM's streaming method
        self.embedding = False  # an embedding model's span: its calls are costed from instrumentation events


_PLANS: dict[str, Plan] = {}
_MAX_PLANS = 4096


def plan_for(instance: Any, head: str) -> Plan:
    """Decide the plan of a span of ``instance`` named ``head`` (``Class.method``), remembered per name in
    ``_PLANS`` (where the span handler looks first)."""
    cls: type = type(instance)
    plan = Plan(cls)
    if instance is not None:
        method = head.rsplit(".", 1)[-1]
        plan.node_cls = cls
        plan.label = cls.__name__
        plan.hookable = _hookable(cls)
        if isinstance(instance, BaseLLM):
            plan.what = SPAN_LLM
            plan.stream_check = method in _STREAM_METHODS and is_openai_compatible(cls)
        elif isinstance(instance, BaseEmbedding):
            plan.embedding = True
        elif isinstance(instance, BaseTool) and method in _TOOL_METHODS:
            plan.what = SPAN_TOOL
        else:
            for base, methods, k in _TRACED:
                if method in methods and isinstance(instance, base):
                    plan.what, plan.kind = SPAN_TRACED, k
                    break
        if getattr(instance, "__class__", cls) is not cls:
            return plan  # a proxy: its isinstance answers may differ between instances; not remembered
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


def exit_node(a: Adapter, node: Node, id_: str, status: str, error: BaseException | None) -> None:
    """A span exited (its node out of ``nodes``): end what it opened, give back its hold on the events."""
    try:
        _exit_node(a, node, id_, status, error)
    finally:
        if node.holds:
            node.holds = False
            a.release_events()


def _exit_node(a: Adapter, node: Node, id_: str, status: str, error: BaseException | None) -> None:
    if error is not None:
        a.nested.pop(id_, None)
    if node.emb:
        for t in list(node.emb):  # an embedding call cut short by an exception
            node.emb.remove(t)
            a.finish_quietly(t, status="error" if error is not None else "ok", error=error)
    track = node.track
    if track is None or track.node is not node:
        return
    if track.kind == "llm":
        if not track.ended:
            if error is not None:  # failed before any end event (no legacy handler)
                a.finish_llm(track, None, error, quiet=True)
            else:
                stream_open(a, id_, track)
        return  # a stream's call ends at its end event, after its span exited
    try:
        a.exit_track(track, status, error)
    except RunAborted:
        pass  # sticky
    except Exception as exc:
        a.fault("span_exit", exc)


def stream_open(a: Adapter, span_id: str, track: Any) -> None:
    """An LLM call's span exited before its end: a stream, read from now on (its progress, end and exception
    events are matched by span id; a call opened at its instrumentation start event is there already). It
    holds the event handler on the dispatcher until it ends."""
    with a.lock:
        if track.ended:  # ended meanwhile in another thread
            return
        a.llm_tracks[span_id] = track
        if not track.holds:
            track.holds = True
            a.hold_events()


class SpanHandler(BaseSpanHandler[Any]):
    """Instrumentation span handler: builds the run tree and opens chain, retriever and tool spans."""

    # A field, not a pydantic private attribute: those are read through pydantic's ``__getattr__``, which
    # cost more than the rest of a transparent span's handling.
    costobs_adapter: Any = Field(default=None, exclude=True, repr=False)

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.costobs_adapter = adapter

    @classmethod
    def class_name(cls) -> str:
        return "CostObsSpanHandler"

    def span_enter(self, id_: str, bound_args: Any, instance: Any = None, parent_id: str | None = None,
                   tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """A span entered: its node, our legacy handler on its component's manager, the ledger span it opens
        (in this one frame: LlamaIndex calls it for every span of the process)."""
        a: Adapter = self.costobs_adapter
        try:
            head = id_[:-37] if len(id_) > 37 else id_  # "Class.method" (37: "-" and the uuid)
            plan = _PLANS.get(head)
            if plan is None or plan.cls is not type(instance):
                plan = plan_for(instance, head)
            nodes = a.nodes
            what = plan.what
            if what == SPAN_LLM:
                # An LLM call's span (one per call, the app's thread): its node as new_node makes it (untimed: the
                # call starts at its start event), and, when its manager has our legacy handler already, what
                # Adapter.hook would find, both inline.
                node = _new_object(Node)
                node.id = id_
                node.name = head
                node.cls = plan.node_cls
                if parent_id:
                    parent = nodes.get(parent_id)
                    if parent is not None:
                        node.parent = parent
                nodes[id_] = node
                if plan.hookable:
                    cm = getattr(instance, "callback_manager", None)
                    node.legacy = True if type(cm) is CallbackManager and a.legacy in cm.handlers else a.hook(instance)
                if not node.legacy:  # costed from instrumentation events
                    node.holds = True
                    a.hold_events()
                if plan.stream_check:
                    ak = getattr(instance, "additional_kwargs", None)
                    node.stream_usage_ok = not (isinstance(ak, Mapping) and "stream_options" in ak)
                return  # the call opens at its (legacy, else instrumentation) start event, which carries the request
            node = new_node(id_, nodes.get(parent_id) if parent_id else None, head, plan.node_cls, True)
            nodes[id_] = node
            if plan.hookable:
                a.hook(instance)
            if plan.embedding:  # costed from instrumentation events
                node.holds = True
                a.hold_events()
            if what == SPAN_TOOL:
                label = tool_name(instance) or plan.label
                up = a.anchor(node, include_self=False)
                if up is not None and up.kind == "tool" and up.span is not None and up.span.name == label:
                    return  # FunctionTool.__call__ -> call: one call
                try:
                    node.track = a.open(span_key(id_), up, "tool", label, node,
                                        tool_args=tool_args(instance, bound_args))
                except RunAborted as err:  # the tool runs anyway; the run stops at its next LLM call
                    node.refused = err
            elif what == SPAN_TRACED:
                up = a.anchor(node, include_self=False)
                try:
                    node.track = a.open(span_key(id_), up, plan.kind, plan.label, node)
                except RunAborted as err:
                    node.refused = err
        except Exception as exc:
            a.fault("span_enter", exc)

    def span_exit(self, id_: str, bound_args: Any, instance: Any = None, result: Any = None,
                  **kwargs: Any) -> None:
        a: Adapter = self.costobs_adapter
        try:
            node = a.nodes.pop(id_, None)
            if node is None:
                return
            track = node.track
            if track is not None and track.ended and not node.emb and not node.holds:
                # An LLM call's span, the call ended at its end event (the common case): nothing left. Its track
                # refers to this node and the node to it: the cycle is broken here, so that both are freed now
                # rather than by the garbage collector (whose collections every surviving object brings nearer).
                node.track = None
                return
            exit_node(a, node, id_, "ok", None)
        except Exception as exc:
            a.fault("span_exit", exc)

    def span_drop(self, id_: str, bound_args: Any, instance: Any = None, err: BaseException | None = None,
                  **kwargs: Any) -> None:
        a: Adapter = self.costobs_adapter
        try:
            node = a.nodes.pop(id_, None)
            if node is not None:
                exit_node(a, node, id_, "error", err if err is not None else RuntimeError("span dropped"))
        except Exception as exc:
            a.fault("span_drop", exc)

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None
