"""A LlamaIndex RAG app: ingestion and answers costed, attributed, and stopped by a budget.

    pip install "costobs-callbacks[examples]"     # from a checkout of the repository: pip install ".[examples]"
    python examples/llamaindex_rag.py

Runs offline with no API key: LlamaIndex's own ``MockLLM`` (it echoes its prompt) and ``MockEmbedding``,
priced with overrides so the figures mean something. Everything else is real: a ``VectorStoreIndex``, a
query engine, a streaming query, the tracker and a SQLite database. Mock models report no usage, so
their tokens are counted with tiktoken and the calls are flagged ``estimated``; a real provider's
reported usage is used as is.
"""

from __future__ import annotations

import os
import tempfile

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM

from costobs_callbacks import Budget, BudgetExceededError, CostTracker

PRICES = {  # USD per million tokens, under the names the mock models report
    "MockLLM": {"input": 2.5, "output": 10},
    "MockEmbedding": {"input": 0.02, "output": 0},
}

DOCS = [
    "Our refund policy: customers may return any item within 30 days for a full refund.",
    "Shipping: orders over $50 ship free; express shipping costs $12 and takes two days.",
    "Support hours are 9am to 6pm CET, Monday to Friday; urgent issues go to the on-call line.",
]


def main() -> None:
    db = os.path.join(tempfile.mkdtemp(), "costobs.db")
    with CostTracker(f"sqlite:///{db}", prices=PRICES) as tracker:
        tracker.instrument_llamaindex()  # once, at start-up: every LlamaIndex call is followed from now on

        with tracker.run(feature="ingest", tenant_id="acme") as run:
            index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS],
                                                    embed_model=MockEmbedding(embed_dim=16))
        print(f"ingest    {run.run_id}: ${run.cost.cost_usd:f} ({run.cost.input_tokens} tokens embedded)")

        # MockEmbedding gives every text the same vector, so a top-2 would pick any two documents: all three are
        # retrieved, and the figures below are the same on every run
        query_engine = index.as_query_engine(llm=MockLLM(max_tokens=64), similarity_top_k=len(DOCS))
        for uid, question in (("u-42", "How long do I have to return an item?"),
                              ("u-7", "How much is express shipping?")):
            with tracker.run(feature="rag-answer", user_id=uid, tenant_id="acme",
                             budget=Budget(max_cost_usd=0.01)) as run:
                query_engine.query(question)
                live = run.cost  # the live RunCost, while the run is open
            print(f"answer    {run.run_id}: ${live.cost_usd:f} ({live.llm_calls} calls: {live.input_tokens} in / "
                  f"{live.output_tokens} out, {live.estimated_calls} estimated)")

        # a streaming answer: its LLM call runs while the answer is read, so read it inside the run
        streaming = index.as_query_engine(llm=MockLLM(max_tokens=32), streaming=True, similarity_top_k=len(DOCS))
        with tracker.run(feature="rag-stream", user_id="u-42", tenant_id="acme") as run:
            "".join(streaming.query("When is support open?").response_gen)
        print(f"streamed  {run.run_id}: ${run.cost.cost_usd:f}")

        # a budget too small for the answer: the LLM call is refused before it is made
        try:
            with tracker.run(feature="rag-answer", user_id="u-13", tenant_id="acme",
                             budget=Budget(max_cost_usd=0.0002)) as run:
                query_engine.query("What is the refund policy?")
        except BudgetExceededError as err:
            print(f"stopped   {err.run_id}: {err.reason}, spent ${err.spent_usd:f}")

        for row in tracker.rollup(by=["feature"]):
            print(f"{row.key['feature']:>10}: ${row.cost_usd:f} over {row.llm_calls} model calls in {row.runs} runs")
        tracker.uninstrument_llamaindex()


if __name__ == "__main__":
    main()
