"""The model registry: one name per model, trained models found on disk, atomic registration."""
from __future__ import annotations

import json

import pytest
import torch

from backend.config import AppConfig
from models.hf_checkpoint import save_hf_dir
from models.registry import BUNDLED_NAME, ModelExists, ModelRegistry, UnknownModel
from tests.helpers import make_tiny_model, register_tiny_model


@pytest.fixture
def cfg(tmp_path):
    return AppConfig(data_dir=tmp_path / "data")


def test_bundled_model_is_listed_first(cfg):
    specs = ModelRegistry(cfg).list()
    assert specs[0].name == BUNDLED_NAME == "smollm2-135m-instruct"
    s = specs[0]
    assert (s.kind, s.tokenizer, s.chat_format, s.context_length) == ("bundled", "smollm2", "chatml", 8192)
    assert s.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and s.path.exists()
    assert s.lineage["source"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@torch.no_grad()
def test_registered_model_is_listed_and_loads_identically(cfg):
    reg = ModelRegistry(cfg)
    model = make_tiny_model(500, seed=1)
    spec = reg.register("my-sft.v1", model, tokenizer="cl100k_base", chat_format="chatml",
                        lineage={"parent": BUNDLED_NAME, "snapshot": "abc123", "job": 7}, description="test run")
    assert (spec.kind, spec.path, spec.context_length) == ("trained", cfg.models_dir / "my-sft.v1", 1024)
    # a second registry on the same data dir (another process: the worker vs the server) sees it at once
    other = ModelRegistry(AppConfig(data_dir=cfg.data_dir))
    assert [s.name for s in other.list()] == [BUNDLED_NAME, "my-sft.v1"]
    got = other.get("my-sft.v1")
    assert got.lineage == {"parent": BUNDLED_NAME, "snapshot": "abc123", "job": 7}
    assert (got.tokenizer, got.chat_format, got.description) == ("cl100k_base", "chatml", "test run")
    loaded = other.load("my-sft.v1", device="cpu", dtype=torch.float32)
    assert not loaded.training
    x = torch.randint(0, 500, (2, 9))
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # the directory is a plain HF Llama checkpoint
    assert json.loads((spec.path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_load_picks_dtype_for_the_device_unless_given(cfg):
    from models.device import pick_dtype
    reg = ModelRegistry(cfg)
    reg.register("tiny", make_tiny_model(100), tokenizer="cl100k_base", chat_format=None, lineage={})
    assert reg.load("tiny", device="cpu").dtype == pick_dtype(torch.device("cpu"))
    m = reg.load("tiny", device="cpu", dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.new_cache(1, 4).k[0].dtype == torch.bfloat16


def test_unknown_model_names_it_and_lists_the_available(cfg):
    reg = ModelRegistry(cfg)
    with pytest.raises(UnknownModel, match=r"'gpt-5'.*smollm2-135m-instruct"):
        reg.get("gpt-5")
    with pytest.raises(ValueError, match="'../etc'"):
        reg.load("../etc")


@pytest.mark.parametrize("bad", ["", "Upper", "has space", "../escape", "-lead", "a/b", "x" * 65, "ünï"])
def test_invalid_names_are_refused(cfg, bad):
    with pytest.raises(ValueError, match="invalid model name"):
        ModelRegistry(cfg).register(bad, make_tiny_model(50), tokenizer="cl100k_base", chat_format=None, lineage={})
    assert not cfg.models_dir.exists() or list(cfg.models_dir.iterdir()) == []


def test_duplicate_bundled_and_bad_fields_are_refused(cfg):
    reg = ModelRegistry(cfg)
    model = make_tiny_model(50)
    reg.register("dup", model, tokenizer="cl100k_base", chat_format=None, lineage={"n": 1})
    with pytest.raises(ModelExists, match="'dup' already exists"):
        reg.register("dup", model, tokenizer="cl100k_base", chat_format=None, lineage={"n": 2})
    assert reg.get("dup").lineage == {"n": 1}
    reg.register("dup", model, tokenizer="cl100k_base", chat_format=None, lineage={"n": 3}, overwrite=True)
    assert reg.get("dup").lineage == {"n": 3}
    with pytest.raises(ModelExists, match="bundled"):
        reg.register(BUNDLED_NAME, model, tokenizer="smollm2", chat_format="chatml", lineage={})
    with pytest.raises(ValueError, match="chat_format"):
        reg.register("x", model, tokenizer="cl100k_base", chat_format="alpaca", lineage={})
    with pytest.raises(ValueError, match="tokenizer"):
        reg.register("x", model, tokenizer="", chat_format=None, lineage={})
    assert sorted(p.name for p in cfg.models_dir.iterdir()) == ["dup"]  # no leftovers


def test_failed_registration_leaves_nothing(cfg, monkeypatch):
    import models.registry as registry_module

    def crash(model, path, extra=None):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_module, "save_hf_dir", crash)
    reg = ModelRegistry(cfg)
    with pytest.raises(OSError):
        reg.register("half", make_tiny_model(50), tokenizer="cl100k_base", chat_format=None, lineage={})
    assert list(cfg.models_dir.iterdir()) == []
    assert reg.names() == [BUNDLED_NAME]


def test_scan_skips_temp_and_broken_directories(cfg):
    reg = ModelRegistry(cfg)
    register_tiny_model(cfg.data_dir, "good")
    (cfg.models_dir / ".half.tmp-123").mkdir()  # a registration in progress elsewhere
    (cfg.models_dir / ".half.tmp-123" / "playground.json").write_text("{}")
    broken = cfg.models_dir / "broken"
    broken.mkdir()
    (broken / "playground.json").write_text("{not json")
    (cfg.models_dir / "plain-dir").mkdir()  # no playground.json: not ours
    assert reg.names() == [BUNDLED_NAME, "good"]
    with pytest.raises(UnknownModel):
        reg.get("plain-dir")


def test_import_hf_directory_and_delete(cfg, tmp_path):
    reg = ModelRegistry(cfg)
    src = save_hf_dir(make_tiny_model(80, tie_embeddings=False, seed=2), tmp_path / "downloaded")
    (src / "playground.json").unlink()  # a checkpoint from elsewhere has none
    spec = reg.import_hf("imported", src, tokenizer="cl100k_base")
    assert (spec.kind, spec.lineage["source"], spec.chat_format) == ("hf", str(src), None)
    assert reg.load("imported", device="cpu").cfg.tie_embeddings is False
    reg.delete("imported")
    assert reg.names() == [BUNDLED_NAME] and list(cfg.models_dir.iterdir()) == []
    with pytest.raises(ValueError, match="bundled"):
        reg.delete(BUNDLED_NAME)


def test_register_tiny_model_covers_the_tokenizer_vocabulary(cfg):
    from models.tokenizers import get_encoding
    spec = register_tiny_model(cfg.data_dir, "tiny-cl100k")
    enc = get_encoding("cl100k_base")
    model = ModelRegistry(cfg).load(spec.name, device="cpu", dtype=torch.float32)
    assert model.cfg.vocab_size == enc.max_token_value + 1
    eot = enc.encode("<|endoftext|>", allowed_special="all")
    with torch.no_grad():
        assert model(torch.tensor([enc.encode("hello world") + eot])).shape[-1] == model.cfg.vocab_size



def small_bpe(data_dir, name="small-bpe"):
    """cl100k_base's first 3000 ranks (a valid BPE on its own) saved as an app tokenizer, plus ChatML specials."""
    import tiktoken
    from models.tokenizers import get_encoding, save_encoding
    base = get_encoding("cl100k_base")
    enc = tiktoken.Encoding(name, pat_str=base._pat_str,
                            mergeable_ranks={t: r for t, r in base._mergeable_ranks.items() if r < 3000},
                            special_tokens={"<|endoftext|>": 3000, "<|im_start|>": 3001, "<|im_end|>": 3002})
    save_encoding(enc, name, data_dir)
    return enc


@torch.no_grad()
def test_export_is_a_complete_hf_directory_transformers_reads(cfg, tmp_path):
    """Weights, config and tokenizer (with the chat template) in one directory: transformers loads the
    model with the same logits, and its tokenizer gives the same ids as ours."""
    transformers = pytest.importorskip("transformers")
    enc = small_bpe(cfg.data_dir)
    reg = ModelRegistry(cfg)
    reg.register("tiny-export", make_tiny_model(3003, seed=4), tokenizer="small-bpe", chat_format="chatml",
                 lineage={})
    out = reg.export("tiny-export", tmp_path / "export")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ["def greet(name):\n    return f'Hello, {name}!'  # 2024 👋 naïve 日本語  \n\n", "x  =   1,000,000"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text)
    # the exported chat template renders what our chat format renders, id for id
    from models.chat_format import render_chat
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ours_chat = render_chat(messages, enc, add_generation_prompt=True)
    assert text == ours_chat.text
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours_chat.ids
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = reg.load("tiny-export", device="cpu", dtype=torch.float32)
    x = torch.tensor([enc.encode("hello there, general kenobi")])
    torch.testing.assert_close(ref(x).logits, ours(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        reg.export("tiny-export", out)


def test_registered_directory_carries_its_tokenizer_for_transformers(cfg):
    """A model's own directory (not only an export) loads in transformers with its tokenizer as is:
    same ids as ours, <|im_end|> as eos for a chat model, and the chat template."""
    transformers = pytest.importorskip("transformers")
    enc = small_bpe(cfg.data_dir)
    spec = ModelRegistry(cfg).register("tiny-dir", make_tiny_model(3003, seed=5), tokenizer="small-bpe",
                                       chat_format="chatml", lineage={})
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(spec.path))
    text = "def f(x):\n    return x ** 2  # naïve 👋"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == 3002 and hf_tok.chat_template
