"""The genai-prices catalog: a model found under the names it may be reported by (``names``), its prices at an
instant (effective dates, time-of-day windows), one set per tier threshold, its service tiers' prices, the next
instant they may change, and its context window. Only the book calls this, on a cache miss (and
``_Entry.variant`` at the first call of a service tier)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import genai_prices
from genai_prices import data_snapshot
from genai_prices import types as gp_types

from .names import _model_refs, is_local, provider_id
from .rates import _MAX_PRICE, UnitPrices, _Entry, _Rates

__all__: list[str] = []

logger = logging.getLogger("costobs_callbacks")


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
        # outside the bounds every cost is proven against (see rates: Bounds): never priced from odd (refreshed) data
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


def _find_in_catalog(
    snapshot: data_snapshot.DataSnapshot, model: str, provider: str | None
) -> tuple[gp_types.Provider, gp_types.ModelInfo] | None:
    """The catalog's provider and model for ``model`` as ``provider`` reported it: each name the model stands for
    (``_model_refs``, exact ones first) under the reported provider, then under the one its ``provider/`` prefix
    implies, then under any; none for a local provider."""
    if provider and is_local(provider):
        return None
    pid = (provider_id(provider) or None) if provider else None

    def attempt(ref: str, under: str | None) -> tuple[gp_types.Provider, gp_types.ModelInfo] | None:
        try:
            return snapshot.find_provider_model(ref, None, under, None)
        except (LookupError, ValueError):
            return None

    for ref, implied in _model_refs(model):
        if pid is not None and (found := attempt(ref, pid)):
            return found
        if implied is not None and (found := attempt(ref, provider_id(implied))):
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


def resolve(snapshot: data_snapshot.DataSnapshot, model: str, provider: str | None, now: datetime, mono: float,
            expires: float) -> _Entry:
    """The entry of ``model`` (as ``provider`` reported it) in the catalog ``snapshot`` at ``now``: a miss if the
    catalog has no price for it; it expires at ``expires`` (monotonic, as ``mono`` is ``now``) or at the catalog's
    next price change for the model, whichever is first."""
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


def context_window(snapshot: data_snapshot.DataSnapshot, model: str, provider: str | None) -> int | None:
    """The model's context window in tokens as the catalog has it (``None``: unknown)."""
    found = _find_in_catalog(snapshot, model, provider)
    if found is not None and isinstance(found[1].context_window, int) and found[1].context_window > 0:
        return found[1].context_window
    return None
