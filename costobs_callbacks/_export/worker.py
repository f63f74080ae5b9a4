"""The non-blocking exporter: a bounded queue drained by one background thread, in batches.

Modelled on OpenTelemetry's ``BatchSpanProcessor``: ``emit`` takes no lock and never blocks; the worker
wakes when a batch is full or every ``schedule_delay`` seconds; ``force_flush`` waits for everything
emitted before it; ``shutdown`` runs once, with a deadline, also at interpreter exit; a forked child gets
a fresh queue and thread. Failures of the sink are retried with backoff (nothing is lost while the store
comes back); what still cannot be written, and what overflows a full queue, is counted and logged.

With a ``Fallback`` (the tracker's spool, see ``fallback``), a batch the sink fails to take for any reason but
its content is handed to it at once instead (the thread never sleeps on a database that is away), and every
later batch follows it there while it holds a backlog, so that the database receives them in order; the
fallback's ``tick`` replays the backlog on the worker's thread, between batches.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .sink import Batch, Fallback, PoisonBatch

__all__ = ["BatchExporter", "ExportStats"]

logger = logging.getLogger("costobs_callbacks")

LATER_BATCHES = 2
"""``room_for_later`` says no once the queue holds this many full batches (``max_batch_size`` items; at most half
the queue): the exporter is falling behind, and the app's thread does the work itself. Until then, the queue is
written before it gets there (a full batch wakes the exporter), so what is left for later is done on time. Such an
item keeps the texts of its call until written (a call's estimate keeps its prompt and reply, at most
``integrations.llamaindex.calls.LATER_MAX_CHARS`` characters): this bounds what they hold (8,192 items of at most
8,192 characters with the defaults)."""


class ExportStats:
    """Counters of the exporter; read them to see that nothing was lost."""

    __slots__ = ("_pending", "batches", "dropped", "exported", "failed", "refused", "retries", "spooled", "taken")

    def __init__(self, pending: Callable[[], int] = lambda: 0) -> None:
        self._pending = pending
        self.taken = 0
        """Items the worker took from the queue."""
        self.exported = 0
        """Items written by the sink."""
        self.dropped = 0
        """Items refused because the queue was full."""
        self.failed = 0
        """Items lost: refused by the sink (``refused``), or not written before the retry deadline."""
        self.refused = 0
        """Items the sink refused for their content (``PoisonBatch`` on the item alone); counted in ``failed`` too."""
        self.spooled = 0
        """Items handed to the fallback (the spool) instead of the sink; not lost."""
        self.batches = 0
        self.retries = 0

    @property
    def emitted(self) -> int:
        """Items handed to the queue (counted by the worker, not by ``emit``: taken, plus those still queued)."""
        return self.taken + self._pending()

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k)
                for k in ("batches", "dropped", "emitted", "exported", "failed", "refused", "retries", "spooled")}


class BatchExporter:
    def __init__(
        self,
        sink: Callable[[Sequence[Any]], None],
        *,
        max_queue_size: int = 65_536,
        max_batch_size: int = 4_096,
        schedule_delay: float = 0.5,
        retry_deadline: float = 60.0,
        name: str = "costobs-exporter",
        on_start: Callable[[], None] | None = None,
        fallback: Fallback | None = None,
    ) -> None:
        if max_queue_size < 1 or max_batch_size < 1 or schedule_delay <= 0:
            raise ValueError("max_queue_size and max_batch_size must be >= 1, schedule_delay > 0")
        self._sink = sink
        self._max_queue = max_queue_size
        self._max_batch = max_batch_size
        self._wake_at = max_batch_size - 1  # queue length before an append that fills a batch
        self._delay = schedule_delay
        self._retry_deadline = retry_deadline
        self._name = name
        self._on_start = on_start
        self._fallback = fallback
        self._final_budget = 5.0
        self.prepare: Callable[[Sequence[Any]], None] | None = None
        """Called on the worker's thread with each batch before it is written or spooled (the ledger's ``settle``:
        the calls whose tokens the app's thread left for later are counted here)."""
        self._later_limit = max(1, min(max_queue_size // 2, LATER_BATCHES * max_batch_size))
        self.stats = ExportStats(lambda: len(self._queue))
        self._init_state()
        self._shutdown_once = threading.Lock()
        self._closed = False
        self._last_drop_log = 0.0
        ref = weakref.ref(self)
        atexit.register(_atexit_shutdown, ref)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: _after_fork(ref))

    def _init_state(self) -> None:
        self._queue: deque[Any] = deque()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._requested = 0  # flush generation asked for
        self._done = 0  # flush generation completed
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = False

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                if self._stop:
                    return
                t = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._worker = t
                t.start()

    # -- the hot path ---------------------------------------------------------------------------

    def emit(self, item: Any) -> None:
        """Queue one item. Never blocks; counts and logs an overflow."""
        q = self._queue
        n = len(q)
        if n >= self._max_queue or self._closed:
            self._drop()
            return
        q.append(item)
        if n >= self._wake_at or self._worker is None:
            if self._worker is None:
                self._ensure_worker()
            if n >= self._wake_at and not self._wake.is_set():
                self._wake.set()

    def room_for_later(self) -> bool:
        """Whether an item whose work is left to ``prepare`` may be queued now: ``prepare`` is set, the exporter is
        open, and its queue holds fewer than ``LATER_BATCHES`` full batches (it is not falling behind: the item is
        written, not dropped, and what such items keep in memory until then stays bounded)."""
        return self.prepare is not None and len(self._queue) < self._later_limit and not self._closed

    def _drop(self) -> None:
        self.stats.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log > 10.0:
            self._last_drop_log = now
            logger.error(
                "costobs: export queue full (%d items) or exporter closed; %d items dropped so far",
                self._max_queue, self.stats.dropped,
            )

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:
                logger.exception("costobs: exporter start hook failed")
        fb = self._fallback
        while True:
            woken = self._wake.wait(self._delay)
            self._wake.clear()
            with self._cond:
                target = self._requested
            if fb is not None:
                self._tick(fb)
            # a full batch's wake (it may have been written meanwhile) writes full batches; the delay, a flush
            # and the stop write everything
            self._drain(not woken or target > self._done or self._stop)
            with self._cond:
                if target > self._done:
                    self._done = target
                    self._cond.notify_all()
            if self._stop and not self._queue:
                if fb is not None:
                    self._tick(fb, final=True)
                with self._cond:
                    self._done = self._requested
                    self._cond.notify_all()
                return

    def _drain(self, everything: bool = True) -> None:
        """Write the full batches (``max_batch_size`` items) the queue holds, and with ``everything`` what it holds
        now; of what arrives meanwhile, only full batches. The rest waits for the next round (a full batch's wake,
        a flush, or ``schedule_delay``), as in OpenTelemetry's processor: a steady load is written in full batches,
        each with its fixed work (a transaction, the rollup upserts) spread over many spans, instead of chased in
        ever smaller ones."""
        q = self._queue
        due = len(q) if everything else 0
        full = self._max_batch
        while q and (due > 0 or len(q) >= full):
            n = min(len(q), full)
            due -= n
            self.stats.taken += n  # first: emitted (taken + queued) may read high for a moment, never low
            batch = Batch([q.popleft() for _ in range(n)])
            if self.prepare is not None:
                try:
                    self.prepare(batch)
                except Exception:  # written as it is: a call left uncounted is better than a batch lost
                    logger.exception("costobs: preparing a batch of %d failed", n)
            self._write(batch)

    def _tick(self, fb: Fallback, final: bool = False) -> None:
        try:
            more = fb.tick(final, self._final_budget if final else 1.0)
        except Exception:
            logger.exception("costobs: replaying the spool failed")
            return
        if more:
            self._wake.set()

    def _keep(self, batch: list[Any]) -> bool:
        fb = self._fallback
        if fb is None:
            return False
        try:
            kept = fb.keep(batch)
        except Exception:
            logger.exception("costobs: could not spool %d spans/runs", len(batch))
            return False
        if kept:
            self.stats.spooled += len(batch)
        return kept

    def _write(self, batch: list[Any]) -> None:
        if type(batch) is not Batch:
            batch = Batch(batch)
        fb = self._fallback
        if fb is not None:
            try:
                diverted = fb.divert()
            except Exception:
                logger.exception("costobs: the spool's check failed")
                diverted = False
            if diverted and self._keep(batch):
                return
        deadline = time.monotonic() + self._retry_deadline
        backoff = 0.1
        while True:
            try:
                self._sink(batch)
            except PoisonBatch as exc:
                if len(batch) > 1:
                    mid = len(batch) // 2  # each half a batch of its own: the attempt rolled back
                    self._write(Batch(batch[:mid]))
                    self._write(Batch(batch[mid:]))
                    return
                self.stats.failed += 1
                self.stats.refused += 1
                logger.error("costobs: the database refused an item (%r); %d refused, %d lost so far",
                             exc.__cause__ or exc, self.stats.refused, self.stats.failed)
                return
            except Exception as exc:
                if fb is not None and self._keep(batch):
                    return
                if time.monotonic() + backoff > deadline or self._stop:
                    self.stats.failed += len(batch)
                    logger.error(
                        "costobs: could not store %d spans/runs (%r); %d lost so far",
                        len(batch), exc, self.stats.failed, exc_info=exc,
                    )
                    return
                self.stats.retries += 1
                logger.warning("costobs: store write failed (%r); retrying in %.1fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.stats.exported += len(batch)
            self.stats.batches += 1
            return

    # -- control --------------------------------------------------------------------------------

    def force_flush(self, timeout: float | None = None) -> bool:
        """Wait until everything emitted before this call is written (or failed), and the fallback's backlog
        with it. True if done in time; else what is left is still queued, or kept by the fallback."""
        end = None if timeout is None else time.monotonic() + timeout
        if not self._flush_queue(timeout):
            return False
        fb = self._fallback
        if fb is None or self._worker is None or not self._worker.is_alive():
            return fb is None or fb.backlog() == 0
        while fb.backlog():
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            with self._cond:
                self._requested += 1
                target = self._requested
            self._wake.set()
            with self._cond:
                self._cond.wait_for(lambda t=target: self._done >= t,  # type: ignore[misc]
                                    min(0.5, remaining) if remaining is not None else 0.5)
            if not self._worker.is_alive():
                break
        return fb.backlog() == 0

    def _flush_queue(self, timeout: float | None) -> bool:
        if self._worker is None or not self._worker.is_alive():
            if not self._queue:
                return True
            self._ensure_worker()
            if self._worker is None:  # stopped: drain here
                self._drain()
                return not self._queue
        with self._cond:
            self._requested += 1
            target = self._requested
        self._wake.set()
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._done < target:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
                if self._worker is not None and not self._worker.is_alive() and self._done < target:
                    return not self._queue
        return True

    def pending(self) -> int:
        return len(self._queue)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Flush and stop the worker; runs once. Later ``emit`` calls are counted as dropped. The fallback's
        backlog gets one last replay within ``timeout``; what it keeps then stays for the next process."""
        if not self._shutdown_once.acquire(blocking=False):
            return
        start = time.monotonic()
        self._flush_queue(timeout)
        # the worker's last round replays the fallback's backlog once, for what is left of the timeout: a
        # database that is away does not hold the exit up (what is kept is replayed by the next process)
        self._final_budget = 5.0 if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        self._stop = True
        self._closed = True
        self._wake.set()
        w = self._worker
        if w is not None and w is not threading.current_thread():
            w.join(timeout)


def _atexit_shutdown(ref: weakref.ReferenceType[BatchExporter]) -> None:
    exp = ref()
    if exp is not None:
        try:
            exp.shutdown(timeout=10.0)
        except Exception:  # pragma: no cover - interpreter teardown
            pass


def _after_fork(ref: weakref.ReferenceType[BatchExporter]) -> None:
    exp = ref()
    if exp is not None:
        # The parent's queue belongs to the parent's worker; the child starts empty with its own.
        exp._init_state()
        exp._shutdown_once = threading.Lock()
