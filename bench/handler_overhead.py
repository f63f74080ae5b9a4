"""Handler overhead per LangChain chat-model call, every configuration interleaved in one run.

Configurations (each gets its own handler instance; all use the same model, prompt and metadata):

  none          (a) no handler
  noop          (b) a no-op handler (on_chat_model_start and on_llm_end defined as no-ops)
  usage         (c) langchain-core's UsageMetadataCallbackHandler
  ours          (d) CostTracker(...).langchain_handler(): default loop guard on, priced model, exporter on
  ours_budget   (e) as (d), with a tracker-wide Budget(max_cost_usd, max_llm_calls)
  ours_runbudget(e') as (d), with the Budget passed per run in metadata (what tracker.config(budget=) does)
  langfuse      (f) Langfuse's CallbackHandler, only when ``langfuse`` is importable (see README)

The measure is the calling thread's CPU time (``time.thread_time_ns``): what the application's thread
pays, steadier than wall time. Each round runs one batch of every configuration (in an order
shuffled every round), so drift hits all of them equally; the figures are the median (p10, p90) over rounds of
the batch means, and the overhead of a configuration is the median of its per-round difference to (a)
or (b). A second section does the same with the model inside ``ChatPromptTemplate | model`` (so two
chain spans per call are included).

Run: ``python -m bench.handler_overhead [--rounds N] [--batch N]`` from the repository root.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/handler_overhead.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    COST_PER_CALL_USD,
    PRICES,
    exporter_thread,
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
    thread_cpu_ns,
    tiny_chain,
    write_results,
)

NAME = "handler_overhead"
TARGET_OVER_NOOP_US = 25.0
LANGFUSE_REFERENCE_US = 480.0
META = {"feature": "bench", "user_id": "user-42", "tenant_id": "acme"}

LABELS = {
    "none": "(a) no handler",
    "noop": "(b) no-op handler",
    "usage": "(c) UsageMetadataCallbackHandler",
    "ours": "(d) costobs handler",
    "ours_budget": "(e) costobs + Budget (tracker-wide)",
    "ours_runbudget": "(e') costobs + Budget (per run, metadata)",
    "langfuse": "(f) Langfuse CallbackHandler",
}


class Config:
    """One configuration: its callbacks and metadata, and (for ours) the tracker behind them."""

    def __init__(self, key: str, callbacks: list[Any], meta: dict[str, Any], tracker: Any = None) -> None:
        self.key = key
        self.callbacks = callbacks
        self.meta = meta
        self.tracker = tracker
        self.calls = 0

    def runnable_config(self) -> dict[str, Any]:
        return {"callbacks": self.callbacks, "metadata": self.meta}


def _langfuse_handler() -> tuple[Any, str | None]:
    """Langfuse's LangChain handler pointed at a closed local port (its exports fail in the background)."""
    try:
        from langfuse import Langfuse
        from langfuse.langchain import CallbackHandler
    except ImportError as exc:
        return None, (f"langfuse not importable ({exc.name or exc}); "
                      f"reference figure from the issue: ~{LANGFUSE_REFERENCE_US:.0f} us")
    os.environ.setdefault("LANGFUSE_PUBLIC_KEY", "pk-lf-bench")
    os.environ.setdefault("LANGFUSE_SECRET_KEY", "sk-lf-bench")
    os.environ.setdefault("LANGFUSE_HOST", "http://127.0.0.1:9")
    for name in ("langfuse", "opentelemetry", "urllib3", "httpx", "backoff"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    Langfuse(public_key=os.environ["LANGFUSE_PUBLIC_KEY"], secret_key=os.environ["LANGFUSE_SECRET_KEY"],
             host=os.environ["LANGFUSE_HOST"])
    return CallbackHandler(), None


def build_configs(db_dir: str, with_langfuse: bool) -> tuple[list[Config], list[str]]:
    from langchain_core.callbacks import UsageMetadataCallbackHandler

    from costobs_callbacks import Budget, CostTracker

    notes: list[str] = []
    t_ours = CostTracker(f"sqlite:///{db_dir}/ours.db", prices=PRICES, user_salt="bench-salt")
    t_budget = CostTracker(f"sqlite:///{db_dir}/budget.db", prices=PRICES, user_salt="bench-salt",
                           budget=Budget(max_cost_usd=Decimal("5"), max_llm_calls=100))
    t_run = CostTracker(f"sqlite:///{db_dir}/runbudget.db", prices=PRICES, user_salt="bench-salt")
    run_meta = t_run.config(budget={"max_cost_usd": 5, "max_llm_calls": 100}, **_attr_kwargs())["metadata"]
    configs = [
        Config("none", [], dict(META)),
        Config("noop", [noop_handler()], dict(META)),
        Config("usage", [UsageMetadataCallbackHandler()], dict(META)),
        Config("ours", [t_ours.langchain_handler()], dict(META), t_ours),
        Config("ours_budget", [t_budget.langchain_handler()], dict(META), t_budget),
        Config("ours_runbudget", [t_run.langchain_handler()], run_meta, t_run),
    ]
    if with_langfuse:
        h, why = _langfuse_handler()
        if h is not None:
            configs.append(Config("langfuse", [h], dict(META)))
        else:
            notes.append(f"(f) skipped: {why}")
    return configs, notes


def _attr_kwargs() -> dict[str, Any]:
    return {"feature": META["feature"], "user_id": META["user_id"], "tenant_id": META["tenant_id"]}


def run_section(title: str, make_call: Callable[[Config], Callable[[], Any]], configs: list[Config], *,
                rounds: int, batch: int, warmup: int) -> dict[str, Any]:
    calls = {c.key: make_call(c) for c in configs}
    for c in configs:  # warm every path: imports, price cache, tokenizer, exporter thread, DB schema
        for _ in range(warmup):
            calls[c.key]()
        c.calls += warmup
    for c in configs:
        if c.tracker is not None:
            c.tracker.flush()
    bg0 = {c.key: thread_cpu_ns(exporter_thread(c.tracker)) for c in configs if c.tracker is not None}
    gc.collect()
    t_start = time.perf_counter()
    cpu, wall = interleave(calls, rounds=rounds, batch=batch)
    elapsed = time.perf_counter() - t_start
    for c in configs:
        c.calls += rounds * batch
    background: dict[str, float | None] = {}
    for c in configs:
        if c.tracker is not None:
            c.tracker.flush()
            b1 = thread_cpu_ns(exporter_thread(c.tracker))
            b0 = bg0.get(c.key)
            background[c.key] = (b1 - b0) / (rounds * batch) / 1000.0 if b0 is not None and b1 is not None else None
    out: dict[str, Any] = {"title": title, "rounds": rounds, "batch": batch, "seconds": elapsed, "configs": {}}
    for c in configs:
        row: dict[str, Any] = {
            "label": LABELS[c.key],
            "cpu_us": summarize(cpu[c.key]),
            "wall_us": summarize(wall[c.key]),
            "cpu_us_rounds": cpu[c.key],
        }
        for base in ("none", "noop"):
            if base in cpu and base != c.key:
                row[f"over_{base}_us"] = paired_overhead(cpu, c.key, base)
        if c.key in background:
            row["exporter_thread_cpu_us"] = background[c.key]
        out["configs"][c.key] = row
    return out


def print_section(sec: dict[str, Any]) -> None:
    print(f"\n## {sec['title']}  ({sec['rounds']} rounds x {sec['batch']} calls, {sec['seconds']:.1f}s)\n")
    rows = []
    for row in sec["configs"].values():
        cpu = row["cpu_us"]
        o_a = row.get("over_none_us")
        o_b = row.get("over_noop_us")
        rows.append([
            row["label"],
            fmt(cpu["median"]),
            f"{fmt(cpu['p10'])} / {fmt(cpu['p90'])}",
            fmt(o_a["median"]) if o_a else "-",
            f"{fmt(o_b['median'])} ({fmt(o_b['p10'])}..{fmt(o_b['p90'])})" if o_b else "-",
            fmt(row["wall_us"]["median"]),
            fmt(row.get("exporter_thread_cpu_us")),
        ])
    print(table(["config", "CPU us/call", "p10 / p90", "over (a)", "over (b) (p10..p90)", "wall us/call",
                 "exporter thread CPU us/call"], rows))


def verify(configs: list[Config]) -> dict[str, Any]:
    """Check that our handlers priced and stored every call (a benchmark of a broken handler is void)."""
    out: dict[str, Any] = {}
    for c in configs:
        if c.tracker is None:
            continue
        t = c.tracker
        t.flush()
        rows = t.rollup("feature")
        llm_calls = sum(r.llm_calls for r in rows)
        cost = sum((r.cost_usd for r in rows), Decimal(0))
        stats = t.stats
        ok = (llm_calls == c.calls and cost == COST_PER_CALL_USD * c.calls and stats["dropped"] == 0
              and stats["failed"] == 0 and stats["internal_errors"] == 0)
        out[c.key] = {"ok": ok, "calls": c.calls, "stored_llm_calls": llm_calls, "stored_cost_usd": str(cost),
                      "expected_cost_usd": str(COST_PER_CALL_USD * c.calls), "stats": stats}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=150, help="rounds; each runs one batch of every config")
    ap.add_argument("--batch", type=int, default=50, help="calls per batch")
    ap.add_argument("--warmup", type=int, default=300, help="untimed calls per config first")
    ap.add_argument("--chain-rounds", type=int, default=60, help="rounds of the prompt | model section")
    ap.add_argument("--no-chain", action="store_true", help="skip the prompt | model section")
    ap.add_argument("--no-langfuse", action="store_true", help="skip (f) even when langfuse is importable")
    ap.add_argument("--prompt-chars", type=int, default=0,
                    help="send a prompt of this many characters instead of 'hi' (the budget check counts its tokens)")
    args = ap.parse_args(argv)
    quiet_tracing()
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)

    prompt = "hi" if args.prompt_chars <= 0 else ("lorem ipsum dolor sit amet " * (args.prompt_chars // 27 + 1))[
        : args.prompt_chars]
    model = fixed_chat_model()
    chain = tiny_chain(model)
    with tempfile.TemporaryDirectory(prefix="costobs-bench-") as db_dir:
        configs, notes = build_configs(db_dir, with_langfuse=not args.no_langfuse)
        gc.collect()
        gc.freeze()  # keep the import-time heap out of full collections: less noise, same for every config
        sections = [run_section(
            "Direct: model.invoke(prompt, config)",
            lambda c: partial(model.invoke, prompt, config=c.runnable_config()),
            configs, rounds=args.rounds, batch=args.batch, warmup=args.warmup,
        )]
        if not args.no_chain:
            sections.append(run_section(
                "Chain: (ChatPromptTemplate | model).invoke({'q': prompt}, config)",
                lambda c: partial(chain.invoke, {"q": prompt}, config=c.runnable_config()),
                configs, rounds=args.chain_rounds, batch=args.batch, warmup=args.warmup // 2,
            ))
        checks = verify(configs)
        for c in configs:
            if c.tracker is not None:
                c.tracker.close()
    gc.unfreeze()

    print(f"# {NAME}: per-call thread CPU time of the calling thread, configs interleaved round-robin")
    for sec in sections:
        print_section(sec)
    for n in notes:
        print(f"\nnote: {n}")
    for key, v in checks.items():
        if not v["ok"]:
            print(f"\nWARNING: {key} did not store every call as expected: {v}")

    summary = _summary(sections, checks)
    print()
    print_summary(summary)
    path = write_results(
        NAME,
        {"rounds": args.rounds, "chain_rounds": args.chain_rounds, "batch": args.batch, "warmup": args.warmup,
         "prompt_chars": len(prompt),
         "metadata": META},
        {"sections": sections, "verify": checks, "notes": notes},
        summary,
    )
    print(f"\nresults: {path}")
    return 0 if all(v["ok"] for v in checks.values()) else 1


def _summary(sections: list[dict[str, Any]], checks: dict[str, Any]) -> list[dict[str, Any]]:
    d = sections[0]["configs"]
    s: list[dict[str, Any]] = [
        metric("LangChain chat call, no handler (CPU)", d["none"]["cpu_us"]["median"], "us"),
        metric("+ dispatch of one no-op handler", d["noop"]["over_none_us"]["median"], "us"),
        metric("UsageMetadataCallbackHandler over no-op", d["usage"]["over_noop_us"]["median"], "us"),
    ]
    ours = d["ours"]["over_noop_us"]["median"]
    s.append(metric("costobs handler over no-op", ours, "us", f"<= {TARGET_OVER_NOOP_US:g} us",
                    ours <= TARGET_OVER_NOOP_US, note="default loop guard, priced, exporter on"))
    b = d["ours_budget"]["over_noop_us"]["median"]
    # (the target is for the handler as it comes, (d); a budget adds its pre-call cost estimate)
    s.append(metric("costobs + Budget over no-op", b, "us", note="max_cost_usd (pre-call estimate) + max_llm_calls"))
    s.append(metric("costobs + per-run Budget over no-op", d["ours_runbudget"]["over_noop_us"]["median"], "us",
                    note="budget in run metadata"))
    bg = d["ours"].get("exporter_thread_cpu_us")
    if bg is not None:
        s.append(metric("costobs exporter thread CPU per call", bg, "us", note="off the app's thread"))
    if "langfuse" in d:
        s.append(metric("Langfuse handler over no-op", d["langfuse"]["over_noop_us"]["median"], "us"))
    else:
        s.append(metric("Langfuse handler over no-op", None, "us",
                        note=f"not measured here; reference ~{LANGFUSE_REFERENCE_US:g} us"))
    if len(sections) > 1:
        ch = sections[1]["configs"]
        s.append(metric("chain: prompt|model, no handler (CPU)", ch["none"]["cpu_us"]["median"], "us"))
        s.append(metric("chain: costobs handler over no-op", ch["ours"]["over_noop_us"]["median"], "us",
                        note="3 spans per call"))
    s.append(metric("every call priced and stored", None, "", "yes", all(v["ok"] for v in checks.values())))
    return s


if __name__ == "__main__":
    raise SystemExit(main())
