"""Spend caps and rate throttles per tenant and per user, held across every replica sharing one database.

The data flow, module by module: ``policy`` (what a tenant may spend, validated at the edge) -> ``guard`` (what the
ledger calls: admit a call, settle its cost) -> ``leases`` (this replica's share of each account, on the app's
thread) and ``throttle`` (waits that never block an event loop) -> ``worker`` (the caps' own thread) ->
``accounts`` (the shared rows: accounts, leases, rate buckets).
"""

from .guard import LEASE_WAIT_S, SpendCaps
from .policy import DEFAULT_KEY, CapPolicy, CapTable, coerce_cap_table

__all__ = ["DEFAULT_KEY", "LEASE_WAIT_S", "CapPolicy", "CapTable", "SpendCaps", "coerce_cap_table"]
