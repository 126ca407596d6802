"""SFT imports against a real server: streamed and staged in batches, published all at once, and a
refused or interrupted import leaves nothing visible (backend/labels/exchange.py)."""
from __future__ import annotations

import json

import httpx
from sqlalchemy import func, select

from backend.db import Database
from backend.db.models import SFTDemo, SFTVersion
from backend.labels import exchange
from backend.users import CurrentUser
from tests.conftest import start_server
from tests.helpers import add_user

ROW = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


def jsonl(n: int, bad_at: int | None = None) -> bytes:
    lines = [json.dumps(ROW) if i != bad_at else '{"messages": [{"role": "user"}]}' for i in range(1, n + 1)]
    return ("\n".join(lines) + "\n").encode()


def counts(db: Database) -> dict:
    with db.read() as s:
        rows = s.execute(select(SFTDemo.status, func.count()).group_by(SFTDemo.status)).all()
        return {status: n for status, n in rows} | {"versions": s.scalar(select(func.count()).select_from(SFTVersion))}


def test_a_bad_line_after_many_batches_leaves_nothing_and_a_good_file_publishes_all(tmp_path):
    data = tmp_path / "data"
    _, key = add_user(data, "op", "operator")
    server = start_server(data, "--no-preload", "--no-worker")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    try:
        n = 5 * exchange.STAGE_BATCH + 7
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            r = c.post("/api/imports/sft", content=jsonl(n, bad_at=n - 1))
            assert r.status_code == 422 and r.json()["detail"]["errors"][0]["line"] == n - 1
            assert counts(db) == {"versions": 0}  # nothing staged is left, nothing was ever visible
            r = c.post("/api/imports/sft", content=jsonl(n))
            assert r.status_code == 200 and r.json()["rows"] == n
            assert counts(db) == {"submitted": n, "versions": n}
            assert len(c.get("/api/exports/sft").text.splitlines()) == n
    finally:
        server.stop()
        db.close()


def test_rows_an_interrupted_import_staged_are_dropped_at_start(tmp_path):
    data = tmp_path / "data"
    add_user(data, "op", "operator")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    exchange._stage(db, CurrentUser(1, "op", "operator"), [(ROW["messages"], None)] * 3)  # what a kill -9 mid-import leaves
    assert counts(db) == {exchange.STAGED: 3, "versions": 3}
    server = start_server(data, "--no-preload", "--no-worker")
    try:
        assert counts(db) == {"versions": 0}
    finally:
        server.stop()
        db.close()
