"""What the demo and ``costobs report`` / ``costobs run`` print about money: a model call without a price is never a
silent $0 (a dash and a count when no call of the group had a price, the priced calls' cost "+ N unpriced" when some
had), a tool without a price is shown as such, and ``--json`` keeps the figures as numbers."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from contextlib import redirect_stdout
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from costobs_callbacks import CostTracker
from costobs_callbacks._format import key_text, usd
from costobs_callbacks.cli import main


@pytest.fixture(autouse=True)
def _no_env_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTOBS_DATABASE_URL", raising=False)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def cells(text: str, title: str) -> list[list[str]]:
    """The rows of the table under ``title`` (header and rule left out), as cells."""
    lines = f"\n{text}".split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [re.split(r"\s{2,}", ln.strip()) for ln in lines]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """The demo's 20 runs (seed 7) in a SQLite file: (url, what it printed, the file)."""
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    url = f"sqlite:///{path}"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["demo", "--runs", "20", "--database-url", url]) == 0
    return url, buf.getvalue(), path


def _run_of(path: Path, feature: str) -> str:
    con = sqlite3.connect(path)
    try:
        return str(con.execute("SELECT run_id FROM costobs_runs WHERE feature = ? ORDER BY run_id",
                               (feature,)).fetchone()[0])
    finally:
        con.close()


def test_the_one_form_of_a_cost() -> None:
    assert usd(Decimal("0.0123")) == "$0.012300"
    assert usd(Decimal("1234.5")) == "$1,234.500000"
    assert usd(Decimal(0)) == "$0.000000"  # priced at $0 (a cache hit): a figure, not a missing price
    assert usd(Decimal(0), 2, 2) == "- (2 unpriced)"
    assert usd(Decimal(0), 2) == "- (2 unpriced)"
    assert usd(Decimal(0), 2, 3) == "$0.000000 + 2 unpriced"  # a priced call that cost $0 beside them
    assert usd(Decimal("0.01"), 2, 2) == "$0.010000 + 2 unpriced"  # e.g. a priced tool in the group
    assert usd(Decimal("0.01"), 1_500, 3_000) == "$0.010000 + 1,500 unpriced"
    assert usd(Decimal("0.000205200"), places=None) == "$0.000205200"
    assert usd(Decimal("0.000081600"), 0, 1, places=9) == "$0.000081600"
    assert (key_text(None), key_text("acme"), key_text(0)) == ("(none)", "acme", "0")


def test_the_demo_shows_unpriced_calls_and_tools_without_a_price(demo: tuple[str, str, Path]) -> None:
    _, out, _ = demo
    assert "costobs demo: 22 runs, total $0.105996 + 2 unpriced\n" in out
    assert [c[:5] for c in cells(out, "Cost by feature")] == [
        ["research-agent", "4", "16", "13", "$0.094918"],
        ["support-chat", "8", "16", "8", "$0.008564"],
        ["order-status", "6", "12", "6", "$0.001422"],
        ["summarize", "1", "1", "0", "$0.000665"],
        ["unattributed", "1", "1", "0", "$0.000428"],
        ["legal-review", "2", "2", "0", "- (2 unpriced)"],
    ]
    assert cells(out, "Cost by tenant") == [
        ["acme", "7", "$0.055048 + 2 unpriced"], ["initech", "4", "$0.029552"], ["globex", "7", "$0.019517"],
        ["umbrella", "3", "$0.001451"], ["(none)", "1", "$0.000428"]]
    assert cells(out, "Cost by model")[-1] == ["acme-legal-ft-v2", "2", "367", "0", "106", "0", "- (2 unpriced)"]
    assert cells(out, "Tool costs") == [["web_search", "13", "reported by the tool", "$0.065000"],
                                        ["search_kb", "8", "$0.001000 a call", "$0.008000"],
                                        ["lookup_order", "6", "none", "-"]]
    assert "cost=$0.051629\n" in out
    assert "  note: model 'acme-legal-ft-v2' has no price (2 calls, tokens kept, never counted as $0)" in out
    assert "  note: 'lookup_order' had no price: counted as tool calls, not costed" in out
    assert "$0.000000" not in out


def test_report_shows_unpriced_calls(capsys: pytest.CaptureFixture[str], demo: tuple[str, str, Path]) -> None:
    url = demo[0]
    rc, out, err = run_main(capsys, "report", "--by", "feature", "--database-url", url)
    assert (rc, err) == (0, "")
    rows = cells(out, "Costs by feature")
    assert [r[0] for r in rows][-1] == "legal-review"
    assert rows[-1][:7] == ["legal-review", "2", "2", "0", "367", "106", "- (2 unpriced)"]
    assert rows[0][:7] == ["research-agent", "4", "16", "13", "2458", "6185", "$0.094918"]
    assert "\nunpriced: model calls without a price, never counted as $0" in out
    assert "\ntools: a tool call without a price" in out
    assert "$0.000000" not in out

    _, out, _ = run_main(capsys, "report", "--by", "tenant_id", "--database-url", url)
    rows = cells(out, "Costs by tenant_id")
    assert rows[0][0] == "acme" and rows[0][6] == "$0.055048 + 2 unpriced"
    assert rows[-1][0] == "(none)"

    _, out, _ = run_main(capsys, "report", "--by", "model", "--where", "kind=llm", "--database-url", url)
    rows = cells(out, "Costs by model")
    assert rows[-1][0] == "acme-legal-ft-v2" and rows[-1][6] == "- (2 unpriced)"
    assert "\ntools:" not in out  # no tool calls in these groups: no word about them

    _, out, _ = run_main(capsys, "report", "--by", "feature", "--where", "feature=summarize", "--database-url", url)
    assert "unpriced" not in out and "$0.000665" in out


def test_report_json_keeps_numbers(capsys: pytest.CaptureFixture[str], demo: tuple[str, str, Path]) -> None:
    rc, out, _ = run_main(capsys, "report", "--by", "feature", "--json", "--database-url", demo[0])
    assert rc == 0
    got = {r["key"]["feature"]: r for r in json.loads(out)}
    legal, total = got["legal-review"], sum(Decimal(r["cost_usd"]) for r in got.values())
    assert (legal["cost_usd"], legal["unpriced_calls"], legal["llm_calls"], legal["input_tokens"]) == ("0", 2, 2, 367)
    assert got["research-agent"]["cost_usd"] == "0.094917800" and got["research-agent"]["unpriced_calls"] == 0
    assert total == Decimal("0.105995750")
    assert set(legal) >= {"estimated_calls", "cache_hits", "saved_usd"}


def test_run_shows_unpriced_calls_and_tools_without_a_price(capsys: pytest.CaptureFixture[str],
                                                             demo: tuple[str, str, Path]) -> None:
    url, _, path = demo
    legal = _run_of(path, "legal-review")
    rc, out, _ = run_main(capsys, "run", legal, "--spans", "--database-url", url)
    lines = out.splitlines()
    assert rc == 0
    assert lines[0] == f"run {legal}: ok cost - (1 unpriced)"
    assert lines[1] == "  tokens: input 91 (cached 0), output 53 (reasoning 0); llm calls 1 (1 unpriced), tool calls 0"
    assert lines[3] == "  acme-legal-ft-v2: - (1 unpriced)"
    assert re.fullmatch(r"  - llm +DemoChatModel +ok +[\d.]+ ms - \(1 unpriced\)", lines[4])
    assert re.fullmatch(r"  - chain +agent +ok +[\d.]+ ms \(subtree - \(1 unpriced\)\)", lines[5])

    order = _run_of(path, "order-status")
    rc, out, _ = run_main(capsys, "run", order, "--spans", "--database-url", url)
    lines = out.splitlines()
    assert lines[0].startswith(f"run {order}: ok cost $0.000")
    assert lines[1].endswith("llm calls 2, tool calls 1 (1 without a price)")
    assert re.fullmatch(r"  - tool +lookup_order +ok +[\d.]+ ms - \(no price\)", lines[5])
    assert "unpriced" not in out and "$0.000000000" not in out


def test_a_run_with_priced_and_unpriced_calls(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/mixed.db"
    at = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)
    with CostTracker(url, user_salt="s", tool_prices={"serp": "0.004"}, spool_dir=tmp_path / "spool") as t:
        rc = t.record_usage(model="gpt-4o", input_tokens=1000, output_tokens=100, feature="mixed", at=at)
        t.record_usage(model="our-ft-model", input_tokens=500, output_tokens=50, feature="mixed", at=at,
                       run_id=rc.run_id)
        t.record_usage(model="our-ft-model", input_tokens=7, output_tokens=7, feature="unpriced-only", at=at)
    rid = rc.run_id
    code, out, _ = run_main(capsys, "run", rid, "--database-url", url)
    assert code == 0
    assert out.splitlines()[0] == f"run {rid}: ok cost $0.003500000 + 1 unpriced"  # 1000 x $2.50/M + 100 x $10/M
    assert "  gpt-4o: $0.003500000\n" in out and "  our-ft-model: - (1 unpriced)\n" in out
    code, out, _ = run_main(capsys, "report", "--by", "feature", "--database-url", url)
    assert {r[0]: r[6] for r in cells(out, "Costs by feature")} == {"mixed": "$0.003500 + 1 unpriced",
                                                                    "unpriced-only": "- (1 unpriced)"}
    code, out, _ = run_main(capsys, "report", "--by", "model", "--json", "--database-url", url)
    assert {r["key"]["model"]: (r["cost_usd"], r["unpriced_calls"]) for r in json.loads(out)} == {
        "gpt-4o": ("0.003500000", 0), "our-ft-model": ("0", 2)}
