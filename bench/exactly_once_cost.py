"""What applying each batch once costs: ``Store.write_batch`` of a ``Batch`` (its id recorded in its transaction,
``_store/applied.py``) against the same items as a plain list (no id: nothing recorded), on a SQLite file and on
PostgreSQL (the machine's server), for batches of 1, 10, 100 and 1,000 spans.

Each round writes one batch of each kind, the order alternating, from the calling thread (no exporter), timing its
thread CPU (``time.thread_time_ns``: what the exporter's thread would spend, under the GIL the app shares) and its
wall time. The cost of the id is the median of the paired per-round differences, per batch and per span, with
p10..p90. Spans are root LLM calls of runs of their own, priced, attributed; the same items are written again
every round (spans are not unique; runs' totals grow).

Run: ``python -m bench.exactly_once_cost [--rounds N]`` from the repository root (~2-4 min).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/exactly_once_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import MODEL_NAME, PRICES, REPO_ROOT, fmt, metric, print_summary, summarize, table, write_results

NAME = "exactly_once_cost"
SIZES = (1, 10, 100, 1000)


def _spans(n: int) -> list[Any]:
    """``n`` finished spans as the ledger hands them to the exporter (root LLM calls, each its own run)."""
    from costobs_callbacks import LoopPolicy, PriceBook
    from costobs_callbacks._events import TokenUsage
    from costobs_callbacks._ledger import Ledger

    class Capture:
        def __init__(self) -> None:
            self.items: list[Any] = []

        def emit(self, item: Any) -> None:
            self.items.append(item)

    cap = Capture()
    led = Ledger(prices=PriceBook(PRICES), exporter=cap, user_salt=b"bench", loops=LoopPolicy(enabled=False))
    for k in range(n):
        sid = uuid.uuid4()
        meta = {"feature": f"f{k % 5}", "tenant_id": f"t{k % 20}", "user_id": f"u{k % 100}"}
        led.start_llm(sid, None, "ChatOpenAI", meta, MODEL_NAME, "openai", root=True)
        led.end(sid, "ok", None, TokenUsage(800 + k % 300, 50 + k % 200))
    return cap.items


def _measure(store: Any, items: list[Any], rounds: int) -> dict[str, Any]:
    from costobs_callbacks._export import Batch

    cpu: dict[str, list[float]] = {"id": [], "plain": []}
    wall: dict[str, list[float]] = {"id": [], "plain": []}
    for r in range(rounds + 2):
        for kind in (("id", "plain") if r % 2 else ("plain", "id")):
            batch = Batch(items) if kind == "id" else list(items)
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            store.write_batch(batch)
            w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            if r >= 2:  # two warm-up rounds
                cpu[kind].append((c1 - c0) / 1000)
                wall[kind].append((w1 - w0) / 1000)
    return {
        "cpu_id": summarize(cpu["id"]), "cpu_plain": summarize(cpu["plain"]),
        "wall_id": summarize(wall["id"]), "wall_plain": summarize(wall["plain"]),
        "cpu_diff": summarize([a - b for a, b in zip(cpu["id"], cpu["plain"], strict=True)]),
        "wall_diff": summarize([a - b for a, b in zip(wall["id"], wall["plain"], strict=True)]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="paired rounds per batch size (fewer for 1,000)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO_ROOT))
    import sqlalchemy as sa

    from costobs_callbacks._store import Store
    from tests.pg import create_database, drop_database, server_url

    admin = server_url()
    pg_url = create_database(admin)
    with sa.create_engine(admin, isolation_level="AUTOCOMMIT").connect() as conn:  # commits as in production
        conn.execute(sa.text(f'ALTER DATABASE "{sa.engine.make_url(pg_url).database}" RESET synchronous_commit'))
    results: dict[str, Any] = {}
    rows = []
    summary = []
    try:
        with tempfile.TemporaryDirectory(prefix="costobs-once-") as d:
            for backend, url in (("sqlite", f"sqlite:///{d}/once.db"), ("postgresql", pg_url)):
                store = Store(url)
                store.ensure_schema()
                for n in SIZES:
                    items = _spans(n)
                    gc.collect()
                    res = _measure(store, items, args.rounds if n < 1000 else max(20, args.rounds // 5))
                    results[f"{backend}/{n}"] = res
                    d_cpu, d_wall = res["cpu_diff"], res["wall_diff"]
                    rows.append([backend, n, fmt(res["cpu_plain"]["median"]), fmt(res["cpu_id"]["median"]),
                                 f"{fmt(d_cpu['median'])} ({fmt(d_cpu['p10'])}..{fmt(d_cpu['p90'])})",
                                 fmt(d_cpu["median"] / n, 2), fmt(res["wall_plain"]["median"]),
                                 f"{fmt(d_wall['median'])} ({fmt(d_wall['p10'])}..{fmt(d_wall['p90'])})"])
                    if n in (10, 1000):
                        summary.append(metric(f"{backend}: the batch id's CPU per batch of {n}", d_cpu["median"],
                                              "us", note=f"{d_cpu['median'] / res['cpu_plain']['median']:+.1%} of "
                                                         "the batch's write"))
                with store.engine.connect() as conn:
                    ids = conn.execute(sa.text("SELECT COUNT(*) FROM costobs_batches")).scalar_one()
                store.close()
                expected = sum(args.rounds if n < 1000 else max(20, args.rounds // 5) for n in SIZES) + 2 * len(SIZES)
                assert ids == expected, (backend, ids, expected)
    finally:
        drop_database(admin, pg_url)
    print(f"\n## Store.write_batch, one batch per kind per round, paired (µs per batch; {args.rounds} rounds)\n")
    print(table(["backend", "spans", "CPU plain", "CPU with id", "CPU added (p10..p90)", "CPU added per span",
                 "wall plain", "wall added (p10..p90)"], rows))
    print_summary(summary)
    write_results(NAME, vars(args), results, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
