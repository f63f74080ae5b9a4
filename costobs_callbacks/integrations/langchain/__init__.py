"""LangChain / LangGraph adapter: langchain-core callback events translated into ledger calls.

- ``handler``: ``CostCallbackHandler``, the one handler an app puts in ``callbacks=[...]``;
- ``prompts``: what a call's request holds (messages or strings, ``max_tokens``, tools), read for estimates;
- ``caps``: the handler of a tracker with spend caps (its async model starts wait on the event loop);
- ``agents``: ``CostGuardMiddleware`` for LangChain 1.x agents (imported on demand: it needs ``langchain``).
"""

from __future__ import annotations

from ..._events import COST_EVENT
from .handler import CostCallbackHandler, usage_from_openai
from .prompts import MESSAGES, STRINGS

__all__ = ["COST_EVENT", "MESSAGES", "STRINGS", "CostCallbackHandler", "usage_from_openai"]
