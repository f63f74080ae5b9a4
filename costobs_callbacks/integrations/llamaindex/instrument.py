"""The entry points ``CostTracker`` calls: ``instrument`` (the span handler on the root dispatcher, the legacy
handler on ``Settings.callback_manager``), ``uninstrument`` (both taken off, and off every manager they were put
on) and ``legacy_handler``. One adapter per tracker."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from llama_index.core.callbacks import CallbackManager
from llama_index.core.settings import Settings
from llama_index_instrumentation import get_dispatcher

from .calls import Adapter
from .events import EventHandler
from .legacy import CostLlamaIndexHandler
from .spans import SpanHandler

if TYPE_CHECKING:
    from ..._tracker import CostTracker

__all__ = ["adapter_of", "instrument", "legacy_handler", "uninstrument"]

_ADAPTERS: weakref.WeakKeyDictionary[CostTracker, Adapter] = weakref.WeakKeyDictionary()
_ADAPTERS_LOCK = threading.Lock()


def adapter_of(tracker: CostTracker) -> Adapter:
    """The tracker's adapter (made on first use, with its three handlers)."""
    with _ADAPTERS_LOCK:
        a = _ADAPTERS.get(tracker)
        if a is None:
            a = _ADAPTERS[tracker] = Adapter(tracker.ledger)
            a.span_handler = SpanHandler(a)
            a.event_handler = EventHandler(a)
            a.legacy = CostLlamaIndexHandler(a)
        return a


def instrument(tracker: CostTracker, *, request_stream_usage: bool = False) -> None:
    """Follow every LlamaIndex call of this process for ``tracker`` (idempotent)."""
    a = adapter_of(tracker)
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
        a.unhook_events()
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
    return adapter_of(tracker).legacy
