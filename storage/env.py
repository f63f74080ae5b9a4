"""Alembic environment for costobs-callbacks.

The library runs these migrations itself on first use of a database (``CostTracker`` does it), passing
its open connection in ``config.attributes["connection"]``. To run them by hand::

    alembic -c storage/alembic.ini -x url=sqlite:///costobs.db upgrade head
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

config = context.config
VERSION_TABLE = config.get_main_option("version_table") or "costobs_alembic_version"


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, version_table=VERSION_TABLE, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("pass the database with -x url=...")
    engine = create_engine(url)
    with engine.begin() as conn:
        context.configure(connection=conn, version_table=VERSION_TABLE, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("costobs-callbacks migrations run online only")
run_migrations_online()
