"""The ``costobs`` command, through its real entry point: ``main([...])`` in this process, or
``python -m costobs_callbacks.cli`` in a child (the demo's and the README's commands run exactly as printed)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from costobs_callbacks._store import HEAD_REVISION, Store, runs, spans
from costobs_callbacks.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/x"


def cli(*argv: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, not an installed one
    env.pop("COSTOBS_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "costobs_callbacks.cli", *argv], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def explore_commands(demo_stdout: str) -> list[str]:
    tail = demo_stdout.split("Explore it:", 1)[1]
    return [ln.strip() for ln in tail.splitlines() if ln.strip().startswith("costobs ")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_env_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTOBS_DATABASE_URL", raising=False)


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A SQLite database the demo filled (5 runs), and the id of its runaway run."""
    url = f"sqlite:///{tmp_path_factory.mktemp('demo')}/demo.db"
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["demo", "--runs", "5", "--database-url", url]) == 0
    run_line = next(c for c in explore_commands(buf.getvalue()) if c.startswith("costobs run "))
    return url, shlex.split(run_line)[2]


# -- --database-url before or after every subcommand ----------------------------------------------

@pytest.mark.parametrize("argv", [
    ["report", "--by", "tenant_id", "model"],
    ["report", "--by", "feature", "--bucket", "hour", "--json"],
    ["run", "RUNAWAY", "--spans"],
    ["price", "gpt-4o-mini"],
    ["db", "current"],
    ["db", "upgrade"],
    ["db", "prune", "--older-than", "90d", "--yes"],
])
def test_database_url_before_or_after_the_subcommand(capsys: pytest.CaptureFixture[str], demo_db: tuple[str, str],
                                                     argv: list[str]) -> None:
    url, runaway = demo_db
    argv = [runaway if a == "RUNAWAY" else a for a in argv]
    before = run_main(capsys, "--database-url", url, *argv)
    after = run_main(capsys, *argv, "--database-url", url)
    assert before[0] == 0, before
    assert after == before
    if argv[0] == "report" and "--json" not in argv:
        assert "research-agent" not in before[1] and "acme" in before[1]
    if argv[0] == "run":
        assert before[1].startswith(f"run {runaway}: aborted (max_cost_usd) cost $0.051628700\n")


def test_database_url_after_db_reaches_its_action(capsys: pytest.CaptureFixture[str], demo_db: tuple[str, str]) -> None:
    url, _ = demo_db
    assert run_main(capsys, "db", "--database-url", url, "current") == (0, f"current: {HEAD_REVISION} (head)\n"
                                                                            f"head:    {HEAD_REVISION}\n", "")


def test_demo_takes_the_database_url_after_its_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/d.db"
    rc, out, _ = run_main(capsys, "demo", "--runs", "2", "--database-url", url)
    assert rc == 0
    assert out.startswith(f"costobs demo: 2 simulated agent runs -> {url}\n")
    assert f"  costobs report --database-url {url} --by tenant_id model\n" in out
    assert (tmp_path / "d.db").exists()


# -- reading creates nothing ----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["report"], ["report", "--by", "tenant_id", "model"], ["run", "some-run"], ["db", "current"],
    ["db", "prune", "--older-than", "90d", "--yes"],
])
def test_reading_a_missing_database_says_so_and_creates_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                argv: list[str]) -> None:
    path = tmp_path / "missing.db"
    rc, out, err = run_main(capsys, *argv, "--database-url", f"sqlite:///{path}")
    assert (rc, out) == (2, "")
    assert err.startswith(f"costobs: no database at {path} (nothing was created;")
    assert err.count("\n") == 1
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_default_database_is_not_created_by_reading(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_main(capsys, "report")
    assert rc == 2 and err.startswith(f"costobs: no database at {tmp_path / 'costobs.db'} ")
    assert list(tmp_path.iterdir()) == []


def test_reading_another_sqlite_file_changes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = digest(path)
    for argv in (["report"], ["run", "r1"], ["db", "prune", "--older-than", "1d", "--yes"]):
        rc, out, err = run_main(capsys, *argv, "--database-url", f"sqlite:///{path}")
        assert (rc, out) == (2, ""), argv
        assert err == (f"costobs: no costobs tables in sqlite:///{path} (`costobs db upgrade --database-url "
                       f"sqlite:///{path}` creates them)\n")
    assert run_main(capsys, "db", "current", "--database-url", f"sqlite:///{path}") == (
        0, f"current: none (no costobs tables)\nhead:    {HEAD_REVISION}\n", "")
    assert digest(path) == before  # no table, no WAL conversion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_reading_leaves_a_costobs_database_as_it_was(capsys: pytest.CaptureFixture[str], demo_db: tuple[str, str],
                                                     tmp_path: Path) -> None:
    src = Path(demo_db[0].removeprefix("sqlite:///"))
    path = tmp_path / "copy.db"
    con = sqlite3.connect(src)
    con.execute(f"VACUUM INTO '{path}'")
    con.close()
    before = digest(path)
    assert run_main(capsys, "report", "--database-url", f"sqlite:///{path}")[0] == 0
    assert run_main(capsys, "run", demo_db[1], "--spans", "--database-url", f"sqlite:///{path}")[0] == 0
    assert digest(path) == before


# -- one line and status 2 for what the user can fix ------------------------------------------------

def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    notdb = tmp / "notdb.db"
    notdb.write_text("hello, not a database\n")
    ndb, dirdb = f"sqlite:///{notdb}", f"sqlite:///{tmp}"
    cases: list[tuple[list[str], str]] = [
        (["report", "--since", "yesterday"], "costobs report: error: argument --since: 'yesterday' is neither a "
                                             "duration (30m, 24h, 7d) nor an ISO timestamp"),
        (["report", "--where", "nokey"], "costobs report: error: argument --where: 'nokey' is not KEY=VALUE"),
        (["report", "--where", "colour=red"], "costobs report: error: argument --where: unknown key 'colour'"),
        (["report", "--by", "colour"], "costobs report: error: argument --by: invalid choice: 'colour'"),
        (["demo", "--runs", "-3"], "costobs demo: error: argument --runs: '-3' is not a whole number of at least 1"),
        (["demo", "--runs", "0"], "costobs demo: error: argument --runs: '0' is not a whole number of at least 1"),
        (["db", "prune", "--older-than", "soon"], "costobs db prune: error: argument --older-than: 'soon' is not "
                                                  "a duration"),
        (["db", "prune", "--older-than", "0d"], "costobs db prune: error: argument --older-than: '0d' is not"),
        (["db", "prune", "--older-than", "99999999999d"], "costobs db prune: error: argument --older-than: "
                                                          "'99999999999d' is longer than 100 years"),
        (["report", "--since", "99999999999w"], "costobs report: error: argument --since: '99999999999w' is "
                                                "longer than 100 years"),
        (["db"], "costobs db: error: the following arguments are required: ACTION"),
        (["--database-url", "nosuch://x", "report"], "costobs: "),
        (["demo", "--runs", "2", "--database-url", "sqlite:////proc/costobs.db"],
         "costobs: cannot use the database sqlite:////proc/costobs.db: unable to open database file"),
        (["db", "upgrade", "--database-url", "sqlite:////proc/costobs.db"],
         "costobs: cannot use the database sqlite:////proc/costobs.db: unable to open database file"),
        (["db", "upgrade", "--database-url", f"sqlite:///{tmp}/no/such/dir/x.db"],
         f"costobs: cannot create the database {tmp}/no/such/dir/x.db: the directory {tmp}/no/such/dir does not "
         "exist"),
    ]
    for argv in (["report"], ["run", "r1"], ["db", "current"], ["db", "upgrade"], ["demo", "--runs", "2"],
                 ["db", "prune", "--older-than", "90d", "--yes"]):
        cases.append(([*argv, "--database-url", dirdb], f"costobs: {tmp} is a directory, not a database file"))
        cases.append(([*argv, "--database-url", ndb], f"costobs: cannot use the database {ndb}: file is not a "
                                                      "database"))
        cases.append(([*argv, "--database-url", UNREACHABLE_PG],
                      f"costobs: cannot use the database {UNREACHABLE_PG}: connection failed: "))
    return cases


def test_errors_are_one_line_with_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, expected in _cases(tmp_path):
        rc, out, err = run_main(capsys, *argv)
        assert (rc, out) == (2, ""), (argv, out, err)
        assert err.startswith(expected), (argv, err)
        assert err.count("\n") == 1 and err.endswith("\n"), (argv, err)
    assert (tmp_path / "notdb.db").read_text() == "hello, not a database\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notdb.db"]


def test_messages_hide_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "report", "--database-url", "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/x")
    assert (rc, out) == (2, "")
    assert err.startswith("costobs: cannot use the database postgresql+psycopg://postgres:***@127.0.0.1:1/x: ")
    assert "s3cret" not in err


def test_errors_from_the_console_command_have_no_traceback(tmp_path: Path) -> None:
    for argv in (["report", "--since", "yesterday"], ["report", "--database-url", UNREACHABLE_PG],
                 ["demo", "--runs", "-3"], ["run", "x", "--database-url", f"sqlite:///{tmp_path}/none.db"]):
        p = cli(*argv, cwd=tmp_path)
        assert (p.returncode, p.stdout) == (2, ""), (argv, p.stderr)
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, (argv, p.stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_stops_early_gets_no_traceback(demo_db: tuple[str, str], tmp_path: Path) -> None:
    """``costobs report ... | head -1``: the pipe closes under the table; the command stops quietly (status 141)."""
    url, run_id = demo_db
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv in (["report", "--by", "tenant_id", "model"], ["run", run_id, "--spans"]):
        p = subprocess.Popen([sys.executable, "-m", "costobs_callbacks.cli", *argv, "--database-url", url],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None and p.stderr is not None
        first = p.stdout.readline()
        p.stdout.close()  # the reader goes away with the rest of the output unread
        err = p.stderr.read().decode()
        rc = p.wait(timeout=600)
        assert first, argv
        assert "Traceback" not in err and "BrokenPipe" not in err, (argv, err)
        assert rc in (0, 141), (argv, rc)


def test_help_and_a_missing_run(capsys: pytest.CaptureFixture[str], demo_db: tuple[str, str]) -> None:
    rc, out, _ = run_main(capsys, "db", "prune", "--help")
    assert rc == 0 and "--older-than AGE" in out and "--database-url URL" in out
    rc, out, err = run_main(capsys, "run", "no-such-run", "--database-url", demo_db[0])
    assert (rc, out, err) == (1, "", f"costobs: no run no-such-run in {demo_db[0]}\n")


# -- costobs db, on SQLite and PostgreSQL -----------------------------------------------------------

def test_db_upgrade_and_current(capsys: pytest.CaptureFixture[str], database_url: str) -> None:
    url = database_url
    rc, out, err = run_main(capsys, "db", "current", "--database-url", url)
    if url.startswith("sqlite"):  # a missing file: nothing to inspect
        assert rc == 2 and err.startswith("costobs: no database at ")
    else:  # an empty database
        assert (rc, out, err) == (0, f"current: none (no costobs tables)\nhead:    {HEAD_REVISION}\n", "")
    assert run_main(capsys, "report", "--database-url", url)[0] == 2
    assert run_main(capsys, "db", "upgrade", "--database-url", url) == (
        0, f"{url}: upgraded from an empty database to {HEAD_REVISION}\n", "")
    assert run_main(capsys, "db", "current", "--database-url", url) == (
        0, f"current: {HEAD_REVISION} (head)\nhead:    {HEAD_REVISION}\n", "")
    assert run_main(capsys, "db", "upgrade", "--database-url", url) == (
        0, f"{url}: at the head revision {HEAD_REVISION}, nothing to do\n", "")
    rc, out, _ = run_main(capsys, "report", "--json", "--database-url", url)
    assert (rc, json.loads(out)) == (0, [])


def test_an_older_schema_is_refused_by_reading_and_upgraded_by_db_upgrade(capsys: pytest.CaptureFixture[str],
                                                                           database_url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from costobs_callbacks._store import migrations_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("version_table", "costobs_alembic_version")
    previous = ScriptDirectory.from_config(cfg).get_revision(HEAD_REVISION).down_revision
    if not isinstance(previous, str):
        pytest.skip("the head is the first revision")
    url = database_url
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, previous)
    eng.dispose()
    assert run_main(capsys, "db", "current", "--database-url", url) == (
        0, f"current: {previous}\nhead:    {HEAD_REVISION}\n", "")
    rc, out, err = run_main(capsys, "report", "--database-url", url)
    assert (rc, out) == (2, "")
    assert err == (f"costobs: {url} is at schema revision {previous}, this costobs reads {HEAD_REVISION} "
                   f"(`costobs db upgrade --database-url {url}`)\n")
    assert run_main(capsys, "db", "upgrade", "--database-url", url) == (
        0, f"{url}: upgraded from {previous} to {HEAD_REVISION}\n", "")
    assert run_main(capsys, "report", "--database-url", url)[0] == 0


def _age(url: str, run_ids: list[str], days: int) -> None:
    """Move the given runs and their spans ``days`` into the past (the store writes the time of each call)."""
    eng = sa.create_engine(url)
    d = timedelta(days=days)
    with eng.begin() as conn:
        for r in conn.execute(sa.select(spans.c.id, spans.c.start_at, spans.c.end_at, spans.c.hour)
                              .where(spans.c.run_id.in_(run_ids))).all():
            conn.execute(sa.update(spans).where(spans.c.id == r.id).values(
                start_at=r.start_at - d, end_at=r.end_at - d, hour=r.hour - days * 24))
        for r in conn.execute(sa.select(runs.c.run_id, runs.c.started_at, runs.c.ended_at)
                              .where(runs.c.run_id.in_(run_ids))).all():
            conn.execute(sa.update(runs).where(runs.c.run_id == r.run_id).values(
                started_at=r.started_at - d, ended_at=r.ended_at - d if r.ended_at else None))
    eng.dispose()


def _counts(url: str) -> tuple[int, int]:
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        n = (conn.execute(sa.select(sa.func.count()).select_from(spans)).scalar_one(),
             conn.execute(sa.select(sa.func.count()).select_from(runs)).scalar_one())
    eng.dispose()
    return n


def _report_total(capsys: pytest.CaptureFixture[str], url: str) -> Decimal:
    rc, out, _ = run_main(capsys, "report", "--by", "feature", "--json", "--database-url", url)
    assert rc == 0
    return sum((Decimal(r["cost_usd"]) for r in json.loads(out)), Decimal(0))


def test_db_prune(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    url = database_url
    assert run_main(capsys, "demo", "--runs", "6", "--database-url", url)[0] == 0
    store = Store(url)
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        all_runs = sorted(conn.execute(sa.select(runs.c.run_id)).scalars())
        old = all_runs[::2]
        old_spans = conn.execute(sa.select(sa.func.count()).select_from(spans)
                                 .where(spans.c.run_id.in_(old))).scalar_one()
    eng.dispose()
    kept_cost = sum((store.run_cost(r).cost_usd for r in all_runs if r not in old), Decimal(0))  # type: ignore[union-attr]
    store.close()
    _age(url, old, 100)
    n_spans, n_runs = _counts(url)
    assert n_runs == len(all_runs) and old_spans > 3
    total = _report_total(capsys, url)  # read from the hourly rollups, which prune keeps
    assert total > kept_cost

    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    rc, out, err = run_main(capsys, "db", "prune", "--older-than", "90d", "--database-url", url)
    assert (rc, out) == (1, "")
    assert err.startswith(f"Delete {old_spans:,} spans and {len(old):,} runs from before ")
    assert ("hourly totals in costobs_rollups_hourly are kept. [y/N] costobs: nothing deleted (pass --yes to prune "
            "without asking)\n") in err
    assert _counts(url) == (n_spans, n_runs)

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no answer at all: nothing deleted either
    assert run_main(capsys, "db", "prune", "--older-than", "90d", "--database-url", url)[0] == 1
    assert _counts(url) == (n_spans, n_runs)

    rc, out, err = run_main(capsys, "db", "prune", "--older-than", "101d", "--yes", "--database-url", url)
    assert rc == 0 and out.startswith("nothing to prune: no spans or runs before ")

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    rc, out, err = run_main(capsys, "db", "prune", "--older-than", "90d", "--batch-size", "2", "--database-url", url)
    assert rc == 0
    assert re.fullmatch(rf"deleted {old_spans:,} spans and {len(old):,} runs from before "
                        r"\d{4}-\d\d-\d\d \d\d:00 UTC\n", out)
    assert "pruning spans" in err and f"{old_spans}/{old_spans}" in err  # the progress bar, on stderr
    assert _counts(url) == (n_spans - old_spans, n_runs - len(old))
    assert _report_total(capsys, url) == total  # month-old totals never change
    assert run_main(capsys, "run", old[0], "--database-url", url)[0] == 1
    assert run_main(capsys, "db", "prune", "--older-than", "90d", "--yes", "--database-url", url)[1].startswith(
        "nothing to prune")


# -- the commands the demo and the README print run as printed --------------------------------------

def test_every_command_the_demo_prints_runs(tmp_path: Path) -> None:
    demo = cli("demo", "--runs", "3", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    url = demo.stdout.splitlines()[0].split(" -> ", 1)[1]
    try:
        commands = explore_commands(demo.stdout)
        assert len(commands) == 5 and commands[0] == f"costobs report --database-url {url} --by tenant_id model"
        for line in commands:
            p = cli(*shlex.split(line)[1:], cwd=tmp_path)
            assert p.returncode == 0, (line, p.stderr)
            assert "Traceback" not in p.stderr and p.stdout.strip(), line
    finally:
        shutil.rmtree(Path(url.removeprefix("sqlite:///")).parent, ignore_errors=True)


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line\n", 1)[1].split("```", 2)[1]
    return [ln for ln in block.splitlines() if ln.startswith("costobs ")]


def test_every_command_of_the_readme_runs(tmp_path: Path) -> None:
    commands = _readme_commands()
    assert commands[0].startswith("costobs demo ") and any(c.startswith("costobs db prune") for c in commands)
    run_id = None
    for line in commands:
        argv = shlex.split(line, comments=True)[1:]
        if "RUN_ID" in argv:  # the one placeholder: a run id, as the demo printed it
            assert run_id is not None
            argv = [run_id if a == "RUN_ID" else a for a in argv]
        p = cli(*argv, cwd=tmp_path)
        assert p.returncode == 0, (line, p.stderr)
        assert "Traceback" not in p.stderr, line
        if argv[0] == "demo":
            run_line = next(c for c in explore_commands(p.stdout) if c.startswith("costobs run "))
            run_id = shlex.split(run_line)[2]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == ["costobs.db"]
