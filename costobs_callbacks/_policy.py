"""User-facing policy models: ``Budget`` and ``LoopPolicy`` (pydantic, validated at the edge)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._exceptions import ConfigurationError

__all__ = ["Budget", "BudgetWarning", "LoopPolicy", "coerce_budget", "coerce_loops"]


class Budget(BaseModel):
    """Limits for one root run and its whole tree. ``None`` means "no limit".

    A limit is checked *before* each call (a call that would pass it is refused) and *after* each
    call (a run past any limit is aborted). ``warn_at`` is the fraction of any limit at which the
    tracker's ``on_budget_warning`` hook is called, once per limit per run.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_cost_usd: Decimal | None = Field(default=None, description="USD the run may spend.")
    max_tokens: int | None = Field(default=None, description="Input plus output tokens over all LLM calls.")
    max_llm_calls: int | None = Field(default=None, description="LLM (and embedding) calls.")
    max_tool_calls: int | None = Field(default=None, description="Tool calls; 0 forbids tools.")
    max_seconds: float | None = Field(default=None, description="Wall-clock seconds since the run started.")
    warn_at: float = Field(default=0.8, description="Fraction of a limit that triggers the warning hook.")

    @field_validator("max_cost_usd", mode="before")
    @classmethod
    def _cost(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool):
            raise ValueError("must be a number of USD, not a bool")
        try:
            d = v if isinstance(v, Decimal) else Decimal(str(v))
        except Exception as exc:
            raise ValueError(f"not a number: {v!r}") from exc
        if not d.is_finite():
            raise ValueError("must be finite (NaN and infinity are not limits)")
        if d <= 0:
            raise ValueError("must be > 0 (a zero or negative budget allows nothing)")
        return d

    @field_validator("max_tokens", "max_llm_calls", "max_tool_calls", "max_seconds", "warn_at", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic would take True for 1
            raise ValueError("must be a number, not a bool")
        return v

    @field_validator("max_tokens", "max_llm_calls")
    @classmethod
    def _positive_int(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("max_tool_calls")
    @classmethod
    def _non_negative_int(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("max_seconds")
    @classmethod
    def _seconds(cls, v: float | None) -> float | None:
        if v is not None and (math.isnan(v) or math.isinf(v) or v <= 0):
            raise ValueError("must be a finite number > 0")
        return v

    @field_validator("warn_at")
    @classmethod
    def _warn_at(cls, v: float) -> float:
        if math.isnan(v) or not 0 < v <= 1:
            raise ValueError("must be in (0, 1]")
        return v

    def is_empty(self) -> bool:
        return (
            self.max_cost_usd is None
            and self.max_tokens is None
            and self.max_llm_calls is None
            and self.max_tool_calls is None
            and self.max_seconds is None
        )


class LoopPolicy(BaseModel):
    """The loop guard's thresholds. On by default; ``LoopPolicy(enabled=False)`` turns it off.

    Defaults, from prior art:

    * ``max_identical_tool_calls=4``: the 4th consecutive call of the same tool with the same
      (canonicalised) arguments is refused. OpenHands stops at 4 identical action/observation pairs;
      Gemini CLI at 5 identical consecutive tool calls; OpenRouter's agent SDK blocks at 3. Four lets
      a legitimate poll-and-retry pattern through twice while a stuck agent pays for three
      wasted calls at most.
    * ``max_identical_model_requests=3``: a third model request identical (model and messages) to
      two that already succeeded is refused: a deterministic agent asked the same thing twice will
      answer the same thing again (OpenRouter's threshold of 3).
    * ``cycle_repeats=3`` over periods up to ``max_cycle_period=3``: A-B-A-B-A-B (OpenHands' pattern
      over 6 steps) and A-B-C repeated three times.
    * ``max_depth=48``: run-tree depth. A ``create_agent`` agent uses 3 levels (graph, node, model or
      tool call) and each agent called as a tool of another adds 3 more, so 48 lets 15 agents nest
      (subgraphs, chains inside tools and ``tracker.run()`` add a level or two each) and stops an
      agent that calls itself without end after 16 model calls, long before Python's own limit.
    * ``max_steps=250``: LLM plus tool calls in one root run, a hard cap far below LangGraph's
      recursion limit (10,000 steps) and far above what a healthy agent needs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    max_identical_tool_calls: int | None = Field(default=4, ge=2, strict=True)
    max_identical_model_requests: int | None = Field(default=3, ge=2, strict=True)
    cycle_repeats: int | None = Field(default=3, ge=2, strict=True)
    max_cycle_period: int = Field(default=3, ge=2, le=8, strict=True)
    max_depth: int | None = Field(default=48, ge=1, strict=True)
    max_steps: int | None = Field(default=250, ge=1, strict=True)


@dataclass(frozen=True, slots=True)
class BudgetWarning:
    """Passed to ``CostTracker(on_budget_warning=...)`` when a run reaches ``warn_at`` of a limit."""

    run_id: str
    limit_name: str
    limit: Any
    spent: Any
    attributes: Mapping[str, Any]


BudgetHook = Callable[[BudgetWarning], None]


def _validation_message(kind: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or kind
        parts.append(f"{loc}: {err.get('msg')}")
    return f"invalid {kind}: " + "; ".join(parts)


def coerce_budget(value: Any) -> Budget | None:
    """A ``Budget``, a mapping of its fields, or ``None``; raises ``ConfigurationError`` otherwise."""
    if value is None or isinstance(value, Budget):
        return value
    if isinstance(value, Mapping):
        try:
            return Budget.model_validate(dict(value))
        except ValidationError as exc:
            raise ConfigurationError(_validation_message("Budget", exc)) from None
    raise ConfigurationError(f"budget must be a Budget or a dict, not {type(value).__name__}")


def coerce_loops(value: Any) -> LoopPolicy | None:
    if value is None or isinstance(value, LoopPolicy):
        return value
    if isinstance(value, Mapping):
        try:
            return LoopPolicy.model_validate(dict(value))
        except ValidationError as exc:
            raise ConfigurationError(_validation_message("LoopPolicy", exc)) from None
    raise ConfigurationError(f"loops must be a LoopPolicy or a dict, not {type(value).__name__}")
