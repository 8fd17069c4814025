"""The catalog: shared mutable state that several processes write at once.

SQLAlchemy over SQLite in WAL mode by default (the sensors, run workers and the HTTP server write
concurrently); any SQLAlchemy URL, Postgres in production. The schema is defined in ``schema``
as tables for queries and changed only through Alembic migrations (``vbs_resources/migrations``);
opening the catalog upgrades an older one first.

One store per entity, over the catalog's one engine: ``catalog.batches``, ``.files``,
``.events`` (the outbox), ``.inbox``, ``.models``, ``.conquests``, ``.label_studio``,
``.datasets``, ``.fine_tuning`` and ``.deployments``. Status changes of stateful entities go through their
lifecycles, never through the stores' callers.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import PrivateAttr

from vbs_resources import strict_json
from vbs_resources.catalog.batches import BatchStore, InboxStore, batch_object
from vbs_resources.catalog.curation import ConquestStore, LabelStudioStore
from vbs_resources.catalog.datasets import DatasetStore
from vbs_resources.catalog.files import FileStore, file_object
from vbs_resources.catalog.fine_tuning import DeploymentStore, FineTuningStore
from vbs_resources.catalog.models import ModelStore
from vbs_resources.catalog.outbox import EventStore
from vbs_resources.catalog.schema import (
    ANNOTATION_FIELDS,
    annotations,
    batches,
    conquests,
    events,
    metadata_obj,
)
from vbs_resources.catalog.store import UnknownCursor

__all__ = [
    "ANNOTATION_FIELDS",
    "Catalog",
    "UnknownCursor",
    "annotations",
    "events",
    "batch_object",
    "batches",
    "conquests",
    "file_object",
    "metadata_obj",
    "open_engine",
]


def _enable_sqlite_wal(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # The wait for a lock first: switching to WAL needs one while another process migrates.
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_engine(url: str) -> sa.Engine:
    """A SQLAlchemy engine for the catalog at ``url``, upgraded to the newest schema."""
    from vbs_resources.migrations import upgrade

    # Every JSON column is written through strict JSON: NaN, Infinity or a lone surrogate fails
    # the write (and its transaction) instead of being stored and failing every later read.
    engine = sa.create_engine(url, json_serializer=strict_json.dumps)
    if engine.dialect.name != "sqlite":
        # A server restarted under a long-lived process: a dead pooled connection is replaced
        # on checkout instead of failing the first statement after it.
        engine = sa.create_engine(url, json_serializer=strict_json.dumps, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        if engine.url.database not in (None, "", ":memory:"):
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
        sa.event.listen(engine, "connect", _enable_sqlite_wal)
    upgrade(engine)
    return engine


class Catalog(dg.ConfigurableResource):
    """Every entity's store over one database (``url``: a SQLAlchemy URL)."""

    url: str

    _engine: Any = PrivateAttr(default=None)

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = open_engine(self.url)
        return self._engine

    def read_connection(self) -> sa.Connection:
        """A connection to hold for reads from one thread (the API's event loop), passed as
        ``conn=`` to the stores' read methods: it saves the pool checkout and reset that cost
        more than a point read. Autocommit, so every read sees the latest committed state."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def change_counter(self, conn: sa.Connection) -> int | None:
        """A number that moves whenever another connection commits to the catalog, read on
        ``conn`` (SQLite's ``PRAGMA data_version``, straight from the driver: 7 us against 48 us
        through SQLAlchemy). None for databases without one: then nothing read may be cached."""
        if self.engine.dialect.name != "sqlite":
            return None
        return conn.connection.driver_connection.execute("PRAGMA data_version").fetchone()[0]

    @cached_property
    def batches(self) -> BatchStore:
        return BatchStore(self)

    @cached_property
    def files(self) -> FileStore:
        return FileStore(self)

    @cached_property
    def events(self) -> EventStore:
        return EventStore(self)

    @cached_property
    def inbox(self) -> InboxStore:
        return InboxStore(self)

    @cached_property
    def models(self) -> ModelStore:
        return ModelStore(self)

    @cached_property
    def conquests(self) -> ConquestStore:
        return ConquestStore(self)

    @cached_property
    def label_studio(self) -> LabelStudioStore:
        return LabelStudioStore(self)

    @cached_property
    def datasets(self) -> DatasetStore:
        return DatasetStore(self)

    @cached_property
    def fine_tuning(self) -> FineTuningStore:
        return FineTuningStore(self)

    @cached_property
    def deployments(self) -> DeploymentStore:
        return DeploymentStore(self)
