"""The adapter's state and its calls on the ledger: opening a ledger span for a LlamaIndex step (``Ledger.start_span``)
or for an LLM or embedding call (``Ledger.start_llm``), and ending it, an LLM call costed from the usage its response
reports (read by ``payloads.usage_of``) or else estimated (``_tokens``), a lone call recorded whole at its end
(``Ledger.record_llm``), as is a call admitted at its start in a ``tracker.run()`` scope (``Ledger.admit_scoped_llm``,
``Ledger.record_scoped_llm``). Every rule (pricing, guards, budgets, token accounting) is the ledger's; this module
only says which span is which and what its end carries.

The three ways LlamaIndex reports a call each feed these methods: ``spans`` (the span handler: the tree), ``events``
(the instrumentation event handler) and ``legacy`` (the ``CallbackManager`` handler)."""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.callbacks import CallbackManager
from llama_index_instrumentation import get_dispatcher
from uuid_utils import uuid7

from ... import _usage
from ..._errors import Faults
from ..._events import TokenUsage, UsageDetail
from ..._exceptions import RunAborted
from ..._ledger import Later, Tokens, _again, current_scope
from ..._tokens import ESTIMATED, ESTIMATED_CHARS, count
from .payloads import OPS, Prompt, Tools, chunks_tokens, response_text, served_model, usage_of
from .state import Node, Track, new_track, span_key

if TYPE_CHECKING:
    from ..._ledger import Ledger
    from .events import EventHandler
    from .legacy import CostLlamaIndexHandler
    from .spans import SpanHandler

__all__ = ["Adapter"]

LATER_MAX_CHARS = 8_192
"""A lone call, or one admitted in a ``tracker.run()`` scope, whose provider reports no usage has its prompt and reply
counted after it ends, on the exporter's thread (``Ledger.record_scoped_llm``'s and ``record_llm``'s ``later``), when
they are text of at most this many characters together: longer ones are counted at once, so that what waits in the
queue stays small."""


def estimate_text(prompt: str, text: str, model: str | None) -> tuple[Tokens, bool]:
    """The tokens of a completion that reported no usage, counted from its prompt and its reply (``count``: with the
    model's tokenizer, else 4 characters a token): ``(tokens, exact)``."""
    inp, ok_in = count(prompt, model)
    out, ok_out = count(text, model)
    return (inp, out, 0, 0, 0), ok_in and ok_out


def new_run_id() -> int:
    """The id of a run a LlamaIndex span may open (a UUIDv7, as its integer): in time order, unlike LlamaIndex's own
    span ids (``Class.method-<uuid4>``), so that the store appends each run to its run-id indexes instead of
    dirtying an index page of its own (see the README's "How a batch is written"). The root span keeps its LlamaIndex
    id; only its run is named anew. Made in Rust (``uuid_utils``) without a system call, unlike ``uuid4``."""
    return uuid7().int


class Adapter:
    """Everything one tracker needs to follow LlamaIndex: the spans in flight, the calls open, its handlers."""

    span_handler: SpanHandler
    event_handler: EventHandler
    legacy: CostLlamaIndexHandler

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.instrumented = False
        self.request_stream_usage = False
        self.nodes: dict[str, Node] = {}
        self.llm_tracks: dict[str, Track] = {}  # LLM span id -> its track (outlives the span for streams)
        self.nested: dict[str, Track] = {}  # span id of an LLM call made inside another -> the outer call
        self.nested_events: dict[str, Track] = {}  # legacy event id of such a call -> the outer call
        self.event_holds = 0  # what needs the event handler now (see hold_events)
        self.events: dict[str, Track | None] = {}  # legacy event id -> track (None: a nested call)
        # the stand-alone handler's LLM call open in this context (CustomLLM.chat calls complete)
        self.legacy_llm: ContextVar[Track | None] = ContextVar(f"costobs_li_llm_{id(self)}", default=None)
        self.orphans: list[Track] = []  # embedding calls outside any known span (instrumented mid-call)
        self.lock = threading.RLock()
        self.managers: weakref.WeakSet[CallbackManager] = weakref.WeakSet()
        self.created_settings_manager: CallbackManager | None = None
        self.fault = Faults(ledger, "LlamaIndex")  # our own bug or a payload we could not read: count, log, carry on

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
                self.unhook_events()

    def unhook_events(self) -> None:
        """Off the root dispatcher (a new list: a dispatch iterating the old one in another thread is unharmed)."""
        root = get_dispatcher()
        if self.event_handler in root.event_handlers:
            root.event_handlers = [h for h in root.event_handlers if h is not self.event_handler]

    def hook(self, instance: Any) -> bool:
        """Put the legacy handler on a component's own callback manager (once): a component built before
        ``instrument()`` or before ``Settings.callback_manager`` was set has a manager without it. Returns whether
        the component's manager has it now."""
        try:
            cm = getattr(instance, "callback_manager", None)
        except Exception:
            return False
        if type(cm) is not CallbackManager and not isinstance(cm, CallbackManager):
            return False
        if self.legacy not in cm.handlers:
            cm.add_handler(self.legacy)
            self.managers.add(cm)
        return True

    # -- opening ---------------------------------------------------------------------------------------

    def open(self, key: str, parent: Track | None, kind: str, name: str, node: Node | None, **kw: Any) -> Track:
        """Open a ledger span for a step that is not an LLM call (an embedding call's too)."""
        pk = rid = None
        if parent is not None:
            if parent.span is None:
                self.materialize(parent)
            pk = parent.key
        elif current_scope.get() is None:  # it opens a run (in a tracker.run() scope it joins the scope's)
            rid = new_run_id()
        span = (self.ledger.start_llm(key, pk, name, None, kind=kind, run_id=rid, **kw) if kind == "embedding"
                else self.ledger.start_span(key, pk, kind, name, run_id=rid, **kw))
        track = new_track(key, parent, kind, span, node)
        if parent is not None:
            with self.lock:
                parent.open_children += 1
        return track

    def open_llm(self, key: str, parent: Track | None, name: str, node: Node | None, model: str | None,
                 provider: str | None, prompt: str | Prompt, tools: Tools | None, max_tokens: int | None) -> Track:
        """Open an LLM call before it is sent (a guard's refusal raises ``RunAborted``), its request kept for the end
        estimate."""
        pk = rid = None
        if parent is not None:
            if parent.span is None:
                self.materialize(parent)
            pk = parent.key
        elif current_scope.get() is None:  # it opens a run (in a tracker.run() scope it joins the scope's)
            rid = new_run_id()
        span = self.ledger.start_llm(key, pk, name, None, model, provider, prompt, OPS, tools, max_tokens,
                                     run_id=rid)
        track = new_track(key, parent, "llm", span, node)
        if parent is not None:
            with self.lock:
                parent.open_children += 1
        track.model = model
        track.prompt = prompt
        track.tools = tools
        return track

    def may_be_lone(self, has_parent: bool) -> bool:
        """Whether an LLM call may skip its start: made on its own (no parent span, no ``tracker.run()`` scope) under
        a tracker policy that cannot refuse such a call (``Ledger.lone_calls``)."""
        return not has_parent and self.ledger.lone_calls and current_scope.get() is None

    @staticmethod
    def lone(key: str, node: Node | None, name: str, model: str | None, provider: str | None, prompt: str | Prompt,
             tools: Tools | None, start_wall: float, start_perf: float) -> Track:
        """The track of a lone LLM call (see ``may_be_lone``), or of a call in a ``tracker.run()`` scope that
        ``Ledger.admit_scoped_llm`` admitted (the caller then sets ``scope`` and ``sig``): nothing more in the ledger
        until it ends, its start kept."""
        track = new_track(key, None, "llm", None, node)
        track.lone = True
        track.name = name
        track.provider = provider
        track.model = model
        track.prompt = prompt
        track.tools = tools
        track.start_wall = start_wall
        track.start_perf = start_perf
        return track

    def _open_lone(self, track: Track) -> None:
        """Open a lone (or admitted) call's span after all, with its start times: an end that is not ``record_llm``'s
        (``record_scoped_llm``'s), or a span opened inside the call. Its request is not needed: no budget estimate can
        apply to it (see ``Ledger.lone_calls``, ``Ledger.admit_scoped_llm``)."""
        scope = track.scope
        if scope is not None:
            track.span = self.ledger.open_admitted(scope, track.key, track.name, track.model, track.provider,
                                                   track.start_wall, track.start_perf, track.sig)
        else:
            span = self.ledger.start_llm(track.key, None, track.name, None, track.model, track.provider, root=True,
                                         run_id=new_run_id())
            span.start_wall = span.run.started_wall = track.start_wall
            span.start_perf = span.run.started_perf = track.start_perf
            track.span = span
        track.lone = False

    def materialize(self, track: Track) -> None:
        """A span opens inside a lone (or admitted) LLM call still in flight: open the call's span first, so that the
        new one finds its parent. Under the adapter's lock, against the call's end in another thread (``finish_llm``
        marks the track ended under it, then reads ``lone``): rare (a component that works inside its LLM call), and
        the ledger's part is a few dictionary operations."""
        with self.lock:
            if track.lone and not track.ended:
                self._open_lone(track)

    def anchor(self, node: Node | None, include_self: bool) -> Track | None:
        """The nearest tracked ancestor of ``node``. Outside ``tracker.run()``, an untracked top-level
        span (``VectorStoreIndex`` building, a user's own ``@dispatcher.span``) is opened as a chain when
        the first costed call below it starts, so that its calls form one run."""
        n = node if include_self else (node.parent if node is not None else None)
        top: Node | None = None
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
                track = self.open(span_key(top.id), None, "chain", top.name, top)
            except RunAborted as err:
                top.refused = err
                return None
            assert track.span is not None
            if top.start_wall:
                track.span.start_wall = top.start_wall
                track.span.start_perf = top.start_perf
            top.track = track
            return track

    @staticmethod
    def enclosing_llm(node: Node | None) -> Track | None:
        """The LLM call in flight around ``node``'s span (``CustomLLM.chat`` -> ``complete``: one call, not two)."""
        n = node.parent if node is not None else None
        while n is not None:
            if n.track is not None:
                t = n.track
                return t if t.kind == "llm" and not t.ended else None
            n = n.parent
        return None

    @staticmethod
    def nest(outer: Track, prompt: str | Prompt, tools: Tools | None) -> None:
        """A call made inside ``outer``: its request is what ``outer`` really sent (for the end estimate)."""
        if outer.inner_prompt is None:
            outer.inner_prompt = (prompt, tools)

    def raise_if_stopped(self, node: Node | None) -> None:
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
            t = n.track
            if t is not None:
                # no span: a lone call, which nothing can stop, or an admitted call, stopped with its scope's run
                span = t.span if t.span is not None else t.scope
                if span is not None and span.run.aborted is not None:
                    raise _again(span.run.aborted)
                return
            n = n.parent
        scope = current_scope.get()
        if scope is not None and scope.run.aborted is not None:
            raise _again(scope.run.aborted)

    # -- ending ----------------------------------------------------------------------------------------

    def finish(self, track: Track, **kw: Any) -> None:
        """End a track (once); raises the ledger's ``RunAborted`` after releasing its parents."""
        with self.lock:
            if track.ended:
                return
            track.ended = True
        try:
            self.ledger.end(track.key, **kw)
        finally:
            self.release(track.parent)

    def finish_quietly(self, track: Track, **kw: Any) -> None:
        try:
            self.finish(track, **kw)
        except RunAborted:
            pass
        except Exception as exc:
            self.fault("finish", exc)

    def release(self, parent: Track | None) -> None:
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

    def exit_track(self, track: Track, status: str, error: BaseException | None) -> None:
        """A step's span exited: end it, or, while a stream below it is open, when that ends."""
        with self.lock:
            if track.ended:
                return
            if track.open_children > 0:
                track.exited = True
                track.exit_status = status
                track.exit_error = error
                return
            track.ended = True
        try:
            self.ledger.end(track.key, status=status, error=error)
        finally:
            self.release(track.parent)

    def finish_llm(self, track: Track, response: Any, error: BaseException | None, quiet: bool) -> None:
        """Cost an LLM call from its response (or what streamed before an error) and end it. Raises
        the ledger's ``RunAborted`` (the run is past its budget now) unless ``quiet``. (``quiet`` is not
        keyword-only: the legacy end calls this on every LLM call, and a keyword stops CPython 3.11 from
        specialising the call.)"""
        if track.span_id is not None and self.llm_tracks:
            self.llm_tracks.pop(track.span_id, None)
        if track.event_id is not None:
            self.events.pop(track.event_id, None)
        status = "ok"
        flags: tuple[str, ...] = ()
        usage: Tokens | None
        model: str | None
        detail: UsageDetail | None
        if error is not None:
            if isinstance(error, GeneratorExit):
                flags = ("stream_closed",)  # the app stopped reading; what streamed is billed
            else:
                status = "error"
        later: Later | None
        try:
            usage, model, estimated, detail, flags, later = self._read_end(track, response, status, flags)
        except Exception as exc:  # a payload we could not read: end the span anyway
            self.fault("llm end", exc)
            usage, model, estimated, detail, later = None, None, False, None, None
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
        scope = None
        if track.lone:
            if status != "ok" or (usage is None and later is None):
                self._open_lone(track)
            elif track.scope is None:
                self.ledger.record_llm(track.key, track.name, track.model, track.provider, track.start_wall,
                                       track.start_perf, usage, model, estimated, flags, detail, new_run_id(), later)
                return
            else:  # a call in a scope admitted at its start (see Ledger.admit_scoped_llm): recorded whole
                scope = track.scope
        try:
            if later is not None:  # a call admitted in a scope (see _read_end)
                assert scope is not None
                self.ledger.record_scoped_llm(scope, track.key, track.name, track.model, track.provider,
                                              track.start_wall, track.start_perf, track.sig, None, model, True, flags,
                                              None, later)
            elif status == "ok" and usage is not None:
                if scope is not None:
                    self.ledger.record_scoped_llm(scope, track.key, track.name, track.model, track.provider,
                                                  track.start_wall, track.start_perf, track.sig, usage, model,
                                                  estimated, flags, detail)
                else:
                    self.ledger.end_llm(track.key, usage, model, estimated, flags, detail)
            else:
                u = None if usage is None else TokenUsage(*usage)
                self.ledger.end(track.key, status, error if status == "error" else None, u, model, estimated, False,
                                flags, detail)
        except RunAborted:
            if quiet or isinstance(error, RunAborted):
                return
            raise
        finally:
            if track.parent is not None:
                self.release(track.parent)

    def _read_end(self, track: Track, response: Any, status: str, flags: tuple[str, ...]
                  ) -> tuple[Tokens | None, str | None, bool, UsageDetail | None, tuple[str, ...], Later | None]:
        """What an LLM call's end reports: its tokens (the provider's, else estimated), the model that served it,
        whether the tokens are estimated, the usage detail, the flags, and, instead of the tokens, their estimate
        left for later (``Later``, for ``Ledger.record_llm`` and ``Ledger.record_scoped_llm``): for a lone call or a
        call admitted in a scope that ended ok with no usage, no flag and a text prompt (``LATER_MAX_CHARS``)."""
        resp = response if response is not None else track.partial
        parsed: _usage.Parsed | None = None
        model: str | None = None
        if resp is not None:
            if getattr(resp, "raw", None) is not None:
                model = served_model(resp)
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
        if parsed is not None:
            flags += tuple(f for f in parsed.flags if f not in flags)
            detail = parsed.detail
            usage: Tokens | None = parsed.tokens
            estimated = False
            if parsed.missing:  # a count the provider left out: estimated, never a silent 0
                est, exact = self._estimate(track, model, resp)
                usage = _usage.complete(parsed, est)
                estimated = True
                flags += ("estimated",) if exact else ("estimated", "estimate:chars")
            if detail is not None and detail.service_tier is not None and not self.ledger.prices.has_tier(
                    model or track.model, track.span.provider if track.span is not None else track.provider,
                    detail.service_tier):
                flags += ("tier_unpriced",)
            return usage, model, estimated, detail, flags, None
        if status == "ok" or resp is not None:
            if status == "ok" and track.lone and not flags and not track.stream_usage_requested:
                if track.inner_prompt is not None:
                    prompt, tools = track.inner_prompt
                else:
                    prompt, tools = track.prompt, track.tools
                if tools is None and type(prompt) is str:
                    text = (resp.text or "") if type(resp) is CompletionResponse else response_text(resp)
                    if len(prompt) + len(text) <= LATER_MAX_CHARS:
                        return None, model, True, None, flags, (estimate_text, prompt, text, model or track.model)
            usage, exact = self._estimate(track, model, resp)
            flags += ESTIMATED if exact else ESTIMATED_CHARS
            if track.stream_usage_requested:
                flags += ("no_stream_usage",)
            return usage, model, True, None, flags, None
        return None, model, False, None, flags, None

    @staticmethod
    def _estimate(track: Track, model: str | None, resp: Any) -> tuple[Tokens, bool]:
        m = model or track.model
        if track.inner_prompt is not None:  # what a CustomLLM really sent: its inner call's prompt
            prompt, tools = track.inner_prompt
        else:
            prompt, tools = track.prompt, track.tools
        text = (resp.text or "") if type(resp) is CompletionResponse else response_text(resp)
        if tools is None and type(prompt) is str:
            return estimate_text(prompt, text, m)
        inp, ok_in = OPS.count_tokens(m, prompt, tools)
        out, ok_out = count(text, m)
        return (inp, out, 0, 0, 0), ok_in and ok_out

    def finish_embedding(self, track: Track, chunks: Any, *, quiet: bool) -> None:
        """Cost an embedding call from the chunks it embedded (estimated: embedding APIs report no usage LlamaIndex
        passes on) and end it."""
        if track.event_id is not None:
            self.events.pop(track.event_id, None)
        node = track.node
        if node is not None and node.emb and track in node.emb:
            node.emb.remove(track)
        usage, exact = chunks_tokens(chunks, track.model)
        flags = ["estimated"] if exact else ["estimated", "estimate:chars"]
        try:
            self.finish(track, usage=usage, estimated=True, flags=flags)
        except RunAborted:
            if not quiet:
                raise

