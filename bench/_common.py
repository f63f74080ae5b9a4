"""Shared pieces of the benchmarks: the fake model, timers, statistics, result files, tables.

Nothing here is timed by itself; every benchmark builds its fixtures from these helpers so that all
configurations of one benchmark pay exactly the same fixed costs.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

MODEL_NAME = "gpt-4o-mini"
PRICES: dict[str, dict[str, str]] = {MODEL_NAME: {"input": "0.15", "output": "0.60", "cache_read": "0.075"}}
"""USD per million tokens, passed as ``prices=`` so the figures do not depend on the catalog version."""
INPUT_TOKENS = 1200
OUTPUT_TOKENS = 300
COST_PER_CALL_USD = (Decimal(INPUT_TOKENS) * Decimal("0.15") + Decimal(OUTPUT_TOKENS) * Decimal("0.60")) / Decimal(
    1_000_000
)
"""What one fake call costs at ``PRICES`` (used to check that the handler priced every call)."""


def quiet_tracing() -> None:
    """Make sure no LangSmith tracer joins the benchmarked calls (it would dwarf what we measure)."""
    for k in ("LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING", "LANGSMITH_TRACING", "LANGSMITH_TRACING_V2"):
        os.environ[k] = "false"


# -- LangChain fixtures ----------------------------------------------------------------------------


def usage_message(content: str = "Hello! How can I help?") -> Any:
    """The reply every fake call returns: usage reported, model named, as a real provider's reply."""
    from langchain_core.messages import AIMessage

    return AIMessage(
        content=content,
        id="bench-reply",  # set, so LangChain does not stamp a run id on the shared message
        usage_metadata={
            "input_tokens": INPUT_TOKENS,
            "output_tokens": OUTPUT_TOKENS,
            "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        },
        response_metadata={"model_name": MODEL_NAME},
    )


def fixed_chat_model() -> Any:
    """A ``GenericFakeChatModel`` whose ``_generate`` returns one prebuilt ``ChatResult``.

    The reply is built once, so building messages is not part of what is measured; LangChain's whole
    ``invoke`` path (config, callback manager, run events, ``LLMResult``) still runs on every call.
    """
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.outputs import ChatGeneration, ChatResult

    result = ChatResult(generations=[ChatGeneration(message=usage_message())])

    class FixedReplyChatModel(GenericFakeChatModel):
        @property
        def _identifying_params(self) -> dict[str, Any]:
            # The requested model in the invocation params, as a provider's chat model has it: a budget's pre-call
            # cost estimate needs to know it (an unnamed model has no price to estimate with).
            return {"model_name": MODEL_NAME}

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
            return result

    return FixedReplyChatModel(messages=iter(()))


def tiny_chain(model: Any) -> Any:
    """``ChatPromptTemplate | model``: a ``RunnableSequence`` with two chain spans around the model."""
    from langchain_core.prompts import ChatPromptTemplate

    prompt = ChatPromptTemplate.from_messages([("system", "You are terse."), ("human", "{q}")])
    return prompt | model


def noop_handler() -> Any:
    """The cheapest handler LangChain can dispatch to.

    ``BaseCallbackHandler.on_chat_model_start`` raises ``NotImplementedError`` and LangChain then falls
    back to ``on_llm_start`` (building string prompts), which costs more than a whole handler; this
    one defines both hooks of a chat call as no-ops.
    """
    from langchain_core.callbacks import BaseCallbackHandler

    class NoopHandler(BaseCallbackHandler):
        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            return None

        def on_llm_end(self, *args: Any, **kwargs: Any) -> None:
            return None

    return NoopHandler()


# -- timers -----------------------------------------------------------------------------------------


def thread_cpu_ns(thread: threading.Thread | None) -> int | None:
    """CPU time consumed so far by another (live) thread, or ``None`` where the OS cannot tell."""
    if thread is None or thread.ident is None or not thread.is_alive():
        return None
    try:
        clk = time.pthread_getcpuclockid(thread.ident)
        return time.clock_gettime_ns(clk)
    except (AttributeError, OSError):
        return None


def exporter_thread(tracker: Any) -> threading.Thread | None:
    """The background writer thread of a tracker (a private attribute; ``None`` if it moved)."""
    exp = getattr(tracker, "exporter", None)
    t = getattr(exp, "_worker", None)
    return t if isinstance(t, threading.Thread) else None


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


# -- statistics -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": percentile(values, 50),
        "p10": percentile(values, 10),
        "p90": percentile(values, 90),
        "min": float(min(values)) if values else math.nan,
        "n": float(len(values)),
    }


# -- reporting --------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def env_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "commit": _git_commit(),
        "packages": {
            d: _version(d)
            for d in (
                "costobs-callbacks", "langchain-core", "sqlalchemy", "llama-index-core", "tiktoken", "langfuse",
            )
        },
    }


def metric(name: str, value: float | None, unit: str, target: str | None = None, ok: bool | None = None,
           note: str | None = None) -> dict[str, Any]:
    """One line of a benchmark's summary (what ``run_all.py`` puts in the README table)."""
    return {"metric": name, "value": value, "unit": unit, "target": target, "ok": ok, "note": note}


def write_results(name: str, params: dict[str, Any], results: dict[str, Any],
                  summary: list[dict[str, Any]]) -> Path:
    """Write ``bench/results/<name>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "env": env_info(),
        "params": params,
        "summary": summary,
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def fmt(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    body = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(cells)) + " |"

    out = [line(list(headers)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def print_summary(summary: list[dict[str, Any]]) -> None:
    rows = []
    for m in summary:
        ok = "" if m["ok"] is None else ("yes" if m["ok"] else "NO")
        digits = 2 if m["unit"] == "x" else 0 if m["unit"] == "instr" else 1
        rows.append([m["metric"], fmt(m["value"], digits) + (f" {m['unit']}" if m["value"] is not None else ""),
                     m["target"] or "", ok, m.get("note") or ""])
    print(table(["metric", "value", "target", "met", "note"], rows))


def timed_batch(call: Callable[[], Any], n: int) -> tuple[float, float]:
    """Mean thread-CPU and wall microseconds per call over ``n`` calls of ``call``."""
    c0 = time.thread_time_ns()
    w0 = time.perf_counter_ns()
    for _ in range(n):
        call()
    w1 = time.perf_counter_ns()
    c1 = time.thread_time_ns()
    return (c1 - c0) / n / 1000.0, (w1 - w0) / n / 1000.0


INTERLEAVE_SEED = 20261204
"""The seed of ``interleave``'s orders."""


def interleave(
    calls: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    batch: int,
    before: dict[str, Callable[[], Any]] | None = None,
    after: dict[str, Callable[[], Any]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each round runs one batch of every configuration, in an order shuffled afresh each round (seeded: the
    same orders on every run). ``before`` / ``after`` hooks of a configuration run around its batch, untimed.
    Returns the per-round mean CPU and wall microseconds per call of each configuration.

    Shuffled, not rotated: rotating the order by one each round has every configuration run right after the
    same predecessor (the one before it in the list, cyclically), whose leftovers in the CPU's caches and the
    allocator then weigh on it alike every round: two configurations running the same code measured 4-9 µs
    apart that way, 0.65 µs apart shuffled."""
    keys = list(calls)
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    wall: dict[str, list[float]] = {k: [] for k in keys}
    before = before or {}
    after = after or {}
    order = random.Random(INTERLEAVE_SEED)
    for _ in range(rounds):
        turn = keys[:]
        order.shuffle(turn)
        for k in turn:
            if k in before:
                before[k]()
            c, w = timed_batch(calls[k], batch)
            if k in after:
                after[k]()
            cpu[k].append(c)
            wall[k].append(w)
    return cpu, wall


def paired_overhead(cpu: dict[str, list[float]], key: str, base: str) -> dict[str, float]:
    """Summary of ``key``'s per-round CPU minus ``base``'s in the same round."""
    return summarize([x - y for x, y in zip(cpu[key], cpu[base], strict=True)])
