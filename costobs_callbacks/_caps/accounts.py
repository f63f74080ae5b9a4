"""The shared side of spend caps: one account row per (scope, id, period) in the database every replica uses,
the leases replicas hold on it, and one token bucket per throttled tenant (or user). Only the caps' own thread
(``worker``) calls this module; nothing here runs on the app's thread.

Every change is a read-modify-write of one row under its lock, in one transaction: ``SELECT ... FOR UPDATE`` on
PostgreSQL, SQLite's write lock (``BEGIN IMMEDIATE``) on a file several processes share. An account holds:

* ``cap_nanos``: the cap, as the replica that wrote last has it configured;
* ``reported_nanos``: what capped replicas reported spending in the period (at once, as their calls end);
* ``rollup_nanos``: the period's spend in the hourly rollups, read when the account is made and again at every
  refresh: what was spent before the cap was configured, spend recorded by processes without caps, and what a
  replica that died spent without reporting it, once its spans are stored;
* ``leased_nanos``: what replicas hold as leases (the sum of the lease rows).

What the tenant spent is ``max(reported, rollup)``: both count the same calls, with different lags (the reports
lead; the rollups follow the exporter, and alone see spend from elsewhere), so the larger never counts a call twice,
and falls short of the truth only by what the rollups do not have yet of spend from elsewhere.

A lease is granted from ``cap - spent - leased`` (a partial grant of what is left), so leases never promise more
than the cap leaves; each lease row has an expiry, extended at every refresh, and an expired one (its replica gone)
is given back to the account by the next replica that leases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

__all__ = ["AccountFigures", "AccountKey", "AccountStore", "accounts", "buckets", "leases", "metadata"]

metadata = sa.MetaData()

_BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")



def _key_cols() -> list[sa.Column[Any]]:
    return [
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("scope_id", sa.String(256), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("period_start", _BigInt, nullable=False),
    ]


accounts = sa.Table(
    "costobs_cap_accounts",
    metadata,
    *_key_cols(),
    sa.Column("cap_nanos", _BigInt, nullable=False),
    sa.Column("reported_nanos", _BigInt, nullable=False, server_default="0"),
    sa.Column("rollup_nanos", _BigInt, nullable=False, server_default="0"),
    sa.Column("leased_nanos", _BigInt, nullable=False, server_default="0"),
    sa.Column("updated_at", sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint("scope", "scope_id", "period", "period_start", name="pk_costobs_cap_accounts"),
)
"""One row per (``tenant``/``user``, tenant id or user hash, ``day``/``month``, period start in epoch seconds)."""

leases = sa.Table(
    "costobs_cap_leases",
    metadata,
    *_key_cols(),
    sa.Column("holder", sa.String(32), nullable=False),
    sa.Column("amount_nanos", _BigInt, nullable=False),
    sa.Column("expires_at", sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint("scope", "scope_id", "period", "period_start", "holder", name="pk_costobs_cap_leases"),
)
"""What each replica (``holder``: a tracker's random id) holds of an account, until ``expires_at`` (epoch s)."""

buckets = sa.Table(
    "costobs_cap_buckets",
    metadata,
    sa.Column("scope", sa.String(8), nullable=False),
    sa.Column("scope_id", sa.String(256), nullable=False),
    sa.Column("level_nanos", _BigInt, nullable=False),
    sa.Column("updated_at", sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint("scope", "scope_id", name="pk_costobs_cap_buckets"),
)
"""The ``usd_per_minute`` token bucket of a tenant (user): ``level_nanos`` at ``updated_at``, refilled at the rate
up to one minute's worth; replicas take slices of it."""


_HALF = 2**32


@dataclass(frozen=True, slots=True)
class AccountKey:
    scope: str
    scope_id: str
    period: str
    """``day`` or ``month``."""
    start: int
    """The period's start, epoch seconds (UTC)."""
    end: int

    def where(self, t: sa.Table) -> Any:
        return sa.and_(t.c.scope == self.scope, t.c.scope_id == self.scope_id, t.c.period == self.period,
                       t.c.period_start == self.start)


@dataclass(frozen=True, slots=True)
class AccountFigures:
    """An account as read: what the tenant spent (``max(reported, rollup)``) and what is leased out."""

    spent: int
    leased: int
    granted: int = 0
    """What this operation granted (a lease) or kept of this holder's lease (a report)."""
    lease_lost: bool = False
    """This holder's lease row was gone (expired and given back): its local lease is void."""


class AccountStore:
    """The accounts, leases and buckets in one database (an engine shared with the tracker's store)."""

    def __init__(self, engine: sa.Engine, holder: str, lease_ttl: float) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.holder = holder
        self.lease_ttl = lease_ttl

    # -- transactions -----------------------------------------------------------------------------

    def _begin(self, conn: sa.Connection) -> None:
        if self.dialect == "sqlite":
            from .._store import _sqlite_write_lock

            _sqlite_write_lock(conn)

    def _locked(self, conn: sa.Connection, t: sa.Table, where: Any) -> Any:
        q = sa.select(t).where(where)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        return conn.execute(q).mappings().first()

    def _upsert_ignore(self, conn: sa.Connection, t: sa.Table, values: dict[str, Any]) -> None:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            conn.execute(pg_insert(t).values(**values).on_conflict_do_nothing())
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as lite_insert

            conn.execute(lite_insert(t).values(**values).on_conflict_do_nothing())
        else:  # another dialect: insert, and take a duplicate as made by another replica
            try:
                with conn.begin_nested():
                    conn.execute(sa.insert(t).values(**values))
            except sa.exc.IntegrityError:
                pass

    # -- accounts ---------------------------------------------------------------------------------

    def rollup_spend(self, conn: sa.Connection, key: AccountKey) -> int:
        """The period's spend of the tenant (user) in the hourly rollups (every kind of span, every process)."""
        r = sa.table("costobs_rollups_hourly", sa.column("hour"), sa.column("tenant_id"), sa.column("user_hash"),
                     sa.column("cost_hi"), sa.column("cost_lo"))
        col = r.c.tenant_id if key.scope == "tenant" else r.c.user_hash
        hi, lo = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(r.c.cost_hi), 0), sa.func.coalesce(sa.func.sum(r.c.cost_lo), 0))
            .where(col == key.scope_id, r.c.hour >= key.start // 3600, r.c.hour < key.end // 3600)).one()
        return int(hi) * _HALF + int(lo)

    def _account(self, conn: sa.Connection, key: AccountKey, cap: int, now: float) -> tuple[Any, bool]:
        """The account's row, locked, and whether it was made here (from the rollups, read just now)."""
        row = self._locked(conn, accounts, key.where(accounts))
        if row is not None:
            return row, False
        self._upsert_ignore(conn, accounts, dict(
            scope=key.scope, scope_id=key.scope_id, period=key.period, period_start=key.start, cap_nanos=cap,
            reported_nanos=0, rollup_nanos=self.rollup_spend(conn, key), leased_nanos=0, updated_at=now))
        return self._locked(conn, accounts, key.where(accounts)), True

    def _reclaim(self, conn: sa.Connection, key: AccountKey, now: float) -> int:
        """Delete the expired leases of other holders; what they held (the account's ``leased`` drops by it)."""
        gone = conn.execute(
            sa.delete(leases).where(key.where(leases), leases.c.expires_at < now, leases.c.holder != self.holder)
            .returning(leases.c.amount_nanos)).all()
        return sum(int(a) for (a,) in gone)

    def settle(self, key: AccountKey, cap: int, *, used: int, from_lease: int, give_back: int, want: int,
               reconcile: bool, holding: int = 0) -> AccountFigures:
        """One round for this holder on one account, in one transaction: report ``used`` (``from_lease`` of it
        taken from this holder's lease), give ``give_back`` of the lease back, lease up to ``want`` more (a partial
        grant of what the cap leaves), extend the lease's expiry, and with ``reconcile`` read the period's
        rollups again. ``holding``: what this holder believes it holds (a lease that is gone is reported lost).
        Returns the account's figures after it and what this holder now holds as a lease."""
        now = time.time()
        with self.engine.begin() as conn:
            self._begin(conn)
            row, made = self._account(conn, key, cap, now)
            leased = int(row["leased_nanos"])
            reported = int(row["reported_nanos"]) + used
            rollup = self.rollup_spend(conn, key) if reconcile and not made else int(row["rollup_nanos"])
            mine = conn.execute(sa.select(leases.c.amount_nanos).where(key.where(leases),
                                                                        leases.c.holder == self.holder)).scalar()
            if leased > (mine or 0):  # other replicas hold leases: give back those that expired
                leased -= self._reclaim(conn, key, now)
            lost = False
            if mine is None:
                held = 0
                lost = holding > 0  # our lease expired while we were away, and another replica gave it back
            else:
                take = min(int(mine), from_lease + give_back)
                held = int(mine) - take
                leased -= take
            spent = max(reported, rollup)
            free = cap - spent - leased
            grant = max(0, min(want, free))
            held += grant
            leased += grant
            conn.execute(sa.update(accounts).where(key.where(accounts)).values(
                cap_nanos=cap, reported_nanos=reported, rollup_nanos=rollup, leased_nanos=leased, updated_at=now))
            lw = sa.and_(key.where(leases), leases.c.holder == self.holder)
            if held > 0:
                if mine is None:
                    conn.execute(sa.insert(leases).values(
                        scope=key.scope, scope_id=key.scope_id, period=key.period, period_start=key.start,
                        holder=self.holder, amount_nanos=held, expires_at=now + self.lease_ttl))
                else:
                    conn.execute(sa.update(leases).where(lw).values(amount_nanos=held,
                                                                    expires_at=now + self.lease_ttl))
            elif mine is not None:
                conn.execute(sa.delete(leases).where(lw))
        return AccountFigures(spent, leased, held, lost)

    # -- buckets ----------------------------------------------------------------------------------

    def take(self, scope: str, scope_id: str, capacity: int, want: int, give_back: int = 0) -> tuple[int, int]:
        """Take up to ``want`` nano-dollars from the tenant's (user's) rate bucket, after giving ``give_back`` back;
        the bucket refills at ``capacity`` per minute up to ``capacity``. Returns (granted, level left)."""
        now = time.time()
        where = sa.and_(buckets.c.scope == scope, buckets.c.scope_id == scope_id)
        with self.engine.begin() as conn:
            self._begin(conn)
            row = self._locked(conn, buckets, where)
            if row is None:
                self._upsert_ignore(conn, buckets, dict(scope=scope, scope_id=scope_id, level_nanos=capacity,
                                                        updated_at=now))
                row = self._locked(conn, buckets, where)
            elapsed = max(0.0, now - float(row["updated_at"]))
            level = min(capacity, int(row["level_nanos"]) + int(capacity * elapsed / 60.0) + give_back)
            grant = max(0, min(want, level))
            level -= grant
            conn.execute(sa.update(buckets).where(where).values(level_nanos=level, updated_at=now))
        return grant, level
