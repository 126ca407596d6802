"""/api/tokenize, /api/encodings and /api/bpe/* against a real `python app.py` on loopback."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import start_server
from tests.helpers import add_user


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("tokapi") / "data"
    _, key = add_user(data, "lea", "learner")  # training a tokenizer needs a signed-in user; tokenizing does not
    s = start_server(data, "--no-preload", "--no-worker")
    s.key = key
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def learner(server):
    with httpx.Client(base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {server.key}"}) as c:
        yield c


def test_encodings_lists_the_builtins(client):
    r = client.get("/api/encodings")
    assert r.status_code == 200
    body = r.json()
    assert {"cl100k_base", "smollm2"} <= set(body["encodings"]) and body["max_text_chars"] > 0


def test_tokenize_returns_ids_text_bytes_and_offsets(client):
    r = client.post("/api/tokenize", json={"text": "hello world", "encoding": "cl100k_base"})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 2
    assert [(t["id"], t["text"], t["start"], t["end"]) for t in body["tokens"]] == [(15339, "hello", 0, 5), (1917, " world", 5, 11)]
    assert body["tokens"][1]["bytes"] == list(b" world")
    assert body["counts"] == {"tokens": 2, "chars": 11, "bytes": 11, "graphemes": 11, "chars_per_token": 5.5}


def test_tokenize_marks_partial_bytes(client):
    body = client.post("/api/tokenize", json={"text": "👋", "encoding": "cl100k_base"}).json()
    assert body["count"] >= 2 and all(t["partial"] for t in body["tokens"])
    assert bytes(b for t in body["tokens"] for b in t["bytes"]) == "👋".encode()


def test_smollm2_encoding_differs_on_numbers(client):
    cl = client.post("/api/tokenize", json={"text": "12345", "encoding": "cl100k_base"}).json()
    sm = client.post("/api/tokenize", json={"text": "12345", "encoding": "smollm2"}).json()
    assert [t["text"] for t in cl["tokens"]] == ["123", "45"]
    assert [t["text"] for t in sm["tokens"]] == list("12345")  # SmolLM2 splits every digit
    cmp = client.post("/api/tokenize/compare", json={"text": "12345", "a": "cl100k_base", "b": "smollm2"}).json()
    assert cmp["difference"] == 3 and "+3" in cmp["summary"]


def test_bad_requests_get_4xx_naming_the_problem(client):
    r = client.post("/api/tokenize", json={"text": "x", "encoding": "no-such-enc"})
    assert r.status_code == 404 and "no-such-enc" in r.json()["detail"] and "cl100k_base" in r.json()["detail"]
    r = client.post("/api/tokenize", json={"text": "a" * 100_001})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = client.post("/api/tokenize", content=b'{"text": "bad \\ud800 surrogate"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.json()["detail"]
    r = client.post("/api/tokenize", json={"encoding": "cl100k_base"})
    assert r.status_code == 422 and "text" in r.text
    r = client.get("/api/encodings/cl100k_base/merge-tree/999999999")
    assert r.status_code == 404 and "999999999" in r.json()["detail"]


def test_presplit_and_merge_tree(client):
    body = client.post("/api/tokenize/presplit", json={"text": "Hello world 12345"}).json()
    assert [c["text"] for c in body["chunks"]] == ["Hello", " world", " ", "123", "45"]
    tree = client.get("/api/encodings/cl100k_base/merge-tree/15339").json()
    assert tree["tree"]["bytes"] == list(b"hello") and len(tree["tree"]["children"]) == 2
    assert tree["lines"][0].startswith("15339 'hello' =")


def test_bpe_steps_show_the_first_merges(client):
    body = client.post("/api/bpe/steps", json={"text": "low lower lowest " * 20, "steps": 3, "pattern": "gpt2"}).json()
    merges = body["merges"]
    assert [m["new_id"] for m in merges] == [256, 257, 258]
    assert merges[0]["count"] >= merges[1]["count"] >= merges[2]["count"]
    assert merges[0]["text"] in (" l", "lo", "ow")
    r = client.post("/api/bpe/steps", json={"corpus": "python-docs", "text": "both", "steps": 1})
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    r = client.post("/api/bpe/steps", json={"text": "abc", "pattern": "([", "steps": 1})
    assert r.status_code == 422 and "pattern" in r.json()["detail"]
    r = client.post("/api/bpe/steps", json={"corpus": "nope", "steps": 1})
    assert r.status_code == 422 and "nope" in r.json()["detail"]


def test_bpe_train_registers_an_encoding_usable_at_once(client, learner):
    r = learner.post("/api/bpe/train", json={"corpus": "python-docs", "max_chars": 100_000, "vocab_size": 512,
                                            "name": "api-bpe"})
    assert r.status_code == 200, r.text
    assert r.json()["merges"] == 256
    assert "api-bpe" in client.get("/api/encodings").json()["encodings"]
    body = client.post("/api/tokenize", json={"text": "def function(self):", "encoding": "api-bpe"}).json()
    assert 0 < body["count"] < len("def function(self):")
    again = learner.post("/api/bpe/train", json={"corpus": "python-docs", "max_chars": 10_000, "vocab_size": 300,
                                                "name": "api-bpe"})
    assert again.status_code == 422 and "already exists" in again.json()["detail"]


def test_bpe_curve(learner):
    body = learner.post("/api/bpe/curve", json={"corpus": "python-docs", "max_chars": 100_000, "vocab_size": 1024}).json()
    values = [p["tokens_per_1000_chars"] for p in body["curve"]]
    assert body["curve"][0]["vocab_size"] == 256 and body["curve"][-1]["vocab_size"] == 1024
    assert values == sorted(values, reverse=True)


def test_chat_view_renders_through_the_chat_format(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And times 3?"}]
    body = client.post("/api/tokenize/chat", json={"messages": messages, "encoding": "smollm2"}).json()
    assert body["text"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert body["generation_prompt"] == "<|im_start|>assistant\n"
    assert body["text"].endswith("<|im_start|>assistant\n") and body["count"] == len(body["ids"])
    trained = "".join(t["text"] for t, m in zip(body["tokens"], body["mask"]) if m)
    assert trained == "4<|im_end|>"  # only the assistant's answer and its end token get loss
    plain = client.post("/api/tokenize/chat", json={"messages": messages, "encoding": "smollm2",
                                                    "add_generation_prompt": False}).json()
    assert plain["count"] < body["count"] and plain["generation_prompt"] == ""
    # cl100k_base has no ChatML tokens: the chat view uses cl100k_base+chatml, GPT-4's <|im_start|> is 100264
    gpt4 = client.post("/api/tokenize/chat", json={"messages": messages, "encoding": "cl100k_base"}).json()
    assert gpt4["ids"][0] == 100264 and gpt4["encoding"] == "cl100k_base+chatml"
    bad = client.post("/api/tokenize/chat", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert bad.status_code == 422 and "role" in bad.json()["detail"]
