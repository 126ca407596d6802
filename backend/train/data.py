"""Pretraining data: a corpus, tokenized once into a memory-mapped array, with a held-out split.

    text = corpus_text(["python-docs"])                 # or files, or "hf:owner/name"
    data = TokenData.build(text, enc, "bpe-4k", cache_dir)  # cached by (text hash, tokenizer)
    x, y = data.batch("train", batch_size, seq_len, generator)

The split is made on the text, not on tokens: the last `val_fraction` of the characters (cut at a
paragraph break) is held out, so validation bits-per-byte is measured on text the model never saw.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

HF_PREFIX = "hf:"
# Columns of a .parquet file or a Hugging Face dataset taken as text, in this order of preference.
TEXT_COLUMNS = ("text", "content", "document", "body")


# -- corpora ------------------------------------------------------------------------------------
def corpus_text(sources: str | list[str], max_chars: int | None = None) -> str:
    """Text of one or more corpus sources, joined by blank lines.

    A source is a built-in corpus name ("python-docs", "python-stdlib"), a file path (.txt, .md,
    .jsonl, .parquet), or "hf:owner/name[:split]" for a Hugging Face dataset (needs the network).
    """
    from backend.corpora import BUILTIN_CORPORA, load_corpus

    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ValueError("corpus: give at least one source (a built-in name, a file, or hf:NAME)")
    parts = []
    for src in sources:
        src = str(src)
        if src.startswith(HF_PREFIX):
            parts.append(hf_dataset_text(src[len(HF_PREFIX):], max_chars))
        elif src in BUILTIN_CORPORA:
            parts.append(load_corpus(src, max_chars=max_chars))
        elif src.lower().endswith(".parquet"):
            parts.append(parquet_text(Path(src)))
        elif Path(src).exists():
            parts.append(load_corpus([Path(src)]))
        else:
            raise ValueError(f"corpus: {src!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}), "
                             f"an existing file, nor {HF_PREFIX}NAME")
    text = "\n\n".join(parts)
    if max_chars:
        text = text[:int(max_chars)]
    return text


def _pick_column(names: list[str], where: str) -> str:
    for c in TEXT_COLUMNS:
        if c in names:
            return c
    raise ValueError(f"{where}: no text column (expected one of {', '.join(TEXT_COLUMNS)}; found {', '.join(names)})")


def parquet_text(path: Path) -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path.name}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as e:  # pyarrow raises ArrowInvalid etc. for a damaged file
        raise ValueError(f"{path.name}: not a readable parquet file ({e})") from None
    col = _pick_column(table.column_names, path.name)
    docs = [d for d in table.column(col).to_pylist() if isinstance(d, str) and d.strip()]
    if not docs:
        raise ValueError(f"{path.name}: column {col!r} holds no text")
    return "\n\n".join(docs)


def hf_dataset_text(spec: str, max_chars: int | None = None) -> str:
    """Stream rows of a Hugging Face dataset ("owner/name" or "owner/name:split") until max_chars."""
    name, _, split = spec.partition(":")
    if not name:
        raise ValueError("corpus: hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
    limit = int(max_chars) if max_chars else 20_000_000  # streaming: never pull a whole web dataset
    try:
        import datasets
    except ImportError:
        raise ValueError("Hugging Face datasets need the `datasets` package (pip install datasets)") from None
    hub_probe(name)
    try:
        rows = datasets.load_dataset(name, split=split or "train", streaming=True)
        docs, total = [], 0
        col = None
        for row in rows:
            col = col or _pick_column(list(row), f"dataset {name}")
            if isinstance(row[col], str):
                docs.append(row[col])
                total += len(row[col])
            if total >= limit:
                break
    except ValueError as e:
        if "no text column" in str(e):
            raise
        raise ValueError(f"cannot load Hugging Face dataset {name!r}: {e}") from None
    except Exception as e:  # connection errors, offline mode, unknown dataset
        raise ValueError(f"cannot load Hugging Face dataset {name!r} (offline, or no such dataset?): "
                         f"{type(e).__name__}: {e}") from None
    if not docs:
        raise ValueError(f"Hugging Face dataset {name!r} gave no text")
    return "\n\n".join(docs)


def hub_probe(name: str) -> None:
    """Ask the Hub about the dataset once, with a short timeout: offline, `datasets` would retry for a minute."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ValueError(f"Hugging Face dataset {name!r}: no such dataset (or it is private/gated)") from None
    except Exception as e:  # connection errors, offline mode
        raise ValueError(f"cannot load Hugging Face dataset {name!r}: the Hub is not reachable (offline?): "
                         f"{type(e).__name__}: {e}") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the last val_fraction of the characters, moved forward to a paragraph break."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    cut = int(len(text) * (1 - val_fraction))
    brk = text.find("\n\n", cut)
    if brk != -1 and brk < cut + max(1000, len(text) // 100):
        cut = brk + 2
    return text[:cut], text[cut:]


# -- tokens -------------------------------------------------------------------------------------
def encoding_fingerprint(enc: tiktoken.Encoding) -> str:
    """A short hash of the vocabulary itself, so a BPE retrained under the same name is not confused."""
    h = hashlib.sha256(enc._pat_str.encode())  # the split pattern has no public accessor
    for b in enc.token_byte_values():
        h.update(len(b).to_bytes(2, "little") + b)
    h.update(json.dumps(sorted((t, enc.encode_single_token(t)) for t in enc.special_tokens_set)).encode())
    return h.hexdigest()[:12]


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """UTF-8 byte length of every token id; 0 for special tokens and unused ids (they carry no text)."""
    specials = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    out = np.zeros(enc.n_vocab, dtype=np.int32)
    for i in range(enc.n_vocab):
        if i in specials:
            continue
        try:
            out[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:
            pass
    return out


def _encode(enc: tiktoken.Encoding, text: str, chunk_chars: int = 1 << 16) -> np.ndarray:
    """Tokenize in paragraph-aligned chunks on two threads (tiktoken releases the GIL)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            brk = text.rfind("\n\n", start, end)
            end = brk + 2 if brk > start else end
        chunks.append(text[start:end])
        start = end
    ids = enc.encode_ordinary_batch(chunks, num_threads=2)
    dtype = np.uint16 if enc.n_vocab <= 1 << 16 else np.uint32
    return np.fromiter((t for c in ids for t in c), dtype=dtype, count=sum(len(c) for c in ids))


@dataclass
class TokenData:
    tokens: np.ndarray      # train tokens then val tokens (a read-only memmap)
    n_train: int            # tokens[:n_train] is the training split
    train_bytes: int
    val_bytes: int
    corpus_hash: str
    tokenizer: str
    path: Path

    @property
    def train(self) -> np.ndarray:
        return self.tokens[:self.n_train]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.n_train:]

    @classmethod
    def build(cls, text: str, enc: tiktoken.Encoding, tokenizer: str, cache_dir: Path,
              val_fraction: float = 0.05) -> "TokenData":
        """Tokenize `text` once; later calls with the same text and tokenizer open the cached memmap."""
        if not text.strip():
            raise ValueError("corpus is empty")
        corpus_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        safe_tok = re.sub(r"[^A-Za-z0-9_.+-]", "_", tokenizer)
        key = f"{corpus_hash}-{safe_tok}-{encoding_fingerprint(enc)}-val{val_fraction:g}"
        root = Path(cache_dir) / "pretrain-tokens"
        path, meta_path = root / f"{key}.bin", root / f"{key}.json"
        if not (path.exists() and meta_path.exists()):
            train_text, val_text = split_text(text, val_fraction)
            train_ids, val_ids = _encode(enc, train_text), _encode(enc, val_text)
            root.mkdir(parents=True, exist_ok=True)
            # Write to a temp name and rename: a crash never leaves a half-written cache entry.
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            np.concatenate([train_ids, val_ids]).tofile(tmp)
            meta = {"n_train": len(train_ids), "n_val": len(val_ids), "dtype": str(train_ids.dtype),
                    "train_bytes": len(train_text.encode("utf-8")), "val_bytes": len(val_text.encode("utf-8")),
                    "corpus_hash": corpus_hash, "tokenizer": tokenizer}
            os.replace(tmp, path)
            tmp_meta = meta_path.with_suffix(f".tmp-{os.getpid()}")
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, meta_path)
        meta = json.loads(meta_path.read_text())
        tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        return cls(tokens, meta["n_train"], meta["train_bytes"], meta["val_bytes"], meta["corpus_hash"],
                   tokenizer, path)

    def check_fits(self, seq_len: int) -> None:
        for split, arr in (("training", self.train), ("validation", self.val)):
            if len(arr) < seq_len + 2:
                raise ValueError(f"the corpus is too small: its {split} split has {len(arr)} tokens, fewer than "
                                 f"one sequence of {seq_len + 1}; use a bigger corpus or a shorter seq_len")

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator,
              device: torch.device | str = "cpu", rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1] for B random offsets i.

        rows: read only these rows of the batch (a data-parallel rank's share); the generator still draws
        all B offsets, so every rank's generator stays in step and the shares together are the batch."""
        arr = self.train if split == "train" else self.val
        starts = torch.randint(0, len(arr) - seq_len - 1, (batch_size,), generator=generator).tolist()
        if rows is not None:
            starts = starts[rows]
        buf = torch.from_numpy(np.stack([arr[s:s + seq_len + 1].astype(np.int64) for s in starts]))
        return buf[:, :-1].to(device), buf[:, 1:].to(device)

    def val_windows(self, seq_len: int, max_tokens: int) -> list[np.ndarray]:
        """Deterministic, non-overlapping windows of seq_len+1 tokens from the start of the val split."""
        n = max(1, min(max_tokens, len(self.val) - 1) // seq_len)
        return [self.val[i * seq_len:i * seq_len + seq_len + 1].astype(np.int64) for i in range(n)
                if i * seq_len + seq_len + 1 <= len(self.val)]
