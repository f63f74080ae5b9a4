"""Several processes opening a new, empty database at the same moment: every one starts, the schema is made
once (one revision row, at the head), one user-id salt is made and every process hashes a user id with it.
PostgreSQL (a new database on the server) and SQLite (a new file), 8 processes released together."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from costobs_callbacks._store import HEAD_REVISION

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 8

CHILD = textwrap.dedent("""
    import sys
    import sqlalchemy  # the slow imports before the barrier: the processes open the database together
    from costobs_callbacks import CostTracker

    url, spool, i = sys.argv[1:4]
    print("ready", flush=True)
    sys.stdin.readline()
    t = CostTracker(url, spool_dir=spool, prices={"m-open": {"input": "1", "output": "1"}})
    t.record_usage(model="m-open", input_tokens=10, output_tokens=1, user_id="u-1", feature="open" + i)
    ok = t.flush(60)
    st = t.stats
    t.close()
    print("done", ok, st["exported"], st["failed"], st["spooled"], flush=True)
""")


def _open_together(url: str, tmp_path: Path) -> list[tuple[int, str, str]]:
    """Start ``PROCESSES`` children, release them at once, and return each one's (status, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COSTOBS_USER_SALT", None)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, url, str(tmp_path / f"spool-{i}"), str(i)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 cwd=ROOT, env=env) for i in range(PROCESSES)]
    try:
        for c in children:
            assert c.stdout is not None
            assert c.stdout.readline().split() == ["ready"]
        for c in children:  # the barrier: every child waits on this line
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        out = []
        for c in children:
            stdout, stderr = c.communicate(timeout=180)
            out.append((c.returncode, stdout, stderr))
        return out
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_opening_a_new_database_together_make_one_schema_and_one_salt(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/new.db"
    else:
        make: Callable[[], str] = request.getfixturevalue("postgres_database")
        url = make()
    results = _open_together(url, tmp_path)
    for status, stdout, stderr in results:
        assert status == 0, stderr
        assert stdout.split() == ["done", "True", "1", "0", "0"], stderr
        assert "Traceback" not in stderr and "costobs" not in stderr, stderr  # nothing logged: no error, no retry
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM costobs_alembic_version")).scalars().all() \
                == [HEAD_REVISION]
            assert conn.execute(sa.text("SELECT key FROM costobs_meta")).scalars().all() == ["user_salt"]
            hashes = conn.execute(sa.text("SELECT user_hash FROM costobs_spans")).scalars().all()
            assert len(hashes) == PROCESSES and len(set(hashes)) == 1  # one salt: every process hashes alike
            assert conn.execute(sa.text("SELECT COUNT(*) FROM costobs_runs")).scalar_one() == PROCESSES
            assert conn.execute(sa.text("SELECT COUNT(*) FROM costobs_batches")).scalar_one() == PROCESSES
    finally:
        eng.dispose()
