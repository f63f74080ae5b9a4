"""App-thread latency per LangChain call while the database is down, against while it is up.

Configurations, each a process of its own with one ``CostTracker`` and a ``ChatOpenAI`` talking to the local stub
server (``tests/stub_openai.py``) over HTTP, the handler on every call, each call a run of its own:

  pg_up        PostgreSQL on the machine's server, through a TCP proxy that forwards
  pg_up_2      the same again: two processes in the same state, the noise floor of the comparison
  pg_refused   through a proxy that refuses connections (cut): batches go to the spool
  pg_hung      through a proxy that accepts connections and answers nothing: the exporter waits out ``db_timeout``
               on it, the watchdog cuts it, batches go to the spool
  sqlite_up    a SQLite file
  sqlite_gone  a SQLite file deleted under the tracker: batches go to the spool

The proxies run in a process of their own (their threads would otherwise share a GIL with what is measured).
A coordinator runs rounds: in each, every configuration runs one batch of calls in turn (the order rotating),
the others idle. Per batch: the calling thread's CPU (``time.thread_time_ns``) and wall time per call, and the
exporter thread's CPU per call (what competes with the app for the GIL). The figures are the median and p10..p90
over rounds; the down configurations are compared with their backend's up one by the median of the paired
per-round differences (a slow round cancels out).

Run: ``python -m bench.outage_latency [--rounds N] [--batch N]`` from the repository root (PostgreSQL at
``$COSTOBS_TEST_POSTGRES_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/outage_latency.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO_ROOT, fmt, metric, print_summary, summarize, table, write_results

NAME = "outage_latency"

CONFIGS = ("pg_up", "pg_up_2", "pg_refused", "pg_hung", "sqlite_up", "sqlite_gone")
BASE = {"pg_up_2": "pg_up", "pg_refused": "pg_up", "pg_hung": "pg_up", "sqlite_gone": "sqlite_up"}
"""Each compared configuration and the one it is compared with."""

PROXY = textwrap.dedent("""
    import sys
    from tests.proxy import Proxy

    proxy = Proxy(int(sys.argv[1]))
    print(proxy.port, flush=True)
    for line in sys.stdin:
        getattr(proxy, line.strip())()
        print("ok", flush=True)
""")

CHILD = textwrap.dedent("""
    import gc, json, logging, os, sys, time
    sys.path.insert(0, os.getcwd())
    from bench._common import exporter_thread, quiet_tracing, thread_cpu_ns
    quiet_tracing()
    logging.getLogger("costobs_callbacks").setLevel(logging.CRITICAL)  # the outage's warnings are expected
    from langchain_openai import ChatOpenAI
    from costobs_callbacks import CostTracker

    url, spool, base, delay, timeout = sys.argv[1:6]
    t = CostTracker(url, prices={"m-bench": {"input": "0.15", "output": "0.6"}}, user_salt="s", spool_dir=spool,
                    export_delay=float(delay), db_timeout=float(timeout))
    llm = ChatOpenAI(base_url=base, api_key="sk-test", model="m-bench", max_retries=0)
    handler = t.langchain_handler()
    calls = 0

    def call():
        llm.invoke("hi", config={"callbacks": [handler],
                                 "metadata": {"feature": "bench", "tenant_id": "acme", "user_id": "u-1"}})

    for _ in range(20):  # warm: the model, the handler, the exporter
        call()
        calls += 1
    t.exporter._flush_queue(30)
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            n = int(cmd[1])
            exp = exporter_thread(t)
            e0 = thread_cpu_ns(exp) or 0
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(n):
                call()
            w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            e1 = thread_cpu_ns(exp) or 0
            calls += n
            # (the exporter's share of this batch: what it did while the batch ran; the queue is not flushed
            # before reporting, so its work stays in the batch that caused it, as in an app)
            print(json.dumps({"cpu": (c1 - c0) / n / 1000, "wall": (w1 - w0) / n / 1000,
                              "exporter_cpu": (e1 - e0) / n / 1000}), flush=True)
        elif cmd[0] == "stats":
            t.exporter._flush_queue(60)
            print(json.dumps({"calls": calls, **t.stats}), flush=True)
        elif cmd[0] == "close":
            t.close(timeout=float(cmd[1]))
            print(json.dumps({"calls": calls, **t.stats}), flush=True)
            break
""")


class _Proc:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)

    def ask(self, line: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def read(self) -> str:
        assert self.p.stdout is not None
        return self.p.stdout.readline().strip()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _stored(url: str) -> int:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            return int(conn.execute(sa.text("SELECT COUNT(*) FROM costobs_spans")).scalar_one())
    finally:
        eng.dispose()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=200, help="calls per configuration per round")
    ap.add_argument("--export-delay", type=float, default=0.1,
                    help="the trackers' export_delay: shorter than a batch, so that the exporter's work (writing, or "
                         "spooling) competes with the calls it follows")
    ap.add_argument("--db-timeout", type=float, default=2.0, help="the trackers' db_timeout (hung: how long waits)")
    args = ap.parse_args(argv)

    import sqlalchemy as sa

    sys.path.insert(0, str(REPO_ROOT))
    from costobs_callbacks import CostTracker
    from tests.pg import create_database, drop_database, server_url
    from tests.stub_openai import StubOpenAI, StubReply, StubUsage

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "0"}
    stub = StubOpenAI().start()
    stub.responder = lambda req: StubReply("Hello! How can I help?", usage=StubUsage(1200, 300))
    admin = server_url()
    pg_url = create_database(admin)
    tmp = Path(tempfile.mkdtemp(prefix="costobs-outage-"))
    procs: dict[str, _Proc] = {}
    proxies: dict[str, _Proc] = {}
    try:
        CostTracker(pg_url, user_salt="s", spool_dir=tmp / "schema").close()
        pg_port = str(sa.engine.make_url(pg_url).port or 5432)
        urls: dict[str, str] = {}
        for name in CONFIGS:
            if name.startswith("pg"):
                proxies[name] = _Proc([sys.executable, "-c", PROXY, pg_port], env)
                port = int(proxies[name].read())
                urls[name] = sa.engine.make_url(pg_url).set(port=port).render_as_string(False)
            else:
                (tmp / name).mkdir()
                urls[name] = f"sqlite:///{tmp / name / 'costs.db'}"
        for name in CONFIGS:
            procs[name] = _Proc([sys.executable, "-c", CHILD, urls[name], str(tmp / f"spool-{name}"), stub.base_url,
                                 str(args.export_delay), str(args.db_timeout)], env)
        for name in CONFIGS:
            assert procs[name].read() == "ready", name
        # the outages, after every tracker started against a database that answered
        assert proxies["pg_refused"].ask("cut") == "ok"
        assert proxies["pg_hung"].ask("hang") == "ok"
        for p in (tmp / "sqlite_gone").iterdir():
            p.unlink()

        cpu: dict[str, list[float]] = {k: [] for k in CONFIGS}
        wall: dict[str, list[float]] = {k: [] for k in CONFIGS}
        exp: dict[str, list[float]] = {k: [] for k in CONFIGS}
        keys = list(CONFIGS)
        for r in range(args.rounds + 1):  # round 0: warm-up in the outage state, not counted
            i = r % len(keys)
            for k in keys[i:] + keys[:i]:
                got = json.loads(procs[k].ask(f"run {args.batch}"))
                if r:
                    cpu[k].append(got["cpu"])
                    wall[k].append(got["wall"])
                    exp[k].append(got["exporter_cpu"])
        stats = {k: json.loads(procs[k].ask("stats")) for k in CONFIGS}
    finally:
        for p in procs.values():
            p.stop()
        for p in proxies.values():
            p.stop()
        stub.stop()
    checks = []
    for k in CONFIGS:
        st = stats[k]
        lost = st["failed"] + st["dropped"]
        checks.append((k, st["calls"], st["exported"] + st["in_spool"], lost))
    stored = {"postgresql": _stored(pg_url), "sqlite_up": _stored(urls["sqlite_up"])}
    expected = {"postgresql": sum(stats[k]["exported"] for k in CONFIGS if k.startswith("pg")),
                "sqlite_up": stats["sqlite_up"]["exported"]}
    drop_database(admin, pg_url)

    rows = []
    results: dict[str, Any] = {}
    for k in CONFIGS:
        c, w, e = summarize(cpu[k]), summarize(wall[k]), summarize(exp[k])
        results[k] = {"cpu": c, "wall": w, "exporter_cpu": e}
        rows.append([k, fmt(c["median"]), f"{fmt(c['p10'])}..{fmt(c['p90'])}", fmt(w["median"]),
                     f"{fmt(w['p10'])}..{fmt(w['p90'])}", fmt(e["median"])])
    print(f"\n## App-thread time per call ({args.rounds} rounds of {args.batch} calls, interleaved; µs)\n")
    print(table(["configuration", "CPU median", "CPU p10..p90", "wall median", "wall p10..p90",
                 "exporter CPU/call"], rows))
    rows = []
    summary = []
    for k, base in BASE.items():
        dc = summarize([x - y for x, y in zip(cpu[k], cpu[base], strict=True)])
        dw = summarize([x - y for x, y in zip(wall[k], wall[base], strict=True)])
        rc = dc["median"] / results[base]["cpu"]["median"]
        rw = dw["median"] / results[base]["wall"]["median"]
        results[k]["vs"] = {"base": base, "cpu_diff": dc, "wall_diff": dw, "cpu_ratio": rc, "wall_ratio": rw}
        rows.append([f"{k} - {base}", fmt(dc["median"]), f"{fmt(dc['p10'])}..{fmt(dc['p90'])}", f"{rc:+.1%}",
                     fmt(dw["median"]), f"{fmt(dw['p10'])}..{fmt(dw['p90'])}", f"{rw:+.1%}"])
        if k != "pg_up_2":
            summary.append(metric(f"{k}: app-thread CPU per call vs {base}", rc * 100, "%", "within ±10%",
                                  abs(rc) <= 0.10, f"wall {rw:+.1%}"))
    print("\n## Down against up: paired per-round differences (µs per call)\n")
    print(table(["pair", "CPU diff median", "CPU diff p10..p90", "CPU", "wall diff median", "wall diff p10..p90",
                 "wall"], rows))
    print("\n## Every call accounted for\n")
    print(table(["configuration", "calls", "stored + in the spool", "lost"],
                [[k, n, where, lost] for k, n, where, lost in checks]))
    print(f"\nspans in the databases: {stored} (exported: {expected})")
    ok = all(lost == 0 and where == n for _, n, where, lost in checks) and stored == expected
    print_summary(summary)
    write_results(NAME, vars(args), {"configs": results, "checks": checks}, summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
