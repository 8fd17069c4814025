"""Catalog schema migrations (Alembic).

``upgrade(engine)`` brings a catalog to the newest revision and is called whenever a process
opens the catalog, so the platform upgrades an existing catalog on start. Revision ``0001`` is
the schema vbs had before migrations existed; a catalog from that time (tables, but no
``alembic_version``) is stamped ``0001`` and upgraded from there. Concurrent openers (the
sensor daemon, run workers, the API) are serialized by a lock: a file lock beside a SQLite
database, an advisory lock on Postgres.

A schema change is a new file under ``versions/``: ``alembic -c vbs_resources/migrations/alembic.ini
revision -m "what"`` (or copy the newest one), with ``down_revision`` set to the previous head.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
FIRST_REVISION = "0001"


def _config(connection: sa.Connection | None = None):  # noqa: ANN202 - alembic's Config
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


def current(connection: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


@contextlib.contextmanager
def _exclusive(engine: sa.Engine) -> Iterator[None]:
    """One migrating process at a time for this database."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with open(f"{engine.url.database}.migrate.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(7263510)"))
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(7263510)"))
                conn.commit()
    else:
        yield


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Upgrade the catalog behind ``engine`` to ``revision`` (a no-op when it is there)."""
    target = head() if revision == "head" else revision
    with engine.connect() as conn:
        if current(conn) == target:
            return
    from alembic import command

    with _exclusive(engine), engine.begin() as conn:
        config = _config(conn)
        found = current(conn)
        if found == target:
            return
        if found is None and sa.inspect(conn).has_table("batches"):
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, revision)
