"""``Store``: one database. Its engine (per-dialect options: SQLite's pragmas, the JSON text), its schema
(``migrate``), its write path (``writes``) and its queries (``queries``), and the user-id salt kept in it.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from sqlalchemy.engine import Engine

from .._exceptions import ConfigurationError
from .migrate import Migrations
from .queries import Queries
from .schema import _json_text, meta_kv
from .writes import Writes

__all__ = ["Store"]


class Store(Migrations, Writes, Queries):
    """One database. Thread-safe (SQLAlchemy's pool); writes come from the exporter's thread."""

    def __init__(self, url: str, *, engine_kwargs: Mapping[str, Any] | None = None) -> None:
        self.url = url
        try:
            u = sa.engine.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigurationError(f"invalid database_url {url!r}: {exc}") from None
        kwargs: dict[str, Any] = {"future": True}
        if u.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        if u.get_backend_name() in ("sqlite", "postgresql", "mysql", "mariadb"):
            # JSON with its characters as they are: text the driver cannot encode is refused as in any other
            # column (and sanitised alike, see write_batch), not hidden in a \u escape PostgreSQL refuses
            kwargs["json_serializer"] = _json_text
        if engine_kwargs:
            kwargs.update(engine_kwargs)
        try:
            self.engine: Engine = sa.create_engine(u, **kwargs)
        except (ImportError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise ConfigurationError(f"cannot use database_url {url!r}: {exc}") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._prepare_writes()

    def get_or_create_salt(self) -> bytes:
        """The user-id salt kept in the database, so every process hashes ids alike: read, or made once. Processes
        opening a new database together each offer a salt; the first one stored is the one every process reads
        (``ON CONFLICT DO NOTHING``: no error, so no transaction left aborted to be committed)."""
        self.ensure_schema()
        read = sa.select(meta_kv.c.value).where(meta_kv.c.key == "user_salt")
        with self.engine.connect() as conn:
            found = conn.execute(read).scalar()
        if found is None:
            offer = {"key": "user_salt", "value": secrets.token_hex(32)}
            with self.engine.begin() as conn:
                if self.dialect in ("postgresql", "sqlite"):
                    dialect_insert: Any = _INSERTS[self.dialect]
                    conn.execute(dialect_insert(meta_kv).values(offer).on_conflict_do_nothing())
                else:
                    try:
                        with conn.begin_nested():  # a savepoint: a conflict rolls back the insert alone
                            conn.execute(sa.insert(meta_kv).values(offer))
                    except sa.exc.IntegrityError:
                        pass
                # (a statement of its own: under READ COMMITTED it sees the salt of a writer that came first)
                found = conn.execute(read).scalar_one()
        return bytes.fromhex(found)

    def close(self) -> None:
        self.engine.dispose()


_INSERTS = {"postgresql": sa.dialects.postgresql.insert, "sqlite": sa.dialects.sqlite.insert}


_SQLITE_CACHE_KIB = 16 * 1024
SQLITE_PAGE_SIZE = 16 * 1024


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        # 16 KiB pages for a new file (SQLite's default: 4 KiB), set before WAL mode, which fixes the page size:
        # a batch's rows fill a quarter as many pages, each a system call to write to the WAL and another to copy
        # at a checkpoint (on 100,000 one-call runs, 0.43 page writes and reads a span against 1.16, and 10% less
        # CPU on the exporter's thread; no more instructions in user space). A file made with other pages keeps
        # them: the pragma does nothing to an existing database in WAL mode.
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        # Up to 16 MiB of pages per connection (SQLite's default: 2 MiB). A batch's transaction dirties pages of
        # the tables and of each index; with the default, a full batch spills them to the WAL before it commits and
        # reads them back (with this, a quarter to a third fewer page writes and reads on 100,000 spans).
        cur.execute(f"PRAGMA cache_size={-_SQLITE_CACHE_KIB}")
    except Exception:  # a read-only or in-memory database
        pass
    finally:
        cur.close()
