"""catalog_items.warnings and catalog_volumes.warnings: each subject's volume warnings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 04:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows scanned before this revision have no recorded warnings; the next scan reads their
    # volumes again (VOLUME_CHECKS in agent/data/catalog.py) and fills them in.
    with op.batch_alter_table('catalog_items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('warnings', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
    with op.batch_alter_table('catalog_volumes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('warnings', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('catalog_volumes', schema=None) as batch_op:
        batch_op.drop_column('warnings')
    with op.batch_alter_table('catalog_items', schema=None) as batch_op:
        batch_op.drop_column('warnings')
