"""What a call costs: unit prices (``UnitPrices``, USD per million tokens, as audited) turned into integers once,
and the one computation of a call's cost from them (``_Entry.nanos``, with its shortcut for one flat rate).

How a call is priced
--------------------
``usage.input`` is the whole prompt (cache reads and writes included), ``usage.output`` the whole
completion (reasoning included)::

    cost = (input - cache_read - cache_write) * input_price
         + cache_read * cache_read_price                         # cache counts clamped to the input
         + cache_write * cache_write_price                       # (one-hour writes at their own price)
         + output * output_price                                 # reasoning billed at the output price
         (+ the catalog's per-request fee, for the few models that have one)

all prices in USD per million tokens, rounded once, half-even, to a whole nano-USD. A price the catalog
lacks for cached tokens falls back to the input price (which is what genai-prices does too: tokens of an
unpriced kind stay in their parent ``input_tokens`` bucket). The figure equals genai-prices' own
``calc_price`` to the nano-dollar.

Tiers
-----
genai-prices' ``TieredPrices`` are *cliff* tiers: the tier is chosen by the call's total input tokens
(the whole prompt, cached tokens included), the highest tier whose ``start`` is strictly below that
count applies, and its price applies to **all** tokens of that kind, not only those above the
threshold. Every price kind (input, output, cache read/write) may have its own tiers, all keyed on the
total input tokens. An entry holds one set of integer unit prices per threshold interval.

What a provider reports beside the five counts (``UsageDetail``) is priced when given: one-hour cache
writes at the catalog's ``cache_write_1h_mtok`` (Anthropic; five-minute writes at ``cache_write_mtok``),
server-side web searches at ``web_searches_kcount``, and a service tier (OpenAI's ``flex``, ``priority``,
``batch``...) at the catalog's ``price_variants`` for it; a tier the catalog does not price is priced at
the standard rates (``PriceBook.has_tier`` tells the adapter, which flags the call ``tier_unpriced``).

Not modelled: audio/image/video token prices and other per-action fees.

Bounds
------
A user price is at most ``_MAX_PRICE`` (USD 10^6 per million tokens, i.e. $1 a token: over a thousand
times the dearest catalog price; a catalog price above it leaves the model unpriced), and ``_Rates.nanos``
clamps every count at ``MAX_TOKENS`` (10^9) and web searches at ``MAX_REQUESTS`` (10^6). After the cache
counts are clamped to the input (they are subsets of it) and reasoning to the output, a call costs at most
``(input + output) * $1 + $1000 per-request fee + web searches * $1000`` = 2*10^18 + 10^12 + 10^18 nano-USD,
below 2^63 (9.2*10^18): no cost overflows a 64-bit column, whatever a provider reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from .._events import UsageDetail

if TYPE_CHECKING:
    from .catalog import _CatalogRef

__all__ = ["DEFAULT_TIERS", "MAX_REQUESTS", "MAX_TOKENS", "PricedCall", "UnitPrices"]

logger = logging.getLogger("costobs_callbacks")


_MAX_PRICE = Decimal(1_000_000)
"""Sanity bound for a price (USD per million tokens, per thousand requests, or per tool call); see Bounds."""

MAX_TOKENS = 1_000_000_000
"""The most tokens of one kind a call is priced for (see Bounds); the usage parser flags far less as
implausible."""

MAX_REQUESTS = 1_000_000
"""The most per-request-priced server tool calls (web searches) one call is priced for (see Bounds)."""

_MAX_PLACES = 30
"""Decimal places kept for a unit price (the catalog has at most 18); finer digits are rounded off."""

DEFAULT_TIERS = frozenset({"default", "auto", "standard", "standard_only", "on_demand"})
"""Service tiers that are the standard price: no detail, no variant."""


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """Unit prices applied to a call (USD per million tokens, tier already resolved), for audit."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    source: str
    """``"override"``, or ``"genai-prices X.Y.Z"`` (``"genai-prices X.Y.Z (refreshed <timestamp>)"`` when
    refreshed catalog data was used)."""
    per_request: Decimal = Decimal(0)
    """A flat fee per call in USD (a handful of catalog models, e.g. Perplexity's Sonar); usually 0."""
    reasoning: Decimal | None = None
    """A separate reasoning-token price, when the catalog has one; ``None``: billed at ``output``."""
    catalog_model: str | None = None
    """The catalog entry used (genai-prices model id); ``None`` for an override."""
    catalog_provider: str | None = None
    """The catalog provider used (genai-prices provider id); ``None`` for an override."""
    cache_write_1h: Decimal | None = None
    """The price of one-hour cache writes (Anthropic); ``None``: at ``cache_write``."""
    web_search: Decimal = Decimal(0)
    """USD per server-side web search request (``UsageDetail.web_search_requests``)."""
    service_tier: str | None = None
    """The service tier whose catalog prices these are; ``None``: the standard prices."""


@dataclass(frozen=True, slots=True)
class PricedCall:
    """The cost of one call and the unit prices it was computed with."""

    cost_nanos: int
    prices: UnitPrices


def _scaled_int(d: Decimal, places: int) -> int:
    """``d * 10**places`` as an int, rounded half-even, exact whatever the digits (no context rounding)."""
    _, digits, exp = d.as_tuple()
    if not isinstance(exp, int):
        raise ValueError(f"not a finite amount: {d!r}")
    n = int("".join(map(str, digits)) or "0")
    shift = exp + places
    if shift >= 0:
        return n * int(10**shift)
    return _div_half_even(n, int(10**-shift))


def _div_half_even(n: int, div: int) -> int:
    """``n / div`` rounded half-even (``div`` positive), in integers."""
    q, r = divmod(n, div)
    r2 = r + r
    if r2 > div or (r2 == div and q & 1):
        q += 1
    return q


def _places(d: Decimal) -> int:
    exp = d.as_tuple().exponent
    return -exp if isinstance(exp, int) and exp < 0 else 0


class _Rates:
    """Unit prices of one tier as integers in 1e-(6+scale) USD per token, and how to get nanos back.

    ``sum(tokens * rate)`` is in units of 1e-(6+scale) USD; nanos = that * 10**(3-scale) when
    ``scale <= 3``, else that / 10**(scale-3) rounded half-even. Exact for any Decimal prices.
    """

    __slots__ = ("cr", "cw", "cw1h", "div", "inp", "mul", "out", "req", "rsn", "unit", "web")

    def __init__(self, unit: UnitPrices) -> None:
        prices = [unit.input, unit.output, unit.cache_read, unit.cache_write, unit.per_request, unit.web_search]
        if unit.reasoning is not None:
            prices.append(unit.reasoning)
        if unit.cache_write_1h is not None:
            prices.append(unit.cache_write_1h)
        scale = min(max(_places(p) for p in prices), _MAX_PLACES)

        def scaled(p: Decimal) -> int:
            return _scaled_int(p, scale)

        self.inp = scaled(unit.input)
        self.out = scaled(unit.output)
        self.cr = scaled(unit.cache_read)
        self.cw = scaled(unit.cache_write)
        self.cw1h = self.cw if unit.cache_write_1h is None else scaled(unit.cache_write_1h)
        self.rsn: int | None = None if unit.reasoning is None else scaled(unit.reasoning)
        # USD per request -> per-million-token units: * 1e6.
        self.req = scaled(unit.per_request) * 1_000_000
        self.web = scaled(unit.web_search) * 1_000_000
        self.mul = 10 ** (3 - scale) if scale <= 3 else 1
        self.div = 10 ** (scale - 3) if scale > 3 else 1
        self.unit = unit

    def nanos(self, inp: int, out: int, cr: int, cw: int, rsn: int) -> int:
        """The cost of a call's five token counts (``TokenUsage``'s order), of any ints (see ``_clamped``)."""
        if inp < 0 or out < 0 or cr < 0 or cw < 0 or inp > MAX_TOKENS or out > MAX_TOKENS or cr + cw > inp:
            inp, out, cr, cw = _clamped(inp, out, cr, cw)
        total = (inp - cr - cw) * self.inp + cr * self.cr + cw * self.cw + self.req
        if self.rsn is None:
            total += out * self.out
        else:
            if rsn < 0:
                rsn = 0
            elif rsn > out:
                rsn = out
            total += (out - rsn) * self.out + rsn * self.rsn
        return self._rounded(total)

    def nanos_detail(self, inp: int, out: int, cr: int, cw: int, rsn: int, cw1h: int, web: int) -> int:
        """``nanos`` with ``cw1h`` of the ``cw`` cache writes at the one-hour price and ``web`` web searches;
        with both 0 it is ``nanos`` (a property test holds them to it)."""
        inp, out, cr, cw = _clamped(inp, out, cr, cw)
        cw1h = 0 if cw1h < 0 else cw if cw1h > cw else cw1h
        web = 0 if web < 0 else MAX_REQUESTS if web > MAX_REQUESTS else web
        total = ((inp - cr - cw) * self.inp + cr * self.cr + (cw - cw1h) * self.cw + cw1h * self.cw1h
                 + self.req + web * self.web)
        rsn = 0 if rsn < 0 else out if rsn > out else rsn
        total += out * self.out if self.rsn is None else (out - rsn) * self.out + rsn * self.rsn
        return self._rounded(total)

    def _rounded(self, total: int) -> int:
        """``total`` (in 1e-(6+scale) USD) in nano-USD, rounded half-even."""
        return total * self.mul if self.div == 1 else _div_half_even(total, self.div)


def _clamped(inp: int, out: int, cr: int, cw: int) -> tuple[int, int, int, int]:
    """Counts as priced: none negative, none above ``MAX_TOKENS``, cache reads then writes within the input
    (they are subsets of it). What a provider reported otherwise is malformed; the usage parser flags it."""
    inp = 0 if inp < 0 else MAX_TOKENS if inp > MAX_TOKENS else inp
    out = 0 if out < 0 else MAX_TOKENS if out > MAX_TOKENS else out
    cr = 0 if cr < 0 else inp if cr > inp else cr
    cw = 0 if cw < 0 else inp - cr if cw > inp - cr else cw
    return inp, out, cr, cw


class _Entry:
    """What a model costs, resolved (an override, or the catalog at one instant) and cached by the book:
    ``base`` rates (``None``: no price) and tiers, newest threshold first, until ``expires`` (monotonic).

    ``variants``: the entry's service tiers, resolved at their first use (``None`` for a tier the catalog does
    not price); ``catalog``: what resolves them (``None`` for an override or a miss: no tier is priced)."""

    __slots__ = ("base", "catalog", "expires", "flat", "tiers", "variants")

    def __init__(self, base: _Rates | None, tiers: tuple[tuple[int, _Rates], ...], expires: float,
                 catalog: _CatalogRef | None = None) -> None:
        self.base = base
        self.tiers = tiers
        self.expires = expires
        self.catalog = catalog
        self.variants: dict[str, _Entry | None] | None = None
        # One rate and no rounding: (nanos per input token, per output token, per request, unit prices), all that
        # nanos needs for a call without cache or reasoning tokens.
        self.flat: tuple[int, int, int, UnitPrices] | None = (
            (base.inp * base.mul, base.out * base.mul, base.req * base.mul, base.unit)
            if base is not None and not tiers and base.div == 1 else None
        )

    def nanos(self, tokens: tuple[int, int, int, int, int],
              detail: UsageDetail | None = None) -> tuple[int, UnitPrices] | None:
        """The cost of a call with these token counts (``TokenUsage``'s order, any ints) and what the provider
        reported beside them (``detail``), with the unit prices applied; ``None`` without a price. Every price and
        estimate of the book is this (tests/test_pricing.py holds its shortcut to the general path and to an exact
        Decimal computation)."""
        if detail is not None:
            return self._nanos_detail(tokens, detail)
        inp, out, cr, cw, rsn = tokens
        flat = self.flat
        if flat is not None and not (cr or cw or rsn) and 0 <= inp <= MAX_TOKENS and 0 <= out <= MAX_TOKENS:
            # What rates.nanos computes for a call without cache or reasoning tokens, when no rounding is needed.
            return inp * flat[0] + out * flat[1] + flat[2], flat[3]
        rates = self.rates(inp)
        if rates is None:
            return None
        return rates.nanos(inp, out, cr, cw, rsn), rates.unit

    def _nanos_detail(self, tokens: tuple[int, int, int, int, int],
                      detail: UsageDetail) -> tuple[int, UnitPrices] | None:
        """``nanos`` of a call with a ``UsageDetail``: at its service tier's rates where the catalog has them (else
        the standard ones), its one-hour cache writes and web searches at their own prices."""
        entry = self
        tier = detail.service_tier
        if tier is not None and tier not in DEFAULT_TIERS:
            variant = self.variant(tier)
            if variant is not None:
                entry = variant
        inp, out, cr, cw, rsn = tokens
        rates = entry.rates(inp)
        if rates is None:
            return None
        return rates.nanos_detail(inp, out, cr, cw, rsn, detail.cache_write_1h, detail.web_search_requests), rates.unit

    def rates(self, input_tokens: int) -> _Rates | None:
        """The rates of the tier a call with ``input_tokens`` prompt tokens falls in."""
        for start, rates in self.tiers:
            if input_tokens > start:
                return rates
        return self.base

    def variant(self, tier: str) -> _Entry | None:
        """The entry of service tier ``tier``, ``None`` if the catalog has no price for it."""
        variants = self.variants
        if variants is None:
            variants = self.variants = {}
        elif tier in variants:
            return variants[tier]
        found = None
        if self.catalog is not None and self.base is not None:
            try:
                found = self.catalog.variant(tier, self.expires)
            except Exception:  # odd (refreshed) catalog data: the standard price, flagged by the adapter
                logger.debug("genai-prices could not price tier %r", tier, exc_info=True)
        if len(variants) < 64:  # tiers are a handful; a provider sending junk must not grow this
            variants[tier] = found
        return found
