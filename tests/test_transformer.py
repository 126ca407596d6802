"""The transformer itself on tiny random models: causality, KV cache, left padding, GQA, bf16."""
from __future__ import annotations

import pytest
import torch

from models.transformer import ModelConfig, Transformer
from tests.helpers import make_tiny_model

V = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_tiny_model(V, max_seq_len=128)


def rand_ids(n, seed=0, batch=1):
    return torch.randint(0, V, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_future_tokens_do_not_change_past_logits(model):
    ids = rand_ids(12)
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 7) % V
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(model):
    ids = rand_ids(20, seed=1)
    full = model(ids)
    cache = model.new_cache(1, 64)
    steps = [model(ids[:, :10], cache)]  # prefill
    steps.append(model(ids[:, 10:14], cache))  # a multi-token chunk continuing a filled cache
    for t in range(14, 20):  # one token at a time
        steps.append(model(ids[:, t:t + 1], cache))
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(model):
    rows = [rand_ids(n, seed=10 + n)[0] for n in (9, 4, 1, 7)]
    longest = max(len(r) for r in rows)
    pad = torch.tensor([longest - len(r) for r in rows])
    batch = torch.stack([torch.cat([torch.zeros(longest - len(r), dtype=torch.long), r]) for r in rows])
    cache = model.new_cache(len(rows), 32, pad=pad)
    prefill = model(batch, cache)
    nxt = rand_ids(3, seed=99, batch=len(rows))
    decoded = [model(nxt[:, t:t + 1], cache) for t in range(3)]
    for b, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[b]])[None])
        n = len(r)
        torch.testing.assert_close(prefill[b, pad[b]:], alone[0, :n], atol=1e-4, rtol=1e-4)
        for t in range(3):
            torch.testing.assert_close(decoded[t][b, 0], alone[0, n + t], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(prefill).all()  # padding rows must not produce NaN


@torch.no_grad()
def test_shared_prefill_expand_and_select(model):
    prompt = rand_ids(6, seed=3)
    cache = model.new_cache(1, 32)
    model(prompt, cache)
    many = cache.expand(3)
    nxt = torch.tensor([[5], [17], [250]])
    out = model(nxt, many)
    for b in range(3):
        alone = model(torch.cat([prompt[0], nxt[b]])[None])[0, -1]
        torch.testing.assert_close(out[b, 0], alone, atol=1e-4, rtol=1e-4)
    many.select(torch.tensor([2]))  # keep the third sample only
    out = model(torch.tensor([[9]]), many)
    alone = model(torch.tensor([[*prompt[0].tolist(), 250, 9]]))[0, -1]
    torch.testing.assert_close(out[0, 0], alone, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_gqa_equals_full_attention_with_repeated_kv_heads():
    """A GQA model equals a plain multi-head model whose k/v heads are the GQA heads repeated."""
    gqa = make_tiny_model(V, n_heads=4, n_kv_heads=2, seed=5)
    mha = Transformer(ModelConfig(**{**gqa.cfg.to_dict(), "n_kv_heads": 4})).eval()
    sd = dict(gqa.state_dict())
    hd = gqa.cfg.head_dim
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            sd[k] = sd[k].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    ids = rand_ids(10, seed=6)
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_last_only_and_hidden_shapes(model):
    ids = rand_ids(5, batch=2)
    assert model(ids).shape == (2, 5, V)
    torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])
    assert model(ids, return_hidden=True).shape == (2, 5, model.cfg.dim)


def test_sequence_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="context length 128"):
        model(rand_ids(129))
    cache = model.new_cache(1, 128)
    with torch.no_grad():
        model(rand_ids(120), cache)
    with pytest.raises(ValueError, match="exceeds"):
        model(rand_ids(9), cache)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(dim=64, n_heads=5)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


@torch.no_grad()
def test_bf16_runs_on_cpu_and_stays_close_to_fp32(model):
    ids = rand_ids(16, seed=7)
    ref = model(ids)
    m16 = make_tiny_model(V, max_seq_len=128).to(torch.bfloat16)
    cache = m16.new_cache(1, 32)
    assert cache.k[0].dtype == torch.bfloat16
    out = torch.cat([m16(ids[:, :12], cache), m16(ids[:, 12:13], cache), m16(ids[:, 13:], cache)], dim=1)
    assert out.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: logits of this model are O(1), so 0.05 absolute is a few bf16 ulps.
    assert (out.float() - ref).abs().max() < 0.05
    assert (out.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@torch.no_grad()
def test_from_state_dict_rebuilds_same_model_and_rejects_mismatch(model):
    same = Transformer.from_state_dict(model.cfg, dict(model.state_dict()))
    assert same.lm_head.weight is same.model.embed_tokens.weight  # tying survives
    ids = rand_ids(8, seed=8)
    torch.testing.assert_close(same(ids), model(ids), atol=0, rtol=0)
    sd = dict(model.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="up_proj"):
        Transformer.from_state_dict(model.cfg, sd)
    with pytest.raises(ValueError, match="does not match"):
        Transformer.from_state_dict(ModelConfig(**{**model.cfg.to_dict(), "hidden_dim": 96}), dict(model.state_dict()))


def test_bf16_autocast_training_step_on_packed_rows_stays_close_to_fp32():
    """The training forward under CPU bf16 autocast (what SFT and pretraining run on AMX CPUs): packed rows
    with doc_ids, loss and every gradient within bf16 rounding of the fp32 step."""
    model = make_tiny_model(V, max_seq_len=128).train()
    ids = rand_ids(40, seed=11, batch=3)
    doc_ids = torch.tensor([[0] * 20 + [1] * 20, [0] * 40, [0] * 10 + [1] * 25 + [-1] * 5])

    def step(amp: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(ids[:, :-1], doc_ids=doc_ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss32, grads32 = step(False)
    loss16, grads16 = step(True)
    assert abs(loss16 - loss32) < 0.01 * loss32
    for name, g in grads32.items():
        assert (grads16[name] - g).norm() < 0.05 * g.norm(), name


def test_prefill_flops_count_the_matmuls_torch_counts():
    """backend.bench decode's prefill ceiling divides prefill_flops by the CPU's peak: its weight matmuls are the
    ones torch's FLOP counter sees in a forward (which also runs the output layer on every token, not the last)."""
    from torch.utils.flop_counter import FlopCounterMode

    from backend.train.metrics import prefill_flops
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=256)
    model, T = Transformer(cfg).eval(), 48
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 512, (1, T)))
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T * (T + 1) / 2  # causal: token t sees t + 1
    assert counter.get_total_flops() == prefill_flops(cfg, T) - attention + 2 * cfg.vocab_size * cfg.dim * (T - 1)
