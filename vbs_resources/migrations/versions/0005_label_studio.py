"""Label Studio: each conquest type's project and each conquest's task.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_studio_projects",
        sa.Column("type", sa.String(64), primary_key=True),
        sa.Column("url", sa.String(512), primary_key=True),
        sa.Column("project_id", sa.Integer, nullable=False),
        sa.Column("type_version", sa.String(64), nullable=False),
        sa.Column("config_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "label_studio_tasks",
        sa.Column("conquest_id", sa.String(80), primary_key=True),
        sa.Column("url", sa.String(512), primary_key=True),
        sa.Column("project_id", sa.Integer, nullable=False),
        sa.Column("task_id", sa.Integer),
        sa.Column("created_at", sa.Integer, nullable=False),
    )
    op.create_index(
        "ix_label_studio_tasks_project_task", "label_studio_tasks", ["project_id", "task_id"]
    )


def downgrade() -> None:
    op.drop_table("label_studio_tasks")
    op.drop_table("label_studio_projects")
