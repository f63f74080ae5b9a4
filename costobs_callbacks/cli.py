"""The ``costobs`` command: an offline demo and read-only cost reports over a store.

    costobs demo                       simulated multi-feature, multi-tenant workload + report
    costobs report --by feature model  rollup of a database (``--bucket hour``, ``--since 24h``)
    costobs run RUN_ID                 one run's cost and its spans
    costobs price MODEL [--provider]   how a model is priced (catalog or override), per million tokens
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["main"]


def _since(value: str | None) -> datetime | None:
    if not value:
        return None
    units = {"m": 60, "h": 3600, "d": 86400}
    if value[-1] in units and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    return datetime.fromisoformat(value)


def _tracker(args: argparse.Namespace, **kw: Any) -> Any:
    from ._tracker import CostTracker

    return CostTracker(args.database_url, prices=getattr(args, "prices", None), **kw)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    url = args.database_url
    tmpdir = None
    if url is None:
        tmpdir = tempfile.mkdtemp(prefix="costobs-demo-")
        url = f"sqlite:///{os.path.join(tmpdir, 'costobs-demo.db')}"
    from ._tracker import CostTracker

    with CostTracker(url, tool_prices={"search_kb": "0.001"}, user_salt="demo-salt") as tracker:
        print(f"costobs demo: {args.runs} simulated agent runs -> {url}")
        run_demo(tracker, runs=args.runs, seed=args.seed)
        stats = tracker.stats
        print(f"exporter: {stats['exported']} records written, {stats['dropped']} dropped, "
              f"{stats['failed']} failed; handler internal errors: {stats['internal_errors']}")
    print(f"\nExplore it: costobs report --database-url {url} --by tenant_id model")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ._demo import _table

    with _tracker(args, user_salt="read-only") as tracker:
        where = dict(w.split("=", 1) for w in args.where or [])
        rows = tracker.rollup(by=args.by, since=_since(args.since), bucket=args.bucket, where=where or None)
        if args.json:
            print(json.dumps([_row_json(r) for r in rows], indent=2))
            return 0
        header = [*args.by, *(["bucket"] if args.bucket else []), "runs", "llm", "tools", "input", "output",
                  "cost_usd", "avg_ms", "max_ms", "unpriced"]
        table = []
        for r in rows:
            table.append([
                *(str(r.key[k]) for k in args.by),
                *([r.bucket_start.isoformat() if r.bucket_start else "-"] if args.bucket else []),
                r.runs, r.llm_calls, r.tool_calls, r.input_tokens, r.output_tokens, f"{r.cost_usd:.6f}",
                f"{r.avg_latency_ms:.1f}" if r.avg_latency_ms is not None else "-",
                f"{r.max_latency_ms:.1f}" if r.max_latency_ms is not None else "-", r.unpriced_calls,
            ])
        _table(print, f"Costs by {', '.join(args.by)}", header, table)
    return 0


def _row_json(r: Any) -> dict[str, Any]:
    return {
        "key": r.key, "bucket_start": r.bucket_start.isoformat() if r.bucket_start else None,
        "cost_usd": str(r.cost_usd), "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
        "cache_read_tokens": r.cache_read_tokens, "cache_write_tokens": r.cache_write_tokens,
        "reasoning_tokens": r.reasoning_tokens, "llm_calls": r.llm_calls, "tool_calls": r.tool_calls,
        "runs": r.runs, "avg_latency_ms": r.avg_latency_ms, "max_latency_ms": r.max_latency_ms,
        "unpriced_calls": r.unpriced_calls,
    }


def _cmd_run(args: argparse.Namespace) -> int:
    with _tracker(args, user_salt="read-only") as tracker:
        rc = tracker.run_cost(args.run_id)
        if rc is None:
            print(f"no run {args.run_id}", file=sys.stderr)
            return 1
        print(f"run {rc.run_id}: {rc.status}{f' ({rc.reason})' if rc.reason else ''} cost ${rc.cost_usd}")
        print(f"  tokens: input {rc.input_tokens} (cached {rc.cache_read_tokens}), output {rc.output_tokens} "
              f"(reasoning {rc.reasoning_tokens}); llm calls {rc.llm_calls}, tool calls {rc.tool_calls}, "
              f"unpriced {rc.unpriced_calls}")
        print(f"  attributes: {rc.attributes}")
        for m, c in rc.by_model.items():
            print(f"  {m}: ${c}")
        if args.spans:
            for s in tracker.spans(args.run_id):
                cost = "unpriced" if s["unpriced"] else f"${(s['cost_nanos'] or 0) / 1e9:.9f}"
                print(f"  - {s['kind']:<9} {s['name'][:40]:<40} {s['status']:<7} {s['latency_ms']:8.1f} ms {cost}")
    return 0


def _cmd_price(args: argparse.Namespace) -> int:
    from ._pricing import PriceBook

    book = PriceBook(args.prices)
    up = book.unit_prices(args.model, args.provider)
    if up is None:
        print(f"{args.model}: no price (unknown to the catalog; add it with prices=...)")
        return 1
    print(f"{args.model}: input ${up.input}/M, output ${up.output}/M, cache read ${up.cache_read}/M, "
          f"cache write ${up.cache_write}/M  [{up.source}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="costobs", description="What your LLM agents cost.")
    p.add_argument("--database-url", default=None,
                   help="SQLAlchemy URL (default: $COSTOBS_DATABASE_URL, else sqlite:///costobs.db)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run an offline simulated agent workload and print its cost report")
    d.add_argument("--runs", type=int, default=200)
    d.add_argument("--seed", type=int, default=7)
    d.set_defaults(fn=_cmd_demo)
    r = sub.add_parser("report", help="costs grouped by attribution keys")
    r.add_argument("--by", nargs="+", default=["feature"])
    r.add_argument("--bucket", choices=["hour", "day"])
    r.add_argument("--since", help="e.g. 24h, 7d, or an ISO timestamp")
    r.add_argument("--where", action="append", help="key=value filter (repeatable)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--prices", default=None, help=argparse.SUPPRESS)
    r.set_defaults(fn=_cmd_report)
    rn = sub.add_parser("run", help="one run's cost")
    rn.add_argument("run_id")
    rn.add_argument("--spans", action="store_true")
    rn.set_defaults(fn=_cmd_run)
    pr = sub.add_parser("price", help="show how a model is priced")
    pr.add_argument("model")
    pr.add_argument("--provider")
    pr.add_argument("--prices", help="a YAML or JSON price file of overrides")
    pr.set_defaults(fn=_cmd_price)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the demo runs with the default database only when asked; everything else reads the given store
    if args.cmd == "demo" and args.database_url is None:
        args.database_url = None
    elif args.database_url is None:
        args.database_url = os.environ.get("COSTOBS_DATABASE_URL")
    try:
        return int(args.fn(args))
    except Exception as exc:  # a clear one-line error for the command line
        from ._exceptions import ConfigurationError

        if isinstance(exc, ConfigurationError):
            print(f"costobs: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
