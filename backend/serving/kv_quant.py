"""The int8 KV cache (ServeConfig.kv_cache_dtype "int8"), llama.cpp's q8_0 cache (`--cache-type-k q8_0`).

A slot of one kv head holds its hd values as int8, then one float16 scale d per 32 of them (hd + hd/16 bytes:
68 for SmolLM2's hd 64, where float32 takes 256 and float16 128; models/transformer.py kv_slot_width). Per 32 values d = max|x| / 127 and
q = round-half-even(x * (1 / d)), so a value moves by at most half a step, d / 2. A decode step at a long
context is memory-bound (it streams the cache once per token), so a quarter of the bytes is what lets it keep
pace with a short one (issue 12's long-context goal).

decode_layer.cpp (store_kv, load_kv16) is the C++ side of this layout, bitwise the same as these functions;
the prefill (backend/serving/prefill.py) writes and reads the cache through them."""
from __future__ import annotations

import torch

BLOCK = 32  # values per float16 scale


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float [..., hd] -> int8 [..., hd + hd/16]: the values, then their float16 scales' bytes."""
    *lead, hd = x.shape
    blocks = x.float().reshape(*lead, hd // BLOCK, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv).clamp_(-127, 127).to(torch.int8).reshape(*lead, hd)
    return torch.cat([q, d.to(torch.float16).reshape(*lead, hd // BLOCK).view(torch.int8)], dim=-1)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """int8 [..., hd + hd/16] -> float32 [..., hd]."""
    hd = t.shape[-1] * 16 // 17
    d = t[..., hd:].contiguous().view(torch.float16).float()
    return (t[..., :hd].float().unflatten(-1, (hd // BLOCK, BLOCK)) * d[..., None]).flatten(-2)


def as_float(t: torch.Tensor) -> torch.Tensor:
    """Cached keys or values as float32, whatever the cache's dtype."""
    if t.dtype == torch.int8:
        return dequantize(t)
    return t if t.dtype == torch.float32 else t.float()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float cache layer in another cache dtype (quantized for int8)."""
    return quantize(t) if dtype == torch.int8 else t.to(dtype)


def store(t: torch.Tensor, index, x: torch.Tensor) -> None:
    """t[index] = x (float [..., hd]), quantized where the cache is int8."""
    t[index] = quantize(x) if t.dtype == torch.int8 else x
