"""Where a LlamaIndex call's token count is made, at a steady load: left for later (the default: the exporter's
thread counts it before writing the span) against counted at once on the app's thread.

``MockLLM.complete`` reports no usage, so every call is estimated from its prompt and reply. Calls run in runs of
``--per-run`` calls (``tracker.run()``), each with a prompt of its own, ``--calls`` of them per measurement, the
tracker at its defaults (the exporter wakes on a full batch of 4,096 or every 0.5 s); then ``flush()``. Measured:
the app's thread CPU per call (the loop of calls) and the exporter's thread CPU per call (from the first call to the
end of the flush, ``pthread_getcpuclockid``). "At once" is ``CostTracker(count_later=False)``: every call counted
when it ends. Measurements alternate, ``--rounds`` of each; medians.

``--io-ms``: each call then waits that long with the GIL released (``time.sleep``), as an app waits for a provider's
answer. Flat out (the default, 0), the app's thread and the exporter's contend for the GIL: tiktoken gives it up
while it encodes, so the exporter takes it back at each of the app's own releases (LlamaIndex's ``uuid4`` span ids
read ``os.urandom``, which releases it), and every such hand-over costs the app's thread a wake-up; with waits, the
exporter counts while the app waits.

Run: ``python -m bench.later_counts [--calls N] [--per-run N] [--rounds N] [--io-ms MS]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/later_counts.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import fmt, metric, print_summary, table, write_results

NAME = "later_counts"
PROMPT = "What is the capital of France? Answer in one short sentence, please."
PRICES = {"MockLLM": {"input": "0.15", "output": "0.60"}}


def measure(d: str, tag: str, later: bool, calls: int, per_run: int, io_ms: float = 0.0) -> tuple[float, float]:
    """App-thread and exporter-thread CPU µs per call for ``calls`` calls, counted later or at once."""
    from llama_index.core.llms import MockLLM

    from costobs_callbacks import CostTracker

    t = CostTracker(f"sqlite:///{d}/{tag}.db", prices=PRICES, user_salt="bench-salt", count_later=later)
    try:
        t.instrument_llamaindex()
        llm = MockLLM()
        prompts = iter([f"{PROMPT} ({tag} #{i})" for i in range(calls)])
        with t.run(feature="warm"):
            llm.complete("warm up")
        t.flush()
        worker = t.exporter._worker
        assert worker is not None and worker.ident is not None
        clock = time.pthread_getcpuclockid(worker.ident)
        e0, a0 = time.clock_gettime(clock), time.thread_time()
        for _ in range(calls // per_run):
            with t.run(feature="steady"):
                for _ in range(per_run):
                    llm.complete(next(prompts))
                    if io_ms:
                        time.sleep(io_ms / 1000)  # a provider's answer awaited (the GIL released meanwhile)
        a1 = time.thread_time()
        t.flush()
        e1 = time.clock_gettime(clock)
        n = calls // per_run * per_run
        stored = sum(r.llm_calls for r in t.rollup("feature") if r.key.get("feature") == "steady")
        assert stored == n, (stored, n)
        return (a1 - a0) / n * 1e6, (e1 - e0) / n * 1e6
    finally:
        t.uninstrument_llamaindex()
        t.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--per-run", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-ms", type=float, default=0.0,
                    help="milliseconds each call then waits, the GIL released (a provider's answer)")
    args = ap.parse_args(argv)
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)
    got: dict[str, dict[str, list[float]]] = {k: {"app": [], "exporter": []} for k in ("later", "at_once")}
    with tempfile.TemporaryDirectory(prefix="costobs-later-") as d:
        for r in range(args.rounds):
            for k in ("later", "at_once") if r % 2 == 0 else ("at_once", "later"):
                app, exp = measure(d, f"{k}{r}", k == "later", args.calls, args.per_run, args.io_ms)
                got[k]["app"].append(app)
                got[k]["exporter"].append(exp)
    med = {k: {w: statistics.median(v) for w, v in g.items()} for k, g in got.items()}
    print(f"# {NAME}: {args.calls} MockLLM.complete calls in runs of {args.per_run}, {args.rounds} rounds, medians\n")
    print(table(["token counts", "app thread CPU us/call", "exporter thread CPU us/call", "both"],
                [[k, fmt(m["app"]), fmt(m["exporter"]), fmt(m["app"] + m["exporter"])] for k, m in med.items()]))
    summary = [
        metric("app thread: counted later minus at once", med["later"]["app"] - med["at_once"]["app"], "us"),
        metric("exporter thread: counted later minus at once",
               med["later"]["exporter"] - med["at_once"]["exporter"], "us"),
    ]
    print()
    print_summary(summary)
    path = write_results(NAME, vars(args), {"rounds": got, "medians": med}, summary)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
