"""Alembic environment: the engine comes from `backend.db.migrate` (config.attributes), never a .ini."""
from alembic import context

from backend.db.models import Base

config = context.config
engine = config.attributes["engine"]


def include_object(obj, name, type_, reflected, compare_to):
    """Autogenerate ignores the search index's FTS5 tables (made by raw SQL in migration 0003)."""
    return not (type_ == "table" and name.startswith("documents_fts"))


with engine.connect() as connection:
    # render_as_batch: SQLite can only alter tables by copying them; batch mode does that portably.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      include_object=include_object)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
