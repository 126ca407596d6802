"""Pretraining: a tiny GPT trained for a few steps on real text (the Python docs), on the real
checkpoint files, registry and tokenizer code; regurgitation and bits-per-byte on hand-checkable cases."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

from backend.config import AppConfig
from backend.corpora import load_corpus
from backend.train.data import TokenData, corpus_text, token_byte_lengths
from backend.train.pretrain import PretrainConfig, evaluate_bpb, latest_checkpoint, pretrain
from backend.train.regurgitation import TrainIndex, longest_copied_span, measure_for_model
from models.hf_checkpoint import load_hf_dir
from models.registry import ModelRegistry
from models.transformer import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def app(tmp_path) -> AppConfig:
    return AppConfig(data_dir=tmp_path / "data")


@pytest.fixture
def corpus(tmp_path) -> str:
    """60k characters of the Python documentation topics as an uploaded .txt file."""
    path = tmp_path / "docs.txt"
    path.write_text(load_corpus("python-docs")[:60_000])
    return str(path)


def tiny(corpus: str, **kw) -> PretrainConfig:
    base = dict(preset="tiny", corpus=[corpus], bpe_vocab_size=512, max_steps=30, batch_size=8, seq_len=32,
                warmup_steps=5, eval_every=1000, eval_tokens=2048, sample_every=1000, sample_tokens=16,
                checkpoint_every=1000, name="tiny-test")
    base.update(kw)
    return PretrainConfig(**base)


def steps_of(events: list[dict]) -> list[dict]:
    return [e for e in events if "loss" in e and "lr" in e]


def test_loss_falls_and_the_run_ends_registered_as_a_base_model(app, corpus):
    events: list[dict] = []
    r = pretrain(tiny(corpus), app, on_event=events.append)
    train = steps_of(events)
    assert [e["step"] for e in train] == list(range(1, 31))
    first = sum(e["loss"] for e in train[:5]) / 5
    last = sum(e["loss"] for e in train[-5:]) / 5
    assert first > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert last < first - 0.6, (first, last)
    bpbs = [e["val_bpb"] for e in events if "val_bpb" in e]
    assert len(bpbs) == 2 and bpbs[-1] < bpbs[0]  # held-out bits per byte at step 0 and at the end
    assert all(e["tokens_per_s"] > 0 and 0 < e["mfu"] < 1 for e in train)
    samples = [e for e in events if "sample" in e]
    assert [s["step"] for s in samples] == [0, 30] and all(s["sample"] for s in samples)
    # The event stream is also on disk, one JSON object a line.
    logged = [json.loads(line) for line in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    # ... all but the progress line shown before the run exists (reading and tokenizing the corpus)
    assert logged == [e for e in events if "phase" not in e]
    assert events[-1]["done"] == "max_steps" and r.reason == "max_steps" and r.step == 30
    spec = ModelRegistry(app).get(r.model)
    assert spec.chat_format is None and spec.kind == "trained"
    assert spec.tokenizer.startswith("bpe512-") and spec.lineage["preset"] == "tiny"
    assert spec.lineage["steps"] == 30 and len(spec.lineage["corpus_hash"]) == 16


def test_checkpoint_save_load_gives_identical_logits(app, corpus):
    r = pretrain(tiny(corpus, max_steps=5), app)
    x = torch.randint(0, r.transformer.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = r.transformer.eval()(x)
        _, from_ckpt = load_hf_dir(r.checkpoint)
        from_registry = ModelRegistry(app).load(r.model, dtype=torch.float32)
        assert torch.equal(from_ckpt(x), want)
        assert torch.equal(from_registry(x), want)


def test_resume_continues_the_step_count_and_the_same_trajectory(app, corpus):
    straight = pretrain(tiny(corpus, max_steps=12, name="straight"), app)
    straight_losses = [e["loss"] for e in map(json.loads, (straight.run_dir / "metrics.jsonl").read_text().splitlines())
                       if "lr" in e]

    stop = threading.Event()  # interrupted at step 6 of the same 12-step schedule
    first = pretrain(tiny(corpus, max_steps=12, name="split", checkpoint_every=3), app, stop=stop,
                     on_event=lambda e: stop.set() if e.get("step") == 6 else None)
    assert first.step == 6 and first.reason == "stopped"
    assert latest_checkpoint(first.run_dir).name == "ckpt-0000006"
    with pytest.raises(ValueError, match="already has a checkpoint"):
        pretrain(tiny(corpus, max_steps=12, name="split"), app)
    events: list[dict] = []
    second = pretrain(tiny(corpus, max_steps=12, name="split", resume=True), app, on_event=events.append)
    assert second.step == 12
    assert [e["step"] for e in steps_of(events)] == list(range(7, 13))
    # The curve on disk continues without a gap or a repeat, and (optimizer, data order and weights all
    # restored) the resumed run follows exactly the loss curve of the uninterrupted one.
    logged = [e for e in map(json.loads, (second.run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in e]
    assert [e["step"] for e in logged] == list(range(1, 13))
    assert [e["loss"] for e in logged] == pytest.approx(straight_losses, abs=1e-4)


def test_stop_flag_stops_within_one_step_and_keeps_the_checkpoint(app, corpus):
    stop = threading.Event()
    events: list[dict] = []

    def on_event(e):
        events.append(e)
        if e.get("step") == 3 and "loss" in e:
            stop.set()  # as the job runner's cancel button would, from another thread

    r = pretrain(tiny(corpus, max_steps=10_000), app, on_event=on_event, stop=stop)
    assert r.reason == "stopped" and r.step == 3
    assert max(e["step"] for e in steps_of(events)) == 3
    assert latest_checkpoint(r.run_dir).name == "ckpt-0000003"
    assert ModelRegistry(app).get(r.model).lineage["steps"] == 3


def test_gradient_accumulation_matches_one_big_batch(app, corpus):
    # 2 micro-batches of 4 draw the same 8 windows as one batch of 8; the averaged gradient is the same.
    big = pretrain(tiny(corpus, max_steps=3, batch_size=8, name="big", register=False), app)
    acc = pretrain(tiny(corpus, max_steps=3, batch_size=4, grad_accum=2, name="acc", register=False), app)
    for p, q in zip(big.transformer.parameters(), acc.transformer.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def byte_encoding() -> tiktoken.Encoding:
    """Every byte is one token (ids 0-255), plus one special token that carries no text."""
    return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def test_val_bpb_of_a_uniform_model_is_log2_of_the_vocabulary(tmp_path):
    # A model whose logits are all zero gives every token probability 1/257: ln(257) nats per token,
    # and each token is one byte, so bits per byte = log2(257) exactly.
    enc = byte_encoding()
    data = TokenData.build("héllo world, " * 400, enc, "bytes", tmp_path, val_fraction=0.2)
    model = Transformer(ModelConfig(vocab_size=257, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32,
                                    max_seq_len=64))
    torch.nn.init.zeros_(model.model.embed_tokens.weight)  # tied: the output layer is zero too
    token_bytes = torch.from_numpy(token_byte_lengths(enc))
    assert token_bytes[256] == 0 and token_bytes[ord("a")] == 1
    assert evaluate_bpb(model, data, 32, 4, 512, token_bytes) == pytest.approx(math.log2(257), rel=1e-6)
    # Were every token two bytes of text, the same loss would be half as many bits per byte.
    token_bytes2 = token_bytes.clone()
    token_bytes2[token_bytes2 > 0] = 2
    assert evaluate_bpb(model, data, 32, 4, 512, token_bytes2) == pytest.approx(math.log2(257) / 2, rel=1e-6)


def test_regurgitation_finds_a_planted_verbatim_span(app):
    enc = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={})
    text = load_corpus("python-docs")[:20_000]
    train = np.array(enc.encode_ordinary(text), dtype=np.uint16)
    planted = text[5000:5040]
    absent = int(np.setdiff1d(np.arange(256), train)[0])  # a byte the training text never contains
    generated = [absent] + enc.encode_ordinary(planted) + [absent, absent]
    span = longest_copied_span(generated, TrainIndex(train), enc)
    assert span.text == planted and span.tokens == 40 and span.chars == 40 and span.start == 1
    assert enc.decode(train[span.train_offset:span.train_offset + 40].tolist()) == planted
    # A match must be token-aligned: with 2-byte tokens, bytes straddling two tokens do not count.
    wide = np.array([0x4142, 0x4344], dtype=np.uint16)
    assert TrainIndex(wide).find([0x4342]) == -1 and TrainIndex(wide).find([0x4344]) == 1


def test_a_model_trained_on_one_passage_recites_it(app, tmp_path):
    passage = ("Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
               "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. ")
    path = tmp_path / "zen.txt"
    path.write_text(passage * 60)
    r = pretrain(tiny(str(path), max_steps=60, lr=1e-2, bpe_vocab_size=300, name="zen"), app)
    # The service behind the regurgitation button: the registered model on its own training text.
    report = measure_for_model(app, "zen", n_samples=2, prompt_tokens=8, max_new_tokens=24, temperature=0.0)
    assert report["longest"]["tokens"] == 24, report  # greedy decoding recites the memorised passage
    assert report["longest"]["text"] in passage * 2
    assert all(s["completion"] == s["true_continuation"] for s in report["samples"])
    with pytest.raises(ValueError, match="unknown model"):
        measure_for_model(app, "nope")


def test_corpus_sources_and_their_errors(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["first document", "second document"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert corpus_text([str(tmp_path / "d.parquet")]) == "first document\n\nsecond document"
    pq.write_table(pa.table({"n": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no text column"):
        corpus_text([str(tmp_path / "bad.parquet")])
    with pytest.raises(ValueError, match="neither a built-in corpus"):
        corpus_text(["no-such-corpus"])

    # Hugging Face datasets: the network calls replaced at their edge.
    import datasets
    import huggingface_hub
    calls = []

    def fake_load(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"text": "row one"}, {"text": "row two"}])
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, timeout: calls.append(name))
    assert corpus_text(["hf:someone/tiny:validation"]) == "row one\n\nrow two"
    assert calls == ["someone/tiny", ("someone/tiny", "validation", True)]

    def offline(self, name, timeout):
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    with pytest.raises(ValueError, match="cannot load Hugging Face dataset 'someone/tiny': the Hub is not reachable"):
        corpus_text(["hf:someone/tiny"])
    monkeypatch.undo()
    # And for real: this machine is offline, a CI machine may not be; either way a clear error, at once.
    with pytest.raises(ValueError, match="Hugging Face dataset 'llm-playground/no-such-dataset-1f3a'.*(not reachable|no such)"):
        corpus_text(["hf:llm-playground/no-such-dataset-1f3a"])


def test_bad_configs_are_refused_with_the_field_named(app, corpus):
    with pytest.raises(ValueError, match="max_steps or max_seconds"):
        pretrain(tiny(corpus, max_steps=0), app)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        pretrain(tiny(corpus, preset="huge"), app)
    from backend.jobs.kinds import parse_config  # how the CLI and the worker read a config
    with pytest.raises(ValueError, match="unknown pretrain config key 'bogus'"):
        parse_config("pretrain", {"bogus": 1})
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        pretrain(tiny(corpus, resume=True), app)
    with pytest.raises(ValueError, match="too small"):
        pretrain(tiny(corpus, seq_len=200, max_corpus_chars=3000), app)


def test_cli_runs_from_a_yaml_config_with_flags_overriding_it(tmp_path, corpus):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"preset: tiny\ncorpus: [{corpus}]\nbpe_vocab_size: 512\nmax_steps: 100\nbatch_size: 4\n"
                   "seq_len: 16\nname: cli-run\nsample_every: 2\n")
    out = subprocess.run([sys.executable, "-m", "backend.train", "pretrain", "--config", str(cfg), "--max-steps", "3",
                          "--threads", "1", "--data-dir", str(tmp_path / "data")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "step      3  loss" in out.stdout and "--- sample at step 2" in out.stdout
    assert "done (max_steps) at step 3" in out.stdout and "model 'cli-run'" in out.stdout
    from backend.train.__main__ import main
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        main(["pretrain", "--preset", "huge", "--max-steps", "1", "--data-dir", str(tmp_path / "data")])


def test_bench_runs_at_toy_size(capsys):
    from backend.bench.pretrain import main
    main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "--no-hf"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    first = report["results"][0]
    assert report["bench"] == "pretrain" and first["unit"] == "tok/s"
    assert first["ours"] > 0 and first["peer"] > 0 and first["ratio"] == pytest.approx(first["ours"] / first["peer"], rel=0.01)
    assert report["results"][2]["peer"] is None and "skipped" in report["results"][2]["peer_name"]
