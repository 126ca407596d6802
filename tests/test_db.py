"""The database layer against a real SQLite file: migrations, pragmas, constraints."""
from __future__ import annotations

import sqlite3

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from backend.db import Database
from backend.db.models import Base, Candidate, User


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'labels.db'}")
    d.migrate()
    yield d
    d.close()


def only_model_tables(obj, name, type_, reflected, compare_to):
    """Compare the tables the models declare; raw-SQL helpers (the search index's FTS5 tables) are not models."""
    return type_ != "table" or name in Base.metadata.tables


def test_migration_builds_exactly_the_models_schema(db):
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_object": only_model_tables})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations disagree; add a migration: {diff}"


def test_migrate_is_idempotent_and_records_head(db):
    from alembic.script import ScriptDirectory
    from backend.db.migrate import alembic_config
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    first = db.migrate()
    assert first == db.migrate() == head


def test_every_connection_has_wal_foreign_keys_and_busy_timeout(db):
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
    with db.read_conn() as conn:  # reads have their own engine; its connections get the same setup
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_write_takes_the_lock_at_begin_and_a_read_does_not_wait_for_it(db):
    """Writers say BEGIN IMMEDIATE (through the dialect's begin hook), readers a plain BEGIN."""
    other = sqlite3.connect(db.engine.url.database, timeout=0, isolation_level=None)
    with db.write_conn():  # nothing written yet, yet the write lock is held
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        with db.read_conn() as conn:
            assert conn.execute(text("select count(*) from users")).scalar() == 0
    with db.read_conn() as conn:
        conn.execute(text("select count(*) from users")).scalar()
        other.execute("BEGIN IMMEDIATE")  # a reader holds no write lock
        other.execute("ROLLBACK")
    other.close()


def test_foreign_keys_are_enforced(db):
    with pytest.raises(IntegrityError):
        with db.session() as s:
            s.add(Candidate(item_id=999, position=0, text="orphan"))
    with db.read() as s:
        assert s.execute(text("select count(*) from candidates")).scalar() == 0


def test_a_failed_transaction_leaves_nothing(db):
    with pytest.raises(RuntimeError):
        with db.session() as s:
            s.add(User(name="half", role="annotator", password_hash="x", api_key_hash="y"))
            s.flush()
            raise RuntimeError("crash mid-way")
    # Read with the plain sqlite3 module, as another process would.
    con = sqlite3.connect(db.engine.url.database)
    assert con.execute("select count(*) from users").fetchone()[0] == 0


def test_upgrading_an_old_database_keeps_the_children_of_the_tables_batch_mode_copies(tmp_path):
    """Migrations 0006 (ranking_sets), 0007 (sft_demos) and 0011 (both) alter a table on SQLite by copying it
    and dropping the old one; with foreign keys on, that DROP cascaded to the children (env.py turns them off)."""
    from backend.db.migrate import current, upgrade
    d = Database(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        assert upgrade(d.engine, "0005") == "0005"
        now = "2026-01-01 00:00:00"
        with d.engine.begin() as conn:
            for sql in (
                "INSERT INTO users VALUES (1, 'ann', 'annotator', 'x', 'y', 1, :now)",
                "INSERT INTO ranking_sets VALUES (1, 'old set', 'm', 1.0, 4, 1, 1, :now)",
                "INSERT INTO ranking_items VALUES (1, 1, 0, 'a prompt')",
                "INSERT INTO candidates VALUES (1, 1, 0, 'one', 'm'), (2, 1, 1, 'two', 'm')",
                "INSERT INTO rankings VALUES (1, 1, 1, '[2, 1]', 0, 0, 1, :now, :now)",
                "INSERT INTO sft_demos VALUES (1, 1, NULL, 'submitted', '[]', :now, :now)",
                "INSERT INTO sft_versions VALUES (1, 1, 1, '[]', 1, :now)",
            ):
                conn.execute(text(sql), {"now": now})
        d.migrate()
        with d.engine.connect() as conn:
            counts = {t: conn.execute(text(f"select count(*) from {t}")).scalar()
                      for t in ("ranking_sets", "ranking_items", "candidates", "rankings", "sft_demos", "sft_versions")}
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on after the migration
        assert counts == {"ranking_sets": 1, "ranking_items": 1, "candidates": 2, "rankings": 1, "sft_demos": 1,
                          "sft_versions": 1}
        assert current(d.engine) == d.migrate()
    finally:
        d.close()
