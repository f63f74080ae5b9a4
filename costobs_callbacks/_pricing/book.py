"""``PriceBook``: the prices of model and tool calls that a tracker applies, shared by many threads.

A ``(model, provider)`` pair is resolved once (an override, else the catalog: provider mapping, name variants,
effective-date prices for *now*) into an ``_Entry`` of integer unit prices, and cached, misses too. Each call is
then a dict look-up and ``_Entry.nanos``: a handful of integer multiplications. An entry lives at most ``ttl``
seconds (one hour by default) and never past the catalog's next price change for that model (a start date, or the
edge of a time-of-day window such as DeepSeek's off-peak hours), so a price change is honoured.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Self

from genai_prices import data_snapshot

from .._events import TokenUsage, UsageDetail
from .._exceptions import ConfigurationError
from . import catalog
from .overrides import _Overrides, _validate_overrides, _validate_tool_prices, load_price_file
from .rates import DEFAULT_TIERS, PricedCall, UnitPrices, _Entry, _Rates
from .refresh import Fetcher, _Refresher

__all__ = ["DEFAULT_TTL_SECONDS", "PriceBook"]

logger = logging.getLogger("costobs_callbacks")

_monotonic = time.monotonic


def _utcnow() -> datetime:
    return datetime.now(UTC)


DEFAULT_TTL_SECONDS = 3600.0
"""How long a resolved price is trusted before it is looked up again."""

_MAX_CACHE_ENTRIES = 10_000


class PriceBook:
    """Prices of model calls and tool calls; shared by many threads.

    Args:
        overrides: user prices above the catalog: a mapping, or the path of a YAML or JSON file, of
            model name -> ``{"input", "output", "cache_read", "cache_write", "cache_write_1h"}`` in USD per million
            tokens (see :func:`load_price_file`). A key matches the reported model name exactly,
            case-insensitively, with the reported name's ``provider/`` prefix stripped, and, last,
            without a trailing date (``gpt-4o-mini`` prices ``gpt-4o-mini-2024-07-18``).
        tool_prices: tool name -> USD per call.
        refresh: fetch genai-prices' newer data in a background thread (see :meth:`start_refresh`).
        ttl: seconds a resolved price is cached (it is re-resolved sooner at a catalog price change).
        refresh_interval: seconds between background fetches.
        refresh_fetcher: what fetches newer catalog data; default: genai-prices'
            ``UpdatePrices().fetch`` (the publisher's JSON). Returns a genai-prices ``DataSnapshot``, or
            ``None`` for "nothing new"; may raise (logged, ignored).
    """

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, Any]] | str | os.PathLike[str] | None = None,
        *,
        tool_prices: Mapping[str, Any] | None = None,
        refresh: bool = False,
        ttl: float = DEFAULT_TTL_SECONDS,
        refresh_interval: float = 3600.0,
        refresh_fetcher: Fetcher | None = None,
    ) -> None:
        if overrides is None:
            table: dict[str, dict[str, Decimal]] = {}
        elif isinstance(overrides, (str, os.PathLike)):
            table = load_price_file(overrides)
        else:
            table = _validate_overrides(overrides, "overrides")
        self._overrides = _Overrides(table)
        self._tools: dict[str, int] = _validate_tool_prices(tool_prices) if tool_prices is not None else {}
        self._tools_lower: dict[str, int] = {}
        for tool, nanos in self._tools.items():
            self._tools_lower.setdefault(tool.lower(), nanos)
        if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
            raise ConfigurationError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if not (
            isinstance(refresh_interval, (int, float)) and math.isfinite(refresh_interval) and refresh_interval > 0
        ):
            raise ConfigurationError(f"refresh_interval must be a positive number of seconds, got {refresh_interval!r}")
        self._ttl = float(ttl)
        self._cache: dict[tuple[str | None, str | None], _Entry] = {}
        self._warned: set[str | None] = set()
        self._windows: dict[tuple[str | None, str | None], int | None] = {}
        self._lock = threading.Lock()  # slow paths only: warnings
        self._snapshot: data_snapshot.DataSnapshot | None = None  # refreshed data, private to this book
        self._refresher = _Refresher(refresh_fetcher, float(refresh_interval), self._install_snapshot)
        if refresh:
            self.start_refresh()

    # ---- a call's cost ---------------------------------------------------------------------------

    def price_nanos(
        self, model: str | None, provider: str | None, tokens: tuple[int, int, int, int, int],
        detail: UsageDetail | None = None,
    ) -> tuple[int, UnitPrices] | None:
        """The cost of one call now, as ``(cost_nanos, unit prices)``, of its token counts in ``TokenUsage``'s order
        (input, output, cache read, cache write, reasoning) and what the provider reported beside them (``detail``:
        one-hour cache writes, a service tier, web searches); ``None`` if the model has no known price (flag the
        call unpriced). The ledger's hot path: a cache look-up and ``_Entry.nanos``."""
        entry = self._cache.get((model, provider))
        if entry is None or entry.expires <= _monotonic():
            entry = self._resolve(model, provider)
        return entry.nanos(tokens, detail)

    def price(
        self, model: str | None, provider: str | None, usage: TokenUsage, *, at: datetime | None = None,
        detail: UsageDetail | None = None,
    ) -> PricedCall | None:
        """:meth:`price_nanos` as a ``PricedCall``, or ``None`` if the model has no known price.

        ``at`` prices the call as of another instant (bypassing the cache), e.g. to re-price history;
        a naive ``at`` is taken as UTC.
        """
        priced = self._entry(model, provider, at).nanos(
            (usage.input, usage.output, usage.cache_read, usage.cache_write, usage.reasoning), detail)
        return None if priced is None else PricedCall(*priced)

    def estimate_nanos(
        self,
        model: str | None,
        provider: str | None,
        input_tokens: int,
        output_tokens: int,
        *,
        at: datetime | None = None,
    ) -> int | None:
        """A pre-call estimate: every input token uncached, every output token at the output price."""
        priced = self._entry(model, provider, at).nanos((input_tokens, output_tokens, 0, 0, 0))
        return None if priced is None else priced[0]

    def estimate_upper_nanos(self, model: str | None, provider: str | None, input_bound: int,
                             output_tokens: int) -> int | None:
        """An upper bound of :meth:`estimate_nanos` for any ``input_tokens <= input_bound``: the most any tier
        that could apply charges for ``input_bound`` tokens (prices are never negative: the estimate grows with
        the counts within a tier). ``None`` if unpriced."""
        entry = self._entry(model, provider, None)
        best = None
        for rates in (entry.base, *(r for start, r in entry.tiers if input_bound > start)):
            if rates is not None:
                n = rates.nanos(input_bound, output_tokens, 0, 0, 0)
                if best is None or n > best:
                    best = n
        return best

    def has_tier(self, model: str | None, provider: str | None, tier: str | None) -> bool:
        """Whether a call of ``model`` in service tier ``tier`` is priced at that tier's own rates (the standard
        tiers always are; a tier the catalog lacks is priced at the standard rates: flag it ``tier_unpriced``)."""
        if tier is None or tier in DEFAULT_TIERS:
            return True
        return self._entry(model, provider, None).variant(tier) is not None

    def is_priced(self, model: str | None, provider: str | None) -> bool:
        """Whether calls of ``model`` have a price now (tiers only exist beside a base price)."""
        return self._entry(model, provider, None).base is not None

    def unit_prices(
        self, model: str | None, provider: str | None, input_tokens: int = 0, *, at: datetime | None = None
    ) -> UnitPrices | None:
        """The unit prices that apply to a call with ``input_tokens`` prompt tokens (tiers resolved)."""
        rates = self._entry(model, provider, at).rates(input_tokens)
        return None if rates is None else rates.unit

    def tool_price_nanos(self, name: str) -> int | None:
        """The price of one call of tool ``name`` in nano-USD (exact name, then case-insensitive)."""
        nanos = self._tools.get(name)
        if nanos is None and name:
            nanos = self._tools_lower.get(name.lower())
        return nanos

    def context_window(self, model: str | None, provider: str | None) -> int | None:
        """The model's context window in tokens as the catalog has it (``None``: unknown, or an override's model):
        the most a call can produce, prompt included, which a budget holds for a call that sets no ``max_tokens``
        until the model's own outputs are known. Remembered per name (misses too)."""
        key = (model, provider)
        try:
            return self._windows[key]
        except KeyError:
            pass
        window: int | None = None
        if model and isinstance(model, str) and self._overrides.find(model, provider) is None:
            try:
                window = catalog.context_window(self._snapshot or data_snapshot.get_snapshot(), model, provider)
            except Exception:  # a catalog surprise never breaks the caller's call
                window = None
        if len(self._windows) >= 4096:
            self._windows.clear()
        self._windows[key] = window
        return window

    # ---- the cache -------------------------------------------------------------------------------

    def _entry(self, model: str | None, provider: str | None, at: datetime | None) -> _Entry:
        """The entry of a model now (cached), or at ``at`` (not cached)."""
        if at is not None:
            return self._resolve(model, provider, at)
        entry = self._cache.get((model, provider))
        if entry is None or entry.expires <= _monotonic():
            entry = self._resolve(model, provider)
        return entry

    def _resolve(self, model: str | None, provider: str | None, at: datetime | None = None) -> _Entry:
        # Take the cache before reading the catalog: should refreshed data be installed meanwhile, this
        # entry lands in the discarded dict, never in the new one.
        cache = self._cache
        mono = _monotonic()
        now = _utcnow() if at is None else (at if at.tzinfo else at.replace(tzinfo=UTC))
        entry = self._resolve_uncached(model, provider, now, mono)
        if entry.base is None:
            self._warn_unpriced(model, provider)
        if at is None:
            if len(cache) >= _MAX_CACHE_ENTRIES:
                cache.clear()
            cache[(model, provider)] = entry
        return entry

    def _resolve_uncached(self, model: str | None, provider: str | None, now: datetime, mono: float) -> _Entry:
        expires = mono + self._ttl
        if not model or not isinstance(model, str):
            return _Entry(None, (), expires)
        override = self._overrides.find(model, provider)
        if override is not None:
            return _Entry(_Rates(override), (), expires)
        try:
            return catalog.resolve(self._snapshot or data_snapshot.get_snapshot(), model, provider, now, mono,
                                   expires)
        except Exception:  # a catalog surprise (odd refreshed data, ...) must never break the caller's call
            logger.debug("genai-prices could not price model %r (provider %r)", model, provider, exc_info=True)
            return _Entry(None, (), expires)

    def _warn_unpriced(self, model: str | None, provider: str | None) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        if model:
            logger.warning(
                "costobs_callbacks: no price known for model %r (provider %r); its calls are recorded as "
                "unpriced. Add it to the price overrides to price it.",
                model,
                provider,
            )
        else:
            logger.warning("costobs_callbacks: a call reported no model name; its calls are recorded as unpriced.")

    # ---- refresh ---------------------------------------------------------------------------------

    def start_refresh(self) -> None:
        """Fetch genai-prices' newer data in a daemon thread, now and every ``refresh_interval`` seconds.

        Never blocks and never raises for network trouble: offline, the bundled data stays in use (logged
        at INFO). Fetched data is private to this book (genai-prices' global snapshot is left alone), never
        takes precedence over user overrides, and invalidates the resolution cache when it arrives.
        """
        self._refresher.start()

    def refresh_now(self) -> bool:
        """Fetch newer catalog data in the calling thread (blocks up to the fetch's timeouts).

        Returns True if new data was installed, False if the fetch failed (logged) or brought nothing.
        """
        return self._refresher.refresh_now()

    def wait_refreshed(self, timeout: float | None = None) -> bool:
        """Wait until the background refresh has made an attempt (successful or not); False on timeout."""
        return self._refresher.attempted.wait(timeout)

    def _install_snapshot(self, snapshot: data_snapshot.DataSnapshot) -> None:
        """Use refreshed catalog data from now on and drop every cached resolution."""
        self._snapshot = snapshot
        self._cache = {}
        logger.info("genai-prices data refreshed (%d providers)", len(snapshot.providers))

    def close(self) -> None:
        """Stop the refresh thread, if any (waits at most a moment; the thread is a daemon)."""
        self._refresher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
