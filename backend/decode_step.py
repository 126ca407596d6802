"""A lean forward for decoding: one new token per row, reusing the model's weights and its KVCache.

`Transformer.forward` is general (training, prefill, masks for any T). Decoding calls it once per token,
and at T=1 per-op overhead is a visible share of the step on a CPU. This step does the same math with
fewer ops and no mask building:
- RoPE rotates q and k together, from precomputed tables, with no per-step mask unless rows are padded;
- grouped-query attention needs no `repeat_interleave` of the cache: the `rep` query heads that
  share a KV head become `rep` query rows of one SDPA call against that head's keys.
Fusing q/k/v and gate/up into single matmuls was tried: no measurable gain per token (the step is
memory-bound), while concatenating the weights cost seconds of load time, so the weights stay as loaded.
tests/test_engine.py checks its logits against `Transformer.forward`.

quant="int8" (opt-in) runs every decode matmul with int8 weights (symmetric, one scale per output row)
through fbgemm's dynamic-quantized linear: a quarter of the float32 bytes per token, which is what a
memory-bound batch-1 decode pays for. Prefill keeps the float weights. Greedy text can drift from the
float32 model after a few dozen tokens; float32 stays the default.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _int8_linear(w: torch.Tensor):
    """y = x @ w.T with w quantized to int8 per output row (fbgemm dynamic linear: x is quantized per call)."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def _float_linear(w: torch.Tensor):
    return lambda x: F.linear(x, w)


def quant_supported() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class DecodeStep:
    def __init__(self, model, quant: str | None = None):
        if quant not in (None, "int8"):
            raise ValueError(f"quant must be None or 'int8', not {quant!r}")
        if quant == "int8" and (model.device.type != "cpu" or not quant_supported()):
            raise ValueError("int8 decoding needs a CPU with fbgemm")
        if quant == "int8" and model.dtype != torch.float32:
            raise ValueError("int8 decoding quantizes a float32 model")
        self.quant = quant
        cfg = model.cfg
        self.model = model
        self.H, self.K, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rep = self.H // self.K
        self.dim, self.eps = cfg.dim, cfg.norm_eps
        lin = _int8_linear if quant == "int8" else _float_linear
        self.layers = []
        with torch.no_grad():
            for blk in model.model.layers:
                a, m = blk.self_attn, blk.mlp
                self.layers.append((blk.input_layernorm.weight, lin(a.q_proj.weight), lin(a.k_proj.weight),
                                    lin(a.v_proj.weight), lin(a.o_proj.weight), blk.post_attention_layernorm.weight,
                                    lin(m.gate_proj.weight), lin(m.up_proj.weight), lin(m.down_proj.weight)))
            self.lm_head = lin(model.lm_head.weight)

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens [B] at slot cache.pos -> logits [B, V]; the cache advances by one."""
        model, H, K, hd, rep = self.model, self.H, self.K, self.hd, self.rep
        B = tokens.shape[0]
        pos = cache.pos
        if pos + 1 > model.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + 1} tokens exceeds the context length {model.cfg.max_seq_len}")
        dtype = model.dtype
        x = model.model.embed_tokens.weight[tokens]  # [B, dim]
        mask = None
        if cache.pad is None:
            cos = model.rope_cos[pos].to(dtype)  # [hd], broadcast over rows and heads
            sin = model.rope_sin[pos].to(dtype)
        else:
            p = (pos - cache.pad).clamp_min(0)
            cos = model.rope_cos[p].to(dtype)[:, None, :]  # [B, 1, hd]
            sin = model.rope_sin[p].to(dtype)[:, None, :]
            keys = torch.arange(pos + 1, device=tokens.device)
            mask = (keys[None, :] >= cache.pad[:, None])[:, None, None, :]  # [B, 1, 1, S]
        for i, (ln1, wq, wk, wv, wo, ln2, wg, wu, wd) in enumerate(self.layers):
            h = F.rms_norm(x, (self.dim,), ln1, self.eps)
            qk = torch.cat([wq(h).view(B, H, hd), wk(h).view(B, K, hd)], dim=1)
            qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k at once
            cache.k[i][:, :, pos] = qk[:, H:]
            cache.v[i][:, :, pos] = wv(h).view(B, K, hd)
            q = qk[:, :H].reshape(B, K, rep, hd)
            y = F.scaled_dot_product_attention(q, cache.k[i][:, :, :pos + 1], cache.v[i][:, :, :pos + 1],
                                               attn_mask=mask)
            x = x + wo(y.reshape(B, H * hd))
            h = F.rms_norm(x, (self.dim,), ln2, self.eps)
            x = x + wd(F.silu(wg(h)) * wu(h))
        cache.pos += 1
        x = F.rms_norm(x, (self.dim,), model.model.norm.weight, self.eps)
        return self.lm_head(x)
