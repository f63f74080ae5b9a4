"""The batch exporter: never blocks, counts every loss, retries a failing store, flushes, forks."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from costobs_callbacks._export import BatchExporter


class Sink:
    def __init__(self, fail_times: int = 0, delay: float = 0.0) -> None:
        self.items: list[Any] = []
        self.batches: list[int] = []
        self.fail_times = fail_times
        self.delay = delay
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: Sequence[Any]) -> None:
        self.calls += 1
        self.gate.wait()
        if self.delay:
            time.sleep(self.delay)
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("database is down")
        self.items.extend(batch)
        self.batches.append(len(batch))


def test_flush_writes_everything_in_order_in_batches() -> None:
    sink = Sink()
    exp = BatchExporter(sink, max_batch_size=100, schedule_delay=5.0)
    for i in range(1050):
        exp.emit(i)
    assert exp.force_flush(timeout=10)
    assert sink.items == list(range(1050))
    assert max(sink.batches) == 100
    assert exp.stats.exported == 1050 and exp.stats.dropped == 0 and exp.stats.failed == 0
    exp.shutdown()


def test_worker_wakes_on_a_full_batch_without_waiting_for_the_delay() -> None:
    sink = Sink()
    exp = BatchExporter(sink, max_batch_size=10, schedule_delay=30.0)
    for i in range(10):
        exp.emit(i)
    deadline = time.monotonic() + 5
    while len(sink.items) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.items == list(range(10))
    exp.shutdown()


def test_a_steady_load_is_written_in_full_batches_not_chased_in_smaller_ones() -> None:
    """Items arrive while a batch is being written: the worker writes the next batch when it is full (or the delay
    passes), not whatever few arrived meanwhile. Each batch costs the store fixed work (a transaction, the rollup
    upserts), so chasing the queue in ever smaller batches costs more per span under a steady load."""
    sink = Sink(delay=0.03)  # a write takes 30 ms
    exp = BatchExporter(sink, max_batch_size=100, schedule_delay=5.0)
    t0 = time.monotonic()
    for i in range(1_000):  # 2,000 items/s: a full batch every 50 ms, 60 items arrive during each write
        exp.emit(i)
        if i % 10 == 9:
            time.sleep(max(0.0, t0 + (i + 1) / 2_000 - time.monotonic()))
    assert exp.force_flush(timeout=10)
    assert sink.items == list(range(1_000))
    # every batch but the one the flush wrote is full (the delay, 5 s, never passed)
    assert sink.batches[:-1] == [100] * (len(sink.batches) - 1), sink.batches
    exp.shutdown()


def test_full_queue_drops_newest_counts_and_logs_without_blocking(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    sink.gate.clear()  # the store hangs: nothing drains
    exp = BatchExporter(sink, max_queue_size=50, max_batch_size=10, schedule_delay=0.01)
    exp.emit("first")
    time.sleep(0.1)  # the worker takes "first" and blocks in the sink
    t0 = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="costobs_callbacks"):
        for i in range(200):
            exp.emit(i)
    assert time.perf_counter() - t0 < 0.5  # emit never blocked on the hung store
    assert exp.stats.dropped == 150
    assert exp.stats.emitted == 51
    assert any("export queue full" in r.getMessage() for r in caplog.records)
    sink.gate.set()
    assert exp.force_flush(timeout=10)
    assert sink.items == ["first", *range(50)]
    exp.shutdown()


def test_a_failing_store_is_retried_and_nothing_is_lost() -> None:
    sink = Sink(fail_times=3)
    exp = BatchExporter(sink, max_batch_size=100, schedule_delay=0.01, retry_deadline=30)
    for i in range(20):
        exp.emit(i)
    assert exp.force_flush(timeout=20)
    assert sink.items == list(range(20))
    assert exp.stats.retries == 3 and exp.stats.failed == 0
    exp.shutdown()


def test_a_store_down_past_the_deadline_counts_the_loss(caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink(fail_times=10**6)
    exp = BatchExporter(sink, max_batch_size=100, schedule_delay=0.01, retry_deadline=0.3)
    with caplog.at_level(logging.ERROR, logger="costobs_callbacks"):
        for i in range(7):
            exp.emit(i)
        assert exp.force_flush(timeout=10)
    assert exp.stats.failed == 7 and exp.stats.exported == 0
    assert any("could not store 7" in r.getMessage() for r in caplog.records)
    exp.shutdown()


def test_shutdown_flushes_runs_once_and_later_emits_are_counted() -> None:
    sink = Sink()
    exp = BatchExporter(sink, schedule_delay=10.0)
    for i in range(5):
        exp.emit(i)
    exp.shutdown(timeout=5)
    exp.shutdown(timeout=5)  # idempotent
    assert sink.items == list(range(5))
    exp.emit("late")
    assert exp.stats.dropped == 1
    assert sink.items == list(range(5))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_empty_queue_and_worker(tmp_path: Any) -> None:
    out = tmp_path / "child.txt"

    def sink(batch: Sequence[Any]) -> None:
        with open(out, "a") as f:
            f.write(f"{os.getpid()}:{','.join(map(str, batch))}\n")

    exp = BatchExporter(sink, schedule_delay=30.0)
    exp.emit("parent-1")  # still queued in the parent when it forks
    pid = os.fork()
    if pid == 0:  # the child
        try:
            exp.emit("child-1")
            ok = exp.force_flush(timeout=10)
            os._exit(0 if ok else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert exp.force_flush(timeout=10)
    lines = out.read_text().splitlines()
    assert f"{pid}:child-1" in lines  # the child's own item, and not the parent's queued one
    assert f"{os.getpid()}:parent-1" in lines
    assert len(lines) == 2
    exp.shutdown()


def test_a_poison_item_is_isolated_and_the_rest_of_its_batch_is_written() -> None:
    from costobs_callbacks._export import PoisonBatch

    written: list[Any] = []

    def sink(batch: Sequence[Any]) -> None:
        if "bad" in batch:
            raise PoisonBatch("value too long")
        written.extend(batch)

    exp = BatchExporter(sink, max_batch_size=64, schedule_delay=0.01)
    items = [*range(20), "bad", *range(20, 40)]
    for it in items:
        exp.emit(it)
    assert exp.force_flush(timeout=10)
    assert written == [*range(20), *range(20, 40)]
    assert exp.stats.failed == 1 and exp.stats.retries == 0
    exp.shutdown()


def test_a_row_the_database_refuses_costs_only_that_row(tmp_path: Any) -> None:
    """A real store: a span whose name the database refuses is lost alone, counted; its batch-mates land."""
    import sqlalchemy as sa

    from costobs_callbacks import CostTracker
    from costobs_callbacks.testing import FakeChatModel

    with CostTracker(f"sqlite:///{tmp_path}/c.db", user_salt="s", prices={"m": {"input": 1, "output": 1}}) as t:
        with t.store.engine.begin() as conn:  # a database that refuses one kind of row
            conn.execute(sa.text(
                "CREATE TRIGGER refuse BEFORE INSERT ON costobs_spans WHEN NEW.name = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        model = FakeChatModel(model_name="m")
        ids = []
        for i in range(10):
            cfg = t.config(feature="f")
            model.invoke("hi", config={**cfg, "run_name": "poison" if i == 4 else "ok"})
            ids.append(cfg["run_id"])
        t.flush()
        assert t.stats["failed"] == 1
        with t.store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM costobs_spans")).scalar_one() == 9
