"""/api/completion/* against a real `python app.py` on loopback: distributions equal the model's softmax under
the shaping, step and generate are reproducible by seed, branch starts with the chosen token, score gives
exp(mean NLL), regurgitation on a model pretrained here, and bad requests get a 4xx naming the field."""
from __future__ import annotations

import math

import httpx
import pytest
import torch

from backend.config import AppConfig
from models.registry import ModelRegistry
from tests.conftest import start_server
from tests.helpers import register_tiny_model

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("complapi") / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base", chat_format=None, max_seq_len=256)
    register_tiny_model(data, "broken", tokenizer="cl100k_base", chat_format=None, max_seq_len=256)
    (data / "models" / "broken" / "model.safetensors").write_bytes(b"not weights")  # a damaged checkpoint
    return data


@pytest.fixture(scope="module")
def zen(data_dir, tmp_path_factory):
    """A base model pretrained here on one short passage repeated: it memorises it."""
    from backend.train.pretrain import PretrainConfig, pretrain
    passage = ("Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
               "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. ")
    path = tmp_path_factory.mktemp("zen") / "zen.txt"
    path.write_text(passage * 60)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(PretrainConfig(preset="tiny", corpus=[str(path)], bpe_vocab_size=300, max_steps=60, lr=1e-2,
                                batch_size=8, seq_len=32, warmup_steps=5, eval_every=1000, eval_tokens=2048,
                                sample_every=1000, sample_tokens=16, checkpoint_every=1000, name="zen"),
                 AppConfig(data_dir=data_dir))
    finally:
        torch.set_num_threads(n)
    return passage


@pytest.fixture(scope="module")
def server(data_dir, zen):
    s = start_server(data_dir, "--model", "tiny", "--no-worker")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(data_dir):
    return ModelRegistry(AppConfig(data_dir=data_dir)).load("tiny", dtype=torch.float32)


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].double()


def test_distribution_is_the_models_softmax_after_temperature_and_top_k(client, model):
    body = client.post("/api/completion/distribution", json={"model": "tiny", "prompt": PROMPT, "temperature": 0.5,
                                                             "top_k": 3, "seed": 1, "top_n": 10}).json()
    ids = client.post("/api/completion/generate", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1}).json()["prompt_ids"]
    z = logits_of(model, ids)
    raw = torch.softmax(z, -1)
    top3 = torch.topk(z, 3).indices
    want = torch.zeros_like(raw)
    want[top3] = torch.softmax(z[top3] / 0.5, -1)
    assert [t["id"] for t in body["tokens"]] == torch.topk(raw, 10).indices.tolist()
    for t in body["tokens"]:
        assert t["raw"] == pytest.approx(float(raw[t["id"]]), rel=1e-4)
        assert t["filtered"] == pytest.approx(float(want[t["id"]]), rel=1e-4, abs=1e-9)
    assert body["kept"] == 3 and body["sampled"]["id"] in top3.tolist() and body["seed"] == 1


def test_step_and_generate_are_reproducible_by_seed_and_greedy_is_deterministic(client):
    req = {"model": "tiny", "prompt": PROMPT, "temperature": 1.0, "seed": 42}
    a, b = (client.post("/api/completion/step", json=req).json() for _ in range(2))
    assert a["token"] == b["token"] and a["prompt_ids"][-1] == a["token"]["id"]
    gen = {**req, "max_tokens": 12}
    assert client.post("/api/completion/generate", json=gen).json()["text"] == \
        client.post("/api/completion/generate", json=gen).json()["text"]
    texts = {client.post("/api/completion/generate", json={**gen, "seed": s}).json()["text"] for s in range(1, 5)}
    assert len(texts) > 1
    greedy = {**gen, "temperature": 0, "seed": None}
    outs = [client.post("/api/completion/generate", json={**greedy, "seed": s}).json()["text"] for s in (1, 2)]
    assert outs[0] == outs[1]


def test_branch_starts_with_the_chosen_token_and_continues_greedily(client, model):
    first = client.post("/api/completion/generate", json={"model": "tiny", "prompt": PROMPT, "temperature": 0,
                                                          "max_tokens": 4}).json()
    prefix = first["prompt_ids"] + [first["tokens"][0]["id"]]
    alt = first["tokens"][1]["top"][2]["id"]
    out = client.post("/api/completion/branch", json={"model": "tiny", "prefix_ids": prefix, "token_id": alt,
                                                      "temperature": 0, "max_tokens": 4}).json()
    assert out["prompt_ids"] == prefix and out["tokens"][0]["id"] == alt and len(out["tokens"]) == 4
    ctx = prefix + [alt]
    for t in out["tokens"][1:]:
        assert t["id"] == int(logits_of(model, ctx).argmax())
        ctx.append(t["id"])


def test_score_reports_perplexity(client):
    body = client.post("/api/completion/score", json={"model": "tiny", "text": "The quick brown fox jumps"}).json()
    lps = [t["logprob"] for t in body["tokens"][1:]]
    assert body["perplexity"] == pytest.approx(math.exp(-sum(lps) / len(lps)))
    assert body["tokens"][0]["logprob"] is None and body["scored_tokens"] == len(lps)


def test_regurgitation_on_a_model_pretrained_here(client, zen):
    body = client.post("/api/completion/regurgitation", json={"model": "zen", "n_samples": 2, "max_new_tokens": 24,
                                                              "temperature": 0}).json()
    assert body["longest"]["tokens"] == 24 and body["longest"]["text"] in zen * 2
    r = client.post("/api/completion/regurgitation", json={"model": "tiny"})
    assert r.status_code == 422 and "not pretrained here" in r.json()["detail"]


def test_presets_are_listed_with_what_to_notice(client):
    body = client.get("/api/completion/presets").json()
    names = [p["name"] for p in body["presets"]]
    assert any("2+2" in n for n in names) and any("Paris" in n for n in names) and len(names) >= 6
    assert all(p["notice"] and p["shortfall"] for p in body["presets"])
    assert "instruct" in body["note"]


@pytest.mark.parametrize("path,payload,status,field", [
    ("/api/completion/distribution", {"model": "nope", "prompt": "x"}, 404, "nope"),
    ("/api/completion/generate", {"model": "broken", "prompt": "x"}, 503, "could not be loaded"),
    ("/api/completion/distribution", {"model": "tiny", "prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/api/completion/distribution", {"model": "tiny", "prompt": "x", "temperature": -1}, 422, "temperature"),
    ("/api/completion/distribution", {"model": "tiny"}, 422, "prompt"),
    ("/api/completion/distribution", {"model": "tiny", "prompt": ""}, 422, "prompt"),
    ("/api/completion/step", {"model": "tiny", "prompt_ids": [10**8]}, 422, "token ids"),
    ("/api/completion/generate", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/api/completion/generate", {"model": "tiny", "prompt": "x", "top_k": "many"}, 422, "top_k"),
    ("/api/completion/branch", {"model": "tiny", "prefix_ids": [1], "token_id": -3}, 422, "token_id"),
    ("/api/completion/branch", {"model": "tiny", "prefix_ids": [], "token_id": 3}, 422, "prefix_ids"),
    ("/api/completion/score", {"model": "tiny", "text": "a"}, 422, "2 tokens"),
    ("/api/completion/score", {"model": "tiny"}, 422, "text"),
])
def test_bad_requests_get_an_error_naming_the_field(client, path, payload, status, field):
    r = client.post(path, json=payload)
    assert r.status_code == status, r.text
    assert field in r.text
