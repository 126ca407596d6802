"""Imports of every kind: streamed and staged hidden in batches, published all at once; a refused or
interrupted import leaves nothing visible, and annotators' writes do not wait behind one
(backend/labels/exchange.py)."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from sqlalchemy import func, select

from backend.db import Database
from backend.db.models import Candidate, Ranking, RankingItem, RankingSet, SFTDemo, SFTVersion
from backend.labels import agreement, exchange, progress, rankings as rk, review, snapshots
from backend.labels.visibility import DEMO_VISIBLE, SET_VISIBLE
from backend.users import CurrentUser
from tests.conftest import start_server
from tests.helpers import add_user
from tests.test_labels_services import db, people  # noqa: F401 (fixtures: a migrated SQLite file, its users)

ROW = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}


def ranking_row(i: int) -> dict:
    k = 2 + i % 3  # three shapes, so an import stages three sets
    return {"prompt": f"prompt {i}", "candidates": [f"answer {i}.{j}" for j in range(k)], "ranking": list(range(k))[::-1]}


def preference_row(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]}


GOOD = {"sft": lambda i: ROW, "rankings": ranking_row, "preferences": preference_row}
BAD = {"sft": {"messages": [{"role": "user"}]}, "rankings": {"prompt": "p", "candidates": ["a", "b"], "ranking": [0, 0]},
       "preferences": {"prompt": "p", "chosen": "same", "rejected": "same"}}


def jsonl(kind: str, n: int, bad_at: int | None = None) -> bytes:
    lines = [json.dumps(GOOD[kind](i) if i != bad_at else BAD[kind]) for i in range(1, n + 1)]
    return ("\n".join(lines) + "\n").encode()


def counts(db: Database) -> dict:
    """Every row an import writes, visible (by status) or not ("staged": its import is not published)."""
    with db.read() as s:
        demos = s.execute(select(SFTDemo.status, func.count()).where(DEMO_VISIBLE).group_by(SFTDemo.status)).all()
        sets = s.execute(select(RankingSet.status, func.count()).where(SET_VISIBLE).group_by(RankingSet.status)).all()
        out = {f"demos {status}": n for status, n in demos} | {f"sets {status}": n for status, n in sets}
        for key, table, shown in (("demos staged", SFTDemo, DEMO_VISIBLE), ("sets staged", RankingSet, SET_VISIBLE)):
            if n := s.scalar(select(func.count()).select_from(table).where(~shown)):
                out[key] = n
        for table in (SFTVersion, RankingItem, Candidate, Ranking):
            if n := s.scalar(select(func.count()).select_from(table)):
                out[table.__tablename__] = n
        return out




def test_a_bad_last_line_after_many_batches_leaves_nothing_and_a_good_file_publishes_all(tmp_path):
    data = tmp_path / "data"
    _, key = add_user(data, "op", "operator")
    server = start_server(data, "--no-preload", "--no-worker")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    n = 5 * exchange.STAGE_BATCH + 7
    try:
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            for kind in exchange.KINDS:
                before, exported = counts(db), c.get(f"/api/exports/{kind}").text
                r = c.post(f"/api/imports/{kind}", content=jsonl(kind, n, bad_at=n))
                assert r.status_code == 422 and r.json()["detail"]["errors"][0]["line"] == n
                assert counts(db) == before  # nothing staged is left, nothing was ever visible
                assert c.get(f"/api/exports/{kind}").text == exported
                r = c.post(f"/api/imports/{kind}", content=jsonl(kind, n))
                assert r.status_code == 200 and r.json()["rows"] == n
                assert len(c.get(f"/api/exports/{kind}").text.splitlines()) == len(exported.splitlines()) + n
                if kind != "sft":
                    assert r.json()["set_ids"] == [s["id"] for s in c.get("/api/ranking-sets").json()][-len(r.json()["set_ids"]):]
            ranked = sum(len(ranking_row(i)["candidates"]) for i in range(1, n + 1))
            assert counts(db) == {"demos submitted": n, "sft_versions": n, "sets open": 3 + 1, "ranking_items": 2 * n,
                                  "rankings": 2 * n, "candidates": ranked + 2 * n}
    finally:
        server.stop()
        db.close()


def test_an_import_whose_reader_fails_midway_leaves_nothing(db, people):
    def lines():  # the client goes away after a few batches were staged
        yield from jsonl("rankings", 3 * exchange.STAGE_BATCH).splitlines()
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        exchange.import_lines(db, people["op"], "rankings", lines())
    assert counts(db) == {}


def test_what_a_killed_import_staged_is_invisible_everywhere_and_dropped_at_start(tmp_path):
    data = tmp_path / "data"
    add_user(data, "op", "operator")
    add_user(data, "ann", "annotator")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    op, ann = CurrentUser(1, "op", "operator"), CurrentUser(2, "ann", "annotator")
    # What a kill -9 mid-import leaves: batches written, never published.
    demos = exchange._SFTStager(db, op, "sft", "killed")
    demos.batch = [(ROW["messages"], "pending")] * 3
    demos.flush()
    sets = exchange._RankingStager(db, op, "rankings", "killed")
    sets.batch = [exchange._check_row("rankings", ranking_row(i)) for i in range(7)]
    sets.flush()
    staged_set = min(set_id for set_id, _ in sets.sets.values())
    assert counts(db)["sets staged"] == 3 and counts(db)["demos staged"] == 3
    with db.read() as s:
        item = s.scalar(select(RankingItem).where(RankingItem.set_id == staged_set))
        cand = s.scalar(select(Candidate.id).where(Candidate.item_id == item.id))
    assert rk.list_sets(db) == [] and rk.next_item(db, ann) is None and rk.my_rankings(db, op) == []
    for kind in exchange.KINDS:
        assert exchange.export(db, kind) == []
        with pytest.raises(ValueError, match="empty"):
            snapshots.create_snapshot(db, data, op, kind)
    for look in (lambda: rk.get_item(db, ann, item.id), lambda: rk.submit(db, ann, item.id, [], all_bad=True),
                 lambda: progress.set_progress(db, staged_set), lambda: agreement.set_agreement(db, staged_set),
                 lambda: review.flag_candidate(db, ann, cand, "spam")):
        with pytest.raises(LookupError):
            look()
    server = start_server(data, "--no-preload", "--no-worker")
    try:
        assert counts(db) == {}
    finally:
        server.stop()
        db.close()


def test_an_annotators_submit_completes_while_a_big_import_is_in_progress(db, people):
    op, ann = people["op"], people["ann"]
    mine = rk.create_set(db, op, "open set", ["rank me"], [["a", "b", "c", "d"]])
    midway, release, submitted = threading.Event(), threading.Event(), threading.Event()
    result: dict = {}

    def lines():  # an import paused (as a slow big file is) after several batches were written
        rows = jsonl("rankings", 10 * exchange.STAGE_BATCH).splitlines()
        yield from rows[:4 * exchange.STAGE_BATCH + 1]
        midway.set()
        release.wait()
        yield from rows[4 * exchange.STAGE_BATCH + 1:]

    def run_import():
        result["import"] = exchange.import_lines(db, op, "rankings", lines(), name="big")

    def annotate():
        item = rk.next_item(db, ann)
        result["item"] = item
        result["submit"] = rk.submit(db, ann, item["item_id"], [c["id"] for c in item["candidates"]])
        submitted.set()

    importer = threading.Thread(target=run_import)
    importer.start()
    try:
        assert midway.wait(120)
        assert counts(db)["sets staged"] == 3  # the import has written, and is still going
        annotator = threading.Thread(target=annotate)
        annotator.start()
        # The import cannot finish before `release`: the submit completing here means it waited for no
        # more than one batch. (Were the import one transaction, it would wait until release, i.e. forever.)
        assert submitted.wait(120)
        assert importer.is_alive() and "import" not in result
        assert result["item"]["set_id"] == mine["id"] and result["submit"]["revision"] == 1
        assert rk.next_item(db, ann) is None  # the staged sets are nobody's work yet
        assert [s["id"] for s in rk.list_sets(db)] == [mine["id"]]
    finally:
        release.set()
        importer.join()
    assert result["import"]["rows"] == 10 * exchange.STAGE_BATCH
    assert [s["id"] for s in rk.list_sets(db)] == [mine["id"], *result["import"]["set_ids"]]
    assert counts(db)["sets open"] == 4
