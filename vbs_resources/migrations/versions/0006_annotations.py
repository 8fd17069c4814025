"""Annotations: the newest edit of each conquest's curation, and every edit it replaced.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column]:
    return [
        sa.Column("is_gold_star", sa.Boolean),
        sa.Column("rating", sa.Integer),
        sa.Column("feedback", sa.Text),
        sa.Column("improvement_notes", sa.Text),
        sa.Column("answers", sa.JSON),
        sa.Column("source", sa.String(16)),
        sa.Column("source_ref", sa.String(64)),
        sa.Column("edited_at", sa.Float),
    ]


def upgrade() -> None:
    op.create_table(
        "annotations",
        sa.Column("conquest_id", sa.String(80), primary_key=True),
        *_columns(),
        sa.Column("recorded_at", sa.Float, nullable=False),
    )
    op.create_table(
        "annotation_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("conquest_id", sa.String(80), nullable=False),
        *_columns(),
        sa.Column("replaced_at", sa.Float, nullable=False),
    )
    op.create_index("ix_annotation_history_conquest_id", "annotation_history", ["conquest_id"])


def downgrade() -> None:
    op.drop_table("annotation_history")
    op.drop_table("annotations")
