"""What an adapter does with an exception of its own (a bug of ours, a payload it could not read): count it, log it
(at most once every few seconds, so that a fault on every call cannot flood the app's log) and carry on. Only a
deliberate ``RunAborted`` may reach the app; every adapter hook catches the rest and hands it here."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._ledger import Ledger

__all__ = ["Faults"]

logger = logging.getLogger("costobs_callbacks")

LOG_EVERY_S = 5.0


class Faults:
    """One adapter's internal errors: counted here and in its ledger (``tracker.stats["internal_errors"]``)."""

    __slots__ = ("_last_log", "count", "ledger", "where")

    def __init__(self, ledger: Ledger, where: str) -> None:
        self.ledger = ledger
        self.where = where  # "LangChain", "LlamaIndex": named in the log line
        self.count = 0
        self._last_log = float("-inf")

    def __call__(self, hook: str, exc: BaseException) -> None:
        self.count += 1
        self.ledger.internal_errors += 1
        now = time.monotonic()
        if now - self._last_log > LOG_EVERY_S:
            self._last_log = now
            logger.warning("costobs: internal error in %s %s (%d so far): %r", self.where, hook, self.count, exc,
                           exc_info=exc)
