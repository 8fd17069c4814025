"""Webhook events retried for hours, from the outbox, outside every run: each event's rounds of
attempts, when the next one is due, its last error, and when it was last sent again by hand.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.Float))
        batch.add_column(sa.Column("last_error", sa.String(500)))
        batch.add_column(sa.Column("redelivered_at", sa.Float))
    op.create_index(
        "ix_events_pending", "events", ["delivered_at", "gave_up_at", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_events_pending", "events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("redelivered_at")
        batch.drop_column("last_error")
        batch.drop_column("next_attempt_at")
        batch.drop_column("attempts")
