"""What the exporter asks of where its batches go: the sink raises ``PoisonBatch`` for a batch refused for its
content (the exporter then bisects it), and a ``Fallback`` keeps the batches the sink cannot take (the spool)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["Fallback", "PoisonBatch"]


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
