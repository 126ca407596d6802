"""arena battles and votes (backend.arena): one row per blind battle, at most one vote per battle

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 04:08:10.389694

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('arena_battles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('model_a', sa.String(length=200), nullable=False),
    sa.Column('model_b', sa.String(length=200), nullable=False),
    sa.Column('answer_a', sa.Text(), nullable=True),
    sa.Column('answer_b', sa.Text(), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('arena_battles', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_arena_battles_user_id'), ['user_id'], unique=False)

    op.create_table('arena_votes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('battle_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('winner', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['battle_id'], ['arena_battles.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('battle_id')
    )
    with op.batch_alter_table('arena_votes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_arena_votes_user_id'), ['user_id'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('arena_votes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_arena_votes_user_id'))

    op.drop_table('arena_votes')
    with op.batch_alter_table('arena_battles', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_arena_battles_user_id'))

    op.drop_table('arena_battles')
