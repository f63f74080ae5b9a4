"""Tenant and user spend caps held across replicas, and the ``usd_per_minute`` throttle: real ``ChatOpenAI`` calls
to the stub server, real SQLite and PostgreSQL, real processes where replicas matter.

Prices make the figures easy to check: model ``capm`` costs $1,000 per million tokens in and out ($0.001 a
token), and the stub reports exactly the prompt tokens our estimate counts and ``MAX_TOKENS`` of output, so every
call costs exactly what it held (``CALL_NANOS``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from costobs_callbacks import BudgetExceededError, ConfigurationError, CostTracker
from costobs_callbacks.integrations.langchain import MESSAGES

try:
    from .stub_openai import StubReply, StubUsage
except ImportError:
    from stub_openai import StubReply, StubUsage

ROOT = Path(__file__).resolve().parent.parent
MODEL = "capm"
PRICES = {MODEL: {"input": "1000", "output": "1000"}}
MAX_TOKENS = 20
PROMPT = "What does a tenant spend?"
PROMPT_TOKENS = MESSAGES.count_tokens(MODEL, [[HumanMessage(content=PROMPT)]], ({"max_tokens": MAX_TOKENS}, {}))[0]
CALL_NANOS = (PROMPT_TOKENS + MAX_TOKENS) * 1_000_000
"""What one call costs, and what it holds while in flight."""


def usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


def reply(delay_s: float = 0.0) -> StubReply:
    return StubReply("fine", usage=StubUsage(PROMPT_TOKENS, MAX_TOKENS), delay_s=delay_s)


@pytest.fixture
def stub(stub_openai: Any) -> Any:
    stub_openai.responder = lambda record: reply()
    return stub_openai


def chat(stub: Any) -> ChatOpenAI:
    """A real ``ChatOpenAI`` to the stub, with an async HTTP client of its own (langchain-openai caches one per base
    URL across event loops, and a kept-alive connection from a closed loop fails in the next)."""
    return ChatOpenAI(model=MODEL, base_url=stub.base_url, api_key="sk-test", max_retries=0, max_tokens=MAX_TOKENS,
                      http_async_client=httpx.AsyncClient(timeout=30))


def make(url: str, tmp_path: Path, name: str = "a", **kw: Any) -> CostTracker:
    kw.setdefault("cap_refresh_s", 0.2)
    kw.setdefault("prices", PRICES)
    return CostTracker(url, user_salt="caps-salt", spool_dir=tmp_path / f"spool-{name}", **kw)


def calls_until_refused(tracker: CostTracker, llm: ChatOpenAI, limit: int = 50, **attrs: Any) -> tuple[int, Any]:
    for i in range(limit):
        try:
            llm.invoke(PROMPT, config=tracker.config(**attrs))
        except BudgetExceededError as exc:
            return i, exc
    return limit, None


def all_text(url: str) -> str:
    """Every value of every row of every table, as text."""
    eng = sa.create_engine(url)
    out = []
    with eng.connect() as conn:
        for name in sa.inspect(conn).get_table_names():
            t = sa.Table(name, sa.MetaData(), autoload_with=conn)
            for row in conn.execute(sa.select(t)):
                out.append(" ".join(str(v) for v in row))
    eng.dispose()
    return "\n".join(out)


# -- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "named"), [
    ({"tenant_budgets": {"acme": {"daily_usd": 5, "weekly_usd": 1}}}, "tenant_budgets['acme'].weekly_usd"),
    ({"tenant_budgets": {"acme": {"daily_usd": -1}}}, "tenant_budgets['acme'].daily_usd"),
    ({"tenant_budgets": {"acme": {"monthly_usd": 0}}}, "tenant_budgets['acme'].monthly_usd"),
    ({"tenant_budgets": {"acme": {"daily_usd": float("nan")}}}, "tenant_budgets['acme'].daily_usd"),
    ({"tenant_budgets": {"acme": {"daily_usd": True}}}, "tenant_budgets['acme'].daily_usd"),
    ({"tenant_budgets": {"acme": {"usd_per_minute": "abc"}}}, "tenant_budgets['acme'].usd_per_minute"),
    ({"tenant_budgets": {"acme": {"usd_per_minute": 1, "max_wait_s": -1}}}, "tenant_budgets['acme'].max_wait_s"),
    ({"tenant_budgets": {"acme": {"usd_per_minute": 1, "max_wait_s": True}}}, "tenant_budgets['acme'].max_wait_s"),
    ({"tenant_budgets": {"": {"daily_usd": 1}}}, "tenant_budgets keys"),
    ({"tenant_budgets": {7: {"daily_usd": 1}}}, "tenant_budgets keys"),
    ({"tenant_budgets": {"acme": 5}}, "tenant_budgets['acme']"),
    ({"tenant_budgets": ["acme"]}, "tenant_budgets must be a mapping"),
    ({"user_budgets": {"*": {"daily_usd": "-0.01"}}}, "user_budgets['*'].daily_usd"),
    ({"user_budgets": {"alice": {"dayly_usd": 1}}}, "user_budgets['alice'].dayly_usd"),
    ({"cap_refresh_s": 0}, "cap_refresh_s"),
    ({"cap_refresh_s": True}, "cap_refresh_s"),
])
def test_bad_configuration_is_refused_at_once_naming_the_field(tmp_path: Path, kw: dict[str, Any],
                                                               named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CostTracker(f"sqlite:///{tmp_path}/c.db", user_salt="s", spool_dir=tmp_path / "sp", **kw)
    assert named in str(info.value)
    assert not (tmp_path / "c.db").exists()  # refused before the database was opened


# -- one replica -----------------------------------------------------------------------------------------------------

def test_a_tenant_under_its_cap_may_call_and_one_at_it_is_refused_before_the_call_is_sent(
        database_url: str, tmp_path: Path, stub: Any) -> None:
    cap = CALL_NANOS * 9 // 2  # 4.5 calls: calls start at 0, 1, 2, 3 and 4 calls spent, the sixth is refused
    tracker = make(database_url, tmp_path, tenant_budgets={"acme": {"daily_usd": str(usd(cap))}})
    try:
        llm = chat(stub)
        n, exc = calls_until_refused(tracker, llm, tenant_id="acme")
        assert n == 5 and stub.count() == 5
        assert isinstance(exc, BudgetExceededError) and exc.reason == "daily_usd"
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        assert str(exc).startswith(f"tenant 'acme' reached its daily_usd=${usd(cap).normalize()} for {day} (UTC): "
                                   f"${usd(5 * CALL_NANOS).normalize()} spent")
        assert exc.limit == usd(cap) and exc.spent == usd(5 * CALL_NANOS)
        assert exc.detail["period"] == "day" and exc.detail["id"] == "acme"
        # refused again at once, without a call; another tenant (no "*") is not capped
        assert calls_until_refused(tracker, llm, tenant_id="acme")[0] == 0
        assert calls_until_refused(tracker, llm, limit=7, tenant_id="other")[0] == 7
        assert stub.count() == 12
        assert tracker.stats["caps_refused"] == 2
        assert tracker.spend(where={"tenant_id": "acme"}) == usd(5 * CALL_NANOS)
    finally:
        tracker.close()
    # the lease given back at close: the account holds nothing, and says what was spent
    eng = sa.create_engine(database_url)
    with eng.connect() as conn:
        rows = conn.execute(sa.text("SELECT scope, scope_id, period, cap_nanos, reported_nanos, leased_nanos "
                                    "FROM costobs_cap_accounts")).all()
        assert [tuple(r) for r in rows] == [("tenant", "acme", "day", cap, 5 * CALL_NANOS, 0)]
        assert conn.execute(sa.text("SELECT COUNT(*) FROM costobs_cap_leases")).scalar_one() == 0
    eng.dispose()


def test_daily_and_monthly_periods_and_the_default_for_every_other_tenant(tmp_path: Path, stub: Any) -> None:
    now = datetime.now(UTC)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if now - month_start < timedelta(days=1, hours=1):
        pytest.skip("today is the month's first day: its day and month cannot be told apart")
    url = f"sqlite:///{tmp_path}/c.db"
    caps = {"acme": {"daily_usd": str(usd(3 * CALL_NANOS))},
            "*": {"daily_usd": str(usd(100 * CALL_NANOS)), "monthly_usd": str(usd(4 * CALL_NANOS))}}
    tracker = make(url, tmp_path, tenant_budgets=caps)
    try:
        # spent earlier this month, before today: counts toward the month, not the day
        for tenant in ("beta", "acme"):
            tracker.record_cost(usd=usd(2 * CALL_NANOS), name="import", at=month_start + timedelta(hours=1),
                                tenant_id=tenant)
        tracker.flush()
        llm = chat(stub)
        n, exc = calls_until_refused(tracker, llm, tenant_id="beta")  # 2 + 2 calls reach 4 a month
        assert (n, exc.reason) == (2, "monthly_usd")
        assert f"for {now:%Y-%m} (UTC)" in str(exc)
        n, exc = calls_until_refused(tracker, llm, tenant_id="gamma")  # nothing before: 4 calls this month
        assert (n, exc.reason) == (4, "monthly_usd")
        n, exc = calls_until_refused(tracker, llm, tenant_id="acme")  # named: its own daily cap, no monthly one
        assert (n, exc.reason) == (3, "daily_usd")
        assert stub.count() == 9
    finally:
        tracker.close()


def test_recorded_spend_counts_toward_the_cap_and_a_record_is_never_refused(tmp_path: Path, stub: Any) -> None:
    tracker = make(f"sqlite:///{tmp_path}/c.db", tmp_path,
                   tenant_budgets={"acme": {"daily_usd": str(usd(3 * CALL_NANOS))}})
    try:
        llm = chat(stub)
        llm.invoke(PROMPT, config=tracker.config(tenant_id="acme"))
        tracker.record_cost(usd=usd(2 * CALL_NANOS), name="gpu", tenant_id="acme")
        assert calls_until_refused(tracker, llm, tenant_id="acme")[0] == 0
        rc = tracker.record_usage(model=MODEL, input_tokens=PROMPT_TOKENS, output_tokens=MAX_TOKENS, tenant_id="acme")
        assert rc.cost_usd == usd(CALL_NANOS)
        assert stub.count() == 1
        assert tracker.spend(where={"tenant_id": "acme"}) == usd(4 * CALL_NANOS)
    finally:
        tracker.close()


def test_user_caps_key_users_by_their_hash_and_no_raw_id_is_stored(database_url: str, tmp_path: Path,
                                                                  stub: Any) -> None:
    tracker = make(database_url, tmp_path, user_budgets={"alice@example.com": {"daily_usd": str(usd(2 * CALL_NANOS))}},
                   tenant_budgets={"*": {"daily_usd": str(usd(100 * CALL_NANOS))}})
    try:
        llm = chat(stub)
        n, exc = calls_until_refused(tracker, llm, user_id="alice@example.com", tenant_id="t1")
        assert (n, exc.reason) == (2, "daily_usd")
        assert "alice" not in str(exc) and exc.detail["scope"] == "user"
        assert calls_until_refused(tracker, llm, limit=3, user_id="bob@example.com", tenant_id="t1")[0] == 3
        # a run of alice's inside tracker.run() is refused too
        with tracker.run(user_id="alice@example.com"), pytest.raises(BudgetExceededError):
            llm.invoke(PROMPT, config={"callbacks": [tracker.langchain_handler()]})
        assert stub.count() == 5
        tracker.flush()
        alice = tracker.ledger.hash_user("alice@example.com")
    finally:
        tracker.close()
    text = all_text(database_url)
    assert "alice" not in text and "bob" not in text and "example.com" not in text
    assert f"user {alice} day" in text


def test_an_async_run_is_capped_alike(tmp_path: Path, stub: Any) -> None:
    tracker = make(f"sqlite:///{tmp_path}/c.db", tmp_path,
                   tenant_budgets={"acme": {"daily_usd": str(usd(2 * CALL_NANOS))}})

    async def go() -> int:
        llm = chat(stub)
        for i in range(10):
            try:
                await llm.ainvoke(PROMPT, config=tracker.config(tenant_id="acme"))
            except BudgetExceededError:
                return i
        return 10

    try:
        assert asyncio.run(go()) == 2
        assert stub.count() == 2
    finally:
        tracker.close()


def test_a_cap_policy_object_is_taken_as_a_mapping_is(tmp_path: Path, stub: Any) -> None:
    from costobs_callbacks import CapPolicy

    tracker = make(f"sqlite:///{tmp_path}/c.db", tmp_path,
                   tenant_budgets={"acme": CapPolicy(daily_usd=usd(2 * CALL_NANOS))})
    try:
        assert calls_until_refused(tracker, chat(stub), tenant_id="acme")[0] == 2
    finally:
        tracker.close()


def test_llamaindex_sync_calls_are_capped_alike(tmp_path: Path, stub: Any) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI

    tracker = make(f"sqlite:///{tmp_path}/c.db", tmp_path, prices={"gpt-4o-mini": PRICES[MODEL]},
                   tenant_budgets={"acme": {"daily_usd": str(usd(2 * CALL_NANOS))}})
    tracker.instrument_llamaindex()
    try:
        llm = OpenAI(api_base=stub.base_url, api_key="sk-test", model="gpt-4o-mini", max_retries=0, max_tokens=20)
        n = 0
        with pytest.raises(BudgetExceededError) as info:
            for n in range(10):  # noqa: B007
                with tracker.run(tenant_id="acme"):
                    llm.chat([ChatMessage(role="user", content=PROMPT)])
        assert (n, info.value.reason, stub.count()) == (2, "daily_usd", 2)
    finally:
        tracker.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=st.integers(1, 5), extra=st.integers(0, CALL_NANOS - 1),
       paths=st.lists(st.sampled_from(["root", "child", "scope"]), min_size=8, max_size=8))
def test_the_fast_path_and_the_general_path_admit_alike(tmp_path_factory: Any, calls: int, extra: int,
                                                        paths: list[str]) -> None:
    """A model call that opens its own run (``_start_new_llm_run``), one under a chain and one inside
    ``tracker.run()`` (``_guard_start``) are admitted and refused by the same rule: a tenant under its cap may start
    a call; ``ceil(cap / call)`` calls then fill it, whatever the mix."""
    from langchain_core.messages import HumanMessage as Msg

    cap = calls * CALL_NANOS + extra
    d = tmp_path_factory.mktemp("fastgeneral")
    tracker = make(f"sqlite:///{d}/c.db", d, tenant_budgets={"acme": {"daily_usd": str(usd(cap))}})
    ledger = tracker.ledger
    prompt = [[Msg(content=PROMPT)]]
    extra_req = ({"max_tokens": MAX_TOKENS}, {})
    admitted = 0
    outcome = []
    try:
        for i, path in enumerate(paths):
            meta = {"tenant_id": "acme"}
            try:
                if path == "root":
                    ledger.start_llm(f"r{i}", None, "m", meta, MODEL, "openai", prompt, MESSAGES, extra_req)
                    ledger.end_llm(f"r{i}", (PROMPT_TOKENS, MAX_TOKENS, 0, 0, 0), MODEL)
                elif path == "child":
                    ledger.start_span(f"c{i}", None, "chain", "chain", meta)
                    try:
                        ledger.start_llm(f"k{i}", f"c{i}", "m", meta, MODEL, "openai", prompt, MESSAGES, extra_req)
                        ledger.end_llm(f"k{i}", (PROMPT_TOKENS, MAX_TOKENS, 0, 0, 0), MODEL)
                    finally:
                        ledger.end(f"c{i}")
                else:
                    with tracker.run(tenant_id="acme"):
                        ledger.start_llm(f"s{i}", None, "m", None, MODEL, "openai", prompt, MESSAGES, extra_req)
                        ledger.end_llm(f"s{i}", (PROMPT_TOKENS, MAX_TOKENS, 0, 0, 0), MODEL)
                admitted += 1
                outcome.append(True)
            except BudgetExceededError as exc:
                assert exc.reason == "daily_usd"
                outcome.append(False)
        expected = min(len(paths), -(-cap // CALL_NANOS))
        assert admitted == expected
        assert outcome == [True] * expected + [False] * (len(paths) - expected)
        assert tracker.stats["caps_refused"] == len(paths) - expected
    finally:
        tracker.close()


def test_a_quiet_tenant_costs_the_database_nothing_and_comes_back_as_new(tmp_path: Path, stub: Any) -> None:
    """A tenant without calls gives its lease back and is forgotten (no round for it: no transaction); its next
    call leases again, and every figure adds up."""
    url = f"sqlite:///{tmp_path}/c.db"
    tracker = make(url, tmp_path, cap_refresh_s=0.05,
                   tenant_budgets={"acme": {"daily_usd": str(usd(3 * CALL_NANOS)), "usd_per_minute": "1000"}})
    try:
        caps = tracker._caps
        assert caps is not None
        llm = chat(stub)
        llm.invoke(PROMPT, config=tracker.config(tenant_id="acme"))
        deadline = time.monotonic() + 10
        while (caps.accounts or caps.buckets) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not caps.accounts and not caps.buckets and caps.retirements == 2
        rounds = caps.worker.rounds
        eng = sa.create_engine(url)
        with eng.connect() as conn:
            assert conn.execute(sa.text("SELECT reported_nanos, leased_nanos FROM costobs_cap_accounts")).one() \
                == (CALL_NANOS, 0)
        assert calls_until_refused(tracker, llm, tenant_id="acme")[0] == 2
        assert caps.worker.rounds > rounds and len(caps.accounts) == 1
    finally:
        tracker.close()
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT reported_nanos, leased_nanos FROM costobs_cap_accounts")).one() \
            == (3 * CALL_NANOS, 0)
    eng.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_is_a_replica_of_its_own(tmp_path: Path, stub: Any) -> None:
    """A child forked from a process holding leases gets a holder id of its own and no lease: what each spends is
    reported on its own, and every lease is given back at the end."""
    url = f"sqlite:///{tmp_path}/c.db"
    tracker = make(url, tmp_path, tenant_budgets={"acme": {"daily_usd": str(usd(4 * CALL_NANOS))}})
    llm = chat(stub)
    llm.invoke(PROMPT, config=tracker.config(tenant_id="acme"))
    parent_holder = tracker._caps.holder if tracker._caps is not None else None
    pid = os.fork()
    if pid == 0:  # the child: a fresh HTTP client (the parent's connections are the parent's)
        code = 99
        try:
            assert tracker._caps is not None and tracker._caps.holder != parent_holder
            child_llm = ChatOpenAI(model=MODEL, base_url=stub.base_url, api_key="sk-test", max_retries=0,
                                   max_tokens=MAX_TOKENS, http_client=httpx.Client(timeout=30))
            time.sleep(0.6)  # the parent's idle lease goes back (less is left to lease than it holds)
            code = calls_until_refused(tracker, child_llm, limit=5, tenant_id="acme")[0]
            # its leases given back; not tracker.close(): the exporter's tokenizer warm-up can be left locked by a
            # fork taken while it ran, which is the exporter's matter, not the caps'
            tracker._caps.close(5.0)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    child_calls = os.waitstatus_to_exitcode(status)
    assert 0 <= child_calls <= 4
    more = calls_until_refused(tracker, llm, tenant_id="acme")[0]
    tracker.close()
    total = 1 + child_calls + more
    assert total == stub.count() and 4 <= total <= 5
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT reported_nanos, leased_nanos FROM costobs_cap_accounts")).one() \
            == (total * CALL_NANOS, 0)
    eng.dispose()


# -- replicas: real processes sharing one database ------------------------------------------------------------------

class _Replicas:
    """Replicas started at once (their imports overlap), each released by ``go`` and read by ``results``: each runs
    ``threads`` threads bursting at tenant ``burst``, capped at ``cap`` a day."""

    def __init__(self, url: str, tmp_path: Path, stub: Any, n: int, threads: int, cap: int, max_calls: int = 200,
                 tag: str = "r", die: bool = False, refresh: float = 0.2) -> None:
        cfg = {"url": url, "base_url": stub.base_url, "prices": PRICES, "model": MODEL, "max_tokens": MAX_TOKENS,
               "prompt": PROMPT, "threads": threads, "max_calls": max_calls, "refresh": refresh, "die": die,
               "tenant_budgets": {"burst": {"daily_usd": str(usd(cap))}}}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs = []
        for i in range(n):
            c = {**cfg, "spool": str(tmp_path / f"spool-{tag}{i}")}
            self.procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "caps_child.py"), json.dumps(c)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))

    def go(self) -> None:
        for p in self.procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    def results(self, wait: bool = True) -> list[dict[str, Any]]:
        out = []
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if wait:
                assert p.wait(120) == 0
            out.append(json.loads(line))
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def _on_the_books(url: str) -> tuple[int, int]:
    """(LLM spans stored for tenant ``burst``, their cost in nano-USD)."""
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        n, cost = conn.execute(sa.text("SELECT COUNT(*), COALESCE(SUM(cost_nanos), 0) FROM costobs_spans "
                                       "WHERE tenant_id = 'burst' AND kind = 'llm'")).one()
    eng.dispose()
    return int(n), int(cost)


def _prepare(url: str, tmp_path: Path) -> None:
    """Migrate the database once, before the replicas start."""
    make(url, tmp_path, "prep").close()


def test_a_burst_of_4_processes_x_8_threads_at_one_tenants_cap(database_url: str, tmp_path: Path,
                                                              stub: Any) -> None:
    stub.responder = lambda record: reply(delay_s=0.02)
    cap = 40 * CALL_NANOS
    _prepare(database_url, tmp_path)
    burst = _Replicas(database_url, tmp_path, stub, n=4, threads=8, cap=cap)
    late = _Replicas(database_url, tmp_path, stub, n=1, threads=2, cap=cap, tag="late")  # started now, let go after
    try:
        burst.go()
        results = burst.results()
        per_replica = [sum(t["ok"] for t in r["threads"]) for r in results]
        calls = sum(per_replica)
        books, cost = _on_the_books(database_url)
        spent = calls * CALL_NANOS
        backend = database_url.split(":")[0]
        print(f"\nburst ({backend}): 4 processes x 8 threads at a daily cap of ${usd(cap)} ({cap // CALL_NANOS} calls "
              f"of ${usd(CALL_NANOS)}): {calls} calls sent (by replica {per_replica}), ${usd(spent)} spent = "
              f"{spent / cap:.3f} x the cap; overshoot {calls - cap // CALL_NANOS} calls; lease waits "
              f"{[r['stats']['caps_lease_waits'] for r in results]}, "
              f"{[r['stats']['caps_lease_wait_ms'] for r in results]} ms, timed out "
              f"{[r['stats']['caps_lease_timeouts'] for r in results]}; {max(r['elapsed'] for r in results):.2f} s")
        for r in results:
            for t in r["threads"]:
                assert t["errors"] == [] and t["refused"] == "daily_usd"  # every thread of every replica refused
            assert r["final_stats"]["failed"] == 0 and r["final_stats"]["in_spool"] == 0
        assert stub.count() == calls == books  # what the provider received is what is on the books
        assert cost == spent
        assert cap <= spent <= 2 * cap  # the cap reached; the bound the README states
        if not any(r["stats"]["caps_lease_timeouts"] for r in results):
            # every lease answered within LEASE_WAIT_S: each replica past its lease by one call at most (a machine so
            # busy that a lease takes longer decides as while the store is down, a bound of its own: see the README)
            assert spent <= cap + 4 * CALL_NANOS
        # a replica started before and let go after the cap was spent refuses at once
        late.go()
        (r,) = late.results()
        assert [t["ok"] for t in r["threads"]] == [0, 0]
        assert [t["refused"] for t in r["threads"]] == ["daily_usd", "daily_usd"]
        assert stub.count() == calls
    finally:
        burst.kill()
        late.kill()


def test_a_cap_reached_across_two_processes_sharing_one_database(postgres_database: Any, tmp_path: Path,
                                                                 stub: Any) -> None:
    """(PostgreSQL: the burst above runs on a SQLite file shared by processes too.)"""
    database_url = postgres_database()
    cap = 10 * CALL_NANOS
    _prepare(database_url, tmp_path)
    two = _Replicas(database_url, tmp_path, stub, n=2, threads=1, cap=cap)
    try:
        two.go()
        results = two.results()
    finally:
        two.kill()
    calls = [r["threads"][0]["ok"] for r in results]
    assert all(r["threads"][0]["refused"] == "daily_usd" for r in results)
    assert sum(calls) == stub.count() == _on_the_books(database_url)[0]
    assert 10 <= sum(calls) <= 12  # the cap, and at most one call past its lease by each replica


def test_a_lease_held_by_a_replica_that_died_goes_back_to_the_tenant_when_it_expires(
        postgres_database: Any, tmp_path: Path, stub: Any) -> None:
    database_url = postgres_database()
    cap = 6 * CALL_NANOS
    _prepare(database_url, tmp_path)
    # its lease expires 6 rounds (6 s) after its last renewal
    dying = _Replicas(database_url, tmp_path, stub, n=1, threads=1, cap=cap, max_calls=2, die=True, refresh=1.0)
    try:
        dying.go()
        (r,) = dying.results(wait=False)
        assert r["threads"][0]["ok"] == 2
        dying.procs[0].kill()  # SIGKILL: no close, what is left of its lease never given back
        dying.procs[0].wait(10)
    finally:
        dying.kill()
    tracker = make(database_url, tmp_path, tenant_budgets={"burst": {"daily_usd": str(usd(cap))}},
                   cap_refresh_s=0.2)
    try:
        llm = chat(stub)
        # 2 spent, and what the dead replica still leases is out of reach until its lease expires
        first = calls_until_refused(tracker, llm, tenant_id="burst")[0]
        assert first < 4
        more = 0
        deadline = time.monotonic() + 20
        while not more and time.monotonic() < deadline:  # its lease expires; a round of ours gives it back
            time.sleep(0.5)
            more = calls_until_refused(tracker, llm, tenant_id="burst")[0]
        assert 2 + first + more == 6 == stub.count()
    finally:
        tracker.close()
    eng = sa.create_engine(database_url)
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT reported_nanos, leased_nanos FROM costobs_cap_accounts")).one() \
            == (6 * CALL_NANOS, 0)
        assert conn.execute(sa.text("SELECT COUNT(*) FROM costobs_cap_leases")).scalar_one() == 0
    eng.dispose()


# -- the throttle ----------------------------------------------------------------------------------------------------

RATE = 60 * CALL_NANOS
"""A rate of one call a second: a bucket of a minute's worth (60 calls) that refills one call's worth a second."""


def _throttled(tmp_path: Path, max_wait_s: float = 5.0, **kw: Any) -> CostTracker:
    return make(f"sqlite:///{tmp_path}/c.db", tmp_path, tenant_budgets={
        "acme": {"usd_per_minute": str(usd(RATE)), "max_wait_s": max_wait_s},
        "slow": {"usd_per_minute": str(usd(RATE)), "max_wait_s": 0.3}}, **kw)


def _drain(tracker: CostTracker, tenant: str) -> None:
    """Spend the tenant's whole minute (a record is never refused, never waits)."""
    tracker.record_cost(usd=usd(RATE), name="batch", tenant_id=tenant)


def _flags(tracker: CostTracker, run_id: Any) -> list[str]:
    (span,) = [s for s in tracker.spans(run_id) if s["kind"] == "llm"]
    return (span["flags"] or "").split(",")


def test_the_throttle_delays_a_sync_call_which_then_resumes_and_refuses_past_max_wait(tmp_path: Path,
                                                                                      stub: Any) -> None:
    tracker = _throttled(tmp_path)
    try:
        llm = chat(stub)
        _drain(tracker, "acme")
        waits = []
        configs = []
        for _ in range(2):
            cfg = tracker.config(tenant_id="acme")
            configs.append(cfg)
            t0 = time.perf_counter()
            assert llm.invoke(PROMPT, config=cfg).content == "fine"  # waited, then went on with its context
            waits.append(time.perf_counter() - t0)
        assert stub.count() == 2
        assert all(0.5 < w < 4.0 for w in waits), waits  # a call's worth refills in a second
        st = tracker.stats
        assert st["throttled"] == 2 and st["throttle_refused"] == 0
        assert 1000 < st["throttle_wait_ms"] < 8000
        flags = _flags(tracker, configs[0]["run_id"])
        assert "throttled" in flags
        (ms,) = [int(f.split(":")[1]) for f in flags if f.startswith("throttle_wait_ms:")]
        assert 500 < ms < 4000

        _drain(tracker, "slow")
        t0 = time.perf_counter()
        with pytest.raises(BudgetExceededError) as info:
            llm.invoke(PROMPT, config=tracker.config(tenant_id="slow"))
        assert 0.3 <= time.perf_counter() - t0 < 2.0
        assert info.value.reason == "usd_per_minute" and "max_wait_s=0.3" in str(info.value)
        assert stub.count() == 2  # never sent
        assert tracker.stats["throttle_refused"] == 1
    finally:
        tracker.close()


async def test_the_throttle_sleeps_on_the_event_loop_which_keeps_running_other_tasks(tmp_path: Path,
                                                                                    stub: Any) -> None:
    tracker = _throttled(tmp_path)
    try:
        llm = chat(stub)
        _drain(tracker, "acme")
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        cfg = tracker.config(tenant_id="acme")
        t0 = time.perf_counter()
        out = await llm.ainvoke(PROMPT, config=cfg)
        waited = time.perf_counter() - t0
        done = True
        await task
        assert out.content == "fine" and stub.count() == 1
        assert 0.5 < waited < 4.0
        assert ticks >= 20 * waited  # the loop ran the ticker all along (every 10 ms; a blocked loop gives ~1)
        assert tracker.stats["throttled"] == 1 and tracker.stats["throttle_wait_ms"] >= 500
        assert "throttled" in _flags(tracker, cfg["run_id"])

        _drain(tracker, "slow")
        with pytest.raises(BudgetExceededError) as info:
            await llm.ainvoke(PROMPT, config=tracker.config(tenant_id="slow"))
        assert info.value.reason == "usd_per_minute"
        assert stub.count() == 1
    finally:
        tracker.close()


async def test_llamaindex_async_calls_never_block_the_loop_and_wait_at_the_run_scopes_entry(tmp_path: Path,
                                                                                          stub: Any) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI

    tracker = make(f"sqlite:///{tmp_path}/c.db", tmp_path, prices={"gpt-4o-mini": PRICES[MODEL]},
                   tenant_budgets={"acme": {"usd_per_minute": str(usd(RATE)), "max_wait_s": 5}})
    tracker.instrument_llamaindex()
    try:
        llm = OpenAI(api_base=stub.base_url, api_key="sk-test", model="gpt-4o-mini", max_retries=0, max_tokens=20)
        msgs = [ChatMessage(role="user", content=PROMPT)]
        _drain(tracker, "acme")
        await asyncio.sleep(0.5)  # a round of the caps' thread: the debt taken from the bucket, which it now knows
        # a LlamaIndex hook cannot await: a call that would have to wait is refused, the loop never blocked
        t0 = time.perf_counter()
        with tracker.run(tenant_id="acme"), pytest.raises(BudgetExceededError) as info:
            await llm.achat(msgs)
        assert time.perf_counter() - t0 < 0.5
        assert info.value.reason == "usd_per_minute" and "event loop" in str(info.value)
        assert stub.count() == 0
        # async with tracker.run() waits at its entry (asyncio.sleep), then the call goes
        t0 = time.perf_counter()
        async with tracker.run(tenant_id="acme"):
            assert 0.5 < time.perf_counter() - t0 < 4.0
            await llm.achat(msgs)
        assert stub.count() == 1
        assert tracker.stats["throttled"] == 1
    finally:
        tracker.close()


def test_the_rate_is_global_a_replicas_spend_slows_another(tmp_path: Path, stub: Any) -> None:
    """Two trackers on one database are two replicas: what one spends is taken from the shared bucket, so the
    other's next call waits for it to refill."""
    url = f"sqlite:///{tmp_path}/c.db"
    a = _throttled(tmp_path)
    b = make(url, tmp_path, "b", tenant_budgets={"acme": {"usd_per_minute": str(usd(RATE)), "max_wait_s": 5}})
    try:
        llm = chat(stub)
        t0 = time.perf_counter()
        llm.invoke(PROMPT, config=b.config(tenant_id="acme"))  # a full bucket: no wait
        assert time.perf_counter() - t0 < 1.0 and b.stats["throttled"] == 0
        _drain(a, "acme")  # the rest of the minute, spent on the other replica
        time.sleep(0.6)  # a round of a's: its debt taken from the shared bucket
        t0 = time.perf_counter()
        llm.invoke(PROMPT, config=b.config(tenant_id="acme"))
        assert 0.5 < time.perf_counter() - t0 < 4.0
        assert b.stats["throttled"] == 1 and stub.count() == 2
    finally:
        a.close()
        b.close()


# -- the database down -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["cut", "hang"])
def test_with_the_database_down_no_exception_reaches_the_app_and_the_last_figures_decide(
        postgres_database: Any, tmp_path: Path, stub: Any, mode: str) -> None:
    from tests.test_spool import Proxy

    url = postgres_database()
    port = sa.engine.make_url(url).port
    assert port is not None
    proxy = Proxy(port)
    via = sa.engine.make_url(url).set(port=proxy.port).render_as_string(hide_password=False)
    tracker = make(via, tmp_path, db_timeout=2.0, tenant_budgets={"acme": {"daily_usd": str(usd(12 * CALL_NANOS))}})
    try:
        llm = chat(stub)
        for _ in range(3):
            llm.invoke(PROMPT, config=tracker.config(tenant_id="acme"))
        time.sleep(0.5)  # a refresh: the store's figures known
        getattr(proxy, mode)()
        slowest = 0.0
        n = 0
        for _ in range(20):
            t0 = time.perf_counter()
            try:
                llm.invoke(PROMPT, config=tracker.config(tenant_id="acme"))
                n += 1
            except BudgetExceededError as exc:
                assert exc.reason == "daily_usd"
                break
            finally:
                slowest = max(slowest, time.perf_counter() - t0)
        # the lease held, then the rest of the cap as last read: this replica alone reaches it, exactly
        assert 3 + n == 12 == stub.count()
        assert slowest < 1.5  # at most one bounded wait for a lease while the store hangs, never its timeout
        st = tracker.stats
        assert st["caps_offline"] == 1 and st["caps_store_errors"] + (mode == "hang") >= 1
        if mode == "hang":  # the lease the call waited for never came: decided as while the store is down, counted
            assert st["caps_lease_timeouts"] >= 1
        assert st["internal_errors"] == 0
        proxy.restore()
        deadline = time.monotonic() + 15
        while tracker.stats["caps_offline"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tracker.stats["caps_offline"] == 0
        assert calls_until_refused(tracker, llm, tenant_id="acme")[0] == 0
    finally:
        proxy.restore()
        tracker.close()
    eng = sa.create_engine(url)
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT reported_nanos, leased_nanos FROM costobs_cap_accounts")).one() \
            == (12 * CALL_NANOS, 0)
    eng.dispose()


def test_a_replica_that_never_reached_the_database_spends_one_provisional_slice(
        postgres_database: Any, tmp_path: Path, stub: Any) -> None:
    from tests.test_spool import Proxy

    url = postgres_database()
    _prepare(url, tmp_path)
    port = sa.engine.make_url(url).port
    assert port is not None
    proxy = Proxy(port)
    proxy.cut()
    via = sa.engine.make_url(url).set(port=proxy.port).render_as_string(hide_password=False)
    tracker = make(via, tmp_path, db_timeout=2.0, tenant_budgets={"acme": {"daily_usd": str(usd(32 * CALL_NANOS))}})
    try:
        llm = chat(stub)
        n, exc = calls_until_refused(tracker, llm, tenant_id="acme")
        assert (n, exc.reason) == (2, "daily_usd")  # a first lease's worth: 1/16 of the cap
        assert tracker.stats["caps_offline"] == 1
        proxy.restore()
        deadline = time.monotonic() + 15
        while tracker.stats["caps_offline"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert calls_until_refused(tracker, llm, tenant_id="acme")[0] == 30  # the rest of the cap, once read
        assert stub.count() == 32
    finally:
        proxy.restore()
        tracker.close()
