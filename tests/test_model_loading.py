"""Model files in and out: GGUF (llama.cpp), Hugging Face checkpoint directories, the hub, our cache.

The references are independent implementations: transformers' LlamaForCausalLM (reading our saved
directories, and its own GGUF loader, which dequantizes and un-permutes with its own code).
The slow tests run the real bundled SmolLM2-135M-Instruct against transformers in float32.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import models.gguf_loader as gl
from models.hf_checkpoint import HubUnavailable, load_hf, load_hf_dir, save_hf_dir
from models.transformer import Transformer
from tests.helpers import make_tiny_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (what llama.cpp applies to q_proj/k_proj rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Transformer, path: Path, qtype=None, embed_qtype=None) -> Path:
    """Write `model` as llama.cpp's converter would: llama.cpp tensor names, permuted q/k rows;
    matrices quantized to `qtype` (the token embedding to `embed_qtype`, default the same)."""
    c = model.cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_types([1] * c.vocab_size)
    to_gguf = {v: k for k, v in gl._GLOBAL_NAMES.items()}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            short = next(k for k, v in gl._LAYER_NAMES.items() if v.format(i=m.group(1)) == name)
            gname = f"blk.{m.group(1)}.{short}"
        else:
            gname = to_gguf[name]
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.n_heads)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.n_kv_heads)
        qt = (embed_qtype or qtype) if gname == "token_embd.weight" else qtype
        if qt is not None and a.ndim == 2:
            q = gguf.quants.quantize(a, qt)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qt)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are small, and on a shared 2-core machine two threads that
    busy-wait on each other ran the real model's decode 10x slower than one (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ids(n, vocab, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- GGUF
@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])
def test_gguf_roundtrip_float32_is_exact(tmp_path, tie):
    model = make_tiny_model(256, tie_embeddings=tie, seed=3)
    cfg, sd = gl.read_gguf(write_gguf(model, tmp_path / "tiny.gguf"))
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings, cfg.max_seq_len) == (4, 2, tie, 1024)
    ours = Transformer.from_state_dict(cfg, sd).eval()
    x = ids(12, 256)
    torch.testing.assert_close(ours(x), model(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_quantized_gguf_matches_transformers_gguf_loader(tmp_path):
    """Q8_0 tensors: our dequantize + un-permute equals transformers' own GGUF loading."""
    model = make_tiny_model(256, tie_embeddings=False, seed=4)
    path = write_gguf(model, tmp_path / "tiny-q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    cfg, sd = gl.read_gguf(path)
    ours = Transformer.from_state_dict(cfg, sd).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    x = ids(12, 256, seed=1)
    torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-4, rtol=1e-4)
    # and quantization only nudged the original model
    assert (ours(x) - model(x)).abs().max() < 0.05


def test_gguf_cache_is_built_once_and_rebuilt_when_stale(tmp_path):
    model = make_tiny_model(256, seed=5)
    src = write_gguf(model, tmp_path / "m.gguf")
    cache = tmp_path / "cache" / "m"
    first = gl.load_gguf_cached(src, cache)
    assert (cache / "model.safetensors").exists() and (cache / "config.json").exists()
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    again = gl.load_gguf_cached(src, cache)
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp  # read from the cache, not rebuilt
    x = ids(8, 256)
    with torch.no_grad():
        torch.testing.assert_close(again(x), first(x), atol=0, rtol=0)
    # A cache whose source fingerprint no longer matches (new file, new loader) is rebuilt.
    meta = json.loads((cache / "playground.json").read_text())
    meta["source"]["loader_version"] = -1
    (cache / "playground.json").write_text(json.dumps(meta))
    gl.load_gguf_cached(src, cache)
    assert json.loads((cache / "playground.json").read_text())["source"]["loader_version"] == gl.LOADER_VERSION
    assert [p.name for p in cache.parent.iterdir()] == ["m"]  # no temp or old dirs left behind


@torch.no_grad()
def test_gguf_cache_keeps_the_files_own_blocks(tmp_path):
    """Stored like the bundled file (Q4_1 layers, Q8_0 tied embedding): the cache keeps each matrix's
    blocks (q/k rows un-permuted like the floats), and they dequantize exactly to the weights the model
    loads. A float32 GGUF has no blocks. (The decode path that runs on them: tests/test_engine.py.)"""
    T = gguf.GGMLQuantizationType
    model = make_tiny_model(256, seed=8)
    cache = tmp_path / "cache" / "m"
    loaded = gl.load_gguf_cached(write_gguf(model, tmp_path / "q4.gguf", T.Q4_1, T.Q8_0), cache)
    blocks = gl.load_gguf_blocks(cache)
    sd = loaded.state_dict()
    matrices = [n for n, t in sd.items() if t.dim() == 2 and n != "lm_head.weight"]  # lm_head is tied
    assert {n: b.kind for n, b in blocks.items()} == {n: "Q8_0" if "embed" in n else "Q4_1" for n in matrices}
    for name, b in blocks.items():
        assert torch.equal(b.dequantize(), sd[name]), name
        lo, hi = (-128, 127) if b.kind == "Q8_0" else (0, 15)
        assert lo <= int(b.q.min()) and int(b.q.max()) <= hi
    gl.load_gguf_cached(write_gguf(model, tmp_path / "f32.gguf"), tmp_path / "cache" / "f")
    assert gl.load_gguf_blocks(tmp_path / "cache" / "f") == {}


def test_failed_cache_build_leaves_nothing_behind(tmp_path, monkeypatch):
    src = write_gguf(make_tiny_model(256, seed=6), tmp_path / "m.gguf")
    cache_root = tmp_path / "cache"

    def disk_full(model, path, extra=None):
        (Path(path) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gl, "save_hf_dir", disk_full)
    with pytest.raises(OSError, match="No space"):
        gl.load_gguf_cached(src, cache_root / "m")
    assert list(cache_root.iterdir()) == []


def test_unknown_gguf_tensor_is_named():
    with pytest.raises(ValueError, match="blk.0.ssm_conv1d.weight"):
        gl.hf_name("blk.0.ssm_conv1d.weight")


# ------------------------------------------------------------------------- HF checkpoint dirs
@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])
def test_save_load_roundtrip_and_transformers_reads_our_dir(tmp_path, tie):
    model = make_tiny_model(300, tie_embeddings=tie, seed=7)
    out = save_hf_dir(model, tmp_path / "ckpt", {"lineage": {"parent": "x"}})
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tie
    assert json.loads((out / "playground.json").read_text())["lineage"] == {"parent": "x"}
    cfg, back = load_hf_dir(out)
    assert cfg == model.cfg
    x = ids(10, 300)
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    torch.testing.assert_close(ref(x).logits, model(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_load_sharded_checkpoint_written_by_transformers(tmp_path):
    """The other direction: a directory transformers saved (sharded safetensors + index) loads into ours."""
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg, ours = load_hf_dir(tmp_path / "hf")
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_seq_len, cfg.tie_embeddings) == (10000.0, 1e-6, 256, False)
    x = ids(10, 300, seed=2)
    torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=1e-5)


def test_unsupported_checkpoints_get_clear_errors(tmp_path):
    out = save_hf_dir(make_tiny_model(100), tmp_path / "c")
    config = json.loads((out / "config.json").read_text())
    for change, message in [({"model_type": "qwen2"}, "model_type 'qwen2'"),
                            ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
                            ({"attention_bias": True}, "biases")]:
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf_dir(out)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_dir(out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- hub
def test_hub_id_offline_names_the_id(tmp_path, monkeypatch):
    """The real snapshot_download in offline mode with an empty cache (what this machine hits)."""
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(HubUnavailable, match=r"'HuggingFaceTB/SmolLM2-360M'.*not reachable"):
        load_hf("HuggingFaceTB/SmolLM2-360M")


def test_hub_id_unreachable_network_names_the_id(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_network(repo_id, **kw):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub and we cannot "
                                      "find the appropriate snapshot folder in the local cache.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(HubUnavailable, match="'someone/llama-tiny'"):
        load_hf("someone/llama-tiny")


@torch.no_grad()
def test_hub_id_online_loads_the_downloaded_snapshot(tmp_path, monkeypatch):
    """With the download replaced at the edge by a local snapshot, a hub id loads like a directory."""
    import huggingface_hub
    model = make_tiny_model(200, seed=8)
    snap = save_hf_dir(model, tmp_path / "snapshot")
    asked = {}

    def fake_download(repo_id, revision=None, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    _, loaded = load_hf("someone/llama-tiny", revision="main")
    assert asked["repo_id"] == "someone/llama-tiny" and "*.safetensors" in asked["patterns"]
    x = ids(6, 200)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


# ------------------------------------------------------------------- the real bundled model
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="session")
def smollm2_pair(tmp_path_factory):
    """(ours, reference, tokenizer ids per prompt, seconds to load ours) in float32, loaded once."""
    from backend.config import AppConfig
    from models.gguf_file import find_smollm2_gguf
    from models.registry import ModelRegistry
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = AppConfig(data_dir=tmp_path_factory.mktemp("data"))  # shares the suite's cache dir (conftest)
    t0 = time.perf_counter()
    ours = ModelRegistry(cfg).load("smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    gguf_path = find_smollm2_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                            dtype=torch.float32).eval()
    # Token ids only need to be the same input for both models; our tokenizer's equality with the
    # original is tests/test_tokenizers.py's job (transformers' GGUF tokenizer takes long to build).
    from models.tokenizers import get_encoding
    enc = get_encoding("smollm2")
    prompt_ids = [enc.encode(p, allowed_special="all") for p in PROMPTS]
    torch.set_num_threads(before)
    return ours, ref, prompt_ids, load_s


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_match_transformers_gguf(smollm2_pair):
    """Tolerance: max |logit difference| < 1e-3 in float32 over every position of each prompt
    (measured ~3e-5; logits are O(10-30), so this is float32 summation-order noise)."""
    ours, ref, prompt_ids, _ = smollm2_pair
    for p in prompt_ids:
        x = torch.tensor([p])
        diff = (ours(x) - ref(x).logits).abs().max().item()
        assert diff < 1e-3, diff


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_greedy_20_tokens_match_transformers(smollm2_pair):
    ours, ref, prompt_ids, _ = smollm2_pair
    for p in prompt_ids[:2]:  # the chat prompt and the code prompt
        x = torch.tensor([p])
        want = ref.generate(x, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(x),
                            pad_token_id=2, eos_token_id=None)[0, len(p):].tolist()
        cache = ours.new_cache(1, len(p) + 20)
        logits = ours(x, cache, last_only=True)
        got = []
        for _ in range(20):
            nxt = int(logits[0, -1].argmax())
            got.append(nxt)
            logits = ours(torch.tensor([[nxt]]), cache)
        assert got == want


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_bf16_and_metadata(smollm2_pair):
    """bf16 (native on this CPU) keeps the fp32 model's next-token choice; the spec's context is the GGUF's."""
    from models.registry import BUNDLED_CONTEXT
    ours, ref, prompt_ids, _ = smollm2_pair
    bf16 = Transformer.from_state_dict(ours.cfg, {k: v.to(torch.bfloat16) for k, v in ours.state_dict().items()})
    for p in prompt_ids:
        x = torch.tensor([p])
        a, b = ours(x, last_only=True)[0, -1], bf16(x, last_only=True)[0, -1].float()
        assert int(a.argmax()) == int(b.argmax())
        assert (a - b).abs().max() < 1.5  # bf16 keeps ~3 significant digits of O(20) logits over 30 layers
    # transformers read the hyper-parameters from the GGUF metadata with its own code
    rc = ref.config
    assert rc.max_position_embeddings == BUNDLED_CONTEXT == ours.cfg.max_seq_len
    assert (rc.num_attention_heads, rc.num_key_value_heads, rc.tie_word_embeddings) == \
        (ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.tie_embeddings)
    assert abs(rc.rms_norm_eps - ours.cfg.norm_eps) < 1e-9
    assert rc.rope_parameters["rope_theta"] == ours.cfg.rope_theta


# ------------------------------------------------------------ tokenizer.json for exports
@pytest.mark.slow
@pytest.mark.parametrize("name,max_id", [("cl100k_base", None), ("smollm2", 49152)])
def test_exported_tokenizer_json_gives_our_ids(name, max_id):
    """HF `tokenizers` reading our tokenizer.json encodes a varied corpus to the same ids as the Encoding."""
    import random
    import sysconfig
    from tokenizers import Tokenizer
    from models.hf_tokenizer import tokenizer_json
    from models.tokenizers import get_encoding
    enc = get_encoding(name)
    hf = Tokenizer.from_str(json.dumps(tokenizer_json(enc, max_id)))
    texts = ["Hello world! It's 2024; we'll see 3.14159 and 1,000,000 items.", "a   1", "x\t\t2", "end   \n\n  42",
             "emoji 😀👍🏽 👩‍👩‍👧 🇫🇷", "日本語のテキストと中文和한국어", "combining: e\u0301 n\u0303 a\u0308\u0301",
             "it's I'll we've THEY'RE don't", " \n \r\n  \t 9", "trailing   ", "<|im_start|>user\nhi<|im_end|>\n"]
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts += [p.read_text(errors="replace") for p in random.Random(1).sample(files, 10)]
    for text in texts:
        want = enc.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == want, text[:60]
        assert hf.decode(want, skip_special_tokens=False) == text
