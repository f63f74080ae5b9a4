"""Many writers, exact: 4 processes x 4 threads writing to one database at once (two threads of each calling real
LangChain chat models against the stub server, two recording usage, some of it backdated), some runs continued
from several processes with the same run id. Spans, run totals, ``rollup``, ``spend`` and ``top_runs`` are
checked to the nano-dollar against an oracle computed here, from what each process says it sent and the prices,
on PostgreSQL and on one SQLite file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from costobs_callbacks import CostTracker

try:
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from stub_openai import StubReply, StubUsage

ROOT = Path(__file__).resolve().parent.parent
PROCESSES, THREADS = 4, 4
PRICES = {"m-a": {"input": "2", "output": "8", "cache_read": "0.5"},
          "m-b": {"input": "0.25", "output": "1.25", "cache_read": "0.025"}}
NANOS_PER_TOKEN = {m: tuple(int(Decimal(p[k]) * 1000) for k in ("input", "cache_read", "output"))
                   for m, p in PRICES.items()}  # USD per million tokens -> nano-USD per token
SHARED = [f"0195f000-0000-7000-8000-00000000000{i}" for i in range(3)]  # runs every process adds to

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from datetime import UTC, datetime, timedelta
    from langchain_openai import ChatOpenAI
    from costobs_callbacks import CostTracker

    url, spool, base, plan_path = sys.argv[1:5]
    plan = json.load(open(plan_path))
    t = CostTracker(url, prices=plan["prices"], user_salt="s", spool_dir=spool, export_delay=0.02)
    print("ready", flush=True)
    sys.stdin.readline()
    sent = [[] for _ in plan["threads"]]

    def work(i, calls):
        llm = ChatOpenAI(base_url=base, api_key="sk-test", model=calls[0]["model"], max_retries=0) \\
            if calls and calls[0]["via"] == "langchain" else None
        now = datetime.now(UTC)
        for c in calls:
            attribution = {"feature": c["feature"], "tenant_id": c["tenant"]}
            if c["via"] == "langchain":
                cfg = t.config(run_id=c["run"], **attribution) if c["run"] else t.config(**attribution)
                llm.invoke(f'{c["in"]} {c["out"]} {c["cr"]}', config=cfg)
                rid = str(cfg["run_id"])
            else:
                at = now - timedelta(hours=c["hours_ago"])
                rc = t.record_usage(model=c["model"], input_tokens=c["in"], output_tokens=c["out"],
                                    cache_read_tokens=c["cr"], at=at, run_id=c["run"], **attribution)
                rid = str(rc.run_id)
            sent[i].append({**c, "run": rid})

    threads = [threading.Thread(target=work, args=(i, calls)) for i, calls in enumerate(plan["threads"])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ok = t.flush(120)
    st = t.stats
    t.close()
    print(json.dumps({"ok": ok, "stats": st, "sent": [c for s in sent for c in s]}), flush=True)
""")


def _plan(rng: random.Random, process: int) -> dict[str, Any]:
    """What one process sends: per thread, its calls (``run`` None: a run of its own)."""
    threads = []
    for th in range(THREADS):
        via = "langchain" if th < 2 else "usage"
        model = "m-a" if (process + th) % 2 else "m-b"
        calls = []
        for _ in range(25 if via == "langchain" else 40):
            shared = rng.random() < 0.3
            inp = rng.randint(1, 5000)
            calls.append({
                "via": via, "model": model if via == "langchain" else rng.choice(sorted(PRICES)),
                "run": rng.choice(SHARED) if shared else None,
                "feature": "shared" if shared else rng.choice(["search", "chat", "batch"]),
                "tenant": "t-shared" if shared else rng.choice(["acme", "globex"]),
                "in": inp, "out": rng.randint(1, 800), "cr": rng.randint(0, inp // 2),
                "hours_ago": 0 if via == "langchain" else rng.choice([0, 2, 5, 30]),
            })
        threads.append(calls)
    return {"prices": PRICES, "threads": threads}


def _cost(c: dict[str, Any]) -> int:
    p_in, p_cr, p_out = NANOS_PER_TOKEN[c["model"]]
    return (c["in"] - c["cr"]) * p_in + c["cr"] * p_cr + c["out"] * p_out


def _usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


def _run_writers(url: str, tmp_path: Path, stub: Any) -> list[dict[str, Any]]:
    """Start the writers, release them together, and return what each one sent (and its stats)."""
    rng = random.Random(20261210)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = []
    for p in range(PROCESSES):
        plan_path = tmp_path / f"plan-{p}.json"
        plan_path.write_text(json.dumps(_plan(rng, p)))
        children.append(subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(tmp_path / f"spool-{p}"), stub.base_url, str(plan_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    try:
        for c in children:
            assert c.stdout is not None and c.stdout.readline().split() == ["ready"]
        for c in children:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        reports = []
        for c in children:
            out, err = c.communicate(timeout=600)
            assert c.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_and_threads_writing_together_store_exact_figures(
        backend: str, tmp_path: Path, stub_openai: Any, request: pytest.FixtureRequest) -> None:
    def usage_of(req: dict[str, Any]) -> StubReply:
        inp, out, cr = (int(x) for x in req["messages"][-1]["content"].split())
        return StubReply("ok", usage=StubUsage(inp, out, cached_tokens=cr))

    stub_openai.responder = usage_of
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/shared.db"
    else:
        make: Callable[[], str] = request.getfixturevalue("postgres_database")
        url = make()
    CostTracker(url, user_salt="s", spool_dir=tmp_path / "schema").close()  # the schema, before the race
    since = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    started = time.monotonic()
    reports = _run_writers(url, tmp_path, stub_openai)
    took = time.monotonic() - started
    sent = [c for r in reports for c in r["sent"]]
    assert len(sent) == PROCESSES * 2 * (25 + 40)
    for r in reports:
        st = r["stats"]
        assert r["ok"] and (st["failed"], st["dropped"], st["refused"], st["in_spool"]) == (0, 0, 0, 0), st

    # the oracle: from what was sent and the prices, nothing read back from the library
    run_cost: dict[str, int] = defaultdict(int)
    run_calls: dict[str, int] = defaultdict(int)
    run_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    run_feature: dict[str, str] = {}
    feature: dict[str, list[Any]] = defaultdict(lambda: [0, 0, 0, set()])
    tenant_since: dict[str, int] = defaultdict(int)
    model_calls: dict[str, int] = defaultdict(int)
    for c in sent:
        cost = _cost(c)
        rid = c["run"]
        run_cost[rid] += cost
        run_calls[rid] += 1
        for i, k in enumerate(("in", "out", "cr")):
            run_tokens[rid][i] += c[k]
        assert run_feature.setdefault(rid, c["feature"]) == c["feature"]
        f = feature[c["feature"]]
        f[0] += cost
        f[1] += c["in"]
        f[2] += 1
        f[3].add(rid)
        if c["hours_ago"] < 3:
            tenant_since[c["tenant"]] += cost
        model_calls[c["model"]] += 1
    assert len([r for r in run_calls if r in SHARED]) == len(SHARED)
    assert all(run_calls[r] > PROCESSES for r in SHARED)  # each continued by several processes

    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM costobs_spans")).scalar_one() == len(sent)
            stored = {r[0]: tuple(int(x) for x in r[1:]) for r in conn.execute(sa.text(
                "SELECT run_id, cost_nanos, input_tokens, output_tokens, cache_read_tokens, llm_calls, span_count, "
                "invocations FROM costobs_runs"))}
    finally:
        eng.dispose()
    assert stored == {rid: (run_cost[rid], *run_tokens[rid], run_calls[rid], run_calls[rid], run_calls[rid])
                      for rid in run_calls}

    with CostTracker(url, user_salt="s", spool_dir=tmp_path / "reader") as reader:
        by_feature = {r.key["feature"]: (r.cost_usd, r.input_tokens, r.llm_calls, r.runs)
                      for r in reader.rollup(by=["feature"])}
        assert by_feature == {k: (_usd(v[0]), v[1], v[2], len(v[3])) for k, v in feature.items()}
        assert {r.key["model"]: r.llm_calls for r in reader.rollup(by=["model"])} == model_calls
        assert {r.key["tenant_id"]: r.cost_usd for r in reader.rollup(by=["tenant_id"], since=since)} \
            == {k: _usd(v) for k, v in tenant_since.items()}
        assert reader.spend() == _usd(sum(run_cost.values()))
        assert reader.spend(where={"tenant_id": "acme"}) == _usd(sum(_cost(c) for c in sent if c["tenant"] == "acme"))
        assert reader.spend(since=since) == _usd(sum(tenant_since.values()))
        top = sorted(run_cost.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        assert [(str(r.run_id), r.cost_usd) for r in reader.top_runs(n=10)] == [(k, _usd(v)) for k, v in top]
        for rid in SHARED:
            rc = reader.run_cost(rid)
            assert rc is not None and (rc.cost_usd, rc.llm_calls, rc.input_tokens) \
                == (_usd(run_cost[rid]), run_calls[rid], run_tokens[rid][0])
    print(f"{backend}: {len(sent)} calls from {PROCESSES} processes x {THREADS} threads in {took:.1f}s")
