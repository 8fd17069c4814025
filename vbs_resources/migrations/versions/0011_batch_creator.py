"""Who created a batch through the API (a hash of the API key, never the key), for the limit on
batches in flight per key.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("created_by", sa.String(40)))
    op.create_index("ix_batches_created_by", "batches", ["created_by", "status"])


def downgrade() -> None:
    op.drop_index("ix_batches_created_by", "batches")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("created_by")
