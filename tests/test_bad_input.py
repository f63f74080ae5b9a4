"""Garbage in, never an exception out: malformed or missing usage, odd model names, odd metadata, huge
prompts and a failing database. The app's call always succeeds (or fails with its own error, never ours);
what we could not read is flagged, estimated or counted."""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from costobs_callbacks import ConfigurationError, CostTracker, RunAborted, RunCost
from costobs_callbacks._tokens import count_text

try:
    from .stub_openai import StubOpenAI, StubReply, StubUsage
except ImportError:
    from stub_openai import StubOpenAI, StubReply, StubUsage

MODEL = "m-bad"
PRICES = {MODEL: {"input": "2", "output": "8"}}


def usd(inp: int, out: int) -> Decimal:
    raw = (inp * Decimal(PRICES[MODEL]["input"]) + out * Decimal(PRICES[MODEL]["output"])) / Decimal(1_000_000)
    return raw.quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN)


def tokens(text: str) -> int:
    n, exact = count_text(text, MODEL)
    assert exact
    return n


def prompt_tokens(text: str) -> int:
    """Our rule for one chat message: its tokens + 4, plus 3 priming the reply."""
    return tokens(text) + 7


@pytest.fixture
def tracker(cost_tracker_factory) -> CostTracker:
    return cost_tracker_factory(prices=PRICES)


def chat(stub: StubOpenAI, model: str = MODEL, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=stub.base_url, api_key="sk-test", model=model, max_retries=0, **kw)


def run_cost(tracker: CostTracker, run_id: Any) -> RunCost:
    rc = tracker.run_cost(run_id)
    assert rc is not None
    return rc


def only_span(tracker: CostTracker, run_id: Any) -> dict[str, Any]:
    (span,) = tracker.spans(run_id)
    return span


# --------------------------------------------------------------------------------------------------
# Usage
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    {"prompt_tokens": -5, "completion_tokens": 2},
    {"prompt_tokens": 5, "completion_tokens": -2},
    {"prompt_tokens": 5.5, "completion_tokens": 2},
    {"prompt_tokens": True, "completion_tokens": 2},
    {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": -3}},
    {"prompt_tokens": 5, "completion_tokens": 2, "completion_tokens_details": {"reasoning_tokens": "lots"}},
    {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1.5}},
], ids=["negative-in", "negative-out", "float", "bool", "negative-cached", "text-reasoning", "float-cached"])
def test_malformed_usage_is_flagged_and_estimated(tracker, stub_openai, raw):
    stub_openai.enqueue(StubReply("four words of output", raw_usage=raw))
    cfg = tracker.config(feature="bad-usage")
    assert chat(stub_openai).invoke("hi there", config=cfg).content == "four words of output"
    rc = run_cost(tracker, cfg["run_id"])
    assert (rc.status, rc.estimated_calls, rc.llm_calls) == ("ok", 1, 1)
    assert (rc.input_tokens, rc.output_tokens) == (prompt_tokens("hi there"), tokens("four words of output"))
    assert rc.cost_usd == usd(rc.input_tokens, rc.output_tokens)
    span = only_span(tracker, cfg["run_id"])
    assert set(span["flags"].split(",")) == {"malformed_usage", "estimated"}
    assert span["estimated"] is True
    assert tracker.stats["internal_errors"] == 0


@pytest.mark.parametrize("raw", [
    {"prompt_tokens": "seven", "completion_tokens": 2},
    {"prompt_tokens": [1], "completion_tokens": {}},
    {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": "x"},
    "garbage",
    [1, 2],
], ids=["word", "containers", "details-text", "text", "list"])
def test_usage_langchain_openai_rejects_reaches_the_app_as_its_own_error(tracker, stub_openai, raw):
    """langchain-openai itself chokes on some garbage before any callback sees a result: the app gets
    langchain-openai's own exception (raised from its code, not ours) and we record an error span."""
    stub_openai.enqueue(StubReply("x", raw_usage=raw))
    cfg = tracker.config(feature="lc-raises")
    with pytest.raises(Exception) as ei:
        chat(stub_openai).invoke("hi", config=cfg)
    exc = ei.value
    assert isinstance(exc, (TypeError, AttributeError, ValueError)) and not isinstance(exc, RunAborted)
    frames = traceback.extract_tb(exc.__traceback__)
    assert not any("costobs_callbacks" in f.filename for f in frames)
    assert "langchain_openai" in frames[-1].filename or "langchain_core" in frames[-1].filename
    rc = run_cost(tracker, cfg["run_id"])
    assert (rc.status, rc.llm_calls, rc.input_tokens, rc.cost_usd) == ("error", 1, 0, 0)
    span = only_span(tracker, cfg["run_id"])
    assert (span["status"], span["error"]) == ("error", type(exc).__name__)
    assert tracker.stats["internal_errors"] == 0


def test_digit_strings_are_read_as_counts(tracker, stub_openai):
    stub_openai.enqueue(StubReply("x", raw_usage={"prompt_tokens": "12", "completion_tokens": "3"}))
    cfg = tracker.config(feature="digits")
    chat(stub_openai).invoke("hi", config=cfg)
    rc = run_cost(tracker, cfg["run_id"])
    assert (rc.input_tokens, rc.output_tokens, rc.estimated_calls, rc.cost_usd) == (12, 3, 0, usd(12, 3))
    assert only_span(tracker, cfg["run_id"])["flags"] is None


@pytest.mark.parametrize("reply", [
    StubReply("no usage at all", usage=None),
    StubReply("no usage at all", raw_usage={}),
    StubReply("no usage at all", raw_usage={"prompt_tokens": None, "completion_tokens": None}),
    StubReply("no usage at all", raw_usage={"prompt_tokens": 0, "completion_tokens": 0}),
], ids=["absent", "empty", "nulls", "zeros"])
def test_missing_usage_is_estimated_and_flagged(tracker, stub_openai, reply):
    stub_openai.enqueue(reply)
    cfg = tracker.config(feature="no-usage")
    chat(stub_openai).invoke("count these tokens", config=cfg)
    rc = run_cost(tracker, cfg["run_id"])
    assert rc.estimated_calls == 1
    assert (rc.input_tokens, rc.output_tokens) == (prompt_tokens("count these tokens"), tokens("no usage at all"))
    assert rc.cost_usd == usd(rc.input_tokens, rc.output_tokens)
    span = only_span(tracker, cfg["run_id"])
    assert (span["flags"], span["estimated"]) == ("estimated", True)


def test_malformed_usage_on_a_stream(tracker, stub_openai):
    stub_openai.enqueue(StubReply("streamed words", raw_usage={"prompt_tokens": -1, "completion_tokens": 4}))
    cfg = tracker.config(feature="bad-stream")
    text = "".join(str(c.content) for c in chat(stub_openai).stream("hi", stream_usage=True, config=cfg))
    assert text == "streamed words"
    rc = run_cost(tracker, cfg["run_id"])
    assert (rc.estimated_calls, rc.input_tokens, rc.output_tokens) == (1, prompt_tokens("hi"), tokens(text))
    assert "malformed_usage" in only_span(tracker, cfg["run_id"])["flags"].split(",")


# --------------------------------------------------------------------------------------------------
# Model names
# --------------------------------------------------------------------------------------------------


def test_odd_served_model_names(tracker, stub_openai, caplog):
    caplog.set_level(logging.WARNING, logger="costobs_callbacks")
    long_name = "x" * 300
    stub_openai.enqueue(
        StubReply("a", usage=StubUsage(10, 2), model=""),  # empty: the requested name is kept
        StubReply("b", usage=StubUsage(10, 2), model=long_name),
        StubReply("c", usage=StubUsage(10, 2), model="weird\x00model"),
    )
    cfgs = [tracker.config(feature="names") for _ in range(3)]
    for c in cfgs:
        chat(stub_openai).invoke("hi", config=c)
    empty, long_, nul = (run_cost(tracker, c["run_id"]) for c in cfgs)
    assert (empty.cost_usd, empty.by_model, empty.unpriced_calls) == (usd(10, 2), {MODEL: usd(10, 2)}, 0)
    assert (long_.unpriced_calls, long_.input_tokens, long_.cost_usd) == (1, 10, 0)
    assert only_span(tracker, cfgs[1]["run_id"])["model"] == "x" * 256
    assert (nul.unpriced_calls, nul.input_tokens) == (1, 10)
    assert only_span(tracker, cfgs[2]["run_id"])["model"] == "weirdmodel"
    assert tracker.stats["failed"] == 0 and tracker.stats["internal_errors"] == 0


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


class Labelled:
    def __str__(self) -> str:
        return "labelled-object"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@pytest.mark.parametrize(("meta", "want"), [
    ({"feature": 123, "tenant_id": 4.5, "route": 0}, {"feature": "123", "tenant_id": "4.5", "route": "0"}),
    ({"feature": None, "tenant_id": None, "team": None}, {"feature": "unattributed", "team": None}),
    ({"feature": "", "route": ""}, {"feature": "unattributed"}),
    ({"feature": {"x": 1}, "tenant_id": ["a"]}, {"feature": "{'x': 1}", "tenant_id": "['a']"}),
    ({"feature": Labelled(), "obj": Labelled(), "d": {"a": 1}, "l": [1], "b": b"raw"}, {"feature": "labelled-object"}),
    ({"feature": Unprintable(), "prompt_version": Unprintable()},
     {"feature": "<Unprintable>", "prompt_version": "<Unprintable>"}),
    ({"feature": "f" * 1000, "k" * 300: "v" * 300}, {"feature": "f" * 256, "k" * 256: "v" * 256}),
    ({"feature": "ok", "n": 7, "x": 1.25, "flag": True, 5: "int key"},
     {"feature": "ok", "n": 7, "x": 1.25, "flag": True}),
], ids=["numbers", "nones", "empty", "containers", "objects", "unprintable", "long", "scalars"])
def test_odd_metadata_values(tracker, stub_openai, meta, want):
    stub_openai.enqueue(StubReply("ok", usage=StubUsage(10, 2)))
    rid = uuid.uuid4()
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | chat(stub_openai)
    cfg: Any = {"callbacks": [tracker.langchain_handler()], "metadata": meta, "run_id": rid}
    assert chain.invoke({"q": "hi"}, config=cfg).content == "ok"
    rc = run_cost(tracker, rid)
    assert rc.attributes == want
    assert (rc.cost_usd, rc.llm_calls) == (usd(10, 2), 1)
    assert tracker.stats["internal_errors"] == 0 and tracker.stats["failed"] == 0


def test_odd_user_ids_are_hashed(tracker, stub_openai):
    import hashlib
    import hmac

    stub_openai.responder = lambda req: StubReply("ok", usage=StubUsage(1, 1))
    for uid, text in ((42, "42"), (Labelled(), "labelled-object"), ("", None)):
        rid = uuid.uuid4()
        chat(stub_openai).invoke("hi", config={"callbacks": [tracker.langchain_handler()],
                                               "metadata": {"feature": "u", "user_id": uid}, "run_id": rid})
        attrs = run_cost(tracker, rid).attributes
        if text is None:
            assert "user" not in attrs
        else:
            assert attrs["user"] == hmac.new(b"test-salt", text.encode(), hashlib.sha256).hexdigest()


def test_non_finite_and_nul_metadata_stored_on_every_backend(database_url, stub_openai):
    """NaN is no JSON number for PostgreSQL and NUL no text character: one such value must not fail the whole
    batch (other runs' spans with it). They are stored as text, NULs dropped."""
    with CostTracker(database_url, user_salt="test-salt", prices=PRICES) as tracker:
        stub_openai.enqueue(StubReply("ok", usage=StubUsage(10, 2)),
                            StubReply("ok", usage=StubUsage(10, 2), model="m\x00x"))
        good, bad = tracker.config(feature="fine"), uuid.uuid4()
        meta = {"feature": "nul\x00feature", "tenant_id": "t\x00", "nan": float("nan"), "inf": float("-inf"),
                "txt": "a\x00b"}
        chat(stub_openai).invoke("hi", config=good)
        chat(stub_openai).invoke("hi", config={"callbacks": [tracker.langchain_handler()], "metadata": meta,
                                               "run_id": bad})
        assert tracker.flush(10)
        assert (tracker.stats["failed"], tracker.stats["retries"]) == (0, 0)
        assert run_cost(tracker, good["run_id"]).cost_usd == usd(10, 2)
        rc = run_cost(tracker, bad)
        assert rc.attributes == {"feature": "nulfeature", "tenant_id": "t", "nan": "nan", "inf": "-inf", "txt": "ab"}
        assert (rc.unpriced_calls, rc.by_model, rc.unpriced_models) == (1, {}, ("mx",))


@pytest.mark.parametrize(("payload", "faults"), [
    ({"usd": "0.001"}, 0),
    ({"usd": "lots"}, 1),
    ({"usd": -0.5}, 1),
    ({"usd": float("nan")}, 1),
    ({"dollars": 1}, 1),
    ("0.001", 0),
    (None, 1),
], ids=["ok", "word", "negative", "nan", "no-usd", "bare-amount", "none"])
def test_bad_cost_events_from_tools(cost_tracker_factory, stub_openai, payload, faults):
    """A tool reporting a cost we cannot read: the tool still works, its price still counts, the bad
    report is counted as an internal error (and logged), never raised."""
    from langchain.agents import create_agent
    from langchain_core.callbacks import dispatch_custom_event
    from langchain_core.tools import tool

    @tool
    def search(q: str) -> str:
        """Search."""
        dispatch_custom_event("costobs.cost", payload)
        return "found"

    tracker = cost_tracker_factory(prices=PRICES, tool_prices={"search": "0.01"})
    stub_openai.enqueue(StubReply("", tool_calls=[("search", {"q": "x"})], usage=StubUsage(10, 2)),
                        StubReply("done", usage=StubUsage(10, 2)))
    cfg = tracker.config(feature="cost-event")
    out = create_agent(chat(stub_openai), [search]).invoke({"messages": [("user", "go")]}, config=cfg)
    assert out["messages"][-1].content == "done"
    rc = run_cost(tracker, cfg["run_id"])
    own = Decimal("0.001") if not faults else Decimal(0)
    assert rc.cost_usd == 2 * usd(10, 2) + Decimal("0.01") + own
    assert rc.tool_calls == 1
    assert tracker.stats["internal_errors"] == faults


def test_long_override_price_stored_on_every_backend(database_url, stub_openai):
    """A price with more digits than its 40-character audit column is audited shortened to fit, on PostgreSQL
    too (which refuses text longer than a column): the batch is not failed, the cost is exact."""
    long_price = "0.1234567890123456789012345678901234567890"
    with CostTracker(database_url, user_salt="test-salt", prices={MODEL: {"input": long_price, "output": "2"}}) as t:
        stub_openai.enqueue(StubReply("ok", usage=StubUsage(1_000_000, 0)))
        cfg = t.config(feature="long-price")
        chat(stub_openai).invoke("hi", config=cfg)
        assert t.flush(10) and t.stats["failed"] == 0
        assert run_cost(t, cfg["run_id"]).cost_usd == Decimal("0.123456789")  # a million tokens, to the nano
        assert only_span(t, cfg["run_id"])["price_input"] == "0.12345678901234567890123456789"


def test_scope_run_id_must_fit_its_column(tracker):
    for bad in ("r" * 65, "", "a\x00b"):
        with pytest.raises(ConfigurationError, match="run_id"):
            tracker.run(feature="x", run_id=bad)
    with tracker.run(feature="x", run_id="r" * 64) as run:
        pass
    assert run_cost(tracker, run.run_id).status == "ok"


# --------------------------------------------------------------------------------------------------
# Huge prompts
# --------------------------------------------------------------------------------------------------


def test_huge_prompt(tracker, stub_openai):
    huge = "lorem ipsum dolor sit amet " * 80_000  # 2.16 MB
    assert len(huge) > 2_000_000
    stub_openai.enqueue(StubReply("short", usage=StubUsage(540_000, 1)), StubReply("short", usage=None))
    exact, est = tracker.config(feature="huge"), tracker.config(feature="huge")
    llm = chat(stub_openai)
    t0 = time.perf_counter()
    assert llm.invoke(huge, config=exact).content == "short"
    assert llm.invoke(huge, config=est).content == "short"
    assert time.perf_counter() - t0 < 10
    assert len(stub_openai.last_request()["messages"][0]["content"]) == len(huge)
    rc = run_cost(tracker, exact["run_id"])
    assert (rc.input_tokens, rc.cost_usd, rc.estimated_calls) == (540_000, usd(540_000, 1), 0)
    rc = run_cost(tracker, est["run_id"])
    # too long to tokenize on the app's thread: 4 characters a token, flagged
    assert (rc.input_tokens, rc.output_tokens) == ((len(huge) + 3) // 4 + 7, tokens("short"))
    assert rc.estimated_calls == 1
    assert set(only_span(tracker, est["run_id"])["flags"].split(",")) == {"estimated", "estimate:chars"}
    assert tracker.stats["internal_errors"] == 0


# --------------------------------------------------------------------------------------------------
# The database failing
# --------------------------------------------------------------------------------------------------


def _wait_counted(tracker: CostTracker, emitted: int) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        stats = tracker.stats
        if stats["exported"] + stats["failed"] + stats["spooled"] >= emitted or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_table_dropped_mid_run_never_reaches_the_app(tracker, stub_openai, tmp_path):
    stub_openai.responder = lambda req: StubReply("fine", usage=StubUsage(10, 2))
    llm = chat(stub_openai)
    first = tracker.config(feature="db")
    llm.invoke("hi", config=first)
    assert tracker.flush(5) and tracker.stats["exported"] == 1
    eng = sa.create_engine(f"sqlite:///{tmp_path}/costs.db")
    with eng.begin() as conn:
        conn.execute(sa.text("DROP TABLE costobs_spans"))
    eng.dispose()

    second = tracker.config(feature="db")
    for _ in range(3):
        assert llm.invoke("hi", config=second).content == "fine"  # the app never notices
    assert not tracker.flush(0.3)  # still in the spool
    tracker.close(timeout=0.5)
    stats = _wait_counted(tracker, 4)
    # kept in the spool (replayed once the table is back), not lost
    got = tuple(stats[k] for k in ("exported", "failed", "dropped", "spooled", "in_spool"))
    assert got == (1, 0, 0, 3, 3)
    assert stats["internal_errors"] == 0


def test_read_only_database_never_reaches_the_app(cost_tracker_factory, stub_openai, tmp_path):
    cost_tracker_factory("ro.db").close()  # create and migrate it
    with CostTracker(f"sqlite:///file:{tmp_path}/ro.db?mode=ro&uri=true", user_salt="test-salt",
                     prices=PRICES, spool_dir=tmp_path / "spool") as tracker:
        assert tracker.rollup(by="feature") == []  # reads work
        stub_openai.enqueue(StubReply("fine", usage=StubUsage(10, 2)))
        cfg = tracker.config(feature="ro")
        assert chat(stub_openai).invoke("hi", config=cfg).content == "fine"
        tracker.close(timeout=0.5)
        stats = _wait_counted(tracker, 1)
        assert (stats["exported"], stats["failed"], stats["in_spool"]) == (0, 0, 1)  # spooled, not lost


def test_unreachable_database_at_start(stub_openai, tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/no/such/dir/costs.db"
    with pytest.raises(ConfigurationError, match="user_salt"):
        CostTracker(url)  # the salt lives in the database: refuse to guess
    caplog.set_level(logging.ERROR, logger="costobs_callbacks")
    tracker = CostTracker(url, user_salt="test-salt", prices=PRICES, spool_dir=tmp_path / "spool")
    try:
        assert any("database unavailable" in r.getMessage() for r in caplog.records)
        stub_openai.enqueue(StubReply("fine", usage=StubUsage(10, 2)))
        cfg = tracker.config(feature="down")
        assert chat(stub_openai).invoke("hi", config=cfg).content == "fine"
    finally:
        tracker.close(timeout=0.5)
    stats = _wait_counted(tracker, 1)
    assert (stats["exported"], stats["failed"], stats["in_spool"]) == (0, 0, 1)  # spooled, not lost


def test_bad_database_urls():
    with pytest.raises(ConfigurationError):
        CostTracker("not-a-url://", user_salt="s")
    with pytest.raises(ConfigurationError):
        CostTracker("nosuchdialect://host/db", user_salt="s")


def test_store_path_is_a_directory(tmp_path: Path):
    with pytest.raises(ConfigurationError):
        CostTracker(f"sqlite:///{tmp_path}")  # a directory, not a file; no salt to fall back on
