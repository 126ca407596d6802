"""Alembic environment: the engine comes from `backend.db.migrate` (config.attributes), never a .ini."""
from alembic import context

from backend.db.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.connect() as connection:
    # render_as_batch: SQLite can only alter tables by copying them; batch mode does that portably.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
