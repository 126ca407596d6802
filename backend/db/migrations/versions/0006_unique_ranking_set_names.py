"""ranking_sets.name is unique: operators pick sets by name, so two sets may not share one

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 12:20:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Sets made before the rule may share a name: every duplicate but the oldest gets " (set N)" appended.
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, name FROM ranking_sets ORDER BY id")).all()
    seen = set()
    for set_id, name in rows:
        if name in seen:
            conn.execute(sa.text("UPDATE ranking_sets SET name = :n WHERE id = :i"),
                         {"n": f"{name[:180]} (set {set_id})", "i": set_id})
        seen.add(name)
    with op.batch_alter_table('ranking_sets', schema=None) as batch_op:
        batch_op.create_unique_constraint('uq_ranking_sets_name', ['name'])


def downgrade() -> None:
    with op.batch_alter_table('ranking_sets', schema=None) as batch_op:
        batch_op.drop_constraint('uq_ranking_sets_name', type_='unique')
