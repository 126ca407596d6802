"""The one sampling function: logits -> next tokens, used by the UI, the API and the trainers.

`filtered_probs` is the only place the next-token distribution is shaped (temperature, top-k,
top-p). Randomness always comes from a `torch.Generator` owned by the request, never from the global
RNG, so a request with a seed is reproducible whatever else the process is doing.

Log-probs (`token_logprobs`) are taken from the model's raw distribution (log-softmax of the logits at
temperature 1, no top-k/top-p), as the OpenAI API reports them: they score what the model believes,
independent of how the token happened to be picked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


class Constraint(Protocol):
    """Constrained decoding for one sample (structured output, forced tool calls): the engine calls
    `mask` on the sample's logits row before each draw and `accept` with the drawn token after it."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of tokens not allowed next to -inf, in place."""

    def accept(self, token_id: int) -> None:
        """Advance past the drawn token."""


@dataclass
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy (argmax)
    top_k: int = 0                  # 0 = no top-k cut
    top_p: float = 1.0              # nucleus mass in (0, 1]; 1 = no cut
    max_tokens: int = 256           # new tokens at most
    seed: int | None = None         # None = fresh randomness per request
    stop: list[str] = field(default_factory=list)           # strings that end a sample (cut from the text)
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end a sample (not in the output)
    logprobs: int | None = None     # None = no log-probs; k >= 0 = sampled token's log-prob + top-k alternatives
    # Repetition controls over the sample's own generated tokens. OpenAI semantics for the first two
    # (logit -= frequency * count + presence * [count > 0], each in [-2, 2]); the third is the CTRL /
    # Hugging Face one (a seen token's logit is divided by it when positive, multiplied when negative; 1 = off).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # A factory of per-sample Constraint objects (None = unconstrained); see Constraint above.
    constraint: Callable[[], Constraint] | None = None

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the field when a value is out of range."""
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


def apply_penalties(logits: torch.Tensor, generated: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """logits [B, V] with the repetition controls applied for each row's generated tokens (a new tensor)."""
    if not params.penalized or not any(generated):
        return logits
    logits = logits.float().clone()
    V = logits.shape[-1]
    for r, toks in enumerate(generated):
        if not toks:
            continue
        ids, counts = torch.tensor(toks, device=logits.device).unique(return_counts=True)
        ids, counts = ids[ids < V], counts[ids < V].float()
        row = logits[r]
        if params.repetition_penalty != 1.0:
            seen = row[ids]
            row[ids] = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        row[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return logits


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG for one request: seeded when asked, else from OS entropy."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] (float32) after temperature, top-k and top-p.

    temperature 0 means greedy: all the mass on the argmax (first index on ties).
    """
    logits = logits.float()
    if temperature == 0:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return probs
    if temperature != 1.0:
        logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # Sorting the whole vocabulary costs tens of ms per step; the nucleus of a real model is
        # small, so sort only the top m and widen m until it holds top_p of the mass in every row.
        m = top_k if 0 < top_k < V else min(V, 256)
        while True:
            vals, order = torch.topk(probs, m, dim=-1)  # sorted, descending
            cum = vals.cumsum(-1)
            if m == V or m == top_k or bool((cum[..., -1] >= top_p).all()):
                break
            m = min(V, m * 8)
        # Keep a token while the mass before it is below top_p (so the top token always stays).
        kept = vals.masked_fill((cum - vals) >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, kept)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (long). Greedy skips building the distribution."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filtered_probs(logits, params.temperature, params.top_k, params.top_p)
    # Inverse transform: the token whose slice of the cumulative mass holds u ~ U[0, 1). torch.multinomial
    # draws an exponential per vocabulary entry (~9 ms a row for 49k tokens on a CPU, more than a 4-bit
    # decode step); this is one uniform per row. float64 keeps u * total strictly below the total, and
    # side="right" never lands on a zero-probability token (its slice is empty).
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-distribution log-probs: (chosen [B], top-k values [B, k], top-k ids [B, k])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if k > 0:
        top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        return chosen, top.values, top.indices
    empty = logp.new_empty(logp.shape[0], 0)
    return chosen, empty, empty.long()
