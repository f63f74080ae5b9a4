"""The legacy ``CallbackManager`` handler, ``CostLlamaIndexHandler``: its exceptions propagate, and LlamaIndex calls
it at an LLM call's start, before the request is sent, and at its end (for a stream, when the stream is read to its
end or closed).

After ``instrument()`` it is on ``Settings.callback_manager`` and on the manager of every component whose span the
span handler saw (``Adapter.hook``). An LLM call opens at its legacy start (where a guard's refusal reaches the
caller) and is costed at its legacy end (so a call that takes the run past its budget raises to the caller at once);
at any start it raises the ``RunAborted`` a guard decided in the instrumentation handlers.

It also works alone (``tracker.llamaindex_handler()`` in a manager the app wires itself, without ``instrument()``):
it then builds the tree from the legacy events' parent ids and costs and guards from them alone.

A call made on its own (no tracked span above it, no ``tracker.run()`` around it) under a tracker policy that
cannot refuse it opens nothing at its start and is recorded whole at its end (``Ledger.record_llm``); so is a call
with no tracked span above it in a ``tracker.run()`` scope whose run only the loop guard could refuse it, once
admitted and counted at its start (``Ledger.admit_scoped_llm``, ``Ledger.record_scoped_llm``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from llama_index.core.callbacks import CBEventType
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.instrumentation.span import active_span_id

from ..._exceptions import RunAborted
from ..._ledger import DECLINED, current_scope
from .calls import Adapter
from .identity import identify, model_of, provider_from_class_name
from .payloads import (
    EMPTY,
    OPS,
    P_CHUNKS,
    P_COMPLETION,
    P_EXCEPTION,
    P_FUNCTION_CALL,
    P_KWARGS,
    P_PROMPT,
    P_RESPONSE,
    P_SERIALIZED,
    P_TOOL,
    max_tokens,
    request,
    usage_of,
)
from .state import Node, Track, span_key

_new_object = object.__new__

__all__ = ["CostLlamaIndexHandler"]

_EV_LLM = CBEventType.LLM
_EV_EMBEDDING = CBEventType.EMBEDDING
_EV_EXCEPTION = CBEventType.EXCEPTION
_EV_RETRIEVE = CBEventType.RETRIEVE
_EV_FUNCTION_CALL = CBEventType.FUNCTION_CALL
# Event types the stand-alone handler traces as chains (the rest is ingestion noise).
_CHAINS = frozenset({
    CBEventType.QUERY, CBEventType.SYNTHESIZE, CBEventType.SUB_QUESTION, CBEventType.AGENT_STEP,
    CBEventType.RERANKING, CBEventType.TREE,
})


# -- instrumented: the span handler built the tree ------------------------------------------------------


def start_instrumented(a: Adapter, node: Node | None, sid: str | None, event_type: CBEventType, payload: Any,
                       event_id: str) -> None:
    """Any start but that of an LLM call whose span has this handler (``llm_start``), in the span ``node``: raise
    what a guard decided; tie an LLM call opened at its instrumentation start event, or an embedding call, to
    this event."""
    a.raise_if_stopped(node)
    if event_type is _EV_LLM:
        if sid is None:
            return
        track = a.llm_tracks.get(sid)  # opened at its instrumentation start event, just before
        if track is None or track.event_id is not None:
            return
        track.event_id = event_id
        a.events[event_id] = track
        if a.request_stream_usage and node is not None and isinstance(payload, dict):
            _request_stream_usage(a, node, track, payload.get(P_KWARGS))
    elif event_type is _EV_EMBEDDING and node is not None and node.emb:
        for t in reversed(node.emb):
            if t.event_id is None:
                t.event_id = event_id
                a.events[event_id] = t
                break


def llm_start(a: Adapter, node: Node, sid: str, payload: Any, event_id: str) -> None:
    """An LLM call's start, from its legacy event, for a call whose span has our handler on its manager (all of
    them, but for a component without a manager; the instrumentation start event, just before, is left alone).
    The call opens here, where a guard's refusal reaches the caller before the request is sent."""
    if node.track is not None or node.refused is not None:
        # A second call in this span (or this handler twice in a manager): the first call is the one, but a
        # run stopped meanwhile (or a refused first call) stops it too.
        a.raise_if_stopped(node)
        return
    kw: Any
    md: Any
    if type(payload) is dict:  # request(payload), inline for a completion's payload as LlamaIndex makes it
        prompt = payload.get(P_PROMPT)
        kw = payload.get(P_KWARGS)
        md = payload.get(P_SERIALIZED)
        if type(prompt) is str and type(kw) is dict and type(md) is dict and "tools" not in kw:
            tools = None
        else:
            prompt, tools, kw, md = request(payload)
    else:
        prompt, tools, kw, md = request(payload)
    parent = node.parent
    if parent is not None:
        outer = a.enclosing_llm(node)
        if outer is not None:  # CustomLLM.chat -> complete, acomplete -> complete: one call, not two
            a.nested_events[event_id] = outer  # its end gives the outer call its usage (see end)
            node.track = outer
            a.nest(outer, prompt, tools)
            return
    name, model, provider = identify(node.cls, md, "llm")
    # span_key(sid), inline for LlamaIndex's own ids ("Class.method-<uuid4>")
    key = sid[-36:] if len(sid) > 37 and sid[-37] == "-" else span_key(sid)
    ledger = a.ledger
    scope = current_scope.get() if parent is None else None
    sig: Any = DECLINED
    if scope is not None:  # a call in a tracker.run() scope: counted now, recorded whole at its end if admitted
        sig = ledger.admit_scoped_llm(scope, model, prompt, OPS)
    if sig is not DECLINED:
        # Adapter.lone, inline (the app's thread makes one of these per call in a scope): no ledger span until it ends
        track = _new_object(Track)
        track.key = key
        track.parent = None
        track.node = node
        track.kind = "llm"
        track.span = None
        track.lone = True
        track.name = name
        track.provider = provider
        track.model = model
        track.prompt = prompt
        track.tools = tools
        track.start_wall = time.time()
        track.start_perf = time.perf_counter()
        track.scope = scope
        track.sig = sig
    elif parent is None and scope is None and ledger.lone_calls:  # a.may_be_lone(False), inline
        track = a.lone(key, node, name, model, provider, prompt, tools, time.time(), time.perf_counter())
    else:
        up = a.anchor(node, include_self=False) if parent is not None else None
        try:
            track = a.open_llm(key, up, name, node, model, provider, prompt, tools, max_tokens(kw, md))
        except RunAborted as err:
            node.refused = err
            node.refused_raised = True
            raise
    track.span_id = sid
    track.event_id = event_id
    node.track = track
    a.events[event_id] = track
    if a.request_stream_usage:
        _request_stream_usage(a, node, track, kw)


def _request_stream_usage(a: Adapter, node: Node, track: Track, kw: Any) -> None:
    """``request_stream_usage``: ask an OpenAI-compatible LLM's stream for its usage, in the very keyword
    arguments the call is made with."""
    if node.stream_usage_ok and type(kw) is dict and "stream_options" not in kw:
        kw["stream_options"] = {"include_usage": True}
        track.stream_usage_requested = True


# -- alone: the legacy events' parent ids build the tree ------------------------------------------------


def start_alone(a: Adapter, event_type: CBEventType, payload: Any, event_id: str, parent_id: str) -> None:
    events = a.events
    if event_id in events:
        return  # the handler sits twice in one manager
    parent = events.get(parent_id) if parent_id else None
    p: Mapping[Any, Any] = payload if isinstance(payload, Mapping) else EMPTY
    if event_type is _EV_LLM:
        prompt, tools, kw, md = request(payload)
        outer = a.legacy_llm.get()
        if outer is not None and not outer.ended:  # CustomLLM.chat -> complete
            events[event_id] = None
            a.nest(outer, prompt, tools)
            return
        name, model, provider = identify(None, md, "llm")
        if a.may_be_lone(parent is not None):
            track = a.lone(event_id, None, name, model, provider, prompt, tools, time.time(), time.perf_counter())
        else:
            track = a.open_llm(event_id, parent, name, None, model, provider, prompt, tools, max_tokens(kw, md))
        track.event_id = event_id
        track.ctx_token = a.legacy_llm.set(track)
    elif event_type is _EV_EMBEDDING:
        serialized = p.get(P_SERIALIZED)
        md = serialized if isinstance(serialized, Mapping) else EMPTY
        model = model_of(md, None)
        cls_name = md.get("class_name")
        track = a.open(event_id, parent, "embedding", str(cls_name or "embedding"), None, model=model,
                       provider=provider_from_class_name(cls_name))
        track.model, track.event_id = model, event_id
    elif event_type is _EV_RETRIEVE:
        track = a.open(event_id, parent, "retriever", "retrieve", None)
    elif event_type is _EV_FUNCTION_CALL:
        tool = p.get(P_TOOL)
        name = getattr(tool, "name", None) or "tool"
        track = a.open(event_id, parent, "tool", str(name), None, tool_args=p.get(P_FUNCTION_CALL))
    elif event_type in _CHAINS:
        track = a.open(event_id, parent, "chain", event_type.value, None)
    else:
        return
    events[event_id] = track


# -- ends, either way ---------------------------------------------------------------------------------------


def end_nested(a: Adapter, p: Mapping[Any, Any], event_id: str) -> None:
    """The end of an event we opened nothing for, while LLM calls nested in others are open: if it is one of them,
    its usage is the outer call's (if the outer call reports none)."""
    outer = a.nested_events.pop(event_id, None)
    if outer is not None and outer.inner_usage is None:
        resp = p.get(P_RESPONSE)
        if resp is None:
            resp = p.get(P_COMPLETION)
        if resp is not None:
            try:
                outer.inner_usage = usage_of(resp)
            except (ValueError, TypeError):
                pass


def end_step(a: Adapter, track: Track, p: Mapping[Any, Any], error: BaseException | None) -> None:
    """The end of a step we opened that is not an LLM call: an embedding call, a chain, a retriever, a tool."""
    if track.kind == "embedding":
        if error is not None:
            a.finish(track, status="error", error=error)
        else:
            a.finish_embedding(track, p.get(P_CHUNKS), quiet=False)
        return
    try:
        a.finish(track, status="error" if error is not None else "ok", error=error)
    except RunAborted:
        if isinstance(error, RunAborted):
            return
        raise


class CostLlamaIndexHandler(BaseCallbackHandler):
    """The legacy ``CallbackManager`` handler of one tracker (``tracker.llamaindex_handler()``).

    After ``instrument()`` it opens LLM calls at their start, where a guard's refusal (or an earlier decision of
    the instrumentation handlers) raises, and costs them at their end (so a budget passed by a call raises to the
    caller at once). Without ``instrument()`` it costs and guards from the legacy events alone. Only a
    deliberate ``RunAborted`` ever escapes it.
    """

    def __init__(self, adapter: Adapter) -> None:
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
        if event_type is _EV_EXCEPTION:
            return event_id
        a = self._adapter
        try:
            if a.instrumented:
                sid = active_span_id.get()
                node = a.nodes.get(sid) if sid else None
                if event_type is _EV_LLM and node is not None and node.legacy:
                    llm_start(a, node, sid, payload, event_id)  # type: ignore[arg-type]  # sid is set: node is
                else:
                    start_instrumented(a, node, sid, event_type, payload, event_id)
            else:
                start_alone(a, event_type, payload, event_id, parent_id)
        except RunAborted:
            raise
        except Exception as exc:
            a.fault(f"on_event_start({event_type})", exc)
        return event_id

    def on_event_end(self, event_type: CBEventType, payload: dict[str, Any] | None = None, event_id: str = "",
                     **kwargs: Any) -> None:
        """An event's end, either way (instrumented or alone). An LLM call's end is handled in this frame (one per
        call, on the app's thread); the rest in ``end_nested`` and ``end_step``."""
        if event_type is _EV_EXCEPTION:
            return
        a = self._adapter
        try:
            track = a.events.pop(event_id, None)
            p: Mapping[Any, Any] = payload if type(payload) is dict or isinstance(payload, Mapping) else EMPTY
            if track is None:  # not ours, or a call nested in another
                if a.nested_events:
                    end_nested(a, p, event_id)
                return
            if track.ended:
                return
            track.event_id = None  # popped
            error = p.get(P_EXCEPTION)
            if error is not None and not isinstance(error, BaseException):
                error = None
            if track.kind != "llm":
                end_step(a, track, p, error)
                return
            if track.ctx_token is not None:
                try:
                    a.legacy_llm.reset(track.ctx_token)
                except ValueError:  # a stream ending in another context
                    pass
                track.ctx_token = None
            resp = p.get(P_RESPONSE)
            if resp is None:
                resp = p.get(P_COMPLETION)
            a.finish_llm(track, resp, error, False)
        except RunAborted:
            raise
        except Exception as exc:
            a.fault(f"on_event_end({event_type})", exc)

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None) -> None:
        return None

