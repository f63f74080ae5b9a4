import os

import pytest

os.environ.setdefault("OPENAI_API_KEY", "sk-test")

try:  # tests/ as a package
    from .stub_openai import StubOpenAI
except ImportError:  # rootdir-relative (default "prepend" import mode)
    from stub_openai import StubOpenAI


@pytest.fixture(scope="session")
def stub_server():
    """One StubOpenAI server for the whole test session."""
    server = StubOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def stub_openai(stub_server):
    """The session stub server, with queue/responder/requests cleared."""
    stub_server.reset()
    return stub_server


@pytest.fixture
def cost_tracker_factory(tmp_path):
    """Build ``CostTracker``s on a SQLite file in ``tmp_path`` (user_salt "test-salt"); all closed at teardown."""
    from costobs_callbacks import CostTracker

    made = []

    def make(name: str = "costs.db", **kwargs):
        kwargs.setdefault("user_salt", "test-salt")
        kwargs.setdefault("spool_dir", tmp_path / f"spool-{name}")  # a database's spool beside it, not in ~/.cache
        tracker = CostTracker(f"sqlite:///{tmp_path / name}", **kwargs)
        made.append(tracker)
        return tracker

    yield make
    for tracker in made:
        tracker.close()


# -- storage backends: SQLite always; PostgreSQL when the server binaries are on the machine ------------

@pytest.fixture(scope="session")
def postgres_admin_url():  # type: ignore[no-untyped-def]
    import shutil
    import tempfile
    from pathlib import Path

    from tests.pg import postgres_cluster

    # not under pytest's tmp dirs: those are private to root, and the server runs as "postgres"
    base = Path(tempfile.mkdtemp(prefix="costobs-pg-"))
    try:
        cm = postgres_cluster(base)
        url = cm.__enter__()
    except Exception as exc:  # not installed here: the PostgreSQL half is skipped, with the reason
        if os.environ.get("COSTOBS_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    yield url
    cm.__exit__(None, None, None)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/costs.db"
    from tests.pg import create_database

    return create_database(request.getfixturevalue("postgres_admin_url"))
