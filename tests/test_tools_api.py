"""The tools' REST on a real server (python app.py on loopback, real SQLite file, real sandbox): roles on
every route, documents in and out of the index, search ranking, bad input, and the server staying up and
answering while sandboxed code sleeps or attacks its parent."""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from fastapi.routing import APIRoute

from backend import users
from backend.api import tools as tools_api
from backend.db import Database
from tests.conftest import free_port, start_server
from tests.test_labels_api import ROLES, auth, make_users, required_role

ROUTES = [(m, r.path, required_role(r)) for r in tools_api.router.routes if isinstance(r, APIRoute) for m in sorted(r.methods)]
needs_sandbox = pytest.mark.usefixtures("sandbox_required")  # fails (not skips) without isolation


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("tools_api") / "data"
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [(r, r) for r in ROLES])
    # a web-search endpoint that is configured but not reachable (nothing listens on that port)
    server = start_server(data, "--no-preload", "--no-worker", "--web-search-url", f"http://127.0.0.1:{free_port()}")
    yield server, people
    server.stop()
    db.close()


def test_every_tools_route_declares_a_role():
    assert [(m, p) for m, p, role in ROUTES if role is None] == []
    assert {(m, p): role for m, p, role in ROUTES} == {
        ("GET", "/api/documents"): "learner", ("GET", "/api/documents/{doc_id}"): "learner",
        ("POST", "/api/documents"): "operator", ("DELETE", "/api/documents/{doc_id}"): "operator",
        ("POST", "/api/tools/search"): "learner", ("POST", "/api/tools/python"): "learner",
        ("GET", "/api/tools/python"): "learner"}


@pytest.mark.parametrize("method,path,role", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_roles_are_enforced(live, method, path, role):
    server, people = live
    url = server.base_url + re.sub(r"\{[^}]+\}", "999999", path)
    body = {"json": {}} if method == "POST" else {}
    with httpx.Client(timeout=30) as c:
        assert c.request(method, url, **body).status_code == 401
        for name in ROLES:
            got = c.request(method, url, headers=auth(people[name][2]), **body).status_code
            allowed = users.ROLE_RANK[name] >= users.ROLE_RANK[role]
            assert (got != 403) if allowed else (got == 403), f"{name} got {got} on {method} {path}"
            assert got < 500


def test_operator_adds_a_document_and_a_learner_finds_it_first(live):
    server, people = live
    op, learner = auth(people["operator"][2]), auth(people["learner"][2])
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.post("/api/documents", headers=op, json={"title": "Quokka facts",
                                                        "text": "The quokka is a small marsupial living on Rottnest Island."})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["title"] == "Quokka facts" and doc["source"] == "user" and doc["created_by"] == people["operator"][0].id
        listed = c.get("/api/documents", headers=learner).json()
        assert doc["id"] in [d["id"] for d in listed] and {"python-docs", "knowledge"} <= {d["source"] for d in listed}
        r = c.post("/api/tools/search", headers=learner, json={"query": "where do quokkas live?", "k": 3, "source": "local"})
        assert r.status_code == 200
        out = r.json()
        assert out["results"][0]["id"] == doc["id"] and "Rottnest Island" in out["results"][0]["snippet"]
        assert out["text"].startswith("[1] Quokka facts\n")
        assert c.get(f"/api/documents/{doc['id']}", headers=learner).json()["text"].startswith("The quokka")
        assert c.delete(f"/api/documents/{doc['id']}", headers=learner).status_code == 403
        assert c.delete(f"/api/documents/{doc['id']}", headers=op).status_code == 200
        assert c.delete(f"/api/documents/{doc['id']}", headers=op).status_code == 404
        r = c.post("/api/tools/search", headers=learner, json={"query": "quokka", "source": "local"})
        assert r.json()["results"] == []


def test_unreachable_web_search_says_so_and_answers_from_the_index(live):
    server, people = live
    with httpx.Client(base_url=server.base_url, timeout=30, headers=auth(people["learner"][2])) as c:
        out = c.post("/api/tools/search", json={"query": "lambda expression"}).json()
        assert out["source"] == "local" and "is not reachable" in out["note"]
        assert out["results"][0]["title"] == "Python docs: lambda"
        r = c.post("/api/tools/search", json={"query": "lambda", "source": "web"})
        assert r.status_code == 503 and "is not reachable" in r.json()["detail"]


def test_bad_input_gets_a_4xx_naming_the_field(live):
    server, people = live
    with httpx.Client(base_url=server.base_url, timeout=30, headers=auth(people["operator"][2])) as c:
        def field_of(r):
            assert r.status_code == 422, r.text
            detail = r.json()["detail"]
            return detail[0]["loc"][-1] if isinstance(detail, list) else detail

        assert field_of(c.post("/api/tools/search", json={"query": "x", "k": 0})) == "k"
        assert field_of(c.post("/api/tools/search", json={"query": "x", "k": 51})) == "k"
        assert field_of(c.post("/api/tools/search", json={"query": ""})) == "query"
        assert field_of(c.post("/api/tools/search", json={"query": "   "})) == "query is empty"
        assert field_of(c.post("/api/tools/search", json={"query": "x", "source": "bing"})) == "source"
        assert field_of(c.post("/api/tools/python", json={})) == "code"
        assert field_of(c.post("/api/tools/python", json={"code": "x" * 20_001})) == \
            "code is 20001 characters; the limit is 20000"
        assert field_of(c.post("/api/documents", json={"title": "", "text": "t"})) == "title"
        assert field_of(c.post("/api/documents", json={"title": "t", "text": ""})) == "text"
        assert c.get("/api/documents/not-a-number").status_code == 422


@needs_sandbox
def test_python_runs_in_the_sandbox(live):
    server, people = live
    with httpx.Client(base_url=server.base_url, timeout=60, headers=auth(people["learner"][2])) as c:
        r = c.post("/api/tools/python", json={"code": "print(len('.' * 177), 'ubiquitous'[2::3])"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["stdout"] == "177 iiu\n" and out["exit_code"] == 0 and out["text"] == "177 iiu"
        assert "net-ns: no network" in out["guard"]
        info = c.get("/api/tools/python").json()
        assert info["isolated"] is True and info["limits"]["wall_s"] > 0
        out = c.post("/api/tools/python", json={"code": "import os; print(sorted(os.environ))"}).json()
        assert "DATABASE_URL" not in out["stdout"] and "PLAYGROUND_HOME" not in out["stdout"]


@needs_sandbox
def test_the_server_answers_while_code_runs_and_survives_attacks_on_its_parent(live):
    server, people = live
    headers = auth(people["learner"][2])
    result = {}

    def slow_call():
        with httpx.Client(base_url=server.base_url, timeout=60, headers=headers) as c:
            result["r"] = c.post("/api/tools/python", json={"code": "import time; time.sleep(3); print('done')"}).json()

    t = threading.Thread(target=slow_call)
    t.start()
    answered_while_running = 0
    with httpx.Client(base_url=server.base_url, timeout=5) as c:
        while t.is_alive():
            t0 = time.monotonic()
            assert c.get("/healthz").status_code == 200
            if t.is_alive() and time.monotonic() - t0 < 1.0:
                answered_while_running += 1
    t.join()
    assert result["r"]["stdout"] == "done\n"
    assert answered_while_running >= 3

    attack = ("import os, signal\n"
              "for pid in [os.getppid(), 1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
              "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n")
    with httpx.Client(base_url=server.base_url, timeout=60, headers=headers) as c:
        r = c.post("/api/tools/python", json={"code": attack})
        assert r.status_code == 200
        assert c.get("/healthz").status_code == 200 and server.proc.poll() is None
        assert c.post("/api/tools/python", json={"code": "print('ok')"}).json()["stdout"] == "ok\n"
