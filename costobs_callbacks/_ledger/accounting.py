"""The one function that adds an ended call to its run's totals, used by every end path."""

from __future__ import annotations

from typing import Any

from .holds import _give_back
from .model import _DEFERRED, Run, Span


def _account(run: Run, span: Span, cost: int, sig: Any) -> bool:
    """Add one ended span to its run's totals: every end path calls this, under ``run.lock`` (or on a run no other
    thread has seen). What the span held of the budget is given back; its cost goes to the run and to every span
    above it; its tokens to the run (a cache hit's are not spent); for a model call, its count by how it was
    priced, its model's cost (an unpriced model is listed apart, never a silent $0) and, given a signature
    (``sig``), its request, for the loop guard. A root span is counted out of its run's open roots: returns whether
    it was the last one open (``False`` for a span inside a run)."""
    last = False
    if span.is_root:
        run.open_roots -= 1
        last = run.open_roots <= 0
    if span.reserved:
        _give_back(run, span)
    caps = run.caps  # spend caps hook: its holds given back, its cost spent from the tenant's and user's leases
    if caps is not None:
        caps.settle(span, cost)
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
        return last
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
        _count_request(run, sig)
    return last


def _count_request(run: Run, sig: Any) -> None:
    """Count a model request by its signature, for the loop guard's identical-request rule (under ``run.lock``)."""
    reqs = run.model_reqs
    if reqs is None:
        reqs = run.model_reqs = {}
    reqs[sig] = reqs.get(sig, 0) + 1
