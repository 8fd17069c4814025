"""Curated datasets: one row per version with the conquests it was made of.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("version", sa.String(100), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("type_version", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("train_count", sa.Integer, nullable=False),
        sa.Column("eval_count", sa.Integer, nullable=False),
        sa.Column("icl_count", sa.Integer, nullable=False),
        sa.Column("conquest_ids", sa.JSON, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("built_at", sa.Float, nullable=False),
    )
    op.create_index("ix_datasets_type_built_at", "datasets", ["type", "built_at"])


def downgrade() -> None:
    op.drop_table("datasets")
