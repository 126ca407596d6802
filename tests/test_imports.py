"""Imports of every kind: streamed and staged hidden in batches, published all at once; a refused or
interrupted import leaves nothing visible, and annotators' writes do not wait behind one
(backend/labels/exchange.py)."""
from __future__ import annotations

import json
import re
import threading

import httpx
import pytest
from sqlalchemy import func, select, update

from backend.db import Database
from backend.db.models import Candidate, Import, Ranking, RankingItem, RankingSet, SFTDemo, SFTVersion
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


class PausedImport:
    """An import in its own thread that stops after `pause_after` lines (as a slow big file does) until released."""

    def __init__(self, db, user, kind: str, n: int, pause_after: int, name: str = "paused"):
        self.midway, self.release, self.result = threading.Event(), threading.Event(), {}
        rows = jsonl(kind, n).splitlines()

        def lines():
            yield from rows[:pause_after]
            self.midway.set()
            assert self.release.wait(120)
            yield from rows[pause_after:]

        def run():
            try:
                self.result["answer"] = exchange.import_lines(db, user, kind, lines(), name=name)
            except BaseException as e:  # noqa: BLE001 (handed to the test)
                self.result["error"] = e

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.midway.wait(120)

    def finish(self) -> dict:
        self.release.set()
        self.thread.join(120)
        if "error" in self.result:
            raise self.result["error"]
        return self.result["answer"]


def publish_statements(monkeypatch, db) -> list[str]:
    """Every SQL statement the publish step of an import sends (filled in as imports publish)."""
    from sqlalchemy import event
    said: list[str] = []
    publish = exchange._Stager.publish

    def recorded(self, rows):
        def listen(conn, cursor, statement, *args):
            said.append(statement)
        event.listen(db.engine, "before_cursor_execute", listen)
        try:
            return publish(self, rows)
        finally:
            event.remove(db.engine, "before_cursor_execute", listen)

    monkeypatch.setattr(exchange._Stager, "publish", recorded)
    return said


def test_an_sft_import_is_invisible_to_every_reader_while_staging_and_publishes_with_one_update(db, people, tmp_path,
                                                                                               monkeypatch):
    from backend.labels import sft
    op, ann = people["op"], people["ann"]
    sft.save(db, ann, ROW["messages"], submit=True)  # one demo that is there all along
    before = {kind: exchange.export(db, kind) for kind in exchange.KINDS}
    said = publish_statements(monkeypatch, db)
    n = 4 * exchange.STAGE_BATCH + 3
    job = PausedImport(db, op, "sft", n, pause_after=3 * exchange.STAGE_BATCH + 1)
    try:
        assert counts(db)["demos staged"] == 3 * exchange.STAGE_BATCH
        with db.read() as s:
            staged = s.scalar(select(SFTDemo.id).where(SFTDemo.import_id.is_not(None)))
        for kind in exchange.KINDS:
            assert exchange.export(db, kind) == before[kind]
        snap = snapshots.create_snapshot(db, tmp_path, op, "sft")
        assert snap["rows"] == 1  # only the annotator's demo
        assert sft.list_mine(db, op) == [] and review.next_for_review(db, ann) is None
        assert review.next_for_review(db, op)["demo_id"] != staged
        assert review.review_counts(db) == {"pending": 1, "accepted": 0, "rejected": 0}
        for look in (lambda: sft.get(db, op, staged), lambda: sft.save(db, op, ROW["messages"], demo_id=staged),
                     lambda: review.review_demo(db, ann, staged, "accept")):
            with pytest.raises(LookupError):
                look()
    finally:
        answer = job.finish()
    assert answer["rows"] == n
    # Published by flipping the import's one row: not one demo row was rewritten.
    assert len(said) == 1 and said[0].lstrip().upper().startswith("UPDATE IMPORTS"), said
    assert len(exchange.export(db, "sft")) == n + 1 and len(sft.list_mine(db, op)) == n
    assert review.review_counts(db)["pending"] == n + 1 and sft.get(db, op, staged)["versions"] == 1
    assert snapshots.create_snapshot(db, tmp_path, op, "sft")["rows"] == n + 1
    assert counts(db) == {"demos submitted": n + 1, "sft_versions": n + 1}


def test_a_rankings_import_is_invisible_to_every_reader_while_staging_and_appears_at_once(db, people, tmp_path,
                                                                                         monkeypatch):
    op, ann = people["op"], people["ann"]
    said = publish_statements(monkeypatch, db)
    n = 3 * exchange.STAGE_BATCH
    job = PausedImport(db, op, "rankings", n, pause_after=2 * exchange.STAGE_BATCH + 1)
    try:
        assert counts(db)["sets staged"] == 3
        with db.read() as s:
            set_id = s.scalar(select(RankingSet.id).where(RankingSet.import_id.is_not(None)))
            item = s.scalar(select(RankingItem.id).where(RankingItem.set_id == set_id))
            cand = s.scalar(select(Candidate.id).where(Candidate.item_id == item))
        assert rk.list_sets(db) == [] and rk.next_item(db, ann) is None and rk.my_rankings(db, op) == []
        for kind in exchange.KINDS:
            assert exchange.export(db, kind) == []
            with pytest.raises(ValueError, match="empty"):
                snapshots.create_snapshot(db, tmp_path, op, kind)
        for look in (lambda: rk.get_item(db, ann, item), lambda: rk.submit(db, ann, item, [], all_bad=True),
                     lambda: progress.set_progress(db, set_id), lambda: agreement.set_agreement(db, set_id),
                     lambda: review.flag_candidate(db, ann, cand, "spam")):
            with pytest.raises(LookupError):
                look()
        with db.read() as s:  # its name is held, and the refusal says by what (not by a set no reader can open)
            name, import_id = s.execute(select(RankingSet.name, RankingSet.import_id).where(RankingSet.id == set_id)).one()
        with pytest.raises(ValueError, match=rf"name: '{re.escape(name)}' is held by import {import_id}, still in progress"):
            rk.create_set(db, op, name, ["a prompt"], [["one", "two", "three", "four"]])
    finally:
        answer = job.finish()
    with pytest.raises(ValueError, match=rf"a ranking set named '{re.escape(name)}' already exists \(set {set_id}\)"):
        rk.create_set(db, op, name, ["a prompt"], [["one", "two", "three", "four"]])
    assert len(said) == 1 and said[0].lstrip().upper().startswith("UPDATE IMPORTS"), said
    assert [s["id"] for s in rk.list_sets(db)] == answer["set_ids"] and set_id in answer["set_ids"]
    assert len(exchange.export(db, "rankings")) == n and len(rk.my_rankings(db, op)) == n
    assert progress.set_progress(db, set_id)["items_done"] == progress.set_progress(db, set_id)["items"] > 0
    assert agreement.set_agreement(db, set_id)["items"]
    assert rk.get_item(db, ann, item)["item_id"] == item and review.flag_candidate(db, ann, cand, "spam") == ["spam"]
    assert rk.submit(db, ann, item, [], all_bad=True)["revision"] == 1
    assert snapshots.create_snapshot(db, tmp_path, op, "preferences")["rows"] > 0
    with db.read() as s:
        assert s.execute(select(Import.kind, Import.state, Import.rows)).all() == [("rankings", "published", n)]


def test_refused_and_failed_imports_leave_their_rows_nowhere_and_their_import_dropped(db, people):
    op = people["op"]
    for kind in exchange.KINDS:
        with pytest.raises(exchange.ImportRefused):
            exchange.import_lines(db, op, kind, jsonl(kind, 3 * exchange.STAGE_BATCH, bad_at=3 * exchange.STAGE_BATCH)
                                  .splitlines())
    assert counts(db) == {}
    with db.read() as s:
        assert {state for (state,) in s.execute(select(Import.state))} == {"dropped"}
    # A file refused on its first batch never wrote anything: no import row at all.
    with db.read() as s:
        imports = s.scalar(select(func.count()).select_from(Import))
    with pytest.raises(exchange.ImportRefused):
        exchange.import_lines(db, op, "sft", jsonl("sft", 3, bad_at=2).splitlines())
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(Import)) == imports


def test_an_import_dropped_before_it_publishes_is_not_published(db, people):
    """A second server starting on the same database ran drop_staged mid-import: the import fails, shows nothing."""
    op = people["op"]
    job = PausedImport(db, op, "sft", 2 * exchange.STAGE_BATCH, pause_after=exchange.STAGE_BATCH + 1)
    try:
        assert exchange.drop_staged(db) == 1
    finally:
        with pytest.raises(RuntimeError, match="dropped before it could be published"):
            job.finish()
    assert counts(db) == {} and exchange.export(db, "sft") == []


def test_drop_staged_finishes_interrupted_drops_and_never_touches_a_published_import(db, people):
    op = people["op"]
    kept = exchange.import_jsonl(db, op, "rankings", jsonl("rankings", 10).decode(), name="kept")
    published = counts(db)
    killed = exchange._SFTStager(db, op, "sft", "killed")  # killed while staging
    killed.batch = [(ROW["messages"], "pending")] * 5
    killed.flush()
    cut = exchange._RankingStager(db, op, "rankings", "cut")  # killed while its drop was deleting its rows
    cut.batch = [exchange._check_row("rankings", ranking_row(i)) for i in range(6)]
    cut.flush()
    with db.session() as s:
        s.execute(update(Import).where(Import.id == cut.import_id).values(state="dropped"))
    assert counts(db)["demos staged"] == 5 and counts(db)["sets staged"] == 3
    with db.read() as s:
        published_id = s.scalar(select(Import.id).where(Import.state == "published"))
        held = s.scalar(select(RankingSet.name).where(RankingSet.import_id == cut.import_id))
    four = [["one", "two", "three", "four"]]
    with pytest.raises(ValueError, match=rf"held by import {cut.import_id}, which failed and is being removed"):
        rk.create_set(db, op, held, ["a prompt"], four)
    assert exchange.drop_import(db, published_id) is False  # never delete what annotators can see
    assert exchange.drop_staged(db) == 2
    assert counts(db) == published and [s["id"] for s in rk.list_sets(db)] == kept["set_ids"]
    made = rk.create_set(db, op, held, ["a prompt"], four)  # the name is free again
    assert [s["id"] for s in rk.list_sets(db)] == kept["set_ids"] + [made["id"]]
    assert exchange.drop_staged(db) == 0
    with db.read() as s:
        assert dict(s.execute(select(Import.name, Import.state)).all()) == {
            "kept": "published", "killed": "dropped", "cut": "dropped"}


def check_0011_converts_old_leftovers(d: Database) -> None:
    """On an unmigrated database of any dialect (SQLite here, PostgreSQL in tests/test_db_postgres.py): at 0010, what
    a killed import left under the old scheme (demos and sets with status "importing"); after the upgrade to the
    head those rows belong to a staging import, hidden from readers, and dropped at start."""
    import datetime as dt

    import sqlalchemy as sa

    from backend.db.migrate import upgrade
    upgrade(d.engine, "0010")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    S, N, F, J, B, T = sa.String, sa.Integer, sa.Float, sa.JSON, sa.Boolean, sa.DateTime(timezone=True)

    def table(table_name, **cols):  # typed columns, so each dialect gets its own JSON, boolean and time values
        return sa.table(table_name, *[sa.column(c, kind) for c, kind in cols.items()])
    messages = ROW["messages"]
    rows = [
        (table("users", id=N, name=S, role=S, password_hash=S, api_key_hash=S, active=B, created_at=T),
         [dict(id=1, name="op", role="operator", password_hash="x", api_key_hash="y", active=True, created_at=now)]),
        (table("ranking_sets", id=N, name=S, model=S, temperature=F, k=N, annotators_per_item=N, created_by=N,
               created_at=T, status=S),
         [dict(id=i, name=name, model="m", temperature=1.0, k=2, annotators_per_item=1, created_by=1, created_at=now,
               status=status) for i, name, status in ((1, "open", "open"), (2, "staged", "importing"))]),
        (table("ranking_items", id=N, set_id=N, position=N, prompt=S),
         [dict(id=1, set_id=1, position=0, prompt="p"), dict(id=2, set_id=2, position=0, prompt="q")]),
        (table("candidates", id=N, item_id=N, position=N, text=S, source=S, flags=J),
         [dict(id=i + 1, item_id=1 + i // 2, position=i % 2, text="abcd"[i], source="m", flags=[]) for i in range(4)]),
        (table("sft_demos", id=N, user_id=N, status=S, messages=J, created_at=T, updated_at=T, review=S, review_note=S),
         [dict(id=i, user_id=1, status=status, messages=[], created_at=now, updated_at=now, review="pending",
               review_note="") for i, status in ((1, "submitted"), (2, "importing"))]),
        (table("sft_versions", id=N, demo_id=N, version=N, messages=J, user_id=N, created_at=T),
         [dict(id=i, demo_id=i, version=1, messages=messages, user_id=1, created_at=now) for i in (1, 2)]),
    ]
    with d.engine.begin() as conn:
        for t, values in rows:
            conn.execute(sa.insert(t), values)
    d.migrate()
    with d.read() as s:
        assert s.execute(select(Import.kind, Import.state)).all() == [("sft", "staging"), ("rankings", "staging")]
        assert dict(s.execute(select(SFTDemo.id, SFTDemo.status)).all()) == {1: "submitted", 2: "submitted"}
    assert [r["id"] for r in rk.list_sets(d)] == [1] and len(exchange.export(d, "sft")) == 1
    assert exchange.drop_staged(d) == 2
    assert counts(d) == {"demos submitted": 1, "sets open": 1, "sft_versions": 1, "ranking_items": 1, "candidates": 2}


def test_rows_the_old_scheme_left_staged_are_hidden_by_migration_0011_and_dropped_at_start(tmp_path):
    """Before 0011 a killed import left demos and sets with status "importing"; they become a staging import."""
    d = Database(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        check_0011_converts_old_leftovers(d)
    finally:
        d.close()
