"""Regurgitation, measured: how much of what a model writes is copied verbatim from its training text.

A base model that saw a passage many times can recite it (DEMOS 7). We prompt the model with the
opening of training passages (or any prompt), sample a continuation, and find the longest run of
generated tokens that occurs, token for token, somewhere in the training split. A few tokens in a
row happen by chance ("of the"); dozens mean memorised text.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numpy as np
import tiktoken
import torch

from backend.serving.sampling import filtered_probs
from models.transformer import Transformer


@torch.no_grad()
def sample_ids(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
               top_k: int = 0, generator: torch.Generator | None = None,
               autocast: torch.dtype | None = None) -> list[int]:
    """Sample a continuation of `prompt` with a KV cache; returns only the new token ids."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    ctx_len = model.cfg.max_seq_len
    prompt = prompt[-max(1, ctx_len - max_new_tokens):]
    max_new_tokens = min(max_new_tokens, ctx_len - len(prompt))
    was_training = model.training
    model.eval()
    device = model.device
    amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext())
    out: list[int] = []
    try:
        with amp:
            cache = model.new_cache(1, len(prompt) + max_new_tokens)
            logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
            for _ in range(max_new_tokens):
                probs = filtered_probs(logits[0, -1], temperature, top_k)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
                out.append(nxt)
                if len(out) == max_new_tokens:
                    break
                logits = model(torch.tensor([[nxt]], device=device), cache=cache)
    finally:
        model.train(was_training)
    return out


@dataclass
class Span:
    tokens: int          # length of the longest copied run, in tokens
    chars: int           # the same run in characters
    text: str            # the run itself
    start: int           # where it starts in the generated ids
    train_offset: int    # where it occurs in the training tokens (-1 when tokens == 0)


class TrainIndex:
    """The training tokens as one byte string, so `bytes.find` (C speed) answers "does this run occur?"."""

    def __init__(self, train_tokens: np.ndarray):
        self.dtype = np.dtype(train_tokens.dtype)
        self.hay = np.ascontiguousarray(train_tokens).tobytes()

    def find(self, ids: list[int]) -> int:
        """Token offset of the first occurrence of ids in the training tokens, or -1."""
        needle = np.asarray(ids, dtype=self.dtype).tobytes()
        size = self.dtype.itemsize
        pos = self.hay.find(needle)
        while pos != -1 and pos % size:  # a match straddling two tokens' bytes is no match
            pos = self.hay.find(needle, pos + 1)
        return -1 if pos == -1 else pos // size


def longest_copied_span(generated: list[int], index: TrainIndex, enc: tiktoken.Encoding) -> Span:
    """The longest run of `generated` found verbatim in the training tokens.

    For each start we only test whether a run one longer than the best so far occurs (if it does not,
    no longer run from that start can): at most ~2n substring searches.
    """
    best, best_start, best_off = 0, 0, -1
    n = len(generated)
    for i in range(n):
        while i + best + 1 <= n:
            off = index.find(generated[i:i + best + 1])
            if off == -1:
                break
            best, best_start, best_off = best + 1, i, off
    text = enc.decode(generated[best_start:best_start + best]) if best else ""
    return Span(best, len(text), text, best_start, best_off)


def measure_regurgitation(model: Transformer, enc: tiktoken.Encoding, train_tokens: np.ndarray, *,
                          n_samples: int = 4, prompt: str | None = None, prompt_tokens: int = 16,
                          max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 0, seed: int = 0,
                          autocast: torch.dtype | None = None) -> dict:
    """Sample continuations and report each one's longest verbatim copy from the training text.

    Without `prompt`, each sample is prompted with the first `prompt_tokens` of a random training
    passage (what the model would recite if it memorised it); the true continuation is returned beside it.
    """
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError("n_samples and max_new_tokens must be at least 1")
    if prompt is not None and not prompt.strip():
        raise ValueError("prompt is empty")
    index = TrainIndex(train_tokens)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_samples):
        if prompt is not None:
            p_ids, truth = enc.encode_ordinary(prompt), None
        else:
            need = prompt_tokens + max_new_tokens
            if len(train_tokens) <= need:
                raise ValueError(f"the training text has {len(train_tokens)} tokens, too few for a "
                                 f"{prompt_tokens}-token prompt and {max_new_tokens} new tokens")
            at = int(rng.integers(0, len(train_tokens) - need))
            p_ids = train_tokens[at:at + prompt_tokens].astype(np.int64).tolist()
            truth = enc.decode(train_tokens[at + prompt_tokens:at + need].astype(np.int64).tolist())
        new = sample_ids(model, p_ids, max_new_tokens, temperature, top_k, gen, autocast)
        span = longest_copied_span(new, index, enc)
        samples.append({"prompt": enc.decode(p_ids), "completion": enc.decode(new), "true_continuation": truth,
                        "generated_tokens": len(new), "span": asdict(span)})
    longest = max(samples, key=lambda s: s["span"]["tokens"])
    return {"samples": samples, "longest": longest["span"], "train_tokens": int(len(train_tokens)),
            "temperature": temperature}


def measure_for_model(app, model_name: str, **kwargs) -> dict:
    """measure_regurgitation for a registered model pretrained here, on its own training split.

    The training text is rebuilt from the lineage the trainer recorded (corpus sources, character limit,
    held-out fraction) and checked against the recorded corpus hash.
    """
    from backend.train.data import TokenData, corpus_text
    from models.registry import ModelRegistry
    from models.tokenizers import get_encoding

    registry = ModelRegistry(app)
    spec = registry.get(model_name)
    lin = spec.lineage
    if lin.get("kind") != "pretrain" or "corpus" not in lin:
        raise ValueError(f"model {model_name!r} was not pretrained here: its training text is unknown")
    enc = get_encoding(spec.tokenizer, app.data_dir)
    text = corpus_text(lin["corpus"], lin.get("max_corpus_chars"))
    data = TokenData.build(text, enc, spec.tokenizer, app.cache_dir, lin.get("val_fraction", 0.05))
    if data.corpus_hash != lin.get("corpus_hash"):
        raise ValueError(f"the corpus of {model_name!r} has changed since training (hash {data.corpus_hash} "
                         f"!= {lin.get('corpus_hash')}); cannot compare with its training text")
    model = registry.load(model_name, dtype=torch.float32)
    report = measure_regurgitation(model, enc, data.train, **kwargs)
    return {**report, "model": model_name}
