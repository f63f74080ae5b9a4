"""Exporter throughput into SQLite and PostgreSQL: spans per second through ``BatchExporter`` into
``Store.write_batch``, and the exporter thread's CPU per span.

Two workloads are made first, untimed, through a real tracker's ledger whose exporter is swapped for a list, so
the items are exactly what the ledger hands the exporter in production:

* 10-span runs (``--runs``, default 20,000): the root chain, two node chains, four priced LLM calls, two tools
  and a retriever, with attribution and usage;
* 1-span runs (``--runs1``, default 100,000): one LLM call per run, the worst case for the run and rollup rows
  each span brings.

Span and run ids are made as LangChain makes them (``--ids uuid7``, the default: its callback manager's run ids
since langchain-core 1.1.1, and ``tracker.run()``'s), as the LlamaIndex adapter makes them (``--ids llamaindex``:
LlamaIndex's own span ids, random, and a UUIDv7 naming each run a root span opens), or all at random (``--ids
uuid4``: LangChain's before 1.1.1, and LlamaIndex's runs before they were named anew). It matters to SQLite: run
ids in time order are appended to the run-id indexes (the run table's key, the span table's run index), random
ones land all over them, so every run dirties pages of its own (a WAL write each), more so as the file grows.
Span ids are stored, not indexed.

Then, for each workload and each backend (``--backend``: a SQLite file, and a fresh PostgreSQL database on the
machine's server, ``$COSTOBS_TEST_POSTGRES_URL`` or ``postgresql+psycopg://postgres@127.0.0.1:5432/test``, made
for each phase and dropped after), the phases, backends interleaved:

1. flat out: every item is emitted into a ``BatchExporter`` (the tracker's defaults) writing with
   ``Store.write_batch``; spans/s from the first emit until ``force_flush`` returns. The producer only yields
   (sleeps 1 ms) while the queue is over 3/4 full, so this is the exporter's capacity. The exporter thread's CPU
   (its own clock, read when the flush returns) per span is the figure the app pays under the GIL; on PostgreSQL
   the server's CPU per span is printed beside it (its backends' clocks, from ``/proc``: the server shares the
   machine's cores with the process).
2. paced: items emitted at ``--rate`` spans/s (default: the 20,000/s target) for the whole workload, as an app
   would; the queue's high-water mark and drops show whether the exporter keeps up.
3. with ``--raw``: ``Store.write_batch`` called by this thread with chunks of ``--batch`` items, no exporter.

Every span, run, hourly rollup and keyed rollup row is counted afterwards and checked against the workload.

Run: ``python -m bench.exporter_throughput [--runs N] [--runs1 N] [--backend sqlite postgresql] [--repeat K]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/exporter_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    MODEL_NAME,
    PRICES,
    REPO_ROOT,
    fmt,
    metric,
    print_summary,
    table,
    thread_cpu_ns,
    write_results,
)

NAME = "exporter_throughput"
TARGET_SPANS_PER_S = 20_000
TARGET_CPU_US = 25.0
FEATURES = ("search", "chat", "summarize", "triage", "extract")
BACKENDS = ("sqlite", "postgresql")


class Capture:
    """Stands in for the exporter while the workload is made: keeps every item in order."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def emit(self, item: Any) -> None:
        self.items.append(item)


def make_workload(n_runs: int, spans_per_run: int = 10, ids: str = "uuid7") -> tuple[list[Any], int]:
    """Items as the ledger emits them for ``n_runs`` runs of 10 spans (or of one LLM call: ``spans_per_run=1``),
    ids made by ``ids`` (``uuid7``, LangChain's; ``llamaindex``, random span ids and a UUIDv7 for each root's run,
    as the LlamaIndex adapter names them; ``uuid4``, all random); returns (items, span count).

    A 10-span run: the graph's root chain; node ``agent`` (LLM call, ``web_search`` tool priced per call,
    LLM call); node ``tools`` (retriever, LLM call, ``calculator`` tool, LLM call). A 1-span run: one LLM call.
    Token counts, cache reads, features, users and tenants vary from run to run.
    """
    from langchain_core.utils.uuid import uuid7

    from costobs_callbacks import CostTracker
    from costobs_callbacks._events import TokenUsage
    from costobs_callbacks._ledger import Span

    cap = Capture()
    with tempfile.TemporaryDirectory(prefix="costobs-wl-") as d:
        tracker = CostTracker(f"sqlite:///{d}/wl.db", prices=PRICES, user_salt="bench-salt",
                              tool_prices={"web_search": "0.005"})
        led = tracker.ledger
        led.exporter = cap
        new = uuid7 if ids == "uuid7" else uuid.uuid4
        if ids == "llamaindex":
            from costobs_callbacks.integrations.llamaindex.calls import new_run_id

            def run_of(parent: Any) -> Any:  # the id of the run a root opens, as the adapter names it
                return new_run_id() if parent is None else None
        else:
            def run_of(parent: Any) -> Any:  # the root's own id names its run
                return None
        k = 0

        def llm(parent: Any, meta: dict[str, Any]) -> None:
            nonlocal k
            k += 1
            sid = new()
            led.start_llm(sid, parent, "ChatOpenAI", meta, MODEL_NAME, "openai", run_id=run_of(parent))
            led.end(sid, usage=TokenUsage(input=800 + (k * 7) % 900, output=50 + k % 400,
                                          cache_read=256 if k % 3 == 0 else 0), model=MODEL_NAME)

        def leaf(parent: Any, kind: str, name: str, meta: dict[str, Any], args: Any = None) -> None:
            sid = new()
            led.start_span(sid, parent, kind, name, meta, tool_args=args)
            led.end(sid)

        for r in range(n_runs):
            meta = {"feature": FEATURES[r % len(FEATURES)], "user_id": f"user-{r % 1000}",
                    "tenant_id": f"tenant-{r % 20}", "route": "/api/agent", "prompt_version": "v3"}
            if spans_per_run == 1:
                llm(None, meta)
                continue
            root = new()
            led.start_span(root, None, "chain", "LangGraph", meta, run_id=run_of(None))
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


# -- the databases: a SQLite file, or a PostgreSQL database made for the phase and dropped after ----------------

@contextmanager
def database(backend: str, tmp: str, label: str) -> Iterator[Any]:
    """A fresh ``Store`` on ``backend``, its schema made (untimed); closed, and on PostgreSQL dropped, after."""
    from costobs_callbacks._store import Store

    if backend == "sqlite":
        url = f"sqlite:///{tmp}/{label}-{uuid.uuid4().hex[:8]}.db"
        drop: Callable[[], None] = lambda: None  # noqa: E731
    else:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.pg import create_database, drop_database, server_url

        admin = server_url()
        url = create_database(admin)
        drop = lambda: drop_database(admin, url)  # noqa: E731
    store = Store(url)
    try:
        store.ensure_schema()
        yield store
    finally:
        store.close()
        drop()


def _server_cpu(store: Any) -> dict[int, float] | None:
    """CPU seconds used so far by each PostgreSQL backend connected to the store's database (``/proc``: the server
    runs on this machine); ``None`` on SQLite or where it cannot be read."""
    if store.dialect != "postgresql":
        return None
    import sqlalchemy as sa

    tick = os.sysconf("SC_CLK_TCK")
    with store.engine.connect() as c:
        pids = [int(p) for p in c.execute(sa.text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )).scalars()]
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _server_us_per_span(before: dict[int, float] | None, after: dict[int, float] | None, n_spans: int) -> float | None:
    if before is None or after is None:
        return None
    return sum(v - before.get(pid, 0.0) for pid, v in after.items()) / n_spans * 1e6


def _count(store: Any) -> dict[str, int]:
    import sqlalchemy as sa

    with store.engine.connect() as c:
        return {t: int(c.execute(sa.text(f"SELECT count(*) FROM costobs_{t}")).scalar_one())
                for t in ("spans", "runs", "rollups_hourly", "rollups_keyed", "batches")}


# -- the phases ------------------------------------------------------------------------------------------------

def exporter_flat_out(items: list[Any], n_spans: int, store: Any) -> dict[str, Any]:
    from costobs_callbacks._export import BatchExporter

    exp = BatchExporter(store.write_batch)
    limit = exp._max_queue * 3 // 4
    stalls = 0
    server0 = _server_cpu(store)
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
    thread_ns = thread_cpu_ns(exp._worker)
    cpu = time.process_time() - cpu0
    server = _server_us_per_span(server0, _server_cpu(store), n_spans)
    stats = exp.stats.as_dict()
    exp.shutdown()
    el = t1 - t0
    return {"seconds": el, "emit_seconds": t_emitted - t0, "spans_per_s": n_spans / el,
            "items_per_s": len(items) / el, "process_cpu_s": cpu, "process_cpu_us_per_span": cpu / n_spans * 1e6,
            "exporter_thread_cpu_us_per_span": None if thread_ns is None else thread_ns / 1000 / n_spans,
            "server_cpu_us_per_span": server,
            "producer_stalls": stalls, "stats": stats, "stored": _count(store)}


def exporter_paced(items: list[Any], n_spans: int, store: Any, rate: float) -> dict[str, Any]:
    """Emit at ``rate`` spans/s (items spaced evenly), as a busy app would; watch the queue."""
    from costobs_callbacks._export import BatchExporter

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
    thread_ns = thread_cpu_ns(exp._worker)
    stop.set()
    w.join()
    stats = exp.stats.as_dict()
    exp.shutdown()
    emit_s = t_emitted - t0
    return {"target_spans_per_s": rate, "achieved_emit_spans_per_s": n_spans / emit_s, "emit_seconds": emit_s,
            "flush_lag_s": t1 - t_emitted, "queue_high_water": high, "queue_limit": exp._max_queue,
            "exporter_thread_cpu_us_per_span": None if thread_ns is None else thread_ns / 1000 / n_spans,
            "stats": stats, "stored": _count(store)}


def raw_write_batch(items: list[Any], n_spans: int, store: Any, batch: int,
                    profile: bool) -> tuple[dict[str, Any], str | None]:
    from costobs_callbacks._export import Batch

    chunks = [Batch(items[i:i + batch]) for i in range(0, len(items), batch)]
    prof = cProfile.Profile() if profile else None
    gc.collect()
    t0 = time.perf_counter()
    c0 = time.thread_time()
    if prof is not None:
        prof.enable()
    for ch in chunks:
        store.write_batch(ch)
    if prof is not None:
        prof.disable()
    el = time.perf_counter() - t0
    cpu = time.thread_time() - c0
    text = None
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        text = s.getvalue()
    return {"seconds": el, "spans_per_s": n_spans / el, "cpu_us_per_span": cpu / n_spans * 1e6,
            "batches": len(chunks), "stored": _count(store)}, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20_000, help="10-span runs (0: none)")
    ap.add_argument("--runs1", type=int, default=100_000, help="1-span runs (0: none)")
    ap.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--rate", type=float, default=float(TARGET_SPANS_PER_S), help="spans/s of the paced phase")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every phase (medians reported)")
    ap.add_argument("--no-paced", action="store_true", help="skip the paced phase")
    ap.add_argument("--ids", choices=("uuid7", "llamaindex", "uuid4"), default="uuid7",
                    help="span and run ids: LangChain's (uuid7), the LlamaIndex adapter's (random span ids, "
                         "uuid7 runs) or all random")
    ap.add_argument("--raw", action="store_true", help="also time Store.write_batch called directly")
    ap.add_argument("--batch", type=int, default=4096, help="items per raw write_batch call")
    ap.add_argument("--profile", action="store_true", help="cProfile the raw write_batch phase (with --raw)")
    args = ap.parse_args(argv)
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)

    workloads: dict[str, tuple[list[Any], int]] = {}
    for label, n, per in (("10-span runs", args.runs, 10), ("1-span runs", args.runs1, 1)):
        if n > 0:
            t0 = time.perf_counter()
            workloads[label] = make_workload(n, per, args.ids)
            items, n_spans = workloads[label]
            print(f"# {label}: {n_spans:,} spans in {n:,} runs ({len(items):,} items, {args.ids} ids), "
                  f"made in {time.perf_counter() - t0:.1f}s")
    print(f"# backends: {', '.join(args.backend)}; {args.repeat} round(s), backends interleaved; "
          f"{os.cpu_count()} CPUs\n")

    phases = ["flat", *([] if args.no_paced else ["paced"]), *(["raw"] if args.raw else [])]
    res: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {
        w: {b: {p: [] for p in phases} for b in args.backend} for w in workloads}
    prof_texts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="costobs-exp-") as d:
        for rnd in range(args.repeat):
            for w, (items, n_spans) in workloads.items():
                for p in phases:
                    order = args.backend[rnd % len(args.backend):] + args.backend[:rnd % len(args.backend)]
                    for b in order:
                        with database(b, d, p) as store:
                            if p == "flat":
                                out = exporter_flat_out(items, n_spans, store)
                            elif p == "paced":
                                out = exporter_paced(items, n_spans, store, args.rate)
                            else:
                                out, text = raw_write_batch(items, n_spans, store, args.batch, args.profile)
                                if text:
                                    prof_texts.append(f"## cProfile of raw write_batch: {w}, {b}\n\n{text}")
                        res[w][b][p].append(out)
                        print(f"  round {rnd + 1} {w:>12} {b:>10} {p:>5}: "
                              f"{out.get('spans_per_s') or out.get('achieved_emit_spans_per_s'):>9,.0f} spans/s "
                              f"stored {out['stored']}", flush=True)

    def med(vals: list[float | None]) -> float | None:
        xs = [v for v in vals if v is not None]
        return statistics.median(xs) if xs else None

    rows = []
    summary = []
    consistent = True
    lost_total = 0
    for w, (_, n_spans) in workloads.items():
        for b in args.backend:
            r = res[w][b]
            all_phases = [o for p in phases for o in r[p]]
            counts = [o["stored"] for o in all_phases if not o.get("stats") or
                      (o["stats"]["dropped"] == 0 and o["stats"]["failed"] == 0)]
            ref = counts[0] if counts else None
            for o in all_phases:
                lost = (o["stats"]["dropped"] + o["stats"]["failed"]) if "stats" in o else 0
                lost_total += lost
                stored_ok = o["stored"]["spans"] == n_spans - lost
                if lost == 0 and ref is not None:
                    stored_ok = stored_ok and {k: v for k, v in o["stored"].items() if k != "batches"} == \
                        {k: v for k, v in ref.items() if k != "batches"}
                consistent = consistent and stored_ok
            flat = r["flat"]
            sps = med([o["spans_per_s"] for o in flat])
            cpu = med([o["exporter_thread_cpu_us_per_span"] for o in flat])
            pcpu = med([o["process_cpu_us_per_span"] for o in flat])
            scpu = med([o["server_cpu_us_per_span"] for o in flat])
            rows.append([w, b, "flat out", fmt(sps, 0), fmt(cpu), fmt(pcpu), fmt(scpu),
                         sum(o["stats"]["dropped"] for o in flat), sum(o["stats"]["failed"] for o in flat), "-",
                         f"{flat[-1]['stored']['spans']:,} spans, {flat[-1]['stored']['runs']:,} runs, "
                         f"{flat[-1]['stored']['rollups_hourly']:,} hourly, {flat[-1]['stored']['rollups_keyed']:,} "
                         f"keyed; stalls {flat[-1]['producer_stalls']}"])
            summary.append(metric(f"{b}, {w}: exporter flat out", sps, "spans/s", f">= {TARGET_SPANS_PER_S:,}",
                                  sps is not None and sps >= TARGET_SPANS_PER_S))
            summary.append(metric(f"{b}, {w}: exporter thread CPU per span", cpu, "us", f"<= {TARGET_CPU_US:g}",
                                  cpu is not None and cpu <= TARGET_CPU_US))
            if "paced" in r:
                pc = r["paced"]
                drops = sum(o["stats"]["dropped"] + o["stats"]["failed"] for o in pc)
                high = max(o["queue_high_water"] for o in pc)
                rows.append([w, b, f"paced at {args.rate:,.0f}/s",
                             fmt(med([o["achieved_emit_spans_per_s"] for o in pc]), 0),
                             fmt(med([o["exporter_thread_cpu_us_per_span"] for o in pc])), "-", "-",
                             sum(o["stats"]["dropped"] for o in pc), sum(o["stats"]["failed"] for o in pc),
                             f"{high:,} / {pc[0]['queue_limit']:,}",
                             f"flush lag {med([o['flush_lag_s'] for o in pc]):.2f}s"])
                summary.append(metric(f"{b}, {w}: paced at {args.rate:,.0f}/s, dropped", drops, "", "0",
                                      drops == 0, note=f"queue high-water {high:,} / {pc[0]['queue_limit']:,}"))
            if "raw" in r:
                rw = r["raw"]
                rows.append([w, b, f"raw write_batch ({args.batch}/batch)", fmt(med([o["spans_per_s"] for o in rw]), 0),
                             fmt(med([o["cpu_us_per_span"] for o in rw])), "-", "-", "-", "-", "-",
                             f"{rw[-1]['batches']} batches"])
    print()
    print(table(["workload", "backend", "phase", "spans/s", "exporter thread CPU us/span", "process CPU us/span",
                 "server CPU us/span", "dropped", "failed", "queue high-water", "note"], rows))
    for t in prof_texts:
        print("\n" + t)
    summary.append(metric("spans dropped or failed (all phases)", lost_total, "", "0", lost_total == 0))
    summary.append(metric("stored = emitted - dropped - failed; same rows, runs and rollups on every phase", None,
                          "", "yes", consistent))
    print()
    print_summary(summary)
    path = write_results(NAME, vars(args), {"workloads": {w: {"spans": n, "items": len(i)}
                                                         for w, (i, n) in workloads.items()}, "phases": res}, summary)
    print(f"\nresults: {path}")
    return 0 if consistent else 1


if __name__ == "__main__":
    raise SystemExit(main())
