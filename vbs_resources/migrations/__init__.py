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


def transactional(engine: sa.Engine) -> sa.Engine:
    """An engine on the same database whose transactions cover DDL too. Python's sqlite3 opens
    no transaction before CREATE or ALTER, so each would commit on its own and a migration cut
    short would leave half a schema; here the driver's own transaction handling is off and every
    transaction begins explicitly (SQLAlchemy's recipe for pysqlite)."""
    if engine.dialect.name != "sqlite":
        return engine
    migrating = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)

    @sa.event.listens_for(migrating, "connect")
    def _connect(dbapi_conn: object, _record: object) -> None:
        dbapi_conn.isolation_level = None  # type: ignore[attr-defined]
        dbapi_conn.execute("PRAGMA busy_timeout=30000")  # type: ignore[attr-defined]

    @sa.event.listens_for(migrating, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return migrating


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Upgrade the catalog behind ``engine`` to ``revision`` (a no-op when it is there), in one
    transaction: it is applied whole or not at all."""
    target = head() if revision == "head" else revision
    with engine.connect() as conn:
        if current(conn) == target:
            return
    from alembic import command

    migrating = transactional(engine)
    try:
        with _exclusive(engine), migrating.begin() as conn:
            config = _config(conn)
            found = current(conn)
            if found == target:
                return
            if found is None and sa.inspect(conn).has_table("batches"):
                command.stamp(config, FIRST_REVISION)
            command.upgrade(config, revision)
    finally:
        if migrating is not engine:
            migrating.dispose()
