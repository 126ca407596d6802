"""Alembic environment: the engine comes from `backend.db.migrate` (config.attributes), never a .ini.

On SQLite, foreign keys are OFF while migrations run. Batch mode alters a table by copying it and dropping the
old one; with foreign keys ON, that DROP TABLE deletes the old rows first and their ON DELETE CASCADE children
with them (migrations 0006 and 0007 lost every ranking item, candidate and ranking, and every SFT version, that
way). The PRAGMA is a no-op inside a transaction, so it is said on the raw connection before the migration
transaction begins; SQLite's own recipe for altering tables, whose last step, `PRAGMA foreign_key_check`,
refuses a migration that left a dangling reference.
"""
from alembic import context

from backend.db.models import Base

config = context.config
engine = config.attributes["engine"]


def include_object(obj, name, type_, reflected, compare_to):
    """Autogenerate ignores the search index's FTS5 tables (made by raw SQL in migration 0003)."""
    return not (type_ == "table" and name.startswith("documents_fts"))


def _sqlite_foreign_keys(connection, on: bool) -> None:
    raw = connection.connection.driver_connection  # the sqlite3 connection: no SQLAlchemy autobegin
    if raw.in_transaction:
        raise RuntimeError("PRAGMA foreign_keys must be set outside a transaction (inside one it does nothing)")
    raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _check_foreign_keys(ctx, step, heads, run_args) -> None:
    """After each migration, inside its transaction (SQLite runs one per migration): refuse dangling references."""
    bad = ctx.connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if bad:
        raise RuntimeError(f"migration {step.up_revision_id} left rows whose foreign key points nowhere "
                           f"(table, rowid, parent, fk): {[tuple(r) for r in bad[:10]]}")


with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        was_on = connection.connection.driver_connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        _sqlite_foreign_keys(connection, False)
    try:
        # render_as_batch: SQLite can only alter tables by copying them; batch mode does that portably.
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                          include_object=include_object, on_version_apply=[_check_foreign_keys] if sqlite else [])
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        if sqlite:
            connection.rollback()  # nothing is left open, so the PRAGMA below takes effect
            _sqlite_foreign_keys(connection, was_on)
