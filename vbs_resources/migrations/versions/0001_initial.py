"""The catalog as it was before migrations: batches, files, webhook deliveries.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64)),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("original_filename", sa.String(255)),
        sa.Column("input_file_id", sa.String(80)),
        sa.Column("output_file_id", sa.String(80)),
        sa.Column("error_file_id", sa.String(80)),
        sa.Column("content_sha256", sa.String(64)),
        sa.Column("completion_window", sa.String(8), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Integer),
        sa.Column("in_progress_at", sa.Integer),
        sa.Column("finalizing_at", sa.Integer),
        sa.Column("completed_at", sa.Integer),
        sa.Column("failed_at", sa.Integer),
        sa.Column("expired_at", sa.Integer),
        sa.Column("cancelling_at", sa.Integer),
        sa.Column("cancelled_at", sa.Integer),
        sa.Column("request_total", sa.Integer, nullable=False),
        sa.Column("request_completed", sa.Integer, nullable=False),
        sa.Column("request_failed", sa.Integer, nullable=False),
        sa.Column("usage", sa.JSON),
        sa.Column("batch_metadata", sa.JSON),
        sa.Column("errors", sa.JSON),
        sa.Column("models", sa.JSON),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_index("ix_batches_content_sha256", "batches", ["content_sha256"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(80), nullable=False),
        sa.Column("batch_id", sa.String(80)),
        sa.Column("event_type", sa.String(40), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.String(500)),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_webhook_deliveries_event_id", "webhook_deliveries", ["event_id"])
    op.create_index("ix_webhook_deliveries_batch_id", "webhook_deliveries", ["batch_id"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("files")
    op.drop_table("batches")
