"""Overhead per LlamaIndex LLM call: ours beside LlamaIndex's own TokenCountingHandler, interleaved.

Configurations, each on its own ``MockLLM`` (MockLLM reports no usage, so both token counters
tokenise the prompt and the reply, as they would for any provider that reports none):

  none         nothing: ``MockLLM()``, built with no callback handler at all (``Settings``' manager
               cleared first: ``CallbackManager([])`` takes the handlers of the manager already in
               ``Settings``, and shares its list; the handler lists are asserted before and after)
  tokencount   ``MockLLM(callback_manager=CallbackManager([TokenCountingHandler()]))``
  ours         ``tracker.instrument_llamaindex()`` (span handler + legacy handler), on
               only around this configuration's batches (``uninstrument_llamaindex()`` after each;
               both untimed), since instrumentation is process-wide; each call on its own (a lone call)
  ours_run     the same, each call inside its own ``with tracker.run(feature=...)``: how an app
               attributes a request (the scope's own opening and closing is in the figure)
  ours_in_run  the same, the calls of each batch inside one ``tracker.run()`` opened and closed around the
               batch (untimed): what a call adds inside a request that makes several; every call sends a
               prompt of its own (identical requests in one run would be stopped by the loop guard)
  scope_only   ``MockLLM()`` as ``none``, each call inside its own ``tracker.run()``, not instrumented:
               what the scope alone costs (ledger work, not the LlamaIndex adapter's)
  ours_legacy  ``MockLLM(callback_manager=CallbackManager([tracker.llamaindex_handler()]))``: our
               legacy handler alone, wired like TokenCountingHandler (when the integration has it)

As in ``handler_overhead.py``: calling-thread CPU time, rounds of one batch per configuration in
an order shuffled each round, median (p10, p90) of batch means, overhead = median of per-round differences.
Two sections: ``llm.complete(prompt)`` and ``llm.chat([ChatMessage])``.

Each of our batches is followed, untimed, by a flush of its tracker: the exporter's thread does its work for those
calls there (writing them; counting the tokens of the calls left for later, see the README's "How tokens are
counted"), and its CPU time in those flushes is printed per call. Without the flush that work falls, at random, on
the other configurations' batches (it ran in their rounds, slowing ``nothing`` itself from 60 to 100 µs a call in
half of them), which measured the exporter's thread against the others instead of our calling thread.

``--unique-prompts``: every call sends a prompt of its own (built before timing, distinct per
configuration). By default every call sends the same prompt, so our token counts, remembered by text
hash, are never recomputed, while ``TokenCountingHandler`` tokenizes it on every call; with distinct
prompts both tokenize what each call sends, as with real traffic.

If ``instrument_llamaindex()`` is missing or records nothing (an integration broken by a LlamaIndex
release), the benchmark says so and exits 0 without figures for ours.

Run: ``python -m bench.llamaindex_overhead [--rounds N] [--batch N]``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/llamaindex_overhead.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    fmt,
    interleave,
    metric,
    paired_overhead,
    print_summary,
    summarize,
    table,
    write_results,
)

NAME = "llamaindex_overhead"
TOKENCOUNT_REFERENCE_US = 60.0
PROMPT = "What is the capital of France? Answer in one short sentence, please."
LABELS = {
    "none": "nothing",
    "tokencount": "TokenCountingHandler (CallbackManager)",
    "ours": "costobs: tracker.instrument_llamaindex()",
    "ours_run": "costobs: instrument_llamaindex(), in tracker.run()",
    "ours_in_run": "costobs: instrument_llamaindex(), 50 calls in a tracker.run()",
    "scope_only": "tracker.run() around nothing's call",
    "ours_legacy": "costobs: legacy handler in a CallbackManager",
}
MOCK_PRICES = {"MockLLM": {"input": "0.15", "output": "0.60"}}


def _skip(reason: str) -> int:
    print(f"# {NAME}: skipped: {reason}")
    summary = [metric("LlamaIndex: costobs over nothing", None, "us", note=f"skipped: {reason}")]
    write_results(NAME, {}, {"skipped": reason}, summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--unique-prompts", action="store_true",
                    help="a distinct prompt for every call (no configuration can reuse a previous count)")
    ap.add_argument("--count-at-once", action="store_true",
                    help="count every call's tokens when it ends, none left for the exporter's thread")
    args = ap.parse_args(argv)
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)

    try:
        from llama_index.core.base.llms.types import ChatMessage
        from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
        from llama_index.core.llms import MockLLM
    except ImportError as exc:
        return _skip(f"llama-index-core is not installed ({exc})")
    from costobs_callbacks import CostTracker

    with tempfile.TemporaryDirectory(prefix="costobs-li-") as d:
        tracker = CostTracker(f"sqlite:///{d}/li.db", prices=MOCK_PRICES, user_salt="bench-salt")
        legacy_tracker = CostTracker(f"sqlite:///{d}/li_legacy.db", prices=MOCK_PRICES, user_salt="bench-salt")
        if args.count_at_once:
            tracker.ledger.room_for_later = legacy_tracker.ledger.room_for_later = None
        try:
            return _run(args, tracker, legacy_tracker, MockLLM, CallbackManager, TokenCountingHandler, ChatMessage)
        finally:
            try:
                tracker.uninstrument_llamaindex()
            except Exception:
                pass
            tracker.close()
            legacy_tracker.close()


def _stored_calls(tracker: Any) -> int:
    tracker.flush()
    return sum(r.llm_calls for r in tracker.rollup("model"))


def _run(args: argparse.Namespace, tracker: Any, legacy_tracker: Any, MockLLM: Any, CallbackManager: Any,
         TokenCountingHandler: Any, ChatMessage: Any) -> int:
    # Does our integration exist, and does it see a MockLLM call?
    probe = MockLLM()
    try:
        tracker.instrument_llamaindex()
    except (ImportError, AttributeError, NotImplementedError) as exc:
        return _skip(f"tracker.instrument_llamaindex() is not available yet ({type(exc).__name__}: {exc})")
    probe.complete(PROMPT)
    tracker.uninstrument_llamaindex()
    if _stored_calls(tracker) < 1:
        return _skip("tracker.instrument_llamaindex() recorded no MockLLM call")

    notes: list[str] = []
    counter = TokenCountingHandler()
    from llama_index.core.settings import Settings

    Settings._callback_manager = None  # else every CallbackManager([]) below takes (and shares) its handlers
    llms: dict[str, Any] = {
        "none": MockLLM(),
        "tokencount": MockLLM(callback_manager=CallbackManager([counter])),
        "ours": MockLLM(),
        "ours_run": MockLLM(),
        "ours_in_run": MockLLM(),
        "scope_only": MockLLM(),
    }
    try:
        llms["ours_legacy"] = MockLLM(callback_manager=CallbackManager([legacy_tracker.llamaindex_handler()]))
    except (ImportError, AttributeError, NotImplementedError) as exc:
        notes.append(f"ours_legacy skipped: {type(exc).__name__}: {exc}")
    _check_baselines(llms, counter)
    batch_run: list[Any] = []

    def enter_batch_run() -> None:
        tracker.instrument_llamaindex()
        batch_run.append(tracker.run(feature="bench-batch"))
        batch_run[-1].__enter__()

    def exit_batch_run() -> None:
        batch_run.pop().__exit__(None, None, None)
        tracker.uninstrument_llamaindex()

    exporter_cpu: dict[str, float] = {}  # seconds of the exporter's thread in the flushes after a config's batches

    def then_flush(key: str, after: Callable[[], Any], t: Any) -> Callable[[], None]:
        def hook() -> None:
            after()
            worker = t.exporter._worker
            clock = time.pthread_getcpuclockid(worker.ident) if worker is not None and worker.is_alive() else None
            c0 = time.clock_gettime(clock) if clock is not None else 0.0
            t.flush()
            if clock is not None:
                exporter_cpu[key] = exporter_cpu.get(key, 0.0) + time.clock_gettime(clock) - c0
        return hook

    hooks_before = {"ours": tracker.instrument_llamaindex, "ours_run": tracker.instrument_llamaindex,
                    "ours_in_run": enter_batch_run}
    # Each of our batches is followed (untimed) by a flush: the exporter's work for its calls (writing them, and
    # counting the tokens of those left for later) is done there, not on the other configurations' time.
    hooks_after = {"ours": then_flush("ours", tracker.uninstrument_llamaindex, tracker),
                   "ours_run": then_flush("ours_run", tracker.uninstrument_llamaindex, tracker),
                   "ours_in_run": then_flush("ours_in_run", exit_batch_run, tracker),
                   "ours_legacy": then_flush("ours_legacy", _nothing, legacy_tracker)}
    messages = [ChatMessage(role="user", content=PROMPT)]
    sections: list[dict[str, Any]] = []
    calls_made = {k: 0 for k in llms}
    n_calls = args.warmup + args.rounds * args.batch

    def scoped(key: str, call: Callable[[], Any]) -> Callable[[], Any]:
        if key not in SCOPED:
            return call
        run = (legacy_tracker if key == "scope_only" else tracker).run

        def in_run() -> Any:
            with run(feature="bench"):
                return call()
        return in_run

    def complete_call(key: str, llm: Any) -> Callable[[], Any]:
        if not args.unique_prompts and key != "ours_in_run":
            return scoped(key, partial(llm.complete, PROMPT))
        prompts = iter([f"{PROMPT} ({key} #{i})" for i in range(n_calls)])
        return scoped(key, lambda: llm.complete(next(prompts)))

    def chat_call(key: str, llm: Any) -> Callable[[], Any]:
        if not args.unique_prompts and key != "ours_in_run":
            return scoped(key, partial(llm.chat, messages))
        chats = iter([[ChatMessage(role="user", content=f"{PROMPT} ({key} #{i})")] for i in range(n_calls)])
        return scoped(key, lambda: llm.chat(next(chats)))

    for title, make in (("llm.complete(prompt)", complete_call), ("llm.chat([ChatMessage])", chat_call)):
        calls: dict[str, Callable[[], Any]] = {k: make(k, llm) for k, llm in llms.items()}
        for k, call in calls.items():
            hooks_before.get(k, _nothing)()
            for _ in range(args.warmup):
                call()
            hooks_after.get(k, _nothing)()
            calls_made[k] += args.warmup
        gc.collect()
        t0 = time.perf_counter()
        exporter_cpu.clear()
        cpu, wall = interleave(calls, rounds=args.rounds, batch=args.batch, before=hooks_before, after=hooks_after)
        per_call = 1e6 / (args.rounds * args.batch)
        sec: dict[str, Any] = {"title": title, "seconds": time.perf_counter() - t0, "configs": {},
                               "exporter_us": {k: v * per_call for k, v in exporter_cpu.items()}}
        for k in calls:
            calls_made[k] += args.rounds * args.batch
            row: dict[str, Any] = {"label": LABELS[k], "cpu_us": summarize(cpu[k]), "wall_us": summarize(wall[k]),
                                   "cpu_us_rounds": cpu[k]}
            if k != "none":
                row["over_none_us"] = paired_overhead(cpu, k, "none")
            if k not in ("none", "tokencount", "scope_only"):
                row["over_tokencount_us"] = paired_overhead(cpu, k, "tokencount")
            sec["configs"][k] = row
        sections.append(sec)
        _check_baselines(llms, counter)

    stored = _stored_calls(tracker) - 1  # minus the probe
    stored_legacy = _stored_calls(legacy_tracker) if "ours_legacy" in llms else None
    # chat() on MockLLM runs complete() inside it: LlamaIndex emits a chat and a completion event pair.
    checks = {"ours": {"calls": calls_made["ours"] + calls_made["ours_run"] + calls_made["ours_in_run"],
                       "stored_llm_calls": stored,
                       "stats": tracker.stats}}
    if stored_legacy is not None:
        checks["ours_legacy"] = {"calls": calls_made["ours_legacy"], "stored_llm_calls": stored_legacy,
                                 "stats": legacy_tracker.stats}

    print(f"# {NAME}: per-call thread CPU time, {args.rounds} rounds x {args.batch} calls, configs interleaved")
    for sec in sections:
        print(f"\n## {sec['title']}  ({sec['seconds']:.1f}s)\n")
        rows = []
        for row in sec["configs"].values():
            c, o_n, o_t = row["cpu_us"], row.get("over_none_us"), row.get("over_tokencount_us")
            rows.append([row["label"], fmt(c["median"]), f"{fmt(c['p10'])} / {fmt(c['p90'])}",
                         f"{fmt(o_n['median'])} ({fmt(o_n['p10'])}..{fmt(o_n['p90'])})" if o_n else "-",
                         fmt(o_t["median"]) if o_t else "-", fmt(row["wall_us"]["median"])])
        print(table(["config", "CPU us/call", "p10 / p90", "over nothing (p10..p90)", "over TokenCounting",
                     "wall us/call"], rows))
        print("\nthe exporter's thread, in the flush after each of our batches (writing the calls, and counting the"
              " tokens of those left for later; one transaction a batch here, against one per 4,096 spans at a"
              " steady load), CPU us per call: "
              + ", ".join(f"{LABELS[k]}: {fmt(v)}" for k, v in sec["exporter_us"].items()))
    for n in notes:
        print(f"\nnote: {n}")
    print(f"\nstored: {checks}")

    summary: list[dict[str, Any]] = []
    for sec in sections:
        cfg = sec["configs"]
        tc = cfg["tokencount"]["over_none_us"]["median"]
        ours = cfg["ours"]["over_none_us"]["median"]
        tag = sec["title"].split("(")[0].removeprefix("llm.")
        summary.append(metric(f"{tag}: TokenCountingHandler over nothing", tc, "us",
                              note=f"reference ~{TOKENCOUNT_REFERENCE_US:g} us" if tag == "complete" else None))
        summary.append(metric(f"{tag}: costobs (instrument_llamaindex) over nothing", ours, "us",
                              "< TokenCountingHandler", ours < tc))
        in_run = cfg["ours_in_run"]["over_none_us"]["median"]
        summary.append(metric(f"{tag}: costobs, a call in a tracker.run(), over nothing", in_run, "us",
                              "<= TokenCountingHandler", in_run <= tc))
        summary.append(metric(f"{tag}: costobs, a tracker.run() per call, over nothing",
                              cfg["ours_run"]["over_none_us"]["median"], "us",
                              note=f"tracker.run() alone: {fmt(cfg['scope_only']['over_none_us']['median'])} us"))
        if "ours_legacy" in cfg:
            summary.append(metric(f"{tag}: costobs legacy handler over nothing",
                                  cfg["ours_legacy"]["over_none_us"]["median"], "us"))
    print()
    print_summary(summary)
    path = write_results(NAME, vars(args), {"sections": sections, "checks": checks, "notes": notes}, summary)
    print(f"\nresults: {path}")
    return 0


def _nothing() -> None:
    return None


SCOPED = frozenset({"ours_run", "scope_only"})


def _check_baselines(llms: dict[str, Any], counter: Any) -> None:
    """The baselines are what they say: ``none`` (and the models ours instruments, outside their batches) without
    any handler, ``tokencount`` with its counter alone."""
    for k in ("none", "ours", "ours_run", "ours_in_run", "scope_only"):
        handlers = llms[k].callback_manager.handlers
        assert handlers == [], f"{k}: a handler slipped into its callback manager: {handlers}"
    assert llms["tokencount"].callback_manager.handlers == [counter]


if __name__ == "__main__":
    raise SystemExit(main())
