"""A bad database URL fails at once with a ``ConfigurationError`` naming ``database_url`` (one line, no password),
unless a ``user_salt`` is given: then tracking starts and batches are spooled until the database answers (the
documented behaviour). ``close()`` waits, without a deadline, until everything recorded is in the database or the
spool, and it ends: also when the database hangs."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from costobs_callbacks import ConfigurationError, CostTracker
from tests.test_spool import Proxy, count_spans

PRICES = {"m-url": {"input": "2", "output": "8"}}
CALL_NANOS = 10 * 2_000 + 2 * 8_000
UNREACHABLE = "postgresql+psycopg://nobody@127.0.0.1:1/x"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COSTOBS_DATABASE_URL", raising=False)
    monkeypatch.delenv("COSTOBS_USER_SALT", raising=False)


def _record(tracker: CostTracker, n: int) -> None:
    for _ in range(n):
        tracker.record_usage(model="m-url", input_tokens=10, output_tokens=2, feature="urls")


@pytest.mark.parametrize("url", ["nonsense://", "nonsense://host/db", "postgresql+nosuchdriver://h/db", "::"])
@pytest.mark.parametrize("salt", [None, "s"])
def test_a_url_no_driver_takes_is_refused_at_once(url: str, salt: str | None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError) as err:
        CostTracker(url, user_salt=salt, spool_dir=tmp_path / "spool")
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    assert "database_url" in text and repr(url) in text and "\n" not in text
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("url", [UNREACHABLE, "postgresql+psycopg://nobody:s3cret@127.0.0.1:1/x"])
def test_an_unreachable_database_without_a_salt_is_refused_at_once(url: str, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError) as err:
        CostTracker(url, spool_dir=tmp_path / "spool")
    assert time.monotonic() - t0 < 15  # a refused connection: no wait for db_timeout
    text = str(err.value)
    shown = url.replace(":s3cret@", ":***@")
    assert text.startswith(f"database_url {shown!r} cannot be opened (connection failed: ")
    assert "Connection refused); it keeps the salt that anonymises user ids: fix the URL, or pass user_salt=" in text
    assert "\n" not in text and "s3cret" not in text


def test_an_unreachable_database_with_a_salt_spools_and_close_ends(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="costobs_callbacks"):
        t0 = time.monotonic()
        tracker = CostTracker(UNREACHABLE, user_salt="s", prices=PRICES, spool_dir=tmp_path / "spool")
        assert time.monotonic() - t0 < 15
    assert any("database unavailable at start" in r.getMessage() for r in caplog.records)
    _record(tracker, 25)
    t0 = time.monotonic()
    tracker.close()  # timeout=None: everything spooled, then it returns
    assert time.monotonic() - t0 < 30
    st = tracker.stats
    assert (st["emitted"], st["spooled"], st["in_spool"], st["exported"], st["failed"], st["dropped"]) == (
        25, 25, 25, 0, 0, 0)


def test_close_waits_for_everything_by_default() -> None:
    assert inspect.signature(CostTracker.close).parameters["timeout"].default is None
    assert inspect.signature(CostTracker.flush).parameters["timeout"].default is None


def test_close_without_a_timeout_ends_when_the_database_hangs(postgres_database: Callable[[], str],
                                                              tmp_path: Path) -> None:
    """The database accepts connections and never answers: ``close()`` returns once every span is in the
    database or the spool (each write gives up after ``db_timeout``), and the next tracker replays the spool."""
    direct = postgres_database()
    proxy = Proxy(int(sa.engine.make_url(direct).port or 5432))
    via = sa.engine.make_url(direct).set(port=proxy.port).render_as_string(hide_password=False)
    try:
        tracker = CostTracker(via, user_salt="s", prices=PRICES, spool_dir=tmp_path / "spool", db_timeout=1.0,
                              export_delay=0.05)
        _record(tracker, 10)
        assert tracker.flush(30)
        proxy.hang()
        _record(tracker, 30)
        t0 = time.monotonic()
        tracker.close()
        waited = time.monotonic() - t0
        st = tracker.stats
        assert waited < 30, waited
        assert (st["exported"] + st["in_spool"], st["failed"], st["dropped"]) == (40, 0, 0)
        assert st["in_spool"] > 0
        proxy.restore()
        again = CostTracker(via, user_salt="s", prices=PRICES, spool_dir=tmp_path / "spool", db_timeout=5.0)
        assert again.flush(60)
        again.close()
        assert count_spans(direct) == (40, 40, 40 * CALL_NANOS)
    finally:
        proxy.close()
