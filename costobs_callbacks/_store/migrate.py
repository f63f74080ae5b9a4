"""Bringing a database to ``HEAD_REVISION``: the Alembic scripts (``migrations_dir``), run once per process and
database, under a lock that makes processes migrating at the same moment run one after the other (an advisory
lock on PostgreSQL, SQLite's write lock); and the rollups revision 0003 fills from the spans already stored.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .queries import _raw_rollup_query, _summed
from .rows import _rollup_tuple
from .schema import _RKEY_COLS, _ROLLUP_COLS, _RSUMS, HEAD_REVISION, rollups

__all__ = ["Migrations", "migrations_dir"]

logger = logging.getLogger("costobs_callbacks")


def migrations_dir() -> Path:
    """The Alembic scripts: inside the wheel at ``costobs_callbacks/_storage``, in a checkout at ``storage/``."""
    here = Path(__file__).resolve().parent.parent  # the package: costobs_callbacks/
    for cand in (here / "_storage", here.parent / "storage"):
        if (cand / "env.py").exists():
            return cand
    raise RuntimeError("costobs-callbacks: the storage migrations are missing from this installation")


class Migrations:
    """``Store``'s schema (a mixin: the engine and the dialect are the store's)."""

    engine: Engine
    dialect: str
    _schema_ready: bool
    _schema_lock: threading.Lock

    def ensure_schema(self) -> None:
        """Bring the database to the newest migration (Alembic), once per process."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if self._current_revision() != HEAD_REVISION:
                self._upgrade()
            self._schema_ready = True

    def _current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("costobs_alembic_version"):
                return None
            row = conn.execute(sa.text("SELECT version_num FROM costobs_alembic_version")).first()
            return row[0] if row else None

    def _upgrade(self) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir()))
        cfg.set_main_option("version_table", "costobs_alembic_version")
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    if self.dialect == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
                    elif self.dialect == "sqlite":
                        _sqlite_write_lock(conn)
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                return
            except Exception:
                # another process may have migrated at the same moment
                if self._current_revision() == HEAD_REVISION:
                    return
                if attempt == 2:
                    raise

    # -- for `costobs db` -------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        """The schema revision the database is at (None: no costobs tables); reads only."""
        return self._current_revision()


def _sqlite_write_lock(conn: sa.Connection) -> None:
    """Take SQLite's write lock for the whole migration, so that processes migrating a fresh file at the same
    moment run one after the other (the others then find it migrated). Python's sqlite3 driver opens no
    transaction before DDL, so without this each ``CREATE TABLE`` commits on its own and a second process could
    see half a schema. A driver already in a transaction keeps it (and the retries in ``_upgrade``)."""
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except sa.exc.OperationalError as exc:
        if "within a transaction" not in str(exc):
            raise
        logger.debug("costobs: SQLite migration runs in the driver's own transaction: %r", exc)


def _backfill_rollups(conn: Connection) -> int:
    """Fill the rollup table from the spans stored (migration 0003); returns how many groups it wrote."""
    by = [("user" if c == "user_hash" else c) for c in _RKEY_COLS]
    rows = []
    found: list[Any] = list(conn.execute(_raw_rollup_query(by, None, None, "hour", None, True, every_span=True))
                            .mappings())
    for r in found:
        key = (int(r["bucket"]), *(r[f"k_{k}"] for k in by))
        g = [*(_summed(r, n) for n in _RSUMS), *(int(r[n]) for n in ("llm", "tool", "runs", "lat_n", "unpriced", "est",
                                                                    "hits", "lat_us")), r["lat_max"]]
        rows.append(dict(zip(_ROLLUP_COLS, _rollup_tuple(key, g), strict=True)))
    for i in range(0, len(rows), 500):
        conn.execute(sa.insert(rollups), rows[i:i + 500])
    return len(rows)
