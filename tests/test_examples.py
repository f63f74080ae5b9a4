"""The scripts in ``examples/`` run as their docstrings say: each a child process, offline (no API key), its database
in a temporary folder, and prints the figures it should; what they import is installed by the ``examples`` extra."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
INSTALL = 'pip install "costobs-callbacks[examples]"'
RUN_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"

EXPECTED: dict[str, list[str]] = {
    # exact lines (a run id as RUN_ID, a latency as LATENCY), in the order the script prints them
    "budget_guard.py": [
        "1. A cost budget: the agent keeps searching with new queries.",
        "   stopped: run RUN_ID spent $0.05625, past max_cost_usd=$0.05, after llm 'demo-model'; stopped",
        "   limit=0.05 spent=0.056250000 reason=max_cost_usd",
        "   the model was called 5 times; recorded: $0.056250000 over 5 calls, status=aborted, reason=max_cost_usd",
        "2. The loop guard (on by default): the agent repeats the very same search.",
        "   stopped: run RUN_ID called tool 'web_search' with the same arguments 4 times in a row "
        "(max_identical_tool_calls=4); the call was refused",
        "   the model was called 4 times; recorded: $0.037800000, status=aborted",
        "3. The agent middleware ends the agent politely instead of raising.",
        "   the user sees: 'Sorry, this request hit its cost limit. Try a narrower question.'",
        "   the product can log: max_cost_usd, run RUN_ID",
        "   the model was called 5 times; recorded: $0.056250000, status=aborted",
    ],
    "chain.py": [
        "run RUN_ID: $0.000101175 (318 in / 99 out, 79 cached, 2 calls), status ok",
        "by model: {'gpt-4o-mini': Decimal('0.000101175')}",
        "{'feature': 'summarize', 'model': 'gpt-4o-mini'}: $0.000101175 over 2 calls, avg LATENCY ms",
    ],
    "langgraph_agent.py": [
        "run cost $0.002052050: 3 LLM calls, 2 tool calls, 95 input / 63 output tokens",
        "  llm    DemoChatModel                own $0.000011  subtree $0.000011",
        "  tool   get_weather                  own $0.002000  subtree $0.002000",
        "  tool   get_time                     own         -  subtree $0.000000",  # no price: not a $0 price
        "  chain  LangGraph                    own         -  subtree $0.002052",
    ],
    "llamaindex_rag.py": [
        "ingest    RUN_ID: $0.000001240 (62 tokens embedded)",
        "answer    RUN_ID: $0.000887700 (2 calls: 109 in / 64 out, 2 estimated)",
        "answer    RUN_ID: $0.000877620 (2 calls: 101 in / 64 out, 2 estimated)",
        "streamed  RUN_ID: $0.000545100",
        "stopped   RUN_ID: max_cost_usd, spent $0.000000120",
        "rag-answer: $0.001765440 over 5 model calls in 3 runs",
        "rag-stream: $0.000545100 over 2 model calls in 1 runs",
        "    ingest: $0.000001240 over 1 model calls in 1 runs",
    ],
    "tool_costs.py": [
        "geocode run: $0.005000000, tool calls 1",
        "scrape run: $0.006000000 (reported by the tool at run time)",
        "tool scrape: $0.006000000 over 1 calls",
        "tool geocode: $0.005000000 over 1 calls",
    ],
}


def _pattern(line: str) -> re.Pattern[str]:
    return re.compile(re.escape(line).replace("RUN_ID", RUN_ID).replace("LATENCY", r"\d+\.\d\d"))


def test_every_example_is_checked() -> None:
    assert sorted(EXPECTED) == EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_offline_and_prints_its_figures(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI_", "ANTHROPIC_", "COSTOBS_", "LANGCHAIN_", "LANGSMITH_"))}
    env["PYTHONPATH"] = str(ROOT)  # this checkout's package
    env["TMPDIR"] = str(tmp_path)  # the example's database goes here
    p = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert "Deprecat" not in p.stderr, p.stderr  # what a reader copies should not be on its way out
    lines = p.stdout.splitlines()
    at = 0
    for want in EXPECTED[name]:  # each expected line, in order
        pat = _pattern(want)
        while at < len(lines) and not pat.fullmatch(lines[at]):
            at += 1
        assert at < len(lines), f"{name}: no line {want!r} (in order) in:\n{p.stdout}"
        at += 1
    assert list(tmp_path.glob("*/*.db")), "the example's database is not in its temporary folder"


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_docstring_names_the_commands_that_run_it(name: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / "examples" / name).read_text())) or ""
    assert INSTALL in doc and 'pip install ".[examples]"' in doc
    assert f"python examples/{name}" in doc


def _declared(project: dict[str, object], extra: str) -> set[str]:
    deps = [*project["dependencies"], *project["optional-dependencies"][extra]]  # type: ignore[index, misc]
    return {Requirement(d).name.lower().replace("_", "-") for d in deps}


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_examples_extra_installs_what_the_example_imports(name: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _declared(project, "examples")
    owners = importlib.metadata.packages_distributions()
    tree = ast.parse((ROOT / "examples" / name).read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    for mod in sorted(modules - set(sys.stdlib_module_names) - {"costobs_callbacks", "__future__"}):
        dists = {d.lower().replace("_", "-") for d in owners.get(mod, [])}
        assert dists & declared, f"{name} imports {mod} ({sorted(dists)}), which the examples extra does not install"
