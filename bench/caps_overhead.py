"""A tenant-capped call's added app-thread time: cached (its replica holds a lease) and at a refresh.

Configurations, interleaved in one run (each its own tracker on a SQLite file, or ``--database-url``; the same fake
chat model, prompt and metadata as ``handler_overhead``; every call its own root run for tenant ``acme``):

  ours           (d) no caps
  capped         (g) ``tenant_budgets={"acme": {"daily_usd": ...}}``, ``cap_refresh_s=5``: the lease is held, a call
                 holds its estimate and spends from it on the app's thread, no I/O
  capped_busy    (g') as (g) with ``cap_refresh_s=0.05``: the caps' thread reports, renews and reads the store twenty
                 times a second while the app calls (what its rounds cost the app's thread: the GIL and the lock)
  throttled      (h) as (g) with ``usd_per_minute`` too (never binding): the rate bucket held and spent as well

Then, apart (it waits on the database by design): the first call of a tenant new to this replica, which waits for
its first lease (one round of the caps' thread: a transaction on the store), wall and CPU time, each call a new
tenant under the ``"*"`` default.

The measure is the calling thread's CPU time per call (``time.thread_time_ns``), median over rounds of the batch
means, and the overhead over (d) the median of per-round differences (see ``bench/README.md``).

Run: ``python -m bench.caps_overhead [--rounds N] [--batch N] [--database-url URL]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    PRICES,
    fixed_chat_model,
    fmt,
    interleave,
    metric,
    paired_overhead,
    print_summary,
    quiet_tracing,
    summarize,
    table,
    write_results,
)

NAME = "caps_overhead"
META = {"feature": "bench", "user_id": "user-42", "tenant_id": "acme"}
LABELS = {
    "ours": "(d) costobs, no caps",
    "capped": "(g) + tenant cap, lease held (cap_refresh_s=5)",
    "capped_busy": "(g') + tenant cap, cap_refresh_s=0.05",
    "throttled": "(h) + tenant cap and usd_per_minute",
}
HUGE = "100000000"


def _trackers(url_of: Any) -> dict[str, Any]:
    from costobs_callbacks import CostTracker

    def make(name: str, **kw: Any) -> Any:
        return CostTracker(url_of(name), prices=PRICES, user_salt="bench-salt", **kw)

    return {
        "ours": make("ours"),
        "capped": make("capped", tenant_budgets={"acme": {"daily_usd": HUGE}}, cap_refresh_s=5.0),
        "capped_busy": make("capped_busy", tenant_budgets={"acme": {"daily_usd": HUGE}}, cap_refresh_s=0.05),
        "throttled": make("throttled", tenant_budgets={"acme": {"daily_usd": HUGE, "usd_per_minute": HUGE}},
                          cap_refresh_s=5.0),
    }


def first_lease(url: str, n: int) -> dict[str, Any]:
    """Wall and CPU time of calls that each open a tenant new to this replica (a wait for its first lease)."""
    from costobs_callbacks import CostTracker

    t = CostTracker(url, prices=PRICES, user_salt="bench-salt", tenant_budgets={"*": {"daily_usd": HUGE}},
                    cap_refresh_s=5.0)
    model = fixed_chat_model()
    h = t.langchain_handler()
    model.invoke("Say hi.", config={"callbacks": [h], "metadata": {**META, "tenant_id": "warm"}})
    wall, cpu = [], []
    for i in range(n):
        cfg = {"callbacks": [h], "metadata": {**META, "tenant_id": f"new-{time.time_ns()}-{i}"}}
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        model.invoke("Say hi.", config=cfg)
        cpu.append((time.thread_time_ns() - c0) / 1000.0)
        wall.append((time.perf_counter_ns() - w0) / 1000.0)
    st = t.stats
    t.close()
    return {"wall_us": summarize(wall), "cpu_us": summarize(cpu), "lease_waits": st["caps_lease_waits"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--first-calls", type=int, default=40)
    p.add_argument("--database-url", default=None, help="a PostgreSQL URL (a database per configuration is not "
                   "made: tables are shared, tenants apart); default: SQLite files in a temporary directory")
    a = p.parse_args(argv)
    quiet_tracing()
    with tempfile.TemporaryDirectory() as d:
        def url_of(name: str) -> str:
            return a.database_url or f"sqlite:///{d}/{name}.db"

        trackers = _trackers(url_of)
        model = fixed_chat_model()
        calls = {}
        for k, t in trackers.items():
            cfg = {"callbacks": [t.langchain_handler()], "metadata": dict(META)}
            calls[k] = (lambda c=cfg: model.invoke("Say hi.", config=c))
        for k in calls:
            for _ in range(200):
                calls[k]()
        for t in trackers.values():
            t.flush()
        gc.collect()
        gc.freeze()
        t0 = time.perf_counter()
        cpu, wall = interleave(calls, rounds=a.rounds, batch=a.batch)
        elapsed = time.perf_counter() - t0
        stats = {k: t.stats for k, t in trackers.items()}
        for t in trackers.values():
            t.close()
        first = first_lease(url_of("first"), a.first_calls)

    rows = []
    out: dict[str, Any] = {"configs": {}, "first_lease": first, "seconds": elapsed}
    for k in calls:
        c = summarize(cpu[k])
        over = paired_overhead(cpu, k, "ours") if k != "ours" else None
        out["configs"][k] = {"label": LABELS[k], "cpu_us": c, "wall_us": summarize(wall[k]), "over_ours_us": over,
                             "stats": {s: stats[k][s] for s in ("caps_lease_waits", "caps_refused", "throttled",
                                                               "caps_store_errors")}}
        rows.append([LABELS[k], fmt(c["median"]), f"{fmt(c['p10'])} / {fmt(c['p90'])}",
                     f"{fmt(over['median'])} ({fmt(over['p10'])}..{fmt(over['p90'])})" if over else "-",
                     fmt(statistics.median(wall[k])), stats[k]["caps_lease_waits"]])
    print(f"\n## A tenant-capped call's app-thread CPU ({a.rounds} rounds x {a.batch} calls, {elapsed:.1f}s; "
          f"{'PostgreSQL' if a.database_url else 'SQLite'})\n")
    print(table(["config", "CPU us/call", "p10 / p90", "over (d) (p10..p90)", "wall us/call", "lease waits"], rows))
    fw, fc = first["wall_us"], first["cpu_us"]
    print(f"\nfirst call of a tenant new to the replica (waits for its first lease), {a.first_calls} calls: wall "
          f"{fmt(fw['median'] / 1000, 2)} ms median (p90 {fmt(fw['p90'] / 1000, 2)} ms), app-thread CPU "
          f"{fmt(fc['median'])} us median; lease waits {first['lease_waits']}")
    summary = [
        metric("capped call, cached: added CPU over no caps", out["configs"]["capped"]["over_ours_us"]["median"],
               "us"),
        metric("capped call, refreshing 20x/s: added CPU", out["configs"]["capped_busy"]["over_ours_us"]["median"],
               "us"),
        metric("throttled call: added CPU", out["configs"]["throttled"]["over_ours_us"]["median"], "us"),
        metric("first call of a new tenant (lease wait), wall", fw["median"] / 1000, "ms"),
    ]
    print_summary(summary)
    write_results(NAME, vars(a), out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
