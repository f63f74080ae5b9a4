"""The ledger: the live state of every open run tree of one tracker, and the orchestration of its events.

Adapters (``integrations/``) translate framework events into ``Ledger.start`` / ``Ledger.end`` calls (and their
short forms). Everything here runs on the application's thread, so it does no I/O and takes no lock across work:
finished spans are handed to the exporter's queue, and a run's lock (one of a shared pool) covers only the counter
updates of that run, never held while another lock is taken.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any
from uuid import UUID

from .._events import TokenUsage, UsageDetail, usd_to_nanos
from .._exceptions import RunAborted
from .._policy import Budget, BudgetHook, LoopPolicy
from .accounting import _account
from .attribution import (
    _FIRST_CAPS,
    _FIRST_CHECKED,
    _FIRST_DEFER,
    _FIRST_ESTIMATE,
    _FIRST_FREE,
    _FIRST_GUARDED,
    AttributionMixin,
    _Attribution,
    _copy_attribution,
    _first_call,
)
from .guards import GuardsMixin
from .holds import HoldsMixin
from .model import (
    _DEFERRED,
    _RUN_LOCK_MASK,
    _RUN_LOCKS,
    COST_KINDS,
    Exporter,
    PromptOps,
    Run,
    RunCost,
    Span,
    Tokens,
    _find,
    _lock_turn,
    _new_object,
    current_scope,
    logger,
    run_key,
    tokens_of,
)

if TYPE_CHECKING:
    from .._caps import SpendCaps
    from .._pricing import PriceBook, UnitPrices


_RECENT_RUNS = 1024
_RECENT_HARD_CAP = 16 * _RECENT_RUNS  # ended runs kept at most, should the exporter stall


class Ledger(AttributionMixin, GuardsMixin, HoldsMixin):
    """The live state of every open run tree of one tracker."""

    def __init__(
        self,
        *,
        prices: PriceBook,
        exporter: Exporter,
        user_salt: bytes,
        budget: Budget | None = None,
        loops: LoopPolicy | None = None,
        require: Iterable[str] = (),
        on_budget_warning: BudgetHook | None = None,
        caps: SpendCaps | None = None,
    ) -> None:
        self.prices = prices
        self.caps = caps  # spend caps hook: tenant and user caps (None: none configured)
        self.exporter = exporter
        self._salt = user_salt
        self.default_budget = budget if budget is not None and not budget.is_empty() else None
        self.default_loops = loops if loops is not None else LoopPolicy()
        self.require = tuple(require)
        self.on_budget_warning = on_budget_warning
        self.spans: dict[Any, Span] = {}  # by span_key(span id)
        # Spans opened under an id already open, oldest first: LangChain gives every invocation of one config
        # its run_id, so overlapping invocations of a run (threads sharing a config) open roots with one id.
        # Their ends carry only that id: each closes the oldest open one, so no call and no cost is lost.
        self.same_id: dict[Any, deque[Span]] = {}
        self.runs: dict[Any, Run] = {}  # by Run.key
        self.recent: dict[Any, Run] = {}  # ended runs by Run.key, oldest first (see _end_root)
        # Held across dict operations only, never across work: a run moves between "none", ``runs`` and ``recent``
        # under it (so one id never has two Run objects: threads starting roots of one config at once all join
        # one run), and a root joining a run and the run's close cannot cross (see _close_run).
        self._runs_lock = threading.Lock()
        # Taken only when a span opens under an id already open (see _open_span).
        self._ids_lock = threading.Lock()
        self._user_cache: dict[str, str] = {}
        # model -> the most output tokens one of its calls reported in this process (see output_hold)
        self.largest_output: dict[str, int] = {}
        self.internal_errors = 0
        # attribution values -> what a run gets from them (see _attribute); bounded
        self._attr_memo: dict[tuple[Any, ...], _Attribution] = {}
        # (budget, max_seconds, max_tool_calls, max_llm_calls, max_tokens): the last one seen
        self._budget_limits: tuple[Budget | None, float | None, int | None, int | None, int | None] = (
            None, None, None, None, None)
        # (loop policy, max_depth, max_steps, max_identical_model_requests): the last one seen
        self._loops_memo: tuple[LoopPolicy | None, int | None, int | None, int | None] = (None, None, None, None)
        # A model call made on its own (no parent, no ``tracker.run()`` scope, no metadata) starts a run whose policy
        # is the tracker's own: when nothing in it can refuse such a call (no required attribution key, no budget, no
        # loop limit that applies to a first call), an adapter may record the call whole at its end (``record_llm``).
        first = _first_call(self.default_budget, self.default_loops if self.default_loops.enabled else None)
        self.lone_calls = (not self.require and first != _FIRST_CHECKED and not first & _FIRST_ESTIMATE
                           and caps is None)
        self._lone_attr: _Attribution | None = None

    def open_run(
        self,
        run_id: str | UUID | int,
        meta: Mapping[str, Any] | None,
        extra: Mapping[str, Any] | None = None,
        count_root: bool = False,
        key: Any = None,
    ) -> tuple[Run, bool]:
        """The run for a root span ``run_id``: an open one joined, a recent one reopened, or a new one.
        ``count_root``: count the root span being opened in ``Run.open_roots``; ``key``: the run's key in
        ``runs`` if the caller has it (a root span's own key, see ``start``), else ``run_key(run_id)``."""
        if key is None:
            key = run_key(run_id)
        runs = self.runs
        if key in runs:
            with self._runs_lock:
                run = runs.get(key)
                if run is not None:
                    if count_root:
                        with run.lock:
                            run.open_roots += 1
                    return run, True
        # Attribution is work: done on a run no other thread sees yet, outside the lock.
        fresh = Run(run_id, key, time.time(), time.perf_counter())
        if count_root:
            fresh.open_roots = 1
        self._attribute(fresh, meta, extra)
        with self._runs_lock:
            run = runs.get(key)
            if run is not None:  # opened by another thread meanwhile: join it
                if count_root:
                    with run.lock:
                        run.open_roots += 1
                return run, True
            prev = self.recent.pop(key, None)
            if prev is None:
                runs[key] = fresh
                return fresh, False
            # A second invocation of an ended run continues it, attributed as this invocation says.
            with prev.lock:
                _copy_attribution(fresh, prev)
                prev.status = "running"
                if count_root:
                    prev.open_roots += 1
            runs[key] = prev
            return prev, True

    def start(
        self,
        span_id: Any,
        parent_id: Any,
        kind: str,
        name: str,
        meta: Mapping[str, Any] | None = None,
        model: str | None = None,
        provider: str | None = None,
        prompt: Any = None,
        prompt_ops: PromptOps | None = None,
        extra: Any = None,
        max_tokens: int | None = None,
        tool_args: Any = None,
        exported: bool = True,
        root: bool = False,
        run_id: str | UUID | None = None,
    ) -> Span:
        """Open a span; raises ``RunAborted`` if a guard refuses it (nothing has been sent yet). (The options may
        be passed by position, in this order: adapters on the hot path do, keyword arguments cost more.)

        A span whose parent is unknown opens a root run (or joins the ``tracker.run()`` scope around
        it); ``root=True`` forces a new root run named ``run_id`` (default: the span id).
        """
        parent = None
        if not root:
            if parent_id is not None:
                parent = self.spans.get(parent_id.int if type(parent_id) is UUID else parent_id)
            if parent is None:
                parent = current_scope.get()
        # A UUID (LangChain's ids) is keyed by its integer and turned into text only when needed (see run_key).
        # A UUID is kept as its integer (the UUID object, one more for the garbage collector to visit while the
        # span waits for the exporter, is the framework's to free); ``span_id`` makes the text of either.
        sid: str | int
        key: Any
        if type(span_id) is UUID:
            sid = key = span_id.int
        else:
            sid = key = str(span_id)
        if parent is None:
            # A root's own id keys its run as it keys the span: a UUID by its integer, a text as is (a framework's
            # fresh id, not parsed on this path; _find looks up both forms).
            span = None
            if run_id is None and kind == "llm" and key not in self.runs and key not in self.recent:
                span = self._start_new_llm_run(sid, key, name, meta, model, provider, prompt, prompt_ops, extra,
                                               max_tokens, exported)
                if span is not None:
                    return span
            if run_id is None:  # counts this root in run.open_roots
                run = self.open_run(sid, meta, None, True, key)[0]
            else:
                run = self.open_run(run_id, meta, None, True)[0]
        else:
            run = parent.run
        if kind in COST_KINDS:
            span = Span(sid, parent, run, kind, name, model, provider, prompt, prompt_ops, extra, max_tokens)
        else:
            span = Span(sid, parent, run, kind, name)
        if not exported:
            span.exported = False
        try:
            self._guard_start(run, span, kind, name, tool_args)
        except RunAborted:
            if not run.graceful or kind in COST_KINDS:
                if span.is_root:
                    self._end_root(run, span, "aborted", None, refused=True)
                raise
            # A graceful run (CostGuardMiddleware(on_limit="end")): the abort stays recorded and every paid call
            # is still refused, but the graph's own steps go on, so that the agent can end with its message.
        if self.spans.setdefault(key, span) is not span:
            self._open_span(key, span)
        return span

    def _start_new_llm_run(
        self, sid: str | int, key: Any, name: str, meta: Mapping[str, Any] | None, model: str | None,
        provider: str | None, prompt: Any, prompt_ops: PromptOps | None, extra: Any, max_tokens: int | None,
        exported: bool,
    ) -> Span | None:
        """``start`` of a model call that opens a new run (a model invoked directly: the commonest start), when
        its policy lets at most its cost estimate refuse a first call (``_first_call``); ``None`` otherwise, or when
        another thread opened a run under this id meanwhile: the caller then takes the general path.

        The run and its span are made and counted privately, then published under ``_runs_lock`` only if the id is
        still free; the estimate is checked on the published run, as ``_guard_start`` would, so that concurrent
        first calls of one config share one run and one budget."""
        wall, perf = time.time(), time.perf_counter()
        run = Run(sid, key, wall, perf)
        first = self._attribute(run, meta, None)
        if not first:
            return None
        span = Span(sid, None, run, "llm", name, model, provider, prompt, prompt_ops, extra, max_tokens, wall, perf)
        if not exported:
            span.exported = False
        run.open_roots = run.steps = run.llm_calls = 1
        if first & _FIRST_DEFER and prompt is not None and prompt_ops is not None:
            span.request_sig = _DEFERRED
        with self._runs_lock:
            if key in self.runs or key in self.recent or key in self.spans:
                return None
            self.runs[key] = run
            self.spans[key] = span
        if first & _FIRST_GUARDED:
            try:
                if first & _FIRST_ESTIMATE and run.max_cost_nanos is not None:
                    assert run.budget is not None
                    self._check_llm_estimate(run, span, run.budget)
                if first & _FIRST_CAPS and self.caps is not None:  # spend caps hook (after every other guard)
                    self.caps.admit(run, span, self)
            except RunAborted:
                with run.lock:  # a refused call was never made
                    run.steps -= 1
                    run.llm_calls -= 1
                self._release_hold(run, span)
                self._close_span(key, span)
                self._end_root(run, span, "aborted", None, refused=True)
                raise
        return span

    def _open_span(self, key: Any, span: Span) -> None:
        """Open ``span`` under an id another open span holds: it waits in ``same_id`` and becomes the open one when
        the spans before it end (see ``same_id``). The holder may end meanwhile, without the lock: hence the second
        look after queueing (``_next_same_id``), so that no span is left waiting with none open."""
        with self._ids_lock:
            if self.spans.setdefault(key, span) is span:
                return
            waiting = self.same_id.get(key)
            if waiting is None:
                waiting = self.same_id[key] = deque()
            waiting.append(span)
            self._promote(key)

    def _close_span(self, key: Any, span: Span) -> None:
        """Take ``span`` out of the open spans (a call refused after its span was published)."""
        with self._ids_lock:
            if self.spans.get(key) is span:
                del self.spans[key]
                self._promote(key)
                return
            waiting = self.same_id.get(key)
            if waiting is not None and span in waiting:
                waiting.remove(span)
                if not waiting:
                    del self.same_id[key]

    def add_cost(self, span_id: Any, nanos: int) -> bool:
        """A cost reported at run time (a tool's own price): added to that span when it ends."""
        span = self.spans.get(span_id.int if type(span_id) is UUID else span_id)
        if span is None:
            return False
        span.cost_nanos = (span.cost_nanos or 0) + nanos
        return True

    def end(
        self,
        span_id: Any,
        status: str = "ok",
        error: BaseException | None = None,
        usage: TokenUsage | None = None,
        model: str | None = None,
        estimated: bool = False,
        cache_hit: bool = False,
        flags: Iterable[str] | None = None,
        detail: UsageDetail | None = None,
    ) -> Span | None:
        """Close a span, price it, update its run, export it; raises ``RunAborted`` if the run is now
        past a limit (the call's cost is recorded first). (Options may be passed by position, in this order.)"""
        key = span_id.int if type(span_id) is UUID else span_id
        span = self.spans.pop(key, None)
        if span is None:
            return None
        if self.same_id and key in self.same_id:
            self._next_same_id(key)
        span.end_wall = time.time()
        span.latency_ms = (time.perf_counter() - span.start_perf) * 1000.0
        if error is not None:
            span.error = type(error).__name__
            status = "aborted" if isinstance(error, RunAborted) else status
        span.status = status
        if flags:
            for f in flags:
                span.flag(f)
        if detail is not None:
            span.detail = detail
        kind = span.kind
        priced: Any = _DEFERRED  # not looked up yet
        tokens = None if usage is None else tokens_of(usage)
        if (kind == "llm" and tokens is not None and status == "ok" and not cache_hit and span.cost_nanos is None
                and (priced := self.prices.price_nanos(model or span.model, span.provider, tokens, detail))
                is not None):
            return self._end_priced(span, tokens, model, estimated, priced)
        return self._finish(span, status, error, tokens, model, estimated, cache_hit, priced)

    def end_llm(
        self, key: Any, tokens: Tokens, model: str | None, estimated: bool = False, flags: Iterable[str] = (),
        detail: UsageDetail | None = None,
    ) -> Span | None:
        """``end(span_id, "ok", None, TokenUsage(*tokens), model, estimated, False, flags)``, the commonest end (a model
        call that ended with its token counts), by the span's key (``span_key``), with what cannot apply left out."""
        span = self.spans.pop(key, None)
        if span is None:
            return None
        if self.same_id and key in self.same_id:
            self._next_same_id(key)
        span.end_wall = time.time()
        span.latency_ms = (time.perf_counter() - span.start_perf) * 1000.0
        span.status = "ok"
        if flags:
            for f in flags:
                span.flag(f)
        if detail is not None:
            span.detail = detail
        priced: Any = _DEFERRED
        if span.kind == "llm" and span.cost_nanos is None:
            priced = self.prices.price_nanos(model or span.model, span.provider, tokens, detail)
            if priced is not None:
                return self._end_priced(span, tokens, model, estimated, priced)
        return self._finish(span, "ok", None, tokens, model, estimated, False, priced)

    def record_llm(
        self, key: str, name: str, model: str | None, provider: str | None, start_wall: float, start_perf: float,
        tokens: Tokens, served: str | None, estimated: bool = False, flags: tuple[str, ...] = (),
        detail: UsageDetail | None = None,
    ) -> Span:
        """Record a model call made on its own, whole, once it has ended ok with its token counts: its run opens and
        ends here. For a call whose start ``lone_calls`` allowed to skip ``start`` (no parent span, no ``tracker.run()``
        scope around it, no metadata): nothing could have refused it, and nothing can be refused by its end. The
        adapter kept its start times meanwhile; the run is ``start`` + ``end_llm`` of such a call, in one step (a
        model called directly pays for one ledger call instead of two, and nothing in flight to keep).

        ``model``: as requested; ``served``: as reported by the provider (priced, as ``end_llm`` does)."""
        attr = self._lone_attr
        # Run(key, key, start_wall, start_perf) and Span(key, None, run, "llm", name, served or model, provider,
        # start_wall=start_wall, start_perf=start_perf), inline: the fields their __init__ would set, the rest being
        # class defaults
        run = _new_object(Run)
        run._rid = run.key = key
        run.lock = _RUN_LOCKS[next(_lock_turn) & _RUN_LOCK_MASK]
        run.started_wall = start_wall
        run.started_perf = start_perf
        if attr is None:
            self._attribute(run, None, None)
            attr = self._lone_attr = (run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version,
                                      run.attributes, run.budget, run.max_cost_nanos, run.loops, _FIRST_FREE,
                                      run.flags)
        else:
            (run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version, run.attributes, run.budget,
             run.max_cost_nanos, run.loops, _, attr_flags) = attr
            if attr_flags:
                run.flags = attr_flags
        run.steps = run.llm_calls = 1
        if model is not None:
            self._saw_output(model, tokens[1])
        span = _new_object(Span)
        span._sid = key
        span.run = run
        span.kind = "llm"
        span.name = name
        span.start_wall = start_wall
        span.start_perf = start_perf
        m = served or model
        if m is not None:
            span.model = m
        if provider is not None:
            span.provider = provider
        end = span.end_wall = time.time()
        span.latency_ms = (time.perf_counter() - start_perf) * 1000.0
        span.status = "ok"
        if flags:
            span.flags = flags  # distinct, as the adapter makes them; kept as given (often a constant: no object)
        if detail is not None:
            span.detail = detail
        priced = self.prices.price_nanos(m, provider, tokens, detail)
        if priced is None:  # no price: the general end (flagged, listed apart, never a silent $0)
            run.open_roots = 1
            self.runs[key] = run
            return self._finish(span, "ok", None, tokens, None, estimated, False, None)
        cost, span.prices = priced
        span.tokens = tokens
        span.cost_nanos = span.tree_cost = cost
        if estimated:
            span.estimated = True
        _account(run, span, cost, None)  # no lock: no other thread has seen the run
        # _close_run, for a run no other thread has seen
        run.ended_wall = end
        run.status = "ok"
        recent = self.recent
        recent[key] = run
        if len(recent) > _RECENT_HARD_CAP:
            self.trim_recent()
        self.exporter.emit(span)
        return span

    def _end_priced(
        self, span: Span, tokens: Tokens, model: str | None, estimated: bool, priced: tuple[int, UnitPrices]
    ) -> Span:
        """``_finish`` for a model call that ended ok with its usage at a known price and no cost of its own so far
        (the commonest end): what cannot apply is left out."""
        sig = span.request_sig
        requested = span.model  # the model as requested (a deferred signature's), not as reported
        prompt = span.prompt
        if requested is not None:
            self._saw_output(requested, tokens[1])
        if model:
            span.model = model
        cost, span.prices = priced
        span.tokens = tokens
        span.cost_nanos = span.tree_cost = cost
        if estimated:
            span.estimated = True
        if prompt is not None:
            span.prompt = None  # drop the reference to the user's messages now
        if span.extra is not None:
            span.extra = None
        run = span.run
        is_root = span.is_root
        last = False
        with run.lock:
            _account(run, span, cost, sig)
            if is_root:
                run.open_roots -= 1
                last = run.open_roots <= 0
        if sig is _DEFERRED:  # a root call: its request is counted only if its run goes on after it
            span.request_sig = None
            if not last and span.prompt_ops is not None:
                self._count_request(run, span.prompt_ops, requested, prompt)
        if is_root:
            if last:
                self._close_run(run, span.end_wall, "ok")
            if span.exported:
                self.exporter.emit(span)
            elif run.status != "running":
                self.exporter.emit(run)
            return span
        if span.exported:
            self.exporter.emit(span)
        if run.budget is not None and run.aborted is None:
            self._check_after(run, span)
        return span

    def _finish(
        self, span: Span, status: str, error: BaseException | None, tokens: Tokens | None, model: str | None,
        estimated: bool, cache_hit: bool, priced: Any,
    ) -> Span:
        """The rest of ``end``, any span (its end time, status and flags set). ``priced``: the call's
        ``price_nanos`` if looked up already (``None``: no price), else ``_DEFERRED``."""
        run = span.run
        kind = span.kind
        own = span.cost_nanos or 0  # custom-reported cost so far
        pending = None
        if kind == "llm" or kind == "embedding":
            if span.request_sig is _DEFERRED:  # a root call: counted only if its run goes on after it (_end_root)
                span.request_sig = None
                if status == "ok":
                    pending = (span.prompt_ops, span.model, span.prompt)  # the model as requested, not as reported
            if tokens is not None and span.model is not None:
                self._saw_output(span.model, tokens[1])
            if model:
                span.model = model
            if tokens is not None:
                span.tokens = tokens
                if priced is _DEFERRED:
                    priced = self.prices.price_nanos(span.model, span.provider, tokens, span.detail)
                if priced is None:
                    span.unpriced = True
                    span.cost_nanos = own or None
                else:
                    nanos, span.prices = priced
                    if cache_hit:
                        span.cache_hit = True
                        span.saved_nanos = nanos
                        span.cost_nanos = own
                    else:
                        span.cost_nanos = own + nanos
                if estimated:
                    span.estimated = True
            elif not own:
                span.cost_nanos = None
                if status == "ok":
                    span.flag("no_usage")
            if span.prompt is not None:
                span.prompt = None  # drop the reference to the user's messages now
            if span.extra is not None:
                span.extra = None
            track = True
        elif kind == "tool":
            price = self.prices.tool_price_nanos(span.name)
            if price is not None:
                own += price
            span.cost_nanos = own if (own or price is not None) else None
            if span.extra is not None:
                span.extra = None
            track = bool(span.cost_nanos) or span.reserved != 0 or status == "error"
        else:
            # A span that costs nothing, holds nothing and did not fail (a chain's, a retriever's) changes nothing
            # in its run: no lock then.
            track = bool(span.cost_nanos) or span.reserved != 0 or status == "error"
        is_root = span.is_root
        last = False
        if track or is_root:
            cost = span.cost_nanos or 0
            span.tree_cost += cost
            with run.lock:
                if track:
                    _account(run, span, cost, span.request_sig if status == "ok" else None)
                if is_root:
                    run.open_roots -= 1
                    last = run.open_roots <= 0
        if is_root:
            self._end_root(run, span, status, error, last, pending)
            if span.exported:
                self.exporter.emit(span)
            elif run.status != "running":
                self.exporter.emit(run)
            return span
        if span.exported:
            self.exporter.emit(span)
        if run.budget is not None and (kind in COST_KINDS) and run.aborted is None:
            self._check_after(run, span)
        return span

    def _next_same_id(self, key: Any) -> None:
        """The span under ``key`` ended: the oldest one waiting under it (see ``same_id``) becomes the open one."""
        with self._ids_lock:
            self._promote(key)

    def _promote(self, key: Any) -> None:
        """Under ``_ids_lock``: if no span is open under ``key``, the oldest one waiting becomes the open one (a start
        that found the id free, without the lock, may have taken it first: then the waiting ones go on waiting)."""
        waiting = self.same_id.get(key)
        if waiting:
            head = waiting[0]
            if self.spans.setdefault(key, head) is head:
                waiting.popleft()
                if not waiting:
                    del self.same_id[key]

    def _end_root(
        self, run: Run, span: Span, status: str, error: BaseException | None, last: bool | None = None,
        pending: tuple[Any, str | None, Any] | None = None, *, refused: bool = False,
    ) -> None:
        """A root span ended. ``last``: it was the run's last open root (``None``: count it here)."""
        if last is None:
            with run.lock:
                run.open_roots -= 1
                last = run.open_roots <= 0
        if last:
            if refused:
                span.end_wall = time.time()
                self.exporter.emit(run)
            if self._close_run(run, span.end_wall, "error" if status == "error" or error is not None else "ok"):
                return
        if pending is not None:  # the run goes on after this root: its request counts
            self._count_request(run, *pending)

    def _close_run(self, run: Run, ended_wall: float, status: str) -> bool:
        """The run's last root span ended: the run ends ``status`` (``aborted`` if it was), and is kept in
        ``recent`` so that a second invocation with its run_id continues it. ``False`` if a root joined it after
        its last one ended (``open_run``): it goes on then, and that root's end closes it."""
        rid = run.key
        with self._runs_lock:
            if run.open_roots > 0:
                return False
            run.ended_wall = ended_wall
            run.status = status if run.aborted is None else "aborted"
            if self.runs.get(rid) is run:
                del self.runs[rid]
            self.recent[rid] = run
        if run.tool_seq is not None or run.model_reqs is not None or run.loose_holds is not None:
            run.tool_seq = run.model_reqs = run.loose_holds = None  # compact: the guards' state starts afresh
        if len(self.recent) > _RECENT_HARD_CAP:  # the exporter trims after each batch; this is for when it cannot
            self.trim_recent()
        return True

    def trim_recent(self) -> None:
        """Forget the oldest ended runs beyond ``_RECENT_RUNS``. Called by the exporter's thread after each batch
        (in place: the app's threads may be adding runs meanwhile; each step is atomic under the GIL)."""
        recent = self.recent
        excess = len(recent) - _RECENT_RUNS
        if excess > 0:
            for rid in list(islice(recent, excess)):  # one C call
                recent.pop(rid, None)

    @staticmethod
    def _count_request(run: Run, ops: PromptOps, model: str | None, prompt: Any) -> None:
        """Count a successful model request whose signature was deferred (its run goes on after it)."""
        try:
            sig = ops.signature(model, prompt)
        except Exception:  # an odd payload costs the loop guard one count, never the call
            logger.debug("costobs: could not compute a request signature", exc_info=True)
            return
        with run.lock:
            reqs = run.model_reqs
            if reqs is None:
                reqs = run.model_reqs = {}
            reqs[sig] = reqs.get(sig, 0) + 1

    def run_cost(self, run_id: str | UUID) -> RunCost | None:
        run = _find(self.runs, run_id)
        return run.snapshot() if run is not None else None

    def recent_run(self, run_id: str | UUID) -> Run | None:
        """An ended run this process still remembers (its last ``_RECENT_RUNS`` or so)."""
        return _find(self.recent, run_id)

    def open_run_ids(self) -> list[str]:
        return [r.run_id for r in list(self.runs.values())]

    def adopt_policy(
        self, run: Run, *, budget: Budget | None = None, loops: LoopPolicy | None = None, graceful: bool = False
    ) -> None:
        """Policy given by an agent middleware (``CostGuardMiddleware``): its budget and loop policy replace
        the tracker's defaults, never a policy the run was given itself (config metadata, ``tracker.run()``).
        ``graceful``: after an abort, chain starts no longer raise (paid calls still do)."""
        with run.lock:
            if graceful:
                run.graceful = True
            if budget is not None and run.budget is self.default_budget:
                run.budget = None if budget.is_empty() else budget
                run.max_cost_nanos = (
                    usd_to_nanos(budget.max_cost_usd) if run.budget is not None and budget.max_cost_usd is not None
                    else None
                )
            default_loops = self.default_loops if self.default_loops.enabled else None
            if loops is not None and run.loops is default_loops:
                run.loops = loops if loops.enabled else None

