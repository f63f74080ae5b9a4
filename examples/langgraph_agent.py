"""A LangGraph agent with tools, its cost attributed across the whole run tree.

    pip install "costobs-callbacks[examples]"     # from a checkout of the repository: pip install ".[examples]"
    python examples/langgraph_agent.py

Offline with a fake model that plans two tool calls and reports usage; with OPENAI_API_KEY set, it uses
gpt-4o-mini (through langchain-openai, which the ``examples`` extra installs). A span without a cost of its own
(a chain step, a tool without a price) shows "-": it adds nothing, it is not a $0 price.
"""

from __future__ import annotations

import os
import tempfile

from langchain_core.tools import tool
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from costobs_callbacks import CostTracker
from costobs_callbacks.testing import FakeChatModel


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"Sunny in {city}, 21 C"


@tool
def get_time(city: str) -> str:
    """Local time in a city."""
    return f"It is 14:05 in {city}"


def make_model():  # type: ignore[no-untyped-def]
    if os.environ.get("OPENAI_API_KEY"):
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="gpt-4o-mini")
    return FakeChatModel(model_name="gpt-4o-mini",
                         tool_plan=[("get_weather", {"city": "Lisbon"}), ("get_time", {"city": "Lisbon"})])


def build_agent():  # type: ignore[no-untyped-def]
    """The classic tool-calling loop as a LangGraph graph: the model, then its tool calls, until it answers."""
    tools = [get_weather, get_time]
    model = make_model().bind_tools(tools)

    def call_model(state: MessagesState) -> dict:  # type: ignore[type-arg]
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", call_model)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile()


def main() -> None:
    db = os.path.join(tempfile.mkdtemp(), "costobs.db")
    with CostTracker(f"sqlite:///{db}", tool_prices={"get_weather": 0.002}) as tracker:
        agent = build_agent()
        cfg = tracker.config(feature="travel-assistant", user_id="u-7", tenant_id="globex", route="/chat")
        result = agent.invoke({"messages": [("user", "Weather and time in Lisbon?")]}, config=cfg)
        print(result["messages"][-1].content[:80])

        cost = tracker.run_cost(cfg["run_id"])
        assert cost is not None
        print(f"\nrun cost ${cost.cost_usd}: {cost.llm_calls} LLM calls, {cost.tool_calls} tool calls, "
              f"{cost.input_tokens} input / {cost.output_tokens} output tokens")
        print("\nthe run tree, as stored:")
        for span in tracker.spans(cfg["run_id"]):
            own = span["cost_nanos"]  # None: no cost of its own (a chain step, a tool without a price)
            own_text = "-" if own is None else f"${own / 1e9:.6f}"
            print(f"  {span['kind']:<6} {span['name'][:28]:<28} own {own_text:>9}  "
                  f"subtree ${span['tree_cost_nanos'] / 1e9:.6f}")


if __name__ == "__main__":
    main()
