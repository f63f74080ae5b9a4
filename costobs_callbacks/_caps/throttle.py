"""Waiting without blocking an event loop.

A capped call may have to wait in its start hook: for its tenant's ``usd_per_minute`` (the throttle), or for a lease
its replica does not have yet. On a plain thread the hook waits there (``SpendCaps``: a condition variable). On a
thread running an event loop a sync hook must never sleep (every task of the loop would stop):

* LangChain: the tracker's handler, when caps are configured, hands LangChain's async dispatcher a coroutine
  version of its model-start hooks (``loop_aware``), which ``await``s ``wait_async`` (``asyncio.sleep`` on the loop)
  before running the sync hook. Every other caller (the sync dispatcher included) gets the sync hook, so the sync
  path pays nothing and trackers without caps use the plain handler.
* LlamaIndex calls its legacy handlers synchronously, from async calls too: its hook cannot await. There the
  throttle does not wait. A call whose replica's slice is dry starts if the shared bucket, as last read and refilled
  since at the rate, has room for it (``LocalBucket.shared_room``), and is refused otherwise (``BudgetExceededError``,
  reason ``usd_per_minute``): the rate holds and the loop never stops. ``async with tracker.run(tenant_id=...)``
  waits at its entry (``RunScope.__aenter__`` calls ``wait_async``), so that the calls inside it start with room.
  A lease this replica does not have yet is not waited for there either: what it knows decides.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from asyncio import _get_running_loop
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from .._ledger import Ledger, Run
    from .guard import Entry, SpendCaps

__all__ = ["loop_aware", "on_event_loop", "run_of", "wait_async"]


def on_event_loop() -> bool:
    """This thread runs an event loop (a sync hook here must not sleep)."""
    return _get_running_loop() is not None


def _dispatcher_code() -> Any:
    try:
        from langchain_core.callbacks import manager

        return manager._ahandle_event_for_handler.__code__
    except Exception:  # pragma: no cover - another langchain-core: the sync hook everywhere (and no async wait)
        return None


_ASYNC_DISPATCH = _dispatcher_code()


class loop_aware:
    """A hook that LangChain's async dispatcher (``_ahandle_event_for_handler``, which awaits a hook that is a
    coroutine function and calls any other inline) reads as the coroutine ``async_name`` of the handler, and every
    other caller as the plain function ``sync``."""

    def __init__(self, sync: Callable[..., Any], async_name: str) -> None:
        self.sync = sync
        self.async_name = async_name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self.sync
        if _ASYNC_DISPATCH is not None and sys._getframe(1).f_code is _ASYNC_DISPATCH:
            return getattr(obj, self.async_name)
        return types.MethodType(self.sync, obj)


def run_of(ledger: Ledger, parent_run_id: Any) -> Run | None:
    """The run a span with this parent joins, if it is open (a parent span, else the ``tracker.run()`` scope)."""
    from .._ledger import current_scope

    if parent_run_id is not None:
        parent = ledger.spans.get(parent_run_id.int if type(parent_run_id) is UUID else parent_run_id)
        if parent is not None:
            return parent.run
    scope = current_scope.get()
    return scope.run if scope is not None else None


def entries_for(
    caps: SpendCaps, ledger: Ledger, parent_run_id: Any, meta: Mapping[str, Any] | None,
) -> tuple[Entry, ...]:
    """The limits a call about to start will be checked against: its run's, or its metadata's for a new run."""
    run = run_of(ledger, parent_run_id)
    if run is not None:
        return caps.entries(run.tenant_id, run.user_hash)
    from .._ledger.attribution import _clean, _present, _text

    meta = meta or {}
    t, u = meta.get("tenant_id"), meta.get("user_id")
    tenant = _clean(t, []) if _present(t) else None
    user = ledger.hash_user(u if isinstance(u, str) else _text(u)) if _present(u) else None
    return caps.entries(tenant, user)


async def wait_async(caps: SpendCaps, entries: tuple[Entry, ...], key: Any = None, est: int = 0) -> None:
    """Sleep on the loop (``asyncio.sleep``) while ``entries`` have a dry bucket (up to its ``max_wait_s``) or an
    account with no lease here yet (up to ``LEASE_WAIT_S``); never raises. The time slept is remembered under
    ``key`` (the call's span key) for its span and ``stats``. ``est``: the call's estimate (0: unknown; a bucket then
    needs room for the largest estimate seen)."""
    from .guard import LEASE_WAIT_S

    if not entries:
        return
    caps.worker.ensure_started()
    t0 = time.monotonic()
    limit = max((lim.max_wait_s for _, _, lim in entries if lim.per_minute is not None), default=0.0)
    throttled = False
    woken = False
    while True:
        d = caps.ready(entries, est)
        if d == 0:
            break
        if d < 0:
            throttled = True
        elapsed = time.monotonic() - t0
        if elapsed >= (limit if d < 0 else LEASE_WAIT_S):
            break
        if not woken or d > 0:  # a dry bucket: the worker looks again as it refills
            caps.worker.wake.set()
            woken = True
        await asyncio.sleep(0.02 if d > 0 else 0.05)
    if caps.throttles:
        caps.note_async_wait(key, (time.monotonic() - t0) * 1000.0 if throttled else 0.0)
