"""A LangChain chain whose cost is attributed to a feature, a tenant and an (anonymised) user.

    pip install "costobs-callbacks[examples]"     # from a checkout of the repository: pip install ".[examples]"
    python examples/chain.py

Runs offline with a fake model that reports usage like OpenAI does. With OPENAI_API_KEY set, it calls
gpt-4o-mini for real (through langchain-openai, which the ``examples`` extra installs).
"""

from __future__ import annotations

import os
import tempfile

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from costobs_callbacks import CostTracker
from costobs_callbacks.testing import FakeChatModel


def make_model():  # type: ignore[no-untyped-def]
    if os.environ.get("OPENAI_API_KEY"):
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="gpt-4o-mini", stream_usage=True)
    return FakeChatModel(model_name="gpt-4o-mini", cached_fraction=0.25)


def main() -> None:
    db = os.path.join(tempfile.mkdtemp(), "costobs.db")
    with CostTracker(f"sqlite:///{db}") as tracker:
        chain = ChatPromptTemplate.from_messages([("system", "Summarize in one line."), ("user", "{text}")]) \
            | make_model() | StrOutputParser()
        cfg = tracker.config(feature="summarize", user_id="u-42", tenant_id="acme", prompt_version="v2")
        chain.invoke({"text": "LangChain callbacks let a library observe every model call. " * 20}, config=cfg)
        # the same config again continues the same run: its figures add up
        chain.invoke({"text": "A second document to summarize."}, config=cfg)

        cost = tracker.run_cost(cfg["run_id"])
        assert cost is not None
        print(f"run {cost.run_id}: ${cost.cost_usd} ({cost.input_tokens} in / {cost.output_tokens} out, "
              f"{cost.cache_read_tokens} cached, {cost.llm_calls} calls), status {cost.status}")
        print("by model:", cost.by_model)
        for row in tracker.rollup(by=["feature", "model"], where={"kind": "llm"}):
            print(f"{row.key}: ${row.cost_usd} over {row.llm_calls} calls, avg {row.avg_latency_ms:.2f} ms")


if __name__ == "__main__":
    main()
