"""The model registry: base, embedding and adapter models the engine serves by name.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("base", sa.String(256)),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("lora_id", sa.Integer, unique=True),
        sa.Column("rank", sa.Integer),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("retired_at", sa.Integer),
        sa.Column("lineage", sa.JSON),
        sa.Column("options", sa.JSON),
    )
    op.create_index("ix_models_status", "models", ["status"])


def downgrade() -> None:
    op.drop_table("models")
