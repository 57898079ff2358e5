"""privacy_ledger: each DP round's draw on a dataset's privacy budget

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'privacy_ledger',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('dataset_fingerprint', sa.String(length=64), nullable=False),
        sa.Column('dataset', sa.String(length=64), nullable=False),
        sa.Column('round_id', sa.String(length=128), nullable=False),
        sa.Column('requester', sa.String(length=200), nullable=False),
        sa.Column('plan_hash', sa.String(length=64), nullable=False),
        sa.Column('noise_multiplier', sa.Float(), nullable=False),
        sa.Column('sample_rate', sa.Float(), nullable=False),
        sa.Column('max_grad_norm', sa.Float(), nullable=False),
        sa.Column('planned_steps', sa.Integer(), nullable=False),
        sa.Column('steps', sa.Integer(), nullable=True),
        sa.Column('delta', sa.Float(), nullable=False),
        sa.Column('accountant', sa.String(length=8), nullable=False),
        sa.Column('epsilon_after', sa.Float(), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('reserved_at', sa.String(length=40), nullable=False),
        sa.Column('settled_at', sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('round_id'),
    )
    with op.batch_alter_table('privacy_ledger', schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f('ix_privacy_ledger_dataset_fingerprint'), ['dataset_fingerprint'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('privacy_ledger', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_privacy_ledger_dataset_fingerprint'))
    op.drop_table('privacy_ledger')
