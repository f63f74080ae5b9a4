"""``CostTracker.run()``: a root run opened by the app itself, carried by a context variable.

Everything costed inside the ``with`` block (LangChain or LlamaIndex calls, asyncio tasks created
inside it, threads started with ``contextvars.copy_context()``) attaches to this run.
"""

from __future__ import annotations

import uuid
from contextvars import Token
from typing import TYPE_CHECKING, Any

from langchain_core.utils.uuid import uuid7

from ._ledger import RunCost, Span, current_scope, run_text

if TYPE_CHECKING:
    from ._tracker import CostTracker

__all__ = ["RunScope"]


class RunScope:
    """A root run opened by ``tracker.run(...)``; use as ``with`` or ``async with``."""

    def __init__(self, tracker: CostTracker, meta: dict[str, Any], run_id: uuid.UUID | str | None) -> None:
        self._tracker = tracker
        self._meta = meta
        # A run of its own is keyed by its UUID (as its integer: no text to parse), its scope span by the text.
        rid: uuid.UUID | str = uuid7() if run_id is None else run_id
        self._rid = rid
        self.run_id: str = str(rid) if type(rid) is uuid.UUID else run_text(rid)
        self._span: Span | None = None
        self._token: Token[Span | None] | None = None

    @property
    def cost(self) -> RunCost | None:
        """The run's ``RunCost``: live while the block runs, from the database after."""
        live = self._tracker.ledger.run_cost(self.run_id)
        if live is not None:
            return live
        return self._tracker.run_cost(self.run_id)

    def __enter__(self) -> RunScope:
        name = str(self._meta.get("feature") or "run")
        self._span = self._tracker.ledger.start_span(self._scope_key, None, "run", name, self._meta, root=True,
                                                     run_id=self._rid)
        self._token = current_scope.set(self._span)
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            try:
                current_scope.reset(self._token)
            except ValueError:  # exited in another context (a generator moved across tasks)
                current_scope.set(None)
            self._token = None
        status = "ok" if exc is None else "error"
        self._tracker.ledger.end(self._scope_key, status=status, error=exc)

    async def __aenter__(self) -> RunScope:
        caps = self._tracker._caps
        if caps is not None:  # wait here for the tenant's rate, or a first lease: hooks inside cannot always await
            from ._caps.throttle import entries_for, wait_async

            try:
                entries = entries_for(caps, self._tracker.ledger, None, self._meta)
            except Exception:  # never the app's problem: its calls are checked by their own hooks
                entries = ()
            await wait_async(caps, entries)
        return self.__enter__()

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(et, exc, tb)

    @property
    def _scope_key(self) -> str:
        return self.run_id  # a str: never equal to the UUID keys of LangChain's runs

    def __repr__(self) -> str:
        return f"<RunScope {self.run_id}>"
