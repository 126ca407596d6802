"""imports: one row per JSONL import; sft_demos.import_id and ranking_sets.import_id name the import that wrote
them, and such rows are visible only once their import is "published" (backend/labels/visibility.py), so
publishing is one UPDATE of one row whatever the import's size (backend/labels/exchange.py)

Rows the old scheme left staged (status "importing": an import killed before it published) move to an import
in state "staging" with their normal status, so `drop_staged` removes them at the next start, as before.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 14:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0011'
down_revision: Union[str, Sequence[str], None] = '0010'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

OLD_STAGED = 'importing'


def upgrade() -> None:
    op.create_table(
        'imports',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('user_id', sa.Integer(), nullable=True),
        sa.Column('state', sa.String(length=16), nullable=False, server_default='staging'),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('rows', sa.Integer(), nullable=False, server_default='0'),
        sa.ForeignKeyConstraint(['user_id'], ['users.id'], name='fk_imports_user_id_users'),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('imports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_imports_state'), ['state'], unique=False)
    # On SQLite, adding a foreign key copies the table (batch mode); env.py turns foreign keys off around the
    # migration so that dropping the old copy does not cascade to sft_versions / ranking_items.
    for table in ('sft_demos', 'ranking_sets'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('import_id', sa.Integer(), nullable=True))
            batch_op.create_index(batch_op.f(f'ix_{table}_import_id'), ['import_id'], unique=False)
            batch_op.create_foreign_key(f'fk_{table}_import_id_imports', 'imports', ['import_id'], ['id'])

    conn = op.get_bind()
    imports = sa.table('imports', sa.column('id', sa.Integer), sa.column('kind', sa.String),
                       sa.column('name', sa.String), sa.column('state', sa.String),
                       sa.column('created_at', sa.DateTime(timezone=True)), sa.column('rows', sa.Integer))
    for table, kind, status in (('sft_demos', 'sft', 'submitted'), ('ranking_sets', 'rankings', 'open')):
        t = sa.table(table, sa.column('status', sa.String), sa.column('import_id', sa.Integer))
        if not conn.execute(sa.select(sa.func.count()).select_from(t).where(t.c.status == OLD_STAGED)).scalar():
            continue
        conn.execute(sa.insert(imports).values(kind=kind, name='left staged by an interrupted import',
                                               state='staging', created_at=sa.func.current_timestamp(), rows=0))
        import_id = conn.execute(sa.select(sa.func.max(imports.c.id))).scalar_one()
        conn.execute(sa.update(t).where(t.c.status == OLD_STAGED).values(import_id=import_id, status=status))


def downgrade() -> None:
    conn = op.get_bind()
    # Rows of imports not published go back to the old scheme's hidden status.
    for table, status in (('sft_demos', OLD_STAGED), ('ranking_sets', OLD_STAGED)):
        conn.execute(sa.text(f"UPDATE {table} SET status = :s WHERE import_id IN "
                             "(SELECT id FROM imports WHERE state != 'published')"), {'s': status})
    for table in ('ranking_sets', 'sft_demos'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f'fk_{table}_import_id_imports', type_='foreignkey')
            batch_op.drop_index(batch_op.f(f'ix_{table}_import_id'))
            batch_op.drop_column('import_id')
    with op.batch_alter_table('imports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_imports_state'))
    op.drop_table('imports')
