"""Memory: RSS growth over 100,000 runs through our LangChain handler, once everything is flushed.

Each run is a fresh ``tracker.config(feature=..., user_id=..., tenant_id=...)`` (a new run id, as an
app gives each request), invoking the fake chat model directly or inside ``ChatPromptTemplate | model``
(``--mode mix``, the default, alternates the two; 1,000 distinct users, 5 features). The tracker
writes to a SQLite file with its exporter running, as in production.

RSS is read (psutil) after a warm-up of ``--warmup`` runs + ``tracker.flush()`` + ``gc.collect()``,
sampled along the way, and read again after the ``--runs`` runs + ``tracker.flush()`` + ``gc.collect()``.
The growth between the two readings is the figure (target: under 20 MB for 100,000 runs). RSS also
counts the allocator's retained free memory and SQLite's page cache, so it is an upper bound of what
our objects hold; the growth of ``sys.getallocatedblocks()`` (live Python objects) and the export
queue's depth are printed beside it to tell a leak from a backlog whose freed memory stayed in RSS.

Run: ``python -m bench.memory [--runs N] [--mode direct|chain|mix]``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    COST_PER_CALL_USD,
    PRICES,
    fixed_chat_model,
    fmt,
    metric,
    print_summary,
    quiet_tracing,
    rss_bytes,
    table,
    tiny_chain,
    write_results,
)

NAME = "memory"
TARGET_MB = 20.0
MB = 1024 * 1024
FEATURES = ("search", "chat", "summarize", "triage", "extract")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=5_000)
    ap.add_argument("--mode", choices=("direct", "chain", "mix"), default="mix")
    ap.add_argument("--samples", type=int, default=10, help="RSS readings along the way")
    args = ap.parse_args(argv)
    quiet_tracing()
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)

    from costobs_callbacks import CostTracker

    model = fixed_chat_model()
    chain = tiny_chain(model)

    def one(tracker: Any, i: int) -> None:
        cfg = tracker.config(feature=FEATURES[i % len(FEATURES)], user_id=f"user-{i % 1000}",
                             tenant_id=f"tenant-{i % 20}")
        if args.mode == "direct" or (args.mode == "mix" and i % 2 == 0):
            model.invoke("hi", config=cfg)
        else:
            chain.invoke({"q": "hi"}, config=cfg)

    with tempfile.TemporaryDirectory(prefix="costobs-mem-") as d:
        tracker = CostTracker(f"sqlite:///{d}/mem.db", prices=PRICES, user_salt="bench-salt")
        for i in range(args.warmup):
            one(tracker, i)
        tracker.flush()
        gc.collect()
        rss0 = rss_bytes()
        blocks0 = sys.getallocatedblocks()
        samples: list[tuple[int, float, int, int, int]] = [(0, 0.0, rss0, blocks0, 0)]
        every = max(1, args.runs // max(1, args.samples))
        t0 = time.perf_counter()
        max_pending = 0
        for i in range(args.runs):
            one(tracker, args.warmup + i)
            if (i + 1) % every == 0:
                pending = tracker.stats["pending"]
                max_pending = max(max_pending, pending)
                samples.append((i + 1, time.perf_counter() - t0, rss_bytes(), sys.getallocatedblocks(), pending))
        t_runs = time.perf_counter() - t0
        tracker.flush()
        gc.collect()
        rss1 = rss_bytes()
        blocks1 = sys.getallocatedblocks()
        stats = tracker.stats
        led = tracker.ledger
        held = {"open_spans": len(getattr(led, "spans", ())), "open_runs": len(getattr(led, "runs", ())),
                "recent_runs": len(getattr(led, "recent", ()))}
        rows = tracker.rollup("feature")
        stored_calls = sum(r.llm_calls for r in rows)
        stored_runs = sum(r.runs for r in rows)
        stored_cost = sum(r.cost_usd for r in rows)
        tracker.close()
        db_bytes = Path(f"{d}/mem.db").stat().st_size

    total = args.warmup + args.runs
    growth_mb = (rss1 - rss0) / MB
    ok_store = stored_calls == total and stored_runs == total and stored_cost == COST_PER_CALL_USD * total
    print(f"# {NAME}: {args.runs:,} runs ({args.mode}) through the handler in {t_runs:.1f}s "
          f"({t_runs / args.runs * 1e6:.0f} us/run wall)\n")
    print(table(["runs done", "seconds", "RSS MB", "RSS growth MB", "Python blocks growth", "export queue"],
                [[f"{n:,}", fmt(t, 1), fmt(r / MB), fmt((r - rss0) / MB), f"{b - blocks0:+,}", f"{p:,}"]
                 for n, t, r, b, p in samples]
                + [["after flush + gc", fmt(t_runs, 1), fmt(rss1 / MB), fmt(growth_mb), f"{blocks1 - blocks0:+,}",
                    str(stats["pending"])]]))
    print(f"\nexporter: {stats}; ledger holds {held}; max pending sampled {max_pending:,}; DB {db_bytes / MB:.1f} MB")
    if not ok_store:
        print(f"WARNING: stored {stored_calls} calls / {stored_runs} runs / ${stored_cost}, expected {total} "
              f"and ${COST_PER_CALL_USD * total}")
    summary = [
        metric(f"RSS growth over {args.runs:,} runs, flushed", growth_mb, "MB", f"< {TARGET_MB:g} MB",
               growth_mb < TARGET_MB, note=f"{args.mode}; RSS after warm-up {rss0 / MB:.0f} MB"),
        metric("live Python blocks growth, flushed", blocks1 - blocks0, "blocks",
               note="objects still allocated (a leak shows here; RSS also keeps freed arenas)"),
        metric("export queue high-water (sampled)", max_pending, "items",
               note="a backlog the writer could not keep up with; its memory stays in RSS"),
        metric("every run stored and priced", None, "", "yes",
               ok_store and stats["dropped"] == 0 and stats["failed"] == 0 and stats["internal_errors"] == 0),
    ]
    print()
    print_summary(summary)
    path = write_results(NAME, vars(args), {
        "rss_before": rss0, "rss_after": rss1, "growth_mb": growth_mb, "blocks_before": blocks0,
        "blocks_after": blocks1, "samples": samples, "seconds": t_runs,
        "stats": stats, "ledger": held, "max_pending_sampled": max_pending, "stored_llm_calls": stored_calls,
        "stored_runs": stored_runs, "stored_cost_usd": str(stored_cost), "db_bytes": db_bytes,
    }, summary)
    print(f"\nresults: {path}")
    return 0 if ok_store else 1


if __name__ == "__main__":
    raise SystemExit(main())
