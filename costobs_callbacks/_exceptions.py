"""Exceptions raised by costobs-callbacks.

The tree::

    ConfigurationError (ValueError)      bad arguments at the edge: a price file, a ``by`` key
    RunAborted (RuntimeError)            a run was stopped on purpose; the only error that reaches the app
     +-- BudgetExceededError             a limit of the run's ``Budget`` would be / was passed
     +-- LoopDetectedError               the loop guard saw a runaway pattern
     +-- MissingAttributionError         a root run lacks an attribution key listed in ``require``

Why ``RunAborted`` derives from ``RuntimeError``: LangGraph's ``RetryPolicy`` retries every
``Exception`` except a fixed list of programming errors, ``RuntimeError`` among them, so an abort is
never retried into another paid call. LangGraph's ``ToolNode(handle_tool_errors=True)`` does turn it into
a ``ToolMessage``; aborts are therefore *sticky*: once a run is aborted, every later start event of its
tree (the next LLM call above all) raises again before anything is sent, so the abort still reaches the
caller of ``invoke``. It is an ``Exception`` (not a ``BaseException``) so that a web app's generic error
handling keeps working.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

__all__ = [
    "BudgetExceededError",
    "ConfigurationError",
    "LoopDetectedError",
    "MissingAttributionError",
    "RunAborted",
]


class ConfigurationError(ValueError):
    """A bad argument or configuration file given to costobs-callbacks."""


class RunAborted(RuntimeError):
    """A run was stopped on purpose by costobs-callbacks.

    Attributes:
        run_id: the root run that was stopped.
        reason: a short machine-readable reason (``"max_cost_usd"``, ``"tool_repeat"``, ...).
        limit: the limit that was hit, if any.
        spent: what the run had consumed for that limit when it was stopped.
        spent_usd: the run's recorded cost when it was stopped (``None`` if nothing priced yet).
        detail: extra facts (the repeated call, the estimate of a refused call, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: Any = None,
        reason: str = "aborted",
        limit: Any = None,
        spent: Any = None,
        spent_usd: Decimal | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.run_id = run_id
        self.reason = reason
        self.limit = limit
        self.spent = spent
        self.spent_usd = spent_usd
        self.detail = dict(detail or {})

    def __reduce__(self) -> Any:  # keep pickling (multiprocessing, Celery) working
        return (
            _rebuild,
            (type(self), self.message, self.run_id, self.reason, self.limit, self.spent, self.spent_usd, self.detail),
        )


def _rebuild(cls: type[RunAborted], message: str, run_id: Any, reason: str, limit: Any, spent: Any,
             spent_usd: Decimal | None, detail: dict[str, Any]) -> RunAborted:
    return cls(message, run_id=run_id, reason=reason, limit=limit, spent=spent, spent_usd=spent_usd, detail=detail)


class BudgetExceededError(RunAborted):
    """A run's budget would be, or was, exceeded."""


class LoopDetectedError(RunAborted):
    """The loop guard saw a runaway pattern (repeated calls, a cycle, too deep or too many steps)."""


class MissingAttributionError(RunAborted):
    """A root run lacks an attribution key the tracker was told to ``require``."""
