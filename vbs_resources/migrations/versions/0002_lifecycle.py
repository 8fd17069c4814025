"""One batch lifecycle: the input's hash at pick-up, the run holding a batch and its options,
the event outbox, inbox problems, and a files index for pagination.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("input_sha256", sa.String(64)))
        batch.add_column(sa.Column("run_id", sa.String(64)))
        batch.add_column(sa.Column("options", sa.JSON))
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("sha256", sa.String(64)))
    op.create_index("ix_files_created_at_id", "files", ["created_at", "id"])
    op.create_table(
        "batch_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("batch_id", sa.String(80), nullable=False),
        sa.Column("type", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("claimed_until", sa.Float),
        sa.Column("delivered_at", sa.Float),
        sa.Column("gave_up_at", sa.Float),
        sa.UniqueConstraint("batch_id", "type", name="uq_batch_events_batch_type"),
    )
    op.create_index("ix_batch_events_batch_id", "batch_events", ["batch_id"])
    op.create_table(
        "inbox_problems",
        sa.Column("name", sa.String(512), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.String(1000), nullable=False),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("inbox_problems")
    op.drop_table("batch_events")
    op.drop_index("ix_files_created_at_id", "files")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("sha256")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("options")
        batch.drop_column("run_id")
        batch.drop_column("input_sha256")
