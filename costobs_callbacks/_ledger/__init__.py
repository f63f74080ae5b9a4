"""Open run trees: attribution, live totals, guards, budget holds. Framework-free.

The data flow, module by module: ``model`` (runs, spans, ids) -> ``attribution`` (who a run is for, its policy)
-> ``guards`` (every threshold) and ``holds`` (budget reservations of calls in flight) -> ``accounting`` (the one
function adding an ended call to its run) -> ``core`` (``Ledger``: the events, in order).
"""

from .attribution import BUDGET_META_KEY, LOOPS_META_KEY, salt_from, user_hash
from .core import Ledger
from .guards import _again
from .model import (
    _DEFERRED,
    DECLINED,
    UNATTRIBUTED,
    Later,
    Run,
    RunCost,
    Span,
    Tokens,
    current_scope,
    new_run,
    new_span,
    run_text,
    span_key,
    tokens_of,
)

__all__ = [
    "BUDGET_META_KEY", "DECLINED", "LOOPS_META_KEY", "UNATTRIBUTED", "Later", "Ledger", "Run", "RunCost", "Span",
    "Tokens", "_DEFERRED", "_again", "current_scope", "new_run", "new_span", "run_text", "salt_from", "span_key",
    "tokens_of", "user_hash",
]
