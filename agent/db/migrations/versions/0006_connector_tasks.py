"""connector_tasks: what the outbound connector was doing with each relay task

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 06:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'connector_tasks',
        sa.Column('task_id', sa.String(length=64), nullable=False),
        sa.Column('lease_id', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('job_id', sa.String(length=128), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('update_sha256', sa.String(length=64), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('task_id'),
    )
    with op.batch_alter_table('connector_tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_connector_tasks_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_connector_tasks_state'), ['state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('connector_tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_connector_tasks_state'))
        batch_op.drop_index(batch_op.f('ix_connector_tasks_job_id'))
    op.drop_table('connector_tasks')
