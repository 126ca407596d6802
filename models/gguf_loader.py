"""Load a llama-architecture GGUF file (the bundled SmolLM2-135M-Instruct Q4_1) into our Transformer.

The `gguf` package reads and dequantizes the tensors; we rename them from llama.cpp's names to the
Hugging Face Llama names our Transformer uses, and undo the row permutation llama.cpp's converter
applies to q_proj/k_proj (it reorders each head's rows for its interleaved RoPE; we use HF's
rotate-half RoPE). Dequantizing takes several seconds, so the result is cached as an HF-layout
directory (config.json + model.safetensors) in the data directory; later loads read that cache.

The cache also keeps the file's own quantized blocks (Q4_1 and Q8_0 matrices, un-permuted like the
floats) in gguf_blocks.safetensors: the CPU decode path (backend/serving/decode_step.py) runs on them instead of
the float32 dequantization, reading an eighth of the bytes per token. `load_gguf_blocks` reads them.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file, save_file

from models.hf_checkpoint import load_hf_dir, read_extra, save_hf_dir
from models.transformer import ModelConfig, Transformer

# Bump when the conversion changes, so caches written by an older version are rebuilt.
LOADER_VERSION = 2  # 2: the cache keeps the Q4_1/Q8_0 blocks (gguf_blocks.safetensors)
BLOCKS_FILE = "gguf_blocks.safetensors"

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


@dataclass
class QuantBlocks:
    """One block-quantized matrix [N, K] as the GGUF stores it: blocks of 32 along K (a row's inputs),
    w[n, 32 * b + j] = q[n, 32 * b + j] * d[n, b] (+ m[n, b] for Q4_1).
    Q4_1: q uint8 in 0..15, d and m float16 [N, K/32]. Q8_0: q int8, d float16, m None."""
    kind: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        N, K = self.q.shape
        w = self.q.view(N, K // 32, 32).float() * self.d.float()[..., None]
        if self.m is not None:
            w = w + self.m.float()[..., None]
        return w.view(N, K)


_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # fp16 d (+ fp16 m) then the 32 values of a block


def _blocks(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw GGUF bytes [N, K/32 * block bytes] -> (q [N, K], d [N, K/32], m [N, K/32] or None)."""
    b = raw.reshape(raw.shape[0], -1, _BLOCK_BYTES[kind])
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    if kind == "Q8_0":
        return b[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1), d, None
    m = b[..., 2:4].copy().view(np.float16)[..., 0]
    qs = b[..., 4:]  # byte j holds value j (low nibble) and value j + 16 (high nibble)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(raw.shape[0], -1), d, m


def _read(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, QuantBlocks]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    cfg = read_config(reader)
    sd: dict[str, torch.Tensor] = {}
    blocks: dict[str, QuantBlocks] = {}
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        name = hf_name(t.name)
        # GGUF shapes list the fastest axis first; dequantize returns numpy [rows, cols] like torch.
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])
        parts = _blocks(np.asarray(t.data), t.tensor_type.name) if t.tensor_type.name in _BLOCK_BYTES else None
        n_head = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # rows permuted: q, d and m rows alike
            w = unpermute(w, n_head)
            parts = parts and tuple(None if a is None else unpermute(a, n_head) for a in parts)
        sd[name] = torch.from_numpy(np.require(w, requirements=["C", "W"]))
        if parts is not None:
            blocks[name] = QuantBlocks(t.tensor_type.name, *(None if a is None else torch.from_numpy(
                np.require(a, requirements=["C", "W"])) for a in parts))
    return cfg, sd, blocks


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize every tensor to float32 and return (config, HF-named state dict)."""
    cfg, sd, _ = _read(path)
    return cfg, sd


def read_gguf_blocks(path: Path) -> dict[str, QuantBlocks]:
    """The Q4_1 / Q8_0 matrices of a GGUF file by HF name, as stored (q/k rows un-permuted)."""
    return _read(path)[2]


def _save_blocks(blocks: dict[str, QuantBlocks], path: Path) -> None:
    flat = {}
    for name, b in blocks.items():
        q = b.q
        if b.kind == "Q4_1":  # two values per byte on disk: even column low nibble, odd column high
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        flat[f"{name}:q"], flat[f"{name}:d"] = q.contiguous(), b.d
        if b.m is not None:
            flat[f"{name}:m"] = b.m
    save_file(flat, str(path))
    path.chmod(0o644)


def load_gguf_blocks(cache: Path) -> dict[str, QuantBlocks]:
    """The quantized blocks kept in a cache directory built by `load_gguf_cached` (empty if none)."""
    path = Path(cache) / BLOCKS_FILE
    if not path.exists():
        return {}
    flat = load_file(str(path))
    out = {}
    for key in flat:
        name, part = key.rsplit(":", 1)
        if part != "q":
            continue
        q, m = flat[key], flat.get(f"{name}:m")
        if m is not None:  # Q4_1 (the only kind with a min); numpy unpacks nibbles ~10x faster than torch
            a = q.numpy()
            q = torch.from_numpy(np.stack([a & 0x0F, a >> 4], axis=-1).reshape(a.shape[0], -1))
        out[name] = QuantBlocks("Q4_1" if m is not None else "Q8_0", q, flat[f"{name}:d"], m)
    return out


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
    cfg, sd, blocks = _read(gguf_path)
    model = Transformer.from_state_dict(cfg, sd)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        save_hf_dir(model, tmp, {**(extra or {}), "source": _fingerprint(gguf_path)})
        if blocks:
            _save_blocks(blocks, tmp / BLOCKS_FILE)
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
