"""The catalog's tables, for queries. The schema changes only through Alembic migrations
(``vbs_resources/migrations``), and a test checks that a migrated catalog matches these tables.
"""

from __future__ import annotations

import sqlalchemy as sa

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
    # Revision 11: the API key that created it (a hash), for the batches in flight per key.
    sa.Column("created_by", sa.String(40)),
    sa.Index("ix_batches_created_by", "created_by", "status"),
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

# The outbox: one row per event (of a batch or a fine-tuning job, its ``subject_id``), written in
# the transaction that changed the status it announces, so an event exists exactly once whatever
# crashes; its delivery is claimed, retried and recorded here.
events = sa.Table(
    "events",
    metadata_obj,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("subject_id", sa.String(80), nullable=False, index=True),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("claimed_until", sa.Float),
    sa.Column("delivered_at", sa.Float),
    sa.Column("gave_up_at", sa.Float),
    # Revision 10: retried for hours, in rounds (one try per receiver each), never inside a run.
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float),  # none: due now
    sa.Column("last_error", sa.String(500)),
    sa.Column("redelivered_at", sa.Float),  # sent again by hand: its retry window starts here
    sa.UniqueConstraint("subject_id", "type", name="uq_events_subject_type"),
    sa.Index("ix_events_pending", "delivered_at", "gave_up_at", "next_attempt_at"),
)

# Every delivery attempt of an event to a receiver (never the secret).
event_deliveries = sa.Table(
    "event_deliveries",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(80), nullable=False, index=True),
    sa.Column("subject_id", sa.String(80), index=True),
    sa.Column("event_type", sa.String(40), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error", sa.String(500)),
    sa.Column("at", sa.Float, nullable=False),
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
    # Revision 9: an operator's exclusion (never in a dataset, never sent to curators).
    sa.Column("excluded_at", sa.Float),
    sa.Column("excluded_reason", sa.Text),
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
    sa.Column("checks", sa.JSON),  # the latest build's blocking checks: {name: {passed, ...}}
    sa.Index("ix_datasets_type_built_at", "type", "built_at"),
)

# Every build of a dataset version: the run that made it and its blocking checks, so each build
# (three at once of the same data, say) is found by its own run.
dataset_builds = sa.Table(
    "dataset_builds",
    metadata_obj,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(100), nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("checks", sa.JSON, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("built_at", sa.Float, nullable=False),
    sa.Index("ix_dataset_builds_version", "version", "built_at"),
)

# The side (train or eval) each prompt of a dataset type was first given: it keeps that side in
# every later version, so a model trained on one version is never evaluated on its own examples.
dataset_splits = sa.Table(
    "dataset_splits",
    metadata_obj,
    sa.Column("type", sa.String(64), primary_key=True),
    sa.Column("prompt_key", sa.String(64), primary_key=True),
    sa.Column("side", sa.String(8), nullable=False),
    sa.Column("version", sa.String(100), nullable=False),  # the version that first held it
    sa.Column("assigned_at", sa.Float, nullable=False),
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

# A fine-tuning job's deployments into the model registry, at most one in flight per job.
DEPLOYMENT_IN_FLIGHT = ("queued", "running")
deployments = sa.Table(
    "deployments",
    metadata_obj,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("job_id", sa.String(80), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # queued, running, succeeded, failed
    sa.Column("forced", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("run_id", sa.String(64)),
    sa.Column("retired", sa.JSON),  # the models this deployment retired
    sa.Column("error", sa.JSON),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Integer),
    sa.Column("finished_at", sa.Integer),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_deployments_job_id", "job_id", "created_at"),
    sa.Index(
        "uq_deployments_job_in_flight",
        "job_id",
        unique=True,
        sqlite_where=sa.text("status IN ('queued', 'running')"),
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    ),
)

# Every change of a conquest's status, result or exclusion, as its lifecycle made it.
conquest_history = sa.Table(
    "conquest_history",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("conquest_id", sa.String(80), nullable=False),
    sa.Column("field", sa.String(16), nullable=False),  # status, result, excluded
    sa.Column("before", sa.String(16)),
    sa.Column("after", sa.String(16)),
    sa.Column("source", sa.String(16), nullable=False),  # batch, api, label_studio, cli
    sa.Column("note", sa.Text),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_conquest_history_conquest_id", "conquest_id", "id"),
)
