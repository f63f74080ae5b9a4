"""What the exporter asks of where its batches go: the sink takes a ``Batch`` (its items and its id) and raises
``PoisonBatch`` for one refused for its content (the exporter then bisects it), and a ``Fallback`` keeps the
batches the sink cannot take (the spool)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

__all__ = ["Batch", "Fallback", "PoisonBatch", "new_batch_id"]


class Batch(list[Any]):
    """Items written together, and the batch's id: given when the exporter forms the batch, kept through every
    retry and into the spool's record, so that the store applies a batch once however often it arrives (a COMMIT
    whose reply was lost, a replay after a crash; see ``_store.applied``). The halves of a bisected batch are
    batches of their own (the failed attempt rolled back)."""

    __slots__ = ("id",)

    def __init__(self, items: Iterable[Any] = (), batch_id: str | None = None) -> None:
        super().__init__(items)
        self.id: str = batch_id or new_batch_id()


def new_batch_id() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits. Unique across processes, and ordered
    by the time the batch was formed as text too, which is how ``costobs db prune`` finds the ids of batches formed
    before its cut."""
    return f"{time.time_ns() // 1_000_000:012x}{_random_bits(80):020x}"


_rng = random.Random()  # seeded from the OS: an app's own random.seed() cannot make two processes' ids alike
_random_bits = _rng.getrandbits
"""Random bits without a system call (``os.urandom`` would give the GIL up on the exporter's thread, and wait to
get it back behind a busy app thread), reseeded in a forked child, which would otherwise repeat its parent's."""
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rng.seed)


class PoisonBatch(Exception):
    """Raised by a sink when a batch failed because of its *content* (a row the database refuses),
    not because the database is unreachable: retrying the same batch cannot help, so the exporter
    splits it to write every good item and count the bad ones."""


class Fallback(Protocol):
    """Where batches go while the sink cannot take them (called on the worker's thread only)."""

    def divert(self) -> bool:
        """True: send the next batch to ``keep`` without trying the sink (a backlog to keep order behind)."""

    def keep(self, batch: Sequence[Any]) -> bool:
        """Keep a batch for later; False if it could not be kept either."""

    def tick(self, final: bool = False, budget: float = 1.0) -> bool:
        """Move what is kept on to the database, when due (``final``: now, once, for up to ``budget`` s).
        True: more is ready to move at once (the worker goes on without waiting)."""

    def backlog(self) -> int:
        """Items kept, not yet in the database."""
