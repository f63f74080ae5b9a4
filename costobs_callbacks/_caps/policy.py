"""What a tenant or a user may spend: ``CapPolicy`` (pydantic, validated at the edge) and the tables of them that
``CostTracker(tenant_budgets=..., user_budgets=...)`` takes, with ``"*"`` the default of every other key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .._events import usd_to_nanos
from .._exceptions import ConfigurationError

__all__ = ["DEFAULT_KEY", "CapPolicy", "CapTable", "coerce_cap_table"]

DEFAULT_KEY = "*"
"""The key of ``tenant_budgets`` / ``user_budgets`` whose policy applies to every tenant (user) not named."""

_MAX_KEY_LEN = 256


class CapPolicy(BaseModel):
    """Spend limits of one tenant (or user) over every replica sharing the database. ``None``: no such limit.

    ``daily_usd`` and ``monthly_usd`` are calendar periods in UTC. ``usd_per_minute`` is a spend rate enforced by
    delaying calls (up to ``max_wait_s`` seconds each, then refusing them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    daily_usd: Decimal | None = Field(default=None, description="USD per calendar day (UTC).")
    monthly_usd: Decimal | None = Field(default=None, description="USD per calendar month (UTC).")
    usd_per_minute: Decimal | None = Field(default=None, description="Spend rate; calls wait while it is passed.")
    max_wait_s: float = Field(default=30.0, description="Seconds a call may wait for the rate before it is refused.")

    @field_validator("daily_usd", "monthly_usd", "usd_per_minute", mode="before")
    @classmethod
    def _usd(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float, str, Decimal)):
            raise ValueError(f"must be a number of USD, not {type(v).__name__}")
        try:
            d = v if isinstance(v, Decimal) else Decimal(str(v).strip())
        except Exception as exc:
            raise ValueError(f"not a number: {v!r}") from exc
        if not d.is_finite():
            raise ValueError("must be finite (NaN and infinity are not limits)")
        if d <= 0:
            raise ValueError("must be > 0 (a zero or negative cap allows nothing)")
        if usd_to_nanos(d) <= 0:
            raise ValueError("must be at least one nano-dollar")
        if d > Decimal(10) ** 9:
            raise ValueError("must be at most $1,000,000,000")
        return d

    @field_validator("max_wait_s", mode="before")
    @classmethod
    def _wait(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number of seconds, not {type(v).__name__}")
        if not 0 <= v <= 3600:  # NaN fails this too
            raise ValueError("must be from 0 to 3600 seconds")
        return float(v)


@dataclass(frozen=True, slots=True)
class Limits:
    """A ``CapPolicy`` as plain nano-dollar figures (read on the app's thread)."""

    daily: int | None
    monthly: int | None
    per_minute: int | None
    max_wait_s: float


def _limits(p: CapPolicy) -> Limits | None:
    def n(d: Decimal | None) -> int | None:
        return None if d is None else usd_to_nanos(d)

    if p.daily_usd is None and p.monthly_usd is None and p.usd_per_minute is None:
        return None
    return Limits(n(p.daily_usd), n(p.monthly_usd), n(p.usd_per_minute), p.max_wait_s)


@dataclass(frozen=True, slots=True)
class CapTable:
    """One scope's policies: ``named`` by key (a tenant id, or a user id's hash) and the ``default`` (``"*"``)."""

    scope: str
    """``"tenant"`` or ``"user"``."""
    named: Mapping[str, Limits | None]
    default: Limits | None

    def limits(self, key: str) -> Limits | None:
        got = self.named.get(key, _MISSING)
        return self.default if got is _MISSING else got  # type: ignore[return-value]

    @property
    def throttled(self) -> bool:
        return any(lim is not None and lim.per_minute is not None for lim in (*self.named.values(), self.default))


_MISSING: Any = object()


def coerce_cap_table(name: str, value: Any, scope: str, key_of: Callable[[str], str] | None = None) -> CapTable | None:
    """``tenant_budgets`` / ``user_budgets`` (``name``) as a ``CapTable``: a mapping of non-empty texts (``"*"``: the
    default) to a ``CapPolicy`` or a mapping of its fields. ``key_of`` turns a key into the one stored (a user id
    into its hash). Raises ``ConfigurationError`` naming the bad entry and field."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a mapping of {scope} ids to limits, not {type(value).__name__}")
    named: dict[str, Limits | None] = {}
    default: Limits | None = None
    for key, pol in value.items():
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY_LEN or "\x00" in key:
            raise ConfigurationError(
                f"{name} keys must be {scope} ids (non-empty texts of at most {_MAX_KEY_LEN} characters, no NUL) or "
                f"'*', not {key!r}")
        if isinstance(pol, CapPolicy):
            policy = pol
        elif isinstance(pol, Mapping):
            try:
                policy = CapPolicy.model_validate(dict(pol))
            except ValidationError as exc:
                parts = []
                for err in exc.errors():
                    loc = ".".join(str(p) for p in err.get("loc", ()))
                    parts.append(f"{name}[{key!r}].{loc}: {err.get('msg')}")
                raise ConfigurationError("; ".join(parts)) from None
        else:
            raise ConfigurationError(
                f"{name}[{key!r}] must be a mapping of limits (daily_usd, monthly_usd, usd_per_minute, max_wait_s), "
                f"not {type(pol).__name__}")
        lim = _limits(policy)
        if key == DEFAULT_KEY:
            default = lim
        else:
            named[key_of(key) if key_of is not None else key] = lim
    if default is None and not any(v is not None for v in named.values()):
        return None
    return CapTable(scope, named, default)
