"""What one process writes, another reads; two processes writing one SQLite file at once; migrations on
first use only; one user salt for every process; configuration errors at construction."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from langchain_openai import ChatOpenAI

from costobs_callbacks import ConfigurationError, CostTracker
from costobs_callbacks._store import HEAD_REVISION

try:
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from stub_openai import StubReply, StubUsage

MODEL = "m-persist"
PRICES = {MODEL: {"input": "0.7", "output": "2.1", "cache_read": "0.07"}}
MARK = re.compile(r"\[\[p=(\d+) c=(\d+)\]\]")

CHILD = textwrap.dedent('''
    import json, sys
    from decimal import Decimal

    from costobs_callbacks import CostTracker

    mode, url = sys.argv[1], sys.argv[2]
    prices = {"m-persist": {"input": "0.7", "output": "2.1", "cache_read": "0.07"}}

    def out(obj):
        print(json.dumps(obj, default=str), flush=True)

    if mode == "read":
        with CostTracker(url) as t:
            rc = t.run_cost(sys.argv[3])
            rows = t.rollup(by=["feature", "user"])
            out({"rc": None if rc is None else {
                     "cost_usd": rc.cost_usd, "input_tokens": rc.input_tokens, "output_tokens": rc.output_tokens,
                     "cache_read_tokens": rc.cache_read_tokens, "llm_calls": rc.llm_calls, "status": rc.status,
                     "by_model": rc.by_model, "attributes": rc.attributes},
                 "rollup": [{"key": r.key, "cost_usd": r.cost_usd, "runs": r.runs, "llm_calls": r.llm_calls}
                            for r in rows]})
    elif mode in ("migrate", "migrate_slowly"):
        if mode == "migrate_slowly":  # 0.2 s after each table it creates: another process starts meanwhile
            import time
            import sqlalchemy
            from sqlalchemy.engine import Engine

            created = []

            @sqlalchemy.event.listens_for(Engine, "after_cursor_execute")
            def slowly(conn, cursor, statement, *args):
                if statement.lstrip().upper().startswith("CREATE TABLE"):
                    if not created:
                        out("created")
                    created.append(statement)
                    time.sleep(0.2)
        with CostTracker(url) as t:
            out({"salt": t.ledger.hash_user("alice")})
    elif mode == "salt":
        with CostTracker(url) as t:
            with t.run(feature="salt", user_id="alice") as run:
                pass
            out({"user": t.run_cost(run.run_id).attributes["user"]})
    elif mode == "write":
        from langchain_openai import ChatOpenAI

        base_url, n = sys.argv[3], int(sys.argv[4])
        with CostTracker(url, prices=prices, export_delay=0.01) as t:
            llm = ChatOpenAI(base_url=base_url, api_key="sk-test", model="m-persist", max_retries=0)
            out("ready")
            sys.stdin.readline()  # go
            ids = []
            for i in range(n):
                cfg = t.config(feature="child", user_id="alice", tenant_id=f"ct{i % 2}")
                llm.invoke(f"[[p={1000 + i} c={10 + i}]]", config=cfg)
                ids.append(str(cfg["run_id"]))
            t.flush(30)
            out({"ids": ids, "stats": t.stats})
''')


def usd(inp: int, out: int, cached: int = 0) -> Decimal:
    p = PRICES[MODEL]
    raw = (inp - cached) * Decimal(p["input"]) + cached * Decimal(p["cache_read"]) + out * Decimal(p["output"])
    return (raw / Decimal(1_000_000)).quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)


@pytest.fixture
def child(tmp_path: Path) -> Any:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # the children import the same checkout as this process (not whichever copy the environment installed)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OPENAI_API_KEY": "sk-test",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env.pop("COSTOBS_USER_SALT", None)
    env.pop("COSTOBS_DATABASE_URL", None)

    def popen(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    return popen


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> Any:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def marker_responder(req: dict[str, Any]) -> StubReply:
    m = MARK.search(req["messages"][-1]["content"])
    assert m is not None
    p, c = map(int, m.groups())
    return StubReply("ok", usage=StubUsage(p, c, cached_tokens=p % 7))


def chat(stub: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0)


@pytest.fixture(autouse=True)
def _no_env_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTOBS_USER_SALT", raising=False)
    monkeypatch.delenv("COSTOBS_DATABASE_URL", raising=False)


def test_another_process_reads_run_cost_and_rollup(tmp_path, stub_openai, child):
    url = f"sqlite:///{tmp_path}/shared.db"
    stub_openai.responder = marker_responder
    with CostTracker(url, prices=PRICES) as tracker:  # no user_salt: one is generated and kept in the database
        cfg = tracker.config(feature="report", user_id="alice", tenant_id="acme", experiment="b")
        llm = chat(stub_openai)
        llm.invoke("[[p=1234 c=56]]", config=cfg)
        llm.invoke("[[p=100 c=5]]", config=cfg)  # the run continues
        mine = tracker.run_cost(cfg["run_id"])
        rows = tracker.rollup(by=["feature", "user"])
    assert mine is not None
    expected = usd(1234, 56, 1234 % 7) + usd(100, 5, 100 % 7)
    assert mine.cost_usd == expected

    got = finish(child("read", url, str(cfg["run_id"])))
    rc = got["rc"]
    assert Decimal(rc["cost_usd"]) == expected
    assert (rc["input_tokens"], rc["output_tokens"], rc["cache_read_tokens"], rc["llm_calls"], rc["status"]) == (
        1334, 61, 1234 % 7 + 100 % 7, 2, "ok",
    )
    assert {k: Decimal(v) for k, v in rc["by_model"].items()} == {MODEL: expected}
    assert rc["attributes"] == mine.attributes
    assert rc["attributes"]["experiment"] == "b" and len(rc["attributes"]["user"]) == 64
    (row,) = got["rollup"]
    assert row["key"] == {"feature": "report", "user": mine.attributes["user"]}
    assert (Decimal(row["cost_usd"]), row["runs"], row["llm_calls"]) == (expected, 1, 2)
    assert (rows[0].cost_usd, rows[0].key) == (expected, row["key"])


def test_two_processes_write_one_sqlite_file_at_once(tmp_path, stub_openai, child):
    url = f"sqlite:///{tmp_path}/shared.db"
    stub_openai.responder = marker_responder
    n = 25
    with CostTracker(url, prices=PRICES, export_delay=0.01) as tracker:
        proc = child("write", url, stub_openai.base_url, str(n))
        assert proc.stdout is not None and proc.stdin is not None
        assert json.loads(proc.stdout.readline()) == "ready"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        llm = chat(stub_openai)
        mine = []
        for i in range(n):  # at the same time as the child
            cfg = tracker.config(feature="parent", user_id="alice", tenant_id=f"pt{i % 2}")
            llm.invoke(f"[[p={2000 + i} c={20 + i}]]", config=cfg)
            mine.append(str(cfg["run_id"]))
        theirs = finish(proc)
        assert tracker.flush(30)
        assert (tracker.stats["failed"], theirs["stats"]["failed"], theirs["stats"]["dropped"]) == (0, 0, 0)

        for i, rid in enumerate(mine):
            rc = tracker.run_cost(rid)
            assert rc is not None and rc.cost_usd == usd(2000 + i, 20 + i, (2000 + i) % 7)
            assert rc.attributes["tenant_id"] == f"pt{i % 2}"
        for i, rid in enumerate(theirs["ids"]):
            rc = tracker.run_cost(rid)
            assert rc is not None and rc.cost_usd == usd(1000 + i, 10 + i, (1000 + i) % 7)
            assert (rc.llm_calls, rc.status, rc.attributes["tenant_id"]) == (1, "ok", f"ct{i % 2}")
        rows = {r.key["feature"]: r for r in tracker.rollup(by="feature")}
        assert rows["parent"].cost_usd == sum(usd(2000 + i, 20 + i, (2000 + i) % 7) for i in range(n))
        assert rows["child"].cost_usd == sum(usd(1000 + i, 10 + i, (1000 + i) % 7) for i in range(n))
        assert (rows["parent"].runs, rows["child"].runs) == (n, n)
        (user,) = tracker.rollup(by="user")  # one salt: alice is one user in both processes
        assert user.runs == 2 * n


def test_a_process_starting_while_another_migrates_waits_for_the_whole_schema(tmp_path, child):
    """Python's sqlite3 opens no transaction before DDL: without the migration's write lock each CREATE TABLE
    committed on its own, and a process starting meanwhile saw half a schema and failed at its start."""
    url = f"sqlite:///{tmp_path}/fresh.db"
    first = child("migrate_slowly", url)
    assert first.stdout is not None and first.stdout.readline().strip() == '"created"'  # one table in
    second = child("migrate", url)
    assert finish(second)["salt"] == finish(first)["salt"]
    with CostTracker(url) as tracker:  # whole, and migrated once
        assert tracker.store._current_revision() == HEAD_REVISION


def test_user_salt_generated_once_shared_by_processes(tmp_path, child):
    url = f"sqlite:///{tmp_path}/fresh.db"
    procs = [child("salt", url) for _ in range(3)]  # racing on a fresh file: migrations and the salt
    hashes = {finish(p)["user"] for p in procs}
    assert len(hashes) == 1
    with CostTracker(url) as tracker:
        with tracker.run(feature="salt", user_id="alice") as run:
            pass
        rc = tracker.run_cost(run.run_id)
        assert rc is not None and rc.attributes["user"] in hashes
        with tracker.store.engine.connect() as conn:
            salts = conn.execute(sa.text("SELECT value FROM costobs_meta WHERE key = 'user_salt'")).scalars().all()
    assert len(salts) == 1 and len(salts[0]) == 64
    with CostTracker(url, user_salt="test-salt") as other:  # an explicit salt wins
        with other.run(feature="salt", user_id="alice") as run:
            pass
        rc = other.run_cost(run.run_id)
        assert rc is not None and rc.attributes["user"] not in hashes


def test_migrations_applied_on_first_use_then_reopen_is_a_no_op(tmp_path):
    path = tmp_path / "m.db"
    with CostTracker(f"sqlite:///{path}") as tracker, tracker.store.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        version = conn.execute(sa.text("SELECT version_num FROM costobs_alembic_version")).scalars().all()
        schema = conn.execute(sa.text("SELECT type, name, sql FROM sqlite_master ORDER BY name")).all()
    assert {"costobs_spans", "costobs_runs", "costobs_meta", "costobs_alembic_version"} <= tables
    assert version == [HEAD_REVISION]

    # Re-opening writes nothing: it works on a read-only connection, salt included.
    ro = f"sqlite:///file:{path}?mode=ro&uri=true"
    with CostTracker(ro) as again:
        assert again.rollup(by="feature") == []
    with CostTracker(f"sqlite:///{path}") as again, again.store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT type, name, sql FROM sqlite_master ORDER BY name")).all() == schema
        assert conn.execute(sa.text("SELECT version_num FROM costobs_alembic_version")).scalars().all() == [
            HEAD_REVISION]


def test_bad_database_url():
    with pytest.raises(ConfigurationError):
        CostTracker("not-a-url://")
    with pytest.raises(ConfigurationError):
        CostTracker("not a url at all")


@pytest.mark.parametrize(("name", "text", "match"), [
    ("p.yaml", "m: {input: 1}\n", "output"),
    ("p.yaml", "m: {input: -1, output: 2}\n", "negative"),
    ("p.yaml", "m: {input: abc, output: 2}\n", "number"),
    ("p.yaml", "m: {input: 1, output: 2, colour: 3}\n", "colour"),
    ("p.yaml", "m: [1, 2]\n", "mapping"),
    ("p.yaml", "- just\n- a list\n", "mapping"),
    ("p.yaml", "m: {input: 1, output: [\n", "YAML"),
    ("p.json", '{"m": {"input": 1, "output": 2}', "JSON"),
    ("p.json", '{"m": {"input": true, "output": 2}}', "number"),
], ids=["missing-output", "negative", "word", "unknown-field", "list-entry", "list-file", "bad-yaml", "bad-json",
        "bool"])
def test_malformed_price_file(tmp_path, name, text, match):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigurationError, match=match):
        CostTracker(f"sqlite:///{tmp_path}/c.db", user_salt="s", prices=f)
    with pytest.raises(ConfigurationError, match="does not exist"):
        CostTracker(f"sqlite:///{tmp_path}/c.db", user_salt="s", prices=tmp_path / "missing.yaml")


def test_price_file_used(tmp_path, stub_openai):
    f = tmp_path / "prices.yaml"
    f.write_text("m-persist:\n  input: 0.7\n  output: 2.1\n  cache_read: 0.07\n")
    stub_openai.responder = marker_responder
    with CostTracker(f"sqlite:///{tmp_path}/c.db", user_salt="s", prices=f) as tracker:
        cfg = tracker.config(feature="file")
        chat(stub_openai).invoke("[[p=700 c=70]]", config=cfg)
        rc = tracker.run_cost(cfg["run_id"])
        assert rc is not None and rc.cost_usd == usd(700, 70, 0)
