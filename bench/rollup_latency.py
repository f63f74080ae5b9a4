"""Rollup latency: two operator questions over 1,000,000 stored spans, from the hourly rollup table and from the raw
spans, on a SQLite file and on PostgreSQL.

The workload is made by a real tracker's ledger (its exporter swapped for a list, as ``exporter_throughput`` does),
so the spans are exactly what the ledger hands the exporter: agent, RAG, chat, extraction and map-reduce runs of
50 features (popularity falling off as 1/rank), 200 tenants on three plans (tier), about 5,000 users, six priced
models and one fine-tune without a price, priced and free tools, retrievers, 1% failed calls, two prompt versions
and an A/B variant on a few features. The runs are spread over 30 days (fewer at night and at weekends) and the
spans get realistic latencies (the ledger's own clock would give microseconds); they are loaded in time order,
as production writes them, through ``Store.write_batch`` in batches of 4,096 items (the exporter's): the load is
timed (spans/s, rollup upserts included).

Then, for each backend, ``Store.rollup`` answers:

1. **feature by hour for a day**: ``rollup(by=["feature"], bucket="hour", since=<a day>, until=<+24 h>)``;
2. **tenant for the month**: ``rollup(by=["tenant_id"], since=<first hour>, until=<last hour + 1>)``;

from the rollup table (what ``rollup`` picks for whole-hour windows) and from the raw spans (``Store._rollup(...,
table=False)``, the plain GROUP BY the store falls back to), with the same figures checked equal to the last digit.
"cold": each query on a new ``Store`` (a new engine, so a new connection: SQLite's page cache and PostgreSQL's
backend start empty; the operating system's file cache and PostgreSQL's shared buffers stay warm). "warm": the same
store again. Medians and maxima of ``--reps`` repetitions (the raw GROUP BY: ``--raw-reps``).

Run: ``python -m bench.rollup_latency [--spans N] [--backend sqlite postgresql] [--keep DIR] [--explain]``.
PostgreSQL: ``--pg-url`` names the server (default the machine's, ``postgresql+psycopg://postgres@127.0.0.1:5432``);
the benchmark makes a database of its own there and drops it (``--keep`` keeps both databases for a next run,
which then skips the load).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/rollup_latency.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import metric, print_summary, table, write_results

NAME = "rollup_latency"
TARGET_MS = 50.0
DAYS = 30
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
PG_DATABASE = "costobs_rollup_bench"
BATCH_ITEMS = 4096
START = datetime(2026, 10, 1, tzinfo=UTC)
"""The first hour of the 30 days (fixed, so that two runs store the same spans)."""

_AREAS = ("support", "search", "billing", "onboarding", "docs", "sales", "legal", "hr", "analytics", "shop")
_TASKS = ("chat", "agent", "rag", "extract", "summarize")
FEATURES = [f"{a}-{t}" for t in _TASKS for a in _AREAS]
"""50 features; each task has its own run shape (see ``_run``)."""
MODELS: list[tuple[str, str, float]] = [
    ("gpt-4o-mini", "openai", 0.40),
    ("gpt-4o", "openai", 0.15),
    ("claude-sonnet-4-20250514", "anthropic", 0.12),
    ("claude-3-5-haiku-20241022", "anthropic", 0.10),
    ("o3-mini", "openai", 0.08),
    ("gemini-2.0-flash", "google", 0.13),
    ("acme-legal-ft-v2", "acme", 0.02),  # a fine-tune without a price: its calls are stored unpriced
]
TOOL_PRICES = {"web_search": "0.005", "geocode": "0.002"}
TOOLS = ("web_search", "calculator", "lookup_order", "geocode", "send_email")


class Capture:
    """Stands in for the exporter while the workload is made: keeps every item in order."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def emit(self, item: Any) -> None:
        self.items.append(item)


def _zipf(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


class Workload:
    """Runs made by a real ledger, in time order, in chunks of about ``chunk_spans`` spans."""

    def __init__(self, seed: int = 11) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.feature_w = _zipf(len(FEATURES), 1.0)
        self.features = list(FEATURES)  # popularity by rank, the ranks shuffled over the tasks
        rng.shuffle(self.features)
        self.feature_model = {f: rng.choices(MODELS[:-1], [m[2] for m in MODELS[:-1]])[0] for f in FEATURES}
        self.feature_model["legal-extract"] = MODELS[-1]
        self.tenants = [f"tenant-{i:03d}" for i in range(200)]
        self.tenant_w = _zipf(200, 1.1)
        self.tier = {t: "enterprise" if i < 10 else "pro" if i < 60 else "free" for i, t in enumerate(self.tenants)}
        total_w = sum(self.tenant_w)
        self.users = {t: max(3, round(5000 * w / total_w)) for t, w in zip(self.tenants, self.tenant_w, strict=True)}
        self.ab = set(rng.sample(FEATURES, 5))
        hour_w = [0.25 + math.exp(-((h - 14) / 4.0) ** 2) for h in range(24)]  # busiest at 14:00 UTC
        self.hour_w = [w * (0.6 if (START + timedelta(hours=h)).weekday() >= 5 else 1.0)
                       for h in range(DAYS * 24) for w in (hour_w[h % 24],)]

    def run_times(self, n_runs: int) -> list[float]:
        """``n_runs`` start times (epoch seconds) over the 30 days, sorted."""
        rng = self.rng
        base = START.timestamp()
        hours = rng.choices(range(DAYS * 24), self.hour_w, k=n_runs)
        return sorted(base + h * 3600 + rng.random() * 3600 for h in hours)

    def chunks(self, n_spans: int, chunk_spans: int = 50_000) -> Iterator[tuple[list[Any], int]]:
        """(items, spans) chunks until ``n_spans`` spans were made: the ledger's items, times set."""
        from costobs_callbacks import CostTracker
        from costobs_callbacks._ledger import Span

        made = 0
        with tempfile.TemporaryDirectory(prefix="costobs-rl-") as d:
            tracker = CostTracker(f"sqlite:///{d}/wl.db", user_salt="bench-salt", tool_prices=TOOL_PRICES,
                                  loops={"enabled": False})
            led = tracker.ledger
            cap = Capture()
            led.exporter = cap
            try:
                # spans per run, from 3,000 runs made first (and dropped), so that the start times drawn cover
                # the 30 days with the spans asked for
                state = self.rng.getstate()
                for t in range(3000):
                    self._run(led, START.timestamp() + t)
                per_run = sum(1 for it in cap.items if isinstance(it, Span)) / 3000
                self.rng.setstate(state)
                times = self.run_times(round(n_spans / per_run))
                last = times[-1]
                times_it = iter(times)
                while made < n_spans:
                    cap.items = []
                    spans_in_chunk = 0
                    while spans_in_chunk < chunk_spans and made + spans_in_chunk < n_spans:
                        start = len(cap.items)
                        self._run(led, next(times_it, last))
                        spans_in_chunk += sum(1 for it in cap.items[start:] if isinstance(it, Span))
                    led.trim_recent()
                    made += spans_in_chunk
                    yield cap.items, spans_in_chunk
            finally:
                tracker.close()

    # -- one run ------------------------------------------------------------------------------------

    def _run(self, led: Any, t0: float) -> None:
        from costobs_callbacks._events import TokenUsage

        rng = self.rng
        feature = rng.choices(self.features, self.feature_w)[0]
        tenant = rng.choices(self.tenants, self.tenant_w)[0]
        n_users = self.users[tenant]
        user = f"{tenant}-u{min(n_users - 1, int(rng.paretovariate(1.2)) - 1)}"
        meta: dict[str, Any] = {"feature": feature, "tenant_id": tenant, "user_id": user, "tier": self.tier[tenant],
                                "route": f"/api/{feature.split('-')[1]}",
                                "prompt_version": "v4" if rng.random() < 0.8 else "v3"}
        if feature in self.ab:
            meta["variant"] = rng.choice("ab")
        model, provider, _ = self.feature_model[feature]
        task = feature.split("-")[1]
        new = uuid.uuid4
        made: list[tuple[Any, str, float]] = []  # (span, kind, latency_ms) in the order they ended

        def llm(parent: Any, mdl: str = model, prov: str = provider) -> None:
            sid = new()
            led.start_llm(sid, parent, "ChatModel", meta, mdl, prov)
            inp = int(rng.lognormvariate(7.0, 0.8)) + 50
            out = int(rng.lognormvariate(5.0, 0.8)) + 5
            cached = int(inp * rng.choice((0, 0, 0.5, 0.8))) if prov in ("openai", "anthropic") else 0
            if rng.random() < 0.01:
                sp = led.end(sid, "error", TimeoutError("upstream timeout"),
                             TokenUsage(input=inp, output=0), mdl)
            else:
                sp = led.end(sid, usage=TokenUsage(input=inp, output=out, cache_read=cached), model=mdl)
            made.append((sp, "llm", rng.lognormvariate(6.8, 0.6)))

        def leaf(parent: Any, kind: str, name: str, ms: float, args: Any = None) -> None:
            sid = new()
            led.start_span(sid, parent, kind, name, meta, tool_args=args)
            made.append((led.end(sid), kind, ms))

        def chain(parent: Any, name: str, body: Callable[[Any], None]) -> None:
            sid = new()
            led.start_span(sid, parent, "chain", name, meta)
            body(sid)
            made.append((led.end(sid), "chain", 0.0))

        def agent(root: Any) -> None:
            for step in range(rng.randint(1, 5)):
                def node(n: Any, step: int = step) -> None:
                    llm(n)
                    for _ in range(rng.choice((0, 1, 1, 2))):
                        tool = rng.choice(TOOLS)
                        leaf(n, "tool", tool, rng.lognormvariate(5.5, 0.8), {"q": f"{tool} {step}"})
                chain(root, "agent" if step % 2 == 0 else "tools", node)
            llm(root, "gpt-4o-mini", "openai")  # the final answer, on a small model

        def rag(root: Any) -> None:
            leaf(root, "retriever", "VectorStoreRetriever", rng.lognormvariate(3.5, 0.5))
            llm(root)

        def chat(root: Any) -> None:
            for _ in range(rng.choice((1, 1, 2))):
                llm(root)

        def extract(root: Any) -> None:
            llm(root)
            if rng.random() < 0.3:
                leaf(root, "tool", "lookup_order", rng.lognormvariate(4.0, 0.5), {"id": rng.randrange(10**6)})

        def summarize(root: Any) -> None:
            for _ in range(rng.randint(2, 8)):  # map
                llm(root)
            llm(root)  # reduce

        shape = {"agent": agent, "rag": rag, "chat": chat, "extract": extract, "summarize": summarize}[task]
        chain(None, {"agent": "LangGraph"}.get(task, "RunnableSequence"), shape)
        _place(made, t0)


def _place(made: list[tuple[Any, str, float]], t0: float) -> None:
    """Times as a real run has them: calls one after another from ``t0``, each chain from its first child's
    start to its last child's end (spans end children first, so a chain comes after its children)."""
    cursor = t0
    bounds: dict[int, tuple[float, float]] = {}  # chain span (id) -> (first start, last end) of its children
    for span, kind, ms in made:
        if span is None:
            continue
        if kind == "chain":
            lo, hi = bounds.pop(id(span), (cursor, cursor))
            span.start_wall, span.end_wall, span.latency_ms = lo, hi, (hi - lo) * 1000.0
        else:
            span.start_wall, span.end_wall, span.latency_ms = cursor, cursor + ms / 1000.0, ms
            cursor += ms / 1000.0 + 0.005
        p = span.parent
        if p is not None:
            lo, hi = bounds.get(id(p), (span.start_wall, span.end_wall))
            bounds[id(p)] = (min(lo, span.start_wall), max(hi, span.end_wall))
        if span.is_root:
            run = span.run
            run.started_wall = span.start_wall
            run.ended_wall = span.end_wall


# -- backends -----------------------------------------------------------------------------------------

def _pg_admin(server: str) -> Any:
    import sqlalchemy as sa

    return sa.create_engine(f"{server}/test", isolation_level="AUTOCOMMIT")


def _pg_create(server: str, name: str) -> None:
    import sqlalchemy as sa

    eng = _pg_admin(server)
    with eng.connect() as c:
        if not c.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first():
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    eng.dispose()


def _pg_drop(server: str, name: str) -> None:
    eng = _pg_admin(server)
    with eng.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    eng.dispose()


def _counts(store: Any) -> tuple[int, int, int, int]:
    import sqlalchemy as sa

    with store.engine.connect() as c:
        return tuple(int(c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one())  # type: ignore[return-value]
                     for t in ("costobs_spans", "costobs_runs", "costobs_rollups_hourly", "costobs_rollups_keyed"))


def _analyze(store: Any) -> None:
    with store.engine.begin() as c:
        c.exec_driver_sql("ANALYZE")


# -- the questions ------------------------------------------------------------------------------------

def questions(day: int) -> dict[str, dict[str, Any]]:
    d0 = START + timedelta(days=day)
    return {
        "feature by hour, one day": {"by": ["feature"], "bucket": "hour", "since": d0, "until": d0 + timedelta(days=1)},
        "tenant, the month": {"by": ["tenant_id"], "since": START, "until": START + timedelta(days=DAYS)},
    }


def _timed(fn: Callable[[], Any]) -> tuple[float, Any, float]:
    """(wall ms, the result, this thread's CPU ms) of one call, after a garbage collection."""
    gc.collect()
    c0 = time.thread_time()
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000.0, out, (time.thread_time() - c0) * 1000.0


def measure(url: str, q: dict[str, Any], *, table: bool, reps: int) -> dict[str, Any]:
    """Cold (a new store per repetition) and warm (one store, after one untimed call) times of one question, wall
    and this thread's CPU (on SQLite all of the work; on PostgreSQL the client's, the server's is ``server_ms``)."""
    from costobs_callbacks._store import Store

    def ask(store: Any) -> Any:
        return store._rollup(q["by"], q.get("since"), q.get("until"), q.get("bucket"), q.get("where"), table)

    cold: list[float] = []
    rows = None
    for _ in range(reps):
        store = Store(url)
        store.ensure_schema()  # the schema check, not the query: done by any first use
        ms, rows, _ = _timed(lambda s=store: ask(s))
        cold.append(ms)
        store.close()
    store = Store(url)
    ask(store)
    warm: list[float] = []
    cpu: list[float] = []
    for _ in range(reps):
        ms, _, cpu_ms = _timed(lambda: ask(store))
        warm.append(ms)
        cpu.append(cpu_ms)
    store.close()
    return {"cold_ms": cold, "warm_ms": warm, "warm_cpu_ms": cpu, "rows": rows,
            "server_ms": _server_ms(url, q, table, reps) if url.startswith("postgresql") else None}


def _statement(store: Any, q: dict[str, Any], table: bool) -> Any:
    """The query ``Store._rollup`` runs for a question: the keyed rows', the hourly rows' or the raw spans'."""
    from costobs_callbacks._store import keyed
    from costobs_callbacks._store.queries import _raw_rollup_query, _table_rollup_query

    args = (q["by"], q.get("since"), q.get("until"), q.get("bucket"), q.get("where"))
    dim = keyed.dim_of(q["by"], q.get("where")) if table else None
    if dim is not None:
        return keyed.query(dim, *args)
    return _table_rollup_query(*args) if table else _raw_rollup_query(*args, False)


def _sql(store: Any, q: dict[str, Any], table: bool) -> str:
    stmt = _statement(store, q, table)
    return str(stmt.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))


def _server_ms(url: str, q: dict[str, Any], table: bool, reps: int) -> list[float]:
    """PostgreSQL's own execution time of the question's query (``EXPLAIN ANALYZE``), ``reps`` times."""
    from costobs_callbacks._store import Store

    store = Store(url)
    sql = "EXPLAIN (ANALYZE, FORMAT JSON) " + _sql(store, q, table)
    out = []
    with store.engine.connect() as c:
        for _ in range(reps):
            plan = c.exec_driver_sql(sql).scalar_one()
            out.append(float((plan if isinstance(plan, list) else json.loads(plan))[0]["Execution Time"]))
    store.close()
    return out


def _explain(url: str, q: dict[str, Any], table: bool) -> str:
    """The database's plan of a question's query (EXPLAIN QUERY PLAN on SQLite, EXPLAIN ANALYZE on PostgreSQL)."""
    from costobs_callbacks._store import Store

    store = Store(url)
    store.ensure_schema()
    prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN (ANALYZE, BUFFERS) "
    with store.engine.connect() as c:
        lines = [" | ".join(str(x) for x in r) for r in c.exec_driver_sql(prefix + _sql(store, q, table)).all()]
    store.close()
    return "\n".join(lines)


def _same(a: list[Any], b: list[Any]) -> bool:
    key = lambda r: (tuple(sorted((k, str(v)) for k, v in r.key.items())), r.bucket_start)  # noqa: E731
    return sorted(a, key=key) == sorted(b, key=key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--backend", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    ap.add_argument("--reps", type=int, default=9, help="repetitions of each rollup-table query (cold and warm)")
    ap.add_argument("--raw-reps", type=int, default=3, help="repetitions of each raw GROUP BY (cold and warm)")
    ap.add_argument("--day", type=int, default=DAYS // 2, help="the day (0-29) of the by-hour question")
    ap.add_argument("--pg-url", default=os.environ.get("COSTOBS_BENCH_PG", PG_SERVER),
                    help="a PostgreSQL server URL without a database; the benchmark makes its own there")
    ap.add_argument("--keep", metavar="DIR", help="keep the SQLite file here and the PostgreSQL database; a next run "
                                                  "with the same --keep and --spans reuses them (no load)")
    ap.add_argument("--explain", action="store_true", help="print each query's plan")
    args = ap.parse_args(argv)
    logging.getLogger("costobs_callbacks").setLevel(logging.ERROR)

    from costobs_callbacks._store import Store

    tmp = None
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        folder = args.keep
    else:
        tmp = tempfile.TemporaryDirectory(prefix="costobs-rollup-bench-")
        folder = tmp.name
    urls = {}
    if "sqlite" in args.backend:
        urls["sqlite"] = f"sqlite:///{folder}/rollup-bench-{args.spans}.db"
    if "postgresql" in args.backend:
        db = f"{PG_DATABASE}_{args.spans}"
        try:
            _pg_create(args.pg_url, db)
            urls["postgresql"] = f"{args.pg_url}/{db}"
        except Exception as exc:  # no server here: the SQLite half still runs, and says so
            print(f"# PostgreSQL at {args.pg_url} is not usable ({str(exc).splitlines()[0]}): skipped")
    results: dict[str, Any] = {}
    try:
        stores = {b: Store(u) for b, u in urls.items()}
        for s in stores.values():
            s.ensure_schema()
        todo = [b for b, s in stores.items() if _counts(s)[0] < args.spans]
        for b in set(stores) - set(todo):
            print(f"# {b}: reusing {_counts(stores[b])[0]:,} spans at {urls[b]}")
        load = {b: {"seconds": 0.0, "spans": 0, "keyed_seconds": 0.0} for b in todo}
        if todo:
            # the keyed rollups' share of the load: their upsert timed where the store calls it (nothing else)
            from costobs_callbacks._store import keyed

            write_keyed = keyed.write

            def timed_keyed(store: Any, conn: Any, roll_rows: Any, sqlite_fast: bool) -> None:
                t0 = time.perf_counter()
                try:
                    write_keyed(store, conn, roll_rows, sqlite_fast)
                finally:
                    load[store.dialect]["keyed_seconds"] += time.perf_counter() - t0

            keyed.write = timed_keyed  # type: ignore[assignment]
            for b in todo:  # a half-loaded database from an interrupted run starts again
                with stores[b].engine.begin() as c:
                    for t in ("costobs_rollups_keyed", "costobs_rollups_hourly", "costobs_spans", "costobs_runs"):
                        c.exec_driver_sql(f"DELETE FROM {t}")
            print(f"# {NAME}: loading {args.spans:,} spans into {', '.join(todo)} through Store.write_batch "
                  f"({BATCH_ITEMS:,} items per batch)", flush=True)
            made_s = 0.0
            t_made = time.perf_counter()
            for items, n in Workload().chunks(args.spans):
                made_s += time.perf_counter() - t_made
                for b in todo:
                    w = stores[b].write_batch
                    gc.collect()
                    t0 = time.perf_counter()
                    for i in range(0, len(items), BATCH_ITEMS):
                        w(items[i:i + BATCH_ITEMS])
                    load[b]["seconds"] += time.perf_counter() - t0
                    load[b]["spans"] += n
                done = load[todo[0]]["spans"]
                print(f"  {done:,} spans; " + ", ".join(f"{b} {load[b]['spans'] / load[b]['seconds']:,.0f} spans/s"
                                                         for b in todo), flush=True)
                t_made = time.perf_counter()
            print(f"  (workload made in {made_s:.0f}s, untimed)")
            for b in todo:
                _analyze(stores[b])
        for b, s in stores.items():
            n_spans, n_runs, n_roll, n_keyed = _counts(s)
            results[b] = {"url": urls[b], "spans": n_spans, "runs": n_runs, "rollup_rows": n_roll,
                          "keyed_rows": n_keyed, "load": load.get(b), "questions": {}}
            s.close()

        for b, url in urls.items():
            print(f"\n## {b}: {results[b]['spans']:,} spans, {results[b]['runs']:,} runs, "
                  f"{results[b]['rollup_rows']:,} hourly rollup rows, {results[b]['keyed_rows']:,} keyed rows",
                  flush=True)
            for qname, q in questions(args.day).items():
                t = measure(url, q, table=True, reps=args.reps)
                r = measure(url, q, table=False, reps=args.raw_reps)
                equal = _same(t["rows"], r["rows"])
                results[b]["questions"][qname] = {
                    "groups": len(t["rows"]), "equal": equal,
                    **{f"table_{k}": v for k, v in t.items() if k != "rows"},
                    **{f"raw_{k}": v for k, v in r.items() if k != "rows"},
                }
                print(f"  {qname}: {len(t['rows'])} groups, table == raw: {equal}; table cold median "
                      f"{statistics.median(t['cold_ms']):.1f} ms, raw cold median "
                      f"{statistics.median(r['cold_ms']):.0f} ms", flush=True)
                if args.explain:
                    for path in (True, False):
                        print(f"\n  plan ({'rollup table' if path else 'raw spans'}):")
                        print("    " + _explain(url, q, path).replace("\n", "\n    "))
    finally:
        if not args.keep and "postgresql" in urls:
            _pg_drop(args.pg_url, f"{PG_DATABASE}_{args.spans}")
        if tmp is not None:
            tmp.cleanup()

    rows = []
    summary = []
    for b, res in results.items():
        ld = res["load"]
        rate = ld["spans"] / ld["seconds"] if ld and ld["seconds"] else None
        for qname, q in res["questions"].items():
            tc, tw, rc, rw = (q[k] for k in ("table_cold_ms", "table_warm_ms", "raw_cold_ms", "raw_warm_ms"))
            server = q.get("table_server_ms")
            rows.append([b, qname, q["groups"], f"{statistics.median(tc):.1f} / {max(tc):.1f}",
                         f"{statistics.median(tw):.1f} / {max(tw):.1f}",
                         f"{statistics.median(q['table_warm_cpu_ms']):.1f}",
                         f"{statistics.median(server):.1f}" if server else "-",
                         f"{statistics.median(rc):,.0f} / {max(rc):,.0f}",
                         f"{statistics.median(rw):,.0f} / {max(rw):,.0f}",
                         "yes" if q["equal"] else "NO"])
            worst = max(max(tc), max(tw))
            summary.append(metric(f"{b}: {qname}, rollup table (max of cold and warm)", worst, "ms",
                                  f"<= {TARGET_MS:.0f} ms", worst <= TARGET_MS,
                                  note=f"warm: median {statistics.median(tw):.1f} ms, CPU "
                                       f"{statistics.median(q['table_warm_cpu_ms']):.1f} ms"
                                       + (f" + server {statistics.median(server):.1f} ms" if server else "")
                                       + f"; raw GROUP BY: median {statistics.median(rc):,.0f} ms cold"))
        summary.append(metric(f"{b}: load through Store.write_batch", rate, "spans/s",
                              note=f"{res['spans']:,} spans, {res['rollup_rows']:,} hourly rollup rows, "
                                   f"{res['keyed_rows']:,} keyed rows"
                              + ("" if rate is not None else " (reused: not loaded in this run)")))
    print()
    print(table(["backend", "question", "groups", "table cold ms (median / max)", "table warm ms (median / max)",
                 "table warm CPU ms (median)", "table server ms (median)", "raw cold ms (median / max)",
                 "raw warm ms (median / max)", "equal"], rows))
    print()
    for b, res in results.items():
        ld = res["load"]
        if ld and ld["seconds"]:
            print(f"{b}: loaded {ld['spans']:,} spans in {ld['seconds']:.1f} s = {ld['spans'] / ld['seconds']:,.0f} "
                  f"spans/s ({res['runs']:,} runs, {res['rollup_rows']:,} hourly rollup rows, "
                  f"{res['keyed_rows']:,} keyed rows); the keyed upsert took {ld['keyed_seconds']:.1f} s of it "
                  f"({ld['keyed_seconds'] / ld['spans'] * 1e6:.1f} us a span)")
    print()
    print_summary(summary)
    path = write_results(NAME, {k: v for k, v in vars(args).items() if k != "pg_url"}, results, summary)
    print(f"\nresults: {path}")
    ok = all(q["equal"] for res in results.values() for q in res["questions"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
