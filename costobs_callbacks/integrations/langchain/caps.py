"""The LangChain handler of a tracker with spend caps: the same hooks, except that LangChain's async dispatcher
gets model-start hooks it can await, which sleep on the event loop (``asyncio.sleep``) while the call's tenant
(user) is past its ``usd_per_minute`` or its replica has no lease yet, then run the sync hook. Sync runs, and
trackers without caps, use the sync hooks as they are (see ``_caps.throttle``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from ..._caps.throttle import entries_for, loop_aware, wait_async
from ..._ledger import new_run, new_span
from .handler import CostCallbackHandler
from .prompts import _EMPTY, MESSAGES, STRINGS

if TYPE_CHECKING:
    from ..._caps import SpendCaps
    from ..._ledger import Ledger

__all__ = ["CappedCallbackHandler"]

_PROBE_RUN = new_run("probe", "probe", 0.0, 0.0)
"""The run of the spans an async start builds only to estimate its call (never opened, never stored)."""


class CappedCallbackHandler(CostCallbackHandler):
    """``CostCallbackHandler`` whose model starts wait on the event loop in async runs."""

    def __init__(self, ledger: Ledger, caps: SpendCaps) -> None:
        super().__init__(ledger)
        self._caps = caps

    def request_estimate(self, serialized: dict[str, Any] | None, prompt: Any, ops: Any,
                         metadata: dict[str, Any] | None, kwargs: dict[str, Any]) -> int:
        """What the call about to start will hold of its caps (``Ledger.cap_estimate`` of the span the sync hook
        opens): its model and provider read as the hook reads them."""
        ip = kwargs.get("invocation_params") or _EMPTY
        meta = metadata or _EMPTY
        model = ip.get("model") or ip.get("model_name") or meta.get("ls_model_name")
        provider = meta.get("ls_provider") or ip.get("_type")
        probe = new_span(0, None, _PROBE_RUN, "llm", "probe", None if model is None else str(model),
                     None if provider is None else str(provider), prompt, ops, (ip, meta))
        return self._ledger.cap_estimate(probe)

    async def _wait(self, serialized: dict[str, Any] | None, prompt: Any, ops: Any, run_id: UUID,
                    parent_run_id: UUID | None, metadata: dict[str, Any] | None, kwargs: dict[str, Any]) -> None:
        try:
            entries = entries_for(self._caps, self._ledger, parent_run_id, metadata)
            est = self.request_estimate(serialized, prompt, ops, metadata, kwargs) if entries else 0
        except Exception as exc:
            self._fault("caps", exc)
            return
        await wait_async(self._caps, entries, run_id.int if type(run_id) is UUID else run_id, est)

    async def _aon_chat_model_start(self, serialized: dict[str, Any] | None, messages: list[list[Any]], *,
                                    run_id: UUID, parent_run_id: UUID | None = None,
                                    metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        await self._wait(serialized, messages, MESSAGES, run_id, parent_run_id, metadata, kwargs)
        CostCallbackHandler.on_chat_model_start(self, serialized, messages, run_id=run_id,
                                                parent_run_id=parent_run_id, metadata=metadata, **kwargs)

    async def _aon_llm_start(self, serialized: dict[str, Any] | None, prompts: list[str], *, run_id: UUID,
                             parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
                             **kwargs: Any) -> None:
        await self._wait(serialized, prompts, STRINGS, run_id, parent_run_id, metadata, kwargs)
        CostCallbackHandler.on_llm_start(self, serialized, prompts, run_id=run_id, parent_run_id=parent_run_id,
                                         metadata=metadata, **kwargs)

    on_chat_model_start = loop_aware(CostCallbackHandler.on_chat_model_start, "_aon_chat_model_start")  # type: ignore[assignment]
    on_llm_start = loop_aware(CostCallbackHandler.on_llm_start, "_aon_llm_start")  # type: ignore[assignment]
