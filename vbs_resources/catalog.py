"""The catalog: shared mutable state that several processes write at once.

SQLAlchemy over SQLite in WAL mode by default (the sensor, run workers and the HTTP server write
concurrently); any SQLAlchemy URL, Postgres in production. Batch rows follow the OpenAI Batch
object: status lifecycle, ``*_at`` timestamps, ``request_counts``, ``usage``, ``metadata``,
``errors``.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import PrivateAttr

BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
TERMINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})

# The timestamp column each status stamps when a batch enters it.
_STATUS_TIMESTAMP = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}

metadata_obj = sa.MetaData()

batches = sa.Table(
    "batches",
    metadata_obj,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("endpoint", sa.String(64)),
    sa.Column("source", sa.String(16), nullable=False),  # "inbox" or "api"
    sa.Column("original_filename", sa.String(255)),
    sa.Column("input_file_id", sa.String(80)),
    sa.Column("output_file_id", sa.String(80)),
    sa.Column("error_file_id", sa.String(80)),
    sa.Column("content_sha256", sa.String(64), index=True),
    sa.Column("completion_window", sa.String(8), nullable=False, default="24h"),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("expires_at", sa.Integer),
    sa.Column("in_progress_at", sa.Integer),
    sa.Column("finalizing_at", sa.Integer),
    sa.Column("completed_at", sa.Integer),
    sa.Column("failed_at", sa.Integer),
    sa.Column("expired_at", sa.Integer),
    sa.Column("cancelling_at", sa.Integer),
    sa.Column("cancelled_at", sa.Integer),
    sa.Column("request_total", sa.Integer, nullable=False, default=0),
    sa.Column("request_completed", sa.Integer, nullable=False, default=0),
    sa.Column("request_failed", sa.Integer, nullable=False, default=0),
    sa.Column("usage", sa.JSON),
    sa.Column("batch_metadata", sa.JSON),
    sa.Column("errors", sa.JSON),
    sa.Column("models", sa.JSON),
    sa.Column("updated_at", sa.Float, nullable=False),
)


files = sa.Table(
    "files",
    metadata_obj,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("path", sa.String(512), nullable=False),  # bucket-relative, built by vbs
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
)


# Point reads answer every API poll: built once, so each call only binds the id.
_BATCH_BY_ID = sa.select(batches).where(batches.c.id == sa.bindparam("id"))
_FILE_BY_ID = sa.select(files).where(files.c.id == sa.bindparam("id"), files.c.deleted.is_(False))


webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(80), nullable=False, index=True),
    sa.Column("batch_id", sa.String(80), index=True),
    sa.Column("event_type", sa.String(40), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error", sa.String(500)),
    sa.Column("at", sa.Float, nullable=False),
)


def _enable_sqlite_wal(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Catalog(dg.ConfigurableResource):
    """Batch records (and later files, conquests, models) in one SQL database."""

    url: str

    _engine: Any = PrivateAttr(default=None)

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            engine = sa.create_engine(self.url)
            if engine.dialect.name == "sqlite":
                if engine.url.database not in (None, "", ":memory:"):
                    Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
                sa.event.listen(engine, "connect", _enable_sqlite_wal)
            metadata_obj.create_all(engine)
            self._engine = engine
        return self._engine

    def create_batch(
        self,
        batch_id: str,
        *,
        source: str,
        content_sha256: str,
        original_filename: str | None = None,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        input_file_id: str | None = None,
    ) -> bool:
        """Insert a batch in ``validating``; False when the id exists already (a re-drop)."""
        now = int(time.time())
        window_s = 24 * 3600 if completion_window == "24h" else None
        row = dict(
            id=batch_id,
            status="validating",
            source=source,
            content_sha256=content_sha256,
            original_filename=original_filename,
            completion_window=completion_window,
            created_at=now,
            expires_at=now + window_s if window_s else None,
            batch_metadata=metadata or {},
            input_file_id=input_file_id,
            request_total=0,
            request_completed=0,
            request_failed=0,
            updated_at=time.time(),
        )
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(batches.c.id).where(batches.c.id == batch_id)).first()
            if exists:
                return False
            conn.execute(batches.insert().values(**row))
        return True

    def read_connection(self) -> sa.Connection:
        """A connection to hold for reads from one thread (the API's event loop), passed as
        ``conn=`` to the read methods: it saves the pool checkout and reset that cost more than
        a point read. Autocommit, so every read sees the latest committed state."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def change_counter(self, conn: sa.Connection) -> int | None:
        """A number that moves whenever another connection commits to the catalog, read on
        ``conn`` (SQLite's ``PRAGMA data_version``, straight from the driver: 7 us against 48 us
        through SQLAlchemy). None for databases without one: then nothing read may be cached."""
        if self.engine.dialect.name != "sqlite":
            return None
        return conn.connection.driver_connection.execute("PRAGMA data_version").fetchone()[0]

    def _reading(self, conn: sa.Connection | None) -> AbstractContextManager[sa.Connection]:
        return nullcontext(conn) if conn is not None else self.engine.connect()

    def get_batch(self, batch_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        with self._reading(conn) as conn:
            row = conn.execute(_BATCH_BY_ID, {"id": batch_id}).mappings().first()
        return dict(row) if row else None

    def list_batches(
        self, limit: int = 100, after: str | None = None, conn: sa.Connection | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        order = (batches.c.created_at.desc(), batches.c.id.desc())
        query = sa.select(batches).order_by(*order).limit(limit)
        with self._reading(conn) as conn:
            if after is not None:
                anchor = conn.execute(
                    sa.select(batches.c.created_at, batches.c.id).where(batches.c.id == after)
                ).first()
                if anchor is None:
                    return []
                query = query.where(
                    sa.or_(
                        batches.c.created_at < anchor.created_at,
                        sa.and_(
                            batches.c.created_at == anchor.created_at, batches.c.id < anchor.id
                        ),
                    )
                )
            return [dict(r) for r in conn.execute(query).mappings()]

    def totals(self) -> dict[str, int]:
        """Requests and tokens processed over all batches (for /metrics)."""
        query = sa.select(
            sa.func.coalesce(sa.func.sum(batches.c.request_completed), 0),
            sa.func.coalesce(sa.func.sum(batches.c.request_failed), 0),
        )
        with self.engine.connect() as conn:
            completed, failed = conn.execute(query).one()
            usages = conn.execute(sa.select(batches.c.usage)).scalars()
            tokens = {"input_tokens": 0, "output_tokens": 0}
            for usage in usages:
                for key in tokens:
                    tokens[key] += (usage or {}).get(key, 0)
        return {"requests_completed": completed, "requests_failed": failed, **tokens}

    def count_batches_by_status(self) -> dict[str, int]:
        query = sa.select(batches.c.status, sa.func.count()).group_by(batches.c.status)
        with self.engine.connect() as conn:
            return {status: n for status, n in conn.execute(query)}

    # ---- files ---------------------------------------------------------------------------

    def create_file(
        self, file_id: str, *, filename: str, purpose: str, size: int, path: str
    ) -> dict[str, Any]:
        row = dict(
            id=file_id,
            filename=filename,
            purpose=purpose,
            bytes=size,
            path=path,
            created_at=int(time.time()),
            deleted=False,
        )
        with self.engine.begin() as conn:
            # Re-materializing a batch re-registers its result files under the same ids.
            conn.execute(files.delete().where(files.c.id == file_id))
            conn.execute(files.insert().values(**row))
        return row

    def get_file(self, file_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        with self._reading(conn) as conn:
            row = conn.execute(_FILE_BY_ID, {"id": file_id}).mappings().first()
        return dict(row) if row else None

    def list_files(
        self, purpose: str | None = None, limit: int = 10_000, conn: sa.Connection | None = None
    ) -> list[dict[str, Any]]:
        query = sa.select(files).where(files.c.deleted.is_(False))
        if purpose:
            query = query.where(files.c.purpose == purpose)
        query = query.order_by(files.c.created_at.desc(), files.c.id.desc()).limit(limit)
        with self._reading(conn) as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def delete_file(self, file_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(files.update().where(files.c.id == file_id).values(deleted=True))

    # ---- webhook deliveries --------------------------------------------------------------

    def log_webhook_delivery(self, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(webhook_deliveries.insert().values(at=time.time(), **fields))

    def webhook_deliveries(self, batch_id: str) -> list[dict[str, Any]]:
        query = (
            sa.select(webhook_deliveries)
            .where(webhook_deliveries.c.batch_id == batch_id)
            .order_by(webhook_deliveries.c.id)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    @staticmethod
    def to_openai_file(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": row["id"],
            "object": "file",
            "bytes": row["bytes"],
            "created_at": row["created_at"],
            "filename": row["filename"],
            "purpose": row["purpose"],
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }

    def update_batch(self, batch_id: str, status: str | None = None, **fields: Any) -> None:
        """Update fields; entering a status stamps its ``*_at`` column once."""
        values = dict(fields, updated_at=time.time())
        if status is not None:
            if status not in BATCH_STATUSES:
                raise ValueError(f"unknown batch status {status!r}")
            values["status"] = status
        with self.engine.begin() as conn:
            if status in ("in_progress", "finalizing"):
                # A cancel requested meanwhile wins: the run sees it at its next chunk boundary.
                current = conn.execute(
                    sa.select(batches.c.status).where(batches.c.id == batch_id)
                ).scalar()
                if current == "cancelling":
                    values.pop("status")
                    status = None
            if status in _STATUS_TIMESTAMP:
                column = batches.c[_STATUS_TIMESTAMP[status]]
                conn.execute(
                    batches.update()
                    .where(batches.c.id == batch_id, column.is_(None))
                    .values({column: int(time.time())})
                )
            conn.execute(batches.update().where(batches.c.id == batch_id).values(**values))

    @staticmethod
    def to_openai_batch(row: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI Batch object of a catalog row."""
        errors = row.get("errors")
        return {
            "id": row["id"],
            "object": "batch",
            "endpoint": row["endpoint"],
            "errors": {"object": "list", "data": errors} if errors else None,
            "input_file_id": row["input_file_id"],
            "completion_window": row["completion_window"],
            "status": row["status"],
            "output_file_id": row["output_file_id"],
            "error_file_id": row["error_file_id"],
            "created_at": row["created_at"],
            "in_progress_at": row["in_progress_at"],
            "expires_at": row["expires_at"],
            "finalizing_at": row["finalizing_at"],
            "completed_at": row["completed_at"],
            "failed_at": row["failed_at"],
            "expired_at": row["expired_at"],
            "cancelling_at": row["cancelling_at"],
            "cancelled_at": row["cancelled_at"],
            "request_counts": {
                "total": row["request_total"],
                "completed": row["request_completed"],
                "failed": row["request_failed"],
            },
            "usage": row["usage"],
            "metadata": row["batch_metadata"] or None,
        }
