"""Structured output by constrained decoding, on llguidance (the grammar engine vLLM and llama.cpp use).

    factory = json_constraint(engine, schema)        # response_format json_object / json_schema
    factory = call_constraint(engine, functions)      # a forced <tool_call>: tool_choice required / named
    factory = triggered_call_constraint(engine, functions)   # tool_choice auto: free text until <tool_call>
    (parallel=True: one or more calls back to back, see call_grammar)
    params = replace(params, constraint=factory)      # the engine builds one Constraint per sample

Each sample gets an LLMatcher; before a draw `mask` sets the logits of tokens the grammar forbids to
-inf (a bitmask computed by llguidance, unpacked here), after it `accept` advances the matcher. When
the grammar is complete only the stop tokens stay allowed, so the sample ends right there.

The tokenizer: every tokenizer here is a tiktoken Encoding, which llguidance reads directly from its
token bytes, specials and regex (llguidance.tiktoken). Built once per encoding (~0.2 s for 49k tokens).
JSON is compact (no whitespace between items): a small model cannot wander off into blank lines.
Log-probs stay those of the raw distribution (the engine reports them before the mask).
"""
from __future__ import annotations

import functools
import json
from typing import Callable

import numpy as np
import torch

from models.chat_format import END_TOOL_CALL, TOOL_CALL, TOOL_OUTPUT

JSON_OPTIONS = {"whitespace_flexible": False}


def _llg():
    try:
        import llguidance
        import llguidance.tiktoken  # noqa: F401
    except ImportError as e:  # a fresh install has it (requirements.txt); say so clearly otherwise
        raise RuntimeError("structured output needs the llguidance package (pip install llguidance)") from e
    return llguidance


@functools.lru_cache(maxsize=8)
def ll_tokenizer(enc, n_vocab: int, stop_ids: tuple[int, ...]):
    """llguidance's view of a tiktoken Encoding; `stop_ids` end a sample once the grammar is complete."""
    llg = _llg()
    return llg.tiktoken.lltokenizer_from_encoding(enc, n_vocab=n_vocab, eos_token=list(stop_ids))


class GrammarConstraint:
    """One sample's matcher (backend.serving.sampling.Constraint)."""

    def __init__(self, matcher, vocab_size: int, n_words: int, stop_ids: list[int], tokenizer):
        self.matcher, self.vocab_size, self.stop_ids, self.tokenizer = matcher, vocab_size, stop_ids, tokenizer
        self.words = torch.zeros(n_words, dtype=torch.int32)

    def blocked(self) -> np.ndarray:
        """Bool [vocab_size]: the tokens the grammar forbids next (numpy: one torch op per step, in mask)."""
        if self.matcher.is_error():  # cannot happen through the mask; end the sample if it does
            out = np.ones(self.vocab_size, dtype=bool)
        else:
            self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
            bits = np.unpackbits(self.words.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
            out = bits == 0
            if not out.all():
                return out
        out[self.stop_ids] = False  # nothing inside the model's vocabulary would do: stop instead
        return out

    def mask(self, logits: torch.Tensor) -> None:
        logits.masked_fill_(torch.from_numpy(self.blocked()).to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(int(token_id))


class TriggeredConstraint:
    """Free text until the sample writes `trigger` (a special token id, or text), then a grammar.

    tool_choice auto: the model may answer in prose, but once it opens a <tool_call> the call is held to
    the tools' schemas. A plain-text trigger can end inside a token ("<tool_call>{"): the bytes after
    the trigger are fed to the grammar as tokens (llguidance accepts any tokenization of its bytes)."""

    def __init__(self, engine, trigger_id: int | None, trigger_text: bytes, make: Callable[[], GrammarConstraint]):
        self.engine, self.trigger_id, self.trigger_text, self.make = engine, trigger_id, trigger_text, make
        self.seen = b""
        self.inner: GrammarConstraint | None = None

    def mask(self, logits: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.mask(logits)

    def accept(self, token_id: int) -> None:
        if self.inner is not None:
            self.inner.accept(token_id)
            return
        if self.trigger_id is not None:
            if token_id == self.trigger_id:
                self.inner = self.make()
            return
        self.seen += self.engine.token_bytes(token_id)
        at = self.seen.find(self.trigger_text)
        if at >= 0:
            self.inner = self.make()
            rest = self.seen[at + len(self.trigger_text):]
            if rest:
                self.inner.matcher.consume_tokens(self.inner.tokenizer.tokenize_bytes(rest))
        else:  # only a tail that may still become the trigger matters
            self.seen = self.seen[-(len(self.trigger_text) - 1):]


def _factory(engine, grammar: str, stop_ids: list[int]) -> Callable[[], GrammarConstraint]:
    """A per-sample Constraint factory for `grammar`; ValueError (naming the problem) if it does not compile."""
    llg = _llg()
    vocab = engine.model.cfg.vocab_size
    n_vocab = max(vocab, engine.enc.max_token_value + 1)
    stops = tuple(sorted(set(stop_ids)))
    tok = ll_tokenizer(engine.enc, n_vocab, stops)
    proto = llg.LLMatcher(tok, grammar, log_level=0)
    if proto.is_error():
        raise ValueError(f"the schema cannot be used for constrained decoding: {proto.get_error()[:300]}")
    n_words = (n_vocab + 31) // 32

    def make() -> GrammarConstraint:
        return GrammarConstraint(proto.deep_copy(), vocab, n_words, list(stops), tok)
    return make


def json_grammar(schema: dict) -> str:
    return _llg().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def json_constraint(engine, schema: dict | None, stop_ids: list[int]) -> Callable[[], GrammarConstraint]:
    """Any JSON object (schema None: response_format json_object) or a value valid under `schema`."""
    return _factory(engine, json_grammar(schema or {"type": "object"}), stop_ids)


def call_schema(functions: list[dict]) -> dict:
    """The JSON between the call tags: {"name": one of the functions, "arguments": its parameters}."""
    options = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                 "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _tag(enc, tag: str) -> str:
    """A tag in a lark grammar: its special token when the encoding has it, else its text."""
    return f"<[{enc.encode_single_token(tag)}]>" if tag in enc.special_tokens_set else json.dumps(tag)


def call_grammar(engine, functions: list[dict], parallel: bool = False) -> str:
    """A call's JSON, then the closing tag. `parallel`: then any number of further calls, each opened
    by its tag right after the last one closed, and optionally the <tool_output> tag (a model tuned on
    our format writes it after its calls: the engine stops there, see openai_service.plan_chat)."""
    enc = engine.enc
    schema = json.dumps(call_schema(functions), ensure_ascii=False)
    close = _tag(enc, END_TOOL_CALL)
    start = f"start: call {close}"
    if parallel:
        start += f" ({_tag(enc, TOOL_CALL)} call {close})* {_tag(enc, TOOL_OUTPUT)}?"
    return _llg().LLMatcher.grammar_from_lark(f"{start}\ncall: %json {schema}")


def call_constraint(engine, functions: list[dict], stop_ids: list[int],
                    parallel: bool = False) -> Callable[[], GrammarConstraint]:
    """The sample is one call, or with `parallel` one or more (the prompt already ends with the opening tag)."""
    return _factory(engine, call_grammar(engine, functions, parallel), stop_ids)


def triggered_call_constraint(engine, functions: list[dict], stop_ids: list[int],
                              parallel: bool = False) -> Callable[[], TriggeredConstraint]:
    make = call_constraint(engine, functions, stop_ids, parallel)
    enc = engine.enc
    trigger_id = enc.encode_single_token(TOOL_CALL) if TOOL_CALL in enc.special_tokens_set else None
    return lambda: TriggeredConstraint(engine, trigger_id, TOOL_CALL.encode(), make)
