"""round_jobs.resumes: how often an interrupted job was queued again

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 04:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing jobs were never resumed.
    with op.batch_alter_table('round_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resumes', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('round_jobs', schema=None) as batch_op:
        batch_op.drop_column('resumes')
