"""Run every benchmark (each in its own process) and print a Markdown table for the project README.

Each benchmark's full output goes to ``bench/results/<name>.log``, its figures to
``bench/results/<name>.json``; the table is built from those JSON files.

Run: ``python -m bench.run_all [--quick] [--only NAME ...] [--table-only] [--with-profile]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run_all.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO_ROOT, RESULTS_DIR, fmt

BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    # name: (title in the table, extra arguments of --quick)
    "handler_overhead": ("LangChain handler overhead", ["--rounds", "40", "--chain-rounds", "20", "--batch", "50",
                                                      "--warmup", "100"]),
    "llamaindex_overhead": ("LlamaIndex overhead", ["--rounds", "40", "--batch", "30", "--warmup", "50"]),
    "later_counts": ("LlamaIndex token counts left to the exporter", ["--calls", "4000", "--rounds", "2"]),
    "exporter_throughput": ("Exporter into SQLite and PostgreSQL", ["--runs", "5000", "--runs1", "20000",
                                                                    "--no-paced"]),
    "memory": ("Memory", ["--runs", "20000", "--warmup", "2000"]),
    "rollup_latency": ("Rollup latency", ["--spans", "200000", "--reps", "5", "--raw-reps", "2"]),
    "outage_latency": ("App thread while the database is down", ["--rounds", "8", "--batch", "100"]),
    "instructions": ("Instructions (callgrind)", ["--quick"]),
    "exporter_instructions": ("Exporter instructions per span (callgrind)", ["--runs", "1000", "--runs1", "8000"]),
    "caps_overhead": ("Tenant spend caps", ["--rounds", "15", "--batch", "100", "--first-calls", "10"]),
}
PROFILE = ("profile_handler", ("Handler profile", ["--calls", "5000"]))


def run_one(name: str, extra: list[str]) -> tuple[int, float]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log = RESULTS_DIR / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        rc = subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], cwd=REPO_ROOT, stdout=f,
                            stderr=subprocess.STDOUT, check=False).returncode
    return rc, time.perf_counter() - t0


def _value(m: dict[str, Any]) -> str:
    v = m.get("value")
    if v is None:
        return "-"
    unit = m.get("unit") or ""
    digits = 2 if unit == "x" else 0 if unit in ("spans/s", "items", "blocks", "instr") or abs(v) >= 1000 else 1
    return f"{fmt(v, digits)} {unit}".strip()


def markdown(names: list[str]) -> str:
    """The README table (and a line on the machine it was measured on) from the JSON results."""
    env = None
    rows = []
    for name in names:
        path = RESULTS_DIR / f"{name}.json"
        if not path.exists():
            rows.append([_title(name), "(no results: run it first)", "", "", "", ""])
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        env = env or data.get("env")
        for m in data.get("summary", []):
            ok = "" if m.get("ok") is None else ("yes" if m["ok"] else "**no**")
            rows.append([_title(name), m["metric"], _value(m), m.get("target") or "", ok, m.get("note") or ""])
    lines = []
    if env:
        pk = env.get("packages", {})
        lines += [
            f"Measured on {env.get('cpu')} ({env.get('cpus')} CPUs), Python {env.get('python')}, "
            f"langchain-core {pk.get('langchain-core')}, SQLAlchemy {pk.get('sqlalchemy')}, "
            f"llama-index-core {pk.get('llama-index-core')}, commit {env.get('commit')}; "
            "per-call figures are the calling thread's CPU time, or its instructions counted by callgrind "
            "(`python -m bench.run_all`).",
            "",
        ]
    lines.append("| Benchmark | Metric | Result | Target | Met | Note |")
    lines.append("|---|---|---|---|---|---|")
    lines.extend("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
    return "\n".join(lines)


def _title(name: str) -> str:
    if name == PROFILE[0]:
        return PROFILE[1][0]
    return BENCHMARKS.get(name, (name, []))[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (a smoke test; figures are rougher)")
    ap.add_argument("--only", nargs="+", choices=[*BENCHMARKS, PROFILE[0]], help="run only these")
    ap.add_argument("--table-only", action="store_true", help="print the table from existing results")
    ap.add_argument("--with-profile", action="store_true", help="also run profile_handler")
    args = ap.parse_args(argv)

    names = list(args.only or BENCHMARKS)
    if args.with_profile and PROFILE[0] not in names:
        names.append(PROFILE[0])
    failed = []
    if not args.table_only:
        for name in names:
            quick = PROFILE[1][1] if name == PROFILE[0] else BENCHMARKS[name][1]
            print(f"running {name} ...", end=" ", flush=True)
            rc, secs = run_one(name, quick if args.quick else [])
            print(f"{'ok' if rc == 0 else f'exit {rc}'} in {secs:.0f}s (log: bench/results/{name}.log)", flush=True)
            if rc != 0:
                failed.append(name)
        print()
    print(markdown(names))
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see their logs)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
