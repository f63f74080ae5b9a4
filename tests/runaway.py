"""Runaway agents for the budget, loop-guard and middleware tests: the real ``ChatOpenAI`` over HTTP to the
stub server, inside real LangGraph graphs. The stub plays a model that never stops calling tools.

Prices are chosen so that every figure is easy to check by hand: model ``m-1`` costs $1 per million input
tokens and $10 per million output tokens, so a call the stub reports as 100 in / 20 out costs exactly
$0.0003 (``CALL_USD``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
from langchain_core.messages import BaseMessage
from langchain_core.tools import BaseTool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import RetryPolicy

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-1"
PRICES: dict[str, dict[str, str]] = {MODEL: {"input": "1", "output": "10"}}
USAGE = StubUsage(100, 20)
CALL_USD = Decimal("0.0003")
"""The cost of one call the stub reports as ``USAGE``: 100 x $1/M + 20 x $10/M."""

MODES = ("invoke", "stream", "ainvoke", "astream")
"""How a test drives a graph: sync, sync streaming (``stream_mode="messages"``), async, async streaming."""


def chat(stub: StubOpenAI, **kw: Any) -> ChatOpenAI:
    """A real ``ChatOpenAI`` talking to the stub. A fresh async HTTP client each time: langchain-openai caches
    one per base URL across event loops, and a kept-alive connection from a closed loop fails in the next."""
    kw.setdefault("http_async_client", httpx.AsyncClient(timeout=30))
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0, stream_usage=True, **kw)


def calls_tool(name: str, args: Callable[[], dict[str, Any]], usage: StubUsage = USAGE) -> Callable[[Any], StubReply]:
    """A stub responder: every reply calls tool ``name`` with ``args()``."""
    return lambda req: StubReply("", tool_calls=[(name, args())], usage=usage)


def new_args() -> Callable[[], dict[str, Any]]:
    """Arguments that differ every turn (``{"q": "q0"}``, ``{"q": "q1"}``, ...): no loop to detect."""
    n = itertools.count()
    return lambda: {"q": f"q{next(n)}"}


def tool_loop_graph(
    llm: ChatOpenAI, tools: list[BaseTool], *, handle_tool_errors: bool = False, retry: RetryPolicy | None = None
) -> Any:
    """The classic agent loop as a hand-built ``StateGraph``: model -> tools -> model ..., with LangGraph's
    own ``ToolNode`` (optionally turning tool exceptions into messages) and an optional node ``RetryPolicy``."""
    bound = llm.bind_tools(tools)

    def model(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [bound.invoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("model", model, retry_policy=retry)
    g.add_node("tools", ToolNode(tools, handle_tool_errors=handle_tool_errors), retry_policy=retry)
    g.add_edge(START, "model")
    g.add_conditional_edges("model", tools_condition)
    g.add_edge("tools", "model")
    return g.compile()


RETRY_EVERYTHING = RetryPolicy(max_attempts=4, initial_interval=0.0, jitter=False, retry_on=lambda exc: True)
"""A node retry policy that retries any exception, a stop included: it still buys no paid call."""

GRAPH_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "handle_tool_errors": {"handle_tool_errors": True},
    "retry_policy": {"retry": RETRY_EVERYTHING},
}


def drive(mode: str, graph: Any, text: str, config: Any) -> dict[str, Any] | None:
    """Run ``graph`` on one user message the way ``mode`` says; the final state (``None`` when streaming)."""
    inputs = {"messages": [("user", text)]}
    if mode == "invoke":
        return graph.invoke(inputs, config=config)  # type: ignore[no-any-return]
    if mode == "stream":
        for _ in graph.stream(inputs, config=config, stream_mode="messages"):
            pass
        return None
    if mode == "ainvoke":
        return asyncio.run(graph.ainvoke(inputs, config=config))  # type: ignore[no-any-return]
    if mode == "astream":

        async def consume() -> None:
            async for _ in graph.astream(inputs, config=config, stream_mode="messages"):
                pass

        asyncio.run(consume())
        return None
    raise ValueError(mode)
