"""``costobs db prune`` on PostgreSQL: 1,000,000 spans over 90 days, ``--older-than 30d`` (two thirds deleted),
while an exporter keeps writing.

Set-up: a new database on the machine's server (``$COSTOBS_TEST_POSTGRES_URL``), at the head revision, filled by
SQL (``generate_series``) with ``--spans`` spans spread evenly over ``--days`` days (ids in time order, as an
exporter writes them), a run per five spans, the hourly rollups of those spans and a batch id per ten spans. Then:

1. a writer process (a ``CostTracker`` recording usage, ``export_delay=0.05``) runs alone for ``--baseline``
   seconds: each batch's transaction is timed (``Store.write_batch`` wrapped in the writer);
2. ``costobs db prune --older-than 30d --yes`` runs (the CLI, as an operator runs it) while the writer goes on;
3. the writer runs alone again.

Reported: the prune's time, the WAL it wrote (``pg_current_wal_lsn`` before and after), the tables' sizes and
dead rows before and after (the space a DELETE leaves is reused by later inserts, not given back without
``VACUUM FULL``), and the writer's batch latency (p50, p99, max) before, during and after: a prune that held
locks the writers need would show there.

``--partitioned`` measures the alternative the README weighs: the same spans in a copy of the table partitioned
by day (``PARTITION BY RANGE (hour)``), pruned by ``DROP TABLE`` of the old partitions, the cost of a query by
run id (``run_cost``, ``spans``), which carries no partition key and probes every partition, and of a rollup the
hourly table cannot answer (a window of raw spans, where partitions are pruned by the hour).

Run: ``python -m bench.prune [--spans N] [--days D] [--partitioned]`` from the repository root (~5-10 min).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/prune.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO_ROOT, fmt, metric, percentile, print_summary, table, write_results

NAME = "prune"

WRITER = textwrap.dedent("""
    import json, sys, threading, time
    from costobs_callbacks import CostTracker

    url, spool = sys.argv[1:3]
    t = CostTracker(url, user_salt="s", spool_dir=spool, export_delay=0.05, prices={"m": {"input": "1", "output": "1"}})
    lock = threading.Lock()
    times = []
    write = t.store.write_batch

    def timed(items):
        t0 = time.perf_counter()
        try:
            write(items)
        finally:
            with lock:
                times.append((time.time(), time.perf_counter() - t0, len(items)))

    t.store.write_batch = timed
    stop = threading.Event()

    def reader():
        for line in sys.stdin:
            if line.strip() == "stop":
                stop.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    print("ready", flush=True)
    i = 0
    while not stop.is_set():
        t.record_usage(model="m", input_tokens=100, output_tokens=10, feature="live", run_id=None)
        i += 1
        time.sleep(0.002)  # about 400 spans/s: batches of about 20
    ok = t.flush(60)
    st = t.stats
    t.close()
    print(json.dumps({"ok": ok, "recorded": i, "stats": st, "times": times}), flush=True)
""")

FILL_SPANS = """
INSERT INTO costobs_spans (span_id, parent_id, run_id, kind, name, model, provider, start_at, end_at, hour,
    latency_ms, status, input_tokens, output_tokens, cost_nanos, tree_cost_nanos, price_source, price_input,
    price_output, feature, route, tenant_id, user_hash, opens_run)
SELECT md5(i::text), NULL, 'run-' || (i / 5), 'llm', 'ChatOpenAI', 'gpt-4o', 'openai',
    to_timestamp(:t0 + i * :step) AT TIME ZONE 'UTC', to_timestamp(:t0 + i * :step + 0.8) AT TIME ZONE 'UTC',
    floor((:t0 + i * :step) / 3600)::int, 800.0, 'ok', 1200, 300, 6000000, 6000000, 'catalog', '2.5', '10',
    'feature-' || (i % 50), '/r', 'tenant-' || (i % 20), md5((i % 7)::text), i % 5 = 0
FROM generate_series(:lo, :hi) AS i
"""

FILL_RUNS = """
INSERT INTO costobs_runs (run_id, feature, route, tenant_id, user_hash, status, started_at, ended_at, invocations,
    cost_nanos, input_tokens, output_tokens, llm_calls, span_count)
SELECT 'run-' || r, 'feature-' || ((r * 5) % 50), '/r', 'tenant-' || ((r * 5) % 20), md5(((r * 5) % 1000)::text),
    'ok', to_timestamp(:t0 + r * 5 * :step) AT TIME ZONE 'UTC', to_timestamp(:t0 + (r * 5 + 4) * :step + 0.8)
    AT TIME ZONE 'UTC', 5, 30000000, 6000, 1500, 5, 5
FROM generate_series(0, :runs - 1) AS r
"""

FILL_BATCHES = """
INSERT INTO costobs_batches (batch_id)
SELECT lpad(to_hex(((:t0 + b * 10 * :step) * 1000)::bigint), 12, '0') || substr(md5(b::text), 1, 20)
FROM generate_series(0, :batches - 1) AS b
"""

SIZES = """
SELECT relname, pg_total_relation_size(relid), n_live_tup, n_dead_tup FROM pg_stat_user_tables
WHERE relname IN ('costobs_spans', 'costobs_runs', 'costobs_batches', 'costobs_rollups_hourly') ORDER BY relname
"""


def _fill(engine: Any, spans: int, days: int, now: float) -> dict[str, Any]:
    import sqlalchemy as sa

    from costobs_callbacks._store import _backfill_rollups

    t0 = now - days * 86400.0
    step = days * 86400.0 / spans
    with engine.begin() as conn:
        for lo in range(0, spans, 200_000):
            conn.execute(sa.text(FILL_SPANS), {"t0": t0, "step": step, "lo": lo, "hi": min(spans, lo + 200_000) - 1})
        conn.execute(sa.text(FILL_RUNS), {"t0": t0, "step": step, "runs": spans // 5})
        conn.execute(sa.text(FILL_BATCHES), {"t0": t0, "step": step, "batches": spans // 10})
        _backfill_rollups(conn)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    return {"t0": t0, "step": step}


def _sizes(engine: Any) -> dict[str, tuple[int, int, int]]:
    import sqlalchemy as sa

    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in conn.execute(sa.text(SIZES))}


def _lsn(engine: Any) -> str:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return str(conn.execute(sa.text("SELECT pg_current_wal_lsn()")).scalar_one())


def _wal_bytes(engine: Any, a: str, b: str) -> int:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_wal_lsn_diff(:b, :a)"), {"a": a, "b": b}).scalar_one())


def _latency(times: list[tuple[float, float, int]], lo: float, hi: float) -> dict[str, float]:
    xs = [d * 1000 for at, d, _ in times if lo <= at < hi]
    return {"batches": len(xs), "p50_ms": percentile(xs, 50), "p99_ms": percentile(xs, 99),
            "max_ms": max(xs) if xs else float("nan")}


def _partitioned(engine: Any, days: int, keep_days: int, now: float) -> dict[str, Any]:
    """The alternative: the spans copied into a table partitioned by day; prune = DROP the old partitions; and a
    query by run id on each layout."""
    import sqlalchemy as sa

    first_day = int((now - days * 86400) // 86400)
    last_day = int(now // 86400)
    out: dict[str, Any] = {}
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE spans_by_day (LIKE costobs_spans INCLUDING DEFAULTS) "
                             "PARTITION BY RANGE (hour)"))
        for d in range(first_day, last_day + 1):
            conn.execute(sa.text(f"CREATE TABLE spans_by_day_{d} PARTITION OF spans_by_day "
                                 f"FOR VALUES FROM ({d * 24}) TO ({(d + 1) * 24})"))
        conn.execute(sa.text("ALTER TABLE spans_by_day ADD PRIMARY KEY (id, hour)"))
        for cols in ("run_id", "hour", "feature, hour", "tenant_id, hour"):
            conn.execute(sa.text(f"CREATE INDEX ON spans_by_day ({cols})"))
        t0 = time.perf_counter()
        conn.execute(sa.text("INSERT INTO spans_by_day SELECT * FROM costobs_spans"))
        out["copy_s"] = time.perf_counter() - t0
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE spans_by_day"))
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT run_id FROM costobs_spans ORDER BY id DESC LIMIT 1")).scalar_one()
        for name, table_name in (("plain", "costobs_spans"), ("by_day", "spans_by_day")):
            q = sa.text(f"SELECT COUNT(*), SUM(cost_nanos) FROM {table_name} WHERE run_id = :r")
            conn.execute(q, {"r": run}).one()  # warm
            t0 = time.perf_counter()
            for _ in range(200):
                conn.execute(q, {"r": run}).one()
            out[f"run_query_{name}_ms"] = (time.perf_counter() - t0) / 200 * 1000
            plan = conn.execute(sa.text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) SELECT COUNT(*) FROM {table_name} "
                                        "WHERE run_id = :r"), {"r": run}).scalar_one()
            out[f"run_query_{name}_buffers"] = plan[0]["Plan"].get("Shared Hit Blocks", 0) + \
                plan[0]["Plan"].get("Shared Read Blocks", 0)
            # a rollup the hourly table cannot answer (a window that is not whole hours): the last 36 hours' spans
            # by model, read from the raw spans through their hour
            since = int(now // 3600) - 36
            q = sa.text(f"SELECT model, COUNT(*), SUM(cost_nanos) FROM {table_name} WHERE hour >= :h AND "
                        "start_at >= to_timestamp(:t) AT TIME ZONE 'UTC' GROUP BY model")
            args = {"h": since, "t": since * 3600 + 1800}
            conn.execute(q, args).all()  # warm
            t0 = time.perf_counter()
            for _ in range(20):
                conn.execute(q, args).all()
            out[f"window_query_{name}_ms"] = (time.perf_counter() - t0) / 20 * 1000
    lsn0 = _lsn(engine)
    t0 = time.perf_counter()
    dropped = 0
    for d in range(first_day, int((now - keep_days * 86400) // 86400)):
        with engine.begin() as conn:  # one short transaction per partition
            conn.execute(sa.text(f"DROP TABLE spans_by_day_{d}"))
        dropped += 1
    out["drop_s"] = time.perf_counter() - t0
    out["drop_partitions"] = dropped
    out["drop_wal_bytes"] = _wal_bytes(engine, lsn0, _lsn(engine))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--older-than-days", type=int, default=30)
    ap.add_argument("--baseline", type=float, default=10.0, help="seconds the writer runs alone, before and after")
    ap.add_argument("--partitioned", action="store_true", help="also measure day partitions (see the docstring)")
    args = ap.parse_args(argv)

    import sqlalchemy as sa

    sys.path.insert(0, str(REPO_ROOT))
    from costobs_callbacks import CostTracker
    from tests.pg import create_database, drop_database, server_url

    admin = server_url()
    url = create_database(admin)
    engine = sa.create_engine(url)
    spool = Path(f"/tmp/costobs-prune-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writer: subprocess.Popen[str] | None = None
    try:
        with engine.connect() as conn:  # the measured prune waits on a real fsync, as in production
            conn.execute(sa.text("SELECT 1"))
        with sa.create_engine(admin, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{sa.engine.make_url(url).database}" RESET synchronous_commit'))
        engine.dispose()
        CostTracker(url, user_salt="s", spool_dir=spool / "schema").close()
        now = time.time()
        t0 = time.perf_counter()
        _fill(engine, args.spans, args.days, now)
        fill_s = time.perf_counter() - t0
        before = _sizes(engine)
        print(f"filled {args.spans:,} spans over {args.days} days in {fill_s:.1f}s")

        writer = subprocess.Popen([sys.executable, "-c", WRITER, url, str(spool / "writer")], cwd=REPO_ROOT,
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(args.baseline)
        lsn0 = _lsn(engine)
        p0 = time.time()
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "costobs_callbacks.cli", "db", "prune", "--older-than",
                               f"{args.older_than_days}d", "--yes", "--database-url", url], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, check=False)
        prune_s = time.perf_counter() - t0
        p1 = time.time()
        wal = _wal_bytes(engine, lsn0, _lsn(engine))
        print(done.stdout.strip())
        assert done.returncode == 0, done.stderr
        time.sleep(args.baseline)
        writer.stdin.write("stop\n")
        writer.stdin.flush()
        report = json.loads(writer.stdout.readline())
        writer.wait(60)
        after = _sizes(engine)
        times = [tuple(x) for x in report["times"]]
        lat = {"before": _latency(times, 0, p0), "during": _latency(times, p0, p1),
               "after": _latency(times, p1, float("inf"))}
        with engine.connect() as conn:
            left = int(conn.execute(sa.text("SELECT COUNT(*) FROM costobs_spans")).scalar_one())
            live = int(conn.execute(sa.text("SELECT COUNT(*) FROM costobs_spans WHERE feature = 'live'")).scalar_one())
        part = _partitioned(engine, args.days, args.older_than_days, now) if args.partitioned else None
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        engine.dispose()
        drop_database(admin, url)

    print(f"\n## Prune of {args.spans:,} spans over {args.days} days, --older-than {args.older_than_days}d "
          f"(PostgreSQL, synchronous commits)\n")
    deleted = args.spans + report["recorded"] - left
    print(table(["figure", "value"], [
        ["spans deleted", f"{deleted:,}"],
        ["prune time (CLI, batches of 5,000)", f"{prune_s:.1f} s"],
        ["spans deleted per second", fmt(deleted / prune_s, 0)],
        ["WAL written during the prune (writer included)", f"{wal / 2**20:,.0f} MiB"],
    ]))
    print("\n## Tables before and after (total size with indexes, live rows, dead rows)\n")
    print(table(["table", "before MiB", "after MiB", "live before", "live after", "dead after"],
                [[k, fmt(before[k][0] / 2**20), fmt(after[k][0] / 2**20), f"{before[k][1]:,}", f"{after[k][1]:,}",
                  f"{after[k][2]:,}"] for k in sorted(before)]))
    print("\n## The writer's batches (ms per transaction)\n")
    print(table(["period", "batches", "p50", "p99", "max"],
                [[k, v["batches"], fmt(v["p50_ms"]), fmt(v["p99_ms"]), fmt(v["max_ms"])] for k, v in lat.items()]))
    st = report["stats"]
    writer_ok = report["ok"] and st["failed"] == 0 and st["spooled"] == 0 and live == report["recorded"]
    print(f"\nwriter: {report['recorded']:,} spans recorded, {live:,} stored, {st['spooled']} spooled, "
          f"{st['failed']} failed")
    if part is not None:
        print("\n## Day partitions (the alternative)\n")
        print(table(["figure", "value"], [
            ["copy of the spans into 91 day partitions", f"{part['copy_s']:.1f} s"],
            ["prune: DROP TABLE of the old partitions", f"{part['drop_s']:.2f} s ({part['drop_partitions']} tables)"],
            ["WAL of the drops", f"{part['drop_wal_bytes'] / 2**10:,.0f} KiB"],
            ["a run's spans by run_id: plain table", f"{part['run_query_plain_ms']:.3f} ms "
                                                     f"({part['run_query_plain_buffers']} buffers)"],
            ["a run's spans by run_id: day partitions", f"{part['run_query_by_day_ms']:.3f} ms "
                                                        f"({part['run_query_by_day_buffers']} buffers)"],
            ["the last 36 hours by model from raw spans: plain table", f"{part['window_query_plain_ms']:.1f} ms"],
            ["the last 36 hours by model from raw spans: day partitions", f"{part['window_query_by_day_ms']:.1f} ms"],
        ]))
    summary = [
        metric("prune: spans deleted per second", deleted / prune_s, "spans/s"),
        metric("writer batch p99 during the prune", lat["during"]["p99_ms"], "ms",
               note=f"before: {fmt(lat['before']['p99_ms'])} ms"),
        metric("writer batch max during the prune", lat["during"]["max_ms"], "ms",
               note=f"before: {fmt(lat['before']['max_ms'])} ms"),
    ]
    print_summary(summary)
    write_results(NAME, vars(args), {"prune_s": prune_s, "deleted": deleted, "wal_bytes": wal, "before": before,
                                     "after": after, "writer": lat, "partitions": part}, summary)
    if not writer_ok:
        print("the writer lost spans or spooled during the prune")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
