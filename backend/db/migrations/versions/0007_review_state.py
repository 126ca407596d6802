"""review of SFT demos (state, reviewer, note) and flags on ranking candidates

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 12:40:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('sft_demos', schema=None) as batch_op:
        batch_op.add_column(sa.Column('review', sa.String(length=16), nullable=False, server_default='pending'))
        batch_op.add_column(sa.Column('reviewed_by', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('review_note', sa.Text(), nullable=False, server_default=''))
        batch_op.create_foreign_key('fk_sft_demos_reviewed_by_users', 'users', ['reviewed_by'], ['id'])
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.add_column(sa.Column('flags', sa.JSON(), nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('candidates', schema=None) as batch_op:
        batch_op.drop_column('flags')
    with op.batch_alter_table('sft_demos', schema=None) as batch_op:
        batch_op.drop_constraint('fk_sft_demos_reviewed_by_users', type_='foreignkey')
        batch_op.drop_column('review_note')
        batch_op.drop_column('reviewed_by')
        batch_op.drop_column('review')
