"""The package root is the whole public API: pin it."""

import costobs_callbacks


def test_public_api_is_pinned() -> None:
    assert sorted(costobs_callbacks.__all__) == sorted([
        "COST_EVENT",
        "UNATTRIBUTED",
        "Budget",
        "BudgetExceededError",
        "BudgetWarning",
        "CapPolicy",
        "ConfigurationError",
        "CostGuardMiddleware",
        "CostTracker",
        "LoopDetectedError",
        "LoopPolicy",
        "MissingAttributionError",
        "PriceBook",
        "RollupRow",
        "RunAborted",
        "RunCost",
        "RunScope",
        "UnitPrices",
        "__version__",
    ])
    for name in costobs_callbacks.__all__:
        assert hasattr(costobs_callbacks, name), name


def test_exception_tree() -> None:
    from costobs_callbacks import (
        BudgetExceededError,
        ConfigurationError,
        LoopDetectedError,
        MissingAttributionError,
        RunAborted,
    )

    for cls in (BudgetExceededError, LoopDetectedError, MissingAttributionError):
        assert issubclass(cls, RunAborted)
    # RuntimeError: LangGraph's RetryPolicy never retries it into another paid call
    assert issubclass(RunAborted, RuntimeError)
    assert issubclass(ConfigurationError, ValueError)


def test_importing_does_not_import_optional_frameworks() -> None:
    import subprocess
    import sys

    code = (
        "import sys, costobs_callbacks; "
        "bad = [m for m in ('llama_index', 'langgraph', 'langchain_openai') if m in sys.modules]; "
        "print(bad); raise SystemExit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_only_one_top_level_package_in_the_wheel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(root)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 and "hatchling" in (proc.stderr + proc.stdout):
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
            capture_output=True, text=True,
        )
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("costobs_callbacks-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"costobs_callbacks"}
    # the migrations ship inside the package
    assert "costobs_callbacks/_storage/env.py" in names
    assert "costobs_callbacks/_storage/versions/0001_initial.py" in names
