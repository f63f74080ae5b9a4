"""Tool costs: a fixed price per call (``tool_prices``) or a price the tool reports at run time.

    pip install "costobs-callbacks[examples]"     # from a checkout of the repository: pip install ".[examples]"
    python examples/tool_costs.py
"""

from __future__ import annotations

import os
import tempfile

from langchain_core.callbacks import dispatch_custom_event
from langchain_core.tools import tool

from costobs_callbacks import COST_EVENT, CostTracker


@tool
def geocode(address: str) -> str:
    """Geocode an address (a paid API billed per call)."""
    return "38.72,-9.14"


@tool
def scrape(url: str, pages: int = 1) -> str:
    """Scrape a site; the vendor bills per page, so the tool reports what it spent."""
    dispatch_custom_event(COST_EVENT, {"usd": 0.0015 * pages})
    return f"{pages} pages of {url}"


def main() -> None:
    db = os.path.join(tempfile.mkdtemp(), "costobs.db")
    with CostTracker(f"sqlite:///{db}", tool_prices={"geocode": 0.005}) as tracker:
        cfg = tracker.config(feature="lead-enrichment", tenant_id="initech")
        geocode.invoke({"address": "Praca do Comercio, Lisbon"}, config=cfg)
        cost = tracker.run_cost(cfg["run_id"])
        assert cost is not None
        print(f"geocode run: ${cost.cost_usd}, tool calls {cost.tool_calls}")

        cfg2 = tracker.config(feature="lead-enrichment", tenant_id="initech")
        scrape.invoke({"url": "https://example.com", "pages": 4}, config=cfg2)
        cost2 = tracker.run_cost(cfg2["run_id"])
        assert cost2 is not None
        print(f"scrape run: ${cost2.cost_usd} (reported by the tool at run time)")

        for row in tracker.rollup(by=["name"], where={"kind": "tool"}):
            print(f"tool {row.key['name']}: ${row.cost_usd} over {row.tool_calls} calls")


if __name__ == "__main__":
    main()
