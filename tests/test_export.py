"""Export for other engines: a Hugging Face directory transformers loads and stops in, a GGUF file that
reads back exactly, a hub push that names the problem offline."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from backend.config import AppConfig
from models.registry import ModelRegistry
from tests.conftest import ROOT
from tests.helpers import register_tiny_model
from tests.scripted import register_scripted

# After the chat prompt's last token ("\n" of "assistant\n") the scripted model says "Hi", then <|im_end|>,
# then would go on with "!!!..." if nothing stopped it.
CHAIN = {"\n": "H", "H": "i", "i": "<|im_end|>", "<|im_end|>": "!", "!": "!"}


@pytest.fixture
def registry(tmp_path):
    register_scripted(tmp_path / "data", "hi-bot", [], CHAIN, tools=False)
    return ModelRegistry(AppConfig(data_dir=tmp_path / "data"))


def test_hf_export_loads_in_transformers_and_generate_stops_at_im_end(registry, tmp_path):
    transformers = pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-m", "backend.models", "--data-dir", str(registry.cfg.data_dir),
                        "export", "hi-bot", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    from models.chat_format import render_chat
    from models.tokenizers import get_encoding
    enc = get_encoding("hi-bot", registry.cfg.data_dir)
    assert ids[0].tolist() == render_chat(messages, enc, add_generation_prompt=True).ids  # same chat template
    ours = registry.load("hi-bot", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert tok.decode(new, skip_special_tokens=True) == "Hi"
    assert new[-1] == enc.encode_single_token("<|im_end|>")  # stopped there, not 12 tokens of "!"
    # the destination must be new; nothing is written over
    r = subprocess.run([sys.executable, "-m", "backend.models", "--data-dir", str(registry.cfg.data_dir),
                        "export", "hi-bot", str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_gguf_export_reads_back_with_identical_logits_and_tokenizer(tmp_path):
    import gguf

    from models.export import export_model
    from models.gguf_loader import read_gguf
    from models.tokenizers import convert_gguf_bpe, get_encoding, read_gguf_vocab
    from models.transformer import Transformer

    data = tmp_path / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml", n_heads=4, n_kv_heads=2)
    reg = ModelRegistry(AppConfig(data_dir=data))
    out = export_model(reg, "tiny", tmp_path / "out", "gguf")
    path = tmp_path / "out" / "tiny.gguf"
    assert out["path"] == str(path)
    reader = gguf.GGUFReader(str(path))
    enc = get_encoding("cl100k_base+chatml", data)
    f = {k: reader.fields[k].contents() for k in ("general.architecture", "tokenizer.ggml.eos_token_id",
                                                   "tokenizer.chat_template", "tokenizer.ggml.pre")}
    assert f["general.architecture"] == "llama" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.eos_token_id"] == enc.encode_single_token("<|im_end|>")
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    # our own GGUF loader (the one that reads the bundled SmolLM2): same weights, same logits
    cfg, sd = read_gguf(path)
    again = Transformer.from_state_dict(cfg, sd).eval()
    original = reg.load("tiny", device="cpu", dtype=torch.float32)
    ids = torch.tensor([enc.encode("The GGUF file holds every weight, q and k rows permuted.")])
    with torch.no_grad():
        assert torch.equal(again(ids), original(ids))
    # the tokenizer in the file is the model's encoding, token for token
    ranks, specials = convert_gguf_bpe(*read_gguf_vocab(path))
    assert {t: r for t, r in ranks.items() if r < cfg.vocab_size and not t.startswith(b"[PAD")} == \
        {t: r for t, r in enc._mergeable_ranks.items()}
    assert specials == enc._special_tokens


def test_push_to_hub_online_and_offline(registry, tmp_path, monkeypatch):
    """The hub call is replaced at its edge (huggingface_hub.HfApi): once answering, once unreachable."""
    import huggingface_hub

    from models.export import export_model
    from models.hf_checkpoint import HubUnavailable
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, repo_id, folder_path, **kw: calls.append(("upload", repo_id, sorted(
                            p.name for p in __import__("pathlib").Path(folder_path).iterdir()))))
    out = export_model(registry, "hi-bot", tmp_path / "a", "hf", push_to_hub="me/hi-bot")
    assert out["url"] == "https://huggingface.co/me/hi-bot"
    assert calls == [("create", "me/hi-bot"), ("upload", "me/hi-bot", [
        "config.json", "generation_config.json", "model.safetensors", "playground.json", "tokenizer.json",
        "tokenizer_config.json"])]

    def offline(self, repo, **kw):
        raise OSError("[Errno 101] Network is unreachable")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(HubUnavailable, match="cannot push to the Hugging Face Hub repo 'me/hi-bot'.*unreachable"):
        export_model(registry, "hi-bot", tmp_path / "b", "hf", push_to_hub="me/hi-bot")
    with pytest.raises(ValueError, match="repo id like"):
        export_model(registry, "hi-bot", tmp_path / "c", "hf", push_to_hub="not a repo")
    assert not (tmp_path / "c").exists()  # refused before writing anything
