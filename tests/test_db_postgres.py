"""The same store on PostgreSQL: a throwaway cluster (initdb in a temp dir, Unix socket only) when the
PostgreSQL server binaries and the psycopg driver are installed; skipped, saying why, otherwise.
Set PLAYGROUND_TEST_POSTGRES_URL to use an existing server instead."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from argon2 import PasswordHasher

from backend import users
from backend.db import Database
from backend.db.models import Base
from backend.labels import agreement, exchange, progress, rankings as rk, sft, snapshots

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed")


def _as_postgres(cmd: list[str]) -> list[str]:
    # The server refuses to run as root; run it as the `postgres` system user then.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    url = os.environ.get("PLAYGROUND_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    bindir = os.path.dirname(bins[-1])
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="playground-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run(_as_postgres([f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "pg"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                                 f"-p 55432 -k {root} -c listen_addresses=''", "start"]), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://pg@/postgres?host={root}&port=55432"
    finally:
        subprocess.run(_as_postgres([f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def empty_database(pg_server: str) -> Database:
    """A new database on the throwaway server, no tables yet."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = Database(pg_server)
    with admin.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.close()
    return Database(pg_server.replace("/postgres?", f"/{name}?"))


def fresh_database(pg_server: str) -> Database:
    """A new, migrated database on the throwaway server."""
    d = empty_database(pg_server)
    d.migrate()
    return d


@pytest.fixture
def db(pg_server):
    """A fresh database on the server for each test."""
    d = fresh_database(pg_server)
    yield d
    d.close()


@pytest.fixture
def people(db, monkeypatch):
    monkeypatch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024))
    return {n: users.add_user(db, n, r)[0] for n, r in [("op", "operator")] + [(f"a{i}", "annotator") for i in range(12)]}


def test_migrations_build_the_models_schema_on_postgres(db):
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_object": lambda o, n, t, r, c: t != "table" or n in Base.metadata.tables})
        diff = [d for d in compare_metadata(ctx, Base.metadata) if not (isinstance(d, tuple) and d[0] == "remove_index")]
    assert diff == []


def test_label_services_on_postgres(db, people, tmp_path):
    s = rk.create_set(db, people["op"], "pg", ["Write a joke about pelicans", "p2"],
                      [[f"c{j}" for j in range(4)]] * 2, annotators_per_item=12)

    def annotate(name):
        u = people[name]
        n = 0
        while (item := rk.next_item(db, u, s["id"])) is not None:
            rk.submit(db, u, item["item_id"], [c["id"] for c in item["candidates"]][::-1])
            n += 1
        return n

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(annotate, [f"a{i}" for i in range(12)])) == [2] * 12
    assert progress.set_progress(db, s["id"])["items_done"] == 2
    assert agreement.set_agreement(db, s["id"], "ranked_pairs")["mean_pairwise_tau"] == 1.0
    assert len(exchange.export(db, "preferences", s["id"])) == 2 * 12 * 6
    d = sft.save(db, people["a0"], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], submit=True)
    sft.save(db, people["a0"], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
             demo_id=d["demo_id"], submit=True)
    assert len(sft.get(db, people["a0"], d["demo_id"])["history"]) == 2
    with pytest.raises(exchange.ImportRefused):
        exchange.import_jsonl(db, people["op"], "rankings",
                              '{"prompt": "p", "candidates": ["a", "b"], "ranking": [1, 0]}\n{"prompt": ""}\n')
    assert len(rk.list_sets(db)) == 1  # nothing partly imported
    snap = snapshots.create_snapshot(db, tmp_path, people["op"], "sft")
    assert snapshots.read_snapshot(db, snap["hash"]) == exchange.export(db, "sft")


def test_imports_stage_hidden_publish_and_drop_on_postgres(db, people):
    op = people["op"]
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    killed = exchange._SFTStager(db, op, "sft", "killed")  # what a kill -9 mid-import leaves
    killed.batch = [(row["messages"], "pending")] * 3
    killed.flush()
    sets = exchange._RankingStager(db, op, "rankings", "killed")
    sets.batch = [exchange._check_row("rankings", {"prompt": f"p{i}", "candidates": ["a", "b"], "ranking": [1, 0]})
                  for i in range(3)]
    sets.flush()
    assert exchange.export(db, "sft") == [] and rk.list_sets(db) == [] and sft.list_mine(db, op) == []
    n = 2 * exchange.STAGE_BATCH + 1
    out = exchange.import_jsonl(db, op, "sft", "\n".join(json.dumps(row) for _ in range(n)))
    assert out["rows"] == n and len(exchange.export(db, "sft")) == n
    assert exchange.drop_staged(db) == 2
    assert len(exchange.export(db, "sft")) == n and rk.list_sets(db) == []
    with db.read() as s:
        from sqlalchemy import func, select

        from backend.db.models import Import, RankingSet, SFTDemo
        assert s.scalar(select(func.count()).select_from(SFTDemo)) == n
        assert s.scalar(select(func.count()).select_from(RankingSet)) == 0
        assert sorted(s.scalars(select(Import.state))) == ["dropped", "dropped", "published"]


def test_migration_0011_moves_the_old_schemes_leftovers_to_a_staging_import_on_postgres(pg_server):
    """The same upgrade as on SQLite (tests/test_imports.py): rows an interrupted import left with status
    "importing" become a staging import's rows, hidden, and are dropped at start."""
    from tests.test_imports import check_0011_converts_old_leftovers
    d = empty_database(pg_server)
    try:
        check_0011_converts_old_leftovers(d)
    finally:
        d.close()
