"""Provider usage reports, every shape, into one form: five token counts, flags, an optional ``UsageDetail``.

The adapters read nothing of a usage payload themselves: they hand it here and get a ``Parsed`` back, or
``None`` for "no report" (no usage at all, or an all-zero one such as a stream sends without usage), or a
``ValueError`` for a payload that is not a usage report at all (a count that is text, a bool, negative...):
the adapter then flags the call ``malformed_usage`` and estimates it whole.

Shapes read:

* LangChain's ``AIMessage.usage_metadata`` (:func:`from_langchain`), with langchain-anthropic's cache
  lifetimes (``input_token_details.ephemeral_5m_input_tokens`` / ``ephemeral_1h_input_tokens``, beside a
  ``cache_creation`` that recent releases set to 0 then and earlier ones to their total), langchain-openai's
  service-tier keys (``flex_cache_read``...) and the message's ``response_metadata`` (``service_tier``;
  Anthropic's raw ``usage``, for its web searches);
* an OpenAI-style usage mapping (``llm_output["token_usage"]``, a raw ``ChatCompletion.usage``), the
  Responses API's, and Anthropic's raw ``usage`` (``input_tokens`` *without* its cache reads and writes,
  ``cache_creation.{ephemeral_5m_input_tokens,ephemeral_1h_input_tokens}``,
  ``server_tool_use.web_search_requests``, ``service_tier``) (:func:`from_mapping`);
* a raw provider response, an object or a dict (:func:`from_raw`): its ``usage`` and ``service_tier``.

What is flagged (never a silent 0, never an exception):

* ``malformed_usage``: the input or output count missing or ``None``, or an input of 0 beside output
  tokens (that part is then estimated by the adapter: :func:`complete`); cache reads plus writes above the
  input (the cache counts are clamped to it), one-hour writes above the writes, reasoning above the output
  (clamped likewise);
* ``implausible``: a count above ``PLAUSIBLE_TOKENS``: 10^8 tokens in one call is ten times the largest
  context window on offer (10M tokens); such a count is a provider's or a proxy's bug. Every count is also
  clamped at ``_pricing.MAX_TOKENS`` (10^9), the bound that keeps any call's cost below 2^63 nano-USD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._events import UsageDetail, token_count
from ._pricing import DEFAULT_TIERS, MAX_REQUESTS, MAX_TOKENS

__all__ = ["PLAUSIBLE_TOKENS", "Parsed", "common_langchain", "complete", "from_langchain", "from_mapping",
           "from_raw"]

Tokens = tuple[int, int, int, int, int]

PLAUSIBLE_TOKENS = 100_000_000
"""A count above this, in one call, is flagged ``implausible`` (see the module docstring)."""

PLAUSIBLE_REQUESTS = 10_000
"""Web searches above this, in one call, are flagged ``implausible`` (Anthropic's ``max_uses`` are tens)."""

MISSING_INPUT = 1
MISSING_OUTPUT = 2

_int = token_count


class Parsed:
    """One call's usage as reported: ``tokens`` in ``TokenUsage``'s order (input, output, cache read, cache
    write, reasoning), already clamped; ``flags`` to set on the span; ``detail`` (``None``: nothing beside
    the counts); ``missing``: ``MISSING_INPUT`` / ``MISSING_OUTPUT`` bits, the parts the adapter estimates
    (their counts are 0 in ``tokens`` meanwhile)."""

    __slots__ = ("detail", "flags", "missing", "tokens")

    def __init__(self, tokens: Tokens, flags: tuple[str, ...] = (), detail: UsageDetail | None = None,
                 missing: int = 0) -> None:
        self.tokens = tokens
        self.flags = flags
        self.detail = detail
        self.missing = missing

    def __repr__(self) -> str:
        return f"Parsed({self.tokens}, flags={self.flags}, detail={self.detail}, missing={self.missing})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Parsed) and (self.tokens, self.flags, self.detail, self.missing) == (
            other.tokens, other.flags, other.detail, other.missing)

    __hash__ = None  # type: ignore[assignment]


def _count(v: Any) -> int:
    """A count, plain non-negative ints taken as they are (what providers send)."""
    return v if type(v) is int and v >= 0 else _int(v)


def _opt(v: Any) -> int | None:
    """A count that may be absent: ``None`` stays ``None``."""
    return None if v is None else _count(v)


def _mapping(v: Any, what: str) -> Mapping[str, Any]:
    if not v:
        return _EMPTY
    if isinstance(v, Mapping):
        return v
    dump = getattr(v, "model_dump", None)  # a provider SDK's pydantic object
    if callable(dump):
        d = dump()
        if isinstance(d, Mapping):
            return d
    d = getattr(v, "__dict__", None)
    if isinstance(d, Mapping):
        return d
    raise ValueError(f"{what} is not a mapping")


_EMPTY: Mapping[str, Any] = {}


def _tier(v: Any) -> str | None:
    """A reported service tier, ``None`` for the standard one (or none)."""
    if v is None or not isinstance(v, str):
        return None
    t = v.strip().lower()
    return None if not t or t in DEFAULT_TIERS else t


def _build(inp: int | None, out: int | None, cr: int, cw: int, rsn: int, cw1h: int = 0, tier: str | None = None,
           web: int = 0, flags: tuple[str, ...] = ()) -> Parsed | None:
    """Checks and clamps shared by every shape; ``None`` for an all-zero report (no report)."""
    missing = 0
    if inp is None or (inp == 0 and out):
        # No model answers an empty prompt: a 0 beside output tokens is a count left out (langchain-openai
        # turns a null prompt_tokens into 0), estimated like a missing one.
        missing = MISSING_INPUT
        inp = 0
    if out is None:
        missing |= MISSING_OUTPUT
        out = 0
    if not missing and not (inp or out or cr or cw):
        return None  # an all-zero report (a stream without usage) is no report
    malformed = bool(missing)
    implausible = False
    if (inp > PLAUSIBLE_TOKENS or out > PLAUSIBLE_TOKENS or cr > PLAUSIBLE_TOKENS or cw > PLAUSIBLE_TOKENS
            or rsn > PLAUSIBLE_TOKENS or web > PLAUSIBLE_REQUESTS):
        implausible = True
        inp, out = min(inp, MAX_TOKENS), min(out, MAX_TOKENS)
        cr, cw, rsn = min(cr, MAX_TOKENS), min(cw, MAX_TOKENS), min(rsn, MAX_TOKENS)
        web = min(web, MAX_REQUESTS)
    if cr + cw > inp and not missing & MISSING_INPUT:  # a missing input is estimated, at least cr + cw
        malformed = True
        cr = min(cr, inp)
        cw = min(cw, inp - cr)
    if cw1h > cw:
        malformed = True
        cw1h = cw
    if rsn > out and not missing & MISSING_OUTPUT:
        malformed = True
        rsn = out
    if malformed and "malformed_usage" not in flags:
        flags += ("malformed_usage",)
    if implausible:
        flags += ("implausible",)
    detail = UsageDetail(cw1h, tier, web) if (cw1h or tier or web) else None
    return Parsed((inp, out, cr, cw, rsn), flags, detail, missing)


def complete(parsed: Parsed, estimate: Tokens) -> Tokens:
    """``parsed.tokens`` with its missing parts (``parsed.missing``) taken from an estimate of the call: an
    estimated input is at least the cache reads and writes reported (they are part of it), and reasoning
    within an estimated output."""
    inp, out, cr, cw, rsn = parsed.tokens
    if parsed.missing & MISSING_INPUT:
        inp = min(max(estimate[0], cr + cw), MAX_TOKENS)
        cr = min(cr, inp)
        cw = min(cw, inp - cr)
    if parsed.missing & MISSING_OUTPUT:
        out = min(estimate[1], MAX_TOKENS)
        rsn = min(rsn, out)
    return inp, out, cr, cw, rsn


# -- LangChain ---------------------------------------------------------------------------------------------


def from_langchain(um: Any, rm: Any = None) -> Parsed | None:
    """``AIMessage.usage_metadata`` (and the message's ``response_metadata``, for what it says beside the
    counts) -> ``Parsed``; ``None``: no report; ``ValueError``: not a usage report.

    The LangChain handler reads the common report with :func:`common_langchain` first (a property test holds
    the two to one answer)."""
    if type(um) is not dict and not isinstance(um, dict):
        raise ValueError(f"usage_metadata is {type(um).__name__}")
    itd = um.get("input_token_details")
    otd = um.get("output_token_details")
    if (itd and type(itd) is not dict and not isinstance(itd, dict)) or (
            otd and type(otd) is not dict and not isinstance(otd, dict)):
        raise ValueError("token details are not mappings")
    inp = um.get("input_tokens")
    if type(inp) is not int or inp < 0:
        inp = _opt(inp)
    out = um.get("output_tokens")
    if type(out) is not int or out < 0:
        out = _opt(out)
    cr = cw = rsn = 0
    cw1h = web = 0
    tier: str | None = None
    if itd:
        v = itd.get("cache_read")
        if v is None and len(itd) > 1:
            # langchain-openai names the counts of a flex / priority call after its tier: flex_cache_read, ...
            for key in itd:
                if key.endswith("_cache_read"):
                    tier = key[: -len("_cache_read")]
                    v = itd[key]
                    c = itd.get(f"{tier}_cache_creation")
                    cw = 0 if c is None else _count(c)
                    r = otd.get(f"{tier}_reasoning") if otd else None
                    rsn = 0 if r is None else _count(r)
                    break
        else:
            c = itd.get("cache_creation")
            if c is not None:
                cw = c if type(c) is int and c >= 0 else _count(c)
        if v is not None:
            cr = v if type(v) is int and v >= 0 else _count(v)
        if "ephemeral_1h_input_tokens" in itd or "ephemeral_5m_input_tokens" in itd:
            # langchain-anthropic reports writes by lifetime too; their sum is the writes, as it counts them:
            # recent releases set cache_creation to 0 beside them, earlier ones (1.2) keep the total there too
            w1h = itd.get("ephemeral_1h_input_tokens")
            w5 = itd.get("ephemeral_5m_input_tokens")
            cw1h = 0 if w1h is None else _count(w1h)
            by_lifetime = (0 if w5 is None else _count(w5)) + cw1h
            if by_lifetime:
                cw = by_lifetime
    if otd and tier is None:
        r = otd.get("reasoning")
        if r is not None:
            rsn = r if type(r) is int and r >= 0 else _count(r)
    if rm:
        if type(rm) is not dict and not isinstance(rm, dict):
            rm = _EMPTY
        t = rm.get("service_tier")
        if t is not None and t not in DEFAULT_TIERS:
            tier = _tier(t)
        raw = rm.get("usage")
        if raw and isinstance(raw, dict):  # langchain-anthropic's copy of the provider's usage
            stu = raw.get("server_tool_use")
            if stu and isinstance(stu, dict):
                web = _count(stu.get("web_search_requests"))
            if tier is None:
                tier = _tier(raw.get("service_tier"))
    elif tier is not None:
        tier = _tier(tier)
    if (tier is None and not cw1h and not web and inp is not None and out is not None
            and 0 < inp <= PLAUSIBLE_TOKENS and out <= PLAUSIBLE_TOKENS and cr + cw <= inp and rsn <= out):
        return Parsed((inp, out, cr, cw, rsn))  # the common report: nothing to flag, nothing beside the counts
    return _build(inp, out, cr, cw, rsn, cw1h, tier, web)


def common_langchain(um: dict[str, Any], rm: Any) -> Tokens | None:
    """The tokens of the commonest report, the one every real OpenAI call sends (its details list audio and
    cached tokens), in a few tests: plain counts, the standard tier, no cache lifetimes, no web searches,
    nothing to flag. ``None``: anything else, to be read by :func:`from_langchain`. The caller has checked
    that ``um`` is a dict whose ``input_tokens`` (> 0) and ``output_tokens`` are plain ints within
    ``PLAUSIBLE_TOKENS``."""
    itd = um.get("input_token_details")
    cr: Any = 0
    cw: Any = 0
    rsn: Any = 0
    if itd:
        if type(itd) is not dict or "ephemeral_1h_input_tokens" in itd or "ephemeral_5m_input_tokens" in itd:
            return None
        cr = itd.get("cache_read")
        if cr is None:
            if len(itd) > 1:
                return None  # perhaps a tier's names (flex_cache_read...)
            cr = 0
        elif type(cr) is not int or cr < 0:
            return None
        cw = itd.get("cache_creation")
        if cw is None:
            cw = 0
        elif type(cw) is not int or cw < 0:
            return None
    otd = um.get("output_token_details")
    if otd:
        if type(otd) is not dict:
            return None
        rsn = otd.get("reasoning")
        if rsn is None:
            if len(otd) > 1:
                return None
            rsn = 0
        elif type(rsn) is not int or rsn < 0:
            return None
    if rm:
        if type(rm) is not dict:
            return None
        t = rm.get("service_tier")
        if t is not None and t not in DEFAULT_TIERS:
            return None
        u = rm.get("usage")
        if u and (type(u) is not dict or u.get("server_tool_use") or u.get("service_tier") not in _STANDARD):
            return None
    inp: int = um["input_tokens"]
    out: int = um["output_tokens"]
    if cr + cw > inp or rsn > out:
        return None
    return inp, out, cr, cw, rsn


_STANDARD = DEFAULT_TIERS | {None}


# -- provider payloads ---------------------------------------------------------------------------------------


def from_mapping(u: Mapping[str, Any], service_tier: Any = None) -> Parsed | None:
    """A provider's usage mapping: OpenAI chat (``prompt_tokens``...), OpenAI Responses (``input_tokens`` with
    ``input_tokens_details``) or Anthropic (``input_tokens`` without its cache tokens); ``None`` if it holds no
    usage; ``ValueError`` on garbage. ``service_tier``: the response's, when it is reported beside the usage."""
    tier = _tier(service_tier)
    if "prompt_tokens" in u or "completion_tokens" in u:
        ptd = _mapping(u.get("prompt_tokens_details"), "prompt_tokens_details")
        ctd = _mapping(u.get("completion_tokens_details"), "completion_tokens_details")
        cw = ptd.get("cache_write_tokens")
        if cw is None:
            cw = ptd.get("cache_creation_tokens")
        return _build(_opt(u.get("prompt_tokens")), _opt(u.get("completion_tokens")),
                      _count(ptd.get("cached_tokens")), _count(cw), _count(ctd.get("reasoning_tokens")), tier=tier)
    if "input_tokens" not in u and "output_tokens" not in u:
        return None
    if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u or "cache_creation" in u:
        return _anthropic(u, tier)
    itd = _mapping(u.get("input_tokens_details"), "input_tokens_details")
    otd = _mapping(u.get("output_tokens_details"), "output_tokens_details")
    stu = _mapping(u.get("server_tool_use"), "server_tool_use")
    return _build(_opt(u.get("input_tokens")), _opt(u.get("output_tokens")), _count(itd.get("cached_tokens")), 0,
                  _count(otd.get("reasoning_tokens") if "reasoning_tokens" in otd else otd.get("thinking_tokens")),
                  tier=tier or _tier(u.get("service_tier")), web=_count(stu.get("web_search_requests")))


def _anthropic(u: Mapping[str, Any], tier: str | None) -> Parsed | None:
    """Anthropic's ``usage``: its ``input_tokens`` counts only the uncached prompt."""
    flags: tuple[str, ...] = ()
    cr = _count(u.get("cache_read_input_tokens"))
    cw = _opt(u.get("cache_creation_input_tokens"))
    lifetimes = _mapping(u.get("cache_creation"), "cache_creation")
    w5 = _count(lifetimes.get("ephemeral_5m_input_tokens"))
    w1h = _count(lifetimes.get("ephemeral_1h_input_tokens"))
    if cw is None:
        cw = w5 + w1h
    elif w5 + w1h > cw:  # the breakdown says more was written than the total: the larger is billed, flagged
        flags = ("malformed_usage",)
        cw = w5 + w1h
    uncached = _opt(u.get("input_tokens"))
    inp = None if uncached is None else uncached + cr + cw
    otd = _mapping(u.get("output_tokens_details"), "output_tokens_details")
    stu = _mapping(u.get("server_tool_use"), "server_tool_use")
    return _build(inp, _opt(u.get("output_tokens")), cr, cw, _count(otd.get("thinking_tokens")), w1h,
                  tier or _tier(u.get("service_tier")), _count(stu.get("web_search_requests")), flags)


def from_raw(raw: Any) -> Parsed | None:
    """A raw provider response (an SDK object or a dict, e.g. LlamaIndex's ``response.raw``): its ``usage``
    and ``service_tier``; ``None`` if it carries no usage."""
    if isinstance(raw, Mapping):
        u = raw.get("usage")
        tier = raw.get("service_tier")
    else:
        u = getattr(raw, "usage", None)
        tier = getattr(raw, "service_tier", None)
    if not u:
        return None
    return from_mapping(_mapping(u, "usage"), tier)
