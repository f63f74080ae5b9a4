"""Where our LangChain handler's per-call time goes: a breakdown for optimising the hot path.

Two views of the same workload (``model.invoke("hi", config)`` with our handler, as in
``handler_overhead.py``):

1. Inclusive timers: the handler's hooks and the ledger, pricing, loop-guard and exporter steps under
   them are wrapped (on their instances) with a ``perf_counter_ns`` timer; the table gives the median
   and mean microseconds per call of each. The wrappers add well under a microsecond each, so the
   figures are close to the real cost (nested entries include their children).
2. cProfile: deterministic profile of the same calls (its own overhead inflates small functions about
   twofold, so read it for proportions), top entries of our package by own time and by cumulative
   time, and the LangChain dispatch around them. The raw profile is saved for ``snakeviz``/``pstats``.

Run: ``python -m bench.profile_handler [--calls N] [--budget] [--chain]``.
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
import time
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/profile_handler.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    PRICES,
    RESULTS_DIR,
    fixed_chat_model,
    fmt,
    metric,
    quiet_tracing,
    table,
    tiny_chain,
    write_results,
)

NAME = "profile_handler"
META = {"feature": "bench", "user_id": "user-42", "tenant_id": "acme"}


class Timers:
    def __init__(self) -> None:
        self.samples: dict[str, list[int]] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        bucket = self.samples.setdefault(name, [])
        clock = time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                bucket.append(clock() - t0)

        return timed

    def patch(self, obj: Any, attr: str, name: str | None = None) -> None:
        setattr(obj, attr, self.wrap(name or attr, getattr(obj, attr)))

    def patch_module(self, module: Any, attr: str, name: str) -> Callable[[], None]:
        """Wrap a module function where it is looked up; returns the undo."""
        orig = getattr(module, attr)
        setattr(module, attr, self.wrap(name, orig))
        return lambda: setattr(module, attr, orig)

    def clear(self) -> None:
        for v in self.samples.values():
            v.clear()


def instrument(tracker: Any, handler: Any, timers: Timers) -> Callable[[], None]:
    """Wrap the hot-path steps of one tracker; returns an undo function for the class-level wraps."""
    from costobs_callbacks._ledger import core
    from costobs_callbacks.integrations.langchain import handler as lc

    for hook in ("on_chat_model_start", "on_llm_end", "on_chain_start", "on_chain_end"):
        timers.patch(handler, hook, f"handler.{hook}")
    timers.patch(handler, "_model_start", "handler._model_start")
    timers.patch(handler, "_model_end", "handler._model_end")
    led = tracker.ledger
    for m in ("start_llm", "start_span", "_start", "_start_new_llm_run", "end", "end_llm", "_finish", "open_run",
              "_attribute", "_guard_start", "_check_call_start", "_check_llm_estimate", "_check_loops", "_end_root",
              "_end_child", "_close_run", "hash_user", "_check_after"):
        timers.patch(led, m, f"ledger.{m}")
    for m in ("price_nanos", "estimate_nanos"):
        timers.patch(tracker.prices, m, f"prices.{m}")
    timers.patch(tracker.exporter, "emit", "exporter.emit")
    timers.patch(lc.MESSAGES, "signature", "loop guard: messages signature")
    timers.patch(lc.MESSAGES, "count_tokens", "budget: count prompt tokens")
    orig_usage = lc.usage_from_metadata
    lc.usage_from_metadata = timers.wrap("usage_from_metadata", orig_usage)  # type: ignore[assignment]
    undos = [timers.patch_module(core, "new_run", "new_run"), timers.patch_module(core, "new_span", "new_span")]

    def undo() -> None:
        for u in undos:
            u()
        lc.usage_from_metadata = orig_usage  # type: ignore[assignment]

    return undo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20_000, help="calls per view")
    ap.add_argument("--budget", action="store_true", help="give the tracker a Budget(max_cost_usd, max_llm_calls)")
    ap.add_argument("--chain", action="store_true", help="invoke ChatPromptTemplate | model instead of the model")
    ap.add_argument("--top", type=int, default=25, help="rows of each cProfile listing")
    args = ap.parse_args(argv)
    quiet_tracing()
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)

    from costobs_callbacks import Budget, CostTracker

    model = fixed_chat_model()
    target = tiny_chain(model) if args.chain else model
    payload: Any = {"q": "hi"} if args.chain else "hi"
    budget = Budget(max_cost_usd=Decimal("5"), max_llm_calls=100) if args.budget else None
    variant = ("chain" if args.chain else "direct") + ("+budget" if args.budget else "")
    with tempfile.TemporaryDirectory(prefix="costobs-prof-") as d:
        tracker = CostTracker(f"sqlite:///{d}/p.db", prices=PRICES, user_salt="bench-salt", budget=budget)
        handler = tracker.langchain_handler()
        call = partial(target.invoke, payload, config={"callbacks": [handler], "metadata": dict(META)})
        for _ in range(500):
            call()
        tracker.flush()

        # 0. net GC-tracked objects kept per call, with and without our handler (they trigger collections)
        bare = partial(target.invoke, payload, config={"callbacks": [], "metadata": dict(META)})
        allocs = {"no handler": _gc_allocs_per_call(bare, 3000), "our handler": _gc_allocs_per_call(call, 3000)}
        tracker.flush()

        # 1. inclusive timers
        timers = Timers()
        undo = instrument(tracker, handler, timers)
        for _ in range(300):
            call()
        timers.clear()
        gc.collect()
        for _ in range(args.calls):
            call()
        undo()
        tracker.flush()
        rows = []
        timer_out: dict[str, Any] = {}
        for name, xs in timers.samples.items():
            if not xs:
                continue
            xs_sorted = sorted(xs)
            per_call = len(xs) / args.calls
            med = xs_sorted[len(xs) // 2] / 1000.0
            mean = sum(xs) / len(xs) / 1000.0
            timer_out[name] = {"calls_per_invoke": per_call, "median_us": med, "mean_us": mean,
                               "us_per_invoke": mean * per_call}
            rows.append([name, f"{per_call:g}", fmt(med, 2), fmt(mean, 2), fmt(mean * per_call, 2)])
        rows.sort(key=lambda r: -float(r[4].replace(",", "")))

        # 2. cProfile (timers removed from the instances first)
        for attr in list(vars(handler)):
            if attr.startswith(("on_", "_model_")):
                delattr(handler, attr)
        for obj in (tracker.ledger, tracker.prices, tracker.exporter):
            for attr in list(vars(obj)):
                if callable(vars(obj)[attr]) and getattr(vars(obj)[attr], "__name__", "") == "timed":
                    delattr(obj, attr)
        from costobs_callbacks.integrations.langchain import handler as lc

        for attr in ("signature", "count_tokens"):
            lc.MESSAGES.__dict__.pop(attr, None)
        prof = cProfile.Profile()
        gc.collect()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        tracker.flush()
        tracker.close()

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    prof_path = RESULTS_DIR / f"{NAME}_{variant}.prof"
    prof.dump_stats(str(prof_path))
    st = pstats.Stats(prof)
    total_tt = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]

    def ours(key: tuple[str, int, str]) -> bool:
        return "costobs_callbacks" in key[0]

    ours_tt = sum(v[2] for k, v in st.stats.items() if ours(k))  # type: ignore[attr-defined]
    prof_rows_tt = _top(st, ours, "tottime", args.top, args.calls)
    prof_rows_ct = _top(st, ours, "cumtime", args.top, args.calls)

    print(f"# {NAME} ({variant}): {args.calls} calls with our handler\n")
    print("## Inclusive timers (us; nested entries include their children)\n")
    print(table(["step", "per invoke", "median us", "mean us", "us per invoke"], rows))
    print("\n## Net GC-tracked objects kept per call (queued spans, recent runs) and collections per 1,000 calls\n")
    print(table(["", "objects/call", "gen0", "gen1", "gen2"],
                [[k, fmt(v["net_objects_per_call"]), fmt(v["gen0_per_1000_calls"]), fmt(v["gen1_per_1000_calls"]),
                  fmt(v["gen2_per_1000_calls"])] for k, v in allocs.items()]))
    print(f"\n## cProfile: our package = {ours_tt / total_tt * 100:.1f}% of all profiled own time "
          f"({ours_tt / args.calls * 1e6:.1f} us/call under the profiler)\n")
    print("### by own time (tottime)\n")
    print(table(["function", "ncalls/call", "tottime us/call", "cumtime us/call"], prof_rows_tt))
    print("\n### by cumulative time (cumtime)\n")
    print(table(["function", "ncalls/call", "tottime us/call", "cumtime us/call"], prof_rows_ct))
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
    print("\n### whole process by own time (pstats)\n")
    print("\n".join(s.getvalue().splitlines()[-22:]))
    print(f"\nprofile: {prof_path}")

    start = timer_out.get("handler.on_chat_model_start", {}).get("us_per_invoke")
    end = timer_out.get("handler.on_llm_end", {}).get("us_per_invoke")
    summary = [
        metric(f"handler hooks per call ({variant})", (start or 0) + (end or 0), "us",
               note=f"start {fmt(start)} + end {fmt(end)}, inclusive timers"),
    ]
    results = {"timers": timer_out, "gc": allocs, "cprofile_tottime": prof_rows_tt, "cprofile_cumtime": prof_rows_ct}
    write_results(NAME if variant == "direct" else f"{NAME}_{variant}", vars(args), results, summary)
    return 0


def _gc_allocs_per_call(call: Callable[[], Any], n: int) -> dict[str, float]:
    """Net GC-tracked objects left alive per call (CPython's gen-0 counter counts allocations minus
    deallocations; a collection runs each time it passes the threshold), and collections per 1,000
    calls of each generation. Objects freed by reference counting within the call do not count."""
    threshold = gc.get_threshold()[0]
    gc.collect()
    s0 = [g["collections"] for g in gc.get_stats()]
    c0 = gc.get_count()[0]
    for _ in range(n):
        call()
    s1 = [g["collections"] for g in gc.get_stats()]
    c1 = gc.get_count()[0]
    # every collection of any generation resets the gen-0 counter
    resets = sum(b - a for a, b in zip(s0, s1, strict=True))
    allocs = resets * threshold + c1 - c0
    out = {"net_objects_per_call": allocs / n}
    for i, (a, b) in enumerate(zip(s0, s1, strict=True)):
        out[f"gen{i}_per_1000_calls"] = (b - a) * 1000 / n
    return out


def _top(st: pstats.Stats, pred: Callable[[tuple[str, int, str]], bool], key: str, n: int,
         calls: int) -> list[list[str]]:
    idx = 2 if key == "tottime" else 3
    items = [(k, v) for k, v in st.stats.items() if pred(k)]  # type: ignore[attr-defined]
    items.sort(key=lambda kv: -kv[1][idx])
    out = []
    for (file, line, func), v in items[:n]:
        short = file.split("costobs_callbacks/")[-1]
        out.append([f"{short}:{line}({func})", f"{v[1] / calls:g}", fmt(v[2] / calls * 1e6, 2),
                    fmt(v[3] / calls * 1e6, 2)])
    return out


if __name__ == "__main__":
    raise SystemExit(main())
