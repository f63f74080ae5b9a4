"""The instrumentation event handler: embedding calls (from their start and end events), LLM calls whose component
has no legacy handler (from their start and end events, keyed by span id, so that a stream that ends after its span
closed is still matched) and what a stream sent before the app stopped reading (its progress events). LlamaIndex
calls it for every event of the process, so it is on the root dispatcher only while one of these needs it
(``Adapter.hold_events``); events are routed by their class, decided once per class. ``Dispatcher.event`` swallows
every exception a handler raises: a refusal is kept on the node, for the legacy handler to raise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from pydantic import Field

from ..._exceptions import RunAborted
from .calls import Adapter
from .identity import identify
from .payloads import EMPTY, Prompt, Tools, max_tokens, usage_of
from .state import span_key

__all__ = ["EventHandler"]


def llm_start(a: Adapter, event: LLMChatStartEvent | LLMCompletionStartEvent) -> None:
    """An LLM call's start whose span cannot count on our legacy handler (see ``legacy.llm_start``)."""
    sid = event.span_id
    node = a.nodes.get(sid) if sid else None
    if node is not None and node.legacy:
        return  # opened at its legacy start, next
    if sid is not None and sid in a.llm_tracks:
        return  # a second start event in the same span: the first call is the one
    prompt: str | Prompt = Prompt(list(event.messages)) if isinstance(event, LLMChatStartEvent) else str(event.prompt)
    kwargs = event.additional_kwargs or EMPTY
    raw_tools = kwargs.get("tools")
    tools = Tools(raw_tools) if raw_tools else None
    parent = node.parent if node is not None else None
    outer = a.enclosing_llm(node) if parent is not None else None
    if outer is not None:  # CustomLLM.chat -> complete, acomplete -> complete: one call, not two
        if sid is not None:
            a.nested[sid] = outer
        if node is not None:
            node.track = outer
        a.nest(outer, prompt, tools)
        return
    model_dict = event.model_dict
    name, model, provider = identify(node.cls if node is not None else None, model_dict, "llm")
    up = a.anchor(node, include_self=False) if parent is not None else None  # a top-level call: no anchor
    key = span_key(sid) if sid else event.id_
    try:
        track = a.open_llm(key, up, name, node, model, provider, prompt, tools, max_tokens(kwargs, model_dict))
    except RunAborted as err:
        if node is not None:
            node.refused = err
        return
    track.span_id = sid
    if node is not None:
        node.track = track
    if sid is not None:
        a.llm_tracks[sid] = track


def llm_progress(a: Adapter, event: LLMChatInProgressEvent | LLMCompletionInProgressEvent) -> None:
    span_id = event.span_id
    if span_id is None:
        return
    track = a.llm_tracks.get(span_id)
    if track is not None:
        track.partial = event.response


def llm_end(a: Adapter, event: LLMChatEndEvent | LLMCompletionEndEvent) -> None:
    if not a.llm_tracks and not a.nested:
        return  # ended at its legacy end event, just before (the common case), or not ours
    span_id = event.span_id
    if span_id is None:
        return
    outer = a.nested.pop(span_id, None) if a.nested else None
    if outer is not None:
        if outer.inner_usage is None:
            try:
                outer.inner_usage = usage_of(event.response)
            except (ValueError, TypeError):
                pass
        return
    track = a.llm_tracks.get(span_id)
    if track is not None and not track.ended:
        a.finish_llm(track, event.response, None, quiet=True)


def llm_exception(a: Adapter, event: ExceptionEvent) -> None:
    span_id = event.span_id
    if span_id is None:
        return
    a.nested.pop(span_id, None)
    track = a.llm_tracks.get(span_id)
    if track is not None and not track.ended:
        a.finish_llm(track, None, event.exception, quiet=True)


def embedding_start(a: Adapter, event: EmbeddingStartEvent) -> None:
    sid = event.span_id
    node = a.nodes.get(sid) if sid else None
    n = node.parent if node is not None else None
    while n is not None:  # an embedding call made inside another one is the same call
        if n.emb:
            return
        if n.track is not None:
            break
        n = n.parent
    name, model, provider = identify(node.cls if node is not None else None, event.model_dict, "embedding")
    up = a.anchor(node, include_self=True)
    try:
        track = a.open(event.id_, up, "embedding", name, node, model=model, provider=provider)
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
        a.orphans.append(track)


def embedding_end(a: Adapter, event: EmbeddingEndEvent | SparseEmbeddingEndEvent) -> None:
    span_id, chunks = event.span_id, event.chunks
    node = a.nodes.get(span_id) if span_id else None
    pending = node.emb if node is not None else a.orphans
    if not pending:
        return
    track = pending.pop(0)  # batches end in the order they started
    a.finish_embedding(track, chunks, quiet=True)


_Route = Callable[[Adapter, Any], None]
_ROUTE_ORDER: tuple[tuple[tuple[type, ...], _Route], ...] = (
    ((LLMChatInProgressEvent, LLMCompletionInProgressEvent), llm_progress),
    ((LLMChatStartEvent, LLMCompletionStartEvent), llm_start),
    ((LLMChatEndEvent, LLMCompletionEndEvent), llm_end),
    ((ExceptionEvent,), llm_exception),
    ((EmbeddingStartEvent,), embedding_start),
    ((EmbeddingEndEvent, SparseEmbeddingEndEvent), embedding_end),
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


class EventHandler(BaseEventHandler):
    """Instrumentation event handler: embedding calls, LLM calls without the legacy handler and streams' progress,
    matched to their spans by span id. On the root dispatcher only while needed (``Adapter.hold_events``)."""

    costobs_adapter: Any = Field(default=None, exclude=True, repr=False)

    def __init__(self, adapter: Adapter) -> None:
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
        a: Adapter = self.costobs_adapter
        try:
            route(a, event)
        except RunAborted:
            pass  # cannot reach the app from here; the run is aborted (sticky)
        except Exception as exc:
            a.fault(t.__name__, exc)
