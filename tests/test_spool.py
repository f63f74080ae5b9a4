"""No lost spans: the spool keeps what the database does not take, and replays it in order, once.

PostgreSQL is reached through a TCP proxy the tests control (cut: connections refused and the open ones
closed; hung: connections accepted, nothing forwarded), SQLite by deleting its file under the tracker; a
process killed while it spools is replayed by the next."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from langchain_openai import ChatOpenAI

from costobs_callbacks import CostTracker
from costobs_callbacks._export import Spool, encode, read_records

try:
    from .proxy import Proxy
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from proxy import Proxy  # type: ignore[no-redef]
    from stub_openai import StubReply, StubUsage

MODEL = "m-spool"
PRICES = {MODEL: {"input": "2", "output": "8"}}
CALL_NANOS = 10 * 2_000 + 2 * 8_000  # 10 in, 2 out at $2 / $8 per million tokens: 36,000 nano-USD
ROOT = Path(__file__).resolve().parent.parent


def chat(stub: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0)


def count_spans(url: str) -> tuple[int, int, int]:
    """(spans, distinct span ids, the runs' summed cost) in the database at ``url``."""
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            n, distinct = conn.execute(sa.text("SELECT COUNT(*), COUNT(DISTINCT span_id) FROM costobs_spans")).one()
            cost = conn.execute(sa.text("SELECT COALESCE(SUM(cost_nanos), 0) FROM costobs_runs")).scalar_one()
    finally:
        eng.dispose()
    return int(n), int(distinct), int(cost)


def spooled_items(directory: Path) -> tuple[int, int]:
    """(items in whole records, items of torn or corrupt ones) in the spool files of ``directory``."""
    good = bad = 0
    for p in directory.glob("*.spool"):
        for rec in read_records(p.read_bytes()):
            if rec.payload is None:
                bad += rec.count
            else:
                good += rec.count
    return good, bad


# -- the file format --------------------------------------------------------------------------------

def test_a_torn_tail_and_a_corrupt_record_lose_only_themselves(tmp_path, caplog):
    first = Spool(tmp_path / "s")
    for i in range(6):
        first.append(json.dumps({"i": i}).encode(), 10 + i)
    assert (first.spooled, first.pending(), first.found) == (sum(range(10, 16)), sum(range(10, 16)), 0)
    path = next((tmp_path / "s").glob("*.spool"))
    first._own.close()  # type: ignore[union-attr]  # the process "dies": its lock is released, nothing replayed
    first._own = None

    data = bytearray(path.read_bytes())
    recs = list(read_records(bytes(data)))
    assert [r.count for r in recs] == [10, 11, 12, 13, 14, 15] and all(r.payload for r in recs)
    data[recs[2].start + 20] ^= 0xFF  # a flipped bit inside record 3's payload
    del data[recs[5].start + 7:]  # the last record torn inside its header (a crash mid-write)
    path.write_bytes(bytes(data))

    nxt = Spool(tmp_path / "s")
    assert nxt.found == 10 + 11 + 13 + 14  # whole records only
    got: list[int] = []
    with caplog.at_level(logging.ERROR, logger="costobs_callbacks"):
        assert nxt.replay(lambda payloads: got.extend(json.loads(p)["i"] for p in payloads))
    assert got == [0, 1, 3, 4]
    assert (nxt.replayed, nxt.lost, nxt.pending()) == (48, 12, 0)  # the torn header's count is unknown: 0
    assert sum("torn or corrupt" in r.getMessage() for r in caplog.records) == 2
    assert not (tmp_path / "s").exists()  # replayed and removed, the folder with its files


def test_a_record_torn_after_its_header_counts_its_items_lost(tmp_path):
    rec = encode(b'{"i":1}', 7)
    data = encode(b'{"i":0}', 5) + rec[:-3]
    out = list(read_records(data))
    assert [(r.count, r.payload is None) for r in out] == [(5, False), (7, True)]


def test_replay_groups_records_and_resumes_after_the_last_group_written(tmp_path):
    sp = Spool(tmp_path / "s")
    for i in range(5):
        sp.append(str(i).encode(), 2)
    groups: list[list[bytes]] = []
    fail = [True]

    def flaky(payloads: list[bytes]) -> None:
        if b"2" in payloads and fail[0]:
            fail[0] = False
            raise ConnectionError("down")
        groups.append(payloads)

    with pytest.raises(ConnectionError):
        sp.replay(flaky, group=4)  # groups of 4 items: records (0, 1), (2, 3), (4)
    assert groups == [[b"0", b"1"]] and sp.pending() == 6
    sp.append(b"5", 2)
    assert sp.replay(flaky, group=4)
    assert groups == [[b"0", b"1"], [b"2", b"3"], [b"4", b"5"]] and sp.replayed == 12
    again = Spool(tmp_path / "s")
    assert again.found == 0 and not (tmp_path / "s").exists()


def test_a_file_held_by_a_live_process_is_not_claimed(tmp_path):
    a = Spool(tmp_path / "s")
    a.append(b"x", 3)
    b = Spool(tmp_path / "s")
    assert b.found == 0 and b.pending() == 0  # a still holds its lock
    a.close()  # its records still pending: the file stays for the next process
    c = Spool(tmp_path / "s")
    assert c.found == 3


# -- SQLite: the file deleted under the tracker -------------------------------------------------------

def test_sqlite_file_deleted_is_detected_spooled_and_replayed(tmp_path, stub_openai, caplog):
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    db = tmp_path / "data" / "costs.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    spool_dir = tmp_path / "spool"
    llm = chat(stub_openai)
    t = CostTracker(url, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    for _ in range(3):
        llm.invoke("hi", config=t.config(feature="f"))
    assert t.flush(5) and t.stats["exported"] == 3
    for p in db.parent.iterdir():
        p.unlink()
    db.parent.rmdir()  # the folder removed too
    with caplog.at_level(logging.ERROR, logger="costobs_callbacks"):
        for _ in range(5):
            llm.invoke("hi", config=t.config(feature="f"))
        assert not t.flush(1.0)
    st = t.stats
    assert (st["exported"], st["spooled"], st["in_spool"], st["failed"]) == (3, 5, 5, 0)
    assert any("is gone" in r.getMessage() for r in caplog.records)
    assert not db.exists()  # nothing wrote into a file of its own meanwhile
    t.close(timeout=2)

    db.parent.mkdir()
    t2 = CostTracker(url, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    assert t2.stats["spool_found"] == 5
    assert t2.flush(10)
    assert (t2.stats["replayed"], t2.stats["in_spool"]) == (5, 0)
    t2.close()
    assert count_spans(url) == (5, 5, 5 * CALL_NANOS)
    assert not spool_dir.exists()


def test_sqlite_file_deleted_and_made_again_is_written_to(tmp_path, stub_openai):
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    db = tmp_path / "costs.db"
    url = f"sqlite:///{db}"
    llm = chat(stub_openai)
    with CostTracker(url, prices=PRICES, user_salt="s", spool_dir=tmp_path / "spool") as t:
        llm.invoke("hi", config=t.config())
        assert t.flush(5)
        for p in tmp_path.glob("costs.db*"):
            p.unlink()
        CostTracker(url, user_salt="s", spool_dir=tmp_path / "other").close()  # a fresh file at the path
        llm.invoke("hi", config=t.config())
        assert t.flush(5)
        assert t.stats["exported"] + t.stats["replayed"] == 2
    assert count_spans(url) == (1, 1, CALL_NANOS)


# -- PostgreSQL through a proxy ----------------------------------------------------------------------

@pytest.fixture
def pg(postgres_database):
    url = postgres_database()
    port = sa.engine.make_url(url).port
    proxy = Proxy(int(port))
    yield url, proxy, str(sa.engine.make_url(url).set(port=proxy.port).render_as_string(False))
    proxy.close()


def _load(tracker: CostTracker, llm: ChatOpenAI, n: int, done: list[int]) -> None:
    for _ in range(n):
        llm.invoke("hi", config=tracker.config(feature="load"))
        done[0] += 1


@pytest.mark.parametrize("outage", ["cut", "hang"])
def test_postgres_outage_mid_load_every_span_stored_once(pg, tmp_path, stub_openai, outage):
    direct, proxy, via = pg
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    llm = chat(stub_openai)
    t = CostTracker(via, prices=PRICES, user_salt="s", spool_dir=tmp_path / "spool", export_delay=0.05,
                    db_timeout=1.0)
    n = 600
    done = [0]
    worker = threading.Thread(target=_load, args=(t, llm, n, done))
    worker.start()
    while done[0] < 150:
        time.sleep(0.005)
    getattr(proxy, outage)()
    at = done[0]
    while done[0] < at + 200:
        time.sleep(0.005)
    # past db_timeout (the watchdog cuts a hung write's socket), batches go to the spool; on a loaded machine the
    # watchdog's thread and the exporter's may take a while to run, so wait for it, with a deadline
    deadline = time.monotonic() + 20
    while t.stats["spooled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.stats["spooled"] > 0
    assert not t.flush(0.5) and t.stats["in_spool"] > 0
    proxy.restore()
    worker.join(60)
    assert t.flush(30)
    st = t.stats
    t.close()
    assert st["exported"] + st["replayed"] == n and st["replayed"] == st["spooled"]
    assert (st["failed"], st["dropped"], st["in_spool"], st["spool_lost"]) == (0, 0, 0, 0)
    assert count_spans(direct) == (n, n, n * CALL_NANOS)


def test_postgres_down_at_start_spools_then_replays(pg, tmp_path, stub_openai):
    direct, proxy, via = pg
    CostTracker(direct, user_salt="s", spool_dir=tmp_path / "x").close()  # schema made
    proxy.cut()
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    llm = chat(stub_openai)
    t0 = time.monotonic()
    t = CostTracker(via, prices=PRICES, user_salt="s", spool_dir=tmp_path / "spool", db_timeout=1.0)
    for _ in range(20):
        llm.invoke("hi", config=t.config())
    assert time.monotonic() - t0 < 10
    assert not t.flush(1.0)
    assert t.stats["in_spool"] == 20
    proxy.restore()
    assert t.flush(20)
    t.close()
    assert count_spans(direct) == (20, 20, 20 * CALL_NANOS)


# -- a process killed while it spools ----------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from langchain_openai import ChatOpenAI
    from costobs_callbacks import CostTracker
    url, spool, base = sys.argv[1:4]
    t = CostTracker(url, prices={"m-spool": {"input": "2", "output": "8"}}, user_salt="s", spool_dir=spool,
                    export_delay=0.05, db_timeout=1.0)
    llm = ChatOpenAI(base_url=base, api_key="sk-test", model="m-spool", max_retries=0)
    i = 0
    while True:
        llm.invoke("hi", config=t.config(feature="child"))
        i += 1
        if i % 20 == 0:
            st = t.stats
            print(i, st["spooled"], flush=True)
""")


def test_a_process_killed_while_spooling_is_replayed_by_the_next(pg, tmp_path, stub_openai):
    direct, proxy, via = pg
    CostTracker(direct, user_salt="s", spool_dir=tmp_path / "x").close()
    proxy.cut()
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    spool_dir = tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", CHILD, via, str(spool_dir), stub_openai.base_url],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    spooled = 0
    deadline = time.monotonic() + 60
    while spooled < 300 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        spooled = int(line.split()[1])
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert spooled >= 300
    good, torn = spooled_items(spool_dir)
    assert good >= spooled

    proxy.restore()
    t = CostTracker(direct, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    assert t.stats["spool_found"] == good
    started = time.perf_counter()
    assert t.flush(30)
    took = time.perf_counter() - started
    st = t.stats
    t.close()
    assert (st["replayed"], st["spool_lost"], st["in_spool"]) == (good, torn, 0)
    assert count_spans(direct) == (good, good, good * CALL_NANOS)
    assert list(spool_dir.glob("*.spool")) == []
    print(f"replayed {good} spans in {took:.3f}s")


def test_flush_counts_what_is_found_spooled_at_start(tmp_path, stub_openai):
    """``flush`` waits for what the tracker found spooled when it started, not only for what it recorded."""
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    db = tmp_path / "costs.db"
    url = f"sqlite:///{db}"
    spool_dir = tmp_path / "spool"
    t = CostTracker(url, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    db.unlink()
    llm = chat(stub_openai)
    for _ in range(4):
        llm.invoke("hi", config=t.config())
    t.close(timeout=1)
    assert t.stats["in_spool"] == 4
    t2 = CostTracker(url, prices=PRICES, user_salt="s", spool_dir=spool_dir)
    assert t2.flush(10) and t2.stats["replayed"] == 4
    rc = t2.rollup(by=())
    t2.close()
    assert (rc[0].cost_usd, rc[0].llm_calls, rc[0].runs) == (Decimal(4 * CALL_NANOS) / 10**9, 4, 4)


# -- the spooled path writes what the direct one writes -------------------------------------------------

def test_a_spooled_batch_stores_what_the_direct_write_stores(tmp_path, postgres_database):
    """The same random spans (malformed ones included: see ``test_store_paths``), written by ``write_batch``
    and, through the spool's JSON, by ``write_rows``, on each write path: the same rows, the same sanitising;
    two records replayed together as two batches written one after the other. Each batch written a second time
    (the same ids: a retry, a replay) changes nothing on either side."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from costobs_callbacks import LoopPolicy, PriceBook
    from costobs_callbacks._export import Batch, BatchExporter, StoreSpool, dump_rows
    from costobs_callbacks._ledger import Ledger
    from costobs_callbacks._store import Store
    from tests.test_store_paths import PRICES as PATH_PRICES
    from tests.test_store_paths import _make, _stored, call

    pairs = []
    for kind in ("fast", "portable", "pg"):
        pair = []
        for side in ("direct", "spooled"):
            url = postgres_database() if kind == "pg" else f"sqlite:///{tmp_path}/{kind}-{side}.db"
            s = Store(url)
            if kind == "portable":
                s._portable()
            s.ensure_schema()
            pair.append(s)
        pairs.append(pair)
    made: list[Any] = []
    source = BatchExporter(made.extend, schedule_delay=3600)
    ledger = Ledger(prices=PriceBook(PATH_PRICES), exporter=source, user_salt=b"salt",
                    loops=LoopPolicy(enabled=False))

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
    @given(st.lists(call, min_size=1, max_size=6), st.booleans())
    def check(calls: list[dict[str, Any]], split: bool) -> None:
        run_ids = [_make(ledger, c) for c in calls]
        assert source.force_flush(10)
        items = list(made)
        made.clear()
        parts = [items[: len(items) // 2], items[len(items) // 2:]] if split and len(items) > 1 else [items]
        for direct, spooled in pairs:
            before = (direct.sanitized, spooled.sanitized)
            batches = [Batch(p) for p in parts]
            payloads = [dump_rows(*spooled.batch_rows(b), b.id) for b in batches]
            for b in batches:
                direct.write_batch(b)
            sp = StoreSpool(spooled, Spool(tmp_path / "unused"))
            sp._write(payloads)  # grouped (one transaction), or record by record where that is refused
            once = _stored(direct, run_ids)
            assert once == _stored(spooled, run_ids)
            assert direct.sanitized - before[0] == spooled.sanitized - before[1]
            dup = (direct.duplicates, spooled.duplicates)
            for b in batches:
                direct.write_batch(b)
            sp._write(payloads)
            assert _stored(direct, run_ids) == once == _stored(spooled, run_ids)
            assert direct.duplicates - dup[0] == len(items)

    try:
        check()
    finally:
        source.shutdown()
        for pair in pairs:
            for s in pair:
                s.close()
