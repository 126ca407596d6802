"""ranking_sets.status: "open" sets are visible; an import stages its sets as "importing" and publishes
them with one short UPDATE (backend/labels/exchange.py)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 21:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: Union[str, Sequence[str], None] = '0009'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('ranking_sets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.String(length=16), nullable=False, server_default='open'))


def downgrade() -> None:
    with op.batch_alter_table('ranking_sets', schema=None) as batch_op:
        batch_op.drop_column('status')
