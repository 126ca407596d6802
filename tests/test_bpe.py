"""Our BPE trainer: incremental counts give the naive trainer's merges and rustbpe's; training registers
an encoding the rest of the app can load; the corpora load offline."""
from __future__ import annotations

import json
import random

import pytest

from backend import bpe, corpora
from backend import tokenizer_explorer as tx


def _pairs(merges):
    return [(m.pair, m.new_id, m.count) for m in merges]


@pytest.fixture(scope="module")
def docs():
    return corpora.load_corpus("python-docs", max_chars=60_000)


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2", "none"])
def test_incremental_counts_equal_a_naive_rescan(pattern):
    rng = random.Random(pattern)
    alphabet = "aab abba  aaaa, the then théré 12 123\n"
    for _ in range(4):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(50, 400)))
        ours = bpe.BPETrainer(text, pattern).train(256 + 60)
        assert _pairs(ours) == _pairs(bpe.train_naive(text, 256 + 60, pattern))


def test_pair_counts_stay_exact_after_each_step(docs):
    t = bpe.BPETrainer(docs[:20_000], "gpt4")
    for _ in range(30):
        t.step()
        recount = {}
        for w, c in zip(t.words, t.weights):
            for p in zip(w, w[1:]):
                recount[p] = recount.get(p, 0) + c
        assert {p: c for p, c in t.pair_counts.items() if c} == recount


def test_overlapping_pairs_merge_left_to_right():
    t = bpe.BPETrainer("aaaaa", "none")
    m = t.step()
    assert m.pair == (97, 97) and m.count == 4  # counted as occurrences, aaaaa -> [aa, aa, a]
    assert t.words == [[256, 256, 97]]


@pytest.mark.parametrize("pattern", ["gpt4", "none"])
def test_our_merges_equal_rustbpe(docs, pattern):
    ours = bpe.BPETrainer(docs, pattern)
    ours.train(600)
    ranks = bpe.train_rustbpe(docs, 600, pattern)
    assert ours.ranks() == ranks


def test_step_encoding_shortens_the_sample_and_round_trips(docs):
    t = bpe.BPETrainer(docs, "gpt4")
    sample = "The most frequent pair becomes a new token."
    lengths = []
    for _ in range(5):
        enc = t.encoding()
        ids = enc.encode_ordinary(sample)
        assert enc.decode(ids) == sample
        lengths.append(len(ids))
        t.train(t.vocab_size + 40)
    assert lengths[0] == len(sample.encode()) and lengths == sorted(lengths, reverse=True) and lengths[-1] < lengths[0]


def test_train_and_register_makes_a_loadable_encoding(tmp_path, docs):
    out = bpe.train_and_register(docs, 1024, "gpt4", "docs-1k", tmp_path)
    assert "docs-1k" in tx.list_encodings(tmp_path)
    enc = tx.get_encoding("docs-1k", tmp_path)
    assert out["merges"] == 1024 - 256 and enc.n_vocab == 1024 + len(bpe.SPECIAL_TOKENS)
    meta = json.loads((tmp_path / "tokenizers" / "docs-1k.json").read_text())["meta"]
    assert meta["trainer"] == "rustbpe" and meta["pattern"] == "gpt4" and meta["corpus_chars"] == len(docs)
    assert enc.decode(enc.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert enc.encode("<|endoftext|>", allowed_special="all") == [1024]
    assert out["tokens_per_1000_chars"] < 400  # far fewer tokens than bytes on its own corpus
    with pytest.raises(ValueError, match="already exists"):
        bpe.train_and_register(docs, 300, "gpt4", "docs-1k", tmp_path)
    with pytest.raises(ValueError, match="name"):
        bpe.train_and_register(docs, 300, "gpt4", "../evil", tmp_path)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="split pattern"):
        bpe.BPETrainer("text", "([unclosed")
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_rustbpe("text", 100)


def test_length_curve_falls_as_the_vocabulary_grows(docs):
    ranks = bpe.train_rustbpe(docs, 2048, "gpt4")
    curve = bpe.length_curve(docs, ranks, "gpt4")
    sizes = [p["vocab_size"] for p in curve]
    values = [p["tokens_per_1000_chars"] for p in curve]
    assert sizes[0] == 256 and sizes[-1] == 2048
    assert values[0] == pytest.approx(1000 * len(docs.encode()) / len(docs), abs=0.1)  # bytes, no merges yet
    assert values == sorted(values, reverse=True) and values[-1] < values[0] / 2


def test_builtin_corpora_load_offline():
    assert set(corpora.list_corpora()) == {"python-docs", "python-stdlib"}
    docs = corpora.load_corpus("python-docs")
    assert len(docs) > 300_000 and "for" in docs
    src = corpora.load_corpus("python-stdlib", max_chars=200_000)
    assert len(src) == 200_000 and "def " in src
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        corpora.load_corpus("nope")


def test_uploaded_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.md").write_text("# heading")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n\n" +
                                      json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    text = corpora.load_corpus([tmp_path / "a.txt", tmp_path / "b.md", tmp_path / "c.jsonl"])
    assert text == "plain text\n\n# heading\n\ndoc one\n\nhi\nhello"
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2"):
        corpora.load_corpus([tmp_path / "bad.jsonl"])
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="unsupported file type"):
        corpora.load_corpus([tmp_path / "x.pdf"])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        corpora.load_corpus([tmp_path / "latin1.txt"])
    with pytest.raises(ValueError, match="lone surrogate"):
        corpora.load_corpus(text="a\udc80")


def test_bench_runs_at_toy_size(capsys):
    from backend.bench import bpe as bench
    bench.main(["--chars", "20000", "--vocab", "300", "--repeat", "1", "--step-merges", "10", "--naive-merges", "2"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "bpe" and last["identical_merges"] is True
    assert {r["unit"] for r in last["results"]} == {"s", "ms"}


def test_step_sessions_keep_the_most_recent_trainers():
    sessions = bpe.StepSessions(max_sessions=2)
    a = sessions.start("aa bb aa", "gpt4")
    b = sessions.start("cc dd cc", "gpt4")
    assert sessions.get(a).step().pair == (97, 97)  # using a makes it the most recent
    c = sessions.start("ee ff", "gpt4")
    assert sessions.get(b) is None and sessions.get(a) is not None and sessions.get(c) is not None
    assert sessions.get(a).vocab_size == 257 and sessions.get(None) is None
