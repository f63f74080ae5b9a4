"""The caps' own thread: it reports what this replica spent, tops its leases up before they run dry, takes slices
of the rate buckets while calls wait for them, gives back what is idle, and reads the shared figures again every
``cap_refresh_s``. Not the exporter's thread (which may be stuck on a database that hangs) and never the app's."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .leases import PROVISIONAL_SLICES, LocalAccount, LocalBucket

if TYPE_CHECKING:
    from .guard import SpendCaps

__all__ = ["CapsWorker"]

logger = logging.getLogger("costobs_callbacks")

_SLICES = PROVISIONAL_SLICES
"""A lease is at least 1/16 of the cap (or four of the largest estimates seen, if more), never more than is left."""

_BUCKET_SLICES = 8

_IDLE_ROUNDS = 12
"""Rounds without a call after which a lease is given back even far from the cap (near it: after one)."""


class CapsWorker:
    """Runs ``SpendCaps``' rounds on a daemon thread (started with the first capped call)."""

    def __init__(self, caps: SpendCaps, refresh_s: float) -> None:
        self.caps = caps
        self.refresh_s = refresh_s
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._last_round: dict[object, float] = {}
        self._idle: dict[object, int] = {}
        """Due rounds in a row that found an account or bucket without a call since the one before."""
        self.busy_since = 0.0
        """``time.monotonic()`` when the store operation under way began (0: none)."""
        self.rounds = 0
        """Rounds finished (each account and bucket visited once)."""

    def ensure_started(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stop.is_set():
                    t = threading.Thread(target=self._loop, name="costobs-caps", daemon=True)
                    t.start()
                    self._thread = t

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.round()
            except Exception:  # never dies: logged, counted, tried again
                logger.exception("costobs: spend caps round failed")
                self.caps.store_errors += 1
                delay = self.refresh_s
            self.wake.wait(delay)
            self.wake.clear()

    def round(self, final: bool = False) -> float:
        """Visit every account and bucket that is due; returns the seconds until the next round is due."""
        caps = self.caps
        now = time.monotonic()
        delay = self.refresh_s
        with caps.lock:
            accts = list(caps.accounts.values())
            bkts = list(caps.buckets.values())
        for a in accts:
            delay = min(delay, self._account(a, now, final))
        for b in bkts:
            delay = min(delay, self._bucket(b, now, final))
        self.rounds += 1
        return max(delay, 0.005)

    def _account(self, a: LocalAccount, now: float, final: bool) -> float:
        caps = self.caps
        last = self._last_round.get(a, 0.0)
        due = final or now - last >= self.refresh_s
        with caps.lock:
            slice_ = max(a.cap // _SLICES, 4 * a.largest, 1)
            avail = a.granted - a.used - a.held
            current = caps.is_current(a.key)
            need = current and not final and (not a.known or a.wanted > 0 or (a.touched and avail < slice_ // 2))
            if not (due or need):
                return self.refresh_s - (now - last)
            if due:
                quiet = self._idle[a] = self._idle.get(a, 0) + 1 if not a.touched and a.held == 0 else 0
            else:
                quiet = 0
            if (current and not final and quiet >= 2 and a.known and a.granted == 0 and a.used == 0
                    and a.held == 0 and a.wanted == 0):
                self._retire(caps.accounts, (a.key.scope, a.key.scope_id, a.key.period, a.key.start), a)
                return self.refresh_s  # quiet, holding nothing: no round for it until a call needs it again
            # An idle lease goes back near the cap (less is left to lease than is leased out: other replicas may need
            # it), else after _IDLE_ROUNDS rounds: a tenant calling now and then keeps its lease (no wait) meanwhile.
            tight = a.cap - a.spent - a.leased < a.leased
            idle = final or not current or (quiet > 0 and (tight or quiet >= _IDLE_ROUNDS))
            used = a.used
            from_lease = min(used, a.granted)
            give_back = max(0, a.granted - from_lease - a.held) if idle and not need else 0
            want = (max(0, slice_ + a.wanted - avail) if need or (current and a.touched and avail < slice_ // 2)
                    else 0)
            holding = a.granted
            if due:
                a.touched = False
        self.busy_since = time.monotonic()
        try:
            fig = caps.store.settle(a.key, a.cap, used=used, from_lease=from_lease, give_back=give_back, want=want,
                                    reconcile=due, holding=holding)
        except Exception as exc:
            self.busy_since = 0.0
            caps.went_offline(exc)
            with caps.cond:
                caps.cond.notify_all()
            return min(self.refresh_s, 1.0)
        self.busy_since = 0.0
        self._last_round[a] = now
        with caps.cond:
            a.used -= used
            a.granted = fig.granted
            a.spent, a.leased = fig.spent, fig.leased
            a.known = True
            if fig.lease_lost:
                caps.leases_lost += 1
            caps.back_online()
            if not current and a.used == 0 and a.held == 0 and a.granted == 0:
                self._retire(caps.accounts, (a.key.scope, a.key.scope_id, a.key.period, a.key.start), a)
            caps.cond.notify_all()
        return self.refresh_s

    def _bucket(self, b: LocalBucket, now: float, final: bool) -> float:
        caps = self.caps
        last = self._last_round.get(b, 0.0)
        due = final or now - last >= self.refresh_s
        with caps.lock:
            slice_ = max(b.capacity // _BUCKET_SLICES, 2 * b.largest, 1)
            avail = b.tokens - b.held
            # a debt (spent past its slices: a record, a call dearer than it held) is taken from the shared bucket at
            # once, so that every replica's rate sees it
            need = not final and (b.waiting > 0 or not b.known or b.tokens < 0 or (b.touched and avail < slice_ // 2))
            if not (due or need):
                return self.refresh_s - (now - last)
            idle = final or (not b.touched and b.held == 0 and b.waiting == 0)
            give_back = b.tokens if idle and b.tokens > 0 else 0
            want = (max(0, slice_ - avail) if b.touched or b.waiting else max(0, -b.tokens)) if need else 0
            if due:
                b.touched = False
                quiet = self._idle[b] = self._idle.get(b, 0) + 1 if idle else 0
                if not need and not give_back:  # a bucket has nothing to read again: no round unless it needs one
                    self._last_round[b] = now
                    if quiet >= _IDLE_ROUNDS and not final and b.tokens == 0 and b.held == 0:
                        self._retire(caps.buckets, b.key, b)
                    return self.refresh_s
        self.busy_since = time.monotonic()
        try:
            grant, level = caps.store.take(b.key[0], b.key[1], b.capacity, want, give_back)
        except Exception as exc:
            self.busy_since = 0.0
            caps.went_offline(exc)
            with caps.cond:
                caps.cond.notify_all()
            return min(self.refresh_s, 0.25)
        self.busy_since = 0.0
        self._last_round[b] = now
        with caps.cond:
            b.tokens += grant - give_back
            b.shared, b.shared_at = level, time.time()
            b.known = True
            b.refilled_at = 0.0
            caps.back_online()
            caps.cond.notify_all()
            short = b.held - b.tokens + max(b.largest, 1)  # what the next call needs to start
            waiting = b.waiting > 0 or b.touched
        if grant < want and short > 0 and waiting:
            # the bucket is dry: look again when it will have refilled one call's worth (it refills a minute's
            # worth a minute), at least every second
            return min(1.0, max(0.02, short * 60.0 / b.capacity))
        return self.refresh_s

    def _retire(self, table: dict[Any, Any], key: Any, obj: object) -> None:
        """Under ``lock``: forget a quiet account or bucket that holds nothing (the bindings that point to it look
        their accounts up again: ``SpendCaps.retirements``)."""
        if table.get(key) is obj:
            del table[key]
            self.caps.retirements += 1
        self._last_round.pop(obj, None)
        self._idle.pop(obj, None)

    def stop(self, timeout: float | None) -> None:
        """Stop the thread, then give back every lease and bucket slice held (one last round)."""
        self._stop.set()
        self.wake.set()
        t = self._thread
        if t is not None:
            t.join(timeout)
        if t is not None or self.caps.accounts or self.caps.buckets:
            try:
                self.round(final=True)
            except Exception:
                logger.warning("costobs: could not give back spend cap leases at close", exc_info=True)
