"""Alembic driven from code (no alembic.ini): `upgrade(engine)`, `current(engine)`, `new_revision(msg)`.

    python -m backend.db.migrate upgrade [--database-url URL]
    python -m backend.db.migrate revision -m "add a column"   # autogenerate against the models
"""
from __future__ import annotations

import argparse

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine


def alembic_config(engine: Engine | None = None) -> Config:
    from backend.db import MIGRATIONS_DIR
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> str:
    command.upgrade(alembic_config(engine), revision)
    return current(engine)


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def main(argv: list[str] | None = None) -> None:
    from backend.config import AppConfig
    from backend.db import Database
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["upgrade", "current", "revision"])
    p.add_argument("--database-url", default=None)
    p.add_argument("-m", "--message", default="schema change")
    args = p.parse_args(argv)
    db = Database(args.database_url or AppConfig().database_url)
    if args.action == "upgrade":
        print(upgrade(db.engine))
    elif args.action == "current":
        print(current(db.engine))
    else:
        command.revision(alembic_config(db.engine), message=args.message, autogenerate=True)


if __name__ == "__main__":
    main()
