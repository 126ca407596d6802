"""A served model registered as a remote model: app A chats through app B (two real servers on loopback)."""
from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from backend.serving.sampling import SamplingParams
from tests.conftest import ROOT, start_server
from tests.helpers import register_tiny_model
from tests.test_labels_api import auth, database_with_users
from tests.test_openai_api import ANSWER as COMPLETION, CHAIN

ANSWER = "The" + COMPLETION  # the chat reply

CHATML = "cl100k_base+chatml"


def register_bigram(data) -> None:
    """B's 'bigram' chat model: after any chat prompt it says ANSWER, then <|endoftext|> (cf. test_openai_api)."""
    from backend.config import AppConfig
    from models.chat_format import render_chat
    from models.registry import ModelRegistry
    from models.tokenizers import get_encoding
    from tests.test_engine import bigram_model

    enc = get_encoding(CHATML, data)
    prompt_end = render_chat([{"role": "user", "content": "hi"}], enc, add_generation_prompt=True).ids[-1]
    ids = [enc.encode_single_token(p) for p in CHAIN] + [enc.eot_token]
    table = dict(zip(ids[:-1], ids[1:]))
    table[prompt_end] = ids[0]
    ModelRegistry(AppConfig(data_dir=data)).register(
        "bigram", bigram_model(enc.max_token_value + 1, table), CHATML, "chatml", {"test": True})


def models_cli(data, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.models", "--data-dir", str(data), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    data_b = tmp_path_factory.mktemp("b") / "data"
    data_a = tmp_path_factory.mktemp("a") / "data"
    register_bigram(data_b)
    b = start_server(data_b, "--no-worker", "--no-preload")
    data_a.mkdir(parents=True)
    _, people = database_with_users(data_a, [("ada", "admin"), ("lee", "learner"), ("ops", "operator")])
    register_tiny_model(data_a, "tiny", tokenizer=CHATML)  # for the export door
    a = start_server(data_a, "--no-worker", "--no-preload")
    yield a, b, people
    a.stop()
    b.stop()


def test_add_remote_by_cli_then_chat_through_a(servers):
    a, b, _ = servers
    r = models_cli(a.data_dir, "add-remote", "via-b", "--base-url", b.base_url + "/v1", "--model", "bigram",
                   "--tokenizer", "cl100k_base")
    assert r.returncode == 0, r.stderr
    assert "context 256" in r.stdout  # B's max_model_len, read from its /v1/models
    listing = models_cli(a.data_dir, "list").stdout
    assert "via-b" in listing and b.base_url in listing

    client = openai.OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert "via-b" in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(model="via-b", messages=[{"role": "user", "content": "hi"}], max_tokens=40)
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="via-b", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=40, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ANSWER
    # token probabilities come from B, named by A's tokenizer: the same as asking B directly
    kw = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True, top_logprobs=2)
    via_a = client.chat.completions.create(model="via-b", **kw).choices[0].logprobs.content
    direct = openai.OpenAI(base_url=b.base_url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="bigram", **kw).choices[0].logprobs.content
    assert [(t.token, round(t.logprob, 4), [x.token for x in t.top_logprobs]) for t in via_a] == \
        [(t.token, round(t.logprob, 4), [x.token for x in t.top_logprobs]) for t in direct]
    assert models_cli(a.data_dir, "remove", "via-b").returncode == 0
    assert "via-b" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="via-b", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_tabs_services_use_the_remote_model(servers):
    """Candidate generation, drafts, chat samples and batched completions, in a Playground over A's data dir."""
    a, b, _ = servers
    from backend.config import AppConfig
    from backend.labels.candidates import draft_reply, sample_candidates
    from backend.playground import Playground
    from backend.serving.remote_engine import RemoteUnsupported
    from models.registry import ModelRegistry

    ModelRegistry(AppConfig(data_dir=a.data_dir)).add_remote("b-bigram", b.base_url + "/v1", "bigram",
                                                             tokenizer="cl100k_base", context_length=256)
    pg = Playground(AppConfig(data_dir=a.data_dir, start_worker=False, preload=False))
    assert sample_candidates(pg.engines, "b-bigram", "hi", k=3, temperature=1.0, max_tokens=30) == [ANSWER.strip()] * 3
    assert draft_reply(pg.engines, "b-bigram", [{"role": "user", "content": "hi"}], max_tokens=30) == ANSWER.strip()
    from backend import chat_service, practice
    events = list(chat_service.turn_events(pg, "b-bigram", "", [{"role": "user", "content": "hi"}],
                                           SamplingParams(temperature=0, max_tokens=30), [], 0))
    assert [e.result.message["content"] for e in events if e.type == "done"] == [ANSWER]  # Chat tab, Arena
    sols = practice.sample_solutions(pg, "b-bigram", [practice.typed_problem("2+2?", "4")],
                                     practice.PracticeConfig(n=3, max_tokens=30), seed=1)
    assert [(s["text"], s["right"]) for s in sols[0]] == [(ANSWER, False)] * 3
    eng = pg.engines.get("b-bigram")
    # several prompts, n samples each, sent as text to B's /v1/completions, merged back by index
    p = eng.chat_prompt([{"role": "user", "content": "hi"}])
    comps = eng.complete_batch([list(p), list(p)], SamplingParams(temperature=0, max_tokens=30, logprobs=1), n=2)
    assert [c.index for c in comps] == [0, 1, 2, 3]
    assert all(c.text == ANSWER and c.finish_reason == "stop" for c in comps)
    assert eng.enc.decode(comps[0].token_ids) == ANSWER and len(comps[0].logprobs) == len(comps[0].token_ids)
    assert "".join(eng.stream_text("hi", SamplingParams(temperature=0, max_tokens=30), chat=True))[-len(ANSWER):] == ANSWER
    # the Generate tab's token stream with probabilities works; what needs the weights here says so
    from backend import completion
    toks = list(completion.stream_tokens(eng, list(p), SamplingParams(temperature=0, max_tokens=30), top=2))
    assert eng.enc.decode([t["id"] for t in toks[:-1]]) == ANSWER and toks[-1] == {"finish_reason": "stop"}
    assert toks[0]["prob"] > 0.99 and len(toks[0]["top"]) == 2
    with pytest.raises(RemoteUnsupported, match="step mode"):
        completion.step(eng, list(p), SamplingParams(temperature=1.0))
    with pytest.raises(RemoteUnsupported, match="prompt log-probs"):
        eng.prompt_logprobs(list(p))


def test_rest_admin_registers_and_removes_remote_models(servers):
    a, b, people = servers
    body = {"name": "rest-b", "base_url": b.base_url + "/v1", "model": "bigram"}
    lee, ada = auth(people["lee"][2]), auth(people["ada"][2])
    assert httpx.post(a.base_url + "/api/models/remote", json=body, headers=lee).status_code == 403
    bad = httpx.post(a.base_url + "/api/models/remote", json={**body, "model": "nope"}, headers=ada, timeout=30)
    assert bad.status_code == 502 and "does not serve a model named 'nope'" in bad.json()["detail"]
    assert "rest-b" not in [m["name"] for m in httpx.get(a.base_url + "/api/models").json()["models"]]
    r = httpx.post(a.base_url + "/api/models/remote", json=body, headers=ada, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "remote" and r.json()["context_length"] == 256
    assert r.json()["remote"] == {"base_url": b.base_url + "/v1", "model": "bigram", "api_key_env": None}
    assert httpx.post(a.base_url + "/api/models/remote", json=body, headers=ada, timeout=30).status_code == 409
    assert httpx.delete(a.base_url + "/api/models/rest-b", headers=lee).status_code == 403
    assert httpx.delete(a.base_url + "/api/models/rest-b", headers=ada).status_code == 200
    assert httpx.get(a.base_url + "/api/models/rest-b").status_code == 404


def test_unreachable_server_and_missing_key_are_named(servers, tmp_path):
    a, b, _ = servers
    from backend.serving.remote_engine import RemoteError, remote_engine
    from models.registry import ModelRegistry
    from backend.config import AppConfig
    from tests.conftest import free_port

    reg = ModelRegistry(AppConfig(data_dir=tmp_path / "d"))
    r = models_cli(tmp_path / "d", "add-remote", "gone", "--base-url", f"http://127.0.0.1:{free_port()}/v1",
                   "--model", "x")
    assert r.returncode == 1 and "cannot reach" in r.stderr
    assert "gone" not in reg.names()
    spec = reg.add_remote("gone", f"http://127.0.0.1:{free_port()}/v1", "x", context_length=64)
    with pytest.raises(RemoteError, match="cannot reach .* for model 'gone'"):
        remote_engine(spec, reg.cfg.data_dir).chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4))
    keyed = reg.add_remote("keyed", b.base_url + "/v1", "bigram", api_key_env="PG_TEST_UNSET_KEY", context_length=64)
    with pytest.raises(RemoteError, match=r"\$PG_TEST_UNSET_KEY, which is not set"):
        remote_engine(keyed, reg.cfg.data_dir).chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="base_url must be an http"):
        reg.add_remote("bad", "ftp://x", "m")
    with pytest.raises(ValueError, match="no weights"):
        reg.load("gone")


def test_rest_export_for_operators(servers):
    a, _, people = servers
    url = a.base_url + "/api/models/tiny/export"
    assert httpx.post(url, json={"format": "gguf"}, headers=auth(people["lee"][2])).status_code == 403
    bad = httpx.post(url, json={"format": "onnx"}, headers=auth(people["ops"][2]))
    assert bad.status_code == 422 and "format" in bad.text
    assert httpx.post(a.base_url + "/api/models/nope/export", json={}, headers=auth(people["ops"][2])).status_code == 404
    from backend.config import AppConfig
    from models.registry import ModelRegistry
    ModelRegistry(AppConfig(data_dir=a.data_dir)).add_remote("far", "http://127.0.0.1:9/v1", "m", overwrite=True)
    far = httpx.post(a.base_url + "/api/models/far/export", json={}, headers=auth(people["ops"][2]))
    assert far.status_code == 422 and "no weights to export" in far.json()["detail"]
    r = httpx.post(url, json={"format": "gguf"}, headers=auth(people["ops"][2]), timeout=120)
    assert r.status_code == 200, r.text
    from pathlib import Path
    path = Path(r.json()["path"])
    assert path.parent == a.data_dir / "exports" and path.suffix == ".gguf" and path.stat().st_size > 1_000_000


@pytest.mark.browser
def test_admin_adds_a_served_model_in_the_models_tab_and_chats_with_it(servers):
    pytest.importorskip("playwright.sync_api")
    from tests.conftest import log_in, open_tab
    a, b, people = servers
    with open_tab(a, "Models", "#models-table") as page:
        log_in(page, "ada", people["ada"][1])
        page.get_by_text("Add a served model (admins)").click()
        page.locator("#remote-name input, #remote-name textarea").first.fill("ui-b")
        page.locator("#remote-url input, #remote-url textarea").first.fill(b.base_url + "/v1")
        page.locator("#remote-model input, #remote-model textarea").first.fill("bigram")
        page.locator("#remote-add").click()
        page.wait_for_function("() => (document.querySelector('#models-status')?.innerText || '').includes('Added')",
                               timeout=60_000)
        assert "context 256" in page.locator("#models-status").inner_text()
        assert "bigram @ " + b.base_url in page.locator("#models-table").inner_text()
        # the Chat tab picks it up like a local model
        page.get_by_role("tab", name="Chat", exact=True).click()
        page.get_by_role("button", name="↻ models", exact=True).click()  # only the visible tab's button counts
        box = page.locator("#chat-model input")
        box.click()
        box.fill("ui-b")
        page.get_by_role("option", name="ui-b", exact=True).click()
        page.locator("#chat-input textarea").fill("hi")
        page.locator("#chat-send").click()
        page.wait_for_function("(t) => (document.querySelector('#chat-bot')?.innerText || '').includes(t)",
                               arg=ANSWER.strip()[:-2], timeout=60_000)
