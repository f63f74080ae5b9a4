"""Every shortcut of the ledger gives what its general path gives, for the same random calls.

The ledger keeps short paths for the commonest events (a model call opening a new run, a model end with its usage
at a known price, a lone call recorded whole at its end, the remembered attribution of a run); each is fed here,
beside the general path it shortcuts, the same random calls (catalog models with tiers and per-request fees,
user prices with many decimals, unknown models, odd token counts, budgets at their boundaries), and both must
export the same spans, keep the same run totals and take the same decisions.

The ledger is driven directly (it is framework-free); its exporter is a list, the prices a real ``PriceBook``.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from langchain_core.messages import HumanMessage, SystemMessage

from costobs_callbacks import Budget, BudgetExceededError, LoopPolicy, RunAborted
from costobs_callbacks._events import TokenUsage, UsageDetail
from costobs_callbacks._ledger import _DEFERRED, Ledger, Run, Span
from costobs_callbacks._ledger.attribution import _FIRST_CHECKED, _first_call
from costobs_callbacks._ledger.model import uuid_text
from costobs_callbacks._pricing import PriceBook
from costobs_callbacks._store.rows import _pg_micros, _sqlite_dt, _utc
from costobs_callbacks.integrations.langchain import MESSAGES

OVERRIDE = "m-fast"
MODELS = [
    (OVERRIDE, None),
    ("gpt-4o-mini", "openai"),  # one rate: the flat shortcut
    ("gemini-2.5-pro", "google"),  # tiered above 200k input tokens
    ("sonar", "perplexity"),  # a per-request fee
    ("claude-sonnet-4-0", "anthropic"),  # cache writes
    ("no-such-model-xyz", None),  # unpriced
]

settings.register_profile("fast-paths", deadline=None, max_examples=150,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("fast-paths")


class Collect:
    """The exporter's place: what the ledger hands over, kept in order."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def emit(self, item: Any) -> None:
        self.items.append(item)


def book(price_in: Decimal, price_out: Decimal) -> PriceBook:
    return PriceBook({OVERRIDE: {"input": price_in, "output": price_out, "cache_read": price_in / 10}})


def ledger(prices: PriceBook, **kw: Any) -> tuple[Ledger, Collect]:
    out = Collect()
    return Ledger(prices=prices, exporter=out, user_salt=b"salt", **kw), out


def span_view(sp: Span) -> tuple[Any, ...]:
    return (sp.span_id, sp.kind, sp.name, sp.model, sp.provider, sp.tokens, sp.cost_nanos, sp.tree_cost, sp.unpriced,
            sp.estimated, sp.cache_hit, tuple(sorted(sp.flags or ())), sp.status, sp.error, sp.prices, sp.is_root,
            sp.exported, sp.run.run_id, sp.detail, sp.reserved, sp.request_sig is _DEFERRED, every_field(sp))


_MISSING = object()
_SPAN_FIELDS = sorted({*(k for c in Span.__mro__ for k in getattr(c, "__annotations__", {})),
                       *(k for k, v in vars(Span).items() if not k.startswith("__") and not callable(v)
                         and not isinstance(v, property))})
_NOT_COMPARED = {"start_wall", "start_perf", "end_wall", "latency_ms",  # times
                 "_sid", "run", "parent",  # compared as ids (span_view, and the parent's id below)
                 "prompt", "prompt_ops", "extra", "max_tokens", "request_sig"}  # the request: kept by some paths only


def every_field(sp: Span) -> tuple[Any, ...]:
    """Every other field a span has, read as the exporter and the ledger read them (a class default where the
    instance set none): a fast path that makes spans by hand (``record_llm``, ``record_scoped_llm``) and misses a
    field ``new_span`` sets shows here, whatever the field."""
    parent = sp.parent
    out: list[Any] = [("parent", None if parent is None else parent.span_id)]
    for k in _SPAN_FIELDS:
        if k in _NOT_COMPARED:
            continue
        v = getattr(sp, k, _MISSING)
        out.append((k, "<missing>" if v is _MISSING else v if k != "flags" else tuple(sorted(v or ()))))
    return tuple(out)


def item_view(it: Any) -> tuple[Any, ...]:
    if isinstance(it, Span):
        return ("span", *span_view(it))
    assert isinstance(it, Run)
    return ("run", it.run_id, it.status, it.aborted.reason if it.aborted is not None else None)


def run_view(lg: Ledger, rid: Any) -> Any:
    run = lg.runs.get(rid.int) or lg.recent.get(rid.int)
    return None if run is None else run.snapshot()


tokens_st = st.tuples(
    st.integers(0, 400_000), st.integers(0, 20_000), st.integers(0, 50_000), st.integers(0, 10_000),
    st.integers(0, 25_000),
)
prices_st = st.decimals(min_value=Decimal("0"), max_value=Decimal("90"), places=9, allow_nan=False)
messages_st = st.lists(st.text(max_size=40), min_size=1, max_size=4)


def prompt_of(texts: list[str]) -> list[list[Any]]:
    return [[SystemMessage("be brief"), *(HumanMessage(t) for t in texts)]]


def _decline(*args: Any) -> None:
    return None


def start_call(lg: Ledger, rid: uuid.UUID, parent: uuid.UUID | None, model: str, provider: str | None,
               texts: list[str], max_tokens: int | None, meta: dict[str, Any] | None, general: bool,
               run_id: uuid.UUID | None = None) -> Any:
    """Start a model call ``rid`` (its run named ``run_id``, default ``rid``); ``general``: with the new-run shortcut
    declining every call, so that the general path takes it (``_start_new_llm_run`` says ``None`` whenever it
    cannot take a call)."""
    ip: dict[str, Any] = {"model": model}
    if max_tokens:
        ip["max_tokens"] = max_tokens
    extra = (ip, meta or {})
    if general:
        lg._start_new_llm_run = _decline  # type: ignore[method-assign]
    try:
        lg.start_llm(rid, parent, "ChatX", meta, model, provider, prompt_of(texts), MESSAGES, extra, run_id=run_id)
    except RunAborted as exc:
        return (type(exc).__name__, exc.reason, exc.detail.get("estimate_usd") if exc.detail else None)
    return "started"


details_st = st.none() | st.builds(UsageDetail, st.integers(0, 5_000), st.sampled_from([None, "flex", "priority"]),
                                     st.integers(0, 3))
flags_st = st.sampled_from([(), ("estimated",), ("malformed_usage", "estimated")])


def reported_model(model: str, served: str | None) -> str | None:
    return None if served is None else model if served == "same" else model + "-2024-01-01"


@given(model_i=st.integers(0, len(MODELS) - 1), tokens=tokens_st, served=st.sampled_from([None, "same", "other"]),
       p_in=prices_st, p_out=prices_st, texts=messages_st, feature=st.sampled_from([None, "search", "x" * 300]),
       nested=st.booleans(), limit=st.sampled_from([None, "0.000001", "0.01", "5"]), estimated=st.booleans(),
       flags=flags_st, detail=details_st)
def test_a_model_end_gives_the_same_spans_and_totals_on_both_paths(
    model_i: int, tokens: tuple[int, int, int, int, int], served: str | None, p_in: Decimal, p_out: Decimal,
    texts: list[str], feature: str | None, nested: bool, limit: str | None, estimated: bool,
    flags: tuple[str, ...], detail: UsageDetail | None,
) -> None:
    """``end_llm`` (its short path for a priced call) and ``end`` (``_finish``, the general path) of one call: a root
    call (its run ends with it) or a call inside a chain (the check after a call may stop its run), with or without
    a budget, a provider's usage detail, flags, an estimate."""
    model, provider = MODELS[model_i]
    reported = reported_model(model, served)
    meta: dict[str, Any] = {"feature": feature} if feature else {}
    if limit is not None:
        meta["costobs_budget"] = {"max_cost_usd": limit}
    views = []
    for path in ("end_llm", "end"):
        lg, out = ledger(book(p_in, p_out))
        rid, root = uuid.UUID(int=12345), uuid.UUID(int=54321)
        if nested:
            lg.start_span(root, None, "chain", "agent", meta or None)
        started = start_call(lg, rid, root if nested else None, model, provider, texts, None, meta or None, False)
        decision: Any = None
        if started == "started":
            try:
                if path == "end_llm":
                    lg.end_llm(rid.int, tokens, reported, estimated, flags, detail)
                else:
                    lg.end(rid, "ok", None, TokenUsage(*tokens), reported, estimated, False, flags, detail)
            except RunAborted as exc:
                decision = (type(exc).__name__, exc.reason)
        if nested:
            lg.end(root)
        views.append((started, decision, [item_view(i) for i in out.items], run_view(lg, root if nested else rid),
                      lg.largest_output))
    assert views[0] == views[1]


@given(model_i=st.integers(0, len(MODELS) - 1), tokens=tokens_st, p_in=prices_st, p_out=prices_st,
       served=st.sampled_from([None, "same", "other"]), estimated=st.booleans(), flags=flags_st, detail=details_st,
       run_id=st.sampled_from([None, uuid.UUID(int=99).int, "run-1"]))
def test_a_lone_call_recorded_whole_equals_its_start_and_end(
    model_i: int, tokens: tuple[int, int, int, int, int], p_in: Decimal, p_out: Decimal, served: str | None,
    estimated: bool, flags: tuple[str, ...], detail: UsageDetail | None, run_id: Any,
) -> None:
    """``record_llm`` against ``start_llm`` + ``end_llm``, the run named by the call's key or by a ``run_id`` of
    its own (a UUID's integer, as LlamaIndex's roots are named, or a text)."""
    model, provider = MODELS[model_i]
    reported = reported_model(model, served)
    prices = book(p_in, p_out)
    a, out_a = ledger(prices)
    assert a.lone_calls
    key = "lone-1"
    t0, p0 = time.time(), time.perf_counter()
    a.record_llm(key, "ChatX", model, provider, t0, p0, tokens, reported, estimated, flags, detail, run_id)
    b, out_b = ledger(prices)
    b.start_llm(key, None, "ChatX", None, model, provider, run_id=run_id)
    b.end_llm(key, tokens, reported, estimated, flags, detail)

    def view(lg: Ledger, out: Collect) -> Any:
        run = lg.recent_run(key if run_id is None else run_id)
        assert run is not None and not lg.runs and not lg.spans
        return [item_view(i) for i in out.items], run.snapshot(), lg.largest_output

    assert view(a, out_a) == view(b, out_b)


@given(model_i=st.integers(0, len(MODELS) - 1), tokens=tokens_st, exact=st.booleans(),
       served=st.sampled_from([None, "same", "other"]), room=st.booleans(),
       settled_by=st.sampled_from(["exporter", "reader"]), fails=st.booleans())
def test_a_lone_call_counted_later_equals_one_counted_at_its_end(
    model_i: int, tokens: tuple[int, int, int, int, int], exact: bool, served: str | None, room: bool,
    settled_by: str, fails: bool,
) -> None:
    """``record_llm`` given ``later`` (its count left to ``settle``, or made at once when the exporter has no room)
    against ``record_llm`` given the tokens and estimate flags, or, for an estimate that fails, the general end of a
    call whose payload could not be read. Settled by the exporter (``settle`` with what it was handed) or by a reader
    (``recent_run``) first: the same spans, run and largest outputs."""
    from costobs_callbacks._tokens import ESTIMATED, ESTIMATED_CHARS

    model, provider = MODELS[model_i]
    reported = reported_model(model, served)
    prices = book(Decimal("3"), Decimal("7"))
    rid = uuid.UUID(int=99).int
    t0, p0 = time.time(), time.perf_counter()
    a, out_a = ledger(prices)
    if fails:
        a.start_llm("lone-1", None, "ChatX", None, model, provider, run_id=rid)
        a.end("lone-1", "ok", None, None, reported, False, False, ("internal_error",))
    else:
        a.record_llm("lone-1", "ChatX", model, provider, t0, p0, tokens, reported, True,
                     ESTIMATED if exact else ESTIMATED_CHARS, None, rid)
    b, out_b = ledger(prices)
    b.room_for_later = lambda: room
    later = (failing_estimate,) if fails else (estimate_of, tokens, exact)
    b.record_llm("lone-1", "ChatX", model, provider, t0, p0, None, reported, True, (), None, rid, later)
    assert [it.pending is not None for it in out_b.items] == [room]
    if settled_by == "exporter":
        b.settle(list(out_b.items))

    def view(lg: Ledger, out: Collect) -> Any:
        run = lg.recent_run(rid)
        assert run is not None and not run.pending and not lg.runs and not lg.spans
        return [item_view(i) for i in out.items], run.snapshot(), lg.largest_output, run.open_roots

    assert view(a, out_a) == view(b, out_b)
    assert b.internal_errors == (1 if fails else 0)


budget_st = st.one_of(
    st.none(),
    st.builds(lambda c, n, t: {"max_cost_usd": c, "max_llm_calls": n, "max_tokens": t},
              st.sampled_from([None, "0.000001", "0.01", "5"]), st.sampled_from([None, 1, 3]),
              st.sampled_from([None, 10, 100_000])),
)
loops_st = st.sampled_from([None, {"max_identical_model_requests": 2}, {"max_steps": 1}, {"max_depth": 0},
                            {"max_identical_model_requests": 1}])


def spy_on_shortcut(lg: Ledger, took: list[bool]) -> Any:
    """``lg._start_new_llm_run``, noting in ``took`` whether each call of it opened the span (or refused it)."""
    shortcut = lg._start_new_llm_run

    def spy(*args: Any) -> Any:
        try:
            span = shortcut(*args)
        except RunAborted:
            took.append(True)
            raise
        took.append(span is not None)
        return span

    return spy


def policy_meta(budget: dict[str, Any] | None, loops: dict[str, Any] | None) -> dict[str, Any]:
    """A config's metadata with a drawn budget (its set fields, else a $5 cap) and loop policy."""
    meta: dict[str, Any] = {"feature": "f"}
    if budget is not None:
        meta["costobs_budget"] = {k: v for k, v in budget.items() if v is not None} or {"max_cost_usd": "5"}
    if loops is not None:
        meta["costobs_loops"] = loops
    return meta


@given(model_i=st.integers(0, len(MODELS) - 1), texts=messages_st, max_tokens=st.sampled_from([None, 1, 50, 4000]),
       budget=budget_st, loops=loops_st, tokens=tokens_st, calls=st.integers(1, 4), overlap=st.booleans(),
       named=st.booleans())
def test_a_new_runs_first_call_takes_the_same_decisions_on_the_shortcut_and_the_general_path(
    model_i: int, texts: list[str], max_tokens: int | None, budget: dict[str, Any] | None,
    loops: dict[str, Any] | None, tokens: tuple[int, int, int, int, int], calls: int, overlap: bool, named: bool,
) -> None:
    """A model invoked directly opens its run through ``_start_new_llm_run`` unless the policy needs the full
    checks; the general path (``open_run`` and ``_guard_start``) takes what the shortcut declines.
    ``overlap``: the invocations of the config overlap (all start, then all end), as threads sharing it do;
    ``named``: the run has an id of its own (``run_id``, as LlamaIndex's roots), else the call's id names it."""
    model, provider = MODELS[model_i]
    meta = policy_meta(budget, loops)
    views = []
    for general in (False, True):
        lg, out = ledger(book(Decimal("2"), Decimal("8")))
        took: list[bool] = []  # per call that tried the shortcut: whether it opened the span
        if not general:
            lg._start_new_llm_run = spy_on_shortcut(lg, took)  # type: ignore[method-assign]
        rid = uuid.UUID(int=777)
        run_id = uuid.UUID(int=778) if named else None
        decisions = []
        started = 0
        for _ in range(calls):  # the same config again: the run continues
            d = start_call(lg, rid, None, model, provider, texts, max_tokens, meta, general, run_id)
            decisions.append(d)
            if d == "started":
                if overlap:
                    started += 1
                else:
                    lg.end_llm(rid.int, tokens, None)
        for _ in range(started - 1):
            lg.end_llm(rid.int, tokens, None)
        # once more, after the others (while the last of overlapping ones is still in flight)
        decisions.append(start_call(lg, rid, None, model, provider, texts, max_tokens, meta, general, run_id))
        while rid.int in lg.spans:
            lg.end_llm(rid.int, tokens, None)
        views.append((decisions, [item_view(i) for i in out.items], run_view(lg, run_id or rid)))
        run = lg.runs.get((run_id or rid).int) or lg.recent.get((run_id or rid).int)
        if named:
            assert run is None or run.run_id == str(run_id)
        if not general and run is not None:
            # the first call opened the run on the shortcut whenever its policy allows it, and only then
            assert took[0] == (_first_call(run.budget, run.loops) != _FIRST_CHECKED)
    assert views[0] == views[1]


scoped_loops_st = st.sampled_from([None, {"enabled": False}, {"max_identical_model_requests": 2},
                                   {"max_identical_model_requests": 3}, {"max_identical_model_requests": None},
                                   {"max_steps": 1}, {"max_steps": 3}, {"max_depth": 1}, {"max_depth": 2}])


@given(model_i=st.integers(0, len(MODELS) - 1), requests=st.lists(st.sampled_from(["a", "b", "c"]), max_size=7),
       budget=budget_st, loops=scoped_loops_st, tokens=tokens_st, depth=st.integers(0, 1),
       ends=st.lists(st.booleans(), min_size=7, max_size=7), same_id=st.booleans(),
       opened=st.lists(st.booleans(), min_size=7, max_size=7), served=st.sampled_from([None, "same", "other"]),
       estimated=st.booleans(), flags=flags_st, detail=details_st)
def test_a_model_call_in_a_run_scope_takes_the_same_decisions_on_the_shortcut_and_the_general_path(
    model_i: int, requests: list[str], budget: dict[str, Any] | None, loops: dict[str, Any] | None,
    tokens: tuple[int, int, int, int, int], depth: int, ends: list[bool], same_id: bool, opened: list[bool],
    served: str | None, estimated: bool, flags: tuple[str, ...], detail: UsageDetail | None,
) -> None:
    """A model call with no parent span inside a ``tracker.run()`` scope opens through ``_start_scoped_llm`` when
    ``admit_scoped_llm`` admits it (only the loop guard applies and lets it through; spend caps, like a budget, make
    it decline: tests/test_caps.py checks capped calls in a scope); ``_start`` (the general path, what ``start_llm``
    takes when the shortcut declines) is fed the same calls, and so is the LlamaIndex adapter's way: admitted at its
    start, then recorded whole at its end (``record_scoped_llm``), or its span opened in flight (``open_admitted``:
    a span opened inside it, an end that is not ``record_scoped_llm``'s) and ended (``end_llm``); a declined call
    opens by ``start_llm``. Requests repeat (the identical-request rule), the scope sits at a depth (the depth
    limit), calls end or stay in flight (the step limit counts both), an id may be reused while its first call is in
    flight; the spans, run totals and decisions must be the same."""
    from costobs_callbacks._ledger import DECLINED, current_scope

    model, provider = MODELS[model_i]
    reported = reported_model(model, served)
    meta = policy_meta(budget, loops)
    views = []
    for path in ("shortcut", "general", "admitted"):
        lg, out = ledger(book(Decimal("2"), Decimal("8")))
        took: list[bool] = []
        shortcut = lg._start_scoped_llm

        def spy(*args: Any, _shortcut: Any = shortcut, _took: list[bool] = took) -> Any:
            span = _shortcut(*args)
            _took.append(span is not None)
            return span

        lg._start_scoped_llm = spy  # type: ignore[method-assign]
        root = uuid.UUID(int=5)
        scope = lg.start_span(root, None, "run", "run", meta, root=True)
        parent = root
        for i in range(depth):  # the scope as a chain's child: deeper in its tree
            scope = lg.start_span(uuid.UUID(int=10 + i), parent, "chain", "c")
            parent = uuid.UUID(int=10 + i)
        token = current_scope.set(scope)
        decisions: list[Any] = []
        in_flight: list[str] = []
        # per id, its calls in flight, oldest first: (sig, start_wall, start_perf) if admitted and not opened, else
        # None. An end under an id ends its oldest call, as end_llm does with the spans open under one id.
        admitted: dict[str, list[Any]] = {}

        def end(sid: str, _lg: Ledger = lg, _scope: Span = scope, _admitted: dict[str, list[Any]] = admitted) -> None:
            oldest = _admitted[sid].pop(0)
            if oldest is not None:
                sig, t0, p0 = oldest
                _lg.record_scoped_llm(_scope, sid, "ChatX", model, provider, t0, p0, sig, tokens, reported, estimated,
                                      flags, detail)
            else:
                _lg.end_llm(sid, tokens, reported, estimated, flags, detail)

        try:
            for i, text in enumerate(requests):
                sid = f"call-{0 if same_id else i}"
                prompt = prompt_of([text])
                record: Any = None
                try:
                    if path == "general":
                        lg._start(sid, None, "llm", "ChatX", None, False, None, None, True, model, provider, prompt,
                                  MESSAGES, ({"model": model}, {}), None)
                    elif path == "admitted":
                        sig = lg.admit_scoped_llm(scope, model, prompt, MESSAGES)
                        if sig is DECLINED:
                            lg.start_llm(sid, None, "ChatX", None, model, provider, prompt, MESSAGES,
                                         ({"model": model}, {}), None)
                        elif opened[i]:
                            lg.open_admitted(scope, sid, "ChatX", model, provider, time.time(), time.perf_counter(),
                                             sig)
                        else:
                            record = (sig, time.time(), time.perf_counter())
                    else:
                        lg.start_llm(sid, None, "ChatX", None, model, provider, prompt, MESSAGES,
                                     ({"model": model}, {}), None)
                except RunAborted as exc:
                    decisions.append((type(exc).__name__, exc.reason))
                    continue
                decisions.append("started")
                admitted.setdefault(sid, []).append(record)
                if ends[i]:
                    try:
                        end(sid)
                    except RunAborted as exc:
                        decisions.append(("after", type(exc).__name__, exc.reason))
                else:
                    in_flight.append(sid)
            for sid in in_flight:
                try:
                    end(sid)
                except RunAborted:
                    pass
        finally:
            current_scope.reset(token)
        views.append((decisions, [item_view(i) for i in out.items], run_view(lg, root), lg.runs.get(root.int) and
                      dict(lg.runs[root.int].model_reqs or {}), lg.largest_output, len(lg.spans)))
        if path != "shortcut":
            assert not took or path == "admitted"
        elif budget is not None:
            assert not any(took)  # a budget: always the general path
    assert views[0] == views[1] == views[2]


def estimate_of(tokens: tuple[int, int, int, int, int], exact: bool) -> tuple[tuple[int, int, int, int, int], bool]:
    """A call's token estimate, as ``Later`` carries one (a function and its arguments)."""
    return tokens, exact


def failing_estimate() -> Any:
    raise ValueError("no estimate")


@given(model_i=st.integers(0, len(MODELS) - 1),
       calls=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), tokens_st, st.booleans(),
                                st.sampled_from([None, "same", "other"]), st.sampled_from(["none", "read", "settle"])),
                      max_size=6),
       loops=scoped_loops_st, room=st.sampled_from(["always", "never", "alternate"]),
       adopt_at=st.sampled_from([None, 0, 2]), fail_at=st.sampled_from([None, 1]))
@example(model_i=0, calls=[("a", (10, 5, 0, 0, 0), True, None, "none")] * 3, loops=None, room="always", adopt_at=None,
         fail_at=None)
def test_a_call_counted_later_equals_one_counted_at_its_end(
    model_i: int, calls: list[tuple[str, tuple[int, int, int, int, int], bool, str | None, str]],
    loops: dict[str, Any] | None, room: str, adopt_at: int | None, fail_at: int | None,
) -> None:
    """``record_scoped_llm`` given ``later`` (a call that reported no usage, its estimate left to ``settle``) against
    the same calls given their tokens and estimate flags at once. Between calls the run's totals are read
    (``run_cost``, which settles what is pending first) or the exporter settles what it holds; a budget may be adopted
    midway (``adopt_policy``: settled first, and no call is left for later after it); the exporter may have no room
    (counted at once). Every live read, every exported item (the scope's root span with its tree cost included), the
    run's totals, its request counts and the largest outputs must be the same. An estimate that fails is recorded as
    an end whose payload could not be read."""
    from costobs_callbacks._ledger import DECLINED, current_scope
    from costobs_callbacks._tokens import ESTIMATED, ESTIMATED_CHARS

    model, provider = MODELS[model_i]
    meta = policy_meta(None, loops)
    views = []
    for path in ("now", "later"):
        lg, out = ledger(book(Decimal("2"), Decimal("8")))
        if path == "later":
            flips = iter(range(1_000))
            lg.room_for_later = (lambda: True) if room == "always" else (lambda: False) if room == "never" else (
                lambda _flips=flips: next(_flips) % 2 == 0)
        root = uuid.UUID(int=5)
        scope = lg.start_span(root, None, "run", "run", meta, root=True)
        token = current_scope.set(scope)
        seen: list[Any] = []
        failures = 0
        try:
            for i, (text, tokens, exact, served, then) in enumerate(calls):
                if adopt_at == i:
                    lg.adopt_policy(lg.runs[root.int], budget=Budget(max_cost_usd=Decimal("1000")))
                try:
                    sig = lg.admit_scoped_llm(scope, model, prompt_of([text]), MESSAGES)
                    if sig is DECLINED:
                        lg.start_llm(f"c{i}", None, "ChatX", None, model, provider, prompt_of([text]), MESSAGES,
                                     ({"model": model}, {}), None)
                        lg.end_llm(f"c{i}", tokens, reported_model(model, served), True,
                                   ESTIMATED if exact else ESTIMATED_CHARS)
                    else:
                        t0, p0 = time.time(), time.perf_counter()
                        if fail_at == i:
                            if path == "later":  # counted now or later, as the exporter has room
                                failures += 1
                                lg.record_scoped_llm(scope, f"c{i}", "ChatX", model, provider, t0, p0, sig, None,
                                                     reported_model(model, served), True, (), None,
                                                     (failing_estimate,))
                            else:  # what the adapter does with an end it cannot read: no usage, flagged
                                sp = lg.open_admitted(scope, f"c{i}", "ChatX", model, provider, t0, p0, sig)
                                sp.flags = ("internal_error",)
                                lg.end(f"c{i}", "ok", None, None, reported_model(model, served), False, False,
                                       ("internal_error",))
                        elif path == "now":
                            lg.record_scoped_llm(scope, f"c{i}", "ChatX", model, provider, t0, p0, sig, tokens,
                                                 reported_model(model, served), True,
                                                 ESTIMATED if exact else ESTIMATED_CHARS)
                        else:
                            lg.record_scoped_llm(scope, f"c{i}", "ChatX", model, provider, t0, p0, sig, None,
                                                 reported_model(model, served), True, (), None,
                                                 (estimate_of, tokens, exact))
                    seen.append("ok")
                except RunAborted as exc:
                    seen.append((type(exc).__name__, exc.reason))
                if then == "read":
                    seen.append(lg.run_cost(root))
                elif then == "settle":
                    lg.settle(list(out.items))
        finally:
            current_scope.reset(token)
        lg.end(root, "ok")
        lg.settle(list(out.items))  # the exporter, before it writes them
        run = lg.recent.get(root.int) or lg.runs[root.int]
        assert not run.pending
        views.append((seen, [item_view(it) for it in out.items], run.snapshot(), dict(run.model_reqs or {}),
                      dict(lg.largest_output), lg.internal_errors))
    assert views[0][:-1] == views[1][:-1]
    assert views[1][-1] == failures  # the estimate that failed, counted


@given(texts=messages_st, max_tokens=st.sampled_from([1, 50, 4000]), delta=st.sampled_from([-1, 0, 1]),
       general=st.booleans(), model_i=st.sampled_from([0, 1, 2, 3]))
def test_a_call_whose_estimate_exactly_fills_what_is_left_is_let_through(
    texts: list[str], max_tokens: int, delta: int, general: bool, model_i: int,
) -> None:
    """``max_cost_usd`` is "at most": an estimate equal to what is left fits, one nano-dollar more does not."""
    model, provider = MODELS[model_i]
    prices = book(Decimal("2.5"), Decimal("10"))
    n, _ = MESSAGES.count_tokens(model, prompt_of(texts), ({"model": model}, {}))
    estimate = prices.estimate_nanos(model, provider, n, max_tokens)
    assert estimate is not None
    limit = Decimal(estimate + delta).scaleb(-9)
    if limit <= 0:
        return
    lg, _ = ledger(prices)
    rid = uuid.uuid4()
    got = start_call(lg, rid, None, model, provider, texts, max_tokens,
                     {"costobs_budget": {"max_cost_usd": str(limit)}}, general)
    if delta >= 0:
        assert got == "started"
        assert lg.spans[rid.int].reserved == estimate
    else:
        assert got == ("BudgetExceededError", "max_cost_usd", Decimal(estimate).scaleb(-9))


@pytest.mark.parametrize("over", [0, 1])
def test_a_run_that_spends_exactly_its_budget_is_not_aborted(over: int) -> None:
    """After a call, a run is stopped only once it has spent more than ``max_cost_usd``."""
    prices = book(Decimal("1"), Decimal("1"))
    lg, _ = ledger(prices)
    root = uuid.uuid4()
    child = uuid.uuid4()
    # 1,000 + 1,000 tokens at $1/M: $0.002; the child's estimate (its prompt, max_tokens=1) fits below that.
    meta = {"costobs_budget": {"max_cost_usd": str(Decimal(2_000_000 - over).scaleb(-9))}}
    lg.start_span(root, None, "chain", "agent", meta)
    assert start_call(lg, child, root, OVERRIDE, None, ["hi"], 1, None, False) == "started"
    if over:
        with pytest.raises(BudgetExceededError) as err:
            lg.end_llm(child.int, (1000, 1000, 0, 0, 0), OVERRIDE)
        assert err.value.reason == "max_cost_usd"
    else:
        lg.end_llm(child.int, (1000, 1000, 0, 0, 0), OVERRIDE)
    run = lg.runs[root.int]
    assert (run.cost_nanos, run.status) == (2_000_000, "aborted" if over else "running")


def test_the_live_by_model_adds_repeated_calls_of_one_model() -> None:
    prices = book(Decimal("1"), Decimal("2"))
    lg, _ = ledger(prices)
    root = uuid.uuid4()
    lg.start_span(root, None, "chain", "agent")
    for i, end in enumerate(("end_llm", "end", "end_llm")):
        sid = uuid.uuid4()
        start_call(lg, sid, root, OVERRIDE, None, [f"q{i}"], None, None, False)
        if end == "end_llm":
            lg.end_llm(sid.int, (100, 10, 0, 0, 0), OVERRIDE)
        else:
            lg.end(sid, "ok", None, TokenUsage(100, 10), OVERRIDE)
    sid = uuid.uuid4()
    start_call(lg, sid, root, "gpt-4o-mini", "openai", ["other"], None, None, False)
    lg.end_llm(sid.int, (1000, 0, 0, 0, 0), "gpt-4o-mini")
    live = lg.run_cost(root)
    assert live is not None
    assert live.by_model == {OVERRIDE: Decimal("0.00036"), "gpt-4o-mini": Decimal("0.00015")}
    assert live.cost_usd == Decimal("0.00051")


@given(texts=messages_st, feature=st.sampled_from(["a", "b", None]), tenant=st.sampled_from(["t1", None]),
       extra=st.sampled_from([{}, {"tier": "gold"}, {"n": 3}, {"x": 1.5}, {"flag": True}]))
def test_the_remembered_attribution_equals_working_it_out(
    texts: list[str], feature: str | None, tenant: str | None, extra: dict[str, Any]
) -> None:
    """The second run with the same metadata is attributed from the memo; a fresh ledger works it out."""
    meta: dict[str, Any] = {"feature": feature, "tenant_id": tenant, "user_id": "u-1", **extra}
    warm, _ = ledger(book(Decimal(1), Decimal(1)))
    warm.open_run("first", meta)
    a = warm.open_run("second", meta)[0]
    cold, _ = ledger(book(Decimal(1), Decimal(1)))
    b = cold.open_run("second", meta)[0]
    assert a.public_attributes() == b.public_attributes()
    assert (a.budget, a.loops, a.max_cost_nanos) == (b.budget, b.loops, b.max_cost_nanos)


def test_budget_and_loops_from_objects_and_dicts_agree() -> None:
    lg, _ = ledger(book(Decimal(1), Decimal(1)))
    a = lg.open_run("a", {"costobs_budget": Budget(max_cost_usd="0.5"), "costobs_loops": LoopPolicy(max_steps=3)})[0]
    b = lg.open_run("b", {"costobs_budget": {"max_cost_usd": "0.5"}, "costobs_loops": {"max_steps": 3}})[0]
    assert (a.budget, a.loops, a.max_cost_nanos) == (b.budget, b.loops, b.max_cost_nanos) == (
        Budget(max_cost_usd="0.5"), LoopPolicy(max_steps=3), 500_000_000)


# -- the LangChain handler's model starts ---------------------------------------------------------------------

name_st = st.one_of(st.none(), st.text(max_size=8), st.integers(0, 3))
serialized_st = st.one_of(st.none(), st.fixed_dictionaries({}, optional={"name": name_st,
                                                                        "id": st.lists(st.text(max_size=5))}))
ip_st = st.fixed_dictionaries({}, optional={"model": name_st, "model_name": name_st, "_type": name_st,
                                            "max_tokens": st.sampled_from([None, 0, 7])})
meta_st = st.one_of(st.none(), st.fixed_dictionaries({}, optional={"ls_model_name": name_st, "ls_provider": name_st,
                                                                   "feature": st.sampled_from(["a", "b"])}))


@given(serialized=serialized_st, ip=ip_st, meta=meta_st, kw_name=name_st, texts=messages_st)
def test_the_chat_model_start_reads_a_call_as_the_general_model_start_does(
    serialized: dict[str, Any] | None, ip: dict[str, Any], meta: dict[str, Any] | None, kw_name: Any,
    texts: list[str],
) -> None:
    """``on_chat_model_start`` reads the call's name, model and provider inline (the hottest hook); ``_model_start``
    is the same reading for every other model start (``on_llm_start``)."""
    from costobs_callbacks.integrations.langchain import CostCallbackHandler

    views = []
    for general in (False, True):
        lg, out = ledger(book(Decimal(1), Decimal(1)))
        handler = CostCallbackHandler(lg)
        rid = uuid.UUID(int=99)
        kwargs: dict[str, Any] = {"invocation_params": ip}
        if kw_name is not None:
            kwargs["name"] = kw_name
        if general:
            handler._model_start(serialized, prompt_of(texts), MESSAGES, rid, None, meta, kwargs)
        else:
            handler.on_chat_model_start(serialized, prompt_of(texts), run_id=rid, metadata=meta, **kwargs)
        lg.end_llm(rid.int, (5, 5, 0, 0, 0), None)
        assert handler.internal_errors == 0
        views.append([item_view(i) for i in out.items])
    assert views[0] == views[1]


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_an_ids_text_is_the_uuid_modules(n: int) -> None:
    """``uuid_text``, the exporter's way of writing an id, gives ``str(UUID(int=n))`` for every 128-bit integer."""
    assert uuid_text(n) == str(uuid.UUID(int=n))


@given(st.one_of(st.floats(min_value=-62_135_596_800.0, max_value=253_402_300_799.0, allow_nan=False),
                 st.integers(min_value=-62_135_596_800, max_value=253_402_300_799)))
@example(1_700_000_000.0078125)  # 7,812.5 µs: a tie, rounded to even
@example(1_700_000_000.9999995)  # rounds up into the next second
def test_a_times_sqlite_text_and_postgresql_micros_are_its_datetimes(ts: float) -> None:
    """The write paths' own forms of a time (SQLite's text, PostgreSQL's binary microseconds) hold the time
    ``datetime.fromtimestamp`` makes of it, rounding included, as SQLAlchemy Core writes it on the portable path.
    (Times are floats from ``time.time()``, or whole seconds.)"""
    try:
        dt = _utc(ts)
    except (ValueError, OverflowError, OSError):
        return  # a time datetime cannot hold: the fast paths need not either
    assert _sqlite_dt(ts) == dt.strftime("%Y-%m-%d %H:%M:%S.%f")
    assert _pg_micros(ts) == (dt - datetime(2000, 1, 1)) // timedelta(microseconds=1)
