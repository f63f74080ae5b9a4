"""A TCP proxy in front of the PostgreSQL server that the outage tests control.

``cut()`` refuses connections and closes the open ones, ``hang()`` accepts them and forwards nothing,
``restore()`` forwards again (on the same port), and ``drop_commit_replies(n)`` makes the next ``n`` COMMITs
sent through it reach the server while their replies never reach the client: the proxy swallows what the server
answers until the server's ``CommandComplete`` of that COMMIT (the transaction is then committed), and closes both
sides. The client sees its connection lost during COMMIT, and cannot know that the server committed.

The COMMIT is recognised in PostgreSQL's wire protocol as the simple query psycopg sends for ``commit()``
(``Q``, length 11, ``COMMIT\\0``); its completion as ``C``, length 11, ``COMMIT\\0``.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["Proxy"]

_COMMIT_QUERY = b"Q\x00\x00\x00\x0bCOMMIT\x00"
_COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"


class _Pair:
    """A client's connection and the proxy's connection to the server for it."""

    __slots__ = ("client", "swallow", "upstream")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.swallow = False  # the server's replies are swallowed, up to a COMMIT's completion


class Proxy:
    """A TCP proxy to ``127.0.0.1:target_port`` (see the module's docstring)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.mode = "up"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.port = 0
        self._drop_commits = 0
        self.commits_dropped = 0
        """COMMITs the server completed whose reply the proxy swallowed (their connections then closed)."""
        self._listen()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(client)
            if self.mode == "hang":
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks.append(upstream)
            pair = _Pair(client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: _Pair, to_server: bool) -> None:
        tail = b""  # the end of the previous chunk: a message may straddle two reads
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.mode == "hang":  # swallowed, never delivered: the peer waits until it gives up
                    while self.mode == "hang":
                        time.sleep(0.05)
                    break
                if self.mode != "up":
                    break
                seen = tail + data
                fresh = max(0, len(tail) - len(_COMMIT_QUERY) + 1)  # a match must end in this chunk
                tail = seen[-16:]
                if to_server:
                    if self._drop_commits > 0 and seen.find(_COMMIT_QUERY, fresh) >= 0:
                        with self._lock:
                            armed = self._drop_commits > 0
                            if armed:
                                self._drop_commits -= 1
                        if armed:
                            pair.swallow = True  # before the COMMIT leaves: its reply cannot slip through
                elif pair.swallow:
                    if seen.find(_COMMIT_DONE, fresh) >= 0:  # the server committed; the client never hears it
                        with self._lock:
                            self.commits_dropped += 1
                        break
                    continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def _close_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def drop_commit_replies(self, n: int = 1) -> None:
        """The next ``n`` COMMITs go through, their replies do not (see the module's docstring)."""
        with self._lock:
            self._drop_commits = n

    def cut(self) -> None:
        self.mode = "down"
        assert self._listener is not None
        self._listener.close()
        self._listener = None
        self._close_all()

    def hang(self) -> None:
        self.mode = "hang"

    def restore(self) -> None:
        was = self.mode
        self.mode = "up"
        if was == "hang":
            self._close_all()  # what was swallowed is gone; the driver reconnects
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.mode = "down"
        if self._listener is not None:
            self._listener.close()
        self._close_all()
