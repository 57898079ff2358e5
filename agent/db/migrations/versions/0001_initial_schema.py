"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 04:03:14.521211
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_by', sa.String(length=200), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_sha256')
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index('uq_api_tokens_active_name', ['name'], unique=True, sqlite_where=sa.text('revoked_at IS NULL'), postgresql_where=sa.text('revoked_at IS NULL'))

    op.create_table('audit_chain_head',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('last_id', sa.Integer(), nullable=False),
    sa.Column('last_hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('ts', sa.String(length=40), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('action', sa.String(length=100), nullable=False),
    sa.Column('details', sa.Text(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_action'), ['action'], unique=False)

    op.create_table('catalog_datasets',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('root', sa.Text(), nullable=False),
    sa.Column('modalities', sa.JSON(), nullable=False),
    sa.Column('target_labels', sa.JSON(), nullable=False),
    sa.Column('val_fraction', sa.Float(), nullable=False),
    sa.Column('key_id', sa.String(length=64), nullable=False),
    sa.Column('path_key_file', sa.Text(), nullable=False),
    sa.Column('stats', sa.JSON(), nullable=False),
    sa.Column('scanned_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('plan_approvals',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('plan_hash', sa.String(length=64), nullable=False),
    sa.Column('approved_by', sa.String(length=200), nullable=False),
    sa.Column('approved_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_by', sa.String(length=200), nullable=True),
    sa.Column('note', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('plan_approvals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_plan_approvals_plan_hash'), ['plan_hash'], unique=False)

    op.create_table('round_jobs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('round_id', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('dataset', sa.String(length=128), nullable=False),
    sa.Column('plan_json', sa.Text(), nullable=False),
    sa.Column('plan_hash', sa.String(length=64), nullable=False),
    sa.Column('weights_sha256', sa.String(length=64), nullable=True),
    sa.Column('weights_path', sa.Text(), nullable=True),
    sa.Column('job_dir', sa.Text(), nullable=False),
    sa.Column('progress_json', sa.Text(), nullable=False),
    sa.Column('metrics_json', sa.Text(), nullable=False),
    sa.Column('num_samples', sa.Integer(), nullable=True),
    sa.Column('update_sha256', sa.String(length=64), nullable=True),
    sa.Column('update_nbytes', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('worker_pid', sa.Integer(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('kind', 'round_id', name='uq_round_jobs_kind_round_id')
    )
    with op.batch_alter_table('round_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_round_jobs_round_id'), ['round_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_round_jobs_status'), ['status'], unique=False)

    op.create_table('catalog_files',
    sa.Column('dataset', sa.String(length=64), nullable=False),
    sa.Column('path_key', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['dataset'], ['catalog_datasets.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dataset', 'path_key')
    )
    op.create_table('catalog_items',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('dataset', sa.String(length=64), nullable=False),
    sa.Column('item_key', sa.String(length=64), nullable=False),
    sa.Column('subject_key', sa.String(length=64), nullable=False),
    sa.Column('split', sa.String(length=8), nullable=False),
    sa.Column('fmt', sa.String(length=16), nullable=False),
    sa.Column('images', sa.JSON(), nullable=False),
    sa.Column('label', sa.Text(), nullable=True),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('shape', sa.JSON(), nullable=False),
    sa.Column('spacing', sa.JSON(), nullable=False),
    sa.Column('label_fraction', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['dataset'], ['catalog_datasets.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dataset', 'item_key', name='uq_catalog_items_dataset_item')
    )
    with op.batch_alter_table('catalog_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_catalog_items_dataset'), ['dataset'], unique=False)
        batch_op.create_index(batch_op.f('ix_catalog_items_subject_key'), ['subject_key'], unique=False)

    op.create_table('catalog_volumes',
    sa.Column('dataset', sa.String(length=64), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('shape', sa.JSON(), nullable=False),
    sa.Column('spacing', sa.JSON(), nullable=False),
    sa.Column('patient_key', sa.String(length=64), nullable=True),
    sa.Column('label_counts', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['dataset'], ['catalog_datasets.name'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dataset', 'checksum')
    )


def downgrade() -> None:
    op.drop_table('catalog_volumes')
    with op.batch_alter_table('catalog_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_catalog_items_subject_key'))
        batch_op.drop_index(batch_op.f('ix_catalog_items_dataset'))

    op.drop_table('catalog_items')
    op.drop_table('catalog_files')
    with op.batch_alter_table('round_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_round_jobs_status'))
        batch_op.drop_index(batch_op.f('ix_round_jobs_round_id'))

    op.drop_table('round_jobs')
    with op.batch_alter_table('plan_approvals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_plan_approvals_plan_hash'))

    op.drop_table('plan_approvals')
    op.drop_table('catalog_datasets')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_action'))

    op.drop_table('audit_events')
    op.drop_table('audit_chain_head')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index('uq_api_tokens_active_name', sqlite_where=sa.text('revoked_at IS NULL'), postgresql_where=sa.text('revoked_at IS NULL'))

    op.drop_table('api_tokens')
