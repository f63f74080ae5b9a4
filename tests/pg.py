"""The machine's PostgreSQL server for the storage tests: a fresh database for each test, dropped after it.

The server is ``$COSTOBS_TEST_POSTGRES_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``, the
PostgreSQL 15 that the developers' and CI's machines run, trust authentication); its database is only the one the
test databases are created from. A test's database is named ``costobs_t_`` and a random suffix, so that suites
running at the same time on one server never meet, and a database left behind is easy to find.

A test database commits as production databases do (``synchronous_commit`` left on): a cut that falls after the
server committed a batch and before the client heard so is a case the outage tests must survive (each batch is
applied once, see ``costobs_callbacks/_store/applied.py``), and ``tests/test_exactly_once.py`` makes that case
happen on purpose.
"""

from __future__ import annotations

import os
import uuid

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PREFIX = "costobs_t_"


def server_url() -> str:
    return os.environ.get("COSTOBS_TEST_POSTGRES_URL") or DEFAULT_URL


def _admin(url: str) -> sa.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                            connect_args={"connect_timeout": 5})


def unavailable(url: str) -> str | None:
    """Why the server at ``url`` cannot serve the tests (it does not answer, or is older than 13, which
    ``DROP DATABASE ... WITH (FORCE)`` needs); ``None`` if it can."""
    try:
        eng = _admin(url)
        try:
            with eng.connect() as conn:
                version = int(conn.exec_driver_sql("SHOW server_version_num").scalar_one())
        finally:
            eng.dispose()
    except Exception as exc:
        return f"{sa.engine.make_url(url).render_as_string(hide_password=True)} does not answer: " \
               f"{str(exc).splitlines()[0]}"
    if version < 130000:
        return f"PostgreSQL {version} is older than 13"
    return None


def create_database(admin_url: str) -> str:
    """A new, empty database on the server of ``admin_url``; returns its URL."""
    name = f"{PREFIX}{uuid.uuid4().hex[:16]}"
    eng = _admin(admin_url)
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        eng.dispose()
    return sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    """Drop a database made by ``create_database``, ending the connections still open to it."""
    name = sa.engine.make_url(url).database
    assert name is not None and name.startswith(PREFIX), name
    eng = _admin(admin_url)
    try:
        with eng.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        eng.dispose()

