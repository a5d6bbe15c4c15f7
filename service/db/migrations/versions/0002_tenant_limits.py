"""Tenants get CPU, storage and runtime limits (the service hardening).

A database upgraded before migrations existed may have them already (added then without a
migration); only the missing ones are added, with the defaults older tenants get.

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

COLUMNS = (
    sa.Column("max_cpus", sa.Float, nullable=False, server_default=sa.text("8")),
    sa.Column("max_storage", sa.String(16), nullable=False, server_default="20g"),
    sa.Column("runtime", sa.String(64), nullable=True),
)


def upgrade() -> None:
    present = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("tenants")}
    missing = [column for column in COLUMNS if column.name not in present]
    if missing:
        with op.batch_alter_table("tenants") as batch:
            for column in missing:
                batch.add_column(column)


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        for column in COLUMNS:
            batch.drop_column(column.name)
