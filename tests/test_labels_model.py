"""Ranking candidates and SFT drafts come from a real engine: a tiny random model in the registry
(fast), and one slow test with the bundled SmolLM2 and the pelican joke."""
from __future__ import annotations

import httpx
import pytest

from backend.db import Database
from tests.conftest import start_server
from tests.helpers import register_tiny_model
from tests.test_labels_api import auth, make_users


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("labels_model") / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [("op", "operator"), ("ann", "annotator")])
    server = start_server(data, "--model", "tiny", "--no-preload", "--no-worker")
    yield server, people
    server.stop()
    db.close()


def test_operator_samples_k_candidates_from_a_model(live):
    server, people = live
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
    server, people = live
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
    server, people = live
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
