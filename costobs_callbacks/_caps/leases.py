"""The local side of spend caps: what one replica holds of each account (its lease, what it spent since its last
report, what its calls in flight hold) and of each rate bucket. Plain arithmetic under the caps' one small lock,
run on the app's thread: no I/O, no wait (``guard`` decides what to do with a ``WAIT``)."""

from __future__ import annotations

from .accounts import AccountKey

__all__ = ["HOLD", "REFUSE", "WAIT", "LocalAccount", "LocalBucket"]

HOLD, REFUSE, WAIT = 0, 1, 2

PROVISIONAL_SLICES = 16
"""A replica that could not read an account spends at most ``cap // PROVISIONAL_SLICES`` of it (a first lease's
worth) until it can."""


class LocalAccount:
    """One replica's share of an account (see ``accounts``). Every field is read and written under ``SpendCaps.lock``.

    A call may start while what this replica spent and holds is under its lease (``used + held < granted``): it
    then holds its estimate until it ends. Past the lease, the last figures read from the store decide: a cap with
    nothing left to lease (``spent + leased >= cap``: what was spent plus what every replica holds) refuses; one with
    room asks the worker for more (``WAIT``), or, while the store cannot be reached, lets calls through up to that
    room. An account never read (the store down, or slower than a lease wait) lets this replica spend one
    provisional slice (``PROVISIONAL_SLICES``)."""

    __slots__ = ("cap", "granted", "held", "key", "known", "largest", "leased", "lost", "spent", "touched", "used",
                 "wanted")

    def __init__(self, key: AccountKey, cap: int) -> None:
        self.key = key
        self.cap = cap
        self.granted = 0
        """nano-USD leased to this replica and not yet reported as spent."""
        self.used = 0
        """nano-USD this replica's calls spent since its last report."""
        self.held = 0
        """Estimates of this replica's calls in flight."""
        self.spent = 0
        """The account's spend at the last read (``max(reported, rollup)``)."""
        self.leased = 0
        """What every replica held at the last read (this one's lease included)."""
        self.known = False
        """The store answered for this account at least once."""
        self.touched = False
        """A call was admitted since the worker's last round (an idle lease is given back)."""
        self.largest = 0
        """The largest estimate held here (the worker leases slices of at least a few of them)."""
        self.wanted = 0
        """Estimates of the calls waiting for a top-up (the worker leases them beside a slice)."""
        self.lost = False

    def try_hold(self, est: int, offline: bool) -> int:
        """``HOLD`` (``est`` is now held), ``REFUSE`` or ``WAIT`` (for a first lease, or a top-up)."""
        self.touched = True
        if est > self.largest:
            self.largest = est
        if self.used + self.held < self.granted:
            self.held += est
            return HOLD
        if not self.known:
            if not offline:
                return WAIT
            # never read from the store (down, or slower than a lease wait): this replica spends at most what a first
            # lease would have given it, on its own figures
            if self.used + self.held < max(self.cap // PROVISIONAL_SLICES, 1):
                self.held += est
                return HOLD
            return REFUSE
        free = self.cap - self.spent - self.leased
        if free <= 0:
            return REFUSE
        if not offline:
            return WAIT
        if self.used + self.held - self.granted < free:  # on the last figures read, beyond the lease
            self.held += est
            return HOLD
        return REFUSE

    def figures(self) -> tuple[int, int, int]:
        """(spent as this replica knows it, held by its calls in flight, leased by other replicas)."""
        return self.spent + self.used, self.held, max(0, self.leased - self.granted)


class LocalBucket:
    """One replica's slice of a ``usd_per_minute`` bucket: ``tokens`` taken from the shared bucket and not yet spent
    (negative: spent beyond it, a debt the next slices pay), ``held`` by calls in flight. A call may start when
    ``tokens - held`` covers its estimate (at most a minute's worth: a call dearer than that waits for a full
    bucket), else it waits for the worker to take more. While the store cannot be reached, the slice
    refills here at the full rate (``refill``)."""

    __slots__ = ("capacity", "held", "key", "known", "largest", "max_wait_s", "refilled_at", "shared", "shared_at",
                 "tokens", "touched", "waiting")

    def __init__(self, key: tuple[str, str], capacity: int, max_wait_s: float) -> None:
        self.key = key
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.tokens = 0
        self.held = 0
        self.known = False
        self.touched = False
        self.waiting = 0
        self.largest = 0
        self.refilled_at = 0.0
        self.shared = 0
        """The shared bucket's level after this replica's last slice (at ``shared_at``, epoch seconds)."""
        self.shared_at = 0.0

    def room(self, est: int) -> bool:
        return self.tokens - self.held >= max(1, min(est, self.capacity))

    def shared_room(self, est: int, now: float) -> bool:
        """The shared bucket, as last read and refilled since at the rate, has room for ``est``: a call that cannot
        wait for a slice (on an event loop) starts on it, its estimate taken from that figure at once (what it costs
        is this replica's debt, taken from the shared bucket at the worker's next round)."""
        level = min(self.capacity, self.shared + int(self.capacity * max(0.0, now - self.shared_at) / 60.0))
        need = max(1, min(est, self.capacity))
        if level < need:
            return False
        self.shared, self.shared_at = level - need, now
        return True

    def refill(self, now: float) -> None:
        """The offline fallback: refill at the full rate, up to a minute's worth (a bucket never read: full, as a
        new one is)."""
        if not self.known and not self.refilled_at:
            self.tokens = min(self.capacity, self.tokens + self.capacity)
            self.refilled_at = now
        elif self.refilled_at:
            add = int(self.capacity * (now - self.refilled_at) / 60.0)
            if add > 0:
                self.tokens = min(self.capacity, self.tokens + add)
                self.refilled_at = now
        else:
            self.refilled_at = now
