"""model_evals: report cards of registered models (backend.evals), newest per model compared side by side

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 21:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('model_evals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('rows', sa.JSON(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('model_evals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_evals_model'), ['model'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('model_evals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_evals_model'))
    op.drop_table('model_evals')
