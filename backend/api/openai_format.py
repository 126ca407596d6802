"""The one formatter of /v1 answers: OpenAI's response and stream-chunk shapes, log-prob entries, usage.

Log-probs are the model's raw distribution (temperature 1, no top-k/top-p, before any grammar mask), as
OpenAI reports them. The rule for stop tokens on /v1/completions (what lm-evaluation-harness and other
log-likelihood clients rely on): every sampled token has its entry, the stop token that ended a sample
included (token text such as "<|im_end|>", its log-prob and top alternatives, the last entry), as vLLM
gives it. The stop token is not part of the text and not counted in usage.completion_tokens. So with
`echo`, the lists hold one entry per prompt token (the first has log-prob null) and one per sampled
token: with max_tokens 1 there is always exactly one entry after the prompt's.
Chat log-probs cover the message's tokens only (a stop token is not part of the message), as OpenAI's.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


@dataclass
class Meta:
    """What every response and chunk of one request repeats."""
    model: str
    kind: str                         # "cmpl" | "chatcmpl"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{self.kind}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- /v1/completions -------------------------------------------------------------------------------
def completion_logprobs(engine, token_ids, lps, tops, start_offset: int = 0) -> dict:
    tokens, offsets, off = [], [], start_offset
    for t in token_ids:
        tokens.append(engine.token_str(t))
        offsets.append(off)
        off += len(engine.token_bytes(t).decode("utf-8", errors="replace"))
    return {"tokens": tokens, "token_logprobs": list(lps),
            "top_logprobs": [None if top is None else {engine.token_str(i): lp for i, lp in top} for top in tops],
            "text_offset": offsets}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(meta: Meta, choices: list[dict], use: dict | None = None) -> dict:
    body = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


# -- /v1/chat/completions --------------------------------------------------------------------------
def chat_logprob(engine, token_id: int, lp: float, top) -> dict:
    def entry(t, v):
        return {"token": engine.token_str(t), "logprob": v, "bytes": list(engine.token_bytes(t))}
    return {**entry(token_id, lp), "top_logprobs": [entry(t, v) for t, v in (top or [])]}


def chat_message(content: str | None, tool_calls: list[dict] | None = None, reasoning: str | None = None,
                 **extra) -> dict:
    msg = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return {**msg, **extra}


def chat_choice(index: int, message: dict, logprobs: dict | None, finish_reason: str, **extra) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason, **extra}


def chat_body(meta: Meta, choices: list[dict], use: dict) -> dict:
    return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "system_fingerprint": None, "choices": choices, "usage": use}


def chat_chunk(meta: Meta, choices: list[dict], use: dict | None = None) -> dict:
    body = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
            "system_fingerprint": None, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def delta_choice(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None,
                 **extra) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
