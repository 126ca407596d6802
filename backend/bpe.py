"""Byte-level BPE: our own step-by-step trainer, full training with rustbpe, and the length curve.

    t = BPETrainer(text, SPLIT_PATTERNS["gpt4"])     # bytes 0..255 are the first 256 tokens
    t.step()          # Merge(pair=(101, 32), count=9123, new_id=256, ...): the most frequent pair becomes 256
    enc = t.encoding("demo")                           # a tiktoken.Encoding with the merges so far

    ranks = train_rustbpe(text, vocab_size=4096, pattern=SPLIT_PATTERNS["gpt4"])   # nanochat's Rust trainer
    enc = build_encoding("mybpe", ranks, pattern)      # + <|endoftext|>, <|im_start|>, <|im_end|>
    train_and_register(text, 4096, "gpt4", "mybpe", data_dir)   # saved via models.tokenizers.save_encoding
    length_curve(text, ranks, pattern)                 # tokens per 1000 characters at each vocabulary size

How the step trainer stays fast: the text is cut into chunks by the split pattern (BPE never merges
across chunks) and identical chunks are counted once with a weight. Pair counts are kept up to date
incrementally: a merge only touches the chunks that contain the pair (an index pair -> chunks), and a
max-heap with lazy deletion finds the next most frequent pair. The naive trainer recounts every pair of
every chunk after each merge; both pick the same pair (highest count, ties to the smallest pair, as
rustbpe does), so their merges are identical.
"""
from __future__ import annotations

import heapq
import re as _re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import regex
import tiktoken

# The split patterns a learner can pick. "gpt4" is the cl100k_base pattern as rustbpe writes it.
SPLIT_PATTERNS = {
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # no pre-split inside a line: merges may join words and spaces ("e " + "t"), as in the lecture's first merge
    "none": r"""[^\n]*\n|[^\n]+""",
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # appended after the merged vocabulary
MAX_VOCAB = 65_536
NAME_RE = _re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def resolve_pattern(pattern: str) -> str:
    """A preset name ("gpt4", "gpt2", "none") or a custom regex; ValueError if it does not compile."""
    pat = SPLIT_PATTERNS.get(pattern, pattern)
    if not pat:
        raise ValueError("split pattern is empty")
    try:
        regex.compile(pat)
    except regex.error as e:
        raise ValueError(f"split pattern does not compile: {e}") from None
    return pat


def chunk_counts(text: str, pattern: str) -> Counter:
    """Each distinct pre-split chunk and how often it occurs."""
    return Counter(regex.findall(resolve_pattern(pattern), text))


@dataclass
class Merge:
    pair: tuple[int, int]
    count: int
    new_id: int
    left: bytes
    right: bytes

    @property
    def bytes(self) -> bytes:
        return self.left + self.right

    def describe(self) -> str:
        return f"{self.pair[0]} {_show(self.left)} + {self.pair[1]} {_show(self.right)} -> {self.new_id} {_show(self.bytes)}  (count {self.count:,})"


def _show(b: bytes) -> str:
    try:
        return repr(b.decode("utf-8"))
    except UnicodeDecodeError:
        return "<" + " ".join(f"{x:02X}" for x in b) + ">"


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    a, b = pair
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class BPETrainer:
    """Incremental byte-level BPE: one merge per `step()`, each costing time in proportion to the
    chunks that contain the merged pair, not to the corpus."""

    def __init__(self, text: str, pattern: str = "gpt4"):
        self.pattern = resolve_pattern(pattern)
        chunks = chunk_counts(text, self.pattern)
        self.words: list[list[int]] = [list(w.encode("utf-8")) for w in chunks]
        self.weights: list[int] = list(chunks.values())
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        self.merges: list[Merge] = []
        self.pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks that (may) hold it
        for wi, (w, c) in enumerate(zip(self.words, self.weights)):
            for p in zip(w, w[1:]):
                self.pair_counts[p] += c
                self.where[p].add(wi)
        # max-heap by count, ties to the smallest pair; entries may be stale (counts only fall for old pairs)
        self.heap = [(-c, p) for p, c in self.pair_counts.items()]
        heapq.heapify(self.heap)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    def _best_pair(self) -> tuple[tuple[int, int], int] | None:
        while self.heap:
            neg, p = heapq.heappop(self.heap)
            cur = self.pair_counts.get(p, 0)
            if cur <= 0:
                continue
            if cur == -neg:
                return p, cur
            heapq.heappush(self.heap, (-cur, p))  # stale: put back with its true count
        return None

    def step(self) -> Merge | None:
        """Merge the most frequent pair into a new token; None when no pair is left."""
        best = self._best_pair()
        if best is None:
            return None
        pair, count = best
        new_id = self.vocab_size
        counts, where = self.pair_counts, self.where
        touched: set[tuple[int, int]] = set()
        for wi in where.pop(pair, ()):
            w, c = self.words[wi], self.weights[wi]
            merged = _merge_word(w, pair, new_id)
            if len(merged) == len(w):
                continue  # stale index entry: this chunk no longer holds the pair
            for p in zip(w, w[1:]):
                counts[p] -= c
            for p in zip(merged, merged[1:]):
                counts[p] += c
                if new_id in p:
                    where[p].add(wi)
                    touched.add(p)
            self.words[wi] = merged
        counts.pop(pair, None)
        for p in touched:  # the only pairs whose count can have risen are the new ones
            heapq.heappush(self.heap, (-counts[p], p))
        merge = Merge(pair, count, new_id, self.vocab[pair[0]], self.vocab[pair[1]])
        self.vocab[new_id] = merge.bytes
        self.merges.append(merge)
        return merge

    def train(self, vocab_size: int) -> list[Merge]:
        out = []
        while self.vocab_size < vocab_size:
            m = self.step()
            if m is None:
                break
            out.append(m)
        return out

    def ranks(self) -> dict[bytes, int]:
        return {b: i for i, b in self.vocab.items()}

    def encoding(self, name: str = "bpe-step", specials: bool = False) -> tiktoken.Encoding:
        return build_encoding(name, self.ranks(), self.pattern, specials=specials)


class StepSessions:
    """Live step-mode trainers by key, the few most recent only (a trainer on 1 MB holds tens of MB
    of Python objects). The UI keeps just the key in its session state: Gradio deep-copies state values on
    every event to detect changes, which would cost more than the merge itself."""

    def __init__(self, max_sessions: int = 4):
        import threading
        from collections import OrderedDict
        self.max_sessions = max_sessions
        self._trainers: OrderedDict[str, BPETrainer] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, text: str, pattern: str) -> str:
        import uuid
        trainer = BPETrainer(text, pattern)
        key = uuid.uuid4().hex
        with self._lock:
            self._trainers[key] = trainer
            while len(self._trainers) > self.max_sessions:
                self._trainers.popitem(last=False)
        return key

    def get(self, key: str | None) -> BPETrainer | None:
        with self._lock:
            trainer = self._trainers.get(key) if key else None
            if trainer is not None:
                self._trainers.move_to_end(key)
            return trainer


STEP_SESSIONS = StepSessions()


def train_naive(text: str, vocab_size: int, pattern: str = "gpt4") -> list[Merge]:
    """The textbook trainer: recount every pair of every chunk after each merge (the baseline)."""
    chunks = chunk_counts(text, pattern)
    words = [list(w.encode("utf-8")) for w in chunks]
    weights = list(chunks.values())
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for new_id in range(256, vocab_size):
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for w, c in zip(words, weights):
            for p in zip(w, w[1:]):
                counts[p] += c
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        words = [_merge_word(w, pair, new_id) for w in words]
        merges.append(Merge(pair, counts[pair], new_id, vocab[pair[0]], vocab[pair[1]]))
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
    return merges


# ------------------------------------------------------------------------------------------ full training

def check_vocab_size(vocab_size) -> int:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 257 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be an integer from 257 to {MAX_VOCAB}, got {vocab_size!r}")
    return vocab_size


def train_rustbpe(text: str, vocab_size: int, pattern: str = "gpt4") -> dict[bytes, int]:
    """Train with rustbpe (nanochat's Rust trainer); returns tiktoken mergeable ranks (byte b has id b)."""
    import rustbpe
    pat = resolve_pattern(pattern)
    check_vocab_size(vocab_size)
    if not text:
        raise ValueError("corpus is empty")
    tok = rustbpe.Tokenizer()
    try:
        tok.train_from_iterator(iter([text]), vocab_size=vocab_size, pattern=pat)
    except Exception as e:  # rustbpe's regex engine can refuse a pattern Python's accepts
        raise ValueError(f"rustbpe could not train with this pattern: {e}") from None
    return {bytes(b): r for b, r in tok.get_mergeable_ranks()}


def build_encoding(name: str, ranks: dict[bytes, int], pattern: str, specials: bool = True) -> tiktoken.Encoding:
    n = len(ranks)
    special = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)} if specials else {}
    return tiktoken.Encoding(name=name, pat_str=resolve_pattern(pattern), mergeable_ranks=dict(ranks),
                             special_tokens=special)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"tokenizer name {name!r} must be 1-64 letters, digits, '_', '.', '-' "
                         "starting with a letter or digit")
    return name


def train_and_register(text: str, vocab_size: int, pattern: str, name: str, data_dir: Path,
                       source: str = "text") -> dict:
    """Full training with rustbpe; the encoding is saved under data_dir and listed by list_encodings().
    `source` (e.g. "python-docs") is recorded with it, beside the pattern, vocabulary and corpus size."""
    from models.tokenizers import list_encodings, save_encoding
    check_name(name)
    if name in list_encodings(data_dir):
        raise ValueError(f"an encoding named {name!r} already exists; pick another name")
    import time
    t0 = time.perf_counter()
    ranks = train_rustbpe(text, vocab_size, pattern)
    seconds = time.perf_counter() - t0
    enc = build_encoding(name, ranks, pattern)
    meta = {"trainer": "rustbpe", "source": source, "corpus_chars": len(text), "pattern": pattern,
            "vocab_size": vocab_size, "special_tokens": SPECIAL_TOKENS, "seconds": round(seconds, 3)}
    path = save_encoding(enc, name, Path(data_dir), meta=meta)
    sample = text[:200_000]
    n = len(enc.encode_ordinary(sample))
    return {"name": name, "path": str(path), "vocab_size": enc.n_vocab, "merges": len(ranks) - 256,
            "seconds": round(seconds, 3), "tokens_per_1000_chars": round(1000 * n / max(1, len(sample)), 1)}


def length_curve(text: str, ranks: dict[bytes, int], pattern: str, sizes: list[int] | None = None,
                 sample_chars: int = 200_000) -> list[dict]:
    """Tokens per 1000 characters of `text` at each vocabulary size. BPE training is greedy, so the
    tokenizer of size v is exactly the first v ranks of a bigger one: one training gives the whole curve."""
    top = len(ranks)
    if sizes is None:  # 256, then steps of about sqrt(2) up to the full vocabulary
        sizes, v = [256], 256 * 2 ** 0.5
        while v < top:
            sizes.append(int(round(v / 16) * 16))
            v *= 2 ** 0.5
        sizes.append(top)
    sample = text[:sample_chars]
    pat = resolve_pattern(pattern)
    out = []
    for v in sorted({s for s in sizes if 256 <= s <= top}):
        enc = tiktoken.Encoding(name=f"curve-{v}", pat_str=pat,
                                mergeable_ranks={b: r for b, r in ranks.items() if r < v}, special_tokens={})
        n = len(enc.encode_ordinary(sample))
        out.append({"vocab_size": v, "tokens_per_1000_chars": round(1000 * n / max(1, len(sample)), 1)})
    return out
