"""A lean prefill for a model decoding on the GGUF's 4-bit blocks (backend/serving/decode_step.py): a chunk
of one prompt through every layer, its matmuls on one of (Engine(prefill_weights=...) picks; "auto" is
backend/serving/engine.py AUTO_PREFILL):
- "q4": the same 4-bit blocks through our kernel (backend/serving/q4_kernel.cpp; torch's int4 kernel, bf16
  activations, where ours cannot run: 2.6x slower than float32 at 300 tokens on a 2-core AVX2 EPYC), every chunk. It holds no
  float copy of the weights (the memory goal of issue 12), and its logits are 0.01 from float32's (bf16's:
  0.24-0.29). A chunk's matmuls run on all its rows at once (the weights are read once), and its attention
  in fixed tiles of TILE_ROWS query rows on the absolute position grid (rows [64 t, 64 t + 64)), each tile
  against keys [0, 64 t + 64) under the causal mask, padded to the full tile: every row then goes through
  the same shapes and the same mask however the prompt is cut into chunks, and the kernel's rows do not
  depend on each other, so a prompt prefilled in one go or in chunks of any sizes gives bitwise the same
  logits and KV cache (before tiles, SDPA's blocking followed the chunk's length and a chunked prefill of
  SmolLM2 was not bitwise the one-shot one);
- "bf16": chunks of up to `q4_rows` tokens on the 4-bit blocks as above (a short chunk only reads the weights
  once, and 4-bit weights are a quarter of bf16's bytes: on SmolLM2-135M, 2 threads, it beat bf16 up to 24
  tokens and tied at 32), longer ones on bf16 copies of the matrices, where a CPU with bf16 matrix units
  (AMX / avx512_bf16) runs oneDNN's GEMM compute-bound, 2-4x faster than our 8-rows-at-a-time kernel (64
  tokens: 42 against 77 ms). The copies cost ~220 MB resident for SmolLM2 (idle app: 831 against 609-623 MB);
- "float": `Transformer.forward` on the float weights (models trained here, and where the kernel cannot run).

The bf16 path does in ~16 ops a layer what `Transformer.forward` under autocast did in ~50 (q/k/v and gate/up
as one matmul each, their bf16 matrices concatenated at load; one fused RMSNorm; RoPE on q and k at once;
one SDPA call over the float32 KV cache with grouped-query heads). The residual stream, norms and RoPE stay
float32 on both; the KV cache is the engine's (float16 or int8 where the decode step is the fused C++ layer);
tests/test_scheduler.py compares both paths' logits with the float32 forward, and tests/test_engine.py the
q4 path's chunked prefill with the one-shot one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from backend.serving.kv_quant import as_float, store
from models.transformer import rotate_half


TILE_ROWS = 64  # query rows of one attention tile on the q4 path (see the module docstring)
WEIGHTS = ("q4", "bf16", "float")


class Prefill:
    def __init__(self, model, weights: str, q4_layers=None, q4_rows: int = 32):
        """weights: "q4", "bf16" or "float" (the module docstring); q4_layers: DecodeStep.layers when it decodes
        on the GGUF's blocks, through our kernel or torch's int4 kernel (else None: "q4" falls back to "float")."""
        if weights not in WEIGHTS:
            raise ValueError(f"prefill weights: one of {', '.join(WEIGHTS)}, not {weights!r}")
        cfg = model.cfg
        self.model, self.dim, self.eps = model, cfg.dim, cfg.norm_eps
        self.H, self.K, self.hd, self.hidden = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
        to_bf16 = lambda *ws: torch.cat([w.detach() for w in ws]).to(torch.bfloat16).contiguous()  # noqa: E731
        self.weights = weights
        self.q4_layers, self.q4_rows = q4_layers, q4_rows
        self.layers = []
        for blk in (model.model.layers if weights == "bf16" else []):
            a, m = blk.self_attn, blk.mlp
            self.layers.append((blk.input_layernorm.weight.detach().float(),
                                to_bf16(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight), to_bf16(a.o_proj.weight),
                                blk.post_attention_layernorm.weight.detach().float(),
                                to_bf16(m.gate_proj.weight, m.up_proj.weight), to_bf16(m.down_proj.weight)))

    def path(self, T: int) -> str:
        """Which weights a chunk of T tokens runs on: "q4" (the 4-bit blocks), "bf16" or "float" (the model's
        forward). On "q4" a row's result does not depend on how the prompt was cut into chunks (TILE_ROWS);
        on "bf16" not on the chunk's other rows (measured bitwise for chunks of 44-300 tokens)."""
        if self.q4_layers is not None and (self.weights == "q4" or (self.layers and T <= self.q4_rows)):
            return "q4"
        return "bf16" if self.layers else "float"

    def _mask(self, a: int) -> torch.Tensor:
        """The causal mask of the tile of query rows [a, a + TILE_ROWS) over keys [0, a + TILE_ROWS)."""
        keys = torch.arange(a + TILE_ROWS, device=self.model.device)
        return keys[None, :] <= (a + torch.arange(TILE_ROWS, device=self.model.device))[:, None]

    def _attend_tiles(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Attention of the chunk's queries q [T, H, hd] (positions start..start+T) over a cache layer's keys
        and values [1, K, slots, hd], in fixed tiles of TILE_ROWS rows on the absolute position grid, padded:
        each row sees the same shapes and mask whatever chunk it came in. Returns [T, H * hd]."""
        T, H, hd = q.shape
        out = q.new_empty(T, H, hd)
        # the slots any tile reads, as float32 once (a float16 or int8 cache converted once a layer, not once a tile)
        k, v = as_float(k[:, :, :start + T]), as_float(v[:, :, :start + T])
        for a in range(start // TILE_ROWS * TILE_ROWS, start + T, TILE_ROWS):
            lo, hi, end = max(a, start), min(a + TILE_ROWS, start + T), a + TILE_ROWS
            qt = q.new_zeros(TILE_ROWS, H, hd)
            qt[lo - a:hi - a] = q[lo - start:hi - start]
            keys, values = k[:, :, :end], v[:, :, :end]
            if keys.shape[2] < end:  # a cache shorter than the tile: its missing slots are masked anyway
                pad = (0, 0, 0, end - keys.shape[2])
                keys, values = F.pad(keys, pad), F.pad(values, pad)
            y = F.scaled_dot_product_attention(qt.transpose(0, 1)[None], keys, values, attn_mask=self._mask(a),
                                               enable_gqa=H != self.K)
            out[lo - start:hi - start] = y[0].transpose(0, 1)[lo - a:hi - a]
        return out.reshape(T, H * hd)

    def __call__(self, ids: list[int], cache) -> torch.Tensor:
        """Continue `cache` (batch 1; float32, or float16 / int8 for the fused decode layer) with ids; the final-norm
        hidden states [1, T, dim] (float32)."""
        model, H, K, hd = self.model, self.H, self.K, self.hd
        T, start = len(ids), cache.pos
        path = self.path(T)
        if path == "float":
            return model(torch.tensor([ids], device=model.device), cache, return_hidden=True)
        q4 = path == "q4"
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
                qkv = fqkv(F.rms_norm(x, (self.dim,), ln1, self.eps)).float()  # torch's int4 kernel: bf16 out
            else:
                ln1, wqkv, wo, ln2, wgu, wd = self.layers[i]
                h = F.rms_norm(x, (self.dim,), ln1, self.eps).to(torch.bfloat16)
                qkv = (h @ wqkv.T).float()  # [T, (H + 2K) hd]
            qk = qkv[:, :(H + K) * hd].view(T, H + K, hd)
            qk = qk * cos + rotate_half(qk) * sin
            store(cache.k[i], (0, slice(None), slice(start, start + T)), qk[:, H:].transpose(0, 1))
            store(cache.v[i], (0, slice(None), slice(start, start + T)), qkv[:, (H + K) * hd:].view(T, K, hd).transpose(0, 1))
            # attention reads the keys and values back from the cache, so a chunk's own come out of it rounded
            # as a later chunk or the decode step will see them (float16 and int8 caches: decode_layer.cpp)
            if q4:
                y = self._attend_tiles(qk[:, :H], cache.k[i], cache.v[i], start)
                x = x + fo(y).float()
                gu = fgu(F.rms_norm(x, (self.dim,), ln2, self.eps)).float()
                x = x + fd(F.silu(gu[:, :self.hidden]) * gu[:, self.hidden:]).float()
                continue
            q = qk[:, :H].transpose(0, 1)[None]  # [1, H, T, hd]
            keys, values = as_float(cache.k[i][:, :, :start + T]), as_float(cache.v[i][:, :, :start + T])
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=H != K)
            y = y[0].transpose(0, 1).reshape(T, H * hd)
            x = x + (y.to(torch.bfloat16) @ wo.T).float()
            h = F.rms_norm(x, (self.dim,), ln2, self.eps).to(torch.bfloat16)
            gu = h @ wgu.T
            x = x + ((F.silu(gu[:, :self.hidden]) * gu[:, self.hidden:]) @ wd.T).float()
        cache.pos += T
        return F.rms_norm(x, (self.dim,), model.model.norm.weight, self.eps)[None]
