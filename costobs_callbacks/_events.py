"""What the framework adapters hand the ledger: a call's token counts (``TokenUsage``), what else changes its
price (``UsageDetail``), and the money helpers.

Money is integer nano-USD (1e-9 USD) everywhere inside; ``Decimal`` only at the public edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = ["COST_EVENT", "NANOS_PER_USD", "TokenUsage", "UsageDetail", "nanos_to_usd", "token_count", "usd_to_nanos"]

NANOS_PER_USD = 1_000_000_000

COST_EVENT = "costobs.cost"
"""The LangChain custom event a tool dispatches to report its own cost at run time:
``dispatch_custom_event("costobs.cost", {"usd": 0.004})``."""


def nanos_to_usd(nanos: int | None) -> Decimal | None:
    """Integer nano-USD to an exact ``Decimal`` in USD."""
    if nanos is None:
        return None
    return Decimal(nanos).scaleb(-9)


def usd_to_nanos(usd: Any) -> int:
    """USD (``Decimal``, ``int``, ``float`` or numeric string) to integer nano-USD, half-even."""
    d = usd if isinstance(usd, Decimal) else Decimal(str(usd))
    if not d.is_finite():
        raise ValueError(f"not a finite amount: {usd!r}")
    return int((d * NANOS_PER_USD).to_integral_value())


def token_count(v: Any) -> int:
    """A token count from a provider payload: ``None`` is 0; an int, an integral float or a digit
    string is read; anything else (a bool, a negative number, text) raises ``ValueError`` and the
    adapter flags the span ``malformed_usage``."""
    if v is None:
        return 0
    if isinstance(v, bool):
        raise ValueError("bool is not a token count")
    if isinstance(v, int):
        n = v
    elif (isinstance(v, float) and v.is_integer()) or (isinstance(v, str) and v.strip().isdigit()):
        n = int(v)
    else:
        raise ValueError(f"not a token count: {v!r}")
    if n < 0:
        raise ValueError(f"negative token count: {n}")
    return n


@dataclass(slots=True)
class TokenUsage:
    """Tokens of one model call, in the providers' own sense.

    ``input`` is the whole prompt, cache reads and writes included (they are subsets of it);
    ``output`` is the whole completion, reasoning included (a subset of it).
    """

    input: int = 0
    """Prompt tokens, cached ones included."""
    output: int = 0
    """Completion tokens, reasoning included."""
    cache_read: int = 0
    """Prompt tokens served from the provider's prompt cache (a subset of ``input``)."""
    cache_write: int = 0
    """Prompt tokens written to the provider's prompt cache (a subset of ``input``)."""
    reasoning: int = 0
    """Reasoning tokens (a subset of ``output``)."""


@dataclass(frozen=True, slots=True)
class UsageDetail:
    """What a provider reports beside the five token counts that changes the price of a call.

    ``None`` on a span for the common case (nothing of this reported): one object fewer per call.
    """

    cache_write_1h: int = 0
    """Of ``TokenUsage.cache_write``, the tokens written with a one-hour lifetime (Anthropic prices them above
    five-minute writes); the rest of ``cache_write`` is priced as five-minute writes."""
    service_tier: str | None = None
    """The provider's service tier for the call (OpenAI's ``flex``, ``priority``, ``batch``...); ``None``: default."""
    web_search_requests: int = 0
    """Server-side tool requests billed per request (Anthropic's ``server_tool_use.web_search_requests``)."""
