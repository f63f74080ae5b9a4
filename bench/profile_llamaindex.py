"""Where our LlamaIndex adapter's per-call work goes: a breakdown for optimising ``MockLLM.complete`` inside an open
``tracker.run()`` (the ``ours_in_run`` configuration of ``llamaindex_overhead.py``), every call with a prompt of
its own (so the prompt is tokenized, as with real traffic: on the exporter's thread when the call's count is left
for later, see the README's "How tokens are counted", else at the call's end).

Two views of the same workload:

1. Bytecodes: every Python bytecode our package executes, counted per function with ``sys.settrace`` opcode
   events (deterministic: the same figures run after run), with the Python calls each function gets per
   LlamaIndex call. Time follows bytecodes and frames closely on this path; what it leaves out is native work
   (tiktoken's encoder, dict and object internals).
2. In-situ cost of the two parts that are not bytecodes-bound, by difference: the tokenizer (its encoder replaced
   by one that returns no tokens: about nothing while the counts are left to the exporter's thread) and the ledger's
   end of the call (``Ledger.record_scoped_llm`` replaced by one that records nothing), each against the unchanged
   adapter, interleaved, calling-thread CPU time. These two runs change what is recorded: they are measurements,
   not behaviour.

Run: ``python -m bench.profile_llamaindex [--calls N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/profile_llamaindex.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "What is the capital of France? Answer in one short sentence, please."
PRICES = {"MockLLM": {"input": "0.15", "output": "0.60"}}
BATCH = 50  # calls per tracker.run(), as llamaindex_overhead.py's ours_in_run


class Setup:
    """One tracker, instrumented, and a MockLLM with its own prompts; ``batch()`` makes ``BATCH`` calls in a run."""

    def __init__(self, d: str, name: str, n_prompts: int) -> None:
        from llama_index.core.llms import MockLLM

        from costobs_callbacks import CostTracker

        self.tracker = CostTracker(f"sqlite:///{d}/{name}.db", prices=PRICES, user_salt="bench-salt")
        self.llm = MockLLM()
        self.prompts = iter([f"{PROMPT} ({name} #{i})" for i in range(n_prompts)])

    def batch(self, timed: bool = True) -> float:
        self.tracker.instrument_llamaindex()
        try:
            with self.tracker.run(feature="bench-batch"):
                t0 = time.thread_time_ns()
                for _ in range(BATCH):
                    self.llm.complete(next(self.prompts))
                dt = time.thread_time_ns() - t0
        finally:
            self.tracker.uninstrument_llamaindex()
        return dt / BATCH / 1000.0


def bytecodes(calls: int) -> None:
    with tempfile.TemporaryDirectory(prefix="costobs-prof-li-") as d:
        s = Setup(d, "ops", calls + 10 * BATCH)
        for _ in range(10):
            s.batch()
        ops: collections.Counter[str] = collections.Counter()
        frames: collections.Counter[str] = collections.Counter()

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            code = frame.f_code
            if "costobs_callbacks" not in code.co_filename:
                return None
            key = f"{code.co_filename.split('costobs_callbacks/')[-1]}:{code.co_name}"
            frames[key] += 1
            frame.f_trace_opcodes = True

            def local(frame: Any, event: str, arg: Any) -> Any:
                if event == "opcode":
                    ops[key] += 1
                return local
            return local

        n = 0
        sys.settrace(tracer)
        try:
            while n < calls:
                s.batch()
                n += BATCH
        finally:
            sys.settrace(None)
        s.tracker.close()
    print(f"## bytecodes per call, {n} calls: {sum(ops.values()) / n:.0f} in {sum(frames.values()) / n:.1f} "
          "Python calls of costobs_callbacks\n")
    print("| bytecodes | calls | function |\n|---|---|---|")
    for k, v in ops.most_common():
        print(f"| {v / n:.0f} | {frames[k] / n:.2f} | `{k}` |")


def in_situ(rounds: int) -> None:
    from costobs_callbacks import _tokens

    with tempfile.TemporaryDirectory(prefix="costobs-prof-li-") as d:
        n = (rounds + 10) * BATCH
        setups = {k: Setup(d, k, n) for k in ("adapter", "no_tokenizer", "no_ledger_end")}
        led = setups["no_ledger_end"].tracker.ledger
        led.record_scoped_llm = lambda *a, **k: None  # type: ignore[method-assign,assignment,return-value]
        _tokens.count_text("warm", "MockLLM")
        real = dict(_tokens._encoders)
        hollow = {k: (None if v is None else (lambda text: ())) for k, v in real.items()}
        keys = list(setups)

        def run(k: str) -> float:
            if k == "no_tokenizer":
                _tokens._encoders.update(hollow)
            try:
                return setups[k].batch()
            finally:
                _tokens._encoders.update(real)

        for _ in range(5):
            for k in keys:
                run(k)
        cpu: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                cpu[k].append(run(k))
        for s in setups.values():
            s.tracker.close()
    base = cpu["adapter"]
    print(f"\n## in situ, {rounds} rounds x {BATCH} calls, calling-thread CPU us per call (median)\n")
    print(f"adapter as is: {statistics.median(base):.1f} us per complete() (LlamaIndex's own work included)")
    for k, what in (("no_tokenizer", "tiktoken's encoder"), ("no_ledger_end", "Ledger.record_scoped_llm")):
        diff = statistics.median(a - b for a, b in zip(base, cpu[k], strict=True))
        print(f"{what}: {diff:.1f} us per call")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000, help="calls traced for the bytecode counts")
    ap.add_argument("--rounds", type=int, default=40, help="interleaved rounds of the in-situ view")
    args = ap.parse_args(argv)
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)
    try:
        import llama_index.core  # noqa: F401
    except ImportError as exc:
        print(f"# profile_llamaindex: skipped: llama-index-core is not installed ({exc})")
        return 0
    bytecodes(args.calls)
    in_situ(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
