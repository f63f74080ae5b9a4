"""Spend the app records itself (``CostTracker.record_usage`` / ``record_cost``): a call no framework saw (a direct
SDK call, a paid API, a batch job) or an import of history, added to the ledger as one finished span.

A record is a whole call at once: its span opens and ends here, at the moment it says (``at`` backdates it), and
joins its run as a root of it, as a second invocation of a ``tracker.config()`` does, so that every total, live and
stored, is made by the same code as a framework call's (``_account``, the exporter, the store's upsert). Nothing
is refused: the spend already happened. Arguments arrive checked (``CostTracker`` validates them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.utils.uuid import uuid7

from .._exceptions import ConfigurationError, RunAborted
from .accounting import _account
from .attribution import _copy_attribution, _present
from .model import Run, RunCost, Tokens, new_run, new_span, run_key

if TYPE_CHECKING:
    from .._pricing import UnitPrices
    from .core import Ledger

__all__ = ["record"]


MANUAL_FLAG = "manual"
"""The flag of every recorded span: audits tell what the app recorded from what a framework reported."""

_FLAGS = (MANUAL_FLAG,)


def record(
    ledger: Ledger,
    *,
    run_id: str | None,
    meta: Mapping[str, Any],
    kind: str,
    name: str,
    wall: float,
    model: str | None = None,
    provider: str | None = None,
    tokens: Tokens | None = None,
    priced: tuple[int, UnitPrices] | None = None,
    cost_nanos: int = 0,
) -> RunCost:
    """Record one finished span of ``kind`` (``"llm"``: ``tokens`` priced as ``priced``, ``None`` for no price;
    ``"tool"``: exactly ``cost_nanos``) started and ended at ``wall`` (epoch seconds), in run ``run_id`` (``None``:
    a new run) attributed by ``meta``; returns the run's live totals as this process holds them.

    Raises ``ConfigurationError`` before anything is recorded if the record would start a run without an attribution
    key the tracker requires."""
    # New ids as UUIDv7 integers, turned into text on the exporter's thread (see Run.run_id, Span.span_id).
    run = _join(ledger, run_id if run_id is not None else uuid7().int, meta, wall)
    span = new_span(uuid7().int, None, run, kind, name, model, provider, start_wall=wall,
                    start_perf=time.perf_counter())
    span.end_wall = wall
    span.status = "ok"
    span.flags = _FLAGS
    if kind == "tool":
        cost = cost_nanos
        span.cost_nanos = span.tree_cost = cost
    else:
        span.tokens = tokens
        if priced is None:  # flagged and listed apart, never a silent $0
            cost = 0
            span.unpriced = True
        else:
            cost, span.prices = priced
            span.cost_nanos = span.tree_cost = cost
    if ledger.caps is not None:  # spend caps hook: a record counts toward its tenant's and user's caps
        ledger.caps.bind(run)
    with run.lock:
        run.steps += 1
        if kind == "tool":
            run.tool_calls += 1
        else:
            run.llm_calls += 1
        last = _account(run, span, cost, None)
    if last:
        # a run continued after its end keeps its latest end (a backdated record does not move it back)
        ledger._close_run(run, max(wall, run.ended_wall), "ok")
    elif run.budget is not None and run.aborted is None:
        # The run goes on (a call in flight, a tracker.run() block): what was recorded counts against its budget,
        # and the abort, if it is past it, refuses the run's next call. The record itself is never refused.
        try:
            ledger._check_after(run, span)
        except RunAborted:
            pass
    ledger.exporter.emit(span)  # after the close: the store reads the run's status from it
    return run.snapshot()


def _join(ledger: Ledger, run_id: str | int, meta: Mapping[str, Any], wall: float) -> Run:
    """The run a record goes to, with the record counted in its ``open_roots``: one open in this process (its
    attribution kept), one ended here and remembered (reopened; attributed as the record says, if it says
    anything), else a new one (a run stored by another process, or ended long ago, grows in the store by what is
    added here, as for a ``tracker.config(run_id=...)`` reused)."""
    key = run_key(run_id)
    # a framework's own id (LlamaIndex's) is keyed as its text; a new run's id is new
    alt = str(UUID(int=key)) if type(key) is int and type(run_id) is not int else None

    def held(d: Mapping[Any, Run]) -> Any:
        if key in d:
            return key
        return alt if alt is not None and alt in d else None

    fresh: Run | None = None
    while True:
        # Attribution is work, done outside the lock, and only when it is used: for a new run, or a remembered
        # one the record re-attributes (a run open here keeps its own).
        if fresh is None and held(ledger.runs) is None and (meta or held(ledger.recent) is None):
            _check_required(ledger, meta)
            fresh = new_run(run_id, key, wall, time.perf_counter())
            ledger._attribute(fresh, meta, None)
        with ledger._runs_lock:
            k = held(ledger.runs)
            if k is not None:
                run = ledger.runs[k]
                with run.lock:
                    run.open_roots += 1
                return run
            k = held(ledger.recent)
            if k is not None and (fresh is not None or not meta):
                prev = ledger.recent.pop(k)
                with prev.lock:
                    if fresh is not None and meta:
                        _copy_attribution(fresh, prev)
                    prev.status = "running"
                    prev.open_roots += 1
                ledger.runs[k] = prev
                return prev
            if k is None and fresh is not None:
                fresh.open_roots = 1
                ledger.runs[key] = fresh
                return fresh
        # the run changed state since it was looked up (ended, or forgotten): look again


def _check_required(ledger: Ledger, meta: Mapping[str, Any]) -> None:
    for k in ledger.require:
        if not _present(meta.get(k)):
            raise ConfigurationError(
                f"{k} is required: this tracker was made with require={ledger.require!r}, and a record that "
                f"starts or re-attributes a run must carry every key in it; pass {k}=...")
