"""Exactly once: every batch applied records its id (``costobs_batches``) in its own transaction.

A batch gets its id when the exporter forms it (``_export.Batch``); the id stays with it through every retry and
into the spool's record. A write first inserts the ids of what it writes, ``ON CONFLICT DO NOTHING RETURNING``:
the ids returned are new, and an id not returned belongs to a batch the database holds already (a COMMIT that
went through while its reply was lost, then retried or spooled and replayed; a replay of a spool group whose
COMMIT went through before the process died, ahead of the spool's offset update). Nothing of such a batch is
written again: its spans, its runs' totals and its hourly rollups share the transaction the id was inserted in,
so they were applied with it, or rolled back with it. Two writers of one id at the same moment: the second waits
for the first's transaction (the primary key's lock) and sees its outcome.

Span ids are not unique by themselves (invocations of one LangChain config give their root calls the config's
run id, and so one span id), so no key of the spans table could tell a span written twice from two calls; and a
key there would leave the run totals and rollups, which are sums, counting twice. The batch is the unit that is
applied whole or not at all, so the batch is what is recorded.

The ids are kept as long as a spooled copy of their batch could still arrive: ``costobs db prune`` deletes those
of batches formed before its cut (the id begins with that time, see ``id_bound``), with the spans; a spool record
older than the spans kept is replayed as a new batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .schema import batches

__all__: list[str] = []

_PG_CLAIM_ONE = "INSERT INTO costobs_batches (batch_id) VALUES (%s) ON CONFLICT DO NOTHING RETURNING batch_id"
_PG_CLAIM = ("INSERT INTO costobs_batches (batch_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING "
             "RETURNING batch_id")

_SQLITE_CLAIM = "INSERT INTO costobs_batches (batch_id) VALUES {} ON CONFLICT DO NOTHING RETURNING batch_id"

_SQLITE_SIZES = (256, 64, 16, 4, 1)
"""Ids per SQLite statement: a few sizes, so that sqlite3's statement cache holds a few texts (a direct write
claims one id; a replay one per record of its group)."""


def claim(conn: Connection, dialect: str, driver_sql: bool, ids: Sequence[str]) -> set[str]:
    """Insert ``ids`` in ``conn``'s transaction; the ones that were not there before. ``driver_sql``: this store
    writes through the driver's own statements (SQLite's and PostgreSQL's fast paths): the statement goes to the
    driver's cursor on the transaction's connection, without SQLAlchemy's result (half the CPU of this statement,
    which every batch runs once, on the exporter's thread)."""
    if driver_sql and dialect in ("postgresql", "sqlite"):
        cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            if dialect == "postgresql":
                if len(ids) == 1:
                    cur.execute(_PG_CLAIM_ONE, (ids[0],))
                else:
                    cur.execute(_PG_CLAIM, (list(ids),))
                return {r[0] for r in cur.fetchall()}
            new: set[str] = set()
            i, n = 0, len(ids)
            while i < n:
                size = next(z for z in _SQLITE_SIZES if z <= n - i)
                cur.execute(_SQLITE_CLAIM.format(",".join(["(?)"] * size)), tuple(ids[i:i + size]))
                new.update(r[0] for r in cur.fetchall())
                i += size
            return new
        finally:
            cur.close()
    return _claim_portable(conn, ids)


def _claim_portable(conn: Connection, ids: Sequence[str]) -> set[str]:
    """``claim`` in SQLAlchemy Core alone: the ids stored are read, the others inserted (a writer of the same id
    at the same moment makes the insert fail, and the batch is retried: nothing is written twice)."""
    have: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = list(ids[i:i + 500])
        have.update(r[0] for r in conn.execute(sa.select(batches.c.batch_id).where(batches.c.batch_id.in_(chunk))))
    new = [b for b in dict.fromkeys(ids) if b not in have]
    if new:
        conn.execute(sa.insert(batches), [{"batch_id": b} for b in new])
    return set(new)


def id_bound(epoch_seconds: float) -> str:
    """The smallest batch id of a batch formed at ``epoch_seconds`` or later: ids below it are older."""
    return f"{int(epoch_seconds * 1000):012x}" + "0" * 20


def prune_statement(epoch_seconds: float, limit: int) -> Any:
    """Delete up to ``limit`` ids of batches formed before ``epoch_seconds`` (a range of the primary key)."""
    old = sa.select(batches.c.batch_id).where(batches.c.batch_id < id_bound(epoch_seconds)).limit(limit)
    return sa.delete(batches).where(batches.c.batch_id.in_(old.scalar_subquery()))
