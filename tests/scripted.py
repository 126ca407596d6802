"""A scripted chat model for tool-loop tests: a real Transformer (a bigram table, cf. tests/test_engine.py)
over a tiny byte-level encoding whose extra special tokens are whole script lines, so the model "writes"
a tool call, a thought or an answer one token each, deterministically, at any temperature.

`words` are script lines that are ordinary tokens instead (their bytes are text, as a call written in
plain tokens is, so the grammar that holds calls to their schemas reads them: backend/serving/structured.py).
No merge leads to them, so a prompt is still encoded byte by byte; only the model writes them."""
from __future__ import annotations

import tiktoken

from models.chat_format import with_tool_tokens
from models.tokenizers import with_chat_tokens
from models.transformer import Transformer
from tests.helpers import bigram_model


def byte_encoding(name: str = "bytes", words: tuple[str, ...] = ()) -> tiktoken.Encoding:
    ranks = {bytes([b]): b for b in range(256)}
    for w in words:
        ranks.setdefault(w.encode(), len(ranks))
    return tiktoken.Encoding(name, pat_str=r"""\S+|\s+""", mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


def script_encoding(lines: list[str], tools: bool = True, name: str = "scripted",
                    words: tuple[str, ...] = ()) -> tiktoken.Encoding:
    """Bytes + `words` + ChatML (+ the six tool tags when `tools`) + one special token per script line."""
    base = with_tool_tokens(byte_encoding(name, words)) if tools else with_chat_tokens(byte_encoding(name, words))
    specials = dict(base._special_tokens)
    for line in lines:
        if line not in specials:
            specials[line] = max(specials.values()) + 1
    return tiktoken.Encoding(base.name, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=specials)


def tok(enc: tiktoken.Encoding, text: str) -> int:
    """The id of a special token, a word or a one-byte token."""
    return enc.encode_single_token(text)


def scripted_model(enc: tiktoken.Encoding, chain: dict[str, str], dim: int = 64, max_seq_len: int = 2048,
                   n_layers: int = 1) -> Transformer:
    """After the token for key a, the model predicts the token for chain[a] with probability ~1."""
    pairs = {tok(enc, a): tok(enc, b) for a, b in chain.items()}
    return bigram_model(enc.max_token_value + 1, pairs, dim=dim, max_seq_len=max_seq_len, n_layers=n_layers)


def register_scripted(data_dir, name: str, lines: list[str], chain: dict[str, str], tools: bool = True,
                      max_seq_len: int = 2048, n_layers: int = 1, words: tuple[str, ...] = ()):
    """Save the script's encoding (as trained encoding `name`) and register the scripted model as chat model `name`."""
    from pathlib import Path

    from backend.config import AppConfig
    from models.registry import ModelRegistry
    from models.tokenizers import save_encoding

    enc = script_encoding(lines, tools=tools, name=name, words=words)
    save_encoding(enc, name, Path(data_dir))
    model = scripted_model(enc, chain, max_seq_len=max_seq_len, n_layers=n_layers)
    return ModelRegistry(AppConfig(data_dir=Path(data_dir))).register(
        name, model, tokenizer=name, chat_format="chatml", lineage={"origin": "tests.scripted"},
        description="scripted tool-calling model for tests", overwrite=True)


RAMBLE = "la "


def register_rambler(data_dir, name: str = "rambler", layers: int = 16):
    """A chat model that says "la " forever (until max_tokens), slowly enough that a Stop lands mid-run: the
    scripted bigram table with `layers` blocks that write nothing but cost a step each."""
    return register_scripted(data_dir, name, [RAMBLE], {"\n": RAMBLE, RAMBLE: RAMBLE}, tools=False,
                             max_seq_len=4096, n_layers=layers)
