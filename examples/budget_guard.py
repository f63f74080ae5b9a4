"""A runaway agent, stopped: by its cost budget, by the loop guard, and politely by the agent middleware.

Runs offline with no API key: the model is a local fake that behaves like a stuck agent (it never stops
calling its search tool) and reports token usage the way a real provider does. Everything else is real:
LangChain's ``create_agent`` (a LangGraph graph), the tracker's callback handler, a SQLite database.

    pip install "costobs-callbacks[examples]"     # from a checkout of the repository: pip install ".[examples]"
    python examples/budget_guard.py

On stderr, LangChain logs "Error in CostCallbackHandler... callback: BudgetExceededError(...)" as it
re-raises each stop: that line is the stop, not a bug.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

from costobs_callbacks import Budget, BudgetExceededError, CostGuardMiddleware, CostTracker, LoopDetectedError

MODEL = "demo-model"
PRICES = {MODEL: {"input": 3, "output": 15}}  # USD per million tokens


class RunawayModel(BaseChatModel):
    """A chat model that asks for one more search every turn, forever. ``same_query=True``: always the same one.

    Each reply reports ``usage_metadata`` (the context grows by 600 tokens a turn, 150 tokens out) and its
    model name, as provider integrations do; the tracker prices the call from those.
    """

    model_name: str = MODEL
    same_query: bool = False
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "runaway-demo"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def bind_tools(self, tools: Any, **kwargs: Any) -> RunawayModel:  # type: ignore[override]
        return self  # it knows its one tool already

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self.calls += 1
        query = "cheapest flights to Lisbon" if self.same_query else f"cheapest flights to Lisbon, page {self.calls}"
        reply = AIMessage(
            content="",
            tool_calls=[{"name": "web_search", "args": {"query": query}, "id": f"call_{self.calls}"}],
            usage_metadata={"input_tokens": 600 * len(messages), "output_tokens": 150,
                            "total_tokens": 600 * len(messages) + 150},
            response_metadata={"model_name": self.model_name},
        )
        return ChatResult(generations=[ChatGeneration(message=reply)])


@tool
def web_search(query: str) -> str:
    """Search the web."""
    return f"10 results for {query!r}, none of them conclusive"


def main() -> None:
    db = Path(tempfile.mkdtemp()) / "costs.db"
    with CostTracker(f"sqlite:///{db}", prices=PRICES, user_salt="demo") as tracker:
        question = {"messages": [("user", "Find me the cheapest flight to Lisbon")]}

        print("1. A cost budget: the agent keeps searching with new queries.")
        model = RunawayModel()
        agent = create_agent(model, [web_search])
        cfg = tracker.config(feature="travel-agent", user_id="u-42", budget=Budget(max_cost_usd=0.05))
        try:
            agent.invoke(question, config=cfg)
        except BudgetExceededError as e:
            print(f"   stopped: {e}")
            print(f"   limit={e.limit} spent={e.spent_usd} reason={e.reason}")
        rc = tracker.run_cost(cfg["run_id"])
        assert rc is not None
        print(f"   the model was called {model.calls} times; recorded: ${rc.cost_usd} over {rc.llm_calls} calls, "
              f"status={rc.status}, reason={rc.reason}")
        print("   (the call that crossed the limit was paid for, so it is in the total; its estimate before it was "
              "sent, the prompt's tokens with no max_tokens set, still fit the budget)\n")

        print("2. The loop guard (on by default): the agent repeats the very same search.")
        model = RunawayModel(same_query=True)
        agent = create_agent(model, [web_search])
        cfg = tracker.config(feature="travel-agent")
        try:
            agent.invoke(question, config=cfg)
        except LoopDetectedError as e:
            print(f"   stopped: {e}")
        rc = tracker.run_cost(cfg["run_id"])
        assert rc is not None
        print(f"   the model was called {model.calls} times; recorded: ${rc.cost_usd}, status={rc.status}\n")

        print("3. The agent middleware ends the agent politely instead of raising.")
        model = RunawayModel()
        guard = CostGuardMiddleware(tracker, budget=Budget(max_cost_usd=0.05), on_limit="end",
                                    message="Sorry, this request hit its cost limit. Try a narrower question.")
        agent = create_agent(model, [web_search], middleware=[guard])
        cfg = tracker.config(feature="travel-agent")
        out = agent.invoke(question, config=cfg)
        final = out["messages"][-1]
        print(f"   the user sees: {final.content!r}")
        print(f"   the product can log: {final.response_metadata['costobs']['reason']}, "
              f"run {final.response_metadata['costobs']['run_id']}")
        rc = tracker.run_cost(cfg["run_id"])
        assert rc is not None
        print(f"   the model was called {model.calls} times; recorded: ${rc.cost_usd}, status={rc.status}")


if __name__ == "__main__":
    main()
