"""One lifecycle per entity: the outbox for every entity's events, deployments, the split each
prompt was given, every dataset build with its checks, and the history and exclusion of
conquests.

- ``batch_events`` becomes ``events`` (``batch_id`` -> ``subject_id``): fine-tuning jobs send
  their webhook events through the same outbox as batches. ``webhook_deliveries`` follows.
- ``deployments``: one row per deployment of a fine-tuning job, at most one in flight per job.
- ``dataset_splits``: the side (train or eval) each prompt of a dataset type was first given,
  which it keeps in every later version.
- ``dataset_builds``: every build of a version (its run, its blocking checks); ``datasets``
  gains the latest build's ``checks``.
- ``conquests`` gain ``excluded_at`` / ``excluded_reason``; ``conquest_history`` records every
  change of a conquest's status, result and exclusion.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _events() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("subject_id", sa.String(80), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("claimed_until", sa.Float),
        sa.Column("delivered_at", sa.Float),
        sa.Column("gave_up_at", sa.Float),
        sa.UniqueConstraint("subject_id", "type", name="uq_events_subject_type"),
    )
    op.create_index("ix_events_subject_id", "events", ["subject_id"])
    op.execute(
        "INSERT INTO events (id, subject_id, type, created_at, claimed_until, delivered_at, "
        "gave_up_at) SELECT id, batch_id, type, created_at, claimed_until, delivered_at, "
        "gave_up_at FROM batch_events"
    )
    op.drop_table("batch_events")
    op.create_table(
        "event_deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(80), nullable=False),
        sa.Column("subject_id", sa.String(80)),
        sa.Column("event_type", sa.String(40), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.String(500)),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_event_deliveries_event_id", "event_deliveries", ["event_id"])
    op.create_index("ix_event_deliveries_subject_id", "event_deliveries", ["subject_id"])
    op.execute(
        "INSERT INTO event_deliveries (id, event_id, subject_id, event_type, url, attempt, "
        "status_code, error, at) SELECT id, event_id, batch_id, event_type, url, attempt, "
        "status_code, error, at FROM webhook_deliveries"
    )
    op.drop_table("webhook_deliveries")


def upgrade() -> None:
    _events()
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("job_id", sa.String(80), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("forced", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("run_id", sa.String(64)),
        sa.Column("retired", sa.JSON),
        sa.Column("error", sa.JSON),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Integer),
        sa.Column("finished_at", sa.Integer),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_deployments_job_id", "deployments", ["job_id", "created_at"])
    # At most one deployment of a job in flight: concurrent deploys collapse into it.
    op.create_index(
        "uq_deployments_job_in_flight",
        "deployments",
        ["job_id"],
        unique=True,
        sqlite_where=sa.text("status IN ('queued', 'running')"),
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )
    op.create_table(
        "dataset_splits",
        sa.Column("type", sa.String(64), primary_key=True),
        sa.Column("prompt_key", sa.String(64), primary_key=True),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("assigned_at", sa.Float, nullable=False),
    )
    op.create_table(
        "dataset_builds",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("checks", sa.JSON, nullable=False),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("built_at", sa.Float, nullable=False),
    )
    op.create_index("ix_dataset_builds_version", "dataset_builds", ["version", "built_at"])
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("checks", sa.JSON))
    with op.batch_alter_table("conquests") as batch:
        batch.add_column(sa.Column("excluded_at", sa.Float))
        batch.add_column(sa.Column("excluded_reason", sa.Text))
    op.create_table(
        "conquest_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("conquest_id", sa.String(80), nullable=False),
        sa.Column("field", sa.String(16), nullable=False),
        sa.Column("before", sa.String(16)),
        sa.Column("after", sa.String(16)),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_conquest_history_conquest_id", "conquest_history", ["conquest_id", "id"])


def downgrade() -> None:
    op.drop_table("conquest_history")
    with op.batch_alter_table("conquests") as batch:
        batch.drop_column("excluded_reason")
        batch.drop_column("excluded_at")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("checks")
    op.drop_table("dataset_builds")
    op.drop_table("dataset_splits")
    op.drop_table("deployments")
    op.create_table(
        "webhook_deliveries",
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
    op.execute(
        "INSERT INTO webhook_deliveries SELECT id, event_id, subject_id, event_type, url, "
        "attempt, status_code, error, at FROM event_deliveries WHERE subject_id LIKE 'batch_%'"
    )
    op.drop_table("event_deliveries")
    op.create_table(
        "batch_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("batch_id", sa.String(80), nullable=False, index=True),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("claimed_until", sa.Float),
        sa.Column("delivered_at", sa.Float),
        sa.Column("gave_up_at", sa.Float),
        sa.UniqueConstraint("batch_id", "type", name="uq_batch_events_batch_type"),
    )
    op.execute(
        "INSERT INTO batch_events SELECT id, subject_id, type, created_at, claimed_until, "
        "delivered_at, gave_up_at FROM events WHERE type LIKE 'batch.%'"
    )
    op.drop_table("events")
