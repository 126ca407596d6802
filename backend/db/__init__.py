"""The database: one engine, a session factory and migrate-on-start.

    db = Database("sqlite:////path/playground.db")   # or a postgresql:// URL
    db.migrate()                                      # Alembic upgrade to head
    with db.session() as s: ...                       # one transaction, committed on exit

SQLite gets WAL, foreign keys and a busy timeout on every connection, and write transactions start
with BEGIN IMMEDIATE so concurrent writers queue on the busy timeout instead of failing mid-way.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from backend.db.models import Base  # noqa: F401  (re-exported for callers)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Take transaction control from the sqlite3 module so we can say BEGIN IMMEDIATE ourselves.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # NORMAL in WAL mode: a committed transaction survives a killed process (SIGKILL, OOM);
        # only a power cut can lose the last few commits. FULL would fsync every commit.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A deferred BEGIN that reads and then writes can fail with SQLITE_BUSY at once when another
        # writer got in between; IMMEDIATE takes the write lock up front and waits for it instead.
        readonly = conn.get_execution_options().get("readonly", False)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class Database:
    def __init__(self, url: str):
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict = {}
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # FastAPI runs sync handlers on a thread pool; connections move between threads.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
            kwargs["pool_size"] = 8
            kwargs["max_overflow"] = 32
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _sqlite_setup(self.engine)
        self._write_lock = threading.RLock() if self.is_sqlite else nullcontext()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = self.engine.execution_options(readonly=True)
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        # SQLite has one writer at a time. Threads of this process queue on a mutex and are woken the
        # moment it is free; without it they would poll SQLite's busy handler, which sleeps up to
        # 100 ms between tries and makes the latency tail long. Other processes still meet the busy timeout.
        with self._write_lock:
            with self._sessions.begin() as s:
                yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (on SQLite: does not take the write lock)."""
        with self._read_sessions() as s:
            yield s

    # Core connections for hot paths (the ranking queue, API-key checks), where ORM overhead dominates.
    @contextmanager
    def write_conn(self) -> Iterator[Connection]:
        with self._write_lock:
            with self.engine.begin() as conn:
                yield conn

    @contextmanager
    def read_conn(self) -> Iterator[Connection]:
        with self._read_engine.connect() as conn:
            yield conn

    def migrate(self) -> str:
        """Upgrade the schema to the newest migration; returns the revision now in place."""
        from backend.db.migrate import upgrade
        return upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()
