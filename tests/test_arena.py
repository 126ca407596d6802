"""The Arena's battles and votes: services on a real SQLite file and real engines (scripted models whose
answer tells who wrote it), then the REST doors on a real server: names hidden until the one vote, roles,
errors, streaming, and the leaderboard the votes make."""
from __future__ import annotations

import json
import random
import re
import threading

import httpx
import pytest
from fastapi.routing import APIRoute

from backend.api import arena as arena_api
from backend.arena import battles as arena
from backend.config import AppConfig
from backend.db.models import ArenaVote
from backend.playground import Playground
from tests.conftest import start_server
from tests.helpers import register_tiny_model
from tests.scripted import RAMBLE, register_rambler, register_scripted
from tests.test_labels_api import (
    ROLES,
    auth,
    database_with_users,
    make_users,
    required_role,
)

LINES = {"alpha": "Alpha answers first.", "beta": "Beta has another answer.", "gamma": "Gamma says something else."}


def register_models(data) -> None:
    """Three chat models that each always give their own line, and one base model."""
    for name, line in LINES.items():
        register_scripted(data, name, [line], {"\n": line, line: "<|im_end|>"}, tools=False)
    register_tiny_model(data, "basey", tokenizer="cl100k_base", chat_format=None)


def who_wrote(text: str) -> str:
    return next(name for name, line in LINES.items() if text == line)


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    data = tmp_path_factory.mktemp("arena") / "data"
    register_models(data)
    for name in ("ramble-a", "ramble-b"):  # they never stop on their own: something to stop mid-answer
        register_rambler(data, name, layers=1)
    pg = Playground(AppConfig(data_dir=data, start_worker=False, preload=False))
    people = make_users(pg.db, [("ann", "learner"), ("bob", "learner")])
    yield pg, people["ann"][0], people["bob"][0]
    pg.db.close()


# -- services ------------------------------------------------------------------------------------------
def test_a_battle_hides_the_names_until_the_vote_and_the_reveal_matches_the_answers(pg):
    pg, ann, _ = pg
    b = arena.run_battle(pg, ann, "Say something.", ["alpha", "beta"])
    assert b["status"] == "ready" and b["model_a"] is None and b["model_b"] is None and b["winner"] is None
    assert {b["answer_a"], b["answer_b"]} == {LINES["alpha"], LINES["beta"]}
    assert arena.get_battle(pg, ann, b["id"])["model_a"] is None
    v = arena.vote(pg, ann, b["id"], "a")
    assert v["winner"] == "a" and {v["model_a"], v["model_b"]} == {"alpha", "beta"}
    assert v["model_a"] == who_wrote(b["answer_a"]) and v["model_b"] == who_wrote(b["answer_b"])
    assert arena.get_battle(pg, ann, b["id"])["model_b"] == v["model_b"]  # stays revealed
    with pytest.raises(ValueError, match="already has a vote"):
        arena.vote(pg, ann, b["id"], "b")
    with pg.db.read() as s:
        assert s.query(ArenaVote).filter_by(battle_id=b["id"]).count() == 1


def test_random_draw_gives_two_different_models_on_both_sides(pg):
    pg, ann, _ = pg
    rng = random.Random(0)
    pairs = [arena.start_battle(pg, ann, "hi", ["alpha", "beta", "gamma"], rng=rng)["id"] for _ in range(12)]
    with pg.db.read() as s:
        from backend.db.models import ArenaBattle
        drawn = [(s.get(ArenaBattle, i).model_a, s.get(ArenaBattle, i).model_b) for i in pairs]
    assert all(a != b for a, b in drawn)
    assert len({frozenset(p) for p in drawn}) == 3  # every pair of the three came up
    assert {a for a, _ in drawn} == {"alpha", "beta", "gamma"}  # and every model sat on side A
    # Without a list, the draw is every chat model (the bundled one too), never the base model.
    assert set(arena.check_models(pg, None)) >= {"alpha", "beta", "gamma", "smollm2-135m-instruct"}
    assert "basey" not in arena.check_models(pg, None)


def test_answers_stream_a_then_b_and_a_cancel_leaves_nothing_to_vote_on(pg):
    pg, ann, _ = pg
    b = arena.start_battle(pg, ann, "Go.", ["alpha", "gamma"])
    events = list(arena.answer_events(pg, ann, b["id"]))
    sides = [side for side, _ in events]
    assert sides == sorted(sides) and set(sides) == {"a", "b"}  # all of A before any of B
    assert {"".join(d for s, d in events if s == side) for side in "ab"} == {LINES["alpha"], LINES["gamma"]}
    with pytest.raises(ValueError, match="not waiting for its answers"):
        list(arena.answer_events(pg, ann, b["id"]))
    cancel = threading.Event()
    c = arena.start_battle(pg, ann, "Go.", ["alpha", "gamma"])
    cancel.set()
    list(arena.answer_events(pg, ann, c["id"], cancel))
    assert arena.get_battle(pg, ann, c["id"])["status"] == "failed"
    with pytest.raises(ValueError, match="cancelled"):
        arena.vote(pg, ann, c["id"], "a")


def test_a_stop_mid_answer_leaves_no_vote_no_leaderboard_entry_and_a_free_engine(pg):
    pg, ann, _ = pg
    pair = ["ramble-a", "ramble-b"]
    board = arena.leaderboard(pg.db, bootstrap=0)
    b = arena.start_battle(pg, ann, "Sing.", pair, arena.sampling_params(max_tokens=500))
    cancel, deltas = threading.Event(), []
    for side, delta in arena.answer_events(pg, ann, b["id"], cancel):
        deltas.append((side, delta))
        if len(deltas) == 3:
            cancel.set()  # what the Arena tab's Stop does, three tokens into answer A
    assert {side for side, _ in deltas} == {"a"}  # B never started
    assert 3 <= "".join(d for _, d in deltas).count(RAMBLE) < 10  # A stopped far short of its 500 tokens
    stopped = arena.get_battle(pg, ann, b["id"])
    assert (stopped["status"], stopped["error"]) == ("failed", "cancelled")
    assert stopped["answer_a"] is None and stopped["answer_b"] is None
    with pytest.raises(ValueError, match="cancelled"):
        arena.vote(pg, ann, b["id"], "a")
    assert arena.leaderboard(pg.db, bootstrap=0) == board
    # The engine is free: the next battle on the same pair runs to the end and its vote counts.
    nxt = arena.run_battle(pg, ann, "Sing.", pair, arena.sampling_params(max_tokens=4))
    assert nxt["status"] == "ready" and nxt["answer_a"] == nxt["answer_b"] == (RAMBLE * 4).strip()
    arena.vote(pg, ann, nxt["id"], "tie")
    rows = {r["model"]: r for r in arena.leaderboard(pg.db, bootstrap=0)["rows"]}
    assert rows["ramble-a"]["battles"] == rows["ramble-b"]["battles"] == 1


def test_bad_battles_and_votes_say_what_is_wrong(pg):
    pg, ann, bob = pg
    with pytest.raises(ValueError, match="'basey' is a base model"):
        arena.start_battle(pg, ann, "hi", ["alpha", "basey"])
    with pytest.raises(ValueError, match="'nope' is not a registered model"):
        arena.start_battle(pg, ann, "hi", ["alpha", "nope"])
    with pytest.raises(ValueError, match="two different chat models"):
        arena.start_battle(pg, ann, "hi", ["alpha", "alpha"])
    with pytest.raises(ValueError, match="prompt must not be empty"):
        arena.start_battle(pg, ann, "  ", ["alpha", "beta"])
    with pytest.raises(ValueError, match="max_tokens"):
        arena.sampling_params(max_tokens=0)
    waiting = arena.start_battle(pg, ann, "hi", ["alpha", "beta"])
    with pytest.raises(ValueError, match="nothing to vote on yet"):
        arena.vote(pg, ann, waiting["id"], "a")
    done = arena.run_battle(pg, ann, "hi", ["alpha", "beta"])
    with pytest.raises(ValueError, match="winner must be one of"):
        arena.vote(pg, ann, done["id"], "left")
    with pytest.raises(PermissionError):
        arena.vote(pg, bob, done["id"], "a")
    with pytest.raises(PermissionError):
        arena.get_battle(pg, bob, done["id"])
    with pytest.raises(LookupError):
        arena.vote(pg, ann, 999_999, "a")


def test_a_fresh_install_says_why_there_is_no_battle_yet(tmp_path):
    pg = Playground(AppConfig(data_dir=tmp_path / "data", start_worker=False, preload=False))
    ann = make_users(pg.db, [("ann", "learner")])["ann"][0]
    with pytest.raises(ValueError, match="needs two chat models and only smollm2-135m-instruct is registered; fine-tune"):
        arena.start_battle(pg, ann, "hi")
    pg.db.close()


def test_votes_in_the_database_make_the_leaderboard(tmp_path):
    data = tmp_path / "data"
    for name, line in LINES.items():
        register_scripted(data, name, [line], {"\n": line, line: "<|im_end|>"}, tools=False)
    pg = Playground(AppConfig(data_dir=data, start_worker=False, preload=False))
    ann = make_users(pg.db, [("ann", "learner")])["ann"][0]
    assert arena.leaderboard(pg.db)["rows"] == []
    # alpha wins every battle it is in; beta and gamma tie.
    for pair in (["alpha", "beta"], ["alpha", "gamma"], ["beta", "gamma"], ["gamma", "alpha"]):
        b = arena.run_battle(pg, ann, "Who is best?", pair)
        alpha_side = "a" if who_wrote(b["answer_a"]) == "alpha" else "b" if who_wrote(b["answer_b"]) == "alpha" else None
        arena.vote(pg, ann, b["id"], alpha_side or "tie")
    board = arena.leaderboard(pg.db, bootstrap=50)
    assert board["votes"] == 4
    rows = {r["model"]: r for r in board["rows"]}
    assert board["rows"][0]["model"] == "alpha" and rows["alpha"]["wins"] == 3 and rows["alpha"]["losses"] == 0
    assert rows["gamma"]["rating"] < rows["beta"]["rating"]  # gamma lost to alpha twice, beta once; they tied
    assert rows["beta"]["battles"] == 2 and rows["beta"]["ties"] == 1 and rows["gamma"]["losses"] == 2
    i = board["win_rate"]["models"].index("alpha")
    assert [r for r in board["win_rate"]["rate"][i] if r is not None] == [1.0, 1.0]
    pg.db.close()


def test_a_vote_where_an_answer_names_its_model_is_set_aside_and_reward_models_never_battle(tmp_path):
    from backend.arena.identity import identity_leak
    from tests.helpers import register_reward_model
    data = tmp_path / "data"
    for name, line in {**LINES, "delta": "I am delta, your assistant."}.items():
        register_scripted(data, name, [line], {"\n": line, line: "<|im_end|>"}, tools=False)
    register_reward_model(data, "judge")
    pg = Playground(AppConfig(data_dir=data, start_worker=False, preload=False))
    ann = make_users(pg.db, [("ann", "learner")])["ann"][0]
    assert "judge" not in arena.check_models(pg, None)  # a reward model scores answers; it is never drawn
    with pytest.raises(ValueError, match="'judge' is a reward model"):
        arena.start_battle(pg, ann, "hi", ["alpha", "judge"])
    counted = arena.run_battle(pg, ann, "Who are you?", ["alpha", "beta"])
    assert arena.vote(pg, ann, counted["id"], "a")["set_aside"] is None  # "Alpha answers" does not name "alpha"
    named = arena.run_battle(pg, ann, "Who are you?", ["alpha", "delta"])
    v = arena.vote(pg, ann, named["id"], "a" if "delta" in named["answer_a"] else "b")
    side = "A" if "delta" in named["answer_a"] else "B"
    assert v["set_aside"] == f"answer {side} names delta"
    assert arena.get_battle(pg, ann, named["id"])["set_aside"] == v["set_aside"]  # stored with the vote
    board = arena.leaderboard(pg.db, bootstrap=0)
    assert board["votes"] == 1 and board["set_aside"] == 1
    assert {r["model"] for r in board["rows"]} == {"alpha", "beta"}  # delta's only battle is not counted
    # the family name counts in any case: the bundled SmolLM2 saying who it is
    assert identity_leak(pg.registry, {"a": "Hi!", "b": "I'm smolLM, a small model."},
                         ["alpha", "smollm2-135m-instruct"]) == "answer B names smollm2-135m-instruct (family SmolLM)"
    pg.db.close()


# -- REST on a real server -----------------------------------------------------------------------------
ROUTES = [(m, r.path, required_role(r)) for r in arena_api.router.routes if isinstance(r, APIRoute) for m in sorted(r.methods)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("arena_api") / "data"
    register_models(data)
    db, people = database_with_users(data, [(r, r) for r in ROLES] + [("ann", "learner"), ("bob", "learner")])
    server = start_server(data, "--model", "alpha", "--no-preload", "--no-worker")
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client, {n: auth(p[2]) for n, p in people.items()}
    server.stop()
    db.close()


def test_every_arena_route_declares_who_may_use_it():
    assert {(m, p): role for m, p, role in ROUTES} == {
        ("POST", "/api/arena/battles"): "learner", ("GET", "/api/arena/battles/{battle_id}"): "learner",
        ("POST", "/api/arena/battles/{battle_id}/vote"): "learner", ("GET", "/api/arena/leaderboard"): None,
        ("POST", "/api/arena/battles/{battle_id}/follow-up"): "learner"}


@pytest.mark.parametrize("method,path,role", [r for r in ROUTES if r[2]], ids=lambda x: str(x))
def test_battles_and_votes_need_a_login(live, method, path, role):
    client, keys = live
    url = re.sub(r"\{[^}]+\}", "999999", path)
    body = {"json": {}} if method == "POST" else {}
    assert client.request(method, url, **body).status_code == 401
    for name in ROLES:  # every role may battle and vote (the unknown battle is a 404 or the empty body a 422)
        assert client.request(method, url, headers=keys[name], **body).status_code in (404, 422)


def test_battle_vote_reveal_over_rest(live):
    client, keys = live
    r = client.post("/api/arena/battles", headers=keys["ann"], json={"prompt": "Hello?", "models": ["alpha", "beta"]})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["status"] == "ready" and b["model_a"] is None and b["model_b"] is None
    assert {b["answer_a"], b["answer_b"]} == {LINES["alpha"], LINES["beta"]}
    assert client.get(f"/api/arena/battles/{b['id']}", headers=keys["ann"]).json()["model_a"] is None
    assert client.get(f"/api/arena/battles/{b['id']}", headers=keys["bob"]).status_code == 403
    assert client.post(f"/api/arena/battles/{b['id']}/vote", headers=keys["bob"], json={"winner": "a"}).status_code == 403
    bad = client.post(f"/api/arena/battles/{b['id']}/vote", headers=keys["ann"], json={"winner": "left"})
    assert bad.status_code == 422 and "winner" in bad.text
    v = client.post(f"/api/arena/battles/{b['id']}/vote", headers=keys["ann"], json={"winner": "b"})
    assert v.status_code == 200, v.text
    v = v.json()
    assert v["winner"] == "b" and v["model_b"] == who_wrote(b["answer_b"]) and v["model_a"] == who_wrote(b["answer_a"])
    again = client.post(f"/api/arena/battles/{b['id']}/vote", headers=keys["ann"], json={"winner": "a"})
    assert again.status_code == 422 and "one vote per battle" in again.json()["detail"]
    board = client.get("/api/arena/leaderboard", params={"bootstrap": 20}).json()  # public, no key
    assert board["votes"] >= 1 and board["rows"][0]["model"] == v["model_b"]


def test_a_multi_turn_battle_keeps_each_sides_own_history_and_the_vote_judges_it_all(live):
    client, keys = live
    b = client.post("/api/arena/battles", headers=keys["ann"], json={"prompt": "Hi.", "models": ["alpha", "gamma"]}).json()
    r = client.post(f"/api/arena/battles/{b['id']}/follow-up", headers=keys["ann"], json={"prompt": "And then?"})
    assert r.status_code == 200, r.text
    two = r.json()
    assert two["status"] == "ready" and two["prompt"] == "And then?" and two["model_a"] is None
    assert two["turns"] == [{"prompt": "Hi.", "answer_a": b["answer_a"], "answer_b": b["answer_b"]}]
    assert {two["answer_a"], two["answer_b"]} == {LINES["alpha"], LINES["gamma"]}
    assert client.post(f"/api/arena/battles/{b['id']}/follow-up", headers=keys["bob"],
                       json={"prompt": "x"}).status_code == 403
    # what each model saw: its own earlier answer, never the other side's
    from backend.db.models import ArenaBattle
    battle = ArenaBattle(prompt=two["prompt"], turns=two["turns"])  # as stored: the answer the models were given
    seen_a = arena.conversation(battle, "a")
    assert [m["content"] for m in seen_a] == ["Hi.", b["answer_a"], "And then?"]
    assert b["answer_b"] not in [m["content"] for m in seen_a]
    v = client.post(f"/api/arena/battles/{b['id']}/vote", headers=keys["ann"], json={"winner": "tie"}).json()
    assert v["winner"] == "tie" and len(v["turns"]) == 1
    late = client.post(f"/api/arena/battles/{b['id']}/follow-up", headers=keys["ann"], json={"prompt": "More?"})
    assert late.status_code == 422 and "already has a vote" in late.json()["detail"]


def test_rest_errors_name_the_problem(live):
    client, keys = live
    r = client.post("/api/arena/battles", headers=keys["ann"], json={"prompt": "hi", "models": ["alpha", "basey"]})
    assert r.status_code == 422 and "'basey' is a base model" in r.json()["detail"]
    r = client.post("/api/arena/battles", headers=keys["ann"], json={"prompt": "", "models": ["alpha", "beta"]})
    assert r.status_code == 422 and "prompt" in r.text
    r = client.post("/api/arena/battles", headers=keys["ann"], json={"prompt": "hi", "models": ["alpha"]})
    assert r.status_code == 422 and "two different chat models" in r.json()["detail"]
    assert client.get("/api/arena/battles/999999", headers=keys["ann"]).status_code == 404
    assert client.get("/api/arena/leaderboard", params={"bootstrap": -1}).status_code == 422


def test_streamed_battle_sends_a_then_b_then_the_battle(live):
    client, keys = live
    events = []
    with client.stream("POST", "/api/arena/battles", headers=keys["ann"],
                       json={"prompt": "Stream it.", "models": ["beta", "gamma"], "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events[0]["battle"]["status"] == "answering" and events[-1]["battle"]["status"] == "ready"
    deltas = [e for e in events if "side" in e]
    assert [e["side"] for e in deltas] == sorted(e["side"] for e in deltas)
    final = events[-1]["battle"]
    assert "".join(e["delta"] for e in deltas if e["side"] == "a") == final["answer_a"]
    assert final["model_a"] is None and {final["answer_a"], final["answer_b"]} == {LINES["beta"], LINES["gamma"]}
