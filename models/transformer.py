"""A compact decoder-only transformer of the Llama family (RMSNorm, RoPE, GQA, SwiGLU).

One class serves every model in the app: SmolLM2 loaded from its GGUF file, Hugging Face
Llama-style checkpoints, and the small presets trained from scratch. Weight names follow the
Hugging Face Llama layout (`model.layers.N.self_attn.q_proj.weight`, ...) so checkpoints load and
save without renaming, and RoPE is the HF "rotate half" form.

Batched inference over prompts of different lengths uses left padding: every row writes its KV
entries at the same cache slot, `pad[b]` says how many leading slots of row b are padding, and the
row's RoPE positions start at 0 after its padding.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    hidden_dim: int = 1536
    max_seq_len: int = 8192
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    def num_params(self) -> int:
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference implementations do, then cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # Always computed on the CPU (also inside a `torch.device("meta")` context, where arange would
    # import torch._dynamo); the module's .to(device) moves the tables.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    t = torch.arange(max_len, dtype=torch.float64, device="cpu")
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos/sin: [B, 1, T, D]
    return x * cos + rotate_half(x) * sin


def kv_slot_width(head_dim: int, dtype: torch.dtype) -> int:
    """Cache elements a slot of one kv head takes: head_dim, and for an int8 cache the float16 scales' bytes
    after the values, one scale per 32 (llama.cpp's q8_0; backend/serving/kv_quant.py)."""
    if dtype != torch.int8:
        return head_dim
    if head_dim % 64 or head_dim > 256:  # scales read in pairs, at most 8 (decode_layer.cpp q8_scales8)
        raise ValueError(f"an int8 KV cache needs a head size of 64, 128, 192 or 256, not {head_dim}")
    return head_dim + head_dim // 16


class KVCache:
    """Preallocated keys and values for every layer: [B, n_kv_heads, max_len, head_dim] each (an int8 cache's
    slots are wider: their scales follow the values, backend/serving/kv_quant.py)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype, pad: torch.Tensor | None = None):
        shape = (batch, cfg.n_kv_heads, max_len, kv_slot_width(cfg.head_dim, dtype))
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0  # slots filled so far (same for every row)
        self.max_len = max_len
        self.pad = pad  # LongTensor [B] of left-padding counts, or None

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def expand(self, n: int) -> "KVCache":
        """Repeat a batch-1 cache n times: one prefill shared by n samples of the same prompt."""
        if self.batch != 1:
            raise ValueError("only a batch-1 cache can be expanded")
        out = object.__new__(KVCache)
        out.k = [t.expand(n, -1, -1, -1).contiguous() for t in self.k]
        out.v = [t.expand(n, -1, -1, -1).contiguous() for t in self.v]
        out.pos, out.max_len = self.pos, self.max_len
        out.pad = None if self.pad is None else self.pad.expand(n).contiguous()
        return out

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (drop finished sequences from a batched decode)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, is_causal: bool):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            start = cache.pos
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k = cache.k[layer][:, :, :start + T]
            v = cache.v[layer][:, :, :start + T]
        y = attend(q, k, v, mask, is_causal and mask is None, self.n_kv_heads != self.n_heads, cache is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask, is_causal: bool, gqa: bool, whole_sequence: bool) -> torch.Tensor:
    """scaled_dot_product_attention; enable_gqa lets each group of query heads share its k/v head
    without copying the cache.

    Under CPU autocast (bf16 training) attention runs in float32: the CPU flash kernel is slower in
    bf16 than in fp32 (forward + backward of SmolLM2-135M's 4x9x238x64 packed rows: 49 vs 36 ms per
    layer, one thread), q and k already come out of RoPE in fp32 (its tables are fp32), and fp32 is the
    more exact of the two. Not with a KV cache (that would copy the whole cache each step) nor on
    other devices (the GPU kernels are fastest in bf16).
    """
    if whole_sequence and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  is_causal=is_causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, is_causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(nn.Module):
    """Holds the HF `model.*` submodules so state-dict keys match the HF Llama layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # nn.Embedding's default init (normal_), skipped on the meta device (Transformer.from_state_dict),
        # where normal_ goes through torch's reference ops and imports torch._dynamo (~5 s).
        weight = torch.empty(cfg.vocab_size, cfg.dim)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Inner(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # -- construction -------------------------------------------------------------------------
    def init_weights(self, seed: int = 0) -> "Transformer":
        """GPT-2 style init for training from scratch (std 0.02, residual projections scaled)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
                continue
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> "Transformer":
        """Build a model whose parameters are the given tensors (HF Llama names), without a random init.

        Constructing on the meta device skips allocating and initialising 100M+ throwaway weights,
        which is most of the load time otherwise. `lm_head.weight` may be absent when embeddings are tied.
        """
        with torch.device("meta"):
            model = cls(cfg)
        expected = set(model.state_dict().keys())
        if cfg.tie_embeddings:
            expected.discard("lm_head.weight")
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        missing, unexpected = expected - sd.keys(), sd.keys() - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        dtype = sd["model.embed_tokens.weight"].dtype
        try:
            model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"checkpoint does not match the model config: {e}") from None
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, batch: int, max_len: int | None = None, pad: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """dtype: the cache's (default: the model's); forward() itself needs the model's."""
        return KVCache(self.cfg, batch, max_len or self.cfg.max_seq_len, self.device, dtype or self.dtype, pad)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, return_hidden: bool = False,
                last_only: bool = False, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only; hidden [B, T, dim] with return_hidden).

        With a cache, idx continues the sequence at slot `cache.pos`, and the cache advances by T.
        doc_ids [B, T] (training only, no cache): several documents packed in one row. A token attends
        only to earlier tokens of its own document (block-diagonal causal mask) and RoPE positions
        restart at 0 where a document starts, so a packed row computes what separate rows would.
        """
        B, T = idx.shape
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed documents) cannot be combined with a KV cache")
            return self._forward_packed(idx, doc_ids, return_hidden, last_only)
        start = cache.pos if cache is not None else 0
        pad = cache.pad if cache is not None else None
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.cfg.max_seq_len}")
        slots = torch.arange(start, start + T, device=idx.device)
        if pad is not None:
            pos = (slots[None, :] - pad[:, None]).clamp_min(0)  # [B, T]
            cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        else:
            cos, sin = self.rope_cos[slots][None, None], self.rope_sin[slots][None, None]
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)

        mask = None
        is_causal = cache is None or (start == 0 and T > 1)
        if pad is not None or (cache is not None and start > 0 and T > 1):
            keys = torch.arange(start + T, device=idx.device)
            allowed = keys[None, :] <= slots[:, None]  # causal [T, S]
            allowed = allowed[None, None].expand(B, 1, T, start + T)
            if pad is not None:
                allowed = allowed & (keys[None, None, None, :] >= pad[:, None, None, None])
                # A padding query row would see no key at all (NaN softmax); let it see itself.
                allowed = allowed | (keys[None, None, None, :] == slots[None, None, :, None])
            mask = allowed
        elif cache is not None and T == 1:
            is_causal = False  # one new query attends to every filled slot

        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache, i, is_causal)
        if cache is not None:
            cache.pos += T
        x = self.model.norm(x)
        if return_hidden:
            return x
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x)

    def _forward_packed(self, idx, doc_ids, return_hidden, last_only):
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.cfg.max_seq_len}")
        t = torch.arange(T, device=idx.device).expand(B, T)
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        pos = t - torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=1).values  # offset in its document
        cos, sin = self.rope_cos[pos][:, None].to(self.dtype), self.rope_sin[pos][:, None].to(self.dtype)
        same = doc_ids[:, :, None] == doc_ids[:, None, :]
        mask = (same & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril())[:, None]  # [B, 1, T, T]
        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, None, i, False)
        x = self.model.norm(x)
        if return_hidden:
            return x
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x)
