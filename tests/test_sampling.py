"""The one sampling function: temperature, top-k, top-p, seeds, raw log-probs."""
from __future__ import annotations

import pytest
import torch

from backend.serving.sampling import SamplingParams, filtered_probs, make_generator, sample, token_logprobs

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def test_temperature_zero_is_greedy_one_hot():
    logits = torch.tensor([[0.1, 2.0, -1.0, 2.0]])
    p = filtered_probs(logits, temperature=0)
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0]]  # first of the tied maxima
    assert sample(logits, SamplingParams(temperature=0), None).tolist() == [1]


def test_temperature_scales_the_softmax():
    p = filtered_probs(LOGITS, temperature=0.5)
    expected = torch.softmax(LOGITS / 0.5, -1)
    assert torch.allclose(p, expected, atol=1e-6)
    assert p[0, 0] > PROBS[0, 0]  # sharper


def test_top_k_keeps_the_k_most_likely_and_renormalises():
    p = filtered_probs(LOGITS, temperature=1.0, top_k=2)
    assert torch.allclose(p, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]), atol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    p = filtered_probs(LOGITS, temperature=1.0, top_p=0.8)
    assert (p[0] > 0).tolist() == [True, True, False, False]
    p = filtered_probs(LOGITS, temperature=1.0, top_p=0.81)
    assert (p[0] > 0).tolist() == [True, True, True, False]
    p = filtered_probs(LOGITS, temperature=1.0, top_p=0.01)
    assert p.tolist() == [[1.0, 0.0, 0.0, 0.0]]  # the top token always stays
    assert torch.allclose(p.sum(-1), torch.ones(1))


def test_sampling_frequencies_follow_the_distribution():
    g = make_generator(1234)
    logits = LOGITS.expand(20000, -1)
    tokens = sample(logits, SamplingParams(temperature=1.0), g)
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    assert torch.allclose(freq, PROBS[0], atol=0.015), freq


def test_seed_reproduces_and_ignores_the_global_rng():
    logits = torch.zeros(8, 1000)
    torch.manual_seed(1)
    a = sample(logits, SamplingParams(), make_generator(7))
    torch.manual_seed(2)
    torch.rand(100)
    b = sample(logits, SamplingParams(), make_generator(7))
    c = sample(logits, SamplingParams(), make_generator(8))
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_logprobs_are_the_raw_distribution_with_top_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    chosen, top_v, top_i = token_logprobs(logits, torch.tensor([2]), k=2)
    logp = torch.log_softmax(logits, -1)
    assert chosen.item() == pytest.approx(logp[0, 2].item())
    assert top_i.tolist() == [[1, 2]]
    assert top_v[0].tolist() == pytest.approx(logp[0, [1, 2]].tolist())
    chosen, top_v, top_i = token_logprobs(logits, torch.tensor([0]), k=0)
    assert top_v.shape == (1, 0) and chosen.item() == pytest.approx(logp[0, 0].item())


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("max_tokens", -1), ("logprobs", -2)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()
