"""LlamaIndex adapter: a thin translator from llama-index-core's events to the ledger.

LlamaIndex reports a call three ways, each used for what it can do; the modules, in the order data flows:

- ``spans``: the instrumentation span handler (every span, with its parent id: the run tree; chains, retrievers,
  tools and workflows opened as ledger spans; our legacy handler put on each component's callback manager);
- ``events``: the instrumentation event handler (embedding calls, LLM calls whose component has no legacy handler,
  a stream's progress), on the dispatcher only while something needs it;
- ``legacy``: ``CostLlamaIndexHandler``, the ``CallbackManager`` handler, whose exceptions reach the app: an LLM call
  opens at its start (a guard's refusal raises there) and is costed at its end; it also works alone, without
  ``instrument()``;
- ``payloads``: what those events carry (prompts, messages, tools, responses, usage through ``_usage``) read for
  the ledger; ``identity``: the model and provider of a component; ``state``: the span tree's nodes and the ledger
  spans we opened;
- ``calls``: the adapter's state and its calls on the ledger (``start_llm`` / ``start_span`` / ``end_llm`` /
  ``record_llm``; ``admit_scoped_llm`` / ``record_scoped_llm``), where every rule lives;
- ``instrument``: ``instrument`` / ``uninstrument`` / ``legacy_handler``, called by ``CostTracker``.
"""

from __future__ import annotations

from .instrument import instrument, legacy_handler, uninstrument
from .legacy import CostLlamaIndexHandler

__all__ = ["CostLlamaIndexHandler", "instrument", "legacy_handler", "uninstrument"]
