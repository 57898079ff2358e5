"""round_jobs.update_fetched_at, update_removed_at: the retention of released updates

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 04:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: updates released before this revision count as not yet fetched.
    with op.batch_alter_table('round_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('update_fetched_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('update_removed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('round_jobs', schema=None) as batch_op:
        batch_op.drop_column('update_removed_at')
        batch_op.drop_column('update_fetched_at')
