"""The ledger: the live state of every open run tree of one tracker, and the orchestration of its events.

Adapters (``integrations/``) translate framework events into calls of ``Ledger.start_llm`` (a paid model call) or
``Ledger.start_span`` (any other step) and ``Ledger.end`` (or its short form ``end_llm``; ``record_llm`` for a lone
call, whole; ``admit_scoped_llm`` then ``record_scoped_llm`` for a call in a ``tracker.run()`` scope that only the loop
guard could refuse). Everything here runs on the application's thread, so it does no I/O and takes no lock across work:
finished spans are handed to the exporter's queue, and a run's lock (one of a shared pool) covers only the counter
updates of that run, never held while another lock is taken.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import TYPE_CHECKING, Any
from uuid import UUID

from .._events import TokenUsage, UsageDetail, usd_to_nanos
from .._exceptions import RunAborted
from .._policy import Budget, BudgetHook, LoopPolicy
from .._tokens import ESTIMATED, ESTIMATED_CHARS
from .accounting import _account, _count_request
from .attribution import (
    _FIRST_CAPS,
    _FIRST_CHECKED,
    _FIRST_DEFER,
    _FIRST_ESTIMATE,
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
    COST_KINDS,
    DECLINED,
    Exporter,
    Later,
    PromptOps,
    Run,
    RunCost,
    Span,
    Tokens,
    _find,
    _new_object,
    current_scope,
    logger,
    new_run,
    new_span,
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
        self.recent: dict[Any, Run] = {}  # ended runs by Run.key, oldest first (see _close_run, trim_recent)
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
        # Whether a call's token count may be left for later now (see record_scoped_llm); None: never. The tracker
        # sets its exporter's, which settles every batch before writing it (see settle).
        self.room_for_later: Callable[[], bool] | None = None
        # attribution values -> what a run gets from them (see _attribute); bounded
        self._attr_memo: dict[tuple[Any, ...], _Attribution] = {}
        self._bare_attribution: _Attribution | None = None  # of a run without metadata (see _attribute)
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
        fresh = new_run(run_id, key, time.time(), time.perf_counter())
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

    def start_llm(
        self,
        span_id: Any,
        parent_id: Any,
        name: str,
        meta: Mapping[str, Any] | None,
        model: str | None,
        provider: str | None,
        prompt: Any = None,
        prompt_ops: PromptOps | None = None,
        extra: Any = None,
        max_tokens: int | None = None,
        kind: str = "llm",
        root: bool = False,
        run_id: str | UUID | int | None = None,
    ) -> Span:
        """Open the span of a paid model call (``kind``: ``"llm"``, or ``"embedding"``) before it is sent; raises
        ``RunAborted`` if a guard refuses it (its budget estimate, the loop guard).

        ``span_id`` / ``parent_id``: the framework's ids of the call and of the span around it (a UUID or text);
        ``meta``: the attribution and policy metadata of the run it may open; ``model`` / ``provider`` as
        requested. What a budget estimate or the loop guard may read, only when one needs it: ``prompt``, the
        framework's own prompt object, through ``prompt_ops`` (``PromptOps``), with ``extra``, the request beside
        it (tools, ``max_tokens``); ``max_tokens``, the output limit if the adapter knows it. A span whose parent is
        unknown opens a root run (or joins the ``tracker.run()`` scope around it); ``root=True`` forces a root run.
        ``run_id``: the id of the run a root opens or joins (default: the span id; see ``open_run``). Ignored by a
        span that joins a parent or a scope.

        Parameters are positional-or-keyword, none keyword-only: a keyword-only parameter stops CPython 3.11 from
        specialising the call (about 280 instructions more per call, counted with callgrind), and adapters call this
        on every model request. Adapters pass the request by position; what follows ``max_tokens``, by keyword."""
        if kind == "llm":
            scope = None if root or parent_id is not None else current_scope.get()
            if scope is not None:  # a model call made inside a tracker.run() scope, as an app attributes a request
                span = self._start_scoped_llm(scope, span_id, name, model, provider, prompt, prompt_ops, extra,
                                              max_tokens)
                if span is not None:
                    return span
            elif root or parent_id is None:
                # A model invoked directly, the commonest start: most often the first call of a new run.
                span = self._start_new_llm_run(span_id, name, meta, model, provider, prompt, prompt_ops, extra,
                                               max_tokens, run_id)
                if span is not None:
                    return span
        return self._start(span_id, parent_id, kind, name, meta, root, run_id, None, True, model, provider, prompt,
                           prompt_ops, extra, max_tokens)

    def start_span(
        self,
        span_id: Any,
        parent_id: Any,
        kind: str,
        name: str,
        meta: Mapping[str, Any] | None = None,
        exported: bool = True,
        tool_args: Any = None,
        root: bool = False,
        run_id: str | UUID | int | None = None,
    ) -> Span:
        """Open the span of a step that is not a model call: ``kind`` ``"chain"`` (a chain, a graph node),
        ``"tool"`` (``tool_args``, its arguments, for the loop guard; a tool with a price holds it of a budget),
        ``"retriever"``, or ``"run"`` (``tracker.run()``'s own); raises ``RunAborted`` if a guard refuses it.
        ``exported=False``: kept out of the stored spans (LangSmith's hidden steps) while it still counts in its
        run. The other arguments as for ``start_llm`` (and positional-or-keyword for the same reason)."""
        return self._start(span_id, parent_id, kind, name, meta, root, run_id, tool_args, exported)

    def _start(
        self, span_id: Any, parent_id: Any, kind: str, name: str, meta: Mapping[str, Any] | None, root: bool,
        run_id: str | UUID | int | None, tool_args: Any, exported: bool, model: str | None = None,
        provider: str | None = None, prompt: Any = None, prompt_ops: PromptOps | None = None, extra: Any = None,
        max_tokens: int | None = None,
    ) -> Span:
        """Open a span of any kind, the general path of ``start_llm`` and ``start_span``."""
        parent = None
        if not root:
            if parent_id is not None:
                parent = self.spans.get(parent_id.int if type(parent_id) is UUID else parent_id)
            if parent is None:
                parent = current_scope.get()
        # A UUID (LangChain's ids) is kept as its integer, which keys the span (and a root's run) and is turned into
        # text only when needed (see Span.span_id); the UUID object is the framework's to free.
        key: Any = span_id.int if type(span_id) is UUID else str(span_id)
        if parent is None:
            # A root's own id keys its run as it keys the span: a UUID by its integer, a text as is (a framework's
            # fresh id, not parsed on this path; _find looks up both forms).
            if run_id is None:  # counts this root in run.open_roots
                run = self.open_run(key, meta, None, True, key)[0]
            else:
                run = self.open_run(run_id, meta, None, True)[0]
        else:
            run = parent.run
        if kind in COST_KINDS:
            span = new_span(key, parent, run, kind, name, model, provider, prompt, prompt_ops, extra, max_tokens)
        else:
            span = new_span(key, parent, run, kind, name)
        if not exported:
            span.exported = False
        try:
            self._guard_start(run, span, kind, name, tool_args)
        except RunAborted:
            if not run.graceful or kind in COST_KINDS:
                if span.is_root:
                    self._refuse_root(run, span)
                raise
            # A graceful run (CostGuardMiddleware(on_limit="end")): the abort stays recorded and every paid call
            # is still refused, but the graph's own steps go on, so that the agent can end with its message.
        if self.spans.setdefault(key, span) is not span:
            self._open_span(key, span)
        return span

    def _start_scoped_llm(
        self, scope: Span, span_id: Any, name: str, model: str | None, provider: str | None, prompt: Any,
        prompt_ops: PromptOps | None, extra: Any, max_tokens: int | None,
    ) -> Span | None:
        """``_start`` of a model call with no parent span of its own inside a ``tracker.run()`` scope (a child of
        the scope's span), when ``admit_scoped_llm`` admits it: the span opened. ``None`` otherwise, with nothing
        changed: the caller then takes the general path, which refuses the call or applies its budget.
        tests/test_fast_paths.py holds it to ``_start``."""
        sig = self.admit_scoped_llm(scope, model, prompt, prompt_ops)
        if sig is DECLINED:
            return None
        key: Any = span_id.int if type(span_id) is UUID else str(span_id)  # as _start keys it
        span = new_span(key, scope, scope.run, "llm", name, model, provider, prompt, prompt_ops, extra, max_tokens)
        if sig is not None:
            span.request_sig = sig
        if self.spans.setdefault(key, span) is not span:
            self._open_span(key, span)
        return span

    def admit_scoped_llm(self, scope: Span, model: str | None, prompt: Any, prompt_ops: PromptOps | None) -> Any:
        """The start of a model call with no parent span inside a ``tracker.run()`` scope (``scope``), when nothing
        at its start can refuse it but the loop guard: its run has no budget and no spend caps (whose checks need the
        call's estimate and hold part of a limit while it is in flight) and is not aborted, and the loop guard lets
        it through (within the depth and step limits, a request repeated fewer times than allowed). The call is then
        counted in its run (a step and a model call: what the step limit and a live ``run_cost`` read), and its
        request signature is returned (``None`` when the loop guard needs none), for its end. ``DECLINED``
        otherwise, with nothing changed: the call must open by ``start_llm``, which refuses it or applies its budget.

        Nothing else is needed of such a call while it is in flight, so an adapter may open nothing more now and
        record it whole at its end (``record_scoped_llm``), or open its span when something must find it
        (``open_admitted``): a call made inside it, an end that is not ``record_scoped_llm``'s."""
        run = scope.run
        if run.budget is not None or self.caps is not None or run.aborted is not None:
            return DECLINED
        loops = run.loops
        sig = max_steps = None
        if loops is not None:
            lm = self._loops_memo  # as _guard_start reads it
            if lm[0] is not loops:
                lm = self._loops_memo = (loops, loops.max_depth, loops.max_steps, loops.max_identical_model_requests)
            if lm[1] is not None and scope.depth + 1 > lm[1]:
                return DECLINED
            max_steps, max_reqs = lm[2], lm[3]
            if max_reqs is not None and prompt is not None and prompt_ops is not None:
                sig = prompt_ops.signature(model, prompt)
                reqs = run.model_reqs
                if reqs is not None and reqs.get(sig, 0) + 1 >= max_reqs:
                    return DECLINED
        with run.lock:
            steps = run.steps + 1
            if max_steps is not None and steps > max_steps:
                return DECLINED
            run.steps = steps
            run.llm_calls += 1
        return sig

    def open_admitted(
        self, scope: Span, key: Any, name: str, model: str | None, provider: str | None, start_wall: float,
        start_perf: float, sig: Any,
    ) -> Span:
        """Open the span of a call ``admit_scoped_llm`` admitted (``sig``: what it returned), started at
        ``start_wall`` / ``start_perf``, under ``key`` (a ``span_key``): the span ``_start_scoped_llm`` would have
        opened at its start, but for its request, which nothing reads when its run has no budget. Then any end."""
        span = new_span(key, scope, scope.run, "llm", name, model, provider, None, None, None, None, start_wall,
                        start_perf)
        if sig is not None:
            span.request_sig = sig
        if self.spans.setdefault(key, span) is not span:
            self._open_span(key, span)
        return span

    def record_scoped_llm(
        self, scope: Span, key: Any, name: str, model: str | None, provider: str | None, start_wall: float,
        start_perf: float, sig: Any, tokens: Tokens | None, served: str | None, estimated: bool = False,
        flags: tuple[str, ...] = (), detail: UsageDetail | None = None, later: Later | None = None,
    ) -> Span:
        """Record a call ``admit_scoped_llm`` admitted (``sig``: what it returned), whole, once it has ended ok with
        its token counts: ``open_admitted`` + ``end_llm`` in one step, leaving out the open spans' table, which nothing
        read meanwhile. Raises ``RunAborted`` as ``end_llm`` does (a budget the run was given meanwhile).
        tests/test_fast_paths.py holds it to ``start_llm`` + ``end_llm``.

        ``later`` instead of ``tokens``: the call reported no usage, and ``later`` estimates it (see ``Later``). When
        the exporter has room (``room_for_later``) and the run no budget, the estimate is left to ``settle``: on the
        exporter's thread before the span is written, or first on the thread of whatever reads the run's totals
        (``run_cost``, a guard, a budget adopted); the span is in its run's ``pending`` until then. Else it is
        counted now. Either way the span, the run's totals and its flags (``estimated``, and ``estimate:chars``
        without a tokenizer) come out the same (tests/test_fast_paths.py).

        What ``new_span``, ``_set_cost`` and ``_end_child`` do for such a span (a model call in ``scope``, no request
        kept, not yet costed) is written out here rather than called: this runs on the app's thread once per call in a
        scope, and each call of a Python function costs more than the few assignments it would save writing. The run's
        totals are ``_account``'s, as on every end path.

        ``model``: as requested; ``served``: as reported by the provider (priced, as ``end_llm`` does)."""
        run = scope.run
        # new_span(key, scope, run, "llm", name, model, provider, start_wall=start_wall, start_perf=start_perf)
        span: Span = _new_object(Span)
        span._sid = key
        span.run = run
        span.kind = "llm"
        span.name = name
        span.start_wall = start_wall
        span.start_perf = start_perf
        span.parent = scope
        span.is_root = False
        span.depth = scope.depth + 1
        span.cost_nanos = None
        span.request_sig = sig
        span.reserved = 0
        span.cache_hit = span.unpriced = span.estimated = False
        span.exported = True
        if model is not None:
            span.model = model
        if provider is not None:
            span.provider = provider
        span.end_wall = time.time()
        span.latency_ms = (time.perf_counter() - start_perf) * 1000.0
        span.status = "ok"
        if later is not None:
            if not flags and detail is None and self._leave_for_later(run, span, served, later, sig):
                self.exporter.emit(span)
                return span
            counted = self._count_now(span, later, flags)
            if counted is None:
                return self._finish(span, "ok", None, None, served, False, False, None)
            tokens, flags = counted
            estimated = True
        assert tokens is not None
        if flags:
            span.flags = flags  # distinct, as the adapter makes them; kept as given (see record_llm)
        if detail is not None:
            span.detail = detail
        priced = self.prices.price_nanos(served or model, provider, tokens, detail)
        if priced is None:  # no price: the general end (flagged, listed apart, never a silent $0)
            return self._finish(span, "ok", None, tokens, served, estimated, False, None)
        # _set_cost (the span holds no request)
        out = tokens[1]
        if model is not None and out > self.largest_output.get(model, 0):
            self._saw_output(model, out)
        if served:
            span.model = served
        cost, span.prices = priced
        span.tokens = tokens
        span.cost_nanos = span.tree_cost = cost
        if estimated:
            span.estimated = True
        with run.lock:
            _account(run, span, cost, sig)
        # _end_child
        self.exporter.emit(span)
        if run.budget is not None and run.aborted is None:
            self._check_after(run, span)
        return span

    def _start_new_llm_run(
        self, span_id: Any, name: str, meta: Mapping[str, Any] | None, model: str | None, provider: str | None,
        prompt: Any, prompt_ops: PromptOps | None, extra: Any, max_tokens: int | None, run_id: Any = None,
    ) -> Span | None:
        """``_start`` of a root model call (no parent, no scope) that opens a new run, when its policy lets at most its
        cost estimate refuse a first call (``_first_call``); ``None`` otherwise, or when a run is open or remembered
        under its id, or another thread opened one meanwhile: the caller then takes the general path.

        The run and its span are made and counted privately, then published under ``_runs_lock`` only if the id is
        still free; the estimate is checked on the published run, as ``_guard_start`` would, so that concurrent
        first calls of one config share one run and one budget."""
        key: Any = span_id.int if type(span_id) is UUID else str(span_id)  # as _start keys it
        if run_id is None:
            rid = rkey = key
        else:
            rid, rkey = run_id, run_key(run_id)  # as open_run keys it
        if rkey in self.runs or rkey in self.recent:
            return None
        wall, perf = time.time(), time.perf_counter()
        run = new_run(rid, rkey, wall, perf)
        first = self._attribute(run, meta, None)
        if not first:
            return None
        span = new_span(key, None, run, "llm", name, model, provider, prompt, prompt_ops, extra, max_tokens, wall,
                        perf)
        run.open_roots = run.steps = run.llm_calls = 1
        if first & _FIRST_DEFER and prompt is not None and prompt_ops is not None:
            span.request_sig = _DEFERRED
        with self._runs_lock:
            if rkey in self.runs or rkey in self.recent or key in self.spans:
                return None
            self.runs[rkey] = run
            self.spans[key] = span
        if first & _FIRST_GUARDED:
            try:
                if first & _FIRST_ESTIMATE and run.max_cost_nanos is not None:
                    assert run.budget is not None
                    self._check_llm_estimate(run, span, run.budget)
                if first & _FIRST_CAPS and self.caps is not None:  # spend caps hook (after every other guard)
                    self.caps.admit(run, span, self)
            except RunAborted:
                self._withdraw(run, span)
                self._close_span(key, span)
                self._refuse_root(run, span)
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
        past a limit (the call's cost is recorded first). (Options may be passed by position, in this order.)

        ``usage``: a model call's token counts (``model``: the model that served it, as reported); ``estimated``:
        counted by us; ``cache_hit``: a reply from an LLM cache (nothing spent); ``flags``: what the adapter found
        (``malformed_usage``...); ``detail``: what the provider reported beside the counts that changes the price.
        ``end_llm`` is the short form of a model call that ended ok with its counts."""
        span = self._take(span_id.int if type(span_id) is UUID else span_id, flags, detail)
        if span is None:
            return None
        if error is not None:
            span.error = type(error).__name__
            status = "aborted" if isinstance(error, RunAborted) else status
        span.status = status
        return self._finish(span, status, error, None if usage is None else tokens_of(usage), model, estimated,
                            cache_hit, _DEFERRED)

    def end_llm(
        self, key: Any, tokens: Tokens, model: str | None, estimated: bool = False, flags: Iterable[str] | None = (),
        detail: UsageDetail | None = None,
    ) -> Span | None:
        """``end(span_id, "ok", None, TokenUsage(*tokens), model, estimated, False, flags, detail)``, the commonest
        end (a model call that ended with its token counts), by the span's key (``span_key``).

        A model call with its usage at a known price and no cost of its own is ended here, with what cannot apply
        left out; any other span by ``_finish``, the general path. Both call the same helpers for every rule they
        share (``_take``, ``_account``, ``_end_root``, ``_end_child``); tests/test_fast_paths.py feeds both the same
        calls and compares what they export."""
        span = self._take(key, flags, detail)
        if span is None:
            return None
        span.status = "ok"
        if span.kind != "llm" or span.cost_nanos is not None:
            return self._finish(span, "ok", None, tokens, model, estimated, False, _DEFERRED)
        requested = span.model  # the model as requested (a deferred signature's), not as reported
        priced = self.prices.price_nanos(model or requested, span.provider, tokens, detail)
        if priced is None:  # no price: flagged and listed apart, never a silent $0
            return self._finish(span, "ok", None, tokens, model, estimated, False, None)
        prompt = span.prompt
        cost = self._set_cost(span, tokens, model, estimated, priced)
        run = span.run
        sig = span.request_sig
        with run.lock:
            last = _account(run, span, cost, sig)
        if not span.is_root:
            self._end_child(run, span)
        elif sig is _DEFERRED:  # a root call: its request counts only if its run goes on after it
            span.request_sig = None
            self._end_root(run, span, "ok", last, (span.prompt_ops, requested, prompt))
        else:
            self._end_root(run, span, "ok", last, None)
        return span

    def record_llm(
        self, key: str, name: str, model: str | None, provider: str | None, start_wall: float, start_perf: float,
        tokens: Tokens | None, served: str | None, estimated: bool = False, flags: tuple[str, ...] = (),
        detail: UsageDetail | None = None, run_id: Any = None, later: Later | None = None,
    ) -> Span:
        """Record a model call made on its own, whole, once it has ended ok with its token counts: its run (named
        ``run_id``, default the call's ``key``, as ``start_llm`` names it) opens and ends here. For a call whose
        start ``lone_calls`` allowed to skip ``start_llm`` (no parent span, no ``tracker.run()`` scope around it, no
        metadata): nothing could have refused it, and nothing can be refused by its end. The adapter kept its start
        times meanwhile.

        It is ``start_llm`` + ``end_llm`` of such a call in one step (a lone LlamaIndex call pays for one ledger call
        instead of two), made with their helpers (``new_run``, ``_attribute``, ``new_span``, ``_set_cost``,
        ``_account``), leaving out what a run no other thread has seen does not need: publishing it, locks.
        tests/test_fast_paths.py holds it to ``start_llm`` + ``end_llm``.

        ``model``: as requested; ``served``: as reported by the provider (priced, as ``end_llm`` does). ``later``
        instead of ``tokens``: as for ``record_scoped_llm`` (the run ends here all the same, and its totals and its
        span's cost are settled before the span is written)."""
        run = new_run(key, key, start_wall, start_perf) if run_id is None else new_run(
            run_id, run_key(run_id), start_wall, start_perf)
        self._attribute(run, None, None)
        run.open_roots = run.steps = run.llm_calls = 1
        span = new_span(key, None, run, "llm", name, model, provider, None, None, None, None, start_wall, start_perf)
        end = span.end_wall = time.time()
        span.latency_ms = (time.perf_counter() - start_perf) * 1000.0
        span.status = "ok"
        left = later is not None and not flags and detail is None and self._leave_for_later(run, span, served, later,
                                                                                             None)
        if not left:  # (a call left for later: its run ends below all the same, settled before it is written)
            if later is not None:
                counted = self._count_now(span, later, flags)
                if counted is None:
                    return self._finish(span, "ok", None, None, served, False, False, None)
                tokens, flags = counted
                estimated = True
            assert tokens is not None
            if flags:
                span.flags = flags  # distinct, as the adapter makes them; kept as given (often a constant: no object)
            if detail is not None:
                span.detail = detail
            priced = self.prices.price_nanos(served or model, provider, tokens, detail)
            if priced is None:  # no price: the general end (flagged, listed apart, never a silent $0)
                return self._finish(span, "ok", None, tokens, served, estimated, False, None)
            cost = self._set_cost(span, tokens, served, estimated, priced)
            _account(run, span, cost, None)  # no lock: no other thread has seen the run
        # The run ends with its only call (_close_run, for a run that was never published).
        run.ended_wall = end
        run.status = "ok"
        recent = self.recent
        recent[run.key] = run
        if len(recent) > _RECENT_HARD_CAP:
            self.trim_recent()
        self.exporter.emit(span)
        return span

    def _take(self, key: Any, flags: Iterable[str] | None, detail: UsageDetail | None) -> Span | None:
        """The open span under ``key`` as it ends (``None`` if there is none): out of the open spans (the oldest one
        waiting under its id becomes the open one, see ``same_id``), its end time set, with the flags and the usage
        detail its end reports."""
        span = self.spans.pop(key, None)
        if span is None:
            return None
        if self.same_id and key in self.same_id:
            self._next_same_id(key)
        span.end_wall = time.time()
        span.latency_ms = (time.perf_counter() - span.start_perf) * 1000.0
        if flags:
            if span.flags is None and type(flags) is tuple and len(flags) == 1:
                span.flags = flags  # kept as given, as record_llm keeps them (often a constant: no object)
            else:
                for f in flags:
                    span.flag(f)
        if detail is not None:
            span.detail = detail
        return span

    def _set_cost(
        self, span: Span, tokens: Tokens, model: str | None, estimated: bool, priced: tuple[int, UnitPrices]
    ) -> int:
        """A model call that ended ok with ``tokens`` at a known price (``priced``, as ``price_nanos`` gives it) and no
        cost of its own: its cost, prices and tokens set, its model as reported (``model``) in place of the one
        requested (whose largest output is noted, see ``output_hold``), its request dropped. Returns its cost."""
        requested = span.model
        if requested is not None and tokens[1] > self.largest_output.get(requested, 0):
            self._saw_output(requested, tokens[1])
        if model:
            span.model = model
        cost, span.prices = priced
        span.tokens = tokens
        span.cost_nanos = span.tree_cost = cost
        if estimated:
            span.estimated = True
        if span.prompt is not None:
            span.prompt = None  # drop the reference to the user's messages now
        if span.extra is not None:
            span.extra = None
        return cost

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
        if not span.is_root:
            if track:
                cost = span.cost_nanos or 0
                span.tree_cost += cost
                with run.lock:
                    _account(run, span, cost, span.request_sig if status == "ok" else None)
            self._end_child(run, span)
            return span
        cost = span.cost_nanos or 0
        span.tree_cost += cost
        with run.lock:
            last = _account(run, span, cost, span.request_sig if status == "ok" else None)
        self._end_root(run, span, "error" if status == "error" or error is not None else "ok", last, pending)
        return span

    def _end_child(self, run: Run, span: Span) -> None:
        """A span inside a run ended, its cost in its run: it goes to the exporter, and a paid call meets the check
        after a call (``_check_after``: the run is stopped once it is past a limit)."""
        if span.exported:
            self.exporter.emit(span)
        if run.budget is not None and run.aborted is None and span.kind in COST_KINDS:
            self._check_after(run, span)

    def _end_root(self, run: Run, span: Span, status: str, last: bool, pending: tuple[Any, str | None, Any] | None,
                  ) -> None:
        """A root span ended, its cost in its run (``last``: it was the run's last open root). The run ends with it
        (``status``: ``ok`` or ``error``), or goes on (other roots are open, or one joined meanwhile), and then the
        root's deferred request (``pending``: its prompt operations, model and prompt) counts for the loop guard. The
        span goes to the exporter after the run's end (the store reads the run's status from it); a hidden root's
        ended run goes in its place."""
        if not (last and self._close_run(run, span.end_wall, status)) and pending is not None:
            self._count_request(run, *pending)
        if span.exported:
            self.exporter.emit(span)
        elif run.status != "running":
            self.exporter.emit(run)

    def _refuse_root(self, run: Run, span: Span) -> None:
        """A root span refused at its start (its call never made; see ``_withdraw``): out of its run's open roots. A
        run it was the last open root of ends now (aborted), stored without it."""
        with run.lock:
            run.open_roots -= 1
            last = run.open_roots <= 0
        if last:
            span.end_wall = time.time()
            self.exporter.emit(run)
            self._close_run(run, span.end_wall, "ok")

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
            _count_request(run, sig)

    def run_cost(self, run_id: str | UUID) -> RunCost | None:
        run = _find(self.runs, run_id)
        if run is None:
            return None
        if run.pending:
            self.settle_run(run)
        return run.snapshot()

    def recent_run(self, run_id: str | UUID) -> Run | None:
        """An ended run this process still remembers (its last ``_RECENT_RUNS`` or so), its calls settled."""
        run = _find(self.recent, run_id)
        if run is not None and run.pending:
            self.settle_run(run)
        return run

    # -- calls recorded before their tokens were counted (record_scoped_llm's ``later``) ----------------

    def settle(self, items: Iterable[Any]) -> None:
        """Settle the calls among ``items`` recorded before their tokens were counted: the exporter calls this on
        its thread with each batch before writing it (or spooling it), so that every span is written counted and
        priced, and a run's root span, which follows its calls in the queue, is written with their cost."""
        for it in items:
            if type(it) is Span and it.pending is not None:
                self._settle(it)

    def settle_run(self, run: Run) -> None:
        """Settle every call of ``run`` still waiting for its count (before its totals are read)."""
        pend = run.pending
        if pend:
            for span in list(pend):  # one C call: another thread may be settling some meanwhile
                self._settle(span)

    def _leave_for_later(self, run: Run, span: Span, served: str | None, later: Later, sig: Any) -> bool:
        """Leave a call's count to ``settle`` (see ``record_scoped_llm``) if the exporter has room and the run no
        budget: the call is in its run's ``pending`` then, its request (``sig``) counted for the loop guard now.
        Returns whether it was."""
        room = self.room_for_later
        if room is None or run.budget is not None or not room():
            return False
        span.estimated = True
        span.pending = (served, later)
        with run.lock:
            pend = run.pending
            if pend is None:
                pend = run.pending = {}
            pend[span] = None
            if sig is not None:
                _count_request(run, sig)
        return True

    def _count_now(self, span: Span, later: Later, flags: tuple[str, ...]) -> tuple[Tokens, tuple[str, ...]] | None:
        """A call's estimate made at its end (not left for later): its tokens and ``flags`` with the estimate's
        added; ``None`` if it failed, the span flagged ``internal_error`` (the caller ends it with no usage)."""
        est = self._estimate_now(later)
        if est is None:
            span.flags = ("internal_error",)
            return None
        return est[0], flags + (ESTIMATED if est[1] else ESTIMATED_CHARS)

    def _estimate_now(self, later: Later) -> tuple[Tokens, bool] | None:
        """A call's estimate (``Later``) made now: ``(tokens, exact)``, ``None`` if it failed (counted, logged)."""
        try:
            est: tuple[Tokens, bool] = later[0](*later[1:])
        except Exception:
            self._estimate_failed()
            return None
        return est

    def _estimate_failed(self) -> None:
        """A call's token estimate raised (our bug, or a text no tokenizer takes): counted in ``internal_errors``,
        logged; the call is recorded as an end whose payload could not be read (``internal_error``, ``no_usage``)."""
        self.internal_errors += 1
        logger.warning("costobs: a call's token estimate failed (%d internal errors so far)", self.internal_errors,
                       exc_info=True)

    def _settle(self, span: Span) -> None:
        """Count, price and account one call ``record_scoped_llm`` or ``record_llm`` left for later, as they would have
        done then. The
        count runs on this thread, outside every lock; two threads may both count one call, but only the first to
        take its run's lock accounts it, and sets its fields before it stops being pending (so that a thread that
        finds it settled reads it whole)."""
        p = span.pending
        if p is None:
            return
        served, later = p
        requested = span.model
        tokens: Tokens | None = None
        exact = False
        priced = None
        est = self._estimate_now(later)  # (an estimate that cannot be made: as an end whose payload could not be read)
        if est is not None:
            tokens, exact = est
            priced = self.prices.price_nanos(served or requested, span.provider, tokens, span.detail)
        if tokens is not None and requested is not None and tokens[1] > self.largest_output.get(requested, 0):
            self._saw_output(requested, tokens[1])
        run = span.run
        with run.lock:
            if span.pending is None:
                return
            if served:
                span.model = served
            cost = 0
            if tokens is None:
                span.estimated = False
                span.flags = ("internal_error", "no_usage")
            else:
                span.tokens = tokens
                span.flags = ESTIMATED if exact else ESTIMATED_CHARS
                if priced is None:
                    span.unpriced = True
                else:
                    cost, span.prices = priced
                    span.cost_nanos = span.tree_cost = cost
            _account(run, span, cost, None)  # its request was counted when it was recorded
            pend = run.pending
            if pend is not None:
                pend.pop(span, None)
            span.pending = None

    def open_run_ids(self) -> list[str]:
        return [r.run_id for r in list(self.runs.values())]

    def adopt_policy(
        self, run: Run, *, budget: Budget | None = None, loops: LoopPolicy | None = None, graceful: bool = False
    ) -> None:
        """Policy given by an agent middleware (``CostGuardMiddleware``): its budget and loop policy replace
        the tracker's defaults, never a policy the run was given itself (config metadata, ``tracker.run()``).
        ``graceful``: after an abort, chain starts no longer raise (paid calls still do)."""
        if run.pending:  # a budget reads the run's totals from now on
            self.settle_run(run)
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

