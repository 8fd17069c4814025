"""Fine-tuning jobs (one per training, in OpenAI's job shape) and their events.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("training_file", sa.String(256), nullable=False),
        sa.Column("validation_file", sa.String(256)),
        sa.Column("dataset_version", sa.String(100), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("hyperparameters", sa.JSON, nullable=False),
        sa.Column("suffix", sa.String(64)),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("adapter_path", sa.String(1024)),
        sa.Column("fine_tuned_model", sa.String(256)),
        sa.Column("result", sa.JSON),
        sa.Column("evaluation", sa.JSON),
        sa.Column("error", sa.JSON),
        sa.Column("job_metadata", sa.JSON),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Integer),
        sa.Column("finished_at", sa.Integer),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_fine_tuning_jobs_created_at", "fine_tuning_jobs", ["created_at"])
    op.create_index("ix_fine_tuning_jobs_dataset_version", "fine_tuning_jobs", ["dataset_version"])
    op.create_table(
        "fine_tuning_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(80), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.JSON),
    )
    op.create_index("ix_fine_tuning_events_job_id", "fine_tuning_events", ["job_id", "id"])


def downgrade() -> None:
    op.drop_table("fine_tuning_events")
    op.drop_table("fine_tuning_jobs")
