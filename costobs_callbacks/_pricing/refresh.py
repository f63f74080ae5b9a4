"""Newer catalog data from its publisher (genai-prices' ``UpdatePrices``), fetched in a daemon thread every
``interval`` seconds or on demand, and handed to the book, which keeps it private (genai-prices' global data is
left alone). Never blocks a caller's call and never raises for network trouble: offline, the data in use stays
(logged at INFO)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import genai_prices
from genai_prices import data_snapshot

__all__: list[str] = []

logger = logging.getLogger("costobs_callbacks")

Fetcher = Callable[[], data_snapshot.DataSnapshot | None]
"""What fetches newer catalog data: a ``DataSnapshot``, or ``None`` for "nothing new"; may raise."""


class _Refresher:
    """Fetches newer catalog data with ``fetcher`` (default: the publisher's JSON) and hands it to ``install``."""

    def __init__(self, fetcher: Fetcher | None, interval: float,
                 install: Callable[[data_snapshot.DataSnapshot], None]) -> None:
        self._fetcher = fetcher
        self._interval = interval
        self._install = install
        self.attempted = threading.Event()  # set after each attempt, for waiters
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Fetch now and every ``interval`` seconds in a daemon thread (one at a time)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            thread = threading.Thread(target=self._loop, args=(self._stop,), name="costobs-price-refresh",
                                      daemon=True)
            self._thread = thread
        thread.start()

    def refresh_now(self) -> bool:
        """Fetch in the calling thread; ``True`` if new data was installed."""
        return self._attempt(None)

    def close(self) -> None:
        """Stop the thread, if any (waits at most a moment; it is a daemon)."""
        with self._lock:
            thread = self._thread
            self._thread = None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=0.5)

    def _fetch(self) -> data_snapshot.DataSnapshot | None:
        if self._fetcher is not None:
            return self._fetcher()
        return genai_prices.UpdatePrices(update_interval=self._interval).fetch()

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._attempt(stop)
            if stop.wait(self._interval):
                break

    def _attempt(self, stop: threading.Event | None) -> bool:
        """One fetch, its data installed unless ``stop`` was set meanwhile; ``True`` if new data was installed. Waiters
        are woken once it is over (the data installed first)."""
        installed = False
        try:
            snapshot = self._fetch()
        except Exception as exc:  # offline or bad data: keep the prices in use
            logger.info("genai-prices refresh failed (%s: %s); keeping the prices in use", type(exc).__name__, exc)
        else:
            if snapshot is not None and (stop is None or not stop.is_set()):
                self._install(snapshot)
                installed = True
        finally:
            self.attempted.set()
        return installed
