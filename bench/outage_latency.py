"""App-thread latency per LangChain call while the database is down, against while it is up.

Configurations, each a process of its own with one ``CostTracker`` and a ``ChatOpenAI`` talking to the local stub
server (``tests/stub_openai.py``) over HTTP (``--model fake``: the benchmarks' in-process fake chat model, no I/O),
the handler on every call, each call a run of its own:

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
exporter thread's CPU per call (what competes with the app for the GIL), its last spans written before the next
configuration runs (untimed), so that its work competes with the calls that made it. The figures are the median
and p10..p90 over rounds; the down configurations are compared with their backend's up one by the median of the
paired per-round differences (a slow round cancels out).

Run: ``python -m bench.outage_latency [--rounds N] [--batch N] [--model stub|fake]`` from the repository root
(PostgreSQL at ``$COSTOBS_TEST_POSTGRES_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
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

    url, spool, base, delay, timeout, model = sys.argv[1:7]
    if model == "fake":
        from bench._common import PRICES, fixed_chat_model
        llm = fixed_chat_model()
    else:
        PRICES = {"m-bench": {"input": "0.15", "output": "0.6"}}
        llm = ChatOpenAI(base_url=base, api_key="sk-test", model="m-bench", max_retries=0)
    t = CostTracker(url, prices=PRICES, user_salt="s", spool_dir=spool, export_delay=float(delay),
                    db_timeout=float(timeout))
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
    import threading
    TASK = f"/proc/self/task/{threading.get_native_id()}"

    def switches():
        # the calling thread's context switches (voluntary: its waits, the GIL's among them) and the time it
        # was runnable but waiting for a CPU (schedstat: on CPU, on a run queue, in ns)
        with open(f"{TASK}/status") as f:
            got = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
        with open(f"{TASK}/schedstat") as f:
            runq = int(f.read().split()[1])
        return int(got["voluntary_ctxt_switches"]), int(got["nonvoluntary_ctxt_switches"]), runq

    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            n = int(cmd[1])
            exp = exporter_thread(t)
            e0 = thread_cpu_ns(exp) or 0
            v0, i0, q0 = switches()
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(n):
                call()
            w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            v1, i1, q1 = switches()
            calls += n
            # the batch's last spans written (or spooled) before the next configuration runs, untimed: the
            # exporter's work then competes with the calls that made it, not with another process's
            t.exporter._flush_queue(30)
            e1 = thread_cpu_ns(exp) or 0
            print(json.dumps({"cpu": (c1 - c0) / n / 1000, "wall": (w1 - w0) / n / 1000,
                              "exporter_cpu": (e1 - e0) / n / 1000, "waits": (v1 - v0) / n,
                              "preempted": (i1 - i0) / n, "runq": (q1 - q0) / n / 1000}), flush=True)
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
    ap.add_argument("--model", choices=("stub", "fake"), default="stub",
                    help="stub: ChatOpenAI over HTTP to the stub server; fake: the benchmarks' in-process fake chat "
                         "model (no I/O: the app thread is CPU-bound, and competes with the exporter for the GIL "
                         "all the time)")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                    help="a subset of the configurations (each compared one needs its base)")
    args = ap.parse_args(argv)
    configs = tuple(args.configs)
    if any(k in BASE and BASE[k] not in configs for k in configs):
        ap.error("a configuration needs its base: " + ", ".join(f"{k} -> {b}" for k, b in BASE.items()))

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
        for name in configs:
            if name.startswith("pg"):
                proxies[name] = _Proc([sys.executable, "-c", PROXY, pg_port], env)
                port = int(proxies[name].read())
                urls[name] = sa.engine.make_url(pg_url).set(port=port).render_as_string(False)
            else:
                (tmp / name).mkdir()
                urls[name] = f"sqlite:///{tmp / name / 'costs.db'}"
        for name in configs:
            procs[name] = _Proc([sys.executable, "-c", CHILD, urls[name], str(tmp / f"spool-{name}"), stub.base_url,
                                 str(args.export_delay), str(args.db_timeout), args.model], env)
        for name in configs:
            assert procs[name].read() == "ready", name
        # the outages, after every tracker started against a database that answered
        if "pg_refused" in proxies:
            assert proxies["pg_refused"].ask("cut") == "ok"
        if "pg_hung" in proxies:
            assert proxies["pg_hung"].ask("hang") == "ok"
        if "sqlite_gone" in configs:
            for p in (tmp / "sqlite_gone").iterdir():
                p.unlink()

        cpu: dict[str, list[float]] = {k: [] for k in configs}
        wall: dict[str, list[float]] = {k: [] for k in configs}
        exp: dict[str, list[float]] = {k: [] for k in configs}
        waits: dict[str, list[float]] = {k: [] for k in configs}
        preempted: dict[str, list[float]] = {k: [] for k in configs}
        blocked: dict[str, list[float]] = {k: [] for k in configs}
        keys = list(configs)
        for r in range(args.rounds + 1):  # round 0: warm-up in the outage state, not counted
            i = r % len(keys)
            for k in keys[i:] + keys[:i]:
                got = json.loads(procs[k].ask(f"run {args.batch}"))
                if r:
                    cpu[k].append(got["cpu"])
                    wall[k].append(got["wall"])
                    exp[k].append(got["exporter_cpu"])
                    waits[k].append(got["waits"])
                    preempted[k].append(got["preempted"])
                    blocked[k].append(got["wall"] - got["cpu"] - got["runq"])
        stats = {k: json.loads(procs[k].ask("stats")) for k in configs}
    finally:
        for p in procs.values():
            p.stop()
        for p in proxies.values():
            p.stop()
        stub.stop()
    checks = []
    for k in configs:
        st = stats[k]
        lost = st["failed"] + st["dropped"]
        checks.append((k, st["calls"], st["exported"] + st["in_spool"], lost))
    stored = {"postgresql": _stored(pg_url)}
    expected = {"postgresql": sum(stats[k]["exported"] for k in configs if k.startswith("pg"))}
    if "sqlite_up" in configs:
        stored["sqlite_up"], expected["sqlite_up"] = _stored(urls["sqlite_up"]), stats["sqlite_up"]["exported"]
    drop_database(admin, pg_url)

    rows = []
    results: dict[str, Any] = {}
    for k in configs:
        c, w, e = summarize(cpu[k]), summarize(wall[k]), summarize(exp[k])
        sw, pr, bl = summarize(waits[k]), summarize(preempted[k]), summarize(blocked[k])
        results[k] = {"cpu": c, "wall": w, "exporter_cpu": e, "waits": sw, "preempted": pr, "blocked": bl}
        rows.append([k, fmt(c["median"]), f"{fmt(c['p10'])}..{fmt(c['p90'])}", fmt(w["median"]),
                     f"{fmt(w['p10'])}..{fmt(w['p90'])}", fmt(bl["median"]), fmt(e["median"]),
                     fmt(sw["median"], 3), fmt(pr["median"], 3)])
    print(f"\n## App-thread time per call, model {args.model} ({args.rounds} rounds of {args.batch} calls, "
          "interleaved; µs)\n")
    print(table(["configuration", "CPU median", "CPU p10..p90", "wall median", "wall p10..p90", "blocked",
                 "exporter CPU/call", "waits/call", "preempted/call"], rows))
    print("\n(blocked: wall minus CPU minus the time the thread was runnable but waiting for a CPU (schedstat): its "
          "waits, for the GIL and, with the stub model, for its HTTP replies (the fake model does no I/O); waits, "
          "preempted: its voluntary and involuntary context switches per call)")
    rows = []
    summary = []
    for k, base in BASE.items():
        if k not in configs:
            continue
        db = summarize([x - y for x, y in zip(blocked[k], blocked[base], strict=True)])
        results[k]["blocked_diff"] = db
        dc = summarize([x - y for x, y in zip(cpu[k], cpu[base], strict=True)])
        dw = summarize([x - y for x, y in zip(wall[k], wall[base], strict=True)])
        rc = dc["median"] / results[base]["cpu"]["median"]
        rw = dw["median"] / results[base]["wall"]["median"]
        results[k]["vs"] = {"base": base, "cpu_diff": dc, "wall_diff": dw, "cpu_ratio": rc, "wall_ratio": rw}
        rows.append([f"{k} - {base}", fmt(dc["median"]), f"{fmt(dc['p10'])}..{fmt(dc['p90'])}", f"{rc:+.1%}",
                     fmt(dw["median"]), f"{fmt(dw['p10'])}..{fmt(dw['p90'])}", f"{rw:+.1%}",
                     f"{fmt(db['median'])} ({fmt(db['p10'])}..{fmt(db['p90'])})"])
        if k != "pg_up_2":
            summary.append(metric(f"{k}: app-thread CPU per call vs {base}", rc * 100, "%", "within ±10%",
                                  abs(rc) <= 0.10, f"wall {rw:+.1%}"))
    print("\n## Down against up: paired per-round differences (µs per call)\n")
    print(table(["pair", "CPU diff median", "CPU diff p10..p90", "CPU", "wall diff median", "wall diff p10..p90",
                 "wall", "blocked diff (p10..p90)"], rows))
    print("\n## Every call accounted for\n")
    print(table(["configuration", "calls", "stored + in the spool", "lost"],
                [[k, n, where, lost] for k, n, where, lost in checks]))
    print(f"\nspans in the databases: {stored} (exported: {expected})")
    ok = all(lost == 0 and where == n for _, n, where, lost in checks) and stored == expected
    print_summary(summary)
    write_results(NAME if args.model == "stub" else f"{NAME}_{args.model}", vars(args),
                  {"configs": results, "checks": checks}, summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
