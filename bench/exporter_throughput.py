"""Exporter throughput into SQLite: spans per second through ``BatchExporter`` into ``Store.write_batch``.

The workload is made first, untimed: ``--runs`` root runs (default 20,000)
(10 spans each: the root chain, two node chains, four priced LLM calls, two tools and a retriever,
with attribution and usage) go through a real tracker's ledger, whose exporter is swapped for a list, so the
items are exactly what the ledger hands the exporter in production. Then, each on a fresh SQLite file:

1. exporter, flat out: every item is emitted into a ``BatchExporter`` (the tracker's defaults) writing
   with ``Store.write_batch``; spans/s is measured from the first emit until ``force_flush`` returns.
   The producer only yields (sleeps 1 ms) while the queue is over 3/4 full, so this is the exporter's
   capacity; any drop is reported.
2. exporter, paced: items are emitted at ``--rate`` spans/s (default: the 20,000/s target) for the
   whole workload, as an app would; the queue's high-water mark and drops show whether it keeps up.
3. raw ``Store.write_batch``: the same items in chunks of ``--batch`` (the exporter's batch size),
   written by the calling thread, no exporter: the storage layer's own rate.

Run: ``python -m bench.exporter_throughput [--runs N] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import pstats
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/exporter_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    MODEL_NAME,
    PRICES,
    fmt,
    metric,
    print_summary,
    table,
    write_results,
)

NAME = "exporter_throughput"
TARGET_SPANS_PER_S = 20_000
FEATURES = ("search", "chat", "summarize", "triage", "extract")


class Capture:
    """Stands in for the exporter while the workload is made: keeps every item in order."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def emit(self, item: Any) -> None:
        self.items.append(item)


def make_workload(n_runs: int) -> tuple[list[Any], int]:
    """Items as the ledger emits them for ``n_runs`` runs of 10 spans; returns (items, span count).

    One run: the graph's root chain; node ``agent`` (LLM call, ``web_search`` tool priced per call,
    LLM call); node ``tools`` (retriever, LLM call, ``calculator`` tool, LLM call). Token counts,
    cache reads, features, users and tenants vary from run to run.
    """
    from costobs_callbacks import CostTracker
    from costobs_callbacks._events import TokenUsage
    from costobs_callbacks._ledger import Span

    cap = Capture()
    with tempfile.TemporaryDirectory(prefix="costobs-wl-") as d:
        tracker = CostTracker(f"sqlite:///{d}/wl.db", prices=PRICES, user_salt="bench-salt",
                              tool_prices={"web_search": "0.005"})
        led = tracker.ledger
        led.exporter = cap
        new = uuid.uuid4
        k = 0

        def llm(parent: Any, meta: dict[str, Any]) -> None:
            nonlocal k
            k += 1
            sid = new()
            led.start_llm(sid, parent, "ChatOpenAI", meta, MODEL_NAME, "openai")
            led.end(sid, usage=TokenUsage(input=800 + (k * 7) % 900, output=50 + k % 400,
                                          cache_read=256 if k % 3 == 0 else 0), model=MODEL_NAME)

        def leaf(parent: Any, kind: str, name: str, meta: dict[str, Any], args: Any = None) -> None:
            sid = new()
            led.start_span(sid, parent, kind, name, meta, tool_args=args)
            led.end(sid)

        for r in range(n_runs):
            meta = {"feature": FEATURES[r % len(FEATURES)], "user_id": f"user-{r % 1000}",
                    "tenant_id": f"tenant-{r % 20}", "route": "/api/agent", "prompt_version": "v3"}
            root = new()
            led.start_span(root, None, "chain", "LangGraph", meta)
            node = new()
            led.start_span(node, root, "chain", "agent", meta)
            llm(node, meta)
            leaf(node, "tool", "web_search", meta, {"q": f"query {r}"})
            llm(node, meta)
            led.end(node)
            node = new()
            led.start_span(node, root, "chain", "tools", meta)
            leaf(node, "retriever", "docs", meta)
            llm(node, meta)
            leaf(node, "tool", "calculator", meta, {"expr": f"{r} * 2"})
            llm(node, meta)
            led.end(node)
            led.end(root)
        tracker.close()
    n_spans = sum(1 for it in cap.items if isinstance(it, Span))
    return cap.items, n_spans


def _store(path: str) -> Any:
    from costobs_callbacks._store import Store

    s = Store(f"sqlite:///{path}")
    s.ensure_schema()
    return s


def _count(store: Any) -> tuple[int, int]:
    import sqlalchemy as sa

    with store.engine.connect() as c:
        n_spans = c.execute(sa.text("SELECT count(*) FROM costobs_spans")).scalar_one()
        n_runs = c.execute(sa.text("SELECT count(*) FROM costobs_runs")).scalar_one()
    return int(n_spans), int(n_runs)


def exporter_flat_out(items: list[Any], n_spans: int, db: str) -> dict[str, Any]:
    from costobs_callbacks._export import BatchExporter

    store = _store(db)
    exp = BatchExporter(store.write_batch)
    limit = exp._max_queue * 3 // 4
    stalls = 0
    gc.collect()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    emit = exp.emit
    for i, it in enumerate(items):
        emit(it)
        if i & 255 == 0:
            while exp.pending() > limit:
                stalls += 1
                time.sleep(0.001)
    t_emitted = time.perf_counter()
    exp.force_flush()
    t1 = time.perf_counter()
    cpu = time.process_time() - cpu0
    stats = exp.stats.as_dict()
    exp.shutdown()
    stored_spans, stored_runs = _count(store)
    store.close()
    el = t1 - t0
    return {"seconds": el, "emit_seconds": t_emitted - t0, "spans_per_s": n_spans / el, "items_per_s": len(items) / el,
            "process_cpu_s": cpu, "cpu_us_per_span": cpu / n_spans * 1e6, "producer_stalls": stalls,
            "stats": stats, "stored_spans": stored_spans, "stored_runs": stored_runs}


def exporter_paced(items: list[Any], n_spans: int, db: str, rate: float) -> dict[str, Any]:
    """Emit at ``rate`` spans/s (items spaced evenly), as a busy app would; watch the queue."""
    from costobs_callbacks._export import BatchExporter

    store = _store(db)
    exp = BatchExporter(store.write_batch)
    item_rate = rate * len(items) / n_spans
    high = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal high
        while not stop.wait(0.005):
            high = max(high, exp.pending())

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    gc.collect()
    t0 = time.perf_counter()
    step = 64  # emit in small bursts, then wait for the clock
    for i in range(0, len(items), step):
        for it in items[i:i + step]:
            exp.emit(it)
        due = t0 + (i + step) / item_rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
    t_emitted = time.perf_counter()
    exp.force_flush()
    t1 = time.perf_counter()
    stop.set()
    w.join()
    stats = exp.stats.as_dict()
    exp.shutdown()
    stored_spans, _ = _count(store)
    store.close()
    emit_s = t_emitted - t0
    return {"target_spans_per_s": rate, "achieved_emit_spans_per_s": n_spans / emit_s, "emit_seconds": emit_s,
            "flush_lag_s": t1 - t_emitted, "queue_high_water": high, "queue_limit": exp._max_queue,
            "stats": stats, "stored_spans": stored_spans}


def raw_write_batch(items: list[Any], n_spans: int, db: str, batch: int,
                    profile: bool) -> tuple[dict[str, Any], str | None]:
    from costobs_callbacks._ledger import Span

    store = _store(db)
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    prof = cProfile.Profile() if profile else None
    gc.collect()
    t0 = time.perf_counter()
    c0 = time.thread_time()
    if prof is not None:
        prof.enable()
    per_batch: list[float] = []
    for ch in chunks:
        b0 = time.thread_time()
        store.write_batch(ch)
        per_batch.append(time.thread_time() - b0)
    if prof is not None:
        prof.disable()
    el = time.perf_counter() - t0
    cpu = time.thread_time() - c0
    tenth = max(1, len(chunks) // 10)
    spans_of = [sum(1 for it in ch if isinstance(it, Span)) for ch in chunks]
    first = sum(spans_of[:tenth]) / sum(per_batch[:tenth])
    last = sum(spans_of[-tenth:]) / sum(per_batch[-tenth:])
    stored_spans, stored_runs = _count(store)
    store.close()
    text = None
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        text = s.getvalue()
    return {"seconds": el, "spans_per_s": n_spans / el, "items_per_s": len(items) / el,
            "cpu_us_per_span": cpu / n_spans * 1e6, "batches": len(chunks), "stored_spans": stored_spans,
            "stored_runs": stored_runs, "cpu_bound_spans_per_s_first_tenth": first,
            "cpu_bound_spans_per_s_last_tenth": last}, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=float(TARGET_SPANS_PER_S), help="spans/s of the paced phase")
    ap.add_argument("--batch", type=int, default=2048, help="items per raw write_batch call")
    ap.add_argument("--no-paced", action="store_true", help="skip the paced phase")
    ap.add_argument("--profile", action="store_true", help="cProfile the raw write_batch phase")
    args = ap.parse_args(argv)
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)

    t0 = time.perf_counter()
    items, n_spans = make_workload(args.runs)
    print(f"# {NAME}: {n_spans:,} spans in {args.runs:,} runs ({len(items):,} items), "
          f"made in {time.perf_counter() - t0:.1f}s\n")
    with tempfile.TemporaryDirectory(prefix="costobs-exp-") as d:
        flat = exporter_flat_out(items, n_spans, f"{d}/flat.db")
        paced = None if args.no_paced else exporter_paced(items, n_spans, f"{d}/paced.db", args.rate)
        raw, prof_text = raw_write_batch(items, n_spans, f"{d}/raw.db", args.batch, args.profile)

    rows = [
        ["exporter -> write_batch, flat out", fmt(flat["spans_per_s"], 0), fmt(flat["seconds"], 2),
         fmt(flat["cpu_us_per_span"]), flat["stats"]["dropped"], flat["stats"]["failed"],
         f"{flat['stored_spans']:,}", f"producer stalls: {flat['producer_stalls']}"],
    ]
    if paced is not None:
        rows.append([f"exporter, paced at {args.rate:,.0f} spans/s", fmt(paced["achieved_emit_spans_per_s"], 0),
                     fmt(paced["emit_seconds"] + paced["flush_lag_s"], 2), "-", paced["stats"]["dropped"],
                     paced["stats"]["failed"], f"{paced['stored_spans']:,}",
                     f"queue high-water {paced['queue_high_water']:,} / {paced['queue_limit']:,}; "
                     f"flush lag {paced['flush_lag_s']:.2f}s"])
    rows.append([f"raw Store.write_batch ({args.batch}/batch)", fmt(raw["spans_per_s"], 0), fmt(raw["seconds"], 2),
                 fmt(raw["cpu_us_per_span"]), "-", "-", f"{raw['stored_spans']:,}",
                 f"{raw['batches']} batches; CPU-bound rate, first tenth "
                 f"{raw['cpu_bound_spans_per_s_first_tenth']:,.0f}/s, "
                 f"last {raw['cpu_bound_spans_per_s_last_tenth']:,.0f}/s"])
    print(table(["phase", "spans/s", "seconds", "CPU us/span", "dropped", "failed", "stored spans", "note"], rows))
    if prof_text:
        print("\n## cProfile of raw write_batch (by own time)\n")
        print(prof_text)

    ok_flat = flat["spans_per_s"] >= TARGET_SPANS_PER_S
    lost = flat["stats"]["dropped"] + flat["stats"]["failed"] + (
        (paced["stats"]["dropped"] + paced["stats"]["failed"]) if paced else 0)
    # Consistency: every span not counted as dropped or failed is in the database.
    consistent = all(
        ph["stored_spans"] == n_spans - ph["stats"]["dropped"] - ph["stats"]["failed"]
        for ph in (flat, paced) if ph is not None
    ) and raw["stored_spans"] == n_spans
    summary = [
        metric("exporter -> SQLite, sustained", flat["spans_per_s"], "spans/s", f">= {TARGET_SPANS_PER_S:,}",
               ok_flat, note="10 spans/run, file DB"),
        metric("raw Store.write_batch", raw["spans_per_s"], "spans/s"),
        metric("raw write_batch CPU per span", raw["cpu_us_per_span"], "us",
               note=f"1 core could do {1e6 / raw['cpu_us_per_span']:,.0f} spans/s"),
        metric("exporter CPU per span (all threads)", flat["cpu_us_per_span"], "us"),
    ]
    if paced is not None:
        summary.append(metric(f"paced at {args.rate:,.0f} spans/s: queue high-water", paced["queue_high_water"],
                              "items", f"< {paced['queue_limit']:,}", paced["queue_high_water"] < paced["queue_limit"]))
    summary.append(metric("spans dropped or failed", lost, "", "0", lost == 0))
    summary.append(metric("stored = emitted - dropped - failed", None, "", "yes", consistent))
    print()
    print_summary(summary)
    path = write_results(NAME, vars(args), {"spans": n_spans, "items": len(items), "flat_out": flat,
                                            "paced": paced, "raw_write_batch": raw}, summary)
    print(f"\nresults: {path}")
    return 0 if consistent else 1


if __name__ == "__main__":
    raise SystemExit(main())
