"""Exactly once: a batch reaches the database once, whatever happens between its COMMIT and the moment the writer
learns of it. Spans, run totals and hourly rollups are checked together, to the nano-dollar, on SQLite and
PostgreSQL.

- A COMMIT the server completed whose reply never reached the client (a proxy drops it): the exporter takes the
  batch for failed, spools it, and replays it; the replay finds it applied.
- A process killed between a replayed group's COMMIT and the spool's offset update: the next process replays the
  group again; it finds it applied.
- Spool records replayed a second time, grouped with records not yet applied: only the new ones are written.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from langchain_openai import ChatOpenAI

from costobs_callbacks import CostTracker
from costobs_callbacks._export import read_records

try:
    from .proxy import Proxy
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from proxy import Proxy  # type: ignore[no-redef]
    from stub_openai import StubReply, StubUsage

MODEL = "m-once"
PRICES = {MODEL: {"input": "2", "output": "8"}}
CALL_NANOS = 10 * 2_000 + 2 * 8_000  # 10 in, 2 out at $2 / $8 per million tokens: 36,000 nano-USD
ROOT = Path(__file__).resolve().parent.parent


def chat(stub: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0)


def stored(url: str) -> dict[str, Any]:
    """What the database at ``url`` holds: span count and distinct spans (run, id, start), every run's stored totals
    and the same totals summed from its spans, and the rollup table's totals."""
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            n = conn.execute(sa.text("SELECT COUNT(*) FROM costobs_spans")).scalar_one()
            # (a span id is not unique by itself: invocations of one config give their root calls one id)
            distinct = conn.execute(sa.text(
                "SELECT COUNT(*) FROM (SELECT DISTINCT run_id, span_id, start_at FROM costobs_spans) d")).scalar_one()
            run_rows = {r[0]: tuple(int(x) for x in r[1:]) for r in conn.execute(sa.text(
                "SELECT run_id, cost_nanos, input_tokens, output_tokens, llm_calls, span_count, invocations "
                "FROM costobs_runs"))}
            from_spans = {r[0]: tuple(int(x) for x in r[1:]) for r in conn.execute(sa.text(
                "SELECT run_id, COALESCE(SUM(cost_nanos), 0), SUM(input_tokens), SUM(output_tokens), "
                "SUM(CASE WHEN kind = 'llm' THEN 1 ELSE 0 END), COUNT(*), "
                "SUM(CASE WHEN parent_id IS NULL THEN 1 ELSE 0 END) FROM costobs_spans GROUP BY run_id"))}
            roll = tuple(int(x or 0) for x in conn.execute(sa.text(
                "SELECT SUM(cost_hi) * 4294967296 + SUM(cost_lo), SUM(inp_hi) * 4294967296 + SUM(inp_lo), "
                "SUM(llm_calls), SUM(calls), SUM(runs) FROM costobs_rollups_hourly")).one())
            opened = int(conn.execute(sa.text(
                "SELECT COUNT(*) FROM costobs_spans WHERE opens_run = :t"), {"t": True}).scalar_one())
    finally:
        eng.dispose()
    return {"spans": int(n), "distinct": int(distinct), "runs": run_rows, "runs_from_spans": from_spans,
            "rollup": roll, "opened": opened}


def assert_exact(url: str, calls: int, runs: int) -> None:
    """``calls`` chat calls of ``CALL_NANOS`` each, in ``runs`` runs, stored once: spans, run totals, rollups."""
    got = stored(url)
    assert (got["spans"], got["distinct"]) == (calls, calls)
    assert got["runs"] == got["runs_from_spans"]  # every run's totals are its spans', none counted twice
    assert len(got["runs"]) == runs
    assert sum(r[0] for r in got["runs"].values()) == calls * CALL_NANOS
    assert got["rollup"] == (calls * CALL_NANOS, calls * 10, calls, calls, runs)
    assert got["opened"] == runs


# -- a COMMIT whose reply is lost ------------------------------------------------------------------------

@pytest.fixture
def pg(postgres_database: Callable[[], str]) -> Iterator[tuple[str, Proxy, str]]:
    """A fresh PostgreSQL database: its URL, a proxy in front of the server, and the URL through the proxy."""
    url = postgres_database()
    proxy = Proxy(int(sa.engine.make_url(url).port or 5432))
    yield url, proxy, sa.engine.make_url(url).set(port=proxy.port).render_as_string(False)
    proxy.close()


def test_a_commit_whose_reply_is_lost_is_stored_once(pg: tuple[str, Proxy, str], tmp_path: Path,
                                                     stub_openai: Any) -> None:
    """The server commits a batch, the proxy drops the reply: the exporter spools the batch and replays it; the
    replay finds its batch applied and writes nothing. A run continued across the lost batch and later ones keeps
    exact totals."""
    direct, proxy, via = pg
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    llm = chat(stub_openai)
    t = CostTracker(via, prices=PRICES, user_salt="s", spool_dir=tmp_path / "spool", export_delay=0.05,
                    db_timeout=5.0)
    shared = t.config(feature="once", tenant_id="acme")  # one run, continued in every round
    rounds, per_round = 3, 30
    for r in range(rounds):
        if r < 2:
            proxy.drop_commit_replies(1)  # the first batch of this round: committed, its reply lost
        for i in range(per_round):
            llm.invoke("hi", config=shared if i % 3 == 0 else t.config(feature="once", tenant_id="acme"))
        assert t.flush(30)
    st = t.stats
    t.close()
    assert proxy.commits_dropped == 2
    assert st["spooled"] > 0 and st["replayed"] == st["spooled"]  # the lost batches went by the spool
    assert st["exported"] + st["replayed"] == rounds * per_round
    assert (st["failed"], st["in_spool"]) == (0, 0)
    calls = rounds * per_round
    assert_exact(direct, calls, runs=1 + calls - rounds * 10)
    with CostTracker(direct, user_salt="s", spool_dir=tmp_path / "other") as reader:
        assert reader.spend(where={"tenant_id": "acme"}) == Decimal(calls * CALL_NANOS).scaleb(-9)
        rc = reader.run_cost(shared["run_id"])
        assert rc is not None and (rc.llm_calls, rc.cost_usd) == (30, Decimal(30 * CALL_NANOS).scaleb(-9))


# -- a process killed between a replay's COMMIT and the spool's offset update ---------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from langchain_openai import ChatOpenAI
    from costobs_callbacks import CostTracker
    from costobs_callbacks._export import StoreSpool

    _write = StoreSpool._write

    def write_then_die(self, payloads):
        _write(self, payloads)  # the database committed the replayed group ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the spool's offset moves on

    StoreSpool._write = write_then_die
    url, spool, base, n = sys.argv[1:5]
    t = CostTracker(url, prices={"m-once": {"input": "2", "output": "8"}}, user_salt="s", spool_dir=spool,
                    export_delay=0.05, db_timeout=1.0)
    llm = ChatOpenAI(base_url=base, api_key="sk-test", model="m-once", max_retries=0)
    print("ready", flush=True)
    sys.stdin.readline()  # the test takes the database away
    shared = t.config(feature="child")
    for i in range(int(n)):
        llm.invoke("hi", config=shared if i % 2 else t.config(feature="child"))
    t.flush(0.5)  # every batch handed to the spool (the database is away: not done)
    print("spooled", t.stats["spooled"], t.stats["in_spool"], flush=True)
    sys.stdin.readline()  # the test brings the database back; the exporter replays, commits, and dies
    time.sleep(120)
""")


class _Away:
    """Takes a database away and brings it back: PostgreSQL through a proxy (cut, restored); SQLite by deleting
    its file and making a new, empty one at the path."""

    def __init__(self, backend: str, tmp_path: Path, make_pg: Callable[[], str]) -> None:
        self.backend = backend
        self.proxy: Proxy | None = None
        if backend == "sqlite":
            self.path = tmp_path / "db" / "costs.db"
            self.path.parent.mkdir()
            self.direct = self.url = f"sqlite:///{self.path}"
        else:
            self.direct = make_pg()
            self.proxy = Proxy(int(sa.engine.make_url(self.direct).port or 5432))
            self.url = sa.engine.make_url(self.direct).set(port=self.proxy.port).render_as_string(False)
        CostTracker(self.direct, user_salt="s", spool_dir=tmp_path / "schema").close()  # the schema made

    def away(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()
        else:
            for p in self.path.parent.iterdir():
                p.unlink()

    def back(self, tmp_path: Path) -> None:
        if self.proxy is not None:
            self.proxy.restore()
        else:
            CostTracker(self.direct, user_salt="s", spool_dir=tmp_path / "schema").close()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def away(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Away]:
    make = (lambda: "") if request.param == "sqlite" else request.getfixturevalue("postgres_database")
    a = _Away(request.param, tmp_path, make)
    yield a
    a.close()


def test_a_process_killed_between_commit_and_offset_update(away: _Away, tmp_path: Path, stub_openai: Any) -> None:
    """A child spools 60 calls while the database is away; when it is back the child replays them in one group,
    the group commits, and the child is killed (SIGKILL) before the spool's offset records it. The next process
    replays the same group from the same offset: nothing is written twice."""
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    spool_dir = tmp_path / "spool"
    n = 60
    child = subprocess.Popen([sys.executable, "-c", CHILD, away.url, str(spool_dir), stub_openai.base_url, str(n)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().split() == ["ready"]
        away.away()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["spooled", str(n), str(n)]
        away.back(tmp_path)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert_exact(away.direct, n, runs=1 + n // 2)  # the group is in: committed before the kill
    (f,) = spool_dir.glob("*.spool")
    assert int(f.with_suffix(".done").read_text().strip() or 0) == 0  # ... and the spool does not know it

    t = CostTracker(away.direct, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    assert t.stats["spool_found"] == n
    assert t.flush(30)
    st = t.stats
    t.close()
    assert (st["replayed"], st["in_spool"], st["failed"]) == (n, 0, 0)
    assert_exact(away.direct, n, runs=1 + n // 2)
    assert list(spool_dir.glob("*.spool")) == []


# -- records replayed again, grouped with new ones ----------------------------------------------------------

def test_records_already_applied_are_skipped_in_a_group_with_new_ones(away: _Away, tmp_path: Path,
                                                                    stub_openai: Any) -> None:
    """A spool file replayed up to its third record, then found again whole (as a file whose ``.done`` offset
    was lost): its five records are replayed as one group, and only the two not yet applied are written. One run
    spans all five records: its totals count each call once."""
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    llm = chat(stub_openai)
    spool_dir = tmp_path / "spool"
    t = CostTracker(away.url, prices=PRICES, user_salt="s", spool_dir=spool_dir, export_delay=30,
                    db_timeout=1.0)  # a batch per flush: a record per round
    away.away()
    shared = t.config(feature="group")
    per_record = 4
    for r in range(5):
        for i in range(per_record):
            llm.invoke("hi", config=shared if i == 0 else t.config(feature="group"))
        assert not t.flush(0.05)  # this round's calls go to the spool as one batch: a record of their own
        deadline = time.monotonic() + 30
        while t.stats["spooled"] < (r + 1) * per_record and time.monotonic() < deadline:
            time.sleep(0.01)
    assert t.stats["spooled"] == 5 * per_record
    t.close(timeout=0.5)  # the file stays for the next process (the database is away)
    (f,) = spool_dir.glob("*.spool")
    data = f.read_bytes()
    recs = list(read_records(data))
    assert len(recs) == 5 and all(r.payload is not None for r in recs)
    whole = tmp_path / "whole.spool"
    shutil.copyfile(f, whole)
    f.write_bytes(data[:recs[2].end])  # the first three records only
    f.with_suffix(".done").unlink(missing_ok=True)
    away.back(tmp_path)

    first = CostTracker(away.direct, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    assert first.flush(30) and first.stats["replayed"] == 3 * per_record
    first.close()
    assert_exact(away.direct, 3 * per_record, runs=1 + 3 * (per_record - 1))

    assert not spool_dir.exists()  # replayed, and removed
    spool_dir.mkdir()
    shutil.copyfile(whole, spool_dir / f.name)  # the whole file again, nothing marked done
    second = CostTracker(away.direct, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    assert second.stats["spool_found"] == 5 * per_record
    assert second.flush(30)
    st = second.stats
    second.close()
    assert (st["replayed"], st["in_spool"], st["failed"]) == (5 * per_record, 0, 0)
    assert_exact(away.direct, 5 * per_record, runs=1 + 5 * (per_record - 1))


# -- retention -----------------------------------------------------------------------------------------------

def test_prune_deletes_the_ids_of_batches_formed_before_its_cut(database_url: str, tmp_path: Path) -> None:
    """``costobs db prune --older-than 30d`` deletes the applied-batch ids of batches formed before its cut with the
    spans of that time, in batches, and keeps the newer ones (a spooled copy of those may still arrive)."""
    from costobs_callbacks._export import new_batch_id
    from costobs_callbacks._store import batches
    from costobs_callbacks._store.applied import id_bound
    from costobs_callbacks.cli import main

    CostTracker(database_url, user_salt="s", spool_dir=tmp_path / "schema").close()
    now = time.time()
    old = [id_bound(now - 86400 * d)[:12] + f"{i:020x}" for i, d in enumerate(range(31, 61))]  # 31..60 days ago
    recent = [id_bound(now - 86400 * d)[:12] + f"{i:020x}" for i, d in enumerate(range(0, 29))] + [new_batch_id()]
    eng = sa.create_engine(database_url)
    with eng.begin() as conn:
        conn.execute(sa.insert(batches), [{"batch_id": b} for b in old + recent])
    assert sorted(old + recent) == sorted(old) + sorted(recent)  # text order is time order
    assert main(["db", "prune", "--older-than", "30d", "--yes", "--batch-size", "7", "--database-url",
                 database_url]) == 0
    with eng.connect() as conn:
        kept = conn.execute(sa.select(batches.c.batch_id)).scalars().all()
    eng.dispose()
    assert sorted(kept) == sorted(recent)


def test_batch_ids_are_time_ordered_and_a_forked_child_does_not_repeat_its_parents() -> None:
    """Batch ids begin with the time (text order is time order, which prune relies on); their random part comes
    from a generator of ours, seeded by the OS and again in a forked child (an app's ``random.seed`` cannot make
    two processes' ids alike, and a child does not repeat its parent's)."""
    import random

    from costobs_callbacks._export import new_batch_id

    random.seed(7)  # the app's own seed: not ours
    ids = [new_batch_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(b) == 32 for b in ids)
    assert [b[:12] for b in ids] == sorted(b[:12] for b in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_batch_id()[12:].encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child != new_batch_id()[12:]
