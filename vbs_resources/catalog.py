"""The catalog: shared mutable state that several processes write at once.

SQLAlchemy over SQLite in WAL mode by default (the sensors, run workers and the HTTP server write
concurrently); any SQLAlchemy URL, Postgres in production. The schema is defined here as tables
for queries and changed only through Alembic migrations (``vbs_resources/migrations``); opening
the catalog upgrades an older one first.

Batch rows follow the OpenAI Batch object. Their ``status`` changes only through
``transition``, one conditional update that ``vbs_resources.lifecycle`` drives; every other
write to a batch row is refused once the batch is in a terminal status.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import dagster as dg
import sqlalchemy as sa
from pydantic import PrivateAttr

from vbs_resources.wire import (
    BATCH_STATUSES,
    TERMINAL_STATUSES,
    BatchErrors,
    BatchObject,
    FileObject,
    RequestCounts,
)

# The timestamp column each status stamps when a batch enters it.
STATUS_TIMESTAMP = {
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
    # Revision 2: the input file's sha256 when it was taken (checked again at validation),
    # the run that holds the batch, and the options it runs with.
    sa.Column("input_sha256", sa.String(64)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("options", sa.JSON),
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
    sa.Column("sha256", sa.String(64)),
    sa.Index("ix_files_created_at_id", "created_at", "id"),
)

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

# The outbox: one row per event, written in the transaction that changed the status, so an event
# exists exactly once whatever crashes; delivery is claimed, retried and recorded here.
batch_events = sa.Table(
    "batch_events",
    metadata_obj,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("batch_id", sa.String(80), nullable=False, index=True),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("claimed_until", sa.Float),
    sa.Column("delivered_at", sa.Float),
    sa.Column("gave_up_at", sa.Float),
    sa.UniqueConstraint("batch_id", "type", name="uq_batch_events_batch_type"),
)

# What the inbox sensor could not take, and why: shown in its ticks and by GET /v1/inbox.
inbox_problems = sa.Table(
    "inbox_problems",
    metadata_obj,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("message", sa.String(1000), nullable=False),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)

# The model registry: what the engine serves, by the name requests use. Rows are never deleted:
# a retired model keeps its row (and its files), so lineage always resolves.
models = sa.Table(
    "models",
    metadata_obj,
    sa.Column("name", sa.String(256), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # base, adapter, embedding
    sa.Column("base", sa.String(256)),  # an adapter's base model (its served name)
    sa.Column("path", sa.String(1024), nullable=False),  # local folder or bucket URL
    sa.Column("status", sa.String(16), nullable=False, index=True),  # available, retired
    sa.Column("lora_id", sa.Integer, unique=True),  # vLLM's LoRARequest id, stable per adapter
    sa.Column("rank", sa.Integer),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("retired_at", sa.Integer),
    sa.Column("lineage", sa.JSON),  # dataset version, training run, eval metrics (training)
    sa.Column("options", sa.JSON),
)

# Conquests: one per result line of a batch whose metadata names a conquest type. The id is
# derived from (batch, custom_id), so making them again finds the same rows.
conquests = sa.Table(
    "conquests",
    metadata_obj,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("type_version", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # PENDING, IN_PROGRESS, COMPLETED, FAILED
    sa.Column("result", sa.String(16)),  # VICTORY, DEFEAT, or none yet
    sa.Column("input_data", sa.JSON, nullable=False),
    sa.Column("prompt", sa.JSON, nullable=False),  # the messages (or prompt) the model was sent
    sa.Column("prediction", sa.Text),  # the model's answer; none for a failed request
    sa.Column("error", sa.JSON),  # a failed request's error (code, message)
    sa.Column("model", sa.String(256)),
    sa.Column("batch_id", sa.String(80), nullable=False),
    sa.Column("custom_id", sa.String(512), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("batch_id", "custom_id", name="uq_conquests_batch_custom_id"),
    sa.Index("ix_conquests_type_created_at_id", "type", "created_at", "id"),
)

# Label Studio: the project of each conquest type (in the Label Studio at ``url``) with the
# type version and config it was last given, and the task of each conquest sent there. A task
# row is written before its import (task_id empty) and completed after, so an import cut short
# is found again in Label Studio instead of imported twice.
label_studio_projects = sa.Table(
    "label_studio_projects",
    metadata_obj,
    sa.Column("type", sa.String(64), primary_key=True),
    sa.Column("url", sa.String(512), primary_key=True),
    sa.Column("project_id", sa.Integer, nullable=False),
    sa.Column("type_version", sa.String(64), nullable=False),
    sa.Column("config_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

label_studio_tasks = sa.Table(
    "label_studio_tasks",
    metadata_obj,
    sa.Column("conquest_id", sa.String(80), primary_key=True),
    sa.Column("url", sa.String(512), primary_key=True),
    sa.Column("project_id", sa.Integer, nullable=False),
    sa.Column("task_id", sa.Integer),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Index("ix_label_studio_tasks_project_task", "project_id", "task_id"),
)

# What curators said of each conquest: the newest edit (from Label Studio or the conquest API)
# in ``annotations``, every edit it replaced in ``annotation_history``.
_ANNOTATION_COLUMNS = (
    ("is_gold_star", sa.Boolean),
    ("rating", sa.Integer),
    ("feedback", sa.Text),
    ("improvement_notes", sa.Text),
    ("answers", sa.JSON),
    ("source", sa.String(16)),  # label_studio, api
    ("source_ref", sa.String(64)),  # Label Studio's annotation id
    ("edited_at", sa.Float),  # when the edit was made (Label Studio's updated_at, or the call)
)
ANNOTATION_FIELDS = tuple(name for name, _ in _ANNOTATION_COLUMNS)

annotations = sa.Table(
    "annotations",
    metadata_obj,
    sa.Column("conquest_id", sa.String(80), primary_key=True),
    *(sa.Column(name, kind) for name, kind in _ANNOTATION_COLUMNS),
    sa.Column("recorded_at", sa.Float, nullable=False),
)

annotation_history = sa.Table(
    "annotation_history",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("conquest_id", sa.String(80), nullable=False, index=True),
    *(sa.Column(name, kind) for name, kind in _ANNOTATION_COLUMNS),
    sa.Column("replaced_at", sa.Float, nullable=False),
)

# Curated datasets: one row per version (the content hash of its files) with the conquests it
# was made of. Building the same content again finds the same row and moves ``built_at``.
datasets = sa.Table(
    "datasets",
    metadata_obj,
    sa.Column("version", sa.String(100), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("type_version", sa.String(64), nullable=False),
    sa.Column("path", sa.String(512), nullable=False),  # its folder in the bucket
    sa.Column("train_count", sa.Integer, nullable=False),
    sa.Column("eval_count", sa.Integer, nullable=False),
    sa.Column("icl_count", sa.Integer, nullable=False),
    sa.Column("conquest_ids", sa.JSON, nullable=False),  # {"train": [...], "eval": [...]}
    sa.Column("options", sa.JSON, nullable=False),  # min_rating, eval_fraction
    sa.Column("run_id", sa.String(64)),  # the Dagster run of its latest build
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("built_at", sa.Float, nullable=False),
    sa.Index("ix_datasets_type_built_at", "type", "built_at"),
)

# Fine-tuning jobs, in OpenAI's job shape: one per training, whoever started it (the API, the
# Dagster UI, the retraining schedule). The adapter is ``adapters/<id>/`` in the bucket.
fine_tuning_jobs = sa.Table(
    "fine_tuning_jobs",
    metadata_obj,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("model", sa.String(256), nullable=False),  # the base model's served name
    sa.Column("training_file", sa.String(256), nullable=False),  # as given: version or file id
    sa.Column("validation_file", sa.String(256)),
    sa.Column("dataset_version", sa.String(100), nullable=False),
    sa.Column("backend", sa.String(32), nullable=False),
    sa.Column("hyperparameters", sa.JSON, nullable=False),
    sa.Column("suffix", sa.String(64)),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("run_id", sa.String(64)),  # the Dagster run that trains (or trained) it
    sa.Column("adapter_path", sa.String(1024)),
    sa.Column("fine_tuned_model", sa.String(256)),
    sa.Column("result", sa.JSON),  # losses, steps, duration, adapter size
    sa.Column("evaluation", sa.JSON),  # adapter_eval's metrics and its beats_base verdict
    sa.Column("error", sa.JSON),  # {"code", "message", "param"}
    sa.Column("job_metadata", sa.JSON),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Integer),
    sa.Column("finished_at", sa.Integer),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_fine_tuning_jobs_created_at", "created_at"),
    sa.Index("ix_fine_tuning_jobs_dataset_version", "dataset_version"),
)

fine_tuning_events = sa.Table(
    "fine_tuning_events",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(80), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),  # message, metrics
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", sa.JSON),
    sa.Index("ix_fine_tuning_events_job_id", "job_id", "id"),
)

JOB_TERMINAL = ("succeeded", "failed", "cancelled")

# Point reads answer every API poll: built once, so each call only binds the id.
_BATCH_BY_ID = sa.select(batches).where(batches.c.id == sa.bindparam("id"))
_FILE_BY_ID = sa.select(files).where(files.c.id == sa.bindparam("id"), files.c.deleted.is_(False))
_NOT_TERMINAL = batches.c.status.not_in(sorted(TERMINAL_STATUSES))


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

    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        if engine.url.database not in (None, "", ":memory:"):
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
        sa.event.listen(engine, "connect", _enable_sqlite_wal)
    upgrade(engine)
    return engine


class Catalog(dg.ConfigurableResource):
    """Batches, files, events and inbox problems (later conquests, models) in one database."""

    url: str

    _engine: Any = PrivateAttr(default=None)

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            self._engine = open_engine(self.url)
        return self._engine

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

    def _all(self, query: sa.Select, conn: sa.Connection | None = None) -> list[dict[str, Any]]:
        with self._reading(conn) as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    # ---- batches ----------------------------------------------------------------------------

    def insert_batch(self, row: dict[str, Any]) -> bool:
        """Insert a batch row; False when the id exists already (a re-drop, a repeated tick, or
        another process inserting the same id at the same moment)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(batches.insert().values(**row, updated_at=time.time()))
        except sa.exc.IntegrityError:
            return False
        return True

    def delete_new_batch(self, batch_id: str) -> None:
        """Undo ``insert_batch`` for a batch whose input could not be put in place: only while it
        is ``validating`` and no run has taken it."""
        with self.engine.begin() as conn:
            conn.execute(
                batches.delete().where(
                    batches.c.id == batch_id,
                    batches.c.status == "validating",
                    batches.c.run_id.is_(None),
                )
            )

    def latest_batch_named(self, filename: str) -> dict[str, Any] | None:
        query = (
            sa.select(batches)
            .where(batches.c.original_filename == filename)
            .order_by(batches.c.created_at.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return dict(row) if row else None

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

    def unfinished_batches(self) -> list[dict[str, Any]]:
        """Batches not yet in a terminal status, oldest first."""
        return self._all(sa.select(batches).where(_NOT_TERMINAL).order_by(batches.c.created_at))

    def transition(
        self,
        batch_id: str,
        to: str,
        allowed_from: Iterable[str],
        event: tuple[str, str] | None = None,
        **fields: Any,
    ) -> bool:
        """Move a batch to ``to`` if its status is one of ``allowed_from``, in one conditional
        update that also stamps the status's ``*_at`` column and writes ``fields``; with
        ``event`` (id, type) the event is recorded in the same transaction. Only
        ``vbs_resources.lifecycle`` calls this. True when this call made the change."""
        if to not in BATCH_STATUSES:
            raise ValueError(f"unknown batch status {to!r}")
        values: dict[str, Any] = dict(fields, status=to, updated_at=time.time())
        now = int(time.time())
        if to in STATUS_TIMESTAMP:
            column = batches.c[STATUS_TIMESTAMP[to]]
            values[column.name] = sa.func.coalesce(column, now)
        with self.engine.begin() as conn:
            changed = conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.status.in_(list(allowed_from)))
                .values(**values)
            ).rowcount
            if changed and event is not None:
                event_id, event_type = event
                conn.execute(
                    batch_events.insert().values(
                        id=event_id, batch_id=batch_id, type=event_type, created_at=now
                    )
                )
        return bool(changed)

    def update_unfinished(self, batch_id: str, **fields: Any) -> bool:
        """Write ``fields`` (counts, usage, endpoint, ...) unless the batch is in a terminal
        status, which no write may change. True when the row was updated."""
        if "status" in fields:
            raise ValueError("status changes go through the lifecycle")
        with self.engine.begin() as conn:
            changed = conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, _NOT_TERMINAL)
                .values(**fields, updated_at=time.time())
            ).rowcount
        return bool(changed)

    def claim(self, batch_id: str, run_id: str, holder: str | None) -> bool:
        """Make ``run_id`` the batch's run if the run holding it is still ``holder`` (compare
        and swap, so of two runs racing for a batch one wins). Refused for terminal batches."""
        holder_is = batches.c.run_id.is_(None) if holder is None else batches.c.run_id == holder
        with self.engine.begin() as conn:
            changed = conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, _NOT_TERMINAL, holder_is)
                .values(run_id=run_id, updated_at=time.time())
            ).rowcount
        return bool(changed)

    def count_batches_by_status(self) -> dict[str, int]:
        query = sa.select(batches.c.status, sa.func.count()).group_by(batches.c.status)
        with self.engine.connect() as conn:
            return {status: n for status, n in conn.execute(query)}

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

    @staticmethod
    def to_openai_batch(row: dict[str, Any]) -> BatchObject:
        """The OpenAI Batch object of a catalog row."""
        errors = row.get("errors")
        return BatchObject(
            id=row["id"],
            endpoint=row["endpoint"],
            errors=BatchErrors(data=errors) if errors else None,
            input_file_id=row["input_file_id"],
            completion_window=row["completion_window"],
            status=row["status"],
            output_file_id=row["output_file_id"],
            error_file_id=row["error_file_id"],
            created_at=row["created_at"],
            in_progress_at=row["in_progress_at"],
            expires_at=row["expires_at"],
            finalizing_at=row["finalizing_at"],
            completed_at=row["completed_at"],
            failed_at=row["failed_at"],
            expired_at=row["expired_at"],
            cancelling_at=row["cancelling_at"],
            cancelled_at=row["cancelled_at"],
            request_counts=RequestCounts(
                total=row["request_total"],
                completed=row["request_completed"],
                failed=row["request_failed"],
            ),
            usage=row["usage"],
            metadata=row["batch_metadata"] or None,
        )

    # ---- files ------------------------------------------------------------------------------

    def create_file(
        self,
        file_id: str,
        *,
        filename: str,
        purpose: str,
        size: int,
        path: str,
        sha256: str | None = None,
    ) -> dict[str, Any]:
        row = dict(
            id=file_id,
            filename=filename,
            purpose=purpose,
            bytes=size,
            path=path,
            created_at=int(time.time()),
            deleted=False,
            sha256=sha256,
        )
        with self.engine.begin() as conn:
            # A batch's result files are registered under ids derived from the batch id.
            conn.execute(files.delete().where(files.c.id == file_id))
            conn.execute(files.insert().values(**row))
        return row

    def get_file(self, file_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        with self._reading(conn) as conn:
            row = conn.execute(_FILE_BY_ID, {"id": file_id}).mappings().first()
        return dict(row) if row else None

    def list_files(
        self,
        purpose: str | None = None,
        limit: int = 10_000,
        after: str | None = None,
        order: str = "desc",
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Files by ``created_at`` (then id) in ``order``; ``after`` is the last id of the
        previous page. Ask for one more than a page to learn whether there is another."""
        desc = order == "desc"
        keys = (files.c.created_at, files.c.id)
        query = sa.select(files).where(files.c.deleted.is_(False))
        if purpose:
            query = query.where(files.c.purpose == purpose)
        with self._reading(conn) as conn:
            if after is not None:
                anchor = conn.execute(sa.select(*keys).where(files.c.id == after)).first()
                if anchor is None:
                    return []
                beyond = (
                    sa.tuple_(*keys) < tuple(anchor) if desc else sa.tuple_(*keys) > tuple(anchor)
                )
                query = query.where(beyond)
            ordering = [k.desc() if desc else k.asc() for k in keys]
            query = query.order_by(*ordering).limit(limit)
            return [dict(r) for r in conn.execute(query).mappings()]

    def delete_file(self, file_id: str) -> dict[str, Any] | None:
        """Mark a file deleted; returns its row (the caller removes the bytes) or None."""
        with self.engine.begin() as conn:
            row = conn.execute(_FILE_BY_ID, {"id": file_id}).mappings().first()
            if row is None:
                return None
            conn.execute(files.update().where(files.c.id == file_id).values(deleted=True))
        return dict(row)

    @staticmethod
    def to_openai_file(row: dict[str, Any]) -> FileObject:
        return FileObject(
            id=row["id"],
            bytes=row["bytes"],
            created_at=row["created_at"],
            filename=row["filename"],
            purpose=row["purpose"],
        )

    # ---- events and deliveries --------------------------------------------------------------

    def get_event(self, event_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(batch_events).where(batch_events.c.id == event_id))
            found = row.mappings().first()
        return dict(found) if found else None

    def batch_events_of(self, batch_id: str) -> list[dict[str, Any]]:
        return self._all(
            sa.select(batch_events)
            .where(batch_events.c.batch_id == batch_id)
            .order_by(batch_events.c.created_at)
        )

    def undelivered_events(self, older_than: float) -> list[dict[str, Any]]:
        """Events nobody delivered or gave up on, created before ``older_than``, oldest first."""
        query = (
            sa.select(batch_events)
            .where(
                batch_events.c.delivered_at.is_(None),
                batch_events.c.gave_up_at.is_(None),
                batch_events.c.created_at < older_than,
                sa.or_(
                    batch_events.c.claimed_until.is_(None),
                    batch_events.c.claimed_until < time.time(),
                ),
            )
            .order_by(batch_events.c.created_at)
            .limit(100)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def claim_event(self, event_id: str, seconds: float) -> bool:
        """Take the delivery of an event for ``seconds``; False when another process has it or
        it is done."""
        now = time.time()
        with self.engine.begin() as conn:
            changed = conn.execute(
                batch_events.update()
                .where(
                    batch_events.c.id == event_id,
                    batch_events.c.delivered_at.is_(None),
                    batch_events.c.gave_up_at.is_(None),
                    sa.or_(
                        batch_events.c.claimed_until.is_(None),
                        batch_events.c.claimed_until < now,
                    ),
                )
                .values(claimed_until=now + seconds)
            ).rowcount
        return bool(changed)

    def finish_event(self, event_id: str, delivered: bool) -> None:
        column = "delivered_at" if delivered else "gave_up_at"
        with self.engine.begin() as conn:
            conn.execute(
                batch_events.update()
                .where(batch_events.c.id == event_id)
                .values({column: time.time(), "claimed_until": None})
            )

    def release_event(self, event_id: str) -> None:
        """Give an event's delivery back for a later try."""
        with self.engine.begin() as conn:
            conn.execute(
                batch_events.update()
                .where(batch_events.c.id == event_id)
                .values(claimed_until=None)
            )

    def delivery_attempts(
        self, event_id: str, url: str | None = None, succeeded: bool = False
    ) -> int:
        """Delivery tries logged for an event (to ``url``; only the successful ones)."""
        query = sa.select(sa.func.count()).where(webhook_deliveries.c.event_id == event_id)
        if url is not None:
            query = query.where(webhook_deliveries.c.url == url)
        if succeeded:
            query = query.where(webhook_deliveries.c.error.is_(None))
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def log_webhook_delivery(self, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(webhook_deliveries.insert().values(at=time.time(), **fields))

    def webhook_deliveries(self, batch_id: str) -> list[dict[str, Any]]:
        return self._all(
            sa.select(webhook_deliveries)
            .where(webhook_deliveries.c.batch_id == batch_id)
            .order_by(webhook_deliveries.c.id)
        )

    # ---- the model registry -----------------------------------------------------------------

    def get_model(self, name: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        rows = self._all(sa.select(models).where(models.c.name == name), conn)
        return rows[0] if rows else None

    def list_models(
        self, include_retired: bool = False, conn: sa.Connection | None = None
    ) -> list[dict[str, Any]]:
        query = sa.select(models).order_by(models.c.created_at, models.c.name)
        if not include_retired:
            query = query.where(models.c.status == "available")
        return self._all(query, conn)

    def insert_model(self, row: dict[str, Any]) -> bool:
        """Register a model; False when the name is taken (retired names stay taken). An
        adapter gets the next free ``lora_id`` in the same transaction."""
        try:
            with self.engine.begin() as conn:
                if row.get("kind") == "adapter":
                    highest = conn.execute(sa.select(sa.func.max(models.c.lora_id))).scalar()
                    row = {**row, "lora_id": (highest or 0) + 1}
                conn.execute(models.insert().values(**row))
        except sa.exc.IntegrityError:
            return False
        return True

    def update_configured_model(
        self, name: str, kind: str, path: str, options: dict[str, Any] | None
    ) -> None:
        """Keep a configured (base or embedding) model's path and serving options in step with
        the settings; a model retired by hand stays retired."""
        with self.engine.begin() as conn:
            conn.execute(
                models.update()
                .where(models.c.name == name, models.c.kind == kind)
                .values(path=path, options=options)
            )

    def retire_model(self, name: str) -> bool:
        with self.engine.begin() as conn:
            changed = conn.execute(
                models.update()
                .where(models.c.name == name, models.c.status == "available")
                .values(status="retired", retired_at=int(time.time()))
            ).rowcount
        return bool(changed)

    def redeploy_model(self, name: str, lineage: dict[str, Any]) -> bool:
        """Make a retired adapter available again, with the same files and LoRA id (a rollback
        deploys an earlier fine-tuned model once more); its lineage gains this deployment."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                models.update()
                .where(models.c.name == name, models.c.kind == "adapter")
                .values(status="available", retired_at=None, lineage=lineage)
            ).rowcount
        return bool(changed)

    # ---- conquests ---------------------------------------------------------------------------

    def add_conquests(self, rows: list[dict[str, Any]]) -> int:
        """Insert the conquests not there yet (by id); the number inserted. Rows already there
        keep their state (annotations, result): making a batch's conquests again adds nothing."""
        if not rows:
            return 0
        ids = [row["id"] for row in rows]
        with self.engine.begin() as conn:
            known = set(
                conn.execute(sa.select(conquests.c.id).where(conquests.c.id.in_(ids))).scalars()
            )
            new = [row for row in rows if row["id"] not in known]
            if new:
                conn.execute(conquests.insert(), new)
        return len(new)

    def get_conquest(
        self, conquest_id: str, conn: sa.Connection | None = None
    ) -> dict[str, Any] | None:
        rows = self._all(sa.select(conquests).where(conquests.c.id == conquest_id), conn)
        return rows[0] if rows else None

    def conquests_of_batch(self, batch_id: str) -> list[dict[str, Any]]:
        query = sa.select(conquests).where(conquests.c.batch_id == batch_id)
        return self._all(query.order_by(conquests.c.id))

    def record_annotation(
        self, conquest_id: str, values: dict[str, Any], result: str | None
    ) -> str:
        """Record an edit (``ANNOTATION_FIELDS``). The newest edit (by ``edited_at``) is the
        conquest's annotation and sets its ``result``; every edit it replaces, and an edit older
        than the current one, goes to the history. Returns ``new``, ``updated``, ``older`` (kept
        in the history only) or ``unchanged`` (the same edit seen again)."""
        now = time.time()
        row = {name: values.get(name) for name in ANNOTATION_FIELDS}
        with self.engine.begin() as conn:
            current = (
                conn.execute(sa.select(annotations).where(annotations.c.conquest_id == conquest_id))
                .mappings()
                .first()
            )
            if current is not None:
                kept = {name: current[name] for name in ANNOTATION_FIELDS}
                if kept == row:
                    return "unchanged"
                if (current["edited_at"] or 0) > (row["edited_at"] or 0):
                    conn.execute(
                        annotation_history.insert().values(
                            conquest_id=conquest_id, replaced_at=now, **row
                        )
                    )
                    return "older"
                conn.execute(
                    annotation_history.insert().values(
                        conquest_id=conquest_id, replaced_at=now, **kept
                    )
                )
                conn.execute(
                    annotations.update()
                    .where(annotations.c.conquest_id == conquest_id)
                    .values(recorded_at=now, **row)
                )
            else:
                conn.execute(
                    annotations.insert().values(conquest_id=conquest_id, recorded_at=now, **row)
                )
            conn.execute(
                conquests.update()
                .where(conquests.c.id == conquest_id)
                .values(result=result, updated_at=now)
            )
        return "new" if current is None else "updated"

    def annotation_of(self, conquest_id: str) -> dict[str, Any] | None:
        rows = self._all(sa.select(annotations).where(annotations.c.conquest_id == conquest_id))
        return rows[0] if rows else None

    def annotation_history_of(self, conquest_id: str) -> list[dict[str, Any]]:
        query = sa.select(annotation_history).where(annotation_history.c.conquest_id == conquest_id)
        return self._all(query.order_by(annotation_history.c.id))

    def list_conquests(
        self,
        type_id: str | None = None,
        status: str | None = None,
        result: str | None = None,
        gold: bool | None = None,
        min_rating: int | None = None,
        limit: int = 100,
        after: str | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Conquests with their annotation (``annotation_*`` keys), oldest first, after the
        conquest ``after``; ``limit + 1`` rows at most (the caller tells whether more follow)."""
        labelled = [annotations.c[name].label(f"annotation_{name}") for name in ANNOTATION_FIELDS]
        query = sa.select(conquests, *labelled).select_from(
            conquests.outerjoin(annotations, annotations.c.conquest_id == conquests.c.id)
        )
        if type_id is not None:
            query = query.where(conquests.c.type == type_id)
        if status is not None:
            query = query.where(conquests.c.status == status)
        if result is not None:
            query = query.where(conquests.c.result == result)
        if gold is True:
            query = query.where(annotations.c.is_gold_star.is_(True))
        elif gold is False:
            query = query.where(annotations.c.is_gold_star.is_not(True))
        if min_rating is not None:
            query = query.where(annotations.c.rating >= min_rating)
        if after is not None:
            anchor = sa.select(conquests.c.created_at).where(conquests.c.id == after)
            query = query.where(
                sa.tuple_(conquests.c.created_at, conquests.c.id)
                > sa.tuple_(anchor.scalar_subquery(), sa.literal(after))
            )
        query = query.order_by(conquests.c.created_at, conquests.c.id).limit(limit + 1)
        return self._all(query, conn)

    def conquest_batches(self, conquest_ids: list[str]) -> dict[str, int]:
        """The batches the given conquests came from, with how many came from each."""
        counts: dict[str, int] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(conquest_ids), 500):
                chunk = conquest_ids[start : start + 500]
                query = (
                    sa.select(conquests.c.batch_id, sa.func.count())
                    .where(conquests.c.id.in_(chunk))
                    .group_by(conquests.c.batch_id)
                )
                for batch_id, n in conn.execute(query):
                    counts[batch_id] = counts.get(batch_id, 0) + n
        return counts

    # ---- Label Studio -------------------------------------------------------------------------

    def label_studio_project(self, type_id: str, url: str) -> dict[str, Any] | None:
        query = sa.select(label_studio_projects).where(
            label_studio_projects.c.type == type_id, label_studio_projects.c.url == url
        )
        rows = self._all(query)
        return rows[0] if rows else None

    def label_studio_projects_at(self, url: str) -> list[dict[str, Any]]:
        query = sa.select(label_studio_projects).where(label_studio_projects.c.url == url)
        return self._all(query.order_by(label_studio_projects.c.project_id))

    def save_label_studio_project(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            key = (label_studio_projects.c.type == row["type"]) & (
                label_studio_projects.c.url == row["url"]
            )
            if conn.execute(label_studio_projects.update().where(key).values(**row)).rowcount:
                return
            conn.execute(label_studio_projects.insert().values(**row))

    def label_studio_tasks_of(
        self, url: str, project_id: int, conquest_ids: list[str]
    ) -> dict[str, int | None]:
        """conquest id -> task id in ``project_id`` (None: its import was started, not
        confirmed). Rows of another project (the type's project was deleted in Label Studio
        and made again) are dropped, so those conquests are imported into this one."""
        if not conquest_ids:
            return {}
        mine = (label_studio_tasks.c.url == url) & label_studio_tasks.c.conquest_id.in_(
            conquest_ids
        )
        with self.engine.begin() as conn:
            conn.execute(
                label_studio_tasks.delete().where(
                    mine, label_studio_tasks.c.project_id != project_id
                )
            )
            query = sa.select(label_studio_tasks.c.conquest_id, label_studio_tasks.c.task_id)
            return {row.conquest_id: row.task_id for row in conn.execute(query.where(mine))}

    def start_label_studio_tasks(self, url: str, project_id: int, conquest_ids: list[str]) -> None:
        now = int(time.time())
        rows = [
            {
                "conquest_id": c,
                "url": url,
                "project_id": project_id,
                "task_id": None,
                "created_at": now,
            }
            for c in conquest_ids
        ]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(label_studio_tasks.insert(), rows)

    def finish_label_studio_tasks(self, url: str, task_ids: dict[str, int]) -> None:
        with self.engine.begin() as conn:
            for conquest_id, task_id in task_ids.items():
                conn.execute(
                    label_studio_tasks.update()
                    .where(
                        label_studio_tasks.c.conquest_id == conquest_id,
                        label_studio_tasks.c.url == url,
                    )
                    .values(task_id=task_id)
                )

    # ---- datasets ----------------------------------------------------------------------------

    def record_dataset(self, row: dict[str, Any]) -> bool:
        """Record a built version; True when it is new. Building a version again keeps its row
        (its conquests, its first build) and notes the run and time of this build."""
        again = (
            datasets.update()
            .where(datasets.c.version == row["version"])
            .values(run_id=row.get("run_id"), built_at=row["built_at"])
        )
        try:
            with self.engine.begin() as conn:
                if conn.execute(again).rowcount:
                    return False
                conn.execute(datasets.insert().values(**row))
                return True
        except sa.exc.IntegrityError:  # the same version recorded by a build running alongside
            with self.engine.begin() as conn:
                conn.execute(again)
            return False

    def get_dataset(self, version: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        rows = self._all(sa.select(datasets).where(datasets.c.version == version), conn)
        return rows[0] if rows else None

    def list_datasets(
        self,
        type_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Versions, the most recently built first, after the version ``after``; ``limit + 1``
        rows at most (the caller tells whether more follow)."""
        query = sa.select(datasets)
        if type_id is not None:
            query = query.where(datasets.c.type == type_id)
        if after is not None:
            anchor = sa.select(datasets.c.built_at).where(datasets.c.version == after)
            query = query.where(
                sa.tuple_(datasets.c.built_at, datasets.c.version)
                < sa.tuple_(anchor.scalar_subquery(), sa.literal(after))
            )
        query = query.order_by(datasets.c.built_at.desc(), datasets.c.version.desc())
        return self._all(query.limit(limit + 1), conn)

    # ---- fine-tuning jobs ---------------------------------------------------------------------

    def insert_fine_tuning_job(self, row: dict[str, Any]) -> dict[str, Any]:
        with self.engine.begin() as conn:
            conn.execute(fine_tuning_jobs.insert().values(updated_at=time.time(), **row))
        return self.get_fine_tuning_job(row["id"])

    def get_fine_tuning_job(
        self, job_id: str, conn: sa.Connection | None = None
    ) -> dict[str, Any] | None:
        rows = self._all(sa.select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id), conn)
        return rows[0] if rows else None

    def list_fine_tuning_jobs(
        self,
        limit: int = 20,
        after: str | None = None,
        dataset_version: str | None = None,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs, newest first, after the job ``after``; ``limit + 1`` rows at most."""
        query = sa.select(fine_tuning_jobs)
        if dataset_version is not None:
            query = query.where(fine_tuning_jobs.c.dataset_version == dataset_version)
        if status is not None:
            query = query.where(fine_tuning_jobs.c.status == status)
        if after is not None:
            anchor = self.get_fine_tuning_job(after)
            if anchor is None:
                return []
            query = query.where(
                sa.tuple_(fine_tuning_jobs.c.created_at, fine_tuning_jobs.c.id)
                < sa.tuple_(sa.literal(anchor["created_at"]), sa.literal(anchor["id"]))
            )
        query = query.order_by(
            fine_tuning_jobs.c.created_at.desc(), fine_tuning_jobs.c.id.desc()
        ).limit(limit + 1)
        return self._all(query)

    def update_fine_tuning_job(self, job_id: str, **values: Any) -> bool:
        """Change a job that has not ended (its status, run, result); False when it has ended,
        and so nothing was changed: a finished job's outcome is never rewritten."""
        with self.engine.begin() as conn:
            done = conn.execute(
                fine_tuning_jobs.update()
                .where(
                    fine_tuning_jobs.c.id == job_id,
                    fine_tuning_jobs.c.status.not_in(JOB_TERMINAL),
                )
                .values(updated_at=time.time(), **values)
            )
        return bool(done.rowcount)

    def reopen_fine_tuning_job(self, job_id: str, run_id: str) -> bool:
        """Give a job whose run died (ended ``failed`` with ``run_failed`` by whoever noticed)
        to the run that retries it; a job that failed for a reason of its own stays failed."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(fine_tuning_jobs.c.error).where(
                    fine_tuning_jobs.c.id == job_id, fine_tuning_jobs.c.status == "failed"
                )
            ).first()
            if row is None or (row.error or {}).get("code") != "run_failed":
                return False
            conn.execute(
                fine_tuning_jobs.update()
                .where(fine_tuning_jobs.c.id == job_id)
                .values(
                    status="running", run_id=run_id, error=None, finished_at=None,
                    updated_at=time.time(),
                )
            )  # fmt: skip
        return True

    def annotate_fine_tuning_job(self, job_id: str, **values: Any) -> None:
        """Record what happens after a job ended (its evaluation, its deployment)."""
        with self.engine.begin() as conn:
            conn.execute(
                fine_tuning_jobs.update()
                .where(fine_tuning_jobs.c.id == job_id)
                .values(updated_at=time.time(), **values)
            )

    def add_fine_tuning_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        kind: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                fine_tuning_events.insert().values(
                    job_id=job_id,
                    created_at=int(time.time()),
                    level=level,
                    type=kind,
                    message=message[:2000],
                    data=data,
                )
            )

    def list_fine_tuning_events(
        self, job_id: str, limit: int = 20, after: int | None = None
    ) -> list[dict[str, Any]]:
        """A job's events, newest first (as OpenAI lists them), ``limit + 1`` at most."""
        query = sa.select(fine_tuning_events).where(fine_tuning_events.c.job_id == job_id)
        if after is not None:
            query = query.where(fine_tuning_events.c.id < after)
        query = query.order_by(fine_tuning_events.c.id.desc()).limit(limit + 1)
        return self._all(query)

    # ---- inbox problems ---------------------------------------------------------------------

    def set_inbox_problems(self, problems: dict[str, tuple[str, str]]) -> dict[str, str]:
        """Replace the recorded problems with ``problems`` (name -> (kind, message)); returns the
        ones that are new or whose message changed, to be reported once."""
        now = time.time()
        fresh: dict[str, str] = {}
        with self.engine.begin() as conn:
            known = {
                r.name: r
                for r in conn.execute(sa.select(inbox_problems.c.name, inbox_problems.c.message))
            }
            gone = set(known) - set(problems)
            if gone:
                conn.execute(inbox_problems.delete().where(inbox_problems.c.name.in_(gone)))
            for name, (kind, message) in problems.items():
                message = message[:1000]
                if name not in known:
                    conn.execute(
                        inbox_problems.insert().values(
                            name=name, kind=kind, message=message, first_seen=now, last_seen=now
                        )
                    )
                    fresh[name] = message
                else:
                    conn.execute(
                        inbox_problems.update()
                        .where(inbox_problems.c.name == name)
                        .values(kind=kind, message=message, last_seen=now)
                    )
                    if known[name].message != message:
                        fresh[name] = message
        return fresh

    def list_inbox_problems(self, conn: sa.Connection | None = None) -> list[dict[str, Any]]:
        return self._all(sa.select(inbox_problems).order_by(inbox_problems.c.name), conn)
