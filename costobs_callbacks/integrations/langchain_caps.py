"""The LangChain handler of a tracker with spend caps: the same hooks, except that LangChain's async dispatcher
gets model-start hooks it can await, which sleep on the event loop (``asyncio.sleep``) while the call's tenant
(user) is past its ``usd_per_minute`` or its replica has no lease yet, then run the sync hook. Sync runs, and
trackers without caps, use the sync hooks as they are (see ``_caps.throttle``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from .._caps.throttle import entries_for, loop_aware, wait_async
from .langchain import CostCallbackHandler

if TYPE_CHECKING:
    from .._caps import SpendCaps
    from .._ledger import Ledger

__all__ = ["CappedCallbackHandler"]


class CappedCallbackHandler(CostCallbackHandler):
    """``CostCallbackHandler`` whose model starts wait on the event loop in async runs."""

    def __init__(self, ledger: Ledger, caps: SpendCaps) -> None:
        super().__init__(ledger)
        self._caps = caps

    async def _wait(self, run_id: UUID, parent_run_id: UUID | None, metadata: dict[str, Any] | None) -> None:
        try:
            entries = entries_for(self._caps, self._ledger, parent_run_id, metadata)
        except Exception as exc:
            self._fault("caps", exc)
            return
        await wait_async(self._caps, entries, run_id.int if type(run_id) is UUID else run_id)

    async def _aon_chat_model_start(self, serialized: dict[str, Any] | None, messages: list[list[Any]], *,
                                    run_id: UUID, parent_run_id: UUID | None = None,
                                    metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        await self._wait(run_id, parent_run_id, metadata)
        CostCallbackHandler.on_chat_model_start(self, serialized, messages, run_id=run_id,
                                                parent_run_id=parent_run_id, metadata=metadata, **kwargs)

    async def _aon_llm_start(self, serialized: dict[str, Any] | None, prompts: list[str], *, run_id: UUID,
                             parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                             **kwargs: Any) -> None:
        await self._wait(run_id, parent_run_id, metadata)
        CostCallbackHandler.on_llm_start(self, serialized, prompts, run_id=run_id, parent_run_id=parent_run_id,
                                         metadata=metadata, **kwargs)

    on_chat_model_start = loop_aware(CostCallbackHandler.on_chat_model_start, "_aon_chat_model_start")  # type: ignore[assignment]
    on_llm_start = loop_aware(CostCallbackHandler.on_llm_start, "_aon_llm_start")  # type: ignore[assignment]
