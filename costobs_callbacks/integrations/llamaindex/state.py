"""What the adapter holds while LlamaIndex work is in flight: a ``Node`` for every instrumentation span (the tree, by
parent id) and a ``Track`` for every span we opened in the ledger (a chain, a tool, an LLM or embedding call), with
what its end needs."""

from __future__ import annotations

import time
from typing import Any

from ... import _usage
from ..._exceptions import RunAborted
from ..._ledger import Span

__all__ = ["Node", "Track", "new_node", "new_track", "span_key"]

_UUID_LEN = 36


def span_key(span_id: str) -> str:
    """The ledger key of a LlamaIndex span: the uuid of ``Class.method-<uuid4>`` (ids stay short)."""
    if len(span_id) > _UUID_LEN + 1 and span_id[-_UUID_LEN - 1] == "-":
        return span_id[-_UUID_LEN:]
    return span_id[:64]


class Track:
    """One span we opened in the ledger, with what its end needs.

    Most fields keep their class-level default for the whole call: only what differs is set on the
    instance (a call creates one of these, and a transparent span a ``Node``, on the app's thread)."""

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
    partial: Any = None  # what a stream sent so far
    inner_prompt: Any = None  # (prompt, tools) of the call a CustomLLM made inside this one: what it really sent
    inner_usage: _usage.Parsed | None = None  # and the usage that inner call reported
    ctx_token: Any = None
    stream_usage_requested = False
    holds = False  # a stream being read: it needs its progress events (see Adapter.hold_events)
    # A lone LLM call (see Ledger.lone_calls), or a call in a ``tracker.run()`` scope admitted at its start
    # (``scope``, its request signature ``sig``; see Ledger.admit_scoped_llm): no ledger span until it ends, or until
    # a span opens inside it (``span`` is None meanwhile).
    lone = False
    scope: Span | None = None
    sig: Any = None
    name = ""
    provider: str | None = None
    start_wall = 0.0
    start_perf = 0.0

    # Set by new_track (and, written out, where a call admitted in a scope starts: legacy.llm_start):
    key: str
    parent: Track | None
    node: Node | None
    kind: str
    span: Span | None


class Node:
    """A LlamaIndex instrumentation span in flight (most are transparent: only the anchor matters)."""

    parent: Node | None = None
    track: Track | None = None
    refused: RunAborted | None = None
    refused_raised = False
    emb: list[Track] | None = None  # embedding calls open in this span (rare: made on the first one)
    stream_usage_ok = False  # an OpenAI-compatible LLM's streaming method, stream_options unset
    legacy = False  # an LLM's span whose callback manager has our legacy handler: the call opens at its legacy start
    holds = False  # it needs the instrumentation events while open (see Adapter.hold_events)
    start_wall = 0.0  # a top node's start (0.0: not taken), the start of the chain it may be opened as (see anchor)
    start_perf = 0.0

    # Set by new_node (and, written out, for an LLM call's span: spans.SpanHandler.span_enter):
    id: str
    name: str
    cls: type | None


# Tracks and nodes are made by these functions, not by ``__init__``, as the ledger makes its runs and spans
# (``_ledger.model.new_span``): calling a class costs CPython 3.11 ``type.__call__`` and a fresh frame on top of a
# function call, and every LlamaIndex span makes a node, every call a track, on the app's thread. For the same
# reason the two that every LLM call makes (its span's node, the track of a call admitted in a scope) are written
# out where they are made; a field added here must be added there too.

_new_object = object.__new__


def new_track(key: str, parent: Track | None, kind: str, span: Span | None, node: Node | None) -> Track:
    """A track of the ledger span ``span`` (``None``: not opened yet, see ``Track.lone``) under ``key``."""
    track: Track = _new_object(Track)
    track.key = key
    track.parent = parent
    track.node = node
    track.kind = kind
    track.span = span
    return track


def new_node(id_: str, parent: Node | None, name: str, cls: type | None, timed: bool) -> Node:
    """The node of the span ``id_`` (``name``: ``Class.method``) under ``parent``; a top node's start is taken if
    ``timed`` (the chain it may be opened as starts then, see ``Adapter.anchor``)."""
    node: Node = _new_object(Node)
    node.id = id_
    node.name = name
    node.cls = cls
    if parent is not None:
        node.parent = parent
    elif timed:
        node.start_wall = time.time()
        node.start_perf = time.perf_counter()
    return node
