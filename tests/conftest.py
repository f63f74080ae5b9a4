import os
from collections.abc import Callable, Iterator
from pathlib import Path

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


# -- storage backends: SQLite always; PostgreSQL on the machine's server (tests/pg.py) --------------------

@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The machine's PostgreSQL server (``$COSTOBS_TEST_POSTGRES_URL``, see ``tests/pg.py``). Where it does not
    answer, the PostgreSQL tests are skipped with the reason; with ``COSTOBS_REQUIRE_POSTGRES=1`` (CI) they fail."""
    from tests.pg import server_url, unavailable

    url = server_url()
    reason = unavailable(url)
    if reason is not None:
        if os.environ.get("COSTOBS_REQUIRE_POSTGRES", "") not in ("", "0"):
            pytest.fail(f"PostgreSQL is required here (COSTOBS_REQUIRE_POSTGRES=1): {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {reason}")
    return url


@pytest.fixture
def postgres_database(postgres_admin_url: str) -> Iterator[Callable[[], str]]:
    """Makes fresh, empty databases on the server (each call: a new one, its URL); every one is dropped when the
    test ends, with the connections still open to it."""
    from tests.pg import create_database, drop_database

    made: list[str] = []

    def make() -> str:
        url = create_database(postgres_admin_url)
        made.append(url)
        return url

    yield make
    for url in made:
        drop_database(postgres_admin_url, url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/costs.db"
    make: Callable[[], str] = request.getfixturevalue("postgres_database")
    return make()
