"""Conquests: one per result line of a batch whose metadata names a conquest type.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conquests",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("type_version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.String(16)),
        sa.Column("input_data", sa.JSON, nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("prediction", sa.Text),
        sa.Column("error", sa.JSON),
        sa.Column("model", sa.String(256)),
        sa.Column("batch_id", sa.String(80), nullable=False),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_conquests_batch_custom_id"),
    )
    op.create_index("ix_conquests_type_created_at_id", "conquests", ["type", "created_at", "id"])


def downgrade() -> None:
    op.drop_table("conquests")
