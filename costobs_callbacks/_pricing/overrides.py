"""User prices: model overrides (a mapping, or a YAML or JSON price file) and tool prices, validated with
pydantic at the edge (a bad value raises ``ConfigurationError`` naming the model or tool and the field), and the
overrides' look-up under the names a reported model stands for (``names``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pydantic

from .._exceptions import ConfigurationError
from .names import _override_names
from .rates import _MAX_PRICE, UnitPrices, _scaled_int

__all__ = ["SOURCE_OVERRIDE", "load_price_file"]


SOURCE_OVERRIDE = "override"
"""``UnitPrices.source`` of a user override."""


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


class _Overrides:
    """The user's model prices as ``UnitPrices``, found by any name the reported model stands for (exact names
    first, then case-insensitively)."""

    def __init__(self, table: Mapping[str, Mapping[str, Decimal]]) -> None:
        self._exact: dict[str, UnitPrices] = {}
        self._lower: dict[str, UnitPrices] = {}
        for name, p in table.items():
            cw1h = p.get("cache_write_1h")
            unit = UnitPrices(p["input"], p["output"], p["cache_read"], p["cache_write"], SOURCE_OVERRIDE,
                              cache_write_1h=None if cw1h is None or cw1h == p["cache_write"] else cw1h)
            self._exact[name] = unit
            self._lower.setdefault(name.lower(), unit)

    def __bool__(self) -> bool:
        return bool(self._exact)

    def find(self, model: str, provider: str | None) -> UnitPrices | None:
        """The override of ``model`` as ``provider`` reported it, if the user gave one."""
        if not self._exact:
            return None
        for name in _override_names(model, provider):
            unit = self._exact.get(name) or self._lower.get(name.lower())
            if unit is not None:
                return unit
        return None
