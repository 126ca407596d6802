"""A lean forward for decoding: one new token per row, reusing the model's weights and its KVCache.

`Transformer.forward` is general (training, prefill, masks for any T). Decoding calls it once per token,
and at T=1 per-op overhead is a visible share of the step on a CPU. This step does the same math with
fewer ops and no mask building:
- RoPE rotates q and k together, from precomputed tables, with no per-step mask unless rows are padded;
- grouped-query attention needs no `repeat_interleave` of the cache: the `rep` query heads that
  share a KV head become `rep` query rows of one SDPA call against that head's keys.
- q/k/v and gate/up each run as one call: on 4-bit blocks one matmul over the rows stacked at load;
  float weights stay as loaded (concatenating them cost seconds of load for no measurable gain, the
  float step being memory-bound) and their outputs are concatenated.
tests/test_engine.py checks its logits against `Transformer.forward`.

Decoding at batch 1 is memory-bound: float32 weights are ~540 MB read per token for SmolLM2-135M.
Two weight formats cut that (prefill keeps the float weights either way); backend/serving/model_pool.py picks
"gguf" for a model loaded from a GGUF file on a CPU unless PLAYGROUND_QUANT says otherwise:
- quant="gguf": the GGUF file's own blocks (models.gguf_loader.QuantBlocks), as llama.cpp runs them,
  ~1/8 of the float32 bytes per token. Two kernels run them:
  - ours (`kernel`, backend/serving/q4_kernel.cpp, on CPUs with AVX512-VNNI or AVX2): x is quantized to two int8
    digits per block of 32 and each block's dot product is integer (64 multiply-adds an instruction);
    scales stay float32; it measured the same top-1 as float32 on every step of the bench's prompts.
    A weight vector is loaded once for up to 8 rows, so 8 rows cost ~2x one (torch's int4 kernel
    dequantizes again for every 4 rows: 8 rows cost ~3.5x one). Where all of a layer's matrices run
    on it, the whole layer is one C++ call (backend/serving/decode_layer.cpp: the same math as `__call__`
    below), because at one token per step ~30 torch ops' dispatch cost as much as the matmuls.
  - torch's CPU int4 kernel where ours cannot run (quant="gguf-torch" forces it):
    `_weight_int4pack_mm_for_cpu`, whose dequant is (q - 8) * scale + zero, so scale = d and
    zero = m + 8 d; fast only with bfloat16 activations and scales. A Q8_0 matrix (the tied lm_head)
    is split exactly into two 4-bit halves, q = 16 * hi + lo, laid side by side along K so one int4
    call sums both. Activations, scales and outputs are rounded to bf16.
  The residual stream, RoPE, attention and the KV cache stay float32. Agreement with the float32 step
  is measured by `python -m backend.bench decode` and tested.
- quant="int8": any float32 model, weights re-quantized to int8 (one scale per output row) through
  fbgemm's dynamic-quantized linear. Greedy text drifts from float32 after a few dozen tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from backend.serving import q4_kernel
from models.gguf_loader import QuantBlocks
from models.transformer import kv_slot_width


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


def _int4_operands(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 kernel's (packed weight, scales_and_zeros [K/32, N, 2] bf16) for
    w[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32], q in 0..15."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    return packed, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def _int4_pack(blocks: QuantBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    d = blocks.d.float()
    if blocks.kind == "Q4_1":
        return _int4_operands(blocks.q, d, blocks.m.float() + 8 * d)
    # Q8_0: q in -128..127 = 16 * hi + lo, lo = q & 15 in 0..15, hi = q >> 4 in -8..7; w = 16 d hi + d lo,
    # laid side by side along K (the input is fed twice).
    q = blocks.q.numpy()  # numpy: integer ops ~10x faster than torch's here
    q = torch.from_numpy(np.concatenate([q & 15, (q >> 4) + 8], axis=1))
    return _int4_operands(q, torch.cat([d, 16 * d], dim=1), torch.cat([8 * d, torch.zeros_like(d)], dim=1))


def _int4_linear(packed: torch.Tensor, scales_zeros: torch.Tensor, in_features: int):
    """x [B, in_features] -> bf16 [B, N]; a Q8_0 split (packed K = 2 * in_features) gets x twice."""
    twice = scales_zeros.shape[0] * 32 == 2 * in_features
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    if twice:
        return lambda x: mm(torch.cat([x.to(torch.bfloat16)] * 2, dim=-1), packed, 32, scales_zeros)
    return lambda x: mm(x.to(torch.bfloat16), packed, 32, scales_zeros)


def _fits(blocks: QuantBlocks) -> bool:
    N, K = blocks.q.shape
    return N % 16 == 0 and K % 32 == 0  # the kernel tiles N by 16..64 and K by the 32-wide blocks


def _stack(parts: list[QuantBlocks]) -> QuantBlocks:
    """Several matrices of one kind reading the same input as one (rows stacked)."""
    if len(parts) == 1:
        return parts[0]
    m = None if parts[0].m is None else torch.cat([b.m for b in parts])
    return QuantBlocks(parts[0].kind, torch.cat([b.q for b in parts]), torch.cat([b.d for b in parts]), m)


def load_packed(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Int4 kernel operands saved by `save_packed` ({} when absent). Their layout depends on the torch
    version and the CPU's vector width, so the file name carries both (`packed_file_name`)."""
    if not path.exists():
        return {}
    flat = load_file(str(path))
    return {k[:-len(":w")]: (v, flat[k[:-len(":w")] + ":sz"]) for k, v in flat.items() if k.endswith(":w")}


def save_packed(path: Path, packed: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write atomically (a temp file then rename): several processes may load the same model at once."""
    flat = {}
    for key, (w, sz) in packed.items():
        flat[key + ":w"], flat[key + ":sz"] = w, sz
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(flat, str(tmp))
    tmp.chmod(0o644)
    os.replace(tmp, path)


def packed_file_name(kernel: bool = False) -> str:
    if kernel:  # our layout (backend/serving/q4_kernel.pack) goes with the kernel's source
        return f"q4kernel-pack-{q4_kernel.pack_digest()}.safetensors"
    return f"int4pack-torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}.safetensors"


def quant_supported() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def gguf_supported(device: torch.device) -> bool:
    """The int4 kernel runs on CPUs only; elsewhere a GGUF model decodes with its float weights."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class DecodeStep:
    def __init__(self, model, quant: str | None = None, blocks: dict | None = None, packed: dict | None = None,
                 kernel=None, activations: str = "int16"):
        """quant None (the model's own weights), "int8", or "gguf" with `blocks`: the GGUF's quantized
        matrices by HF weight name (models.gguf_loader.load_gguf_blocks) for this model's weights.
        `kernel`: our block kernel (backend.serving.q4_kernel.load) to run them on; None = torch's int4 kernel.
        `packed`: the kernel's operands from an earlier load of the same blocks (see `load_packed`);
        what is missing is packed from `blocks`, and `self.packed` holds them all afterwards.
        `activations`: how our kernel rounds its inputs (q4_kernel.ACTIVATION_DIGITS: "int16" or "int8"), for
        every matrix, so prefill and decode, alone or batched, round alike."""
        if quant not in (None, "int8", "gguf"):
            raise ValueError(f"quant must be None, 'int8' or 'gguf', not {quant!r}")
        if quant == "int8" and (model.device.type != "cpu" or not quant_supported()):
            raise ValueError("int8 decoding needs a CPU with fbgemm")
        if quant == "gguf" and not gguf_supported(model.device):
            raise ValueError(f"gguf decoding runs on the CPU's int4 kernel, not on {model.device.type}")
        if quant == "gguf" and not (blocks or packed):
            raise ValueError("gguf decoding needs the model's GGUF blocks (models.gguf_loader.load_gguf_blocks)")
        if quant is not None and model.dtype != torch.float32:
            raise ValueError(f"{quant} decoding runs beside a float32 model, not {model.dtype}")
        self.quant = quant
        self.kernel = kernel if quant == "gguf" else None
        cfg = model.cfg
        self.model = model
        self.H, self.K, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rep = self.H // self.K
        self.dim, self.eps = cfg.dim, cfg.norm_eps
        # torch's int4 kernel wants bf16 activations (the cast is shared by the matmuls reading the same
        # input); ours takes float32 and rounds inside
        self.act_dtype = torch.bfloat16 if quant == "gguf" and self.kernel is None else None

        self.packed = dict(packed or {})
        blocks = blocks or {}

        def packed_linear(key: str, parts: list[QuantBlocks], in_features: int):
            if self.kernel is not None:
                if key not in self.packed:
                    self.packed[key] = q4_kernel.pack(_stack(parts))
                return q4_kernel.BlockLinear(self.kernel, *self.packed[key], activations=activations)
            if key not in self.packed:
                self.packed[key] = _int4_pack(_stack(parts))
            return _int4_linear(*self.packed[key], in_features)

        def lin(names: list[str], ws: list[torch.Tensor]):
            """One callable for the matmuls that read the same input: x -> their outputs side by side."""
            if quant == "gguf":
                for name, w in zip(names, ws):
                    if name in blocks:
                        _check_blocks(name, blocks[name], w)
                parts = [blocks.get(name) for name in names]
                key = "+".join(names)
                # matrices of one kind: one call over their stacked rows (fewer ops per token); a key
                # already in self.packed (group or single) was packed by an earlier load of these blocks
                if key in self.packed or (all(b is not None and _fits(b) for b in parts)
                                          and len({b.kind for b in parts}) == 1):
                    return packed_linear(key, parts, ws[0].shape[1])
                fns = [packed_linear(n, [b], w.shape[1]) if n in self.packed or (b is not None and _fits(b))
                       else (lambda x, w=w: F.linear(x.to(w.dtype), w)) for n, b, w in zip(names, parts, ws)]
            else:
                fns = [_int8_linear(w) if quant == "int8" else _float_linear(w) for w in ws]
            # separate float weights stay as loaded: concatenating them cost seconds of load time
            return fns[0] if len(fns) == 1 else (lambda x: torch.cat([f(x) for f in fns], dim=-1))

        self.layers = []
        with torch.no_grad():
            for i, blk in enumerate(model.model.layers):
                a, m = blk.self_attn, blk.mlp
                p = f"model.layers.{i}."
                names = lambda *ns: [f"{p}{n}.weight" for n in ns]  # noqa: E731
                self.layers.append((
                    blk.input_layernorm.weight,
                    lin(names("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                        [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    lin(names("self_attn.o_proj"), [a.o_proj.weight]),
                    blk.post_attention_layernorm.weight,
                    lin(names("mlp.gate_proj", "mlp.up_proj"), [m.gate_proj.weight, m.up_proj.weight]),
                    lin(names("mlp.down_proj"), [m.down_proj.weight])))
            head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
            self.lm_head = lin([head], [model.lm_head.weight])
        self.hidden = cfg.hidden_dim
        # Where every matrix of every layer runs on our kernel, a layer is one C++ call (decode_layer.cpp).
        self.fused = None
        if self.kernel is not None and self.hd % 16 == 0 and all(
                isinstance(f, q4_kernel.BlockLinear) for layer in self.layers for f in layer[1:3] + layer[4:]):
            shapes = ((self.H + 2 * self.K) * self.hd, self.dim), (self.dim, self.H * self.hd), \
                (2 * self.hidden, self.dim), (self.dim, self.hidden)  # (N, K) of qkv, o, gate_up, down
            for i, (_, *ms) in enumerate(self.layers):
                got = [(f.N, f.K) for f in ms[:2] + ms[3:]]
                if got != list(shapes):  # the C++ layer trusts these sizes
                    raise ValueError(f"packed operands of layer {i} are {got}, the model needs {list(shapes)}")
            self.fused = [(ln1.detach().float().contiguous(), qkv.matrix, o.matrix, ln2.detach().float().contiguous(),
                           gate_up.matrix, down.matrix) for ln1, qkv, o, ln2, gate_up, down in self.layers]
            # the C++ layer for each KV cache dtype (float32, float16, int8: decode_layer.cpp)
            self.fused_layer = {torch.float32: kernel.decode_layer, torch.float16: kernel.decode_layer_f16,
                                torch.int8: kernel.decode_layer_q8}

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens [B] at slot cache.pos -> logits [B, V]; the cache advances by one."""
        model, H, K, hd, rep = self.model, self.H, self.K, self.hd, self.rep
        B = tokens.shape[0]
        pos = cache.pos
        if pos + 1 > model.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + 1} tokens exceeds the context length {model.cfg.max_seq_len}")
        if self.fused is not None:
            return self._fused_step(tokens, cache)
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
        act = self.act_dtype or dtype
        for i, (ln1, wqkv, wo, ln2, wgate_up, wd) in enumerate(self.layers):
            h = F.rms_norm(x, (self.dim,), ln1, self.eps).to(act)
            qkv = wqkv(h)  # [B, (H + 2K) * hd]: q, k, v side by side
            qk = qkv[:, :(H + K) * hd].view(B, H + K, hd)
            qk = qk * cos + _rotate_half(qk) * sin  # RoPE on q and k at once
            cache.k[i][:, :, pos] = qk[:, H:]
            cache.v[i][:, :, pos] = qkv[:, (H + K) * hd:].view(B, K, hd)
            q = qk[:, :H].reshape(B, K, rep, hd)
            y = F.scaled_dot_product_attention(q, cache.k[i][:, :, :pos + 1], cache.v[i][:, :, :pos + 1],
                                               attn_mask=mask)
            x = x + wo(y.reshape(B, H * hd))
            h = F.rms_norm(x, (self.dim,), ln2, self.eps).to(act)
            gate_up = wgate_up(h)
            x = x + wd(F.silu(gate_up[:, :self.hidden]) * gate_up[:, self.hidden:])  # x stays float32
        cache.pos += 1
        x = F.rms_norm(x, (self.dim,), model.model.norm.weight, self.eps)
        return self.lm_head(x).to(dtype)

    def _fused_step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        model, B, pos = self.model, tokens.shape[0], cache.pos
        x = model.model.embed_tokens.weight[tokens].float().contiguous()  # a copy: updated in place
        if cache.pad is None:  # one RoPE row for all
            cos, sin, stride, start = model.rope_cos[pos], model.rope_sin[pos], 0, None
        else:
            p = (pos - cache.pad).clamp_min(0)
            cos, sin, stride = model.rope_cos[p].contiguous(), model.rope_sin[p].contiguous(), self.hd
            start = cache.pad.to(torch.int64).contiguous()
        # the C++ layer writes row b's keys at cache[b, :, pos]: sizes are checked here, not there
        kv = cache.k[0].dtype
        layer = self.fused_layer.get(kv)
        want = (B, self.K, cache.k[0].shape[2], kv_slot_width(self.hd, kv) if layer else self.hd)
        if tokens.dim() != 1 or pos >= want[2] or layer is None or any(
                t.shape != want or t.dtype != kv or not t.is_contiguous() for t in cache.k + cache.v):
            raise ValueError(f"the fused decode step needs tokens [B] and contiguous caches {want}, all float32, "
                             f"all float16 or all int8, with a free slot at {pos}")
        if start is not None and (start.shape != (B,) or int(start.min()) < 0 or int(start.max()) > pos):
            raise ValueError(f"left padding must be {B} counts in 0..{pos}")
        threads = torch.get_num_threads()
        for i, (ln1, qkv, o, ln2, gate_up, down) in enumerate(self.fused):
            k, v = cache.k[i], cache.v[i]
            rc = layer(x.data_ptr(), B, self.dim, self.eps, ln1.data_ptr(), qkv, o, ln2.data_ptr(), gate_up, down,
                       self.H, self.K, self.hd, self.hidden, cos.data_ptr(), sin.data_ptr(), stride,
                       k.data_ptr(), v.data_ptr(), k.shape[2], pos, None if start is None else start.data_ptr(), threads)
            if rc:
                raise RuntimeError(f"decode_layer failed (code {rc}) at layer {i}")
        cache.pos += 1
        x = F.rms_norm(x, (self.dim,), model.model.norm.weight, self.eps)
        return self.lm_head(x)


def _check_blocks(name: str, blocks, w: torch.Tensor) -> None:
    """The blocks must be the weights the model holds (its float32 weights are their dequantization):
    a cheap check on the first rows catches a model changed since loading, or blocks of another model."""
    if tuple(blocks.q.shape) != tuple(w.shape):
        raise ValueError(f"GGUF blocks for {name} have shape {tuple(blocks.q.shape)}, the model {tuple(w.shape)}")
    rows = min(8, w.shape[0])
    head = QuantBlocks(blocks.kind, blocks.q[:rows], blocks.d[:rows], None if blocks.m is None else blocks.m[:rows])
    if not torch.equal(head.dequantize().to(w.device), w[:rows].float()):
        raise ValueError(f"GGUF blocks for {name} do not match the model's weights (changed since loading?)")
