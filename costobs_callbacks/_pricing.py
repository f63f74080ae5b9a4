"""Model and tool prices: pydantic's ``genai-prices`` catalog, with user overrides on top.

Money is integer nano-USD (1e-9 USD) inside the library; ``Decimal`` only at the edges.

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

The hot path
------------
A ``(model, provider)`` pair is resolved once (override or catalog, provider mapping, name fallbacks,
effective-date prices for *now*) into integer unit prices and cached, misses too. Each call is then a
dict look-up and a handful of integer multiplications. A cache entry lives at most ``ttl`` seconds
(one hour by default) and never past the catalog's next price change for that model (a start date, or
the edge of a time-of-day window such as DeepSeek's off-peak hours), so a price change is honoured.

Tiers
-----
genai-prices' ``TieredPrices`` are *cliff* tiers: the tier is chosen by the call's total input tokens
(the whole prompt, cached tokens included), the highest tier whose ``start`` is strictly below that
count applies, and its price applies to **all** tokens of that kind, not only those above the
threshold. Every price kind (input, output, cache read/write) may have its own tiers, all keyed on the
total input tokens. We precompute one set of integer unit prices per threshold interval.

What a provider reports beside the five counts (``UsageDetail``) is priced when given: one-hour cache
writes at the catalog's ``cache_write_1h_mtok`` (Anthropic; five-minute writes at ``cache_write_mtok``),
server-side web searches at ``web_searches_kcount``, and a service tier (OpenAI's ``flex``, ``priority``,
``batch``...) at the catalog's ``price_variants`` for it; a tier the catalog does not price is priced at
the standard rates (``has_tier`` tells the adapter, which flags the call ``tier_unpriced``).

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

import functools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Self

import genai_prices
import pydantic
from genai_prices import data_snapshot
from genai_prices import types as gp_types

from ._events import TokenUsage, UsageDetail
from ._exceptions import ConfigurationError

__all__ = ["PriceBook", "PricedCall", "UnitPrices", "load_price_file", "provider_from_name", "provider_id"]

logger = logging.getLogger("costobs_callbacks")

_monotonic = time.monotonic


def _utcnow() -> datetime:
    return datetime.now(UTC)


SOURCE_OVERRIDE = "override"
"""``UnitPrices.source`` of a user override."""

DEFAULT_TTL_SECONDS = 3600.0
"""How long a resolved price is trusted before it is looked up again."""

_MAX_PRICE = Decimal(1_000_000)
"""Sanity bound for a price (USD per million tokens, per thousand requests, or per tool call); see Bounds."""

MAX_TOKENS = 1_000_000_000
"""The most tokens of one kind a call is priced for (see Bounds); the usage parser flags far less as
implausible."""

MAX_REQUESTS = 1_000_000
"""The most per-request-priced server tool calls (web searches) one call is priced for (see Bounds)."""

_MAX_PLACES = 30
"""Decimal places kept for a unit price (the catalog has at most 18); finer digits are rounded off."""

_MAX_CACHE_ENTRIES = 10_000

# LangChain ``ls_provider`` (and LlamaIndex / common spellings) -> genai-prices provider id.
# Anything not listed is tried as a genai-prices provider id as is (genai-prices also matches ids
# loosely, e.g. anything containing "bedrock" is AWS).
_PROVIDER_IDS: dict[str, str] = {
    "openai": "openai",
    "azure": "azure",
    "azure_openai": "azure",
    "azureopenai": "azure",
    "azure_ai": "azure",
    "anthropic": "anthropic",
    "google": "google",
    "google_genai": "google",
    "google_vertexai": "google",
    "google_anthropic_vertex": "google",
    "vertexai": "google",
    "vertex": "google",
    "gemini": "google",
    "amazon_bedrock": "aws",
    "bedrock": "aws",
    "bedrock_converse": "aws",
    "aws": "aws",
    "mistral": "mistral",
    "mistralai": "mistral",
    "groq": "groq",
    "fireworks": "fireworks",
    "together": "together",
    "deepseek": "deepseek",
    "xai": "x-ai",
    "x_ai": "x-ai",
    "perplexity": "perplexity",
    "cohere": "cohere",
    "openrouter": "openrouter",
    "cerebras": "cerebras",
    "moonshot": "moonshotai",
    "moonshotai": "moonshotai",
    "novita": "novita",
    "zhipuai": "zhipuai",
    "voyageai": "voyageai",
}

# Models served locally cost nothing per token but are not "free" in the catalog's sense either: a name
# like "deepseek-r1:8b" on Ollama must not be billed at DeepSeek's API price. They stay unpriced (and
# flagged) unless the user gives an override (which may well be 0).
_LOCAL_PROVIDERS = frozenset(
    {"ollama", "llamacpp", "llama_cpp", "lmstudio", "gpt4all", "huggingface_pipeline", "vllm", "local"}
)

# Provider spellings found inside a class or payload name (LlamaIndex's ``AzureOpenAI``, ``openai_llm``,
# ``BedrockConverse``...), compared without "_" and "-", longest first (``azureopenai`` before ``openai``);
# spellings under four letters (``aws``, ``xai``) would match inside unrelated names and are left out.
_NAMED_PROVIDERS: tuple[tuple[str, str], ...] = tuple(sorted(
    {k.replace("_", ""): v for k, v in (*_PROVIDER_IDS.items(), *((p, p) for p in _LOCAL_PROVIDERS))
     if len(k.replace("_", "")) >= 4}.items(),
    key=lambda kv: (-len(kv[0]), kv[0]),
))


def provider_id(name: str) -> str:
    """A provider's name as the catalog knows it: a known spelling (``google_genai``, ``bedrock``,
    ``azure_openai``...) -> genai-prices' id (``google``, ``aws``, ``azure``), anything else lowercased as is."""
    n = name.strip().lower()
    return _PROVIDER_IDS.get(n.replace("-", "_"), n)


@functools.lru_cache(maxsize=256)
def provider_from_name(name: str) -> str | None:
    """The provider a class or payload name names (``AzureOpenAI`` -> ``azure``, ``openai_llm`` -> ``openai``,
    ``Ollama`` -> ``ollama``), as ``provider_id`` gives it; ``None`` for none, and for ``*Like`` classes
    (an OpenAI-compatible server of any provider)."""
    n = name.lower().replace("_", "").replace("-", "")
    if "like" in n:
        return None
    for key, pid in _NAMED_PROVIDERS:
        if key in n:
            return pid
    return None


# The catalog prices we apply (everything LangChain's normalised usage can count).
_TOKEN_PRICE_KEYS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "output_reasoning_mtok",
    "requests_kcount",
    "cache_write_1h_mtok",
    "web_searches_kcount",
)

# Service tiers that are the standard price: no detail, no variant.
DEFAULT_TIERS = frozenset({"default", "auto", "standard", "standard_only", "on_demand"})

_DATE_SUFFIX = re.compile(r"(?:[-@_](?:\d{4}-\d{2}-\d{2}|\d{8}))$")


# --------------------------------------------------------------------------------------------------
# Public value types
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Validation of user prices
# --------------------------------------------------------------------------------------------------


def _to_decimal(value: Any) -> Decimal:
    """A user price as an exact ``Decimal``: via ``str`` so that ``0.1`` is ``Decimal('0.1')``."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"must be a number, got {value!r}")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, (int, float, str)):
        try:
            d = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValueError(f"must be a number, got {value!r}") from None
    else:
        # ValueError, not TypeError: pydantic turns only ValueError into a ValidationError
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r}")
    if not d.is_finite():
        raise ValueError(f"must be a finite number, got {value!r}")
    if d < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if d > _MAX_PRICE:
        raise ValueError(f"is implausibly large: {value!r}")
    return d + 0 if d.is_zero() else d  # -0 -> 0


class _OverrideEntry(pydantic.BaseModel):
    """One model's override, USD per million tokens."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None

    @pydantic.field_validator("input", "output", "cache_read", "cache_write", "cache_write_1h", mode="plain")
    @classmethod
    def _price(cls, value: Any) -> Decimal:
        return _to_decimal(value)


class _ToolPrice(pydantic.RootModel[Decimal]):
    @pydantic.field_validator("root", mode="plain")
    @classmethod
    def _price(cls, value: Any) -> Decimal:
        return _to_decimal(value)


_OVERRIDES_ADAPTER: pydantic.TypeAdapter[dict[str, _OverrideEntry]] = pydantic.TypeAdapter(dict[str, _OverrideEntry])
_TOOLS_ADAPTER: pydantic.TypeAdapter[dict[str, _ToolPrice]] = pydantic.TypeAdapter(dict[str, _ToolPrice])


def _format_errors(exc: pydantic.ValidationError, what: str, origin: str) -> str:
    parts: list[str] = []
    for err in exc.errors():
        loc = err.get("loc", ())
        name = repr(loc[0]) if loc else "?"
        fields = ".".join(str(x) for x in loc[1:])
        kind = err.get("type", "")
        if kind == "missing":
            msg = "is required"
        elif kind == "extra_forbidden":
            msg = "is not a known field (expected input, output, cache_read, cache_write, cache_write_1h)"
        elif kind in ("model_type", "dict_type"):
            msg = "must be a mapping of prices"
        else:
            msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        if fields:
            parts.append(f"{what} {name}: field {fields!r} {msg}")
        else:
            parts.append(f"{what} {name}: {msg}")
    return f"invalid prices in {origin}: " + "; ".join(parts)


def _check_keys(raw: Mapping[Any, Any], what: str, origin: str) -> None:
    for key in raw:
        if not isinstance(key, str) or not key.strip():
            raise ConfigurationError(f"invalid prices in {origin}: {what} name {key!r} must be a non-empty string")


def _validate_overrides(raw: Any, origin: str) -> dict[str, dict[str, Decimal]]:
    if not isinstance(raw, Mapping):
        raise ConfigurationError(
            f"invalid prices in {origin}: expected a mapping of model name -> prices, got {type(raw).__name__}"
        )
    _check_keys(raw, "model", origin)
    try:
        parsed = _OVERRIDES_ADAPTER.validate_python(dict(raw))
    except pydantic.ValidationError as exc:
        raise ConfigurationError(_format_errors(exc, "model", origin)) from None
    out: dict[str, dict[str, Decimal]] = {}
    for name, entry in parsed.items():
        cache_write = entry.input if entry.cache_write is None else entry.cache_write
        out[name.strip()] = {
            "input": entry.input,
            "output": entry.output,
            "cache_read": entry.input if entry.cache_read is None else entry.cache_read,
            "cache_write": cache_write,
            "cache_write_1h": cache_write if entry.cache_write_1h is None else entry.cache_write_1h,
        }
    return out


def _validate_tool_prices(raw: Any) -> dict[str, int]:
    origin = "tool_prices"
    if not isinstance(raw, Mapping):
        raise ConfigurationError(
            f"invalid prices in {origin}: expected a mapping of tool name -> USD per call, got {type(raw).__name__}"
        )
    _check_keys(raw, "tool", origin)
    try:
        parsed = _TOOLS_ADAPTER.validate_python(dict(raw))
    except pydantic.ValidationError as exc:
        raise ConfigurationError(_format_errors(exc, "tool", origin)) from None
    return {name: _scaled_int(price.root, 9) for name, price in parsed.items()}


def load_price_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Decimal]]:
    """Load and validate a YAML or JSON price file: model name -> ``{input, output, cache_read, cache_write,
    cache_write_1h}``.

    Prices are USD per million tokens; ``input`` and ``output`` are required, ``cache_read`` and
    ``cache_write`` default to ``input``, ``cache_write_1h`` (one-hour cache writes) to ``cache_write``.
    A ``.json`` file is read as JSON, anything else as YAML.
    Raises ``ConfigurationError`` (naming the model and the field) for anything malformed.
    """
    p = Path(os.fspath(path))
    origin = f"price file {str(p)!r}"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{origin} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{origin} cannot be read: {exc}") from None
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"{origin} is not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"{origin} is not valid YAML: {exc}") from None
    return _validate_overrides(raw, origin)


# --------------------------------------------------------------------------------------------------
# Integer unit prices
# --------------------------------------------------------------------------------------------------


def _scaled_int(d: Decimal, places: int) -> int:
    """``d * 10**places`` as an int, rounded half-even, exact whatever the digits (no context rounding)."""
    _, digits, exp = d.as_tuple()
    if not isinstance(exp, int):
        raise ValueError(f"not a finite amount: {d!r}")
    n = int("".join(map(str, digits)) or "0")
    shift = exp + places
    if shift >= 0:
        return n * int(10**shift)
    div = int(10**-shift)
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
        div = self.div
        if div == 1:
            return total * self.mul
        q, r = divmod(total, div)
        r2 = r + r
        if r2 > div or (r2 == div and q & 1):
            q += 1
        return q

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
        div = self.div
        if div == 1:
            return total * self.mul
        q, r = divmod(total, div)
        r2 = r + r
        if r2 > div or (r2 == div and q & 1):
            q += 1
        return q


def _clamped(inp: int, out: int, cr: int, cw: int) -> tuple[int, int, int, int]:
    """Counts as priced: none negative, none above ``MAX_TOKENS``, cache reads then writes within the input
    (they are subsets of it). What a provider reported otherwise is malformed; the usage parser flags it."""
    inp = 0 if inp < 0 else MAX_TOKENS if inp > MAX_TOKENS else inp
    out = 0 if out < 0 else MAX_TOKENS if out > MAX_TOKENS else out
    cr = 0 if cr < 0 else inp if cr > inp else cr
    cw = 0 if cw < 0 else inp - cr if cw > inp - cr else cw
    return inp, out, cr, cw


class _Entry:
    """A cached resolution: ``base`` rates (``None`` for a miss) and tiers, newest threshold first.

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
        # No tiers and no rounding: (nanos per input token, per output token, per request, unit prices), what
        # price_nanos needs for a call without cache or reasoning tokens.
        self.flat: tuple[int, int, int, UnitPrices] | None = (
            (base.inp * base.mul, base.out * base.mul, base.req * base.mul, base.unit)
            if base is not None and not tiers and base.div == 1 else None
        )

    def rates(self, input_tokens: int) -> _Rates | None:
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


@dataclass(frozen=True, slots=True)
class _CatalogRef:
    """A catalog model, to resolve its service-tier prices from when a call reports one."""

    model: gp_types.ModelInfo
    provider_id: str
    source: str
    at: datetime
    """The instant the entry was resolved for (it expires at the catalog's next price change, variants' too)."""

    def variant(self, tier: str, expires: float) -> _Entry | None:
        context = _tier_context(tier)
        now = self.at
        if not any(
            all(context.get(k) == v for k, v in pv.when.items())
            and (pv.constraint is None or pv.constraint.active(now))
            for pv in self.model.price_variants or ()
        ):
            return None
        entry = _entry_of_price(self.model.get_prices(now, context), self.source, self.model.id, self.provider_id,
                                expires, None, tier)
        return entry if entry.base is not None else None


def _tier_context(tier: str) -> dict[str, str]:
    """genai-prices' price context of a reported service tier: OpenAI's Batch API is its ``processing`` key."""
    return {"processing": "batch"} if tier == "batch" else {"service_tier": tier}


# --------------------------------------------------------------------------------------------------
# Catalog resolution
# --------------------------------------------------------------------------------------------------


def _tier_price(price: Decimal | gp_types.TieredPrices | None, threshold: int | None) -> Decimal | None:
    """The price that applies when total input tokens are just above ``threshold`` (``None``: base)."""
    if price is None or isinstance(price, Decimal):
        return price
    applicable = price.base
    if threshold is not None:
        for tier in price.tiers:  # sorted ascending by genai-prices
            if tier.start <= threshold:
                applicable = tier.price
    return applicable


def _next_change(model: gp_types.ModelInfo, now: datetime) -> datetime | None:
    """The next instant after ``now`` at which the model's catalog price may change."""
    constraints = [] if isinstance(model.prices, gp_types.ModelPrice) else [c.constraint for c in model.prices]
    constraints += [v.constraint for v in model.price_variants or ()]  # a service tier's price may change too
    candidates: list[datetime] = []
    for constraint in constraints:
        if isinstance(constraint, gp_types.StartDateConstraint):
            at = datetime(
                constraint.start_date.year, constraint.start_date.month, constraint.start_date.day, tzinfo=UTC
            )
            if at > now:
                candidates.append(at)
        elif isinstance(constraint, gp_types.TimeOfDateConstraint):
            today: date = now.date()
            for t in (constraint.start_time, constraint.end_time):
                # As genai-prices does: a naive time of day is UTC.
                if t.tzinfo is not None:
                    t = datetime.combine(date(1970, 1, 1), t).astimezone(UTC).time()
                at = datetime.combine(today, t.replace(tzinfo=None), tzinfo=UTC)
                if at <= now:
                    at += timedelta(days=1)
                candidates.append(at)
    return min(candidates) if candidates else None


def _catalog_unit_prices(
    model_price: gp_types.ModelPrice, threshold: int | None, source: str, model_id: str, provider_id: str,
    tier: str | None = None,
) -> UnitPrices | None:
    inp = _tier_price(model_price.input_mtok, threshold)
    out = _tier_price(model_price.output_mtok, threshold)
    if inp is None and out is None:
        return None  # not priced per token (images, audio hours, ...): never a silent $0
    inp = Decimal(0) if inp is None else inp
    out = Decimal(0) if out is None else out
    cr = _tier_price(model_price.cache_read_mtok, threshold)
    cw = _tier_price(model_price.cache_write_mtok, threshold)
    cw1h = _tier_price(model_price.cache_write_1h_mtok, threshold)
    req = _tier_price(model_price.requests_kcount, threshold)
    rsn = _tier_price(model_price.output_reasoning_mtok, threshold)
    web = _tier_price(model_price.web_searches_kcount, threshold)
    if any(p is not None and not (0 <= p <= _MAX_PRICE) for p in (inp, out, cr, cw, cw1h, req, rsn, web)):
        # outside the bounds every cost is proven against (see Bounds): never priced from odd (refreshed) data
        logger.warning("genai-prices has an implausible price for model %r (provider %r); left unpriced",
                       model_id, provider_id)
        return None
    cache_write = inp if cw is None else cw
    return UnitPrices(
        input=inp,
        output=out,
        cache_read=inp if cr is None else cr,
        cache_write=cache_write,
        source=source,
        per_request=Decimal(0) if req is None else req / 1000,
        reasoning=rsn,
        catalog_model=model_id,
        catalog_provider=provider_id,
        cache_write_1h=None if cw1h is None or cw1h == cache_write else cw1h,
        web_search=Decimal(0) if web is None else web / 1000,
        service_tier=tier,
    )


def _catalog_source(snapshot: data_snapshot.DataSnapshot) -> str:
    base = f"genai-prices {genai_prices.__version__}"
    if snapshot.from_auto_update:
        return f"{base} (refreshed {snapshot.timestamp.isoformat(timespec='seconds')})"
    return base


def _name_forms(model: str) -> tuple[list[tuple[str, str | None]], list[tuple[str, str | None]]]:
    """The names a reported model name stands for, the one home of name variants (the catalog look-up and the
    overrides both use it): ``(exact, undated)``, each name with the provider id implied by a ``provider/``
    prefix, if any. Exact: the name, it without its first ``provider/`` prefix, its last path segment;
    undated: those without a trailing date (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``)."""
    exact: list[tuple[str, str | None]] = [(model, None)]
    if "/" in model:
        prefix, rest = model.split("/", 1)
        if rest:
            exact.append((rest, prefix))
        last = model.rsplit("/", 1)[1]
        if last and last != rest:
            exact.append((last, None))
    undated: list[tuple[str, str | None]] = []
    for ref, implied in exact:
        u = _DATE_SUFFIX.sub("", ref)
        if u and u != ref:
            undated.append((u, implied))
    return exact, undated


def _model_refs(model: str) -> list[tuple[str, str | None]]:
    """Names to try in the catalog for a model, exact ones first (see ``_name_forms``)."""
    exact, undated = _name_forms(model)
    return exact + undated


def _override_names(model: str, provider: str | None) -> list[str]:
    """Names an override may be keyed by, in the order tried: ``_name_forms`` of the reported name, each group
    headed by the reported provider's ``provider/model`` form (exact names first, the provider's first)."""
    exact, undated = _name_forms(model)
    if not provider:
        return [ref for ref, _ in exact + undated]
    prefixed = f"{provider}/{model}"
    names = [prefixed] + [ref for ref, _ in exact]
    p_undated = _DATE_SUFFIX.sub("", prefixed)
    if p_undated != prefixed:
        names.append(p_undated)
    names.extend(ref for ref, _ in undated)
    return names


def _find_in_catalog(
    snapshot: data_snapshot.DataSnapshot, model: str, provider: str | None
) -> tuple[gp_types.Provider, gp_types.ModelInfo] | None:
    norm = provider.strip().lower().replace("-", "_") if provider else None
    if norm in _LOCAL_PROVIDERS:
        return None
    pid = _PROVIDER_IDS.get(norm, provider.strip().lower()) if norm and provider else None

    def attempt(ref: str, provider_id: str | None) -> tuple[gp_types.Provider, gp_types.ModelInfo] | None:
        try:
            return snapshot.find_provider_model(ref, None, provider_id, None)
        except (LookupError, ValueError):
            return None

    for ref, implied in _model_refs(model):
        if pid is not None and (found := attempt(ref, pid)):
            return found
        if implied is not None:
            implied_id = _PROVIDER_IDS.get(implied.lower().replace("-", "_"), implied.lower())
            if found := attempt(ref, implied_id):
                return found
        if found := attempt(ref, None):
            return found
    return None


def _entry_of_price(model_price: gp_types.ModelPrice, source: str, model_id: str, provider_id: str, expires: float,
                    ref: _CatalogRef | None, tier: str | None) -> _Entry:
    """A catalog price (standard or of a service tier) as an entry: its base rates and one per tier threshold."""
    base_unit = _catalog_unit_prices(model_price, None, source, model_id, provider_id, tier)
    if base_unit is None:
        return _Entry(None, (), expires)
    thresholds: set[int] = set()
    for key in _TOKEN_PRICE_KEYS:
        value = getattr(model_price, key, None)
        if isinstance(value, gp_types.TieredPrices):
            thresholds.update(t.start for t in value.tiers)
    tiers: list[tuple[int, _Rates]] = []
    for start in sorted(thresholds, reverse=True):
        unit = _catalog_unit_prices(model_price, start, source, model_id, provider_id, tier)
        if unit is not None:
            tiers.append((start, _Rates(unit)))
    return _Entry(_Rates(base_unit), tuple(tiers), expires, ref)


def _price_detail(entry: _Entry, tokens: tuple[int, int, int, int, int],
                  detail: UsageDetail) -> tuple[int, UnitPrices] | None:
    """A call with a ``UsageDetail``: at its service tier's rates where the catalog has them (else the standard
    ones), its one-hour cache writes and web searches at their own prices."""
    tier = detail.service_tier
    if tier is not None and tier not in DEFAULT_TIERS:
        variant = entry.variant(tier)
        if variant is not None:
            entry = variant
    inp, out, cr, cw, rsn = tokens
    rates = entry.rates(inp)
    if rates is None:
        return None
    return rates.nanos_detail(inp, out, cr, cw, rsn, detail.cache_write_1h, detail.web_search_requests), rates.unit


# --------------------------------------------------------------------------------------------------
# PriceBook
# --------------------------------------------------------------------------------------------------


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
        refresh_fetcher: Callable[[], data_snapshot.DataSnapshot | None] | None = None,
    ) -> None:
        if overrides is None:
            table: dict[str, dict[str, Decimal]] = {}
        elif isinstance(overrides, (str, os.PathLike)):
            table = load_price_file(overrides)
        else:
            table = _validate_overrides(overrides, "overrides")
        self._overrides: dict[str, UnitPrices] = {}
        self._overrides_lower: dict[str, UnitPrices] = {}
        for name, p in table.items():
            cw1h = p.get("cache_write_1h")
            unit = UnitPrices(p["input"], p["output"], p["cache_read"], p["cache_write"], SOURCE_OVERRIDE,
                              cache_write_1h=None if cw1h is None or cw1h == p["cache_write"] else cw1h)
            self._overrides[name] = unit
            self._overrides_lower.setdefault(name.lower(), unit)
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
        self._refresh_interval = float(refresh_interval)
        self._fetcher = refresh_fetcher
        self._refreshed = threading.Event()  # set after each refresh attempt, for waiters
        self._cache: dict[tuple[str | None, str | None], _Entry] = {}
        self._warned: set[str | None] = set()
        self._windows: dict[tuple[str | None, str | None], int | None] = {}
        self._lock = threading.Lock()  # slow paths only: warnings, refresh state
        self._snapshot: data_snapshot.DataSnapshot | None = None  # refreshed data, private to this book
        self._refresh_thread: threading.Thread | None = None
        self._stop = threading.Event()
        if refresh:
            self.start_refresh()

    # ---- hot path --------------------------------------------------------------------------------

    def price(
        self, model: str | None, provider: str | None, usage: TokenUsage, *, at: datetime | None = None,
        detail: UsageDetail | None = None,
    ) -> PricedCall | None:
        """The cost of one call, or ``None`` if the model has no known price (flag the span unpriced).

        ``at`` prices the call as of another instant (bypassing the cache), e.g. to re-price history;
        a naive ``at`` is taken as UTC. ``detail``: what the provider reported beside the token counts
        (one-hour cache writes, a service tier, web searches), priced as the module docstring says.
        """
        if at is None:
            entry = self._cache.get((model, provider))
            if entry is None or entry.expires <= _monotonic():
                entry = self._resolve(model, provider)
        else:
            entry = self._resolve(model, provider, at)
        tokens = (usage.input, usage.output, usage.cache_read, usage.cache_write, usage.reasoning)
        if detail is not None:
            priced = _price_detail(entry, tokens, detail)
            return None if priced is None else PricedCall(*priced)
        rates = entry.rates(usage.input)
        if rates is None:
            return None
        return PricedCall(rates.nanos(*tokens), rates.unit)

    def price_nanos(
        self, model: str | None, provider: str | None, tokens: tuple[int, int, int, int, int],
        detail: UsageDetail | None = None,
    ) -> tuple[int, UnitPrices] | None:
        """:meth:`price` now, as ``(cost_nanos, unit prices)`` without building a ``PricedCall`` (the ledger's
        hot path), of the token counts in ``TokenUsage``'s order (input, output, cache read, cache write,
        reasoning); ``None`` if the model has no known price."""
        entry = self._cache.get((model, provider))
        if entry is None or entry.expires <= _monotonic():
            entry = self._resolve(model, provider)
        if detail is not None:
            return _price_detail(entry, tokens, detail)
        inp, out, cr, cw, rsn = tokens
        flat = entry.flat
        if flat is not None and not (cr or cw or rsn) and 0 <= inp <= MAX_TOKENS and 0 <= out <= MAX_TOKENS:
            # What rates.nanos computes for a call without cache or reasoning tokens, when no rounding is needed.
            return inp * flat[0] + out * flat[1] + flat[2], flat[3]
        rates = entry.rates(inp)
        if rates is None:
            return None
        return rates.nanos(inp, out, cr, cw, rsn), rates.unit

    def has_tier(self, model: str | None, provider: str | None, tier: str | None) -> bool:
        """Whether a call of ``model`` in service tier ``tier`` is priced at that tier's own rates (the standard
        tiers always are; a tier the catalog lacks is priced at the standard rates: flag it ``tier_unpriced``)."""
        if tier is None or tier in DEFAULT_TIERS:
            return True
        entry = self._entry(model, provider, None)
        return entry.variant(tier) is not None

    def is_priced(self, model: str | None, provider: str | None) -> bool:
        """Whether calls of ``model`` have a price now (tiers only exist beside a base price)."""
        entry = self._cache.get((model, provider))
        if entry is None or entry.expires <= _monotonic():
            entry = self._resolve(model, provider)
        return entry.base is not None

    def unit_prices(
        self, model: str | None, provider: str | None, input_tokens: int = 0, *, at: datetime | None = None
    ) -> UnitPrices | None:
        """The unit prices that apply to a call with ``input_tokens`` prompt tokens (tiers resolved)."""
        entry = self._entry(model, provider, at)
        rates = entry.rates(input_tokens)
        return None if rates is None else rates.unit

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
        entry = self._entry(model, provider, at)
        flat = entry.flat
        if flat is not None and 0 <= input_tokens <= MAX_TOKENS and 0 <= output_tokens <= MAX_TOKENS:
            # what rates.nanos gives, in short
            return input_tokens * flat[0] + output_tokens * flat[1] + flat[2]
        rates = entry.rates(input_tokens)
        if rates is None:
            return None
        return rates.nanos(input_tokens, output_tokens, 0, 0, 0)

    def estimate_upper_nanos(self, model: str | None, provider: str | None, input_bound: int,
                             output_tokens: int) -> int | None:
        """An upper bound of :meth:`estimate_nanos` for any ``input_tokens <= input_bound``: the most any tier
        that could apply charges for ``input_bound`` tokens. ``None`` if unpriced (or a price is negative)."""
        entry = self._entry(model, provider, None)
        flat = entry.flat
        if flat is not None and 0 <= input_bound <= MAX_TOKENS and 0 <= output_tokens <= MAX_TOKENS:
            # one rate: the estimate is its bound
            if flat[0] < 0 or flat[1] < 0 or flat[2] < 0:
                return None
            return input_bound * flat[0] + output_tokens * flat[1] + flat[2]
        best = None
        for rates in (entry.base, *(r for start, r in entry.tiers if input_bound > start)):
            if rates is None:
                continue
            if rates.inp < 0 or rates.out < 0 or rates.req < 0:
                return None  # not monotonic in the token counts: no bound
            n = rates.nanos(input_bound, output_tokens, 0, 0, 0)
            if best is None or n > best:
                best = n
        return best

    def tool_price_nanos(self, name: str) -> int | None:
        """The price of one call of tool ``name`` in nano-USD (exact name, then case-insensitive)."""
        nanos = self._tools.get(name)
        if nanos is None and name:
            nanos = self._tools_lower.get(name.lower())
        return nanos

    def _entry(self, model: str | None, provider: str | None, at: datetime | None) -> _Entry:
        if at is not None:
            return self._resolve(model, provider, at)
        entry = self._cache.get((model, provider))
        if entry is None or entry.expires <= _monotonic():
            entry = self._resolve(model, provider)
        return entry

    # ---- resolution (slow path) ------------------------------------------------------------------

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
        override = self._find_override(model, provider)
        if override is not None:
            return _Entry(_Rates(override), (), expires)
        try:
            return self._resolve_catalog(model, provider, now, mono, expires)
        except Exception:  # a catalog surprise (odd refreshed data, ...) must never break the caller's call
            logger.debug("genai-prices could not price model %r (provider %r)", model, provider, exc_info=True)
            return _Entry(None, (), expires)

    def _resolve_catalog(self, model: str, provider: str | None, now: datetime, mono: float, expires: float) -> _Entry:
        snapshot = self._snapshot or data_snapshot.get_snapshot()
        found = _find_in_catalog(snapshot, model, provider)
        if found is None:
            return _Entry(None, (), expires)
        gp_provider, gp_model = found
        model_price = gp_model.get_prices(now)
        change = _next_change(gp_model, now)
        if change is not None:
            expires = min(expires, mono + max((change - now).total_seconds(), 0.0))
        source = _catalog_source(snapshot)
        ref = _CatalogRef(gp_model, gp_provider.id, source, now)
        return _entry_of_price(model_price, source, gp_model.id, gp_provider.id, expires, ref, None)

    def _find_override(self, model: str, provider: str | None) -> UnitPrices | None:
        if not self._overrides:
            return None
        for name in _override_names(model, provider):
            unit = self._overrides.get(name) or self._overrides_lower.get(name.lower())
            if unit is not None:
                return unit
        return None

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
        with self._lock:
            if self._refresh_thread is not None and self._refresh_thread.is_alive():
                return
            self._stop = threading.Event()
            thread = threading.Thread(
                target=self._refresh_loop, args=(self._stop,), name="costobs-price-refresh", daemon=True
            )
            self._refresh_thread = thread
        thread.start()

    def refresh_now(self) -> bool:
        """Fetch newer catalog data in the calling thread (blocks up to the fetch's timeouts).

        Returns True if new data was installed, False if the fetch failed (logged) or brought nothing.
        """
        try:
            snapshot = self._fetch()
        except Exception as exc:  # offline or bad data: keep the prices in use
            logger.info("genai-prices refresh failed (%s: %s); keeping the prices in use", type(exc).__name__, exc)
            return False
        finally:
            self._refreshed.set()
        if snapshot is None:
            return False
        self._install_snapshot(snapshot)
        return True

    def wait_refreshed(self, timeout: float | None = None) -> bool:
        """Wait until the background refresh has made an attempt (successful or not); False on timeout."""
        return self._refreshed.wait(timeout)

    def _fetch(self) -> data_snapshot.DataSnapshot | None:
        if self._fetcher is not None:
            return self._fetcher()
        return genai_prices.UpdatePrices(update_interval=self._refresh_interval).fetch()

    def _refresh_loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                snapshot = self._fetch()
            except Exception as exc:  # offline or bad data: keep the prices in use
                logger.info("genai-prices refresh failed (%s: %s); keeping the prices in use", type(exc).__name__, exc)
            else:
                if snapshot is not None and not stop.is_set():
                    self._install_snapshot(snapshot)
            self._refreshed.set()
            if stop.wait(self._refresh_interval):
                break

    def _install_snapshot(self, snapshot: data_snapshot.DataSnapshot) -> None:
        """Use refreshed catalog data from now on and drop every cached resolution."""
        self._snapshot = snapshot
        self._cache = {}
        logger.info("genai-prices data refreshed (%d providers)", len(snapshot.providers))

    def close(self) -> None:
        """Stop the refresh thread, if any (waits at most a moment; the thread is a daemon)."""
        with self._lock:
            thread = self._refresh_thread
            self._refresh_thread = None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=0.5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- model limits ----------------------------------------------------------------------------

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
        if model and isinstance(model, str) and self._find_override(model, provider) is None:
            try:
                found = _find_in_catalog(self._snapshot or data_snapshot.get_snapshot(), model, provider)
            except Exception:  # a catalog surprise never breaks the caller's call
                found = None
            if found is not None and isinstance(found[1].context_window, int) and found[1].context_window > 0:
                window = found[1].context_window
        if len(self._windows) >= 4096:
            self._windows.clear()
        self._windows[key] = window
        return window
