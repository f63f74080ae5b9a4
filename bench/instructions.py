"""Calling-thread CPU instructions per call, counted by callgrind; and LlamaIndex timed, interleaved.

Time on a shared 2-CPU machine moves by tens of percent from one minute to the next; the number of
instructions a call executes does not. This benchmark counts them with ``valgrind --tool=callgrind``
(``Ir``, instructions executed), on the calling thread only, for:

LangChain, one ``model.invoke("hi", config)`` of the fake chat model of ``_common.fixed_chat_model``
(usage and model name in the reply), metadata ``feature`` / ``user_id`` / ``tenant_id``, each call its
own root run:

  (a) none    no handler
  (b) noop    a no-op handler (``on_chat_model_start`` and ``on_llm_end`` defined; see ``_common.noop_handler``)
  (b') bare   a ``BaseCallbackHandler`` subclass defining nothing: its ``on_chat_model_start`` raises
              ``NotImplementedError`` and LangChain falls back to ``on_llm_start`` with the messages turned
              into strings (``UsageMetadataCallbackHandler`` defines only ``on_llm_end``, so it pays that too)
  (c) usage   ``langchain_core.callbacks.UsageMetadataCallbackHandler``
  (d) ours    ``CostTracker(...).langchain_handler()`` (default loop guard, priced model)

LlamaIndex, one ``MockLLM.complete(prompt)`` (the same prompt every call; ``--unique-prompts``: a prompt of its
own every call, see below):

  none         no handler: ``Settings._callback_manager`` cleared first, then
               ``MockLLM(callback_manager=CallbackManager([]))``, its handler list asserted empty
               (``CallbackManager([])`` takes the handlers of the manager in ``Settings``, if there is one,
               so a baseline built without clearing it can silently include them)
  tokencount   ``MockLLM(callback_manager=CallbackManager([TokenCountingHandler()]))``
  ours_scoped  ``tracker.instrument_llamaindex()``, the calls made inside an open ``with tracker.run(feature=...,
               user_id=..., tenant_id=..., loops=LoopPolicy(enabled=False))`` (every call repeats the same
               prompt, which the loop guard would refuse by the third): each call is a child span of the run.
               Each counted segment (and each timed batch) is one run, opened and closed around it; the
               segment of 0 calls opens and closes one too, so the run's own opening cancels, and what is
               left is the cost of a call in a run, its share of closing the run included
  ours_run_each  ``tracker.instrument_llamaindex()``, each call inside a ``with tracker.run(feature=...,
               user_id=..., tenant_id=...)`` of its own: a whole request of one LLM call, run included
  ours         ``tracker.instrument_llamaindex()``, no scope (the call is its own root run)

**``--unique-prompts``.** Every LlamaIndex call sends a prompt of its own (``LI_PROMPT`` and a call number,
built before counting, the same sequence in every configuration), so no token count can be remembered from an
earlier call: each configuration tokenizes what each call sends, as with real traffic. ``ours_scoped`` then
keeps the loop guard on, as ``llamaindex_overhead.py``'s ``ours_in_run`` does (distinct requests pass it; each
call's request signature is computed and counted), but for its step cap: ``LoopPolicy(max_steps=None)``, since a
counted run makes ``--calls`` calls. Drawing the next prompt costs
every configuration the same, and cancels in "over nothing".

**How the count is taken.** Each configuration runs in a process of its own under
``valgrind --tool=callgrind --separate-threads=yes --dump-before=os_getppid``, with ``PYTHONHASHSEED``
fixed. The process imports everything, builds its configuration, makes ``--warmup`` calls (tokenizers,
price cache, pydantic validators, the exporter thread and the database schema are all set up by then),
flushes the exporter, runs ``gc.collect()`` and ``gc.freeze()``, then calls ``os.getppid()`` (the marker),
makes N = ``--calls`` calls, calls the marker, makes 0 calls, calls the marker (``ours_scoped`` opens and
closes its run inside each segment). Every marker makes
callgrind dump and zero its counters, one file per thread; thread 1 is the calling (main) thread. So
segment 2 holds N calls plus one marker and segment 3 the marker alone, and

    instructions per call = (segment 2 - segment 3) / N

in which start-up, imports, warm-up, the marker's own cost and everything after the last marker cancel.
What is left includes everything the calls make the calling thread do: the garbage collections they
trigger, our ledger work, the append to the export queue. It leaves out the exporter's thread (its
writes to SQLite); its flush interval is set to an hour so that it sleeps through the counted segments
(under valgrind the threads are serialised and a wake-up would land at a random point; the calling
thread's work per call is the same with any interval).

Why a marker function: ``--toggle-collect=F`` collects only while inside the C function ``F``, and a
Python function is not one in CPython 3.11 (no perf trampolines before 3.12); the
``CALLGRIND_START_INSTRUMENTATION`` client requests are C macros, out of reach of Python without a
compiled extension. ``os.getppid`` is the C function ``os_getppid`` in libpython, which nothing
benchmarked calls; the parent checks that exactly three dumps were made, so a stray call would fail the
run rather than skew it.

**The ratio.** The issue states the handler's cost relative to LangChain's own dispatch of a no-op
handler, per chat-model call, in calling-thread instructions:

    ratio(x) = (x - b) / (b - a)

``b - a`` is what LangChain spends to dispatch a chat call's start and end events to a handler that
does nothing (run managers, event objects, callback lookups); ``x - b`` is what the handler ``x`` adds on
top of that. Of the simple definitions it is the one that puts ``UsageMetadataCallbackHandler`` near the
issue's 0.50x: ``(c - b) / (b - a)`` measures 0.44x to 0.45x here (langchain-core 1.8.3), while measured
against a bare ``BaseCallbackHandler`` (b'), whose fallback ``UsageMetadataCallbackHandler`` also pays,
``(c - b') / (b' - a)`` is 0.13x.

**LlamaIndex, timed.** The same LlamaIndex configurations also run in this process, without valgrind:
calling-thread CPU time (``time.thread_time_ns``), ``--rounds`` rounds of one batch of ``--batch`` calls
of every configuration, in an order shuffled each round, the median over rounds of the batch means,
and the median of paired per-round differences (as ``handler_overhead.py``). ``instrument_llamaindex()``
is process-wide, so each configuration of ours (one tracker each) has it switched on only around its own
batches, and ``ours_scoped`` its run opened and closed around each batch (both untimed), and its tracker
flushed after each batch (untimed: the exporter's thread does its work for the batch then, not during another
configuration's batch); the handler lists of the other two models are asserted before each of their batches.
"Met" compares the paired per-round difference to ``TokenCountingHandler``.

After counting, each process checks that the work was done: every call of ours stored and priced,
``UsageMetadataCallbackHandler`` and ``TokenCountingHandler`` holding every call's tokens; a failed check
fails the benchmark.

Run: ``python -m bench.instructions`` (10 processes under valgrind, 2 at a time: 10 to 25 minutes on 2 CPUs,
with other work; ``--quick``: fewer calls and rounds, the same processes).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/instructions.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    COST_PER_CALL_USD,
    INPUT_TOKENS,
    MODEL_NAME,
    OUTPUT_TOKENS,
    PRICES,
    REPO_ROOT,
    fixed_chat_model,
    fmt,
    interleave,
    metric,
    noop_handler,
    paired_overhead,
    print_summary,
    quiet_tracing,
    summarize,
    table,
    write_results,
)

NAME = "instructions"
VALGRIND = "/usr/bin/valgrind"
MARKER_SYMBOL = "os_getppid"
HASH_SEED = "0"
RATIO_TARGET = 0.6
META = {"feature": "bench", "user_id": "user-42", "tenant_id": "acme"}
LI_PROMPT = "What is the capital of France? Answer in one short sentence, please."
LI_PRICES = {"MockLLM": {"input": "0.15", "output": "0.60"}}

LANGCHAIN = {
    "none": "(a) no handler",
    "noop": "(b) no-op handler",
    "bare": "(b') bare BaseCallbackHandler subclass",
    "usage": "(c) UsageMetadataCallbackHandler",
    "ours": "(d) costobs handler",
}
LLAMAINDEX = {
    "none": "nothing",
    "tokencount": "TokenCountingHandler",
    "ours_scoped": "costobs: calls inside an open tracker.run()",
    "ours_run_each": "costobs: each call in a tracker.run() of its own",
    "ours": "costobs: no scope",
}
TIMED = ("none", "tokencount", "ours_scoped", "ours_run_each", "ours")


# -- the configurations (built in whichever process measures them) ----------------------------------


class Setup:
    """One configuration: ``call()`` makes one call; ``check(calls)`` says whether ``calls`` calls were
    all accounted for; ``assert_clean()`` (LlamaIndex) checks no stray handler joined; ``close()``."""

    def __init__(self, call: Callable[[], Any], check: Callable[[int], dict[str, Any]],
                 close: Callable[[], None] = lambda: None, assert_clean: Callable[[], None] = lambda: None,
                 before: Callable[[], None] | None = None, after: Callable[[], None] | None = None,
                 enter: Callable[[], None] = lambda: None, leave: Callable[[], None] = lambda: None) -> None:
        self.call = call
        self.check = check
        self.close = close
        self.assert_clean = assert_clean
        self.before = before  # instrumentation on (the timed rounds switch it around each batch)
        self.after = after
        self.enter = enter  # around every counted segment and timed batch, counted in the segment
        self.leave = leave


def _tracker(db_dir: str, name: str, prices: dict[str, dict[str, str]], export_delay: float) -> Any:
    from costobs_callbacks import CostTracker

    return CostTracker(f"sqlite:///{db_dir}/{name}.db", prices=prices, user_salt="bench-salt",
                       export_delay=export_delay)


def _stored(tracker: Any, calls: int, cost_per_call: Decimal | None) -> dict[str, Any]:
    tracker.flush()
    rows = tracker.rollup("model")
    llm_calls = sum(r.llm_calls for r in rows)
    cost = sum((r.cost_usd for r in rows), Decimal(0))
    stats = tracker.stats
    ok = (llm_calls == calls and stats["dropped"] == 0 and stats["failed"] == 0
          and stats["internal_errors"] == 0 and (cost_per_call is None or cost == cost_per_call * calls))
    return {"ok": ok, "calls": calls, "stored_llm_calls": llm_calls, "stored_cost_usd": str(cost), "stats": stats}


def langchain_setup(kind: str, db_dir: str, export_delay: float) -> Setup:
    from langchain_core.callbacks import UsageMetadataCallbackHandler

    quiet_tracing()
    model = fixed_chat_model()
    if kind == "none":
        return Setup(partial(model.invoke, "hi", config={"callbacks": [], "metadata": dict(META)}),
                     lambda n: {"ok": True, "calls": n})
    if kind == "noop":
        return Setup(partial(model.invoke, "hi", config={"callbacks": [noop_handler()], "metadata": dict(META)}),
                     lambda n: {"ok": True, "calls": n})
    if kind == "bare":
        from langchain_core.callbacks import BaseCallbackHandler

        class BareHandler(BaseCallbackHandler):
            pass

        return Setup(partial(model.invoke, "hi", config={"callbacks": [BareHandler()], "metadata": dict(META)}),
                     lambda n: {"ok": True, "calls": n})
    if kind == "usage":
        h = UsageMetadataCallbackHandler()

        def check_usage(n: int) -> dict[str, Any]:
            u = h.usage_metadata.get(MODEL_NAME) or {}
            got = (u.get("input_tokens"), u.get("output_tokens"))
            return {"ok": got == (INPUT_TOKENS * n, OUTPUT_TOKENS * n), "calls": n, "tokens": got}

        return Setup(partial(model.invoke, "hi", config={"callbacks": [h], "metadata": dict(META)}), check_usage)
    if kind == "ours":
        t = _tracker(db_dir, "lc", PRICES, export_delay)
        return Setup(partial(model.invoke, "hi", config={"callbacks": [t.langchain_handler()], "metadata": dict(META)}),
                     lambda n: _stored(t, n, COST_PER_CALL_USD), close=t.close)
    raise ValueError(f"unknown LangChain configuration {kind!r}")


def _li_prompts(unique: int) -> Callable[[Callable[[str], Any]], Callable[[], Any]]:
    """How a LlamaIndex configuration calls ``complete``: ``LI_PROMPT`` every call, or (``unique``: how many calls
    at most) a prompt of its own every call, drawn from a list built now."""
    if not unique:
        return lambda complete: partial(complete, LI_PROMPT)

    def each_its_own(complete: Callable[[str], Any]) -> Callable[[], Any]:
        prompts = iter([f"{LI_PROMPT} (#{i})" for i in range(unique)])
        return lambda: complete(next(prompts))

    return each_its_own


def llamaindex_setup(kind: str, db_dir: str, export_delay: float, unique: int = 0) -> Setup:
    """``unique``: 0 for the same prompt every call, else a prompt of its own for each of up to ``unique`` calls."""
    import llama_index.core
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
    from llama_index.core.llms import MockLLM
    from llama_index.core.settings import Settings

    if llama_index.core.global_handler is not None:
        raise RuntimeError(f"a LlamaIndex global handler is set ({llama_index.core.global_handler!r})")
    Settings._callback_manager = None  # CallbackManager([]) would take the handlers of the one in Settings
    with_prompt = _li_prompts(unique)

    if kind == "none":
        llm = MockLLM(callback_manager=CallbackManager([]))

        def clean_none() -> None:
            if llm.callback_manager.handlers:
                raise AssertionError(f"the 'none' MockLLM has handlers: {llm.callback_manager.handlers!r}")

        clean_none()
        return Setup(with_prompt(llm.complete), lambda n: {"ok": True, "calls": n}, assert_clean=clean_none)
    if kind == "tokencount":
        counter = TokenCountingHandler()
        llm = MockLLM(callback_manager=CallbackManager([counter]))

        def clean_tc() -> None:
            hs = llm.callback_manager.handlers
            if len(hs) != 1 or hs[0] is not counter:
                raise AssertionError(f"the TokenCountingHandler MockLLM has handlers {hs!r}")

        def check_tc(n: int) -> dict[str, Any]:
            return {"ok": len(counter.llm_token_counts) == n and counter.total_llm_token_count > 0, "calls": n,
                    "events": len(counter.llm_token_counts), "tokens": counter.total_llm_token_count}

        clean_tc()
        return Setup(with_prompt(llm.complete), check_tc, assert_clean=clean_tc)
    if kind in ("ours", "ours_scoped", "ours_run_each"):
        from costobs_callbacks import LoopPolicy

        t = _tracker(db_dir, kind, LI_PRICES, export_delay)
        t.instrument_llamaindex()
        llm = MockLLM()
        scopes: list[Any] = []

        def close() -> None:
            t.uninstrument_llamaindex()
            t.close()

        def enter() -> None:
            # the same prompt every call would be refused by the loop guard by the third: off then
            loops = LoopPolicy(max_steps=None) if unique else LoopPolicy(enabled=False)
            scope = t.run(**META, loops=loops)
            scope.__enter__()
            scopes.append(scope)

        def leave() -> None:
            scopes.pop().__exit__(None, None, None)

        call = with_prompt(llm.complete)
        if kind == "ours_run_each":
            complete = call

            def call() -> Any:
                with t.run(**META):
                    return complete()
        hooks = {"enter": enter, "leave": leave} if kind == "ours_scoped" else {}

        def after() -> None:
            # the timed rounds: the exporter's work for this batch (its writes, the token counts left for later)
            # done here, untimed, not on the next configuration's batch
            t.uninstrument_llamaindex()
            t.flush()
        return Setup(call, lambda n: _stored(t, n, None), close=close,
                     before=t.instrument_llamaindex, after=after, **hooks)
    raise ValueError(f"unknown LlamaIndex configuration {kind!r}")


SETUPS = {"langchain": (LANGCHAIN, langchain_setup), "llamaindex": (LLAMAINDEX, llamaindex_setup)}


# -- the child: one configuration under callgrind ----------------------------------------------------


def child(spec: str, calls: int, warmup: int, freeze: bool = True, unique: bool = False) -> int:
    """Run under callgrind: warm up, then three markers around N calls and 0 calls; print the check."""
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)
    framework, kind = spec.split(":", 1)
    mark = os.getppid
    with tempfile.TemporaryDirectory(prefix="costobs-cg-") as d:
        s = (llamaindex_setup(kind, d, 3600.0, warmup + calls) if unique and framework == "llamaindex"
             else SETUPS[framework][1](kind, d, 3600.0))
        try:
            s.enter()
            for _ in range(warmup):
                s.call()
            s.leave()
            s.assert_clean()
            s.check(warmup)  # flushes ours: the counted segments start with an empty queue
            call, enter, leave = s.call, s.enter, s.leave
            gc.collect()
            if freeze:
                gc.freeze()
            mark()
            enter()
            for _ in range(calls):
                call()
            leave()
            mark()
            enter()
            for _ in range(0):
                call()
            leave()
            mark()
            gc.unfreeze()
            s.assert_clean()
            result = s.check(warmup + calls)
        finally:
            s.close()
    print("CHILD-RESULT " + json.dumps(result, default=str), flush=True)
    return 0 if result.get("ok") else 1


def _totals(path: Path) -> int:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def count(spec: str, calls: int, warmup: int, freeze: bool = True, unique: bool = False) -> dict[str, Any]:
    """Run one configuration under callgrind and return its instructions per call (and its check)."""
    with tempfile.TemporaryDirectory(prefix="costobs-cgout-") as d:
        out = Path(d) / "cg.out"
        cmd = [VALGRIND, "--tool=callgrind", "--separate-threads=yes", f"--dump-before={MARKER_SYMBOL}",
               "--dump-instr=no", "--compress-strings=no", f"--callgrind-out-file={out}",
               sys.executable, "-m", "bench.instructions", "--child", spec, "--calls", str(calls),
               "--warmup", str(warmup), *([] if freeze else ["--no-gc-freeze"]),
               *(["--unique-prompts"] if unique else [])]
        env = dict(os.environ, PYTHONHASHSEED=HASH_SEED)
        for k in ("LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING", "LANGSMITH_TRACING", "LANGSMITH_TRACING_V2"):
            env[k] = "false"
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
        secs = time.perf_counter() - t0
        check: dict[str, Any] = {"ok": False}
        for line in p.stdout.splitlines():
            if line.startswith("CHILD-RESULT "):
                check = json.loads(line.removeprefix("CHILD-RESULT "))
        if p.returncode != 0 and check.get("ok"):
            check = {"ok": False, "exit": p.returncode}
        if p.returncode != 0:
            tail = "\n".join((p.stdout + p.stderr).splitlines()[-15:])
            raise RuntimeError(f"{spec}: exit {p.returncode}\n{tail}")
        main_thread = sorted(Path(d).glob("cg.out.*-01"), key=lambda q: int(q.name.split(".")[-1].split("-")[0]))
        if len(main_thread) != 3:
            raise RuntimeError(f"{spec}: expected 3 callgrind dumps of the main thread at {MARKER_SYMBOL}, "
                               f"got {len(main_thread)} ({[q.name for q in main_thread]})")
        seg = [_totals(q) for q in main_thread]
    return {"per_call": (seg[1] - seg[2]) / calls, "segments": seg, "calls": calls, "warmup": warmup,
            "check": check, "seconds": secs}


# -- the parent ---------------------------------------------------------------------------------------


def ratio(x: float, a: float, b: float) -> float:
    """``(x - b) / (b - a)``: what handler ``x`` adds over a no-op handler, in units of LangChain's
    dispatch of a no-op handler."""
    return (x - b) / (b - a)


def run_counts(frameworks: list[str], calls: int, warmup: int, jobs: int,
               freeze: bool = True, unique: bool = False) -> dict[str, dict[str, Any]]:
    specs = [f"{fw}:{k}" for fw in frameworks for k in SETUPS[fw][0]]
    print(f"# callgrind: {len(specs)} processes, {jobs} at a time, N = {calls} and 0 calls after {warmup} "
          "warm-up calls ...", flush=True)
    out: dict[str, dict[str, Any]] = {fw: {} for fw in frameworks}
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        futures = {s: ex.submit(count, s, calls, warmup, freeze, unique) for s in specs}
        for s, fut in futures.items():
            fw, k = s.split(":", 1)
            out[fw][k] = fut.result()
            print(f"  {s}: {out[fw][k]['per_call']:,.0f} instructions/call ({out[fw][k]['seconds']:.0f}s)",
                  flush=True)
    return out


def timed_llamaindex(rounds: int, batch: int, warmup: int, unique: bool = False) -> dict[str, Any]:
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="costobs-li-timed-") as d:
        n = warmup + rounds * batch if unique else 0
        setups = {k: llamaindex_setup(k, d, 0.5, n) for k in TIMED}
        try:
            calls = {k: s.call for k, s in setups.items()}
            before: dict[str, Callable[[], Any]] = {}
            after: dict[str, Callable[[], Any]] = {}
            for s in setups.values():
                if s.after is not None:
                    s.after()  # instrumentation on only around its own batches
            for k, s in setups.items():
                before[k] = _chain(s.before or s.assert_clean, s.enter)
                after[k] = _chain(s.leave, s.after or _nothing)
            for k in TIMED:
                before[k]()
                for _ in range(warmup):
                    calls[k]()
                after[k]()
            gc.collect()
            gc.freeze()
            t0 = time.perf_counter()
            cpu, wall = interleave(calls, rounds=rounds, batch=batch, before=before, after=after)
            secs = time.perf_counter() - t0
            gc.unfreeze()
            checks = {k: s.check(warmup + rounds * batch) for k, s in setups.items()}
        finally:
            for s in setups.values():
                s.close()
    res: dict[str, Any] = {"rounds": rounds, "batch": batch, "warmup": warmup, "seconds": secs, "checks": checks,
                           "configs": {}}
    for k in TIMED:
        row: dict[str, Any] = {"label": LLAMAINDEX[k], "cpu_us": summarize(cpu[k]), "wall_us": summarize(wall[k])}
        if k != "none":
            row["over_none_us"] = paired_overhead(cpu, k, "none")
        if k.startswith("ours"):
            row["minus_tokencount_us"] = paired_overhead(cpu, k, "tokencount")
        res["configs"][k] = row
    return res


def _nothing() -> None:
    return None


def _chain(first: Callable[[], Any], second: Callable[[], Any]) -> Callable[[], None]:
    def both() -> None:
        first()
        second()

    return both


def report(counts: dict[str, dict[str, Any]], timed: dict[str, Any] | None) -> list[dict[str, Any]]:
    summary: list[dict[str, Any]] = []
    lc = counts.get("langchain")
    if lc:
        a, b = lc["none"]["per_call"], lc["noop"]["per_call"]
        print("\n## LangChain: model.invoke, calling-thread instructions per call (callgrind)\n")
        rows = []
        for k, label in LANGCHAIN.items():
            x = lc[k]["per_call"]
            rows.append([label, fmt(x, 0), "-" if k == "none" else fmt(x - a, 0),
                         "-" if k in ("none", "noop") else fmt(x - b, 0),
                         "-" if k in ("none", "noop") else f"{ratio(x, a, b):.2f}x"])
        print(table(["config", "instructions/call", "over (a)", "over (b)", "(x - b) / (b - a)"], rows))
        summary += [
            metric("LangChain call, no handler (instructions)", a, "instr"),
            metric("+ dispatch of one no-op handler (b - a)", b - a, "instr"),
            metric("UsageMetadataCallbackHandler: (c - b) / (b - a)", ratio(lc["usage"]["per_call"], a, b), "x"),
        ]
        r = ratio(lc["ours"]["per_call"], a, b)
        summary.append(metric("costobs handler: (d - b) / (b - a)", r, "x", f"<= {RATIO_TARGET}x", r <= RATIO_TARGET,
                              note="calling-thread instructions per chat-model call"))
    li = counts.get("llamaindex")
    if li:
        n0 = li["none"]["per_call"]
        tc = li["tokencount"]["per_call"]
        print("\n## LlamaIndex: MockLLM.complete, calling-thread instructions per call (callgrind)\n")
        rows = []
        for k, label in LLAMAINDEX.items():
            x = li[k]["per_call"]
            rows.append([label, fmt(x, 0), "-" if k == "none" else fmt(x - n0, 0),
                         "-" if k in ("none", "tokencount") else f"{(x - n0) / (tc - n0):.2f}"])
        print(table(["config", "instructions/call", "over nothing", "over nothing, / TokenCountingHandler's"], rows))
        s = li["ours_scoped"]["per_call"] - n0
        summary.append(metric("LlamaIndex complete: TokenCountingHandler over nothing (instructions)", tc - n0,
                              "instr"))
        summary.append(metric("LlamaIndex complete: costobs in an open tracker.run() over nothing (instructions)", s,
                              "instr", "below TokenCountingHandler", s < tc - n0))
        summary.append(metric("LlamaIndex complete: costobs, a tracker.run() per call, over nothing (instructions)",
                              li["ours_run_each"]["per_call"] - n0, "instr", note="the run's cost included"))
        summary.append(metric("LlamaIndex complete: costobs, no scope, over nothing (instructions)",
                              li["ours"]["per_call"] - n0, "instr"))
    if timed:
        c = timed["configs"]
        print(f"\n## LlamaIndex: MockLLM.complete, calling-thread CPU time, {timed['rounds']} rounds x "
              f"{timed['batch']} calls interleaved ({timed['seconds']:.0f}s)\n")
        rows = []
        for k in TIMED:
            row = c[k]
            o = row.get("over_none_us")
            rows.append([row["label"], fmt(row["cpu_us"]["median"]),
                         f"{fmt(row['cpu_us']['p10'])} / {fmt(row['cpu_us']['p90'])}",
                         f"{fmt(o['median'])} ({fmt(o['p10'])}..{fmt(o['p90'])})" if o else "-",
                         fmt(row["wall_us"]["median"])])
        print(table(["config", "CPU us/call (median)", "p10 / p90", "over nothing (p10..p90)", "wall us/call"], rows))
        d = c["ours_scoped"]["minus_tokencount_us"]
        print()
        for k in ("ours_scoped", "ours_run_each", "ours"):
            m = c[k]["minus_tokencount_us"]
            print(f"{LLAMAINDEX[k]} minus TokenCountingHandler, paired per round: {fmt(m['median'])} us "
                  f"({fmt(m['p10'])}..{fmt(m['p90'])})")
        summary.append(metric("LlamaIndex complete: TokenCountingHandler over nothing (CPU)",
                              c["tokencount"]["over_none_us"]["median"], "us"))
        ov = c["ours_scoped"]["over_none_us"]["median"]
        summary.append(metric("LlamaIndex complete: costobs in an open tracker.run() over nothing (CPU)", ov, "us",
                              "below TokenCountingHandler", d["median"] < 0))
        summary.append(metric("LlamaIndex complete: costobs, a tracker.run() per call, over nothing (CPU)",
                              c["ours_run_each"]["over_none_us"]["median"], "us", note="the run's cost included"))
        summary.append(metric("LlamaIndex complete: costobs, no scope, over nothing (CPU)",
                              c["ours"]["over_none_us"]["median"], "us"))
    checks = {f"{fw}:{k}": v["check"] for fw, cs in counts.items() for k, v in cs.items()}
    if timed:
        checks.update({f"timed:{k}": v for k, v in timed["checks"].items()})
    bad = {k: v for k, v in checks.items() if not v.get("ok")}
    for k, v in bad.items():
        print(f"\nWARNING: {k} did not account for every call: {v}")
    summary.append(metric("every call accounted for", None, "", "yes", not bad))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=400, help="N, the calls counted (against 0 calls)")
    ap.add_argument("--warmup", type=int, default=100, help="calls made before counting")
    ap.add_argument("--jobs", type=int, default=2, help="callgrind processes at a time")
    ap.add_argument("--only", choices=["langchain", "llamaindex"], help="count one framework only")
    ap.add_argument("--no-count", action="store_true", help="skip callgrind (only the timed LlamaIndex rounds)")
    ap.add_argument("--no-timed", action="store_true", help="skip the timed LlamaIndex rounds")
    ap.add_argument("--rounds", type=int, default=150, help="timed rounds (LlamaIndex)")
    ap.add_argument("--batch", type=int, default=50, help="calls per configuration per timed round")
    ap.add_argument("--timed-warmup", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="fewer calls and rounds: a smoke test")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="count without gc.freeze(): full collections then walk the whole import-time heap")
    ap.add_argument("--unique-prompts", action="store_true",
                    help="LlamaIndex: a prompt of its own every call (no token count can be remembered)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.calls, args.warmup, not args.no_gc_freeze, args.unique_prompts)
    if args.quick:
        args.calls, args.warmup, args.rounds, args.batch, args.timed_warmup = 100, 30, 30, 30, 50
    if args.calls < 1:
        ap.error("--calls must be at least 1")

    frameworks = [args.only] if args.only else list(SETUPS)
    try:
        import llama_index.core  # noqa: F401
    except ImportError:
        frameworks = [f for f in frameworks if f != "llamaindex"]
        args.no_timed = True
        print("# llama-index-core is not installed: LlamaIndex skipped")
    notes: list[str] = []
    counts: dict[str, dict[str, Any]] = {}
    if not args.no_count:
        if shutil.which(VALGRIND) is None:
            notes.append(f"{VALGRIND} not found: instructions not counted")
            print(f"# {notes[-1]}")
        else:
            counts = run_counts(frameworks, args.calls, args.warmup, max(1, args.jobs), not args.no_gc_freeze,
                                args.unique_prompts)
    timed = None
    if not args.no_timed:
        print(f"# timed LlamaIndex rounds ({args.rounds} x {args.batch}) ...", flush=True)
        timed = timed_llamaindex(args.rounds, args.batch, args.timed_warmup, args.unique_prompts)

    summary = report(counts, timed)
    print()
    print_summary(summary)
    for n in notes:
        print(f"note: {n}")
    path = write_results(
        NAME,
        {"calls": args.calls, "warmup": args.warmup, "hash_seed": HASH_SEED, "marker": MARKER_SYMBOL,
         "gc_freeze": not args.no_gc_freeze, "unique_prompts": args.unique_prompts, "rounds": args.rounds,
         "batch": args.batch,
         "timed_warmup": args.timed_warmup, "metadata": META,
         "valgrind": _valgrind_version()},
        {"counts": counts, "timed": timed, "notes": notes},
        summary,
    )
    print(f"\nresults: {path}")
    return 0 if all(m["ok"] is not False for m in summary if m["metric"] == "every call accounted for") else 1


def _valgrind_version() -> str | None:
    try:
        return subprocess.run([VALGRIND, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
