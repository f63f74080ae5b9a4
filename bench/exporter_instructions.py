"""The exporter's instructions per span, counted by callgrind: what writing a batch costs the thread that writes it.

``exporter_throughput.py`` times the exporter's thread, and the shared machines move that time by 2-4x from one run
to the next; the instructions a batch executes do not move. This counts them for ``Store.write_batch`` into a fresh
SQLite file (the embedded default, whose engine runs in the writing thread: the figure includes SQLite's own work),
for the same workloads as ``exporter_throughput.py`` (10-span runs, 1-span runs; ids as LangChain makes them) and at
two batch sizes: 4,096 items (a full batch: flat out, and since the exporter writes a steady load in full batches,
paced too) and 700 (what a steady 20,000 spans/s came in before that change).

**How the count is taken**, as in ``instructions.py``: each configuration in a process of its own under
``valgrind --tool=callgrind --dump-before=os_getppid`` with ``PYTHONHASHSEED`` fixed. The process builds its workload
(untimed), writes its first ``--warmup`` items (the schema, the statements' caches and the driver warmed), then calls
the marker, writes the rest in batches, calls the marker, writes nothing, calls the marker:

    instructions per span = (segment 2 - segment 3) / spans written

What is left out: the kernel's work (the page reads and writes of the WAL, which random ids multiply: see the
README). Every span written is counted afterwards against the workload.

Run: ``python -m bench.exporter_instructions [--runs N] [--runs1 N]`` (4 processes under valgrind, 2 at a time:
3 to 6 minutes on 2 CPUs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/exporter_instructions.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO_ROOT, metric, print_summary, table, write_results
from bench.instructions import HASH_SEED, MARKER_SYMBOL, VALGRIND, _totals, _valgrind_version

NAME = "exporter_instructions"
CONFIGS = (("10-span runs", 10, 4096), ("1-span runs", 1, 4096), ("1-span runs", 1, 700), ("10-span runs", 10, 700))


def child(per: int, n_runs: int, batch: int, warmup: int) -> int:
    """Under callgrind: build the workload, write ``warmup`` items, then three markers around the rest."""
    from bench.exporter_throughput import _count, make_workload
    from costobs_callbacks._export import Batch
    from costobs_callbacks._store import Store

    items, n_spans = make_workload(n_runs, per, "uuid7")
    mark = os.getppid
    with tempfile.TemporaryDirectory(prefix="costobs-cgx-") as d:
        store = Store(f"sqlite:///{d}/x.db")
        try:
            store.ensure_schema()
            head, rest = items[:warmup], items[warmup:]
            store.write_batch(Batch(head))
            counted = sum(1 for it in rest if type(it).__name__ == "Span")
            gc.collect()
            mark()
            for i in range(0, len(rest), batch):
                store.write_batch(Batch(rest[i:i + batch]))
            mark()
            mark()
            stored = _count(store)
        finally:
            store.close()
    print("CHILD-RESULT " + json.dumps({"spans": n_spans, "counted": counted, "stored": stored}), flush=True)
    return 0


def count(label: str, per: int, n_runs: int, batch: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="costobs-cgxout-") as d:
        out = Path(d) / "cg.out"
        cmd = [VALGRIND, "--tool=callgrind", f"--dump-before={MARKER_SYMBOL}", "--dump-instr=no",
               "--compress-strings=no", f"--callgrind-out-file={out}", sys.executable, "-m",
               "bench.exporter_instructions", "--child", f"{per}:{n_runs}:{batch}", "--warmup", str(warmup)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, PYTHONHASHSEED=HASH_SEED), capture_output=True,
                           text=True, check=False)
        secs = time.perf_counter() - t0
        if p.returncode != 0:
            tail = "\n".join((p.stdout + p.stderr).splitlines()[-15:])
            raise RuntimeError(f"{label}, batch {batch}: exit {p.returncode}\n{tail}")
        result = next(json.loads(line.removeprefix("CHILD-RESULT ")) for line in p.stdout.splitlines()
                      if line.startswith("CHILD-RESULT "))
        dumps = sorted(Path(d).glob("cg.out.*"), key=lambda q: int(q.name.rsplit(".", 1)[1]))
        if len(dumps) < 3:
            raise RuntimeError(f"{label}: expected 3 callgrind dumps at {MARKER_SYMBOL}, got {len(dumps)}")
        seg = [_totals(q) for q in dumps[:3]]
    print(f"  {label}, batches of {batch}: {(seg[1] - seg[2]) / result['counted']:,.0f} instructions/span "
          f"({secs:.0f}s)", flush=True)
    return {"label": label, "per_run": per, "batch": batch, "per_span": (seg[1] - seg[2]) / result["counted"],
            "segments": seg, **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2_500, help="10-span runs")
    ap.add_argument("--runs1", type=int, default=20_000, help="1-span runs")
    ap.add_argument("--warmup", type=int, default=2_000, help="items written before counting")
    ap.add_argument("--jobs", type=int, default=2, help="callgrind processes at a time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        per, n_runs, batch = (int(x) for x in args.child.split(":"))
        return child(per, n_runs, batch, args.warmup)
    if shutil.which(VALGRIND) is None:
        print(f"# {VALGRIND} not found: nothing counted")
        return 0
    print(f"# callgrind: {len(CONFIGS)} processes, {args.jobs} at a time; SQLite; uuid7 ids", flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda c: count(c[0], c[1], args.runs if c[1] == 10 else args.runs1, c[2],
                                                args.warmup), CONFIGS))
    rows, summary = [], []
    for r in results:
        ok = r["stored"]["spans"] == r["spans"]
        rows.append([r["label"], f"{r['batch']:,}", f"{r['per_span']:,.0f}", f"{r['counted']:,}",
                     "yes" if ok else "NO"])
        summary.append(metric(f"SQLite, {r['label']}, batches of {r['batch']}: instructions per span", r["per_span"],
                              "instr", None, None, f"{r['counted']:,} spans counted"))
        summary.append(metric(f"SQLite, {r['label']}, batches of {r['batch']}: every span stored", None, "", "yes",
                              ok))
    print("\n## Store.write_batch into SQLite: instructions per span of the writing thread (callgrind)\n")
    print(table(["workload", "batch (items)", "instructions/span", "spans counted", "all stored"], rows))
    print()
    print_summary(summary)
    path = write_results(NAME, {"runs": args.runs, "runs1": args.runs1, "warmup": args.warmup,
                                "hash_seed": HASH_SEED, "valgrind": _valgrind_version()}, {"counts": results},
                         summary)
    print(f"\nresults: {path}")
    return 0 if all(m["ok"] is not False for m in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
