"""Values made to fit their columns, and telling a batch refused for its content from a database that is away.

Text every database takes (no NUL characters, no lone surrogates, cut to its column), integers held inside their
column's range; a span so changed is flagged ``sanitized``. The write paths fit values only after the database
refused a batch (``_is_data_error``): the common batch pays nothing for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .schema import (
    _ATTRS_AT,
    _BIG_MAX,
    _FLAGS_AT,
    _INT_MAX,
    _RUN_COLS,
    _RUN_SUMS,
    _SPAN_COLS,
    _json_text,
    runs,
    spans,
)

__all__: list[str] = []


def _txt(s: str, n: int) -> str:
    """Text from a framework or provider, fit for a column: NUL characters dropped (PostgreSQL refuses
    them, and one bad row would fail its whole batch), cut to ``n`` characters."""
    return (s.replace("\x00", "") if "\x00" in s else s)[:n]


_INT32_COLS = frozenset({"hour", "web_search_requests", *_RUN_SUMS[6:]})

_BIGINT_COLS = frozenset({
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_nanos",
    "tree_cost_nanos", "saved_nanos", "cache_write_1h_tokens",
})


def _kinds(cols: Sequence[str]) -> str:
    """Per column: ``b`` a BIGINT, ``i`` an INTEGER, ``t`` anything else (text is fitted, other values kept)."""
    return "".join("i" if c in _INT32_COLS else "b" if c in _BIGINT_COLS else "t" for c in cols)


_SPAN_KINDS = _kinds(_SPAN_COLS)

_RUN_KINDS = _kinds(_RUN_COLS)

_SPAN_LENS: tuple[int | None, ...] = tuple(getattr(spans.c[c].type, "length", None) for c in _SPAN_COLS)

_RUN_LENS: tuple[int | None, ...] = tuple(getattr(runs.c[c].type, "length", None) for c in _RUN_COLS)


def _fit_text(s: str) -> str:
    """Text every database takes: surrogate pairs joined, lone surrogates replaced by U+FFFD (UTF-8 cannot
    encode them), NUL characters dropped (PostgreSQL refuses them); the same object when it already is."""
    if "\x00" in s:
        s = s.replace("\x00", "")
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return s


def _fit_int(v: int, ceiling: int) -> int:
    return ceiling if v > ceiling else -ceiling if v < -ceiling else v


def _fit_json(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Run attributes (text, numbers, booleans, ``None``) with their text made encodable."""
    return {_fit_text(k): _fit_text(v) if isinstance(v, str) else v for k, v in attrs.items()}


def _fit_row(row: Sequence[Any], kinds: str, lens: Sequence[int | None]) -> tuple[list[Any], bool]:
    """A row with every value made to fit its column, and whether any changed: integers held inside their
    column's range, text made encodable (``_fit_text``) and cut to the column's length. Booleans, times and
    floats are kept."""
    out = list(row)
    changed = False
    for i, v in enumerate(row):
        tv = type(v)
        if tv is str:
            nv: Any = _fit_text(v)
            n = lens[i]
            if n is not None and len(nv) > n:
                nv = nv[:n]
        elif tv is int:
            nv = _fit_int(v, _INT_MAX if kinds[i] == "i" else _BIG_MAX)
        else:
            continue
        if nv is not v and nv != v:
            out[i] = nv
            changed = True
    return out, changed


def _fit_span_row(row: tuple[Any, ...] | dict[str, Any]) -> tuple[Any, bool]:
    """A span's row (a tuple of ``_SPAN_COLS`` or a Core dict) made to fit (``_fit_row``), flagged ``sanitized``
    if anything changed; and whether it did."""
    vals, changed = _fit_row(tuple(row.values()) if isinstance(row, dict) else row, _SPAN_KINDS, _SPAN_LENS)
    if changed:
        _add_flag(vals)
    if isinstance(row, dict):
        return dict(zip(_SPAN_COLS, vals, strict=True)), changed
    return tuple(vals), changed


def _add_flag(vals: list[Any]) -> None:
    flags = vals[_FLAGS_AT]
    vals[_FLAGS_AT] = _txt(f"{flags},sanitized" if flags else "sanitized", 256)


def _flag_sanitized(row: tuple[Any, ...] | dict[str, Any]) -> Any:
    """A span's row flagged ``sanitized`` (its run's values were made to fit)."""
    vals = list(row.values()) if isinstance(row, dict) else list(row)
    _add_flag(vals)
    return dict(zip(_SPAN_COLS, vals, strict=True)) if isinstance(row, dict) else tuple(vals)


def _fit_run_row(row: tuple[Any, ...] | dict[str, Any]) -> tuple[Any, bool]:
    """A run's row (``_run_tuple``'s or ``_run_row``'s) made to fit (``_fit_row``; JSON text as text, the
    attributes of a Core row by value), and whether anything changed."""
    if isinstance(row, dict):
        attrs = row["attributes"]
        vals, changed = _fit_row(tuple(row[k] for k in _RUN_COLS), _RUN_KINDS, _RUN_LENS)
        if attrs:
            fitted = _fit_json(attrs)
            if fitted != attrs:
                vals[_ATTRS_AT] = fitted
                changed = True
        return dict(zip(_RUN_COLS, vals, strict=True)), changed
    text = row[_ATTRS_AT]
    vals, changed = _fit_row(row, _RUN_KINDS, _RUN_LENS)
    if text is not None:  # by value, as for a Core row (the text's \u0000 escapes are NULs too)
        attrs = json.loads(text)
        fitted = _fit_json(attrs)
        vals[_ATTRS_AT] = _json_text(fitted)
        changed = changed or fitted != attrs
    return tuple(vals), changed


def _fit_rows(span_rows: list[Any], run_rows: list[Any], span_runs: Sequence[str], span_hits: Sequence[bool],
              run_ids: Sequence[str]) -> int:
    """Run rows made to fit in place; the span rows of a run so changed flagged ``sanitized`` (their own values
    were fitted already: ``span_hits``). Returns how many spans were changed or flagged."""
    dirty = set()
    for i, rid in enumerate(run_ids):
        run_rows[i], hit = _fit_run_row(run_rows[i])
        if hit:
            dirty.add(rid)
    changed = 0
    for i, (rid, hit) in enumerate(zip(span_runs, span_hits, strict=True)):
        if not hit and rid in dirty:
            span_rows[i] = _flag_sanitized(span_rows[i])
            hit = True
        changed += hit
    return changed


def _is_data_error(exc: BaseException) -> bool:
    """The batch was refused for its content (retrying it as it is cannot help), not for the database's state:
    a value the driver cannot bind (an int past 64 bits, text it cannot encode) or the database refuses (out
    of range, too long, a constraint)."""
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError, OverflowError, UnicodeError)):
        return True
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        return isinstance(exc.orig, (OverflowError, UnicodeError, ValueError, TypeError))
    return False
