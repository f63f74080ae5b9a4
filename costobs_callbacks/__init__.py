"""costobs-callbacks: what your LLM agents cost, while they run; and a stop for runaway ones.

The whole public API is here; every other module is private and may move.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

from ._caps import CapPolicy
from ._events import COST_EVENT
from ._exceptions import (
    BudgetExceededError,
    ConfigurationError,
    LoopDetectedError,
    MissingAttributionError,
    RunAborted,
)
from ._ledger import UNATTRIBUTED, RunCost
from ._policy import Budget, BudgetWarning, LoopPolicy
from ._pricing import PriceBook, UnitPrices
from ._scope import RunScope
from ._store import RollupRow
from ._tracker import CostTracker

if TYPE_CHECKING:
    from .integrations.langchain.agents import CostGuardMiddleware

try:
    __version__ = _version("costobs-callbacks")
except PackageNotFoundError:  # pragma: no cover - running from a checkout without install
    __version__ = "0.0.0"


__all__ = [
    "COST_EVENT",
    "UNATTRIBUTED",
    "Budget",
    "BudgetExceededError",
    "BudgetWarning",
    "CapPolicy",
    "ConfigurationError",
    "CostGuardMiddleware",
    "CostTracker",
    "LoopDetectedError",
    "LoopPolicy",
    "MissingAttributionError",
    "PriceBook",
    "RollupRow",
    "RunAborted",
    "RunCost",
    "RunScope",
    "UnitPrices",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: it needs ``langchain`` (the ``langgraph`` extra), which plain users lack.
    if name == "CostGuardMiddleware":
        from .integrations.langchain.agents import CostGuardMiddleware

        return CostGuardMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
