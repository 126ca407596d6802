"""ranking_items: one index on (set_id, position) for the ranking queue (replaces the set_id index)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 04:45:00

"""
from typing import Sequence, Union

from alembic import op


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # The queue (backend.labels.rankings.next_item) walks a set's items in position order and stops at the
    # first that qualifies; with only an index on set_id, SQLite evaluated every item and then sorted.
    # The new index starts with set_id, so the old one is redundant.
    with op.batch_alter_table('ranking_items', schema=None) as batch_op:
        batch_op.create_index('ix_ranking_items_set_id_position', ['set_id', 'position'], unique=False)
        batch_op.drop_index('ix_ranking_items_set_id')


def downgrade() -> None:
    with op.batch_alter_table('ranking_items', schema=None) as batch_op:
        batch_op.create_index('ix_ranking_items_set_id', ['set_id'], unique=False)
        batch_op.drop_index('ix_ranking_items_set_id_position')
