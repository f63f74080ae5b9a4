"""The spool: batches the database could not take, kept on disk in order until it can.

Layout: one folder per database (``default_spool_dir``); in it, one append-only ``*.spool`` file per process
that had to spool, locked (``flock``) by its writer for as long as it lives, and beside each a ``*.done``
file: the offset up to which its records are in the database. A process that starts (and, every few
seconds, a running one) takes the lock of every file nobody holds — its writer is gone — and replays it:
one replayer per file, so a record is written once. A file fully replayed is removed.

A record is self-delimiting and checksummed: ``MAGIC, payload length, item count, CRC32`` (big-endian), then
the payload: the JSON (UTF-8, surrogates passed through) of the rows the store would have written
(``Store.batch_rows``): rows rather than spans, because rows are what the database receives (a replay writes
exactly what the direct write would have), and a span's row needs none of the ledger's live objects.
A torn or corrupt record is skipped, its items counted as lost and logged; reading goes on at the next
record (found by its magic), so a crash mid-write loses that one record, never the rest.

Exactly once: the ``.done`` offset is written after each record's transaction commits. A crash between the
commit and that write (microseconds) would replay that one record again: a window accepted rather than a
unique index on ``span_id`` (which would need a migration).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no claiming of other processes' files
    fcntl = None  # type: ignore[assignment]

__all__ = ["Spool", "SpoolRecord", "default_spool_dir", "read_records"]

logger = logging.getLogger("costobs_callbacks")

MAGIC = b"CSP1"
_HEAD = struct.Struct(">4sIII")
_MAX_PAYLOAD = 1 << 30


class SpoolRecord:
    __slots__ = ("count", "end", "payload", "start")

    def __init__(self, start: int, end: int, count: int, payload: bytes | None) -> None:
        self.start = start
        self.end = end
        self.count = count
        self.payload = payload
        """``None``: the record is torn or corrupt (``count`` then is its header's, if that could be read)."""


def encode(payload: bytes, count: int) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(struct.pack(">II", len(payload), count)))
    return _HEAD.pack(MAGIC, len(payload), count, crc) + payload


def read_records(data: bytes, start: int = 0) -> Iterator[SpoolRecord]:
    """The records of ``data`` from offset ``start``: good ones with their payload, bad ones (torn, corrupt)
    with ``payload=None`` spanning the bytes skipped up to the next record's magic (or the end)."""
    pos, n = start, len(data)
    while pos < n:
        bad = _bad_at(data, pos)
        if bad is None:
            length, count = struct.unpack_from(">II", data, pos + 4)
            end = pos + _HEAD.size + length
            yield SpoolRecord(pos, end, count, data[pos + _HEAD.size:end])
            pos = end
            continue
        nxt = data.find(MAGIC, pos + 1)
        end = n if nxt < 0 else nxt
        yield SpoolRecord(pos, end, bad, None)
        pos = end


def _bad_at(data: bytes, pos: int) -> int | None:
    """``None`` if a whole, intact record starts at ``pos``; else the items it claims to hold (0 if unknown)."""
    if len(data) - pos < _HEAD.size:
        return 0
    magic, length, count, crc = _HEAD.unpack_from(data, pos)
    if magic != MAGIC:
        return 0
    if length > _MAX_PAYLOAD or pos + _HEAD.size + length > len(data):
        return int(count) if length <= _MAX_PAYLOAD else 0
    payload = memoryview(data)[pos + _HEAD.size:pos + _HEAD.size + length]
    if zlib.crc32(payload, zlib.crc32(struct.pack(">II", length, count))) != crc:
        return int(count)
    return None


def default_spool_dir(url: str, render: str) -> Path:
    """A folder per database under the user's cache directory: named by a digest of the URL (password left out,
    ``render``), with a readable prefix."""
    from platformdirs import user_cache_dir

    digest = hashlib.sha256(render.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", render.rsplit("/", 1)[-1])[:40] or "db"
    return Path(user_cache_dir("costobs-callbacks", appauthor=False)) / "spool" / f"{label}-{digest}"


class _File:
    """One spool file this process holds the lock of (its own, or one claimed from a process gone)."""

    __slots__ = ("done", "done_fd", "fd", "path", "pending", "size")

    def __init__(self, path: Path, fd: int, done_fd: int, done: int, size: int, pending: int) -> None:
        self.path = path
        self.fd = fd
        self.done_fd = done_fd
        self.done = done
        self.size = size
        self.pending = pending

    def mark(self, offset: int) -> None:
        self.done = offset
        os.pwrite(self.done_fd, b"%020d\n" % offset, 0)

    def remove(self) -> None:
        """Unlink first, then release the lock: a process that takes the lock afterwards finds the path gone."""
        for p in (self.path, self.path.with_suffix(".done")):
            with contextlib.suppress(OSError):
                p.unlink()
        self.close()

    def close(self) -> None:
        for fd in (self.fd, self.done_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


class Spool:
    """The spool of one database. Used from the exporter's thread only (the counters are read anywhere)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"{self.directory} is not a directory")
        self._own: _File | None = None
        self._claimed: list[_File] = []
        self._left = 0  # items of the files released by ``close``
        self._pid = os.getpid()
        self.spooled = 0
        """Items this process wrote to the spool."""
        self.replayed = 0
        """Items this process replayed from the spool into the database."""
        self.lost = 0
        """Items of torn or corrupt records (and records the database refused outright) skipped."""
        self.claim()
        self.found = sum(f.pending for f in self._claimed)
        """Items found spooled by processes gone, when this spool opened."""
        ref = weakref.ref(self)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: _spool_after_fork(ref))

    # -- state ----------------------------------------------------------------------------------

    def pending(self) -> int:
        """Items in the spool files this process holds, not yet in the database."""
        own = self._own
        return sum(f.pending for f in self._claimed) + (own.pending if own is not None else 0) + self._left

    def claimed_pending(self) -> int:
        return sum(f.pending for f in self._claimed)

    # -- writing --------------------------------------------------------------------------------

    def append(self, payload: bytes, count: int) -> None:
        """Add one batch at the end of this process's file (made on first use). All or nothing: a failed write
        is cut back, so the file holds whole records only (a crash mid-write leaves one torn tail)."""
        f = self._own
        if f is None:
            f = self._own = self._open_own()
        rec = encode(payload, count)
        try:
            written = os.write(f.fd, rec)
            while written < len(rec):
                written += os.write(f.fd, rec[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(f.fd, f.size)
            raise
        f.size += len(rec)
        f.pending += count
        self.spooled += count

    def _open_own(self) -> _File:
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.directory / f"{name}.spool"
        for attempt in range(3):  # made when first needed (and again if another process just removed it)
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        _lock(fd)
        done_fd = os.open(path.with_suffix(".done"), os.O_RDWR | os.O_CREAT, 0o600)
        return _File(path, fd, done_fd, 0, 0, 0)

    # -- claiming the files of processes gone -----------------------------------------------------

    def claim(self) -> int:
        """Take every unlocked spool file of the folder (its writer is gone); returns how many items they hold.
        Without ``flock`` (not POSIX) a live writer cannot be told from a gone one: nothing is claimed."""
        if fcntl is None:  # pragma: no cover
            return 0
        held = {f.path for f in self._claimed}
        if self._own is not None:
            held.add(self._own.path)
        found = 0
        try:
            paths = sorted(self.directory.glob("*.spool"))
        except OSError:
            return 0
        for path in paths:
            if path in held:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            if not _lock(fd):
                os.close(fd)
                continue
            try:
                st, now = os.fstat(fd), os.stat(path)
            except OSError:
                os.close(fd)
                continue
            if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):  # replayed and removed meanwhile
                os.close(fd)
                continue
            done_fd = os.open(path.with_suffix(".done"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                done = int(os.pread(done_fd, 32, 0).strip() or 0)
            except ValueError:
                done = 0
            pending = 0
            data = _read_all(fd)
            done = min(done, len(data))
            for rec in read_records(data, done):
                if rec.payload is not None:
                    pending += rec.count
            f = _File(path, fd, done_fd, done, len(data), pending)
            self._claimed.append(f)
            found += pending
            if data:
                logger.warning("costobs: found %d spooled items in %s; replaying them", pending, path)
        return found

    # -- replaying ------------------------------------------------------------------------------

    def replay(self, write: Callable[[list[bytes]], None], budget: float = 1.0, group: int = 4096) -> bool:
        """Write spooled records in order (claimed files, oldest first, then this process's own) with ``write``,
        consecutive records together up to ``group`` items (one transaction); ``write`` raises if the database
        is away: replay stops there, the records kept. Stops after ``budget`` seconds. True if everything held
        is in the database."""
        stop = time.monotonic() + budget
        for f in [*self._claimed, *([self._own] if self._own is not None else [])]:
            if not self._replay_file(f, write, stop, group):
                return False
            if f is self._own:
                self._own = None
            else:
                self._claimed.remove(f)
            f.remove()
        with contextlib.suppress(OSError):  # the folder too, once empty
            self.directory.rmdir()
        return True

    def _replay_file(self, f: _File, write: Callable[[list[bytes]], None], stop: float, group: int) -> bool:
        if f.done >= f.size:
            return True
        base = f.done
        data = os.pread(f.fd, f.size - base, base)
        batch: list[bytes] = []
        count = end = 0

        def commit() -> None:
            nonlocal batch, count
            if batch:
                write(batch)  # raises: kept for the next attempt
                f.pending -= count
                self.replayed += count
                batch, count = [], 0
            f.mark(base + end)

        for rec in read_records(data):
            if rec.payload is None:
                commit()
                self.lost += rec.count
                end = rec.end
                f.mark(base + end)
                logger.error("costobs: spool file %s: %d bytes at offset %d torn or corrupt (%d items lost); "
                             "the rest is replayed", f.path, rec.end - rec.start, base + rec.start, rec.count)
                continue
            batch.append(rec.payload)
            count += rec.count
            end = rec.end
            if count >= group:
                commit()
                if time.monotonic() > stop and f.done < f.size:
                    return False
        commit()
        return f.done >= f.size

    def skip(self, payload_count: int) -> None:
        self.lost += payload_count

    def close(self) -> None:
        """Release the files (their locks): what they still hold is replayed by the next process (and still
        counted in ``pending``)."""
        self._left += self.pending()
        for f in [*self._claimed, *([self._own] if self._own is not None else [])]:
            if f.done >= f.size:
                f.remove()
            else:
                f.close()
        self._claimed.clear()
        self._own = None


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _spool_after_fork(ref: weakref.ReferenceType[Spool]) -> None:
    sp = ref()
    if sp is not None:  # the parent's files stay the parent's; the child spools to its own
        for f in [*sp._claimed, *([sp._own] if sp._own is not None else [])]:
            f.close()
        sp._claimed = []
        sp._own = None
        sp._left = 0
        sp.spooled = sp.replayed = sp.lost = sp.found = 0


# -- payloads ---------------------------------------------------------------------------------------

def _merged(parts: list[tuple[list[list[Any]], list[list[Any]]]]) -> tuple[list[Any], list[Any]]:
    """Several batches' rows as one: span rows in order, one run row per run (a run upserted twice in one
    statement is refused by PostgreSQL): its totals summed, its status, reason and end the latest batch's."""
    if len(parts) == 1:
        return parts[0]
    spans: list[Any] = []
    runs: dict[Any, list[Any]] = {}
    for sp, rr in parts:
        spans.extend(sp)
        for r in rr:
            old = runs.get(r[0])
            if old is None:
                runs[r[0]] = list(r)
                continue
            old[7:11] = r[7:9] + old[9:10] + r[10:11]  # status, reason, (started kept), ended: the latest
            for i in range(11, len(r)):
                old[i] += r[i]
    return spans, list(runs.values())


def dump_rows(span_rows: Sequence[Sequence[Any]], run_rows: Sequence[Sequence[Any]]) -> bytes:
    """Rows as JSON, text as it is: UTF-8 with surrogates passed through (a ``\\u`` escape of a surrogate pair
    would come back joined, a value the database then stores unflagged where the direct write fits and flags
    it)."""
    text = json.dumps({"s": span_rows, "r": run_rows}, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def load_rows(payload: bytes) -> tuple[list[list[Any]], list[list[Any]]]:
    obj = json.loads(payload.decode("utf-8", "surrogatepass"))
    return obj["s"], obj["r"]


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


# -- a database call that hangs ----------------------------------------------------------------------

class Watchdog:
    """Cuts the sockets of a PostgreSQL engine's connections when a call on the exporter's thread outlives its
    deadline: ``statement_timeout`` is the server's, and a server (or a proxy) that accepted the connection and
    went silent never sends it; a socket shut down makes the driver's wait end with an error at once."""

    def __init__(self, engine: Any, timeout: float) -> None:
        self.timeout = timeout
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.fired = 0
        import sqlalchemy as sa

        sa.event.listen(engine, "connect", self._on_connect)

    def _on_connect(self, dbapi_conn: Any, _record: Any) -> None:
        with contextlib.suppress(TypeError):
            self._conns.add(dbapi_conn)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        with self._cond:
            self._deadline = time.monotonic() + self.timeout
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._watch, name="costobs-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait(30.0)
                    if self._deadline is None:
                        self._thread = None
                        return
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None
                self.fired += 1
                conns = list(self._conns)
                logger.error("costobs: a database call outlived %.1fs; cutting %d connections", self.timeout,
                             len(conns))
                for c in conns:
                    _cut(c)


def _cut(conn: Any) -> None:
    try:
        fd = conn.fileno()
    except Exception:
        return
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


# -- the exporter's fallback: the store's spool ------------------------------------------------------

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
            self.spool.append(dump_rows(span_rows, run_rows), len(batch))
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
        """Spooled records written in one transaction; if the database refuses it for its content, record by
        record, each as its batch would have been written (made to fit, flagged ``sanitized``), so that the
        rows stored are the direct write's and only a record refused even so is lost."""
        from ._export import PoisonBatch

        try:
            if len(payloads) > 1:
                self._write_rows(*_merged([load_rows(p) for p in payloads]), fit=False)
            else:
                self._write_rows(*load_rows(payloads[0]))
        except PoisonBatch as exc:
            if len(payloads) > 1:
                for p in payloads:
                    self._write([p])
                return
            span_rows, run_rows = load_rows(payloads[0])
            n = len(span_rows) or len(run_rows)
            self.spool.skip(n)
            logger.error("costobs: the database refused a spooled batch of %d (%r); it is lost", n, exc)

    def _write_rows(self, span_rows: list[Any], run_rows: list[Any], fit: bool = True) -> None:
        guard = self._watchdog.guard() if self._watchdog is not None else contextlib.nullcontext()
        with guard:
            self.store.write_rows(span_rows, run_rows, fit=fit)

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
