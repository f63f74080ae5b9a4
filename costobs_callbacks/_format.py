"""Costs and tables as the command line and the demo print them.

A cost is never a silent $0: a group whose model calls had no price shows a dash and how many there were, and a
group with priced and unpriced calls shows what the priced ones cost and how many it leaves out. Every printed
cost goes through ``usd`` so that the two read the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

__all__ = ["NO_KEY", "key_text", "table", "usd"]

NO_KEY = "(none)"
"""A rollup key a group does not have (a span without a tenant, a model key of a tool)."""


def usd(amount: Decimal | int | float, unpriced: int = 0, calls: int | None = None, *,
        places: int | None = 6) -> str:
    """``amount`` (USD, of the priced calls) as text: ``$0.012000``, ``$0.012000 + 2 unpriced``, or
    ``- (2 unpriced)`` when none of the group's ``calls`` model calls had a price (``calls`` None: when the
    amount is zero). ``places`` None prints the amount exactly (a ``Decimal`` as it is)."""
    money = f"${amount}" if places is None else f"${amount:,.{places}f}"
    if not unpriced:
        return money
    if not amount and (calls is None or calls <= unpriced):
        return f"- ({unpriced:,} unpriced)"
    return f"{money} + {unpriced:,} unpriced"


def key_text(value: Any) -> str:
    """A rollup key's value in a table cell (``(none)`` for a group without it)."""
    return NO_KEY if value is None else str(value)


def table(out: Callable[[str], Any], title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table under ``title``: the first column left-aligned, the others right-aligned."""
    cells = [list(header), *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out(title)
    for j, row in enumerate(cells):
        out(("  " + "  ".join(c.rjust(w) if j and i else c.ljust(w)
                              for i, (c, w) in enumerate(zip(row, widths, strict=True)))).rstrip())
        if j == 0:
            out("  " + "  ".join("-" * w for w in widths))
    out("")
