"""Completion playground services: inference is sampling, made visible.

The Generate tab, the REST API (/api/completion/...) and the tests share these functions:

    dist = next_token_distribution(engine, ids, params, seed=1)   # raw vs shaped distribution + the coin flip
    out = step(engine, ids, params, seed=1)                        # one token picked by that coin flip
    for tok in stream_tokens(engine, ids, params): ...             # a completion, each token with its probability
    out = continue_from(engine, prefix_ids, token_id, params)      # branch: prefix + an alternative, then continue
    score = score_text(engine, "some text")                        # per-token log-probs, total, perplexity

Probabilities come in two kinds, and the view shows both:
- raw: what the model believes, softmax of its logits at temperature 1 (what log-probs report);
- filtered: the distribution actually sampled from, shaped by temperature, top-k and top-p through
  backend.serving.sampling.filtered_probs, the one place the engine shapes it too.

The coin flip of step mode is drawn by inverse transform: u ~ Uniform[0, 1) from the request's seeded
generator, tokens stacked in order of falling probability, and the token whose slice of [0, 1) holds u is
picked. That is a draw from exactly the filtered distribution, and shows where the coin landed; it is not
the same random stream as the engine's multinomial, so a seed reproduces step mode, and a seed reproduces
Generate, but the two do not reproduce each other.
"""
from __future__ import annotations

import math
import random
import threading
from dataclasses import replace
from typing import Iterator

import torch

from backend.serving.sampling import SamplingParams, filtered_probs, make_generator

TOP_ALTERNATIVES = 10   # alternatives kept for every generated token (the click-a-token view)
TOP_N = 20              # tokens listed in a distribution view
MAX_TOP_N = 200


def new_seed() -> int:
    """A fresh seed for 'resample': shown to the user, so the sample can be reproduced."""
    return random.SystemRandom().randrange(1, 2**31)


def _check_ids(engine, ids: list[int], field: str = "prompt") -> list[int]:
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"{field} is empty: give at least one token")
    ids = [int(i) for i in ids]
    V = engine.model.cfg.vocab_size
    if min(ids) < 0 or max(ids) >= V:
        raise ValueError(f"{field} token ids must be in [0, {V})")
    if len(ids) >= engine.context_length:
        raise ValueError(f"{field} of {len(ids):,} tokens leaves no room in the context length {engine.context_length:,}")
    return ids


def _check_shape(params: SamplingParams) -> SamplingParams:
    params.validate()
    return params


def encode_prompt(engine, text: str) -> list[int]:
    """Prompt text -> ids as the engine reads it (raw completion: no chat template)."""
    if not isinstance(text, str) or not text:
        raise ValueError("prompt is empty")
    return engine.encode(text)


def next_token_logits(engine, prompt_ids: list[int]) -> torch.Tensor:
    """The model's logits [V] (float32) for the token after prompt_ids, computed between scheduler steps."""
    return engine.next_token_logits(_check_ids(engine, prompt_ids)).cpu()


def token_entry(engine, token_id: int, **probs) -> dict:
    return {"id": int(token_id), "text": engine.token_str(int(token_id)), **probs}


def coin_flip(probs: torch.Tensor, generator: torch.Generator) -> dict:
    """Pick a token from probs [V] by inverse transform; says where u fell."""
    vals, order = torch.sort(probs, descending=True, stable=True)
    cum = vals.double().cumsum(0)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    kept = int((vals > 0).sum())
    i = min(int(torch.searchsorted(cum, torch.tensor(u * float(cum[kept - 1]), dtype=torch.float64), right=True)),
            kept - 1)  # u scaled by the total so float rounding of the sum never lets it fall off the end
    return {"u": u, "token_id": int(order[i]), "rank": i, "low": float(cum[i] - vals[i]), "high": float(cum[i])}


def next_token_distribution(engine, prompt_ids: list[int], params: SamplingParams, seed: int | None = None,
                            top_n: int = TOP_N) -> dict:
    """The next-token distribution before and after temperature/top-k/top-p, and one coin flip from it.

    Returns {"tokens": top_n entries by raw probability, each {id, text, raw, filtered, raw_logprob},
    "sampled": the picked token's entry with its rank, "coin": {u, low, high} (u fell in [low, high) of
    the stacked filtered probabilities), "kept": tokens with filtered probability > 0, "vocab_size",
    "seed", "temperature", "top_k", "top_p"}.
    """
    _check_shape(params)
    if not isinstance(top_n, int) or not 1 <= top_n <= MAX_TOP_N:
        raise ValueError(f"top_n must be between 1 and {MAX_TOP_N}")
    logits = next_token_logits(engine, prompt_ids)
    raw_logp = torch.log_softmax(logits, -1)
    raw = raw_logp.exp()
    filt = filtered_probs(logits, params.temperature, params.top_k, params.top_p)
    seed = new_seed() if seed is None else int(seed)
    coin = coin_flip(filt, make_generator(seed))
    # Temperature keeps the order and top-k/top-p keep the most likely tokens, so the top tokens by raw
    # probability hold every token the filtered distribution keeps, up to top_n of them.
    top = torch.topk(raw, min(top_n, raw.numel())).indices.tolist()

    def entry(t: int) -> dict:
        return token_entry(engine, t, raw=float(raw[t]), filtered=float(filt[t]), raw_logprob=float(raw_logp[t]))

    tok = coin["token_id"]
    return {"tokens": [entry(t) for t in top], "sampled": {**entry(tok), "rank": coin["rank"]},
            "coin": {k: coin[k] for k in ("u", "low", "high")}, "kept": int((filt > 0).sum()),
            "vocab_size": int(raw.numel()), "seed": seed, "temperature": params.temperature,
            "top_k": params.top_k, "top_p": params.top_p}


def step(engine, prompt_ids: list[int], params: SamplingParams, seed: int | None = None,
         top_n: int = TOP_N) -> dict:
    """One token of step mode: the distribution, the coin flip, and the picked token as a generated-token
    entry (same shape as stream_tokens yields) plus the prompt extended by it."""
    dist = next_token_distribution(engine, prompt_ids, params, seed, top_n)
    s = dist["sampled"]
    alts = [token_entry(engine, t["id"], prob=t["raw"]) for t in dist["tokens"][:TOP_ALTERNATIVES]]
    token = {"id": s["id"], "text": s["text"], "prob": s["raw"], "logprob": s["raw_logprob"], "top": alts}
    return {**dist, "token": token, "prompt_ids": [*prompt_ids, s["id"]]}


def _generation_params(engine, prompt_len: int, params: SamplingParams, top: int) -> SamplingParams:
    _check_shape(params)
    room = engine.context_length - prompt_len
    if room <= 0:
        raise ValueError(f"prompt of {prompt_len:,} tokens leaves no room in the context length {engine.context_length:,}")
    return replace(params, logprobs=top, max_tokens=min(params.max_tokens, room),
                   stop_token_ids=params.stop_token_ids or engine.default_stop_ids())


def stream_tokens(engine, prompt_ids: list[int], params: SamplingParams, top: int = TOP_ALTERNATIVES,
                  cancel: threading.Event | None = None) -> Iterator[dict]:
    """Generate a completion of prompt_ids, yielding each token as it comes:
    {id, text, prob, logprob, top: [{id, text, prob}]} (raw probabilities), then a last {"finish_reason"}.

    Stops at the model's stop tokens (end of text) unless params.stop_token_ids says otherwise.
    """
    ids = _check_ids(engine, prompt_ids)
    p = _generation_params(engine, len(ids), params, top)
    events = engine.generate([ids], p, 1, cancel)
    finish = "length"
    for ev in events:
        if ev.token_id is not None:
            yield {"id": ev.token_id, "text": engine.token_str(ev.token_id), "prob": math.exp(ev.logprob),
                   "logprob": ev.logprob,
                   "top": [token_entry(engine, t, prob=math.exp(lp)) for t, lp in (ev.top_logprobs or [])]}
        if ev.finish_reason:
            finish = ev.finish_reason
    yield {"finish_reason": finish}


def empty_answer_note(engine, tokens: list[dict], finish: str, raw: bool = True) -> str | None:
    """Why a completion came back empty, when the model ended at once (its first token was end-of-text); None
    otherwise. On raw text an instruct model does this often: to it, text outside a chat turn is a finished
    document (DEMOS 7: a base model continues text, an instruct model answers in the chat format)."""
    if tokens or finish != "stop":
        return None
    said = "The model ended at once: its first token was end-of-text, so there is no text to show. "
    if raw and getattr(engine.spec, "chat_format", None):
        return said + (f"{engine.name} is an instruct model: post-training taught it to answer inside the chat "
                       "format, and raw text with no chat turn looks to it like a finished document. Send it as "
                       "chat to ask it, or continue text with a base model: pretrain one in the Training tab "
                       "(kind pretrain, preset cpu-5min: minutes on a CPU) and pick it here.")
    return said + "Sample again with a temperature above 0, or give it more text to continue."


def completion_text(engine, tokens: list[dict], stop: list[str]) -> str:
    """The text of generated tokens as the engine returns it: a matched stop string and what follows are cut
    (the token view still shows the whole token that completed it)."""
    text = engine.enc.decode([t["id"] for t in tokens])
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[:min(cuts)] if cuts else text


def _collect(engine, prompt_ids: list[int], tokens: Iterator[dict], stop: list[str]) -> dict:
    out = {"prompt_ids": list(prompt_ids), "tokens": [], "finish_reason": "length"}
    for t in tokens:
        if "finish_reason" in t:
            out["finish_reason"] = t["finish_reason"]
        else:
            out["tokens"].append(t)
    out["text"] = completion_text(engine, out["tokens"], stop)
    note = empty_answer_note(engine, out["tokens"], out["finish_reason"])
    if note:
        out["note"] = note
    return out


def generate_tokens(engine, prompt_ids: list[int], params: SamplingParams, top: int = TOP_ALTERNATIVES,
                    cancel: threading.Event | None = None) -> dict:
    """A whole completion: {prompt_ids, tokens: [...], text, finish_reason}."""
    return _collect(engine, prompt_ids, stream_tokens(engine, prompt_ids, params, top, cancel), params.stop)


def chosen_token(engine, prefix_ids: list[int], token_id: int, top: int = TOP_ALTERNATIVES) -> dict:
    """The entry of token_id as the next token after prefix_ids: its raw probability and the alternatives."""
    logits = next_token_logits(engine, prefix_ids)
    if not isinstance(token_id, int) or not 0 <= token_id < logits.numel():
        raise ValueError(f"token_id must be in [0, {logits.numel()})")
    logp = torch.log_softmax(logits, -1)
    alts = torch.topk(logp, min(top, logp.numel()))
    return {"id": token_id, "text": engine.token_str(token_id), "prob": float(logp[token_id].exp()),
            "logprob": float(logp[token_id]),
            "top": [token_entry(engine, t, prob=math.exp(v)) for t, v in zip(alts.indices.tolist(), alts.values.tolist())]}


def stream_continue_from(engine, prefix_ids: list[int], token_id: int, params: SamplingParams,
                         top: int = TOP_ALTERNATIVES, cancel: threading.Event | None = None) -> Iterator[dict]:
    """Branch: force token_id after prefix_ids, then let the model continue. Yields the chosen token's entry
    first, then the continuation's tokens as stream_tokens does."""
    prefix_ids = _check_ids(engine, prefix_ids, "prefix")
    first = chosen_token(engine, prefix_ids, token_id, top)
    yield first
    ids = [*prefix_ids, token_id]
    if params.max_tokens <= 1 or len(ids) >= engine.context_length:
        yield {"finish_reason": "length"}
        return
    yield from stream_tokens(engine, ids, replace(params, max_tokens=params.max_tokens - 1), top, cancel)


def continue_from(engine, prefix_ids: list[int], token_id: int, params: SamplingParams,
                  top: int = TOP_ALTERNATIVES, cancel: threading.Event | None = None) -> dict:
    """Branch as a whole: {prompt_ids: prefix_ids, tokens: [chosen, *continuation], text, finish_reason}.
    params.max_tokens counts the chosen token."""
    return _collect(engine, prefix_ids, stream_continue_from(engine, prefix_ids, token_id, params, top, cancel),
                    params.stop)


def score_text(engine, text: str, top: int = 5) -> dict:
    """How likely the model finds a text: each token's raw log-prob given the tokens before it.

    The first token has no context, so it is not scored; perplexity = exp(mean negative log-prob) over the
    scored tokens: the number of equally likely choices the model was, on average, torn between.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text is empty")
    ids = engine.encode(text)
    if len(ids) < 2:
        raise ValueError("text must be at least 2 tokens long to be scored (the first token has no context)")
    _check_ids(engine, ids[:-1], "text")
    if len(ids) > engine.context_length:
        raise ValueError(f"text of {len(ids)} tokens is longer than the context length {engine.context_length}")
    rows = engine.prompt_logprobs(ids, top)
    tokens = []
    for t, (lp, alts) in zip(ids, rows):
        tokens.append({"id": t, "text": engine.token_str(t), "logprob": lp,
                       "prob": None if lp is None else math.exp(lp),
                       "top": [token_entry(engine, a, prob=math.exp(v)) for a, v in alts]})
    total = sum(r[0] for r in rows[1:])
    n = len(ids) - 1
    return {"tokens": tokens, "scored_tokens": n, "total_logprob": total, "mean_nll": -total / n,
            "perplexity": math.exp(-total / n), "model": engine.name}
