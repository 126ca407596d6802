"""arena votes: set_aside (why a vote is kept out of the leaderboard, e.g. an answer names its model);
arena battles: turns (the earlier turns of a multi-turn battle)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 21:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: Union[str, Sequence[str], None] = '0008'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('arena_votes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('set_aside', sa.String(length=300), nullable=True))
    with op.batch_alter_table('arena_battles', schema=None) as batch_op:
        batch_op.add_column(sa.Column('turns', sa.JSON(), nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('arena_battles', schema=None) as batch_op:
        batch_op.drop_column('turns')
    with op.batch_alter_table('arena_votes', schema=None) as batch_op:
        batch_op.drop_column('set_aside')
