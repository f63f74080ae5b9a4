"""Open run trees: attribution, live totals, guards. Framework-free.

Adapters (``integrations/``) translate framework events into ``Ledger.start`` / ``Ledger.end`` calls.
Everything here runs on the application's thread, so it does no I/O and takes no lock across work:
finished spans are handed to the exporter's queue, and a run's lock (one of a shared pool) covers only
the counter updates of that run, never held while another lock is taken.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import count, islice
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from ._events import TokenUsage, UsageDetail, nanos_to_usd, usd_to_nanos
from ._exceptions import BudgetExceededError, LoopDetectedError, MissingAttributionError, RunAborted
from ._policy import Budget, BudgetHook, BudgetWarning, LoopPolicy, coerce_budget, coerce_loops

if TYPE_CHECKING:
    from ._pricing import PriceBook, UnitPrices

__all__ = [
    "ATTRIBUTION_KEYS", "UNATTRIBUTED", "Ledger", "Run", "RunCost", "Span", "Tokens", "run_key", "run_text", "span_key",
    "tokens_of",
]

logger = logging.getLogger("costobs_callbacks")

UNATTRIBUTED = "unattributed"
ATTRIBUTION_KEYS = ("feature", "route", "user_id", "tenant_id", "prompt_version")
BUDGET_META_KEY = "costobs_budget"
LOOPS_META_KEY = "costobs_loops"
_INTERNAL_PREFIXES = ("ls_", "lc_", "langgraph_", "langsmith", "costobs_", "checkpoint_", "__")
_MAX_ATTR_LEN = 256
_MAX_ATTRS = 32
_RECENT_RUNS = 1024
_RECENT_HARD_CAP = 16 * _RECENT_RUNS  # ended runs kept at most, should the exporter stall
_MAX_MODELS_SEEN = 1024
DEFAULT_OUTPUT_HOLD = 4096
"""Output tokens a budget holds for a call without ``max_tokens`` of a model with no known outputs and no known
context window (see ``Ledger.output_hold``)."""

COST_KINDS = frozenset({"llm", "embedding", "tool"})
Tokens = tuple[int, int, int, int, int]
"""A call's token counts in ``TokenUsage``'s order: input, output, cache read, cache write, reasoning."""


def tokens_of(usage: TokenUsage) -> Tokens:
    """A ``TokenUsage`` as ``Tokens``."""
    return (usage.input, usage.output, usage.cache_read, usage.cache_write, usage.reasoning)


class PromptOps(Protocol):
    """What the ledger needs from a framework's prompt object (never stored, never exported)."""

    def signature(self, model: str | None, prompt: Any) -> int: ...

    def count_tokens(self, model: str | None, prompt: Any, extra: Any) -> tuple[int, bool]: ...


def max_output_tokens(span: Span) -> int:
    """The most output tokens the call may use as far as it says (0: no limit known): ``Span.max_tokens``, else
    what its prompt operations read from its request (``extra``) if they can (``max_tokens(extra)``), read only
    when a budget needs it."""
    if span.max_tokens is not None:
        return span.max_tokens
    read = getattr(span.prompt_ops, "max_tokens", None)
    if read is None or span.extra is None:
        return 0
    n = read(span.extra)
    return n if type(n) is int and n > 0 else 0


class Exporter(Protocol):
    def emit(self, item: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class RunCost:
    """What a run cost, live while it runs and from storage after."""

    run_id: str
    cost_usd: Decimal
    """Priced calls only; ``unpriced_calls`` says how many calls have no price."""
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    llm_calls: int
    tool_calls: int
    unpriced_calls: int
    by_model: dict[str, Decimal]
    status: str
    """``running``, ``ok``, ``error`` or ``aborted``."""
    attributes: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    """Why an aborted run was stopped."""
    estimated_calls: int = 0
    """Calls whose tokens were counted by us because the provider reported none."""
    unpriced_models: tuple[str, ...] = ()
    """Models called in this run that have no price: their calls are in ``unpriced_calls``, not in
    ``by_model`` or ``cost_usd`` (an unknown price is never shown as $0)."""


_RUN_LOCK_MASK = 63
_RUN_LOCKS = tuple(threading.Lock() for _ in range(_RUN_LOCK_MASK + 1))
"""The locks runs take turns to use (``Run.lock``): a run's lock covers only a few counter updates of that run
and is never held while another run's is taken, so runs can share locks; sharing spares every run a lock of
its own (made on the app's thread, freed cold much later)."""
_lock_turn = count()
_new_object = object.__new__


def run_key(run_id: Any) -> Any:
    """The key of a run named from outside (a ``run_id`` in config or ``tracker.run()``): a ``UUID`` (or its
    text, any case) as its 128-bit integer, whose hash is computed in C (a ``UUID``'s in Python), any other id as
    text. A root span's own id keys its run as ``Ledger.spans`` keys the span (see ``Ledger.start``)."""
    if type(run_id) is UUID:
        return run_id.int
    if type(run_id) is int:
        return run_id
    text = str(run_id)
    if len(text) == 36 and text[8] == "-":
        try:
            return UUID(text).int
        except ValueError:
            pass
    return text


def _find(runs: Mapping[Any, Run], run_id: Any) -> Run | None:
    """A run by its id in any form: a UUID-shaped id is looked up by its integer (a run named by a UUID, or by
    its text through ``run_key``), then as text (a framework's own id for a root span, keyed as it came)."""
    key = run_key(run_id)
    run = runs.get(key)
    if run is None and type(key) is int:
        run = runs.get(str(UUID(int=key)))
    return run


def run_text(run_id: Any) -> str:
    """A run id as stored: a ``UUID`` or its text (any case) in the canonical form, any other id as text."""
    key = run_key(run_id)
    return str(UUID(int=key)) if type(key) is int else str(key)


def span_key(span_id: Any) -> Any:
    """The key of a span in ``Ledger.spans``: a ``UUID`` as its integer (see ``run_key``), any other id as is."""
    return span_id.int if type(span_id) is UUID else span_id


class Run:
    """A root run: attribution, policy and live totals of its whole tree.

    The defaults below are class attributes: a run stores only what differs from them (most runs are one call
    with no policy hit), so opening one costs a few assignments instead of forty.
    """

    feature: str = UNATTRIBUTED
    route: str | None = None
    tenant_id: str | None = None
    user_hash: str | None = None
    prompt_version: str | None = None
    attributes: Mapping[str, Any] = MappingProxyType({})
    """Shared between runs with the same metadata: never mutated, replaced."""
    budget: Budget | None = None
    loops: LoopPolicy | None = None
    max_cost_nanos: int | None = None
    ended_wall = 0.0
    cost_nanos = 0
    input = 0
    output = 0
    cache_read = 0
    cache_write = 0
    reasoning = 0
    llm_calls = 0
    tool_calls = 0
    unpriced_calls = 0
    estimated_calls = 0
    steps = 0
    unpriced_models: tuple[str, ...] = ()
    """Replaced (under the lock), never appended to: a snapshot may be reading the old one."""
    flags: tuple[str, ...] = ()
    """What its attribution earned: ``truncated`` (a value cut to 256 characters), ``sanitized`` (characters no
    database takes replaced); every span of the run is stored with them."""
    by_model: dict[str, int] | None = None
    """nano-USD by model, of priced calls (made with the run's first priced call)."""
    status = "running"
    aborted: RunAborted | None = None
    open_roots = 0
    warned: set[str] | None = None
    last_tool_sig: Any = None
    tool_repeat = 0
    tool_seq: deque[Any] | None = None
    model_reqs: dict[int, int] | None = None
    # CostGuardMiddleware(on_limit="end") sets it: after an abort, chain starts no longer raise (paid
    # calls still do), so that the agent can end with its final message.
    graceful = False
    reserved_nanos = 0
    """Pre-call estimates of the calls in flight (sum of their ``Span.reserved``)."""
    loose_holds: set[Span] | None = None
    """Calls in flight holding an upper bound of their estimate."""

    def __init__(self, run_id: str | UUID | int, key: Any, started_wall: float, started_perf: float) -> None:
        self._rid = run_id
        self.key = key
        """Its key in ``Ledger.runs`` and ``Ledger.recent`` (see ``run_key``)."""
        self.lock = _RUN_LOCKS[next(_lock_turn) & _RUN_LOCK_MASK]
        self.started_wall = started_wall
        self.started_perf = started_perf
        """``time.perf_counter()`` at its start (monotonic)."""

    _text: str | None = None

    @property
    def run_id(self) -> str:
        """The run's id as text (a LangChain run id, a ``UUID`` or its integer, is turned into text when first read,
        usually on the exporter's thread)."""
        text = self._text
        if text is None:
            rid = self._rid
            text = self._text = rid if type(rid) is str else str(UUID(int=rid)) if type(rid) is int else str(rid)
        return text

    def snapshot(self) -> RunCost:
        with self.lock:
            return RunCost(
                run_id=self.run_id,
                cost_usd=nanos_to_usd(self.cost_nanos) or Decimal(0),
                input_tokens=self.input,
                output_tokens=self.output,
                cache_read_tokens=self.cache_read,
                cache_write_tokens=self.cache_write,
                reasoning_tokens=self.reasoning,
                llm_calls=self.llm_calls,
                tool_calls=self.tool_calls,
                unpriced_calls=self.unpriced_calls,
                by_model={m: nanos_to_usd(n) or Decimal(0) for m, n in (self.by_model or _NO_META).items()},
                unpriced_models=tuple(self.unpriced_models),
                status=self.status,
                attributes=self.public_attributes(),
                reason=self.aborted.reason if self.aborted is not None else None,
                estimated_calls=self.estimated_calls,
            )

    def public_attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feature": self.feature}
        if self.route is not None:
            out["route"] = self.route
        if self.tenant_id is not None:
            out["tenant_id"] = self.tenant_id
        if self.user_hash is not None:
            out["user"] = self.user_hash
        if self.prompt_version is not None:
            out["prompt_version"] = self.prompt_version
        out.update(self.attributes)
        return out


class Span:
    """One open (then finished) span. Exported as is: the exporter's thread turns it into a row.

    As for ``Run``, the defaults are class attributes and a span stores only what it sets."""

    end_wall = 0.0
    latency_ms = 0.0
    parent: Span | None = None
    is_root = True
    depth = 0
    model: str | None = None
    provider: str | None = None
    detail: UsageDetail | None = None
    """What the provider reported beside the token counts that changes the price (1-hour cache writes, service tier,
    server tool requests); ``None`` when nothing was."""
    tokens: Tokens | None = None
    """The call's token counts: (input, output, cache read, cache write, reasoning), as ``TokenUsage`` has them (a
    tuple of integers, which the garbage collector stops visiting, while the span waits for the exporter)."""
    cost_nanos: int | None = None
    tree_cost = 0
    unpriced = False
    estimated = False
    cache_hit = False
    saved_nanos: int | None = None
    prices: UnitPrices | None = None
    status = "running"
    error: str | None = None
    flags: list[str] | tuple[str, ...] | None = None
    """Its flags (``estimated``, ``unpriced``...); a tuple when set whole and shared (see ``Ledger.record_llm``)."""
    exported = True
    prompt: Any = None
    prompt_ops: PromptOps | None = None
    extra: Any = None
    max_tokens: int | None = None
    request_sig: Any = None  # int, or _DEFERRED
    reserved = 0
    """nano-USD of the run's budget this call holds while in flight."""

    def __init__(
        self, span_id: str | UUID | int, parent: Span | None, run: Run, kind: str, name: str, model: str | None = None,
        provider: str | None = None, prompt: Any = None, prompt_ops: PromptOps | None = None, extra: Any = None,
        max_tokens: int | None = None, start_wall: float | None = None, start_perf: float = 0.0,
    ) -> None:
        self._sid = span_id
        self.run = run
        self.kind = kind
        self.name = name
        if start_wall is None:
            self.start_wall = time.time()
            self.start_perf = time.perf_counter()
        else:  # its run's start (a new run's first span)
            self.start_wall = start_wall
            self.start_perf = start_perf
        if parent is not None:
            self.parent = parent
            self.is_root = False
            self.depth = parent.depth + 1
        if model is not None:
            self.model = model
        if provider is not None:
            self.provider = provider
        if prompt is not None:
            self.prompt = prompt
            self.prompt_ops = prompt_ops
        if extra is not None:
            self.extra = extra
        if max_tokens is not None:
            self.max_tokens = max_tokens

    @property
    def span_id(self) -> str:
        """The span's id as text. A LangChain run id (a ``UUID``) is turned into text when first read, which is
        usually on the exporter's thread: ``str(uuid)`` costs the app's thread a fair part of a span."""
        sid = self._sid
        if type(sid) is not str:
            run = self.run
            # a root's id is its run's (made once); an integer is a UUID's (see Ledger.start)
            sid = self._sid = run.run_id if run._rid is sid else str(UUID(int=sid)) if type(sid) is int else str(sid)
        return sid

    @property
    def usage(self) -> TokenUsage | None:
        t = self.tokens
        return None if t is None else TokenUsage(*t)

    def flag(self, name: str) -> None:
        flags = self.flags
        if flags is None:
            self.flags = [name]
        elif name not in flags:
            if isinstance(flags, list):
                flags.append(name)
            else:  # a shared tuple (see record_llm)
                self.flags = [*flags, name]

    @property
    def export_parent_id(self) -> str | None:
        p = self.parent
        while p is not None and not p.exported:
            p = p.parent
        return p.span_id if p is not None else None


# The run scope opened by ``CostTracker.run()``; root events inside it attach to its run.
current_scope: ContextVar[Span | None] = ContextVar("costobs_scope", default=None)


def canonical_args(args: Any) -> str:
    """A stable text for a tool's arguments (key order and whitespace do not matter)."""
    if isinstance(args, str):
        s = args.strip()
        if s[:1] in ("{", "["):
            try:
                return json.dumps(json.loads(s), sort_keys=True, separators=(",", ":"), default=str)
            except ValueError:
                return s
        return s
    try:
        return json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return repr(args)


class Ledger:
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
    ) -> None:
        self.prices = prices
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
        self.lone_calls = not self.require and first != _FIRST_CHECKED and not first & _FIRST_ESTIMATE
        self._lone_attr: _Attribution | None = None

    # -- attribution ----------------------------------------------------------------------------

    def hash_user(self, user_id: Any) -> str:
        key = str(user_id)
        h = self._user_cache.get(key)
        if h is None:
            h = hmac.new(self._salt, key.encode("utf-8", "replace"), hashlib.sha256).hexdigest()
            if len(self._user_cache) > 4096:
                self._user_cache.clear()
            self._user_cache[key] = h
        return h

    def _attribute(self, run: Run, meta: Mapping[str, Any] | None, extra: Mapping[str, Any] | None) -> int:
        """Set the run's attribution and policy from its root's metadata (raises ``MissingAttributionError``,
        the refused run stored).

        What a run gets depends only on the values of a few keys (the attribution keys, other attributes, the
        policy keys), and LangChain sends the same metadata with every call of a feature: the outcome is
        remembered per distinct set of those values while they are plain text (the common case), so most runs
        are attributed with one lookup. Other values (numbers, objects, policy dicts) take the full path.

        Returns what the run's policy asks of its first model call (see ``_first_call``)."""
        if extra:
            merged: Mapping[str, Any] = {**meta, **extra} if meta else dict(extra)
        else:
            merged = meta or _NO_META
        shape = tuple(merged)
        plan = _ATTR_PLANS.get(shape)
        if plan is None:
            plan = _AttrPlan(shape)
            if len(_ATTR_PLANS) >= _MAX_ATTR_PLANS:
                _ATTR_PLANS.clear()
            _ATTR_PLANS[shape] = plan
        get = merged.get
        memo = self._attr_memo
        try:
            hit = memo.get((plan, *map(get, plan.deciding)))  # plain text values (the common case): one lookup
        except TypeError:  # an unhashable value (a policy dict, a list)
            hit = None
        if hit is None:
            hit = self._attribute_slow(run, get, shape, plan)
        (run.feature, run.route, run.tenant_id, run.user_hash, run.prompt_version, run.attributes, run.budget,
         run.max_cost_nanos, run.loops, first, flags) = hit
        if flags:
            run.flags = flags
        return first

    def _attribute_slow(
        self, run: Run, get: Any, shape: tuple[Any, ...],
        plan: _AttrPlan,
    ) -> _Attribution:
        """``_attribute`` without a remembered outcome: work it out, and remember it if the values allow."""
        vals: list[Any] | None = []
        plain = True
        for i, k in enumerate(plan.deciding):
            v = get(k)
            if v is None or type(v) is str:
                vals.append(v)  # type: ignore[union-attr]
                continue
            plain = False
            if i >= plan.n and not isinstance(v, (str, int, float)):
                vals.append(_IGNORED)  # type: ignore[union-attr]  # not an attribute value: dropped, whatever it is
            elif k in _POLICY_META_KEYS and (pk := _policy_key(v)) is not None:
                vals.append((_IGNORED, pk))  # type: ignore[union-attr]
            else:
                vals = None  # another type: not remembered (1 and True are equal keys, not equal values)
                break
        if vals is None:
            return self._resolve_attribution(run, get, plan)
        # Plain values are remembered under the key _attribute looks up; others under a key it can never build.
        mkey = (plan, *vals) if plain else (_IGNORED, plan, *vals)
        memo = self._attr_memo
        hit = memo.get(mkey)
        if hit is None:
            hit = self._resolve_attribution(run, get, plan)
            if len(memo) >= _MAX_ATTR_MEMO:
                memo.clear()
            memo[mkey] = hit
        return hit

    def _resolve_attribution(self, run: Run, get: Any, plan: _AttrPlan) -> _Attribution:
        for key in self.require:
            if not _present(get(key)):
                err = MissingAttributionError(
                    f"run {run.run_id} is missing the attribution key {key!r} "
                    f"(required by CostTracker(require={self.require!r})); pass it in config metadata "
                    f"or tracker.config({key}=...)",
                    run_id=run.run_id,
                    reason="missing_attribution",
                    limit=key,
                )
                run.aborted = err
                run.status = "aborted"
                run.ended_wall = time.time()
                self.exporter.emit(run)  # a refused run: stored with its status and reason, no spans
                raise err
        # An attribution value counts when present: not None and not "" (never calls the value's own __eq__).
        flags: list[str] = list(plan.flags)
        v: Any = get("feature")
        feature = UNATTRIBUTED if not _present(v) else _clean(v, flags)
        v = get("route")
        route = _clean(v, flags) if _present(v) else None
        v = get("tenant_id")
        tenant_id = _clean(v, flags) if _present(v) else None
        v = get("prompt_version")
        prompt_version = _clean(v, flags) if _present(v) else None
        v = get("user_id")
        user_hash = self.hash_user(v if isinstance(v, str) else _text(v)) if _present(v) else None
        attrs: dict[str, Any] = {}
        for k, ck in plan.cands:
            if len(attrs) >= _MAX_ATTRS:
                break
            v = get(k)
            if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)):
                attrs[ck] = _clean(v, flags)  # NaN and infinities as text: JSON (PostgreSQL's) has no such numbers
            elif v is None or isinstance(v, (int, float, bool)):
                attrs[ck] = v
        budget_value = get(BUDGET_META_KEY)
        budget = None if budget_value is None else self._budget_from_meta(budget_value)
        if budget is None:
            budget = self.default_budget
        run_budget = max_cost = None
        if budget is not None and not budget.is_empty():
            run_budget = budget
            if budget.max_cost_usd is not None:
                max_cost = usd_to_nanos(budget.max_cost_usd)
        loops_value = get(LOOPS_META_KEY)
        loops = None if loops_value is None else self._loops_from_meta(loops_value)
        if loops is None:
            loops = self.default_loops
        run_loops = loops if loops.enabled else None
        return (feature, route, tenant_id, user_hash, prompt_version, MappingProxyType(attrs) if attrs else _NO_META,
                run_budget, max_cost, run_loops, _first_call(run_budget, run_loops), tuple(dict.fromkeys(flags)))

    @staticmethod
    def _budget_from_meta(value: Any) -> Budget | None:
        """``coerce_budget_quiet``, remembered per distinct plain mapping (``tracker.config(budget=...)`` puts
        the same small dict in every run's metadata; validating it again costs more than the whole call)."""
        key = _policy_key(value)
        if key is not None:
            hit = _BUDGETS.get(key)
            if hit is not None:
                return hit
            value = {k: v for k, _, v in key}  # validate what the key says (the same items)
        elif isinstance(value, Budget):
            return value
        budget = coerce_budget_quiet(value)
        if key is not None and budget is not None:  # invalid input is not remembered: it is logged every time
            if len(_BUDGETS) >= _MAX_POLICIES:
                _BUDGETS.clear()
            _BUDGETS[key] = budget
        return budget

    @staticmethod
    def _loops_from_meta(value: Any) -> LoopPolicy | None:
        key = _policy_key(value)
        if key is not None:
            hit = _LOOP_POLICIES.get(key)
            if hit is not None:
                return hit
            value = {k: v for k, _, v in key}
        elif isinstance(value, LoopPolicy):
            return value
        loops = coerce_loops_quiet(value)
        if key is not None and loops is not None:
            if len(_LOOP_POLICIES) >= _MAX_POLICIES:
                _LOOP_POLICIES.clear()
            _LOOP_POLICIES[key] = loops
        return loops

    # -- start ----------------------------------------------------------------------------------

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
        run_id: str | None = None,
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
        if first & _FIRST_ESTIMATE and run.max_cost_nanos is not None:
            assert run.budget is not None
            try:
                self._check_llm_estimate(run, span, run.budget)
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

    def _guard_start(self, run: Run, span: Span, kind: str, name: str, tool_args: Any) -> None:
        if run.aborted is not None:
            raise _again(run.aborted)
        loops = run.loops
        budget = run.budget
        max_steps = max_reqs = None
        if loops is not None:
            # The policy's limits as plain values, read once per policy object (a pydantic model's attributes
            # cost several times a plain one's).
            lm = self._loops_memo
            if lm[0] is not loops:
                lm = self._loops_memo = (loops, loops.max_depth, loops.max_steps, loops.max_identical_model_requests)
            max_depth, max_steps, max_reqs = lm[1], lm[2], lm[3]
        if loops is not None and max_depth is not None and span.depth > max_depth:
            self._abort(run, LoopDetectedError(
                f"run {run.run_id} nested {span.depth} levels deep (max_depth={loops.max_depth}): "
                f"agents or chains calling each other without end; refused {kind} {name!r}",
                run_id=run.run_id, reason="max_depth", limit=loops.max_depth, spent=span.depth,
                detail={"kind": kind, "name": name},
            ))
        if kind in COST_KINDS:
            # Count the call before checking it, under the run's lock, so that concurrent calls (a ToolNode
            # runs one message's tool calls in parallel) never pass a count limit together.
            with run.lock:
                run.steps += 1
                steps = run.steps
                if kind == "tool":
                    run.tool_calls += 1
                    nth = run.tool_calls
                else:
                    run.llm_calls += 1
                    nth = run.llm_calls
            if budget is None:
                if loops is None:
                    return
                if kind != "tool" and (max_steps is None or steps <= max_steps):
                    # A model call under the loop guard alone (the common case): what _check_loops would find,
                    # without the calls, as long as nothing can refuse it.
                    if max_reqs is None or span.prompt is None or span.prompt_ops is None:
                        return
                    if span.is_root and max_reqs > 1 and not run.model_reqs:
                        span.request_sig = _DEFERRED
                        return
            try:
                self._check_call_start(run, span, budget, loops, tool_args, nth, steps)
            except RunAborted:
                with run.lock:  # a refused call was never made
                    run.steps -= 1
                    if kind == "tool":
                        run.tool_calls -= 1
                    else:
                        run.llm_calls -= 1
                self._release_hold(run, span)
                raise
        elif budget is not None and budget.max_seconds is not None:
            self._check_seconds(run, budget)

    @staticmethod
    def _release_hold(run: Run, span: Span) -> None:
        """Give back what a refused call held of its run's budget."""
        with run.lock:
            run.reserved_nanos -= span.reserved
            span.reserved = 0
            if run.loose_holds:
                run.loose_holds.discard(span)

    def _check_seconds(self, run: Run, budget: Budget) -> None:
        assert budget.max_seconds is not None
        elapsed = time.perf_counter() - run.started_perf
        if elapsed > budget.max_seconds:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} exceeded max_seconds={budget.max_seconds:g} "
                f"(running for {elapsed:.1f}s); spent {_usd(run.cost_nanos)}",
                run_id=run.run_id, reason="max_seconds", limit=budget.max_seconds, spent=elapsed,
            ))

    def _check_call_start(
        self, run: Run, span: Span, budget: Budget | None, loops: LoopPolicy | None, tool_args: Any, nth: int,
        steps: int,
    ) -> None:
        """``nth``: this call's number among the run's tool (or LLM) calls; ``steps``: among all its calls."""
        kind = span.kind
        if budget is not None:
            bl = self._budget_limits
            if bl[0] is not budget:  # the budget's limits as plain values, read once per budget object
                bl = self._budget_limits = (budget, budget.max_seconds, budget.max_tool_calls, budget.max_llm_calls,
                                            budget.max_tokens)
            if bl[1] is not None:
                self._check_seconds(run, budget)
            if kind == "tool":
                if bl[2] is not None and nth > bl[2]:
                    self._abort(run, BudgetExceededError(
                        f"run {run.run_id} refused tool call {nth} ({span.name!r}): "
                        f"max_tool_calls={budget.max_tool_calls}; spent {_usd(run.cost_nanos)}",
                        run_id=run.run_id, reason="max_tool_calls", limit=budget.max_tool_calls,
                        spent=nth - 1, spent_usd=nanos_to_usd(run.cost_nanos),
                        detail={"tool": span.name},
                    ))
                if run.max_cost_nanos is not None:
                    price = self.prices.tool_price_nanos(span.name)
                    if price:
                        self._reserve(run, span, budget, price, f"tool {span.name!r} costing {_usd(price)}",
                                      {"tool": span.name})
            else:
                if bl[3] is not None and nth > bl[3]:
                    self._abort(run, BudgetExceededError(
                        f"run {run.run_id} refused LLM call {nth} ({span.model or span.name}): "
                        f"max_llm_calls={budget.max_llm_calls}; spent {_usd(run.cost_nanos)}",
                        run_id=run.run_id, reason="max_llm_calls", limit=budget.max_llm_calls,
                        spent=nth - 1, spent_usd=nanos_to_usd(run.cost_nanos),
                        detail={"model": span.model},
                    ))
                if bl[4] is not None and run.input + run.output >= bl[4]:
                    self._abort(run, BudgetExceededError(
                        f"run {run.run_id} refused an LLM call: {run.input + run.output} tokens used of "
                        f"max_tokens={budget.max_tokens}",
                        run_id=run.run_id, reason="max_tokens", limit=budget.max_tokens,
                        spent=run.input + run.output, spent_usd=nanos_to_usd(run.cost_nanos),
                    ))
                if run.max_cost_nanos is not None:
                    self._check_llm_estimate(run, span, budget)
        if loops is not None:
            self._check_loops(run, span, loops, tool_args, steps)

    def _check_llm_estimate(self, run: Run, span: Span, budget: Budget) -> None:
        assert run.max_cost_nanos is not None
        if run.cost_nanos >= run.max_cost_nanos:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} refused an LLM call: spent {_usd(run.cost_nanos)} of "
                f"max_cost_usd=${budget.max_cost_usd}",
                run_id=run.run_id, reason="max_cost_usd", limit=budget.max_cost_usd,
                spent=nanos_to_usd(run.cost_nanos), spent_usd=nanos_to_usd(run.cost_nanos),
            ))
        prices = self.prices
        if not prices.is_priced(span.model, span.provider):
            return  # an unpriced model: its cost is unknown; counts and the after-call check still apply
        max_out = max_output_tokens(span)
        prompt_tokens = 0
        ops = span.prompt_ops
        if span.prompt is not None and ops is not None:
            bound = getattr(ops, "token_upper_bound", None)
            if bound is None:
                prompt_tokens, _ = ops.count_tokens(span.model, span.prompt, span.extra)
            else:
                # Tokenizing a long new prompt costs far more than the rest of the call: first try an upper bound
                # (texts not counted before count one token per byte). If even that fits, the call is let through
                # holding the bound, which is tightened to the exact estimate should another call need the room.
                prompt_tokens, exact = bound(span.model, span.prompt, span.extra)
                if not exact:
                    out = max_out or self.output_hold(span.model, span.provider, prompt_tokens)
                    upper = prices.estimate_upper_nanos(span.model, span.provider, prompt_tokens, out)
                    if upper is not None and self._try_hold(run, span, upper, None, True)[0]:
                        return
                    prompt_tokens, _ = ops.count_tokens(span.model, span.prompt, span.extra)
        least = None
        if max_out:
            estimate = prices.estimate_nanos(span.model, span.provider, prompt_tokens, max_out)
        else:
            # No max_tokens: the call holds an output estimate too (see output_hold), as much of it as the budget
            # has left; only its prompt must fit for it to start.
            least = prices.estimate_nanos(span.model, span.provider, prompt_tokens, 0)
            estimate = prices.estimate_nanos(span.model, span.provider, prompt_tokens,
                                             self.output_hold(span.model, span.provider, prompt_tokens))
        if estimate is None:
            return
        what = (f"an LLM call to {span.model} estimated at {_usd(estimate if least is None else least)} "
                f"({prompt_tokens} prompt tokens" + (f", max_tokens={max_out})" if max_out else ", no max_tokens)"))
        self._reserve(run, span, budget, estimate, what, {"model": span.model, "prompt_tokens": prompt_tokens}, least)

    def output_hold(self, model: str | None, provider: str | None, prompt_tokens: int) -> int:
        """The output tokens a budget holds for a call that sets no ``max_tokens``: the most this model produced
        in one call in this process, else what its context window leaves after the prompt (the catalog's), else
        ``DEFAULT_OUTPUT_HOLD``."""
        if model:
            seen = self.largest_output.get(model)
            if seen:
                return seen
            window = self.prices.context_window(model, provider)
            if window:
                return max(window - prompt_tokens, 0)
        return DEFAULT_OUTPUT_HOLD

    def _saw_output(self, model: str, out: int) -> None:
        """Remember the most output tokens ``model`` (as requested) produced in one call (see ``output_hold``)."""
        seen = self.largest_output
        if out > seen.get(model, 0):
            if len(seen) >= _MAX_MODELS_SEEN and model not in seen:
                seen.clear()
            seen[model] = out

    def _reserve(self, run: Run, span: Span, budget: Budget, estimate: int, what: str, detail: dict[str, Any],
                 least: int | None = None) -> None:
        """Hold ``estimate`` of the run's budget for this call while it is in flight, or refuse the call if
        what is spent, what calls in flight hold and the estimate would pass ``max_cost_usd``. With ``least``, the
        call needs only that much to start when no other call of the run is in flight, holding what is left of the
        budget if ``estimate`` does not fit."""
        fits, spent, held = self._try_hold(run, span, estimate, least)
        if not fits and run.loose_holds:
            # Calls in flight hold upper bounds: make them exact (what they would hold otherwise) and look again.
            self._tighten_holds(run)
            fits, spent, held = self._try_hold(run, span, estimate, least)
        if not fits:
            in_flight = f" and {_usd(held)} held by calls in flight" if held else ""
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} refused {what}: on top of {_usd(spent)} spent{in_flight} it would pass "
                f"max_cost_usd=${budget.max_cost_usd}",
                run_id=run.run_id, reason="max_cost_usd", limit=budget.max_cost_usd,
                spent=nanos_to_usd(spent), spent_usd=nanos_to_usd(spent),
                detail={**detail, "estimate_usd": nanos_to_usd(estimate if least is None else least),
                        "in_flight_usd": nanos_to_usd(held)},
            ))

    @staticmethod
    def _try_hold(run: Run, span: Span, estimate: int, least: int | None = None,
                  loose: bool = False) -> tuple[bool, int, int]:
        """Hold ``estimate`` for this call if it fits (``max_cost_usd`` is "at most": an estimate that exactly fills
        what is left fits), else, given ``least``, if that fits and no other call of the run is in flight, all that is
        left: ``(fits, spent, held by others)``, read under the lock. ``loose``: ``estimate`` is an upper bound of the
        call's estimate, which ``_tighten_holds`` may replace by the exact one."""
        assert run.max_cost_nanos is not None
        with run.lock:
            spent, held = run.cost_nanos, run.reserved_nanos
            room = run.max_cost_nanos - spent - held
            if estimate <= room:
                take = estimate
            elif least is not None and least <= room and not held:
                take = room  # alone in flight: it may overshoot as a call made on its own can, no more
            else:
                return False, spent, held
            run.reserved_nanos += take
            span.reserved += take
            if loose:
                holds = run.loose_holds
                if holds is None:
                    holds = run.loose_holds = set()
                holds.add(span)
        return True, spent, held

    def _tighten_holds(self, run: Run) -> None:
        """Replace the upper bounds held by the run's calls in flight by their exact estimates."""
        with run.lock:
            spans = list(run.loose_holds or ())
        for sp in spans:
            prompt, ops = sp.prompt, sp.prompt_ops
            if prompt is None or ops is None:
                continue  # ended meanwhile: its hold is gone
            try:
                n, _ = ops.count_tokens(sp.model, prompt, sp.extra)
                est = self.prices.estimate_nanos(
                    sp.model, sp.provider, n, max_output_tokens(sp) or self.output_hold(sp.model, sp.provider, n))
            except Exception:
                logger.debug("costobs: could not tighten a budget hold", exc_info=True)
                continue
            if est is None:
                continue
            with run.lock:
                loose = run.loose_holds
                if loose is not None and sp in loose:  # still in flight, still holding its bound
                    loose.discard(sp)
                    run.reserved_nanos -= sp.reserved - est
                    sp.reserved = est

    def _check_loops(self, run: Run, span: Span, loops: LoopPolicy, tool_args: Any, steps: int) -> None:
        if loops.max_steps is not None and steps > loops.max_steps:
            self._abort(run, LoopDetectedError(
                f"run {run.run_id} reached max_steps={loops.max_steps} LLM and tool calls; refused "
                f"{span.kind} {span.model or span.name!r}; spent {_usd(run.cost_nanos)}",
                run_id=run.run_id, reason="max_steps", limit=loops.max_steps, spent=steps - 1,
                spent_usd=nanos_to_usd(run.cost_nanos),
            ))
        if span.kind == "tool":
            sig = (span.name, canonical_args(tool_args))
            with run.lock:
                repeat = run.tool_repeat + 1 if sig == run.last_tool_sig else 1
                seq = run.tool_seq
                if seq is None:
                    seq = run.tool_seq = deque(maxlen=loops.max_cycle_period * (loops.cycle_repeats or 1) + 1)
                window = [*seq, sig]
            limit = loops.max_identical_tool_calls
            if limit is not None and repeat >= limit:
                self._abort(run, LoopDetectedError(
                    f"run {run.run_id} called tool {span.name!r} with the same arguments {repeat} times in a row "
                    f"(max_identical_tool_calls={limit}); the call was refused",
                    run_id=run.run_id, reason="tool_repeat", limit=limit, spent=repeat,
                    spent_usd=nanos_to_usd(run.cost_nanos), detail={"tool": span.name, "arguments": sig[1][:200]},
                ))
            if loops.cycle_repeats is not None:
                cyc = _find_cycle(window, loops.max_cycle_period, loops.cycle_repeats)
                if cyc is not None:
                    names = " -> ".join(s[0] for s in cyc)
                    self._abort(run, LoopDetectedError(
                        f"run {run.run_id} repeats the tool cycle {names} {loops.cycle_repeats} times "
                        f"(cycle_repeats={loops.cycle_repeats}); the call was refused",
                        run_id=run.run_id, reason="tool_cycle", limit=loops.cycle_repeats,
                        spent=loops.cycle_repeats, spent_usd=nanos_to_usd(run.cost_nanos),
                        detail={"cycle": [s[0] for s in cyc]},
                    ))
            with run.lock:
                run.last_tool_sig = sig
                run.tool_repeat = repeat
                seq.append(sig)
        elif loops.max_identical_model_requests is not None and span.prompt_ops is not None and span.prompt is not None:
            if span.is_root and loops.max_identical_model_requests > 1 and not run.model_reqs:
                # The run has no successful model request yet, so this one repeats nothing: its signature is only
                # needed to count it, at its end, and only if the run goes on after it (see _end_root).
                span.request_sig = _DEFERRED
                return
            sig_i = span.prompt_ops.signature(span.model, span.prompt)
            span.request_sig = sig_i
            reqs = run.model_reqs
            seen = reqs.get(sig_i, 0) if reqs is not None else 0
            if seen + 1 >= loops.max_identical_model_requests:
                self._abort(run, LoopDetectedError(
                    f"run {run.run_id} sent the same request to {span.model} {seen + 1} times "
                    f"(max_identical_model_requests={loops.max_identical_model_requests}); the call was refused",
                    run_id=run.run_id, reason="model_repeat", limit=loops.max_identical_model_requests,
                    spent=seen + 1, spent_usd=nanos_to_usd(run.cost_nanos), detail={"model": span.model},
                ))

    def _abort(self, run: Run, err: RunAborted) -> None:
        if err.spent_usd is None:
            err.spent_usd = nanos_to_usd(run.cost_nanos)
        with run.lock:
            if run.aborted is None:
                run.aborted = err
                run.status = "aborted"
        logger.warning("costobs: %s", err)
        raise err

    # -- custom cost reports ---------------------------------------------------------------------

    def add_cost(self, span_id: Any, nanos: int) -> bool:
        """A cost reported at run time (a tool's own price): added to that span when it ends."""
        span = self.spans.get(span_id.int if type(span_id) is UUID else span_id)
        if span is None:
            return False
        span.cost_nanos = (span.cost_nanos or 0) + nanos
        return True

    # -- end ------------------------------------------------------------------------------------

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

    def _check_after(self, run: Run, span: Span) -> None:
        budget = run.budget
        assert budget is not None
        if self.on_budget_warning is not None:
            self._maybe_warn(run, budget)
        if run.max_cost_nanos is not None and run.cost_nanos > run.max_cost_nanos:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} spent {_usd(run.cost_nanos)}, past max_cost_usd=${budget.max_cost_usd}, "
                f"after {span.kind} {span.model or span.name!r}; stopped",
                run_id=run.run_id, reason="max_cost_usd", limit=budget.max_cost_usd,
                spent=nanos_to_usd(run.cost_nanos), spent_usd=nanos_to_usd(run.cost_nanos),
            ))
        if budget.max_tokens is not None and run.input + run.output > budget.max_tokens:
            self._abort(run, BudgetExceededError(
                f"run {run.run_id} used {run.input + run.output} tokens, past max_tokens={budget.max_tokens}; stopped",
                run_id=run.run_id, reason="max_tokens", limit=budget.max_tokens,
                spent=run.input + run.output, spent_usd=nanos_to_usd(run.cost_nanos),
            ))

    def _maybe_warn(self, run: Run, budget: Budget) -> None:
        hook = self.on_budget_warning
        assert hook is not None
        checks: list[tuple[str, Any, Any, float]] = []
        if run.max_cost_nanos is not None:
            checks.append(("max_cost_usd", budget.max_cost_usd, nanos_to_usd(run.cost_nanos),
                           run.cost_nanos / run.max_cost_nanos))
        if budget.max_tokens is not None:
            t = run.input + run.output
            checks.append(("max_tokens", budget.max_tokens, t, t / budget.max_tokens))
        if budget.max_llm_calls is not None:
            checks.append(("max_llm_calls", budget.max_llm_calls, run.llm_calls, run.llm_calls / budget.max_llm_calls))
        if budget.max_tool_calls:
            checks.append(("max_tool_calls", budget.max_tool_calls, run.tool_calls,
                           run.tool_calls / budget.max_tool_calls))
        if budget.max_seconds is not None:
            el = time.perf_counter() - run.started_perf
            checks.append(("max_seconds", budget.max_seconds, el, el / budget.max_seconds))
        for name, limit, spent, ratio in checks:
            if ratio >= budget.warn_at:
                with run.lock:
                    if run.warned is None:
                        run.warned = set()
                    if name in run.warned:
                        continue
                    run.warned.add(name)
                try:
                    hook(BudgetWarning(run.run_id, name, limit, spent, run.public_attributes()))
                except Exception:
                    logger.exception("costobs: on_budget_warning hook failed")

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


def _account(run: Run, span: Span, cost: int, sig: Any) -> None:
    """Add one ended span to its run's totals: every end path calls this, under ``run.lock`` (or on a run no other
    thread has seen). What the span held of the budget is given back; its cost goes to the run and to every span
    above it; its tokens to the run (a cache hit's are not spent); for a model call, its count by how it was
    priced, its model's cost (an unpriced model is listed apart, never a silent $0) and, given a signature
    (``sig``), its request, for the loop guard."""
    if span.reserved:
        run.reserved_nanos -= span.reserved
        span.reserved = 0
        if run.loose_holds:
            run.loose_holds.discard(span)
    if cost:
        run.cost_nanos += cost
        p = span.parent
        while p is not None:
            p.tree_cost += cost
            p = p.parent
    t = span.tokens
    if t is not None and not span.cache_hit:
        inp, out, cr, cw, rsn = t
        run.input += inp
        run.output += out
        if cr or cw or rsn:
            run.cache_read += cr
            run.cache_write += cw
            run.reasoning += rsn
    kind = span.kind
    if kind != "llm" and kind != "embedding":
        return
    if span.unpriced:
        run.unpriced_calls += 1
    if span.estimated:
        run.estimated_calls += 1
    m = span.model
    if m and not span.cache_hit:
        if span.unpriced:
            if m not in run.unpriced_models:
                run.unpriced_models = (*run.unpriced_models, m)
        else:
            bm = run.by_model
            if bm is None:
                run.by_model = {m: cost}
            else:
                bm[m] = bm.get(m, 0) + cost
    if sig is not None and sig is not _DEFERRED:
        reqs = run.model_reqs
        if reqs is None:
            reqs = run.model_reqs = {}
        reqs[sig] = reqs.get(sig, 0) + 1


def _copy_attribution(src: Run, dst: Run) -> None:
    """What ``Ledger._attribute`` set on ``src``, onto ``dst``."""
    dst.feature, dst.route, dst.tenant_id, dst.user_hash, dst.prompt_version = (
        src.feature, src.route, src.tenant_id, src.user_hash, src.prompt_version)
    dst.attributes, dst.budget, dst.max_cost_nanos, dst.loops, dst.flags = (
        src.attributes, src.budget, src.max_cost_nanos, src.loops, src.flags)


def _again(err: RunAborted) -> RunAborted:
    """A fresh instance of a sticky abort (re-raising one instance grows its traceback forever)."""
    new = type(err)(err.message, run_id=err.run_id, reason=err.reason, limit=err.limit, spent=err.spent,
                    spent_usd=err.spent_usd, detail=err.detail)
    return new


def _usd(nanos: int) -> str:
    """``$0.0021`` for a message: exact, without trailing zeros or an exponent."""
    return "$" + format(Decimal(nanos).scaleb(-9).normalize(), "f")


def _find_cycle(window: list[Any], max_period: int, repeats: int) -> list[Any] | None:
    for period in range(2, max_period + 1):
        need = period * repeats
        if len(window) < need:
            continue
        tail = window[-need:]
        unit = tail[:period]
        if len(set(unit)) < 2:
            continue  # one repeated call is the identical-call rule's business
        if all(tail[i] == unit[i % period] for i in range(need)):
            return unit
    return None


_DEFERRED: Any = object()
"""``Span.request_sig`` of a call whose request signature is computed at its end, if it is needed then."""
_NO_META: Mapping[str, Any] = {}  # read-only
_ATTR_PLANS: dict[tuple[Any, ...], _AttrPlan] = {}
_IGNORED: Any = object()
"""Metadata keys (in order) -> their ``_AttrPlan``. Bounded; filled on the app's threads (a lost race only
recomputes an entry)."""
_MAX_ATTR_PLANS = 1024
_MAX_ATTR_MEMO = 4096
_POLICY_META_KEYS = frozenset({BUDGET_META_KEY, LOOPS_META_KEY})
_Attribution = tuple[str, str | None, str | None, str | None, str | None, Mapping[str, Any], "Budget | None",
                     int | None, "LoopPolicy | None", int, tuple[str, ...]]
"""(feature, route, tenant_id, user_hash, prompt_version, attributes, budget, max_cost_nanos, loops) of a run,
``_first_call`` of its policy, and the flags its attribution earned (``truncated``, ``sanitized``)."""
_FIRST_CHECKED, _FIRST_FREE, _FIRST_DEFER, _FIRST_ESTIMATE = 0, 1, 2, 4


def _first_call(budget: Budget | None, loops: LoopPolicy | None) -> int:
    """What a policy asks of a new run's first call when that call is a root model call (depth 0, the run's first
    step, nothing spent): ``_FIRST_CHECKED`` (0) if the full checks must run, else ``_FIRST_FREE`` with these bits:
    ``_FIRST_DEFER`` if its request signature is needed (counted at its end, see ``_end_root``), ``_FIRST_ESTIMATE``
    if its cost estimate must fit the budget (no other budget limit can refuse a first call: counts and tokens
    limits are at least 1, nothing is spent yet; a ``max_seconds`` budget takes the full checks)."""
    first = _FIRST_FREE
    if budget is not None:
        if budget.max_seconds is not None:
            return _FIRST_CHECKED
        first |= _FIRST_ESTIMATE
    if loops is None:
        return first
    if (loops.max_depth is not None and loops.max_depth < 0) or (loops.max_steps is not None and loops.max_steps < 1):
        return _FIRST_CHECKED
    reqs = loops.max_identical_model_requests
    if reqs is None:
        return first
    return first | _FIRST_DEFER if reqs > 1 else _FIRST_CHECKED


class _AttrPlan:
    """For one set of metadata keys: the keys whose values decide a run's attribution and policy (attribution
    and policy keys first, then the others), the keys that may be other attributes (with their attribute names),
    and how many of the deciding keys are attribution or policy keys. Hashed by identity (it leads the keys of
    ``Ledger._attr_memo``, which keep it alive)."""

    __slots__ = ("cands", "deciding", "flags", "n")

    def __init__(self, keys: tuple[Any, ...]) -> None:
        cands = []
        flags: list[str] = []
        for k in keys:
            if not isinstance(k, str) or k in ATTRIBUTION_KEYS or k.startswith(_INTERNAL_PREFIXES):
                continue
            if k in ("user", "user_hash"):  # never let a raw id in under another name
                continue
            cands.append((k, _clean(k, flags)))
        deciding = [k for k in keys if isinstance(k, str) and (k in ATTRIBUTION_KEYS or k in _POLICY_META_KEYS)]
        self.n = len(deciding)
        deciding += [k for k, _ in cands]
        self.deciding: tuple[str, ...] = tuple(deciding)
        self.cands: tuple[tuple[str, str], ...] = tuple(cands)
        self.flags: tuple[str, ...] = tuple(flags)


_BUDGETS: dict[tuple[tuple[str, type, Any], ...], Budget] = {}
_LOOP_POLICIES: dict[tuple[tuple[str, type, Any], ...], LoopPolicy] = {}
_MAX_POLICIES = 256
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _policy_key(value: Any) -> tuple[tuple[str, type, Any], ...] | None:
    """A hashable stand-in for a plain policy mapping, JSON-like values only (with their types, so ``True``
    and ``1`` differ), or ``None`` when it is anything else (it is then validated every time)."""
    if type(value) is not dict:
        return None
    key = []
    try:
        for k, v in value.items():
            tv = type(v)
            if type(k) is not str or tv not in _PLAIN:
                return None
            key.append((k, tv, v))
    except RuntimeError:  # changed by another thread meanwhile
        return None
    return tuple(key)


def _present(v: Any) -> bool:
    """An attribution value was given (``None`` and ``""`` are not; never calls the value's own ``__eq__``)."""
    return v is not None and not (isinstance(v, str) and not v)


def _text(v: Any) -> str:
    """Any value as text, without NUL characters (PostgreSQL refuses them); never raises."""
    if isinstance(v, str):
        s = v
    else:
        try:
            s = str(v)
        except Exception:  # an app object whose __str__ fails must not cost us the run
            s = f"<{type(v).__name__}>"
    return s.replace("\x00", "") if "\x00" in s else s


def _clean(v: Any, flags: list[str]) -> str:
    """An attribution value or key as stored: text (``_text``), lone surrogates (which no database encoding takes)
    replaced by U+FFFD (flag ``sanitized``), cut to ``_MAX_ATTR_LEN`` characters (flag ``truncated``)."""
    s = _text(v)
    if not s.isascii() and _SURROGATE.search(s) is not None:
        s = _SURROGATE.sub("\ufffd", s)
        flags.append("sanitized")
    if len(s) > _MAX_ATTR_LEN:
        s = s[:_MAX_ATTR_LEN]
        flags.append("truncated")
    return s


_SURROGATE = re.compile("[\ud800-\udfff]")


def coerce_budget_quiet(value: Any) -> Budget | None:
    """A budget from run metadata: bad input there is logged and ignored (a payload, not config)."""
    if value is None:
        return None
    try:
        return coerce_budget(value)
    except Exception as exc:
        logger.error("costobs: ignoring invalid %s in run metadata: %s", BUDGET_META_KEY, exc)
        return None


def coerce_loops_quiet(value: Any) -> LoopPolicy | None:
    if value is None:
        return None
    try:
        return coerce_loops(value)
    except Exception as exc:
        logger.error("costobs: ignoring invalid %s in run metadata: %s", LOOPS_META_KEY, exc)
        return None


def salt_from(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value

