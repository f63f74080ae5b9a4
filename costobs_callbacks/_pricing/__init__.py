"""Model and tool prices: pydantic's ``genai-prices`` catalog, with user overrides on top.

Money is integer nano-USD (1e-9 USD) inside the library; ``Decimal`` only at the edges.

The package, module by module: ``names`` (provider names and model-name variants, one home each) ->
``overrides`` (the user's prices, validated) and ``catalog`` (genai-prices: a model's prices at an instant, its
tiers and service tiers) -> ``rates`` (unit prices as integers, and ``_Entry.nanos``, the one computation of a
call's cost, with the shortcut for one flat rate inside it) -> ``book`` (``PriceBook``: the cache of resolved
prices and every look-up) -> ``refresh`` (newer catalog data from the publisher).
"""

from .book import DEFAULT_TTL_SECONDS, PriceBook
from .names import provider_from_name, provider_id
from .overrides import SOURCE_OVERRIDE, load_price_file
from .rates import DEFAULT_TIERS, MAX_REQUESTS, MAX_TOKENS, PricedCall, UnitPrices

__all__ = [
    "DEFAULT_TIERS", "DEFAULT_TTL_SECONDS", "MAX_REQUESTS", "MAX_TOKENS", "SOURCE_OVERRIDE", "PriceBook", "PricedCall",
    "UnitPrices", "load_price_file", "provider_from_name", "provider_id",
]
