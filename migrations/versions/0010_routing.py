"""routing and fairness: a job's priority and resources, and the workers' heartbeat rows

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
    op.add_column("jobs", sa.Column("resources", sa.JSON(), nullable=True))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("gpu_kind", sa.String(length=100), nullable=False),
        sa.Column("memory_gb", sa.Double(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_workers_queue"), "workers", ["queue"])


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_queue"), table_name="workers")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resources")
        batch.drop_column("priority")
