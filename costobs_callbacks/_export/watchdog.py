"""A database call that hangs: the exporter's calls to PostgreSQL given a deadline, their sockets cut past it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["Watchdog"]

logger = logging.getLogger("costobs_callbacks")


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
