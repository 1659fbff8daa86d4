"""device metrics history: one row per heartbeat, the newest kept per device

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_samples",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(32), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    op.create_index("ix_device_samples_device_id", "device_samples", ["device_id"])


def downgrade() -> None:
    op.drop_index("ix_device_samples_device_id", table_name="device_samples")
    op.drop_table("device_samples")
