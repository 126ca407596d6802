"""Labeling REST on a real server (python app.py on loopback) over a real SQLite file:
roles on every route, concurrent submissions, no acknowledged write lost to SIGKILL; candidates and
SFT drafts from a real engine (a tiny registered model; one slow test with the bundled SmolLM2)."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi.routing import APIRoute
from sqlalchemy import select

from backend import users
from backend.api import auth as auth_api, labels as labels_api
from backend.auth import current_user
from backend.db import Database
from backend.db.models import Ranking
from backend.labels import rankings as rk
from tests.conftest import start_server
from tests.helpers import register_tiny_model

ROLES = ["learner", "annotator", "operator", "admin"]
PUBLIC = {("POST", "/api/login"), ("POST", "/api/logout")}


def make_users(db: Database, names_roles) -> dict:
    """name -> (CurrentUser, password, api key); cheap argon2 parameters keep the suite fast."""
    users._hasher = PasswordHasher(time_cost=1, memory_cost=1024)
    try:
        return {n: users.add_user(db, n, r) for n, r in names_roles}
    finally:
        users._hasher = PasswordHasher()


def database_with_users(data: Path, names_roles) -> tuple[Database, dict]:
    """The app's SQLite file in a data dir, migrated, with these users: (db, make_users(...))."""
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    return db, make_users(db, names_roles)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def required_role(route: APIRoute) -> str | None:
    """The least role a route needs; None where anonymous callers are let in ("public", and "inference"
    on a server with open inference, the default)."""
    for dep in route.dependant.dependencies:
        if rule := getattr(dep.call, "required_role", None):
            return None if rule in ("public", "inference") else rule
        if dep.call is current_user:
            return "learner"
    return None


ALL_ROUTES = [(m, r.path, required_role(r)) for router in (auth_api.router, labels_api.router)
              for r in router.routes if isinstance(r, APIRoute) for m in sorted(r.methods)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("labels_api") / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml")  # a real engine, fast
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [(r, r) for r in ROLES] + [("ann2", "annotator"), ("op", "operator"), ("ann", "annotator")])
    server = start_server(data, "--model", "tiny", "--no-preload", "--no-worker")
    yield server, db, people
    server.stop()
    db.close()


def test_every_labeling_route_declares_a_role():
    unguarded = [(m, p) for m, p, role in ALL_ROUTES if role is None and (m, p) not in PUBLIC]
    assert unguarded == []
    assert len(ALL_ROUTES) > 25


@pytest.mark.parametrize("method,path,role", ALL_ROUTES, ids=[f"{m} {p}" for m, p, _ in ALL_ROUTES])
def test_roles_are_enforced_on_every_route(live, method, path, role):
    server, db, people = live
    if role is None:
        return  # login / logout are for everybody
    url = server.base_url + re.sub(r"\{[^}]+\}", "999999", path)
    body = {"json": {}} if method in ("POST", "PUT") else {}
    with httpx.Client(timeout=30) as c:
        assert c.request(method, url, **body).status_code == 401
        assert c.request(method, url, headers=auth("pk_not_a_key"), **body).status_code == 401
        for name in ROLES:
            got = c.request(method, url, headers=auth(people[name][2]), **body).status_code
            allowed = users.ROLE_RANK[name] >= users.ROLE_RANK[role]
            assert (got != 403) if allowed else (got == 403), f"{name} got {got} on {method} {path} (needs {role})"
            assert got < 500


def test_browser_login_sets_an_httponly_cookie_and_logout_ends_it(live):
    server, db, people = live
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert c.post("/api/login", json={"name": "annotator", "password": "wrong"}).status_code == 401
        r = c.post("/api/login", json={"name": "annotator", "password": people["annotator"][1]})
        assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
        assert c.get("/api/me").json()["role"] == "annotator"
        assert c.get("/api/rankings/next").status_code == 200
        assert c.post("/api/ranking-sets", json={"name": "x", "prompts": ["p"], "candidates": [["a"] * 4]}).status_code == 403
        c.post("/api/logout")
        assert c.get("/api/me").status_code == 401


def test_disabling_a_user_shuts_their_key_out_at_once_here_and_soon_from_another_process(live):
    """The server remembers callers for a few seconds (users.REMEMBER_SECONDS); a disable through the
    server forgets them at once, a disable from another process (the CLI, here this test) within that bound."""
    server, db, people = live
    made = make_users(db, [("leaver", "annotator"), ("leaver2", "annotator")])
    admin = auth(people["admin"][2])
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert c.get("/api/rankings/next", headers=auth(made["leaver2"][2])).status_code == 200  # now remembered
        users.set_active(db, "leaver2", False)  # this process is not the server: it cannot tell the server
        started = time.monotonic()
        while c.get("/api/rankings/next", headers=auth(made["leaver2"][2])).status_code != 401:
            assert time.monotonic() - started < users.REMEMBER_SECONDS + 5, "a disabled key still works"
            time.sleep(0.2)
        assert c.get("/api/rankings/next", headers=auth(made["leaver"][2])).status_code == 200  # now remembered
        assert c.post("/api/users/leaver/disable", headers=admin).status_code == 200
        assert c.get("/api/rankings/next", headers=auth(made["leaver"][2])).status_code == 401


def test_bad_input_gets_a_clear_4xx(live):
    server, db, people = live
    op = auth(people["operator"][2])
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.post("/api/ranking-sets", headers=op, json={"name": "x", "prompts": ["p"], "candidates": [["a", "b"]]})
        assert r.status_code == 422 and "4-9" in r.text
        r = c.post("/api/imports/preferences", headers=op, content=b'{"prompt": "p"}\nnot json\n')
        assert r.status_code == 422
        assert [e["line"] for e in r.json()["detail"]["errors"]] == [1, 2]
        assert c.post("/api/imports/nonsense", headers=op, content=b"{}").status_code == 422
        assert c.get("/api/exports/nonsense", headers=op).status_code == 422
        r = c.post("/api/ranking-sets", headers=op, json={"name": "x", "prompts": ["p"], "model": "no-such-model"})
        assert 400 <= r.status_code < 500


def test_label_text_comes_back_verbatim(live):
    server, db, people = live
    nasty = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
    op, ann = auth(people["operator"][2]), auth(people["ann2"][2])
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        s = c.post("/api/ranking-sets", headers=op, json={"name": nasty, "prompts": [nasty],
                                                          "candidates": [[nasty, "b", "c", "d"]]}).json()
        item = c.get("/api/rankings/next", headers=ann, params={"set_id": s["id"]}).json()
        assert item["prompt"] == nasty and item["candidates"][0]["text"] == nasty


def test_concurrent_submissions_from_many_clients_are_all_stored(live):
    server, db, people = live
    crowd = make_users(db, [(f"crowd{i}", "annotator") for i in range(24)])
    op = people["operator"][0]
    s = rk.create_set(db, op, "crowd", [f"prompt {i}" for i in range(5)],
                      [[f"c{i}{j}" for j in range(4)] for i in range(5)], annotators_per_item=len(crowd))

    def annotate(name):
        key = crowd[name][2]
        done = 0
        with httpx.Client(base_url=server.base_url, timeout=60, headers=auth(key)) as c:
            while True:
                item = c.get("/api/rankings/next", params={"set_id": s["id"]}).json()
                if item.get("done"):
                    return done
                order = [x["id"] for x in item["candidates"]][::-1]
                r = c.post(f"/api/rankings/items/{item['item_id']}", json={"order": order})
                assert r.status_code == 200, r.text
                done += 1

    with ThreadPoolExecutor(len(crowd)) as pool:
        counts = list(pool.map(annotate, crowd))
    assert counts == [5] * len(crowd)
    with db.read() as sess:
        rows = sess.scalars(select(Ranking).where(Ranking.user_id.in_([u.id for u, _, _ in crowd.values()]))).all()
    assert len(rows) == 5 * len(crowd)
    assert all(len(r.order) == 4 for r in rows)


def test_sigkill_mid_submissions_loses_no_acknowledged_write(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [("op", "operator")] + [(f"a{i}", "annotator") for i in range(8)])
    s = rk.create_set(db, people["op"][0], "kill", [f"p{i}" for i in range(400)],
                      [[f"c{i}{j}" for j in range(4)] for i in range(400)], annotators_per_item=8)
    server = start_server(data, "--no-preload", "--no-worker")
    acked: list[tuple[int, int, list]] = []
    lock, enough = threading.Lock(), threading.Event()

    def annotate(name):
        user, _, key = people[name]
        with httpx.Client(base_url=server.base_url, timeout=30, headers=auth(key)) as c:
            while True:
                try:
                    item = c.get("/api/rankings/next", params={"set_id": s["id"]}).json()
                    order = [x["id"] for x in item["candidates"]]
                    r = c.post(f"/api/rankings/items/{item['item_id']}", json={"order": order})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    with lock:
                        acked.append((user.id, item["item_id"], order))
                        if len(acked) >= 120:
                            enough.set()

    threads = [threading.Thread(target=annotate, args=(f"a{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    assert enough.wait(120), "submissions did not get going"
    server.kill()  # SIGKILL while the clients are still submitting
    for t in threads:
        t.join(60)
    with lock:
        acknowledged = list(acked)
    db.close()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    with db.read() as sess:
        stored = {(r.user_id, r.item_id): r.order for r in sess.scalars(select(Ranking))}
    missing = [(u, i) for u, i, o in acknowledged if stored.get((u, i)) != o]
    assert len(acknowledged) >= 120 and missing == []


# ---- model candidates and drafts --------------------------------------------------------------

def test_operator_samples_k_candidates_from_a_model(live):
    server, db, people = live
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        r = c.post("/api/ranking-sets", headers=auth(people["op"][2]),
                   json={"name": "tiny jokes", "prompts": ["Write a joke about pelicans", "Say hi"], "model": "tiny",
                         "k": 5, "temperature": 1.0, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["k"] == 5 and r.json()["items"] == 2 and r.json()["model"] == "tiny"
        item = c.get("/api/rankings/next", headers=auth(people["ann"][2]), params={"set_id": r.json()["id"]}).json()
        assert item["prompt"] == "Write a joke about pelicans" and len(item["candidates"]) == 5
        assert all(isinstance(x["text"], str) for x in item["candidates"])
        bad = c.post("/api/ranking-sets", headers=auth(people["op"][2]),
                     json={"name": "x", "prompts": ["p"], "model": "tiny", "k": 12})
        assert bad.status_code == 422 and "k must be" in bad.text


def test_draft_with_model_marks_the_reply_as_the_models(live):
    server, db, people = live
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        r = c.post("/api/sft/draft", headers=auth(people["ann"][2]),
                   json={"model": "tiny", "max_tokens": 8,
                         "messages": [{"role": "user", "content": "Who built you?"}, {"role": "assistant", "content": ""}]})
        assert r.status_code == 200, r.text
        last = r.json()["messages"][-1]
        assert last["role"] == "assistant" and last["origin"] == "model" and last["model_draft"] == last["content"]
        edited = r.json()["messages"][:-1] + [{**last, "content": last["content"] + " (fixed by a person)"}]
        saved = c.post("/api/sft/demos", headers=auth(people["ann"][2]), json={"messages": edited, "submit": True})
        assert saved.status_code == 200 and saved.json()["messages"][-1]["origin"] == "model_edited"


@pytest.mark.slow
def test_pelican_jokes_from_the_bundled_model(live):
    server, db, people = live
    with httpx.Client(base_url=server.base_url, timeout=600) as c:
        r = c.post("/api/ranking-sets", headers=auth(people["op"][2]),
                   json={"name": "pelicans", "prompts": ["Write a joke about pelicans"], "model": "smollm2-135m-instruct",
                         "k": 4, "temperature": 0.9, "max_tokens": 48})
        assert r.status_code == 200, r.text
        item = c.get("/api/rankings/next", headers=auth(people["ann"][2]), params={"set_id": r.json()["id"]}).json()
    texts = [x["text"] for x in item["candidates"]]
    assert len(texts) == 4 and all(t.strip() for t in texts)
    assert len(set(texts)) >= 3  # sampled at temperature 0.9: different jokes
    assert any("pelican" in t.lower() for t in texts)
