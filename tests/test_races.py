"""Many threads starting calls of ONE run at once: every request the provider receives is on the books, and a
budget shared by them holds.

LangChain gives every invocation of one config the config's ``run_id``, so sixteen threads invoking a chat model
directly (no chain around it) with one shared ``tracker.config(...)`` open sixteen root spans under one id, at
the same moment, right after start-up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from langchain_openai import ChatOpenAI

from costobs_callbacks import Budget, BudgetExceededError, CostTracker

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

THREADS = 16
MODEL = "gpt-4o-mini"  # priced from the catalog: $0.15 in, $0.60 out per million tokens
CALL_USD = Decimal("0.0000045")  # 10 prompt tokens, 5 completion tokens


@pytest.fixture
def http_clients() -> Iterator[Callable[[], httpx.Client]]:
    made: list[httpx.Client] = []

    def make() -> httpx.Client:
        made.append(httpx.Client(timeout=30, limits=httpx.Limits(max_connections=5)))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _burst(llm: ChatOpenAI, cfg: Any, prompt: str) -> tuple[int, list[BaseException]]:
    barrier = threading.Barrier(THREADS)
    ok: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            llm.invoke(f"{prompt} ({i})", config=cfg)  # distinct requests: the loop guard has nothing to say
        except BaseException as exc:  # collected and asserted below
            with lock:
                errors.append(exc)
        else:
            with lock:
                ok.append(1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return len(ok), errors


def _chat(stub: StubOpenAI, client: httpx.Client, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=MODEL, max_retries=0, http_client=client, **kw)


@pytest.mark.parametrize("attempt", range(3))
def test_sixteen_threads_one_config_every_request_on_the_books(
    cost_tracker_factory: Callable[..., CostTracker], stub_openai: StubOpenAI, http_clients: Any, attempt: int
) -> None:
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 5))
    tracker = cost_tracker_factory(export_delay=0.05)  # fresh: the price cache and the ledger are cold
    cfg = tracker.config(feature="burst", budget=Budget(max_cost_usd=5))
    ok, errors = _burst(_chat(stub_openai, http_clients()), cfg, "hello there")
    assert (ok, errors) == (THREADS, [])
    assert stub_openai.count() == THREADS
    live = tracker.run_cost(cfg["run_id"])
    assert tracker.flush(30)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    assert (rc.llm_calls, rc.input_tokens, rc.output_tokens, rc.cost_usd, rc.status) == (
        THREADS, 10 * THREADS, 5 * THREADS, CALL_USD * THREADS, "ok")
    assert rc.by_model == {MODEL: CALL_USD * THREADS}
    assert live is not None and live.llm_calls == THREADS
    assert len(tracker.spans(cfg["run_id"])) == THREADS
    assert tracker.stats["open_runs"] == 0


@pytest.mark.parametrize("attempt", range(3))
def test_sixteen_threads_one_tight_budget_is_held(
    cost_tracker_factory: Callable[..., CostTracker], stub_openai: StubOpenAI, http_clients: Any, attempt: int
) -> None:
    """Each call holds its estimate (its prompt counted, ``max_tokens`` for its output) from its start to its end:
    with a budget for about four calls, at most what fits is sent, and what was sent is all recorded."""
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 5), delay_s=0.05)
    tracker = cost_tracker_factory(export_delay=0.05)
    # The prompt counts more than the 10 tokens the stub reports, so each estimate covers the call's real cost.
    prompt = "please answer this question briefly and clearly, thank you"
    budget = Decimal("0.000030")
    cfg = tracker.config(feature="tight", budget=Budget(max_cost_usd=budget))
    ok, errors = _burst(_chat(stub_openai, http_clients(), max_tokens=5), cfg, prompt)
    sent = stub_openai.count()
    assert ok == sent and ok + len(errors) == THREADS
    assert 1 <= sent < THREADS
    assert all(isinstance(e, BudgetExceededError) for e in errors)
    assert tracker.flush(30)
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None
    assert (rc.llm_calls, rc.cost_usd, rc.status) == (sent, CALL_USD * sent, "aborted")
    assert rc.cost_usd <= budget


def test_sixteen_threads_without_max_tokens_stay_within_the_budget(
    cost_tracker_factory: Callable[..., CostTracker], stub_openai: StubOpenAI, http_clients: Any
) -> None:
    """A call that sets no ``max_tokens`` holds an output estimate: the model's largest output in this process,
    else its context window (as much of it as the budget has left). Without it each call held its prompt only and
    sixteen concurrent calls spent several times the limit."""
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 200), delay_s=0.05)
    call = Decimal("0.0001215")  # 10 in at $0.15/M + 200 out at $0.60/M
    tracker = cost_tracker_factory(export_delay=0.05)
    budget = Decimal("0.0005")
    llm = _chat(stub_openai, http_clients())
    # No output of gpt-4o-mini seen yet: the first call holds what its context window allows, i.e. all the budget.
    cfg = tracker.config(feature="no-max", budget=Budget(max_cost_usd=budget))
    ok, errors = _burst(llm, cfg, "please answer this question briefly and clearly")
    assert ok == stub_openai.count() == 1 and len(errors) == THREADS - 1
    assert tracker.ledger.largest_output["gpt-4o-mini"] == 200
    # Now the model's largest output is known: each call holds its prompt and 200 output tokens, four fit.
    stub_openai.reset()
    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 200), delay_s=0.05)
    cfg2 = tracker.config(feature="no-max", budget=Budget(max_cost_usd=budget))
    ok2, errors2 = _burst(llm, cfg2, "please answer this question briefly and clearly")
    assert ok2 == stub_openai.count() and ok2 + len(errors2) == THREADS
    assert 1 <= ok2 <= 4
    assert tracker.flush(30)
    for c, n in ((cfg, ok), (cfg2, ok2)):
        rc = tracker.run_cost(c["run_id"])
        assert rc is not None
        assert (rc.llm_calls, rc.cost_usd) == (n, call * n)
        assert rc.cost_usd <= budget


def test_attribution_cut_or_sanitised_is_flagged_on_every_span(
    cost_tracker_factory: Callable[..., CostTracker], stub_openai: StubOpenAI
) -> None:
    """An attribution value longer than 256 characters is cut there and flagged ``truncated``; a lone surrogate
    (no database encoding takes it) is replaced by U+FFFD and flagged ``sanitized``; every span of the run says so."""
    from langchain_core.runnables import RunnableLambda

    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(10, 5))
    tracker = cost_tracker_factory()
    llm = ChatOpenAI(base_url=stub_openai.base_url, api_key="sk-test", model=MODEL, max_retries=0)
    chain = RunnableLambda(lambda x: x) | llm
    cfg = tracker.config(feature="f" * 300, route="r\udcffs", team="t" * 260)
    chain.invoke("hi", config=cfg)
    ok = tracker.config(feature="plain")
    chain.invoke("hi", config=ok)
    assert tracker.flush(10)
    spans = tracker.spans(cfg["run_id"])
    assert len(spans) == 3
    assert all(set(s["flags"].split(",")) >= {"truncated", "sanitized"} for s in spans)
    assert {(s["feature"], s["route"]) for s in spans} == {("f" * 256, "r\ufffds")}
    rc = tracker.run_cost(cfg["run_id"])
    assert rc is not None and rc.attributes["team"] == "t" * 256 and rc.cost_usd == CALL_USD
    assert all(s["flags"] is None for s in tracker.spans(ok["run_id"]) if s["kind"] != "llm")
