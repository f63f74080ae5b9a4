"""The ledger's records: a run (the live totals of one root's tree), a span (one open, then finished, call or
step), what a run cost (``RunCost``), and how ids become keys. Nothing here decides anything."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import count
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from .._events import TokenUsage, UsageDetail, nanos_to_usd
from .._exceptions import RunAborted
from .._policy import Budget, LoopPolicy

if TYPE_CHECKING:
    from .._pricing import UnitPrices


logger = logging.getLogger("costobs_callbacks")


UNATTRIBUTED = "unattributed"


ATTRIBUTION_KEYS = ("feature", "route", "user_id", "tenant_id", "prompt_version")


COST_KINDS = frozenset({"llm", "embedding", "tool"})


Tokens = tuple[int, int, int, int, int]
"""A call's token counts in ``TokenUsage``'s order: input, output, cache read, cache write, reasoning."""


Later = tuple[Any, ...]
"""A call's token estimate left for later (``Ledger.record_llm``, ``record_scoped_llm``): a function returning
``(Tokens, exact)`` followed by its arguments, which must not change meanwhile (texts, not the app's message
objects)."""


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


def uuid_text(n: int) -> str:
    """``str(UUID(int=n))`` for ``0 <= n < 2**128``, a third of its time: the exporter's thread turns every id it
    writes into text (``tests/test_fast_paths.py`` holds the two to the same text)."""
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def run_text(run_id: Any) -> str:
    """A run id as stored: a ``UUID`` or its text (any case) in the canonical form, any other id as text."""
    key = run_key(run_id)
    return str(UUID(int=key)) if type(key) is int else str(key)


def span_key(span_id: Any) -> Any:
    """The key of a span in ``Ledger.spans``: a ``UUID`` as its integer (see ``run_key``), any other id as is."""
    return span_id.int if type(span_id) is UUID else span_id


class Run:
    """A root run: attribution, policy and live totals of its whole tree.

    The defaults below are class attributes: a run stores only the totals every end adds to (set by ``new_run``)
    and what differs from them (most runs are one call with no policy hit), a few assignments rather than forty.
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
    pending: dict[Span, None] | None = None
    """Its calls recorded but not yet counted (``Span.pending``), in order: ``Ledger.settle_run`` settles them before
    anything reads the run's totals."""
    caps: Any = None
    """Spend caps hook: the run's tenant and user caps (``_caps.guard._Binding``) once a capped call or record bound
    them; ``_account`` settles every ended span's cost through it."""

    # Set by new_run, the one way runs are made:
    _rid: str | UUID | int
    key: Any
    """Its key in ``Ledger.runs`` and ``Ledger.recent`` (see ``run_key``)."""
    lock: threading.Lock
    started_wall: float
    started_perf: float
    """``time.perf_counter()`` at its start (monotonic)."""

    _text: str | None = None

    @property
    def run_id(self) -> str:
        """The run's id as text (a LangChain run id, a ``UUID`` or its integer, is turned into text when first read,
        usually on the exporter's thread)."""
        text = self._text
        if text is None:
            rid = self._rid
            text = self._text = rid if type(rid) is str else uuid_text(rid) if type(rid) is int else str(rid)
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

    As for ``Run``, the defaults are class attributes, and a span stores only what every end reads (set by
    ``new_span``) and what it sets."""

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
    cap_holds: Any = None
    """Spend caps hook: what this call holds of its tenant's and user's caps while in flight (``SpendCaps.admit``)."""
    pending: tuple[str | None, Later] | None = None
    """A call recorded before its tokens were counted (``Ledger.record_llm``'s or ``record_scoped_llm``'s ``later``):
    the model that served it and its estimate, which ``Ledger.settle`` counts, prices and adds to its run; ``None``
    once it has."""

    # Set by new_span (and, written out, by Ledger.record_scoped_llm):
    _sid: str | UUID | int
    run: Run
    kind: str
    name: str
    start_wall: float
    start_perf: float

    @property
    def span_id(self) -> str:
        """The span's id as text. A LangChain run id (a ``UUID``) is turned into text when first read, which is
        usually on the exporter's thread: ``str(uuid)`` costs the app's thread a fair part of a span."""
        sid = self._sid
        if type(sid) is not str:
            run = self.run
            # a root's id is its run's (made once); an integer is a UUID's (see Ledger.start)
            sid = self._sid = run.run_id if run._rid is sid else uuid_text(sid) if type(sid) is int else str(sid)
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


# Runs and spans are made by these functions, not by ``__init__``: CPython 3.11 calls a class through
# ``type.__call__`` and a fresh interpreter frame, about 470 instructions more per object than a call of a Python
# function, and a model call makes two of them on the application's thread. They also set the fields that every
# end reads, defaults included: CPython 3.11 does not specialise reading a class attribute through an instance
# (about 260 instructions, against 75 to store an instance attribute and 65 to read it). (Measured with callgrind.)


def new_run(run_id: str | UUID | int, key: Any, started_wall: float, started_perf: float) -> Run:
    """A new run named ``run_id`` (its key in ``Ledger.runs``: ``key``), started at these times."""
    run: Run = _new_object(Run)
    run._rid = run_id
    run.key = key
    run.lock = _RUN_LOCKS[next(_lock_turn) & _RUN_LOCK_MASK]
    run.started_wall = started_wall
    run.started_perf = started_perf
    run.cost_nanos = run.input = run.output = 0
    run.by_model = run.aborted = run.tool_seq = run.model_reqs = run.loose_holds = run.caps = None
    return run


def new_span(
    span_id: str | UUID | int, parent: Span | None, run: Run, kind: str, name: str, model: str | None = None,
    provider: str | None = None, prompt: Any = None, prompt_ops: PromptOps | None = None, extra: Any = None,
    max_tokens: int | None = None, start_wall: float | None = None, start_perf: float = 0.0,
) -> Span:
    """A new open span of ``run`` under ``parent`` (``None``: a root of the run), started now or at ``start_wall``
    / ``start_perf`` (a new run's first span starts with its run)."""
    span: Span = _new_object(Span)
    span._sid = span_id
    span.run = run
    span.kind = kind
    span.name = name
    if start_wall is None:
        span.start_wall = time.time()
        span.start_perf = time.perf_counter()
    else:
        span.start_wall = start_wall
        span.start_perf = start_perf
    span.parent = parent
    if parent is None:
        span.is_root = True
        span.depth = 0
    else:
        span.is_root = False
        span.depth = parent.depth + 1
    span.cost_nanos = span.request_sig = None
    span.reserved = 0
    span.cache_hit = span.unpriced = span.estimated = False
    span.exported = True
    if model is not None:
        span.model = model
    if provider is not None:
        span.provider = provider
    if prompt is not None:
        span.prompt = prompt
        span.prompt_ops = prompt_ops
    if extra is not None:
        span.extra = extra
    if max_tokens is not None:
        span.max_tokens = max_tokens
    return span


# The run scope opened by ``CostTracker.run()``; root events inside it attach to its run.
current_scope: ContextVar[Span | None] = ContextVar("costobs_scope", default=None)


_DEFERRED: Any = object()
"""``Span.request_sig`` of a call whose request signature is computed at its end, if it is needed then."""


DECLINED: Any = object()
"""What ``Ledger.admit_scoped_llm`` returns for a call it does not admit (a request signature may be ``None``)."""


_NO_META: Mapping[str, Any] = {}  # read-only


def _usd(nanos: int) -> str:
    """``$0.0021`` for a message: exact, without trailing zeros or an exponent."""
    return "$" + format(Decimal(nanos).scaleb(-9).normalize(), "f")

