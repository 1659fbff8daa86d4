"""log batches carry a stream: the role's output ("log") or its metrics.jsonl lines ("metrics")

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = "id, run_id, device_id, seq, text, created_at"


def _table(name: str, *, with_stream: bool) -> None:
    columns: list[sa.schema.SchemaItem] = [
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.String(length=64), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("device_id", sa.String(length=32), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    ]
    if with_stream:
        columns.append(sa.Column("stream", sa.String(length=10), server_default="log", nullable=False))
        unique = sa.UniqueConstraint("run_id", "device_id", "stream", "seq", name="uq_log_batch")
    else:
        unique = sa.UniqueConstraint("run_id", "device_id", "seq")
    op.create_table(name, *columns, unique)


def upgrade() -> None:
    # A new table and a copy: the old unique constraint has no name to drop on every database.
    _table("log_batches_new", with_stream=True)
    op.execute(f"INSERT INTO log_batches_new ({_COLUMNS}, stream) SELECT {_COLUMNS}, 'log' FROM log_batches")
    op.drop_table("log_batches")
    op.rename_table("log_batches_new", "log_batches")


def downgrade() -> None:
    _table("log_batches_old", with_stream=False)
    op.execute(
        f"INSERT INTO log_batches_old ({_COLUMNS}) SELECT {_COLUMNS} FROM log_batches WHERE stream = 'log'"
    )
    op.drop_table("log_batches")
    op.rename_table("log_batches_old", "log_batches")
