"""Write a tiktoken Encoding as a Hugging Face `tokenizer.json` (+ tokenizer_config.json).

An exported checkpoint needs its tokenizer beside the weights: transformers, vLLM and llama.cpp's
convert_hf_to_gguf.py all read tokenizer.json. The conversion is exact for tiktoken's algorithm:
- pre-tokenizer: the Encoding's regex (Split, isolated), then byte-level mapping without a regex;
- BPE merges: each multi-byte token is the merge of the two parts tiktoken's own BPE reaches for it
  using only lower ranks, ordered by the token's rank (tiktoken merges lowest rank first);
- `ignore_merges`: tiktoken emits a whole pre-token directly when it is in the vocabulary;
- special tokens become added tokens.
Plain JSON, no `tokenizers` dependency at run time; tests/test_model_loading.py checks ids against
HF `tokenizers` on a varied corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import tiktoken

# SmolLM2-Instruct's chat template (the GGUF's tokenizer.chat_template); models/chat_format.py renders the same.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token`'s bytes, merging only pairs whose rank is below max_rank."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def onig_pattern(pat: str) -> str:
    """tiktoken's regex (fancy-regex syntax) for HF tokenizers' Oniguruma engine.

    Oniguruma reads `{1,3}+` as "one or more runs of 1-3", not as possessive; plain `{1,3}` matches the
    same here (each such item ends its alternative, so nothing can backtrack into it). `?+`, `*+` and
    `++` are possessive in both engines.
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat)


def tokenizer_json(enc: tiktoken.Encoding, max_id: int | None = None) -> dict:
    """max_id: leave out tokens with ids >= max_id (ids the model has no embedding row for, e.g. the
    bytes the smollm2 encoding adds past SmolLM2's 49152 tokens; converters check ids < vocab_size)."""
    ranks: dict[bytes, int] = enc._mergeable_ranks
    if max_id is not None:
        ranks = {t: r for t, r in ranks.items() if r < max_id}
    b2u = bytes_to_unicode()

    def word(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {word(tok): rank for tok, rank in ranks.items()}
    # Special tokens must be in the model vocabulary too: HF gives an added token the id the vocabulary
    # has for it, and otherwise the next free id past the vocabulary (not the id written here).
    specials = {t: i for t, i in enc._special_tokens.items() if max_id is None or i < max_id}
    vocab.update(specials)
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = _split(ranks, tok, rank)
        if len(parts) == 2:  # otherwise BPE can never build this token; it is still reachable whole
            merges.append(f"{word(parts[0])} {word(parts[1])}")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(specials.items(), key=lambda kv: kv[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": onig_pattern(enc._pat_str)}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config(enc: tiktoken.Encoding, chat_format: str | None = None, context_length: int | None = None,
                     vocab_size: int | None = None) -> dict:
    """tokenizer_config.json: eos <|im_end|> for chat models (what ends an answer), else <|endoftext|>;
    the ChatML template for chat models. Also what GET /tokenizer_info answers (vLLM serves the same)."""
    specials = {t for t, i in enc._special_tokens.items() if vocab_size is None or i < vocab_size}
    eos = "<|im_end|>" if chat_format == "chatml" and "<|im_end|>" in specials else \
        ("<|endoftext|>" if "<|endoftext|>" in specials else None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "bos_token": None, "eos_token": eos,
              "pad_token": "<|endoftext|>" if "<|endoftext|>" in specials else eos,
              "model_max_length": context_length or 1_000_000}
    if chat_format == "chatml":
        config["chat_template"] = CHATML_TEMPLATE
    return config


def _fingerprint(enc: tiktoken.Encoding, max_id: int | None) -> str:
    h = hashlib.sha256(f"{enc._pat_str}|{sorted(enc._special_tokens.items())}|{max_id}".encode())
    for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(tok + rank.to_bytes(4, "little"))
    return h.hexdigest()[:24]


def write_hf_tokenizer(enc: tiktoken.Encoding, path: Path, chat_format: str | None = None,
                       context_length: int | None = None, vocab_size: int | None = None,
                       cache_dir: Path | None = None) -> None:
    """tokenizer.json + tokenizer_config.json (with the ChatML template for chat models) into `path`.

    Converting a 100k-token vocabulary takes seconds, so with `cache_dir` the tokenizer.json of each
    distinct encoding is made once (keyed by its content) and hard-linked into every directory.
    Each file is written beside its place and renamed, so a reader never sees half a file."""
    path = Path(path)
    target = path / "tokenizer.json"
    tmp = path / f".tokenizer.json.tmp-{os.getpid()}"
    if cache_dir is not None:
        cached = Path(cache_dir) / "hf-tokenizers" / f"{_fingerprint(enc, vocab_size)}.json"
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
            part.write_text(json.dumps(tokenizer_json(enc, vocab_size), ensure_ascii=False))
            os.replace(part, cached)
        try:
            os.link(cached, tmp)
        except OSError:  # another filesystem
            shutil.copyfile(cached, tmp)
    else:
        tmp.write_text(json.dumps(tokenizer_json(enc, vocab_size), ensure_ascii=False))
    os.replace(tmp, target)
    config = json.dumps(tokenizer_config(enc, chat_format, context_length, vocab_size), indent=2) + "\n"
    tmp = path / f".tokenizer_config.json.tmp-{os.getpid()}"
    tmp.write_text(config)
    os.replace(tmp, path / "tokenizer_config.json")
