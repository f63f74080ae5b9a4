"""The exporter's fallback for a ``Store``: batches the database does not take are spooled as the rows the store
would have written, and replayed in order when it answers again.

A record's payload is the JSON (UTF-8, surrogates passed through) of those rows (``Store.batch_rows``) and of the
batch's id: rows rather than spans, because rows are what the database receives (a replay writes exactly what the
direct write would have), and a span's row needs none of the ledger's live objects; the id, because the database
may hold the batch already (its COMMIT went through, the reply did not), and then the replay writes none of it.
A SQLite file deleted, or its folder removed, under the tracker is noticed before each batch by the file's
identity, and the batch spooled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from .sink import PoisonBatch
from .spool import Spool
from .watchdog import Watchdog

__all__ = ["StoreSpool", "dump_rows", "file_identity", "load_batch", "load_rows", "sqlite_path"]

logger = logging.getLogger("costobs_callbacks")


class StoreSpool:
    """The exporter's ``Fallback`` for a ``Store``: batches the database does not take go to the spool as rows
    (``Store.batch_rows``), and are replayed in order when it answers again; a SQLite file deleted (or replaced)
    under the tracker is noticed before each batch, by its identity."""

    def __init__(self, store: Any, spool: Spool, *, after: Callable[[], None] | None = None,
                 watchdog: Watchdog | None = None, claim_every: float = 5.0) -> None:
        self.store = store
        self.spool = spool
        self._after = after
        self._watchdog = watchdog
        self._path = sqlite_path(store.engine.url)
        self._ident = file_identity(self._path)
        self._gone_logged = False
        self._outage = False
        self._next_try = 0.0
        self._backoff = 0.25
        self._claim_every = claim_every
        self._next_claim = time.monotonic() + claim_every

    # -- the exporter's Fallback -----------------------------------------------------------------

    def divert(self) -> bool:
        return self.spool.pending() > 0 or not self.file_ok()

    def keep(self, batch: Sequence[Any]) -> bool:
        try:
            span_rows, run_rows = self.store.batch_rows(batch)
            self.spool.append(dump_rows(span_rows, run_rows, getattr(batch, "id", None)), len(batch))
        finally:
            if self._after is not None:
                self._after()
        if not self._outage:
            self._outage = True
            logger.warning("costobs: the database is not taking writes; spooling to %s until it does",
                           self.spool.directory)
        return True

    def tick(self, final: bool = False, budget: float = 1.0) -> bool:
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + self._claim_every
            self.spool.claim()
        if not self.spool.pending() or (now < self._next_try and not final):
            return False
        if not self.file_ok():
            self._next_try = now + 1.0
            return False
        try:
            if self._outage or self._backoff > 0.25:  # the database was away at the last write or attempt
                self._probe()
            done = self.spool.replay(self._write, budget)
        except Exception as exc:
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 2.0)
            logger.info("costobs: the database is still away (%r); %d items spooled", exc, self.spool.pending())
            return False
        self._backoff = 0.25
        self._next_try = 0.0
        if done and self._outage:
            self._outage = False
            logger.warning("costobs: the database is back; the spool is replayed (%d items so far)",
                           self.spool.replayed)
        return not done

    def backlog(self) -> int:
        return self.spool.pending()

    # -- helpers --------------------------------------------------------------------------------

    def _write(self, payloads: list[bytes]) -> None:
        """Spooled records written in one transaction, those the database holds already left out (see
        ``Store.write_rows``); if the database refuses it for its content, record by record, each as its batch
        would have been written (made to fit, flagged ``sanitized``), so that the rows stored are the direct
        write's and only a record refused even so is lost."""
        records = [load_batch(p) for p in payloads]
        try:
            self._write_rows(records, fit=len(records) == 1)
        except PoisonBatch as exc:
            if len(payloads) > 1:
                for p in payloads:
                    self._write([p])
                return
            _, span_rows, run_rows = records[0]
            n = len(span_rows) or len(run_rows)
            self.spool.skip(n)
            logger.error("costobs: the database refused a spooled batch of %d (%r); it is lost", n, exc)

    def _probe(self) -> None:
        """Raise unless the database answers: asked before a replay while the database has been away, so that a
        failed attempt costs a connection attempt, not the spool's records read and decoded under the GIL the app
        shares (tens of milliseconds per attempt once the spool holds tens of thousands of spans)."""
        guard = self._watchdog.guard() if self._watchdog is not None else contextlib.nullcontext()
        with guard, self.store.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _write_rows(self, records: list[tuple[str | None, list[Any], list[Any]]], fit: bool) -> None:
        guard = self._watchdog.guard() if self._watchdog is not None else contextlib.nullcontext()
        with guard:
            self.store.write_rows(records, fit=fit)

    def file_ok(self) -> bool:
        """False while the SQLite file opened is gone from its path (deleted, its folder removed); a different
        file now at the path is taken as the database (the engine reopened on it)."""
        if self._path is None:
            return True
        ident = file_identity(self._path)
        if ident == self._ident:
            return True
        if ident is None:
            if not self._gone_logged:
                self._gone_logged = True
                logger.error("costobs: the database file %s is gone (deleted, or its folder removed); spans are "
                             "spooled to %s until a database file is there again", self._path, self.spool.directory)
            return False
        logger.warning("costobs: the database file %s was replaced; writing to the new one", self._path)
        self.store.engine.dispose()
        self.store._schema_ready = False
        self._ident = ident
        self._gone_logged = False
        return True

    def close(self) -> None:
        self.spool.close()


# -- payloads ---------------------------------------------------------------------------------------

def dump_rows(span_rows: Sequence[Sequence[Any]], run_rows: Sequence[Sequence[Any]],
              batch_id: str | None = None) -> bytes:
    """Rows and their batch's id as JSON, text as it is: UTF-8 with surrogates passed through (a ``\\u`` escape
    of a surrogate pair would come back joined, a value the database then stores unflagged where the direct write
    fits and flags it)."""
    obj: dict[str, Any] = {"s": span_rows, "r": run_rows}
    if batch_id is not None:
        obj["b"] = batch_id
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def load_batch(payload: bytes) -> tuple[str | None, list[list[Any]], list[list[Any]]]:
    """A record's batch id (``None`` in records spooled before batches had ids: written as new) and rows."""
    obj = json.loads(payload.decode("utf-8", "surrogatepass"))
    return obj.get("b"), obj["s"], obj["r"]


def load_rows(payload: bytes) -> tuple[list[list[Any]], list[list[Any]]]:
    _, span_rows, run_rows = load_batch(payload)
    return span_rows, run_rows


# -- is the SQLite file still the one opened ---------------------------------------------------------

def file_identity(path: str | None) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of a database file, ``None`` if it is not there (deleted, its folder removed)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def sqlite_path(url: Any) -> str | None:
    """The file of a SQLite URL (``None``: in memory, or not SQLite)."""
    if url.get_backend_name() != "sqlite":
        return None
    db: str | None = url.database
    if not db or db == ":memory:" or "mode=memory" in str(url):
        return None
    if db.startswith("file:"):
        db = db[5:].split("?", 1)[0]
    return os.path.abspath(db)
