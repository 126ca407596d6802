"""The database: engines, session factories and migrate-on-start.

    db = Database("sqlite:////path/playground.db")   # or a postgresql:// URL
    db.migrate()                                      # Alembic upgrade to head
    with db.session() as s: ...                       # one transaction, committed on exit

SQLite gets WAL, foreign keys and a busy timeout on every connection, and write transactions start
with BEGIN IMMEDIATE so concurrent writers queue on the busy timeout instead of failing mid-way;
reads go through a second engine (plain BEGIN, its own pool) and never wait for a writer.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from backend.db.models import Base  # noqa: F401  (re-exported for callers)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def _sqlite_engine(url: str, begin: str, pool_size: int) -> Engine:
    """An engine whose every connection has WAL, foreign keys, a busy timeout, and whose transactions
    start with `begin` ("BEGIN IMMEDIATE" for writers, "BEGIN" for readers)."""
    # FastAPI runs sync handlers on a thread pool; connections move between threads. Connections beyond
    # pool_size are closed on return, so pool_size covers the thread pool (40): no reconnects under load.
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
                           pool_size=pool_size, max_overflow=32)

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
        # No checkpoint inside a commit: SQLite's automatic one runs in the connection whose commit crossed
        # 1000 WAL pages, here while it holds the process's write mutex, so an annotator's submit could pay
        # for copying an import's megabytes into the database. `_Checkpointer` does it beside the writers.
        cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    # A deferred BEGIN that reads and then writes can fail with SQLITE_BUSY at once when another
    # writer got in between; IMMEDIATE takes the write lock up front and waits for it instead.
    # Said through the dialect's begin hook rather than a "begin" event: any connection-level event
    # listener makes SQLAlchemy dispatch events around every statement (a third of a cheap query's cost).
    engine.dialect.do_begin = lambda dbapi_conn: dbapi_conn.execute(begin)
    return engine


class _Checkpointer:
    """Moves the WAL into the database file every `every` seconds on a connection of its own, with a PASSIVE
    checkpoint: it takes no write lock, so writers and readers never wait for it (they would for the automatic
    checkpoint, which runs inside the commit that crosses the WAL's size limit)."""

    def __init__(self, path: str, every: float = 0.5):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(path, every, self.stop), daemon=True,
                                       name="sqlite-checkpoint")
        self.thread.start()

    @staticmethod
    def _run(path: str, every: float, stop: threading.Event) -> None:
        import sqlite3
        conn = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            while not stop.wait(every):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error:  # busy or gone: the next round tries again
                    pass
        finally:
            conn.close()


class Database:
    def __init__(self, url: str):
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # Writers queue on a mutex (below) before they take a connection, so they need few;
            # readers never wait for a writer (WAL) and get a pool as large as the thread pool.
            self.engine = _sqlite_engine(url, "BEGIN IMMEDIATE", pool_size=4)
            self._read_engine = _sqlite_engine(url, "BEGIN", pool_size=40)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
            self._read_engine = self.engine
        self._write_lock = threading.RLock() if self.is_sqlite else nullcontext()
        self._checkpointer = None
        if self.is_sqlite and parsed.database and parsed.database != ":memory:":
            self._checkpointer = _Checkpointer(parsed.database)
            weakref.finalize(self, self._checkpointer.stop.set)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
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
        if self._checkpointer is not None:
            self._checkpointer.stop.set()
        self.engine.dispose()
        self._read_engine.dispose()
