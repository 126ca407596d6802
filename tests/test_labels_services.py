"""Label services against a real SQLite file: queue, rankings, SFT history, agreement, exports,
imports (all or nothing), snapshots."""
from __future__ import annotations

import json
from itertools import permutations

import pytest
from argon2 import PasswordHasher

from backend import users
from backend.db import Database
from backend.labels import agreement, exchange, progress, rankings as rk, sft, snapshots


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'labels.db'}")
    d.migrate()
    yield d
    d.close()


@pytest.fixture
def people(db, monkeypatch):
    # Cheaper argon2 parameters keep the suite fast; the parameters travel inside each hash.
    monkeypatch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024))
    return {name: users.add_user(db, name, role)[0] for name, role in
            [("op", "operator"), ("ann", "annotator"), ("bea", "annotator"), ("cal", "annotator")]}


def make_set(db, op, n_items=2, k=4, per_item=2, name="jokes"):
    prompts = ["Write a joke about pelicans"] + [f"prompt {i}" for i in range(1, n_items)]
    cands = [[f"p{i} c{j}" for j in range(k)] for i in range(n_items)]
    return rk.create_set(db, op, name, prompts, cands, model="supplied", annotators_per_item=per_item)


def test_kendall_tau_borda_and_ranked_pairs():
    assert agreement.kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agreement.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert agreement.kendall_tau([1, 2, 3], [2, 1, 3]) == pytest.approx(1 / 3)
    votes = [[1, 2, 3], [1, 3, 2], [2, 1, 3]]
    assert agreement.borda(votes) == [1, 2, 3]
    # A Condorcet winner wins ranked pairs even when Borda says otherwise.
    votes = [["a", "b", "c"]] * 3 + [["b", "c", "a"]] * 2
    assert agreement.ranked_pairs(votes)[0] == "a"
    # A cycle (a>b>c>a) still yields a full order without crashing.
    cyc = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert sorted(agreement.ranked_pairs(cyc)) == ["a", "b", "c"]


def test_queue_gives_each_item_to_the_requested_number_of_annotators(db, people):
    s = make_set(db, people["op"], n_items=2, per_item=2)
    seen = {}
    for name in ("ann", "bea", "cal"):
        u = people[name]
        while (item := rk.next_item(db, u, s["id"])) is not None:
            ids = [c["id"] for c in item["candidates"]]
            rk.submit(db, u, item["item_id"], ids)
            seen.setdefault(item["item_id"], []).append(name)
    assert {k: len(v) for k, v in seen.items()} == {i: 2 for i in seen} and len(seen) == 2
    p = progress.set_progress(db, s["id"])
    assert p["items_done"] == 2 and sum(a["ranked"] for a in p["annotators"]) == 4


def test_submission_must_be_a_permutation_and_can_be_revised(db, people):
    s = make_set(db, people["op"], n_items=1)
    item = rk.next_item(db, people["ann"], s["id"])
    ids = [c["id"] for c in item["candidates"]]
    with pytest.raises(ValueError, match="exactly once"):
        rk.submit(db, people["ann"], item["item_id"], ids[:3])
    with pytest.raises(ValueError):
        rk.submit(db, people["ann"], item["item_id"], ids[:3] + ids[:1])
    with pytest.raises(LookupError):
        rk.submit(db, people["ann"], 9999, ids)
    assert rk.submit(db, people["ann"], item["item_id"], ids)["revision"] == 1
    again = rk.submit(db, people["ann"], item["item_id"], ids[::-1], all_bad=True)
    assert again["revision"] == 2
    mine = rk.get_item(db, people["ann"], item["item_id"])["my_ranking"]
    assert mine["order"] == ids[::-1] and mine["all_bad"]


def test_skip_moves_on_and_does_not_count_as_a_ranking(db, people):
    s = make_set(db, people["op"], n_items=2, per_item=1)
    first = rk.next_item(db, people["ann"], s["id"])
    rk.submit(db, people["ann"], first["item_id"], skipped=True)
    assert rk.next_item(db, people["ann"], s["id"])["item_id"] != first["item_id"]
    assert rk.next_item(db, people["bea"], s["id"])["item_id"] == first["item_id"]  # still needs a ranker


def test_create_set_validates_k_and_writes_nothing_when_bad(db, people):
    with pytest.raises(ValueError, match="4-9"):
        rk.create_set(db, people["op"], "bad", ["a", "b"], [["1", "2", "3", "4"], ["1", "2", "3"]])
    with pytest.raises(ValueError):
        rk.create_set(db, people["op"], "bad", ["a"], [["x"] * 10])
    assert rk.list_sets(db) == []


def test_agreement_per_item_and_per_annotator(db, people):
    s = make_set(db, people["op"], n_items=1, per_item=3)
    item = rk.next_item(db, people["ann"], s["id"])
    ids = [c["id"] for c in item["candidates"]]
    rk.submit(db, people["ann"], item["item_id"], ids)
    rk.submit(db, people["bea"], item["item_id"], ids)
    rk.submit(db, people["cal"], item["item_id"], ids[::-1])
    a = agreement.set_agreement(db, s["id"], "ranked_pairs")
    it = a["items"][0]
    assert it["consensus"] == ids
    assert it["mean_pairwise_tau"] == pytest.approx((1 - 1 - 1) / 3, abs=1e-3)
    assert a["annotators"]["cal"]["tau_vs_consensus"] == -1.0
    assert a["annotators"]["ann"]["tau_vs_consensus"] == 1.0


def test_sft_keeps_every_submitted_version_and_marks_model_parts(db, people):
    ann = people["ann"]
    [pid] = sft.add_prompts(db, people["op"], ["Who built you?"], system="You are Playground.")
    nxt = sft.next_prompt(db, ann)
    assert nxt["prompt_id"] == pid and nxt["messages"][0]["role"] == "system"
    msgs = nxt["messages"][:-1] + [{"role": "assistant", "content": "I was built by the Playground team.",
                                     "model_draft": "I am ChatGPT.",
                                     "thinking": "Answer from the system prompt.",
                                     "tool_calls": [{"tool": "search", "input": "who built Playground", "output": "the team"}]}]
    with pytest.raises(ValueError, match="missing: the assistant.s reply"):
        sft.save(db, ann, nxt["messages"], prompt_id=pid, submit=True)  # empty assistant turn
    d = sft.save(db, ann, msgs[:-1], prompt_id=pid)                   # a draft may be incomplete
    assert d["status"] == "draft" and sft.next_prompt(db, ann)["demo_id"] == d["demo_id"]
    v1 = sft.save(db, ann, msgs, demo_id=d["demo_id"], submit=True)
    msgs2 = msgs[:-1] + [{**msgs[-1], "content": "The Playground team built me."}]
    v2 = sft.save(db, ann, msgs2, demo_id=d["demo_id"], submit=True)
    assert (v1["versions"], v2["versions"]) == (1, 2)
    full = sft.get(db, ann, d["demo_id"])
    assert [h["messages"][-1]["content"] for h in full["history"]] == ["I was built by the Playground team.",
                                                                        "The Playground team built me."]
    assert full["history"][0]["messages"][-1]["origin"] == "model_edited"
    with pytest.raises(PermissionError):
        sft.save(db, people["bea"], msgs, demo_id=d["demo_id"], submit=True)
    # The export is the newest version, flattened to role/content with tool turns.
    [row] = exchange.export(db, "sft")
    roles = [m["role"] for m in row["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert "<think>" in row["messages"][2]["content"] and "<tool_call>" in row["messages"][2]["content"]
    assert row["messages"][-1]["content"] == "The Playground team built me."
    assert sft.next_prompt(db, ann) is None


def test_preference_export_has_every_pair_and_loads_with_datasets(db, people, tmp_path):
    datasets = pytest.importorskip("datasets")
    s = make_set(db, people["op"], n_items=2, k=5, per_item=1)
    for _ in range(2):
        item = rk.next_item(db, people["ann"], s["id"])
        rk.submit(db, people["ann"], item["item_id"], [c["id"] for c in item["candidates"]][::-1])
    prefs = exchange.export(db, "preferences")
    assert len(prefs) == 2 * 10  # 5 choose 2 per ranking
    first = [r for r in prefs if r["prompt"][0]["content"].startswith("Write a joke")]
    # Ranked reversed, so the last candidate is chosen over every other one.
    assert sum(r["chosen"][0]["content"] == "p0 c4" for r in first) == 4
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in prefs)
    for kind in ("preferences", "rankings", "sft"):
        sft.save(db, people["ann"], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], submit=True)
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(exchange.to_jsonl(exchange.export(db, kind)))
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        assert len(ds) > 0
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "preferences.jsonl"), split="train")
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
    assert ds[0]["chosen"][0]["role"] == "assistant"


def test_bad_import_is_refused_whole_with_line_numbers(db, people):
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    text = "\n".join([json.dumps(good), "{not json", json.dumps({"prompt": "q", "chosen": "x"}),
                      json.dumps(good), json.dumps({**good, "rejected": "yes"})])
    with pytest.raises(exchange.ImportRefused) as e:
        exchange.import_jsonl(db, people["op"], "preferences", text)
    lines = [n for n, _ in e.value.errors]
    assert lines == [2, 3, 5]
    assert "rejected" in dict(e.value.errors)[3]
    assert rk.list_sets(db) == []  # nothing partly imported
    sft_bad = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    with pytest.raises(exchange.ImportRefused, match="line 1.*robot"):
        exchange.import_jsonl(db, people["op"], "sft", sft_bad)


def test_export_import_round_trip(db, people, tmp_path):
    s = make_set(db, people["op"], n_items=2, k=4, per_item=1)
    for _ in range(2):
        item = rk.next_item(db, people["ann"], s["id"])
        rk.submit(db, people["ann"], item["item_id"], [c["id"] for c in item["candidates"]][::-1])
    raw = exchange.to_jsonl(exchange.export(db, "rankings"))
    out = exchange.import_jsonl(db, people["op"], "rankings", raw, name="copy")
    assert out["rows"] == 2
    again = [r for r in exchange.export(db, "rankings") if r["set_id"] in out["set_ids"]]
    orig = exchange.export(db, "rankings", s["id"])
    assert [(r["prompt"], r["candidates"], r["ranking"]) for r in again] == \
           [(r["prompt"], r["candidates"], r["ranking"]) for r in orig]
    prefs = exchange.to_jsonl(exchange.export(db, "preferences", s["id"]))
    assert exchange.import_jsonl(db, people["op"], "preferences", prefs)["rows"] == 12
    sft.save(db, people["ann"], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], submit=True)
    assert exchange.import_jsonl(db, people["op"], "sft", exchange.to_jsonl(exchange.export(db, "sft")))["rows"] == 1
    assert len(exchange.export(db, "sft")) == 2


def test_snapshot_is_content_hashed_immutable_and_deduplicated(db, people, tmp_path):
    s = make_set(db, people["op"], n_items=1, per_item=1)
    item = rk.next_item(db, people["ann"], s["id"])
    rk.submit(db, people["ann"], item["item_id"], [c["id"] for c in item["candidates"]])
    snap = snapshots.create_snapshot(db, tmp_path, people["op"], "preferences", "first")
    assert snap["rows"] == 6 and len(snap["hash"]) == 64
    assert snapshots.create_snapshot(db, tmp_path, people["op"], "preferences")["id"] == snap["id"]
    rows = snapshots.read_snapshot(db, snap["hash"])
    assert rows == exchange.export(db, "preferences")
    from pathlib import Path
    path = Path(snap["path"])
    assert not (path.stat().st_mode & 0o222)  # read-only on disk
    # New labels make a new snapshot; the old one still reads the same rows.
    rk.submit(db, people["ann"], item["item_id"], [c["id"] for c in item["candidates"]][::-1])
    snap2 = snapshots.create_snapshot(db, tmp_path, people["op"], "preferences")
    assert snap2["hash"] != snap["hash"] and snapshots.read_snapshot(db, snap["hash"]) == rows
    path.chmod(0o644)
    path.write_text(path.read_text().replace("p0", "pX"))
    with pytest.raises(ValueError, match="modified"):
        snapshots.read_snapshot(db, snap["hash"])
    with pytest.raises(ValueError, match="empty"):
        snapshots.create_snapshot(db, tmp_path, people["op"], "sft")


def test_set_names_are_unique_with_an_error_naming_the_set(db, people):
    first = make_set(db, people["op"])
    with pytest.raises(ValueError, match=rf"name: a ranking set named 'jokes' already exists \(set {first['id']}\)"):
        make_set(db, people["op"])
    # the database itself refuses a second one too (the constraint, not only the check)
    from sqlalchemy.exc import IntegrityError
    from backend.db.models import RankingSet
    with pytest.raises(IntegrityError):
        with db.session() as s:
            s.add(RankingSet(name="jokes", k=4))
    assert [x["name"] for x in rk.list_sets(db)] == ["jokes"]
    # imports of the same shape get numbered names instead of failing
    line = json.dumps({"prompt": "p", "candidates": ["a", "b"], "ranking": [1, 0]})
    for _ in range(2):
        exchange.import_jsonl(db, people["op"], "rankings", line)
    assert [x["name"] for x in rk.list_sets(db)] == ["jokes", "import (rankings, K=2)", "import (rankings, K=2) #2"]


def test_review_accepts_edits_rejects_and_flags_and_the_exports_carry_it(db, people):
    from backend.labels import review
    ask = [{"role": "user", "content": "Who built you?"}]
    ids = [sft.save(db, people["ann"], ask + [{"role": "assistant", "content": text}], submit=True)["demo_id"]
           for text in ("A team.", "spam spam", "The Playground team.")]
    # nobody reviews their own demo; a second annotator (or an operator) does
    assert review.next_for_review(db, people["ann"]) is None
    first = review.next_for_review(db, people["bea"])
    assert first["demo_id"] == ids[0] and first["author"] == "ann" and first["review"] == "pending"
    with pytest.raises(PermissionError):
        review.review_demo(db, people["ann"], ids[0], "accept")
    edited = ask + [{"role": "assistant", "content": "The Playground team built me."}]
    out = review.review_demo(db, people["bea"], ids[0], "accept", "clearer", messages=edited)
    assert out["review"] == "accepted" and out["versions"] == 2 and out["messages"][-1]["content"].startswith("The Playground")
    review.review_demo(db, people["op"], ids[1], "reject", "spam")
    assert review.next_for_review(db, people["bea"])["demo_id"] == ids[2]
    assert review.review_counts(db) == {"pending": 1, "accepted": 1, "rejected": 1}
    with pytest.raises(ValueError, match="decision must be one of accept, reject"):
        review.review_demo(db, people["op"], ids[2], "maybe")
    rows = exchange.export(db, "sft")
    assert [r["review"] for r in rows] == ["accepted", "rejected", "pending"]
    assert rows[0]["messages"][-1]["content"] == "The Playground team built me."  # the reviewer's edit is exported
    # the export imports back with its review state
    exchange.import_jsonl(db, people["op"], "sft", exchange.to_jsonl(rows))
    assert [r["review"] for r in exchange.export(db, "sft")][3:] == ["accepted", "rejected", "pending"]

    s = make_set(db, people["op"], per_item=1)
    item = rk.next_item(db, people["ann"], s["id"])
    cid = item["candidates"][0]["id"]
    assert review.flag_candidate(db, people["bea"], cid, "unsafe") == ["unsafe"]
    assert review.flag_candidate(db, people["bea"], cid, "spam") == ["spam", "unsafe"]
    assert review.flag_candidate(db, people["bea"], cid, "spam", on=False) == ["unsafe"]
    with pytest.raises(ValueError, match="flag must be one of spam, unsafe, off-topic"):
        review.flag_candidate(db, people["bea"], cid, "boring")
    rk.submit(db, people["ann"], item["item_id"], [c["id"] for c in item["candidates"]])
    [row] = [r for r in exchange.export(db, "rankings", s["id"]) if r["item_id"] == item["item_id"]]
    assert row["flags"][0] == ["unsafe"] and row["flags"][1:] == [[], [], []]


def test_a_set_sampled_from_a_model_refuses_a_bad_or_taken_name_before_sampling(db, people):
    """Sampling K candidates a prompt takes minutes: the name is checked first (no engine is touched)."""
    first = make_set(db, people["op"])

    class NoEngines:
        def get(self, name):
            raise AssertionError("sampled before the name was checked")
    for name, says in (("", "name must be 1-200 characters"), ("x" * 201, "name must be 1-200 characters"),
                       ("jokes", rf"already exists \(set {first['id']}\)")):
        with pytest.raises(ValueError, match=says):
            rk.create_set_from_model(db, NoEngines(), people["op"], name, ["a prompt"], "any-model", 4, 1.0)
