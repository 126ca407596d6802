"""One access rule for every door (backend/auth.py): every REST route and every Gradio event handler
declares one; tools, training and writes need a signed-in user, over REST, /v1 and Gradio alike; the
openai client works with api_key=<user key>; --no-open-inference closes plain generation to anonymous callers."""
from __future__ import annotations

import json
from importlib import import_module

import httpx
import openai
import pytest
from argon2 import PasswordHasher
from fastapi.routing import APIRoute

from backend import users
from backend.api import ROUTES
from backend.auth import RULES
from backend.config import AppConfig
from backend.db import Database
from tests.conftest import start_server
from tests.helpers import gradio_call, gradio_handlers, register_tiny_model
from tests.scripted import register_scripted

# POST routes anyone may call: they compute from public data and write nothing.
PUBLIC_POSTS = {"/api/login", "/api/logout", "/api/tokenize", "/api/tokenize/compare", "/api/tokenize/presplit",
                "/api/tokenize/chat", "/api/bpe/steps"}
PYTHON_CALL = '<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>'
SEARCH_CALL = '<tool_call>{"name": "search", "arguments": {"query": "private plan"}}</tool_call>'


def rule_of(route: APIRoute) -> str | None:
    for dep in route.dependant.dependencies:
        if getattr(dep.call, "required_role", None):
            return dep.call.required_role
    return None


@pytest.fixture
def pg(tmp_path):
    from backend.playground import Playground
    return Playground(AppConfig(data_dir=tmp_path / "data", start_worker=False, preload=False))


def test_every_route_declares_a_rule_and_every_write_needs_a_user():
    routers = [import_module(f"backend.api.{module}").router for module, _ in ROUTES]  # what app.py mounts
    routes = [(m, r.path, rule_of(r)) for router in routers for r in router.routes if isinstance(r, APIRoute)
              for m in sorted(r.methods)]
    assert len(routes) > 60
    assert [(m, p) for m, p, rule in routes if rule not in RULES] == []
    open_writes = [(m, p) for m, p, rule in routes if m in ("POST", "PUT", "PATCH", "DELETE")
                   and rule == "public" and p not in PUBLIC_POSTS]
    assert open_writes == []
    rules = {p: rule for _, p, rule in routes}
    assert rules["/api/bpe/train"] == "learner" and rules["/v1/chat/completions"] == "inference"


def test_every_gradio_handler_declares_a_rule(pg):
    """Walks every event handler of the UI: a new handler without ui.login.door / public fails here."""
    from ui import build_ui
    blocks = build_ui(pg)
    handlers = [bf for bf in blocks.fns.values() if bf.fn is not None]  # fn None: a browser-only Stop
    assert len(handlers) > 100
    missing = [f"{bf.api_name} ({bf.fn.__code__.co_filename.rsplit('/', 1)[-1]}:{bf.fn.__code__.co_firstlineno})"
               for bf in handlers if getattr(bf.fn, "door_rule", None) not in RULES]
    assert missing == []
    rules = {bf.api_name: bf.fn.door_rule for bf in handlers}
    assert rules["train"] == "learner" and rules["start_job"] == "operator" and rules["do_add"] == "admin"
    assert rules["on_send"] == "inference" and rules["submit"] == "annotator"


# ---- against a real server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("access_live") / "data"
    # A scripted chat model: after a tool output it answers "done" (tests/scripted.py).
    register_scripted(data, "scripted", ["done"], {"</tool_output>": "done", "done": "<|im_end|>"})
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    users._hasher = PasswordHasher(time_cost=1, memory_cost=1024)
    try:
        people = {n: users.add_user(db, n, r) for n, r in [("lea", "learner"), ("ann", "annotator"), ("op", "operator")]}
    finally:
        users._hasher = PasswordHasher()
    server = start_server(data, "--model", "scripted", "--no-worker")
    with httpx.Client(timeout=60) as c:
        r = c.post(server.base_url + "/api/documents", headers=bearer(people["op"][2]),
                   json={"title": "Private plan", "text": "The private plan is the operator's secret ZEBRA-7."})
        assert r.status_code == 200, r.text
    yield server, people
    server.stop()
    db.close()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def sdk_args(prefix: str, tool: str) -> dict:
    """chat_body for the openai client: assistant_prefix is an extension, sent in extra_body."""
    body = chat_body(prefix, tool)
    extra = {"assistant_prefix": body.pop("assistant_prefix")}
    return {**body, "extra_body": extra}


def chat_body(prefix: str, tool: str) -> dict:
    return {"model": "scripted", "messages": [{"role": "user", "content": "go"}], "max_tokens": 20,
            "tools": [{"type": "function", "function": {"name": tool}}], "assistant_prefix": prefix}


@pytest.mark.parametrize("tool,prefix", [("python", PYTHON_CALL), ("search", SEARCH_CALL)])
def test_v1_tools_refuse_anonymous_callers(live, tool, prefix):
    server, _ = live
    for headers in ({}, bearer("unused"), bearer("pk_not_a_key")):
        r = httpx.post(server.base_url + "/v1/chat/completions", json=chat_body(prefix, tool), headers=headers, timeout=60)
        assert r.status_code == 401, r.text
        assert "ZEBRA" not in r.text and "42" not in r.text
        assert "log in" in r.json()["error"]["message"] or "not valid" in r.json()["error"]["message"]


def test_openai_client_with_a_user_key_runs_search(live):
    server, people = live
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=people["lea"][2], max_retries=0, timeout=120)
    r = client.chat.completions.create(**sdk_args(SEARCH_CALL, "search"))
    steps = r.choices[0].message.tool_steps
    assert steps[0]["tool"] == "search" and "ZEBRA-7" in steps[0]["output"]
    anonymous = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(**sdk_args(SEARCH_CALL, "search"))
    # plain chat stays open to anonymous callers by default (--open-inference)
    plain = anonymous.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_openai_client_with_a_user_key_runs_python(live, sandbox_required):
    server, people = live
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=people["lea"][2], max_retries=0, timeout=120)
    r = client.chat.completions.create(**sdk_args(PYTHON_CALL, "python"))
    assert r.choices[0].message.tool_steps[0]["output"].strip().startswith("42")


def test_training_a_tokenizer_needs_a_user_over_rest_and_gradio(live):
    server, people = live
    tokenizers = server.data_dir / "tokenizers"
    corpus = "the cat sat on the mat; the dog sat on the log. " * 100
    body = {"text": corpus, "vocab_size": 300, "name": "anon-rest"}
    assert httpx.post(server.base_url + "/api/bpe/train", json=body, timeout=60).status_code == 401
    gr_inputs = ["pasted text", corpus, None, 100000, "gpt4", "", 300, "anon-gradio"]
    kind, out = gradio_call(server.base_url, "train", gr_inputs)
    assert kind == "error" and "Log in" in json.dumps(out)
    assert not list(tokenizers.glob("anon-*"))
    # a learner may: REST by key, Gradio by the browser's session cookie
    r = httpx.post(server.base_url + "/api/bpe/train", json={**body, "name": "lea-rest"}, headers=bearer(people["lea"][2]),
                   timeout=60)
    assert r.status_code == 200, r.text
    login = httpx.post(server.base_url + "/api/login", json={"name": "lea", "password": people["lea"][1]})
    kind, out = gradio_call(server.base_url, "train", gr_inputs[:-1] + ["lea-gradio"], cookies=dict(login.cookies))
    assert kind == "complete" and "Trained **lea-gradio**" in out[0]
    assert {p.stem for p in tokenizers.glob("lea-*.tiktoken")} == {"lea-rest", "lea-gradio"}


def test_chat_tab_tools_need_a_user(live):
    server, people = live
    # on_send's inputs: text, conversation, model, system, tools, tool-call limit, temperature, top-p, max tokens, seed,
    # frequency, presence and repetition penalties
    inputs = ["look it up", [], "scripted", "", ["search"], 2, 0, 1, 20, "", 0, 0, 1]
    kind, out = gradio_call(server.base_url, "on_send", inputs)
    assert kind == "complete"
    assert "Tools need a signed-in user" in out[3] and "ZEBRA" not in json.dumps(out)
    kind, out = gradio_call(server.base_url, "on_send", inputs[:4] + [[]] + inputs[5:])  # no tools: plain chat is open
    assert kind == "complete" and out[3].startswith("done")


def test_annotators_cannot_use_operator_doors(live):
    server, people = live
    key = bearer(people["ann"][2])
    r = httpx.post(server.base_url + "/api/documents", headers=key, json={"title": "x", "text": "y"})
    assert r.status_code == 403 and "operator" in r.json()["detail"]
    login = httpx.post(server.base_url + "/api/login", json={"name": "ann", "password": people["ann"][1]})
    inputs = gradio_handlers(server.base_url)["start_job"]
    kind, out = gradio_call(server.base_url, "start_job", inputs, cookies=dict(login.cookies))
    assert kind == "error" and "operator" in json.dumps(out)


def test_closed_inference_needs_a_user_everywhere(tmp_path):
    data = tmp_path / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml")
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    _, _, key = users.add_user(db, "lea", "learner")
    db.close()
    server = start_server(data, "--model", "tiny", "--no-preload", "--no-worker", "--no-open-inference")
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(server.base_url + "/api/completion/generate", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 401
        kind, _ = gradio_call(server.base_url, "on_send", ["hi", [], "tiny", "", [], 0, 0, 1, 2, "", 0, 0, 1])
        assert kind == "error"
        assert httpx.post(server.base_url + "/api/tokenize", json={"text": "hi"}).status_code == 200  # still public
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)
        assert client.chat.completions.create(**body).usage.completion_tokens >= 1
    finally:
        server.stop()
