"""A lean prefill for a model decoding on the GGUF's 4-bit blocks (backend/serving/decode_step.py): a chunk
of one prompt through every layer, its matmuls on
- the same 4-bit blocks through our kernel (backend/serving/q4_kernel.cpp) for chunks of up to `q4_rows`
  tokens: a short chunk only reads the weights once, and 4-bit weights are a quarter of bf16's bytes. On
  SmolLM2-135M (2 threads) it beat bf16 up to 24 tokens (8 tokens: 16.9 against 29.1 ms) and tied at 32,
  and its logits were 0.01 from float32's (bf16's: 0.24-0.29);
- bf16 copies of the matrices for longer chunks, on a CPU with bf16 matrix units (AMX / avx512_bf16), where
  oneDNN's GEMM is compute-bound and 2-4x faster than our 8-rows-at-a-time kernel (64 tokens: 42 against 77 ms);
- elsewhere, `Transformer.forward` on the float weights.

The bf16 path does in ~16 ops a layer what `Transformer.forward` under autocast did in ~50 (q/k/v and gate/up
as one matmul each, their bf16 matrices concatenated at load; one fused RMSNorm; RoPE on q and k at once;
one SDPA call over the float32 KV cache with grouped-query heads). That did not make it faster: at a chat
prompt's length the time is reading the bf16 weights (35 tokens: 42 ms either way), which is why short
chunks go to the 4-bit blocks. The residual stream, norms and RoPE stay float32; the KV cache is the
engine's (float16 where the decode step is the fused C++ layer); tests/test_scheduler.py compares both
paths' logits with the float32 forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.transformer import rotate_half


class Prefill:
    def __init__(self, model, bf16: bool, q4_layers=None, q4_rows: int = 32):
        """q4_layers: DecodeStep.layers when all its matrices run on our kernel (else None)."""
        cfg = model.cfg
        self.model, self.dim, self.eps = model, cfg.dim, cfg.norm_eps
        self.H, self.K, self.hd, self.hidden = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
        to_bf16 = lambda *ws: torch.cat([w.detach() for w in ws]).to(torch.bfloat16).contiguous()  # noqa: E731
        self.q4_layers, self.q4_rows = q4_layers, q4_rows
        self.layers = []
        for blk in (model.model.layers if bf16 else []):
            a, m = blk.self_attn, blk.mlp
            self.layers.append((blk.input_layernorm.weight.detach().float(),
                                to_bf16(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), to_bf16(a.o_proj.weight),
                                blk.post_attention_layernorm.weight.detach().float(),
                                to_bf16(m.gate_proj.weight, m.up_proj.weight), to_bf16(m.down_proj.weight)))

    def path(self, T: int) -> str:
        """Which weights a chunk of T tokens runs on: "q4" (the 4-bit blocks), "bf16" or "float" (the model's
        forward). On "q4" and "bf16" a row's result does not depend on the chunk's other rows (measured bitwise
        for chunks of 44-300 tokens), so chunks of one path may be cut anywhere without changing a bit."""
        if self.q4_layers is not None and (T <= self.q4_rows or not self.layers):
            return "q4"
        return "bf16" if self.layers else "float"

    def __call__(self, ids: list[int], cache) -> torch.Tensor:
        """Continue `cache` (batch 1; float32, or float16 for the fused decode layer) with ids; the final-norm
        hidden states [1, T, dim] (float32)."""
        model, H, K, hd = self.model, self.H, self.K, self.hd
        T, start = len(ids), cache.pos
        path = self.path(T)
        if path == "float":
            return model(torch.tensor([ids], device=model.device), cache, return_hidden=True)
        q4 = path == "q4"
        kv = cache.k[0].dtype
        if start + T > model.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {model.cfg.max_seq_len}")
        x = model.model.embed_tokens.weight[torch.tensor(ids, device=model.device)].float()  # [T, dim]
        cos = model.rope_cos[start:start + T][:, None, :]  # [T, 1, hd]: broadcast over q and k heads
        sin = model.rope_sin[start:start + T][:, None, :]
        if start == 0:  # the whole prompt so far: plain causal attention
            mask, causal = None, T > 1
        else:  # query t sees every cached slot and the chunk's tokens up to itself
            keys = torch.arange(start + T, device=model.device)
            mask, causal = keys[None, :] <= (start + torch.arange(T, device=model.device))[:, None], False
        for i in range(model.cfg.n_layers):
            if q4:
                ln1, fqkv, fo, ln2, fgu, fd = self.q4_layers[i]
                qkv = fqkv(F.rms_norm(x, (self.dim,), ln1, self.eps))
            else:
                ln1, wqkv, wo, ln2, wgu, wd = self.layers[i]
                h = F.rms_norm(x, (self.dim,), ln1, self.eps).to(torch.bfloat16)
                qkv = (h @ wqkv.T).float()  # [T, (H + 2K) hd]
            qk = qkv[:, :(H + K) * hd].view(T, H + K, hd)
            qk = qk * cos + rotate_half(qk) * sin
            cache.k[i][0, :, start:start + T] = qk[:, H:].transpose(0, 1)
            cache.v[i][0, :, start:start + T] = qkv[:, (H + K) * hd:].view(T, K, hd).transpose(0, 1)
            q = qk[:, :H].transpose(0, 1)[None]  # [1, H, T, hd]
            # attention reads the keys and values back from the cache, so a chunk's own come out of it rounded
            # as a later chunk or the decode step will see them (float16 caches: decode_layer.cpp)
            keys, values = cache.k[i][:, :, :start + T], cache.v[i][:, :, :start + T]
            if kv != torch.float32:
                keys, values = keys.float(), values.float()
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=H != K)
            y = y[0].transpose(0, 1).reshape(T, H * hd)
            if q4:
                x = x + fo(y)
                gu = fgu(F.rms_norm(x, (self.dim,), ln2, self.eps))
                x = x + fd(F.silu(gu[:, :self.hidden]) * gu[:, self.hidden:])
                continue
            x = x + (y.to(torch.bfloat16) @ wo.T).float()
            h = F.rms_norm(x, (self.dim,), ln2, self.eps).to(torch.bfloat16)
            gu = h @ wgu.T
            x = x + ((F.silu(gu[:, :self.hidden]) * gu[:, self.hidden:]) @ wd.T).float()
        cache.pos += T
        return F.rms_norm(x, (self.dim,), model.model.norm.weight, self.eps)[None]
