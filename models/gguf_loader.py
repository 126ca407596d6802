"""Load a llama-architecture GGUF file (the bundled SmolLM2-135M-Instruct Q4_1) into our Transformer.

The `gguf` package reads and dequantizes the tensors; we rename them from llama.cpp's names to the
Hugging Face Llama names our Transformer uses, and undo the row permutation llama.cpp's converter
applies to q_proj/k_proj (it reorders each head's rows for its interleaved RoPE; we use HF's
rotate-half RoPE). Dequantizing takes several seconds, so the result is cached as an HF-layout
directory (config.json + model.safetensors) in the data directory; later loads read that cache.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.hf_checkpoint import load_hf_dir, read_extra, save_hf_dir
from models.transformer import ModelConfig, Transformer

# Bump when the conversion changes, so caches written by an older version are rebuilt.
LOADER_VERSION = 1

# llama.cpp tensor name -> HF Llama name ("{i}" is the layer index).
_LAYER_NAMES = {
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp stores that our model recomputes (RoPE tables).
_SKIPPED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return _LAYER_NAMES[m.group(2)].format(i=int(m.group(1)))
    raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file (not a llama-architecture tensor we know)")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute for a [n_head*head_dim, dim] q/k weight.

    llama.cpp reshapes rows as (head, 2, head_dim/2) and swaps the last two axes, interleaving the two
    rotate-half halves; swapping them back restores the HF row order.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader) -> ModelConfig:
    """Hyper-parameters from the GGUF metadata (llama architecture keys)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    rope_dim = _field(reader, "llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != dim // n_heads:
        raise ValueError(f"partial RoPE (rope.dimension_count {rope_dim}) is not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF with RoPE scaling is not supported")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return ModelConfig(
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        hidden_dim=int(_field(reader, "llama.feed_forward_length")),
        max_seq_len=int(_field(reader, "llama.context_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
    )


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize every tensor to float32 and return (config, HF-named state dict)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    cfg = read_config(reader)
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        name = hf_name(t.name)
        # GGUF shapes list the fastest axis first; dequantize returns numpy [rows, cols] like torch.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
        if name.endswith("q_proj.weight"):
            w = unpermute(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute(w, cfg.n_kv_heads)
        sd[name] = torch.from_numpy(np.require(w, requirements=["C", "W"]))
    return cfg, sd


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "loader_version": LOADER_VERSION}


def _cache_valid(cache: Path, fingerprint: dict) -> bool:
    try:
        return read_extra(cache).get("source") == fingerprint and (cache / "model.safetensors").exists()
    except (OSError, ValueError):
        return False


def build_cache(gguf_path: Path, cache: Path, extra: dict | None = None) -> None:
    """Dequantize the GGUF into an HF-layout directory at `cache`, atomically (temp dir + rename)."""
    cfg, sd = read_gguf(gguf_path)
    model = Transformer.from_state_dict(cfg, sd)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        save_hf_dir(model, tmp, {**(extra or {}), "source": _fingerprint(gguf_path)})
        old = None
        if cache.exists():  # stale cache: move aside first, so `cache` is never half-written
            old = cache.with_name(f".{cache.name}.old-{os.getpid()}")
            os.replace(cache, old)
        try:
            os.replace(tmp, cache)
        except OSError:
            if not _cache_valid(cache, _fingerprint(gguf_path)):  # lost a race to another process: fine
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf_cached(gguf_path: Path, cache: Path, extra: dict | None = None) -> Transformer:
    """Load a GGUF model through its safetensors cache (building the cache on first use). float32, eval mode."""
    gguf_path = Path(gguf_path)
    if not _cache_valid(cache, _fingerprint(gguf_path)):
        build_cache(gguf_path, cache, extra)
    _, model = load_hf_dir(cache)
    return model
