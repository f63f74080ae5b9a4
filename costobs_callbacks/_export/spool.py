"""The spool: batches the database could not take, kept on disk in order until it can.

Layout: one folder per database (``default_spool_dir``); in it, one append-only ``*.spool`` file per process
that had to spool (its records: ``records``), locked (``flock``) by its writer for as long as it lives, and
beside each a ``*.done`` file: the offset up to which its records are in the database. A process that starts
(and, every few seconds, a running one) takes the lock of every file nobody holds — its writer is gone — and
replays it: one replayer per file, so a record is written once. A file fully replayed is removed.

Exactly once: the ``.done`` offset is written after each group's transaction commits. A crash between the commit
and that write replays the group again, and the store leaves out every record of it already applied (each record
carries its batch's id, recorded in the batch's transaction: ``_store.applied``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

from .records import encode, read_records

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no claiming of other processes' files
    fcntl = None  # type: ignore[assignment]

__all__ = ["Spool", "default_spool_dir"]

logger = logging.getLogger("costobs_callbacks")


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
