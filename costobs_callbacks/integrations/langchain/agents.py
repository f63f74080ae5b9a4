"""``CostGuardMiddleware``: the run's budget and loop guard inside a LangChain 1.x agent (``create_agent``).

The middleware keeps no counts of its own. The tracker's callback handler prices and guards every call
of the run; the middleware reads the same ledger run (found from the node's callback manager) and
decides what the agent does when that run is stopped:

* ``on_limit="raise"``: the ``RunAborted`` reaches the caller of ``invoke`` / ``stream`` (as without the
  middleware, but also when a retry or tool-error layer inside the agent would have swallowed it);
* ``on_limit="end"``: the agent ends normally with a final ``AIMessage`` carrying ``message``, which the
  product can show. No paid call is made after the stop in either case.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse, ToolCallRequest
from langchain_core.callbacks import BaseCallbackManager
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables.config import var_child_runnable_config

from ..._exceptions import ConfigurationError, RunAborted
from ..._ledger import Run, _again, span_key
from ..._policy import Budget, LoopPolicy, coerce_budget, coerce_loops
from .handler import CostCallbackHandler

if TYPE_CHECKING:
    from langgraph.runtime import Runtime
    from langgraph.types import Command

    from ..._tracker import CostTracker

__all__ = ["DEFAULT_LIMIT_MESSAGE", "CostGuardMiddleware"]

logger = logging.getLogger("costobs_callbacks")

DEFAULT_LIMIT_MESSAGE = "This request hit its cost limit."

ModelResult = ModelResponse[Any] | AIMessage


class CostGuardMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Budgets and the loop guard of a ``create_agent`` agent, with a choice of raising or ending politely.

    ``create_agent(model, tools, middleware=[CostGuardMiddleware(tracker, budget=Budget(max_cost_usd=0.5),
    on_limit="end")])``, invoked with ``config=tracker.config(...)`` (the middleware needs the tracker's
    callback handler on the run: it raises ``ConfigurationError`` at the agent's start otherwise).

    Args:
        tracker: the ``CostTracker`` whose handler is on the run.
        budget: the run's ``Budget`` (or a dict of its fields). It replaces the tracker's default budget,
            never a budget the run was given itself (``tracker.config(budget=...)``, the ``costobs_budget``
            metadata, ``tracker.run(budget=...)``). A budget belongs to the root run: an agent called as a
            tool of another agent shares the budget of the outer run.
        loops: the run's ``LoopPolicy`` (or a dict); replaces the tracker's default in the same way.
        on_limit: ``"raise"`` (``BudgetExceededError`` / ``LoopDetectedError`` reach the caller) or
            ``"end"`` (the agent ends with a final ``AIMessage(content=message)``; its
            ``response_metadata["costobs"]`` holds the run id, the reason, the limit and what was spent).
        message: the final message's text, or a function of the ``RunAborted`` that returns it.

    Put it first in ``middleware=[...]`` (outermost), so that it sees a stop before retry or fallback
    middleware does. Those cannot buy another call anyway: every later paid call of a stopped run is refused.
    """

    def __init__(
        self,
        tracker: CostTracker,
        *,
        budget: Budget | Mapping[str, Any] | None = None,
        loops: LoopPolicy | Mapping[str, Any] | None = None,
        on_limit: Literal["raise", "end"] = "raise",
        message: str | Callable[[RunAborted], str] = DEFAULT_LIMIT_MESSAGE,
    ) -> None:
        super().__init__()
        if on_limit not in ("raise", "end"):
            raise ConfigurationError(f"on_limit must be 'raise' or 'end', not {on_limit!r}")
        if not (isinstance(message, str) or callable(message)):
            raise ConfigurationError("message must be a str or a function of the RunAborted returning one")
        self.tracker = tracker
        self.budget = coerce_budget(budget)
        self.loops = coerce_loops(loops)
        self.on_limit = on_limit
        self.message = message
        self._ledger = tracker.ledger

    # -- the run ------------------------------------------------------------------------------------

    def _run(self, config: Mapping[str, Any] | None) -> Run | None:
        """The ledger run of the node that ``config`` belongs to, if the tracker's handler saw it start."""
        cbs = config.get("callbacks") if config else None
        if isinstance(cbs, BaseCallbackManager) and cbs.parent_run_id is not None:
            span = self._ledger.spans.get(span_key(cbs.parent_run_id))
            if span is not None:
                return span.run
        return None

    def _has_handler(self, config: Mapping[str, Any] | None) -> bool:
        cbs = config.get("callbacks") if config else None
        handlers = cbs.handlers if isinstance(cbs, BaseCallbackManager) else (cbs or [])
        return any(isinstance(h, CostCallbackHandler) and h._ledger is self._ledger for h in handlers)

    def _adopt(self) -> None:
        config = var_child_runnable_config.get()
        run = self._run(config)
        if run is None:
            if not self._has_handler(config):
                raise ConfigurationError(
                    "CostGuardMiddleware needs the tracker's LangChain handler on the run: invoke the agent with "
                    "config=tracker.config(...) or config={'callbacks': [tracker.langchain_handler()]}"
                )
            logger.warning("costobs: CostGuardMiddleware found no open run for this agent; not guarding it")
            return
        self._ledger.adopt_policy(run, budget=self.budget, loops=self.loops, graceful=self.on_limit == "end")

    # -- what the agent does when the run is stopped --------------------------------------------------

    def _text(self, err: RunAborted) -> str:
        return self.message(err) if callable(self.message) else self.message

    def _final_message(self, err: RunAborted) -> AIMessage:
        facts = {
            "run_id": str(err.run_id),
            "reason": err.reason,
            "limit": None if err.limit is None else str(err.limit),
            "spent": None if err.spent is None else str(err.spent),
            "spent_usd": None if err.spent_usd is None else str(err.spent_usd),
            "error": str(err),
        }
        return AIMessage(content=self._text(err), response_metadata={"costobs": facts})

    def _tool_message(self, request: ToolCallRequest, err: RunAborted) -> ToolMessage:
        call = request.tool_call
        return ToolMessage(content=f"Not run: {err}", tool_call_id=call["id"], name=call["name"], status="error")

    # -- hooks ----------------------------------------------------------------------------------------

    def before_agent(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        self._adopt()
        return None

    async def abefore_agent(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        self._adopt()
        return None

    def wrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], ModelResponse[Any]]
    ) -> ModelResult:
        run = self._run(var_child_runnable_config.get())
        if run is not None and run.aborted is not None:
            return self._stopped(run.aborted)
        try:
            response = handler(request)
        except RunAborted as err:
            if self.on_limit == "raise":
                raise
            return self._final_message(err)
        if run is not None and run.aborted is not None:  # an inner middleware turned the stop into a reply
            return self._stopped(run.aborted)
        return response

    async def awrap_model_call(
        self, request: ModelRequest[Any], handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]
    ) -> ModelResult:
        run = self._run(var_child_runnable_config.get())
        if run is not None and run.aborted is not None:
            return self._stopped(run.aborted)
        try:
            response = await handler(request)
        except RunAborted as err:
            if self.on_limit == "raise":
                raise
            return self._final_message(err)
        if run is not None and run.aborted is not None:
            return self._stopped(run.aborted)
        return response

    def wrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]]
    ) -> ToolMessage | Command[Any]:
        run = self._run(request.runtime.config if request.runtime is not None else None)
        if run is not None and run.aborted is not None and self.on_limit == "end":
            return self._tool_message(request, run.aborted)
        try:
            return handler(request)
        except RunAborted as err:
            if self.on_limit == "raise":
                raise
            return self._tool_message(request, err)  # the next model call ends the agent

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]]
    ) -> ToolMessage | Command[Any]:
        run = self._run(request.runtime.config if request.runtime is not None else None)
        if run is not None and run.aborted is not None and self.on_limit == "end":
            return self._tool_message(request, run.aborted)
        try:
            return await handler(request)
        except RunAborted as err:
            if self.on_limit == "raise":
                raise
            return self._tool_message(request, err)

    def _stopped(self, err: RunAborted) -> AIMessage:
        """The run was stopped before this model call: end the agent, or raise the stop again."""
        if self.on_limit == "raise":
            raise _again(err)
        return self._final_message(err)

    def __repr__(self) -> str:
        return f"CostGuardMiddleware(budget={self.budget!r}, loops={self.loops!r}, on_limit={self.on_limit!r})"
