"""``costobs demo``: a small simulated multi-feature, multi-tenant agent workload, fully offline.

A local fake chat model (no network, no API key) answers like a real provider would: it reports
usage (cached and reasoning tokens included) and the served model name, and it asks for tools.
Everything else is the real thing: langchain-core runnables and tools, the real callback handler,
the real price catalog, budgets, the loop guard and the SQLite store.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from langchain_core.callbacks import dispatch_custom_event
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.uuid import uuid7

from ._events import nanos_to_usd
from ._exceptions import RunAborted
from ._format import key_text, table, usd
from ._policy import Budget
from ._tracker import CostTracker

__all__ = ["DemoChatModel", "run_demo"]


class DemoChatModel(BaseChatModel):
    """A deterministic offline chat model that reports usage like a provider does.

    ``script`` decides each reply from the conversation: a list of tool calls or a final answer.
    """

    model_name: str = "gpt-4o-mini"
    provider: str = "openai"
    cached_fraction: float = 0.0
    reasoning_tokens: int = 0
    tool_plan: list[tuple[str, dict[str, Any]]] = []
    loop_forever: bool = False

    @property
    def _llm_type(self) -> str:
        return "costobs-demo"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = self.provider
        params["ls_model_name"] = self.model_name
        return params

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        return self.bind(tools=[getattr(t, "name", str(t)) for t in tools], **kwargs)

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        prompt_chars = sum(len(str(m.content)) for m in messages) + 40 * len(kwargs.get("tools") or ())
        inp = max(8, prompt_chars // 4)
        done_tools = sum(1 for m in messages if isinstance(m, ToolMessage))
        if self.loop_forever:
            name, args = self.tool_plan[0]
            msg = AIMessage(content="", tool_calls=[{"name": name, "args": {**args, "page": done_tools},
                                                     "id": f"call_{done_tools}"}])
        elif done_tools < len(self.tool_plan):
            name, args = self.tool_plan[done_tools]
            msg = AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call_{done_tools}"}])
        else:
            last = str(messages[-1].content)
            msg = AIMessage(content=f"Here is what I found about {last[:40]}... " * 3)
        out = max(4, len(str(msg.content)) // 4 + 12 * len(msg.tool_calls)) + self.reasoning_tokens
        cached = int(inp * self.cached_fraction)
        msg.usage_metadata = {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": inp + out,
            "input_token_details": {"cache_read": cached},
            "output_token_details": {"reasoning": self.reasoning_tokens},
        }
        msg.response_metadata = {"model_name": self.model_name}
        return ChatResult(generations=[ChatGeneration(message=msg)])


@tool
def search_kb(query: str) -> str:
    """Search the support knowledge base."""
    return f"3 articles match {query!r}"


@tool
def web_search(query: str, page: int = 0) -> str:
    """Search the web (a paid API: reports its own cost)."""
    dispatch_custom_event("costobs.cost", {"usd": "0.005"})
    return f"results page {page} for {query!r}"


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order in the shop's database."""
    return f"order {order_id}: shipped"


TOOLS: dict[str, BaseTool] = {t.name: t for t in (search_kb, web_search, lookup_order)}


def make_agent(model: DemoChatModel) -> RunnableLambda[dict[str, Any], str]:
    """A minimal tool-calling agent loop built from langchain-core runnables alone."""
    bound = model.bind_tools(list(TOOLS.values()))

    def agent(inputs: dict[str, Any], config: RunnableConfig) -> str:
        messages: list[BaseMessage] = [SystemMessage("You are a helpful agent."), HumanMessage(inputs["question"])]
        for _ in range(50):
            reply = bound.invoke(messages, config=config)
            messages.append(reply)
            if not reply.tool_calls:
                return str(reply.content)
            for call in reply.tool_calls:
                result = TOOLS[call["name"]].invoke(call["args"], config=config)
                messages.append(ToolMessage(str(result), tool_call_id=call["id"] or ""))
        return "gave up"

    return RunnableLambda(agent, name="agent")


FEATURES: list[tuple[str, DemoChatModel, float]] = [
    ("support-chat", DemoChatModel(model_name="gpt-4o-mini", cached_fraction=0.5,
                                   tool_plan=[("search_kb", {"query": "refund policy"})]), 0.45),
    ("order-status", DemoChatModel(model_name="gpt-4.1-mini", tool_plan=[("lookup_order", {"order_id": "A-17"})]),
     0.25),
    ("summarize", DemoChatModel(model_name="gpt-4o"), 0.15),
    ("research-agent", DemoChatModel(model_name="o3-mini", reasoning_tokens=256,
                                     tool_plan=[("web_search", {"query": "market size"}),
                                                ("web_search", {"query": "competitors"})]), 0.10),
    ("legal-review", DemoChatModel(model_name="acme-legal-ft-v2", provider="acme"), 0.05),
]
TENANTS = ["acme", "globex", "initech", "umbrella"]


def _workload(rng: random.Random, runs: int) -> Iterator[tuple[str, DemoChatModel, str, str]]:
    names = [f[0] for f in FEATURES]
    weights = [f[2] for f in FEATURES]
    models = {f[0]: f[1] for f in FEATURES}
    for i in range(runs):
        feat = rng.choices(names, weights)[0]
        yield feat, models[feat], rng.choice(TENANTS), f"user-{rng.randrange(40)}-{i % 7}"


def run_demo(tracker: CostTracker, *, runs: int = 200, seed: int = 7, out: Any = print) -> dict[str, Any]:
    """Drive the simulated workload through ``tracker`` and print the cost report."""
    rng = random.Random(seed)
    handler = tracker.langchain_handler()
    aborted: list[RunAborted] = []
    for feat, model, tenant, user in _workload(rng, runs):
        agent = make_agent(model)
        cfg = tracker.config(feature=feat, tenant_id=tenant, user_id=user, prompt_version="v3")
        agent.invoke({"question": f"{feat} question from {tenant} #{rng.randrange(1000)} " * rng.randint(1, 30)},
                     config=cfg)
    # Calls made without attribution land in an explicit bucket.
    make_agent(FEATURES[2][1]).invoke({"question": "untagged call"}, config=RunnableConfig(callbacks=[handler]))
    # A runaway research agent: it keeps paging through search results until its budget stops it.
    runaway = DemoChatModel(model_name="o3-mini", reasoning_tokens=512, loop_forever=True,
                            tool_plan=[("web_search", {"query": "everything"})])
    runaway_id = uuid7()
    # LangChain logs a warning "Error in CostCallbackHandler..." as it re-raises a handler's exception: here that is
    # the stop the report prints, so it is not repeated on stderr as if something had gone wrong
    lc_log = logging.getLogger("langchain_core.callbacks.manager")
    lc_log.addFilter(_not_a_stop)
    try:
        make_agent(runaway).invoke(
            {"question": "research everything"},
            config=tracker.config(feature="research-agent", tenant_id="acme", user_id="user-1",
                                  budget=Budget(max_cost_usd=Decimal("0.05")), run_id=runaway_id),
        )
    except RunAborted as exc:
        aborted.append(exc)
    finally:
        lc_log.removeFilter(_not_a_stop)
    tracker.flush()
    result = print_report(tracker, out=out, aborted=aborted, runaway_id=str(runaway_id))
    result["runaway_id"] = str(runaway_id)
    return result


def _not_a_stop(record: logging.LogRecord) -> bool:
    """False for LangChain's warning about a handler's exception when that exception is a stop (``RunAborted``)."""
    return not any(isinstance(a, str) and a.startswith(("BudgetExceededError(", "LoopDetectedError("))
                   for a in (record.args if isinstance(record.args, tuple) else ()))


def print_report(tracker: CostTracker, *, out: Any = print, aborted: Sequence[RunAborted] = (),
                 runaway_id: str | None = None) -> dict[str, Any]:
    """Print the demo's cost report; returns its total and each feature's cost (of priced calls)."""
    by_feature = tracker.rollup(by=["feature"])
    total = sum((r.cost_usd for r in by_feature), Decimal(0))
    unpriced = sum(r.unpriced_calls for r in by_feature)
    out("")
    out(f"costobs demo: {sum(r.runs for r in by_feature)} runs, total "
        f"{usd(total, unpriced, sum(r.llm_calls for r in by_feature))}")
    out("")
    table(out, "Cost by feature", ["feature", "runs", "llm calls", "tool calls", "cost", "avg latency ms"],
          [[key_text(r.key["feature"]), r.runs, r.llm_calls, r.tool_calls,
            usd(r.cost_usd, r.unpriced_calls, r.llm_calls),
            f"{r.avg_latency_ms:.2f}" if r.avg_latency_ms is not None else "-"]
           for r in by_feature])
    by_tenant = tracker.rollup(by=["tenant_id"])
    table(out, "Cost by tenant", ["tenant", "runs", "cost"],
          [[key_text(r.key["tenant_id"]), r.runs, usd(r.cost_usd, r.unpriced_calls, r.llm_calls)] for r in by_tenant])
    by_model = tracker.rollup(by=["model"], where={"kind": "llm"})
    table(out, "Cost by model", ["model", "calls", "input", "cached", "output", "reasoning", "cost"],
          [[key_text(r.key["model"]), r.llm_calls, r.input_tokens, r.cache_read_tokens, r.output_tokens,
            r.reasoning_tokens, usd(r.cost_usd, r.unpriced_calls, r.llm_calls)] for r in by_model])
    tools = tracker.rollup(by=["name"], where={"kind": "tool"})
    free: list[str] = []
    rows = []
    for r in tools:
        name = r.key["name"]
        per_call = tracker.prices.tool_price_nanos(name) if name is not None else None
        if per_call is not None:
            price = f"{usd(nanos_to_usd(per_call) or 0)} a call"
        elif r.cost_usd:
            price = "reported by the tool"
        else:
            price = "none"
            free.append(name)
        rows.append([key_text(name), r.tool_calls, price, usd(r.cost_usd) if price != "none" else "-"])
    table(out, "Tool costs", ["tool", "calls", "price", "cost"], rows)
    if runaway_id is not None:
        rc = tracker.run_cost(runaway_id)
        if rc is not None:
            out(f"Runaway agent {runaway_id}: status={rc.status} reason={rc.reason} "
                f"llm_calls={rc.llm_calls} tool_calls={rc.tool_calls} "
                f"cost={usd(rc.cost_usd, rc.unpriced_calls, rc.llm_calls)}")
    for exc in aborted:
        out(f"  stopped: {exc}")
    for r in by_model:
        if r.unpriced_calls:
            out(f"  note: model {r.key['model']!r} has no price ({r.unpriced_calls} calls, tokens kept, never counted "
                "as $0); add it with CostTracker(prices={...})")
    if free:
        out(f"  note: {', '.join(repr(n) for n in free)} had no price: counted as tool calls, not costed; "
            "price a paid tool with CostTracker(tool_prices={...}) or have it report its cost")
    out("")
    return {"total": total, "unpriced_calls": unpriced, "features": {r.key["feature"]: r.cost_usd for r in by_feature}}
