"""Open run trees: attribution, live totals, guards, budget holds. Framework-free.

The data flow, module by module: ``model`` (runs, spans, ids) -> ``attribution`` (who a run is for, its policy)
-> ``guards`` (every threshold) and ``holds`` (budget reservations of calls in flight) -> ``accounting`` (the one
function adding an ended call to its run) -> ``core`` (``Ledger``: the events, in order).
"""

from .accounting import _account
from .attribution import (
    BUDGET_META_KEY,
    LOOPS_META_KEY,
    coerce_budget_quiet,
    coerce_loops_quiet,
    salt_from,
    user_hash,
)
from .core import Ledger
from .guards import _again, canonical_args
from .holds import DEFAULT_OUTPUT_HOLD
from .model import (
    _DEFERRED,
    ATTRIBUTION_KEYS,
    COST_KINDS,
    UNATTRIBUTED,
    Exporter,
    PromptOps,
    Run,
    RunCost,
    Span,
    Tokens,
    current_scope,
    max_output_tokens,
    run_key,
    run_text,
    span_key,
    tokens_of,
)

__all__ = [
    "ATTRIBUTION_KEYS", "BUDGET_META_KEY", "COST_KINDS", "DEFAULT_OUTPUT_HOLD", "LOOPS_META_KEY", "UNATTRIBUTED",
    "Exporter", "Ledger", "PromptOps", "Run", "RunCost", "Span", "Tokens", "_DEFERRED", "_account", "_again",
    "canonical_args", "coerce_budget_quiet", "coerce_loops_quiet", "current_scope", "max_output_tokens", "run_key",
    "run_text", "salt_from", "span_key", "tokens_of", "user_hash",
]
