"""A process stopped by a signal: SIGTERM flushes what is queued (with Python's default handler in place, or
the app's own chained), SIGKILL loses at most what was recorded in the last ``export_delay`` seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC
from pathlib import Path

import pytest
import sqlalchemy as sa

from costobs_callbacks import CostTracker

try:
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from stub_openai import StubReply, StubUsage

ROOT = Path(__file__).resolve().parent.parent
N = 400

CHILD = textwrap.dedent("""
    import signal, sys, time, threading
    from langchain_openai import ChatOpenAI
    from costobs_callbacks import CostTracker
    url, spool, base, mode, n, delay = sys.argv[1:7]
    if mode == "chain":
        def app_handler(signum, frame):
            print("app handler ran", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, app_handler)
    kw = dict(prices={"m-sig": {"input": "2", "output": "8"}}, user_salt="s", spool_dir=spool,
              export_delay=float(delay))
    if mode == "thread":
        box = []
        th = threading.Thread(target=lambda: box.append(CostTracker(url, **kw)))
        th.start(); th.join()
        t = box[0]
        print("handler", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    else:
        t = CostTracker(url, **kw)
    if mode == "dfl":  # the handler taken away: what Python's default does
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    llm = ChatOpenAI(base_url=base, api_key="sk-test", model="m-sig", max_retries=0)
    n = int(n)
    i = 0
    while n == 0 or i < n:
        llm.invoke("hi", config=t.config(feature="sig"))
        i += 1
        if n == 0 and i % 10 == 0:
            print(i, time.time(), t.stats["exported"], flush=True)
    print("ready", t.stats["exported"], flush=True)
    time.sleep(120)
""")


def _child(url: str, tmp_path: Path, base: str, mode: str, n: int, delay: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(tmp_path / "spool"), base, mode, str(n), str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def _spans(url: str) -> list[float]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            if not sa.inspect(conn).has_table("costobs_spans"):
                return []
            rows = conn.execute(sa.text("SELECT end_at FROM costobs_spans")).scalars().all()
    finally:
        eng.dispose()
    from datetime import datetime

    return [(r if isinstance(r, datetime) else datetime.fromisoformat(r)).replace(tzinfo=UTC).timestamp()
            for r in rows]


def _ready(child: subprocess.Popen[str]) -> list[str]:
    assert child.stdout is not None
    lines = []
    while True:
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else "child ended"
        lines.append(line.strip())
        if line.startswith("ready"):
            return lines


@pytest.fixture
def db(tmp_path, stub_openai):
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 2))
    url = f"sqlite:///{tmp_path / 'costs.db'}"
    CostTracker(url, user_salt="s", spool_dir=tmp_path / "spool").close()  # the schema made
    return url


def test_sigterm_with_the_default_handler_flushes_and_still_dies_of_it(db, tmp_path, stub_openai):
    child = _child(db, tmp_path, stub_openai.base_url, "default", N, 30.0)  # nothing exported before the signal
    lines = _ready(child)
    assert lines[-1] == "ready 0"
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == -signal.SIGTERM
    assert len(_spans(db)) == N


def test_sigterm_without_the_handler_loses_the_queue(db, tmp_path, stub_openai):
    """The control: Python's default handler alone loses everything queued (the test above can fail)."""
    child = _child(db, tmp_path, stub_openai.base_url, "dfl", N, 30.0)
    _ready(child)
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == -signal.SIGTERM
    assert len(_spans(db)) == 0


def test_sigterm_chains_the_apps_own_handler(db, tmp_path, stub_openai):
    child = _child(db, tmp_path, stub_openai.base_url, "chain", N, 30.0)
    _ready(child)
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == 3
    assert child.stdout is not None and child.stdout.read().strip() == "app handler ran"
    assert len(_spans(db)) == N


def test_no_handler_is_installed_off_the_main_thread(db, tmp_path, stub_openai):
    child = _child(db, tmp_path, stub_openai.base_url, "thread", 5, 0.1)
    lines = _ready(child)
    assert lines[0] == "handler True"
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == -signal.SIGTERM  # the default, as the app left it


@pytest.mark.parametrize("delay", [0.5, 2.0])
def test_sigkill_loses_at_most_the_last_export_delay(db, tmp_path, stub_openai, delay):
    child = _child(db, tmp_path, stub_openai.base_url, "steady", 0, delay)
    assert child.stdout is not None
    started: float | None = None
    last = 0
    while started is None or time.monotonic() - started < 2 + 2 * delay:
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else ""
        last, exported = int(line.split()[0]), int(line.split()[2])
        if started is None and exported:  # the exporter is past its start (the tokenizers warmed)
            started = time.monotonic()
    killed_at = time.time()
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    ends = _spans(db)
    newest = max(ends)
    window = killed_at - newest
    lost_at_least = last - len(ends)
    rate = last / (killed_at - min(ends))
    print(f"export_delay={delay}: {len(ends)} stored, >= {lost_at_least} lost, newest stored span "
          f"{window:.3f}s before the kill (~{rate:.0f} spans/s)")
    assert len(ends) > 0
    # one write in flight may add its own time to the delay: it is bounded by the delay plus a write
    assert window <= delay + 0.5
