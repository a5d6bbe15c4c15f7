"""API replicas share one database: jobs and sandboxes name the replica that holds them, and a running
job carries its holder's last heartbeat, so another replica can tell a live holder from a dead one.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.Float, nullable=True))
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("owner", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("owner")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("owner")
