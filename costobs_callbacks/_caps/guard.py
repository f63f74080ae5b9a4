"""Spend caps and rate throttles per tenant and per user, held across replicas: what the ledger calls.

``SpendCaps.admit`` runs in a model call's start hook, after every other guard: the call waits while its tenant's
(user's) ``usd_per_minute`` is passed (``throttle``), then holds its cost estimate on each of its accounts (the day's,
the month's; ``leases``) or is refused with ``BudgetExceededError``. ``settle`` runs where the ledger adds an ended
call to its run (``_account``): the holds are given back and the cost is spent from this replica's lease. The
worker thread (``worker``) keeps the leases filled from the shared store (``accounts``).

The app's thread does no I/O here. It waits only (a) while a throttle asks it to, and (b) for a lease this replica
does not have yet (its first call for a tenant, or a burst that drained its lease faster than the worker refilled
it), at most ``LEASE_WAIT_S``, and not at all while the store is known to be unreachable: then the last figures read
decide (see ``LocalAccount.try_hold``). A hook on a thread running an event loop never waits (see ``throttle``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from calendar import monthrange
from typing import TYPE_CHECKING, Any, Protocol

from .._events import nanos_to_usd
from .._exceptions import BudgetExceededError
from .._ledger.model import _usd
from .accounts import AccountKey, AccountStore
from .leases import REFUSE, WAIT, LocalAccount, LocalBucket
from .policy import CapTable, Limits
from .throttle import on_event_loop
from .worker import CapsWorker

if TYPE_CHECKING:
    import sqlalchemy as sa

    from .._exceptions import RunAborted
    from .._ledger import Run, Span


__all__ = ["LEASE_WAIT_S", "SpendCaps"]

logger = logging.getLogger("costobs_callbacks")

LEASE_WAIT_S = 1.0
"""The longest a call waits for a lease this replica does not have yet before the figures it has decide."""

_DAY = 86400

Entry = tuple[str, str, Limits]
"""(scope, tenant id or user hash, its limits)."""


class _Ledger(Protocol):
    """What ``admit`` needs of the ledger."""

    def cap_estimate(self, span: Span) -> int: ...

    def _abort(self, run: Run, err: RunAborted) -> None: ...


class _Binding:
    """The caps of one (tenant, user) pair, shared by its runs (``Run.caps``): its limits, and the accounts and
    buckets of the current periods (looked up again once ``until`` passes). ``_account`` calls ``settle`` for every
    ended span of a run bound to it."""

    __slots__ = ("accounts", "buckets", "caps", "entries", "epoch", "until")

    def __init__(self, caps: SpendCaps, entries: tuple[Entry, ...]) -> None:
        self.caps = caps
        self.entries = entries
        self.until = 0.0
        """When the first of its current periods ends (epoch seconds)."""
        self.accounts: tuple[LocalAccount, ...] = ()
        self.buckets: tuple[LocalBucket, ...] = ()
        self.epoch = -1
        """``SpendCaps.retirements`` when they were looked up."""

    def settle(self, span: Span, cost: int) -> None:
        self.caps.settle(self, span, cost)


class SpendCaps:
    """The caps of one tracker (``CostTracker(tenant_budgets=..., user_budgets=...)``)."""

    def __init__(self, engine: sa.Engine, tenants: CapTable | None, users: CapTable | None,
                 refresh_s: float) -> None:
        self.tenants = tenants
        self.users = users
        self.refresh_s = refresh_s
        self._engine = engine
        self._init_state()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: _after_fork(ref))

    def _init_state(self) -> None:
        """A replica of its own: a new holder id, no lease, no thread (made again in a forked child, whose parent
        keeps the leases it held)."""
        self.holder = uuid.uuid4().hex
        # a lease's expiry is renewed at every round (every refresh_s): six rounds missed, its replica is taken for gone
        self.store = AccountStore(self._engine, self.holder, lease_ttl=max(1.0, 6 * self.refresh_s))
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.accounts: dict[tuple[str, str, str, int], LocalAccount] = {}
        self.buckets: dict[tuple[str, str], LocalBucket] = {}
        self.worker = CapsWorker(self, self.refresh_s)
        self._bindings: dict[tuple[str | None, str | None], _Binding | None] = {}
        self.retirements = 0
        """Accounts and buckets the worker forgot (quiet, holding nothing): a binding made before looks up again."""
        self._month: tuple[int, int] = (0, 0)
        self.offline = False
        # counters (tracker.stats)
        self.refused = 0
        self.throttled = 0
        self.throttle_wait_ms = 0.0
        self.throttle_refused = 0
        self.lease_waits = 0
        self.lease_wait_ms = 0.0
        self.lease_timeouts = 0
        """Lease waits that ended with the store taken for down (past ``LEASE_WAIT_S``, or unreachable): those calls
        were decided by the last figures read, where the bound is that of a store that is down."""
        self.store_errors = 0
        self.leases_lost = 0
        self._prewaited: dict[Any, float] = {}
        self.throttles = ((self.tenants is not None and self.tenants.throttled)
                          or (self.users is not None and self.users.throttled))

    # -- what applies ---------------------------------------------------------------------------

    def applies(self, tenant_id: str | None, user_hash: str | None) -> bool:
        return self.binding(tenant_id, user_hash) is not None

    def entries(self, tenant_id: str | None, user_hash: str | None) -> tuple[Entry, ...]:
        b = self.binding(tenant_id, user_hash)
        return () if b is None else b.entries

    def binding(self, tenant_id: str | None, user_hash: str | None) -> _Binding | None:
        """The caps of a run for ``tenant_id`` and ``user_hash`` (``None``: none apply), one per pair (bounded)."""
        k = (tenant_id, user_hash)
        got: _Binding | None = self._bindings.get(k, _NONE)
        if got is _NONE:
            out: list[Entry] = []
            if tenant_id is not None and self.tenants is not None:
                lim = self.tenants.limits(tenant_id)
                if lim is not None:
                    out.append(("tenant", tenant_id, lim))
            if user_hash is not None and self.users is not None:
                lim = self.users.limits(user_hash)
                if lim is not None:
                    out.append(("user", user_hash, lim))
            got = _Binding(self, tuple(out)) if out else None
            if len(self._bindings) > 4096:
                self._bindings.clear()
            self._bindings[k] = got
        return got

    def bind(self, run: Run) -> _Binding | None:
        """Bind ``run`` to its caps (``Run.caps``), if any apply."""
        b = self.binding(run.tenant_id, run.user_hash)
        if b is not None:
            self.worker.ensure_started()
            if run.caps is not b:
                run.caps = b
        return b

    def _current(self, b: _Binding, now: float) -> None:
        """Under ``lock``: the binding's accounts and buckets for the periods ``now`` is in."""
        accts, bkts, until = [], [], float("inf")
        for scope, sid, lim in b.entries:
            for key, cap in self._keys(scope, sid, lim, now):
                accts.append(self._account(key, cap))
                until = min(until, key.end)
            if lim.per_minute is not None:
                bkts.append(self._bucket(scope, sid, lim))
        b.accounts, b.buckets, b.until, b.epoch = tuple(accts), tuple(bkts), until, self.retirements

    # -- periods --------------------------------------------------------------------------------

    def _keys(self, scope: str, sid: str, lim: Limits, now: float) -> list[tuple[AccountKey, int]]:
        out = []
        if lim.daily is not None:
            d = int(now // _DAY) * _DAY
            out.append((AccountKey(scope, sid, "day", d, d + _DAY), lim.daily))
        if lim.monthly is not None:
            m0, m1 = self._month
            if not m0 <= now < m1:
                t = time.gmtime(now)
                m0 = _timegm(t.tm_year, t.tm_mon)
                m1 = m0 + monthrange(t.tm_year, t.tm_mon)[1] * _DAY
                self._month = (m0, m1)
            out.append((AccountKey(scope, sid, "month", m0, m1), lim.monthly))
        return out

    def is_current(self, key: AccountKey) -> bool:
        return key.start <= time.time() < key.end

    def _account(self, key: AccountKey, cap: int) -> LocalAccount:
        """Under ``lock``."""
        k = (key.scope, key.scope_id, key.period, key.start)
        a = self.accounts.get(k)
        if a is None:
            a = self.accounts[k] = LocalAccount(key, cap)
        elif a.cap != cap:
            a.cap = cap
        return a

    def _bucket(self, scope: str, sid: str, lim: Limits) -> LocalBucket:
        """Under ``lock``."""
        assert lim.per_minute is not None
        b = self.buckets.get((scope, sid))
        if b is None:
            b = self.buckets[(scope, sid)] = LocalBucket((scope, sid), lim.per_minute, lim.max_wait_s)
        return b

    # -- the app's thread -----------------------------------------------------------------------

    def admit(self, run: Run, span: Span, ledger: _Ledger) -> None:
        """Admit a model call of ``run`` or refuse it: ``BudgetExceededError`` through ``ledger._abort`` (the run is
        aborted, as by its own budget), nothing held then. The refusal is raised outside ``lock`` (``_abort`` takes the
        run's lock, which ``settle``'s callers hold while they take ``lock``)."""
        binding = self.bind(run)
        if binding is None:
            return
        entries = binding.entries
        est = ledger.cap_estimate(span)
        loop = on_event_loop()
        err: BudgetExceededError | None = None
        if self.throttles:
            waited = self._prewaited.pop(span._sid, None) if self._prewaited else None
            if waited:  # its async start waited on the loop (wait_async)
                span.flag("throttled")
                span.flag(f"throttle_wait_ms:{round(waited)}")
            err = self._throttle(run, span, entries, est, loop)
        held: list[tuple[Any, int]] = []
        if err is None:
            now = time.time()
            unreachable = self.unreachable()
            with self.lock:
                if now >= binding.until or binding.epoch != self.retirements:
                    self._current(binding, now)
                for a in binding.accounts:
                    r = a.try_hold(est, unreachable)
                    if r == WAIT:
                        r = self._wait_lease(a, est, loop)
                    if r == REFUSE:
                        err = self._refusal(run, a, est)
                        break
                    held.append((a, est))
                    if a.granted - a.used - a.held < max(a.cap // 32, 2 * a.largest):
                        self.worker.wake.set()  # running low: top it up before it runs dry
                if err is None:
                    for b in binding.buckets:
                        b.held += est
                        held.append((b, est))
                else:
                    for obj, e in held:
                        obj.held -= e
        if err is not None:
            ledger._abort(run, err)
        span.cap_holds = held

    def _wait_lease(self, a: LocalAccount, est: int, loop: bool) -> int:
        """Under ``cond``: wait for the worker to lease (``LEASE_WAIT_S`` at most), then decide."""
        if loop:  # a hook on an event loop never waits: what this replica knows decides
            return a.try_hold(est, True)
        t0 = time.monotonic()
        deadline = t0 + LEASE_WAIT_S
        self.lease_waits += 1
        r = WAIT
        down = False
        a.wanted += est
        try:
            while r == WAIT:
                left = deadline - time.monotonic()
                if left <= 0 or self.unreachable():  # a store this slow is taken for down
                    down = True
                    r = a.try_hold(est, True)
                    break
                self.worker.wake.set()
                self.cond.wait(left)
                down = self.unreachable()
                r = a.try_hold(est, down)
        finally:
            a.wanted -= est
        self.lease_wait_ms += (time.monotonic() - t0) * 1000.0
        if down:
            self.lease_timeouts += 1
        return r

    def _refusal(self, run: Run, a: LocalAccount, est: int) -> BudgetExceededError:
        self.refused += 1
        spent, held, others = a.figures()
        key = a.key
        who = f"tenant {key.scope_id!r}" if key.scope == "tenant" else f"user {key.scope_id[:12]}…"
        period = time.strftime("%Y-%m-%d" if key.period == "day" else "%Y-%m", time.gmtime(key.start))
        limit = "daily_usd" if key.period == "day" else "monthly_usd"
        return BudgetExceededError(
            f"{who} reached its {limit}={_usd(a.cap)} for {period} (UTC): {_usd(spent)} spent, {_usd(held)} held "
            f"by calls in flight here and {_usd(others)} leased by other replicas; refused an LLM call estimated at "
            f"{_usd(est)}",
            run_id=run.run_id, reason=limit, limit=nanos_to_usd(a.cap), spent=nanos_to_usd(spent),
            spent_usd=nanos_to_usd(run.cost_nanos),
            detail={"scope": key.scope, "id": key.scope_id, "period": key.period, "period_start": period,
                    "held_usd": nanos_to_usd(held), "leased_elsewhere_usd": nanos_to_usd(others),
                    "estimate_usd": nanos_to_usd(est)},
        )

    def _throttle(self, run: Run, span: Span, entries: tuple[Entry, ...], est: int,
                  loop: bool) -> BudgetExceededError | None:
        """Wait while a bucket of the call's tenant (user) is dry, up to its ``max_wait_s``; refuse past it (at once
        on an event loop's thread, where a hook cannot wait: see ``throttle``). A bucket this replica has no slice of
        yet is waited for as a lease is (``LEASE_WAIT_S`` at most, not on an event loop); then, or while the store
        cannot be reached, it is taken as full, as a new bucket is."""
        t0 = time.monotonic()
        throttled = False
        with self.lock:
            for scope, sid, lim in entries:
                if lim.per_minute is None:
                    continue
                b = self._bucket(scope, sid, lim)
                b.touched = True
                if est > b.largest:
                    b.largest = est
                if b.room(est):
                    continue
                deadline = t0 + lim.max_wait_s
                b.waiting += 1
                self.worker.wake.set()  # once: the worker then looks as the bucket refills
                first = not b.known
                try:
                    while not b.room(est):
                        now = time.monotonic()
                        if not b.known:
                            if loop or self.unreachable() or now - t0 >= LEASE_WAIT_S:
                                b.refill(time.time())
                            else:
                                self.cond.wait(min(LEASE_WAIT_S - (now - t0), 0.05))
                            continue
                        if self.unreachable():
                            b.refill(time.time())
                            if b.room(est):
                                break
                        elif loop and b.shared_room(est, time.time()):
                            break
                        left = deadline - now
                        if left <= 0 or loop:
                            self.throttle_refused += 1
                            self._count_wait(span, t0, throttled)
                            what = (" and a hook on an event loop cannot wait (an async LlamaIndex call: "
                                    "`async with tracker.run(...)` waits at its entry)") if loop else ""
                            return BudgetExceededError(
                                f"{scope} {sid if scope == 'tenant' else sid[:12] + '…'} is past its usd_per_minute="
                                f"{_usd(lim.per_minute)}: the call waited {now - t0:.1f}s of "
                                f"max_wait_s={lim.max_wait_s:g}{what}; refused",
                                run_id=run.run_id, reason="usd_per_minute", limit=nanos_to_usd(lim.per_minute),
                                spent_usd=nanos_to_usd(run.cost_nanos),
                                detail={"scope": scope, "id": sid, "waited_s": round(now - t0, 3)},
                            )
                        throttled = True
                        self.cond.wait(min(left, 0.25))
                finally:
                    b.waiting -= 1
                if first and not throttled:  # it waited for a first slice, not for the rate
                    self.lease_waits += 1
                    self.lease_wait_ms += (time.monotonic() - t0) * 1000.0
            if throttled:
                self._count_wait(span, t0, True)
        return None

    def note_async_wait(self, key: Any, ms: float) -> None:
        """An async start waited (``throttle.wait_async``) before its hook ran; ``ms`` slept for a throttle."""
        with self.lock:
            if ms:
                self.throttled += 1
                self.throttle_wait_ms += ms
            if key is not None:
                if len(self._prewaited) > 4096:
                    self._prewaited.clear()
                self._prewaited[key] = ms

    def _count_wait(self, span: Span, t0: float, waited: bool) -> None:
        """Under ``lock``."""
        if not waited:
            return
        ms = (time.monotonic() - t0) * 1000.0
        self.throttled += 1
        self.throttle_wait_ms += ms
        span.flag("throttled")
        span.flag(f"throttle_wait_ms:{round(ms)}")

    def ready(self, entries: tuple[Entry, ...], est: int) -> float:
        """Seconds an async start should sleep before its hook runs (0: go): a dry bucket, or an account this
        replica has no lease for yet. Used by ``throttle.wait_async``; never waits itself."""
        now = time.time()
        with self.lock:
            for scope, sid, lim in entries:
                if lim.per_minute is not None:
                    b = self._bucket(scope, sid, lim)
                    if self.unreachable():
                        b.refill(now)
                    if est > b.largest:
                        b.largest = est
                    if not b.room(est or b.largest):
                        b.touched = True  # the worker takes a slice for it
                        return -1.0 if b.known else LEASE_WAIT_S
            if not self.unreachable():
                for scope, sid, lim in entries:
                    for key, cap in self._keys(scope, sid, lim, now):
                        a = self._account(key, cap)
                        if not a.known or (a.used + a.held >= a.granted and a.cap - a.spent - a.leased > 0):
                            return LEASE_WAIT_S
        return 0.0

    def settle(self, binding: _Binding, span: Span, cost: int) -> None:
        """A span of a capped run ended (``_account``): give back what it held, spend its cost from the lease."""
        holds = span.cap_holds
        if holds is None and not cost:
            return  # a chain's span: nothing held, nothing spent
        with self.lock:
            if holds is not None:
                span.cap_holds = None
                for obj, est in holds:
                    obj.held -= est
                    if cost:
                        if type(obj) is LocalAccount:
                            obj.used += cost
                        else:
                            obj.tokens -= cost
            else:  # a cost that held nothing (a tool's price, a record): spent all the same
                when = span.start_wall
                recent = time.time() - when < 60  # a record of older spend (an import) does not slow today's calls
                for scope, sid, lim in binding.entries:
                    for key, cap in self._keys(scope, sid, lim, when):
                        if self.is_current(key):
                            self._account(key, cap).used += cost
                    if lim.per_minute is not None and recent:
                        self._bucket(scope, sid, lim).tokens -= cost

    def release(self, span: Span) -> None:
        """Give back what a call that was refused after its holds were taken held (it was never made)."""
        holds = span.cap_holds
        if holds is None:
            return
        with self.lock:
            span.cap_holds = None
            for obj, est in holds:
                obj.held -= est

    # -- the store's state ----------------------------------------------------------------------

    def unreachable(self) -> bool:
        """The store cannot be reached: its last operation failed, or the one under way has taken longer than
        ``LEASE_WAIT_S`` (a server that hangs)."""
        if self.offline:
            return True
        since = self.worker.busy_since
        return bool(since) and time.monotonic() - since > LEASE_WAIT_S

    def went_offline(self, exc: BaseException) -> None:
        self.store_errors += 1
        if not self.offline:
            self.offline = True
            logger.warning("costobs: spend caps cannot reach the database (%r): leases held are spent, then the last "
                           "figures read decide", exc)

    def back_online(self) -> None:
        if self.offline:
            self.offline = False
            logger.info("costobs: spend caps reach the database again")

    def stats(self) -> dict[str, int]:
        return {
            "caps_refused": self.refused, "throttled": self.throttled,
            "throttle_wait_ms": round(self.throttle_wait_ms), "throttle_refused": self.throttle_refused,
            "caps_lease_waits": self.lease_waits, "caps_lease_wait_ms": round(self.lease_wait_ms),
            "caps_lease_timeouts": self.lease_timeouts, "caps_store_errors": self.store_errors,
            "caps_offline": int(self.unreachable()),
            "caps_leases_lost": self.leases_lost,
        }

    def close(self, timeout: float | None) -> None:
        self.worker.stop(timeout)


_NONE: Any = object()


def _after_fork(ref: weakref.ref[SpendCaps]) -> None:
    caps = ref()
    if caps is not None:
        caps._init_state()


def _timegm(year: int, month: int) -> int:
    """Epoch seconds of the first of ``month`` at 00:00 UTC."""
    import calendar

    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))
