"""Training throughput and quality numbers: FLOPs per token, MFU, bits per byte.

MFU (model FLOPs utilization, PaLM appendix B) = achieved model FLOPs per second / the device's
peak. Model FLOPs per token, as nanoGPT and nanochat count them: 6 per parameter that takes part in a
matmul (2 forward, 4 backward), plus the attention scores and weighted sum, 12 * layers * heads *
head_dim * seq_len. The embedding lookup is not a matmul, so an untied input embedding is left out;
with tied embeddings the shared matrix is counted once, for the output layer it also is.

Bits per byte = the summed cross-entropy (nats) over the validation tokens / ln 2 / their UTF-8
bytes. Unlike the loss it does not depend on the tokenizer, so runs with different vocabularies compare.
"""
from __future__ import annotations

import math
import os
import re

import torch

from models.transformer import ModelConfig

# Dense bf16/fp16 tensor-core peaks (no sparsity), from the vendors' data sheets.
GPU_PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12, "L4": 121e12, "L40": 181e12,
    "4090": 165e12, "3090": 71e12, "A6000": 155e12, "V100": 125e12, "T4": 65e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token for a context of seq_len."""
    n = cfg.num_params()
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.dim  # the input embedding is a lookup
    n -= cfg.dim * (2 * cfg.n_layers + 1)  # RMSNorm gains: elementwise, not matmuls
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * n + attention


def prefill_flops(cfg: ModelConfig, tokens: int) -> float:
    """Forward FLOPs of a prompt of `tokens` tokens as a server prefills it: every matmul weight once per token
    (2 FLOPs a weight), causal attention (each token's scores and weighted sum over itself and those before it),
    and the output layer for the last token only (the first sampled token's logits)."""
    head = cfg.vocab_size * cfg.dim
    n = cfg.num_params() - head * (1 if cfg.tie_embeddings else 2) - cfg.dim * (2 * cfg.n_layers + 1)
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * tokens * (tokens + 1) / 2
    return 2 * n * tokens + attention + 2 * head


def _cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", f.read())]
        if mhz:
            return max(mhz) / 1000
    except OSError:
        pass
    return 2.5


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^flags\s*:\s*(.*)$", f.read(), re.M)
        return set(m.group(1).split()) if m else set()
    except OSError:
        return set()


def peak_flops(device: torch.device, dtype: torch.dtype, threads: int | None = None) -> tuple[float, str]:
    """(peak FLOP/s, how it was stated). $PEAK_FLOPS overrides (e.g. 3.1e11).

    CPU: threads x clock x FLOPs per cycle per core of the vector unit the dtype uses: AMX tiles
    1024 bf16 FLOPs/cycle (Sapphire Rapids), AVX-512 2 FMA units x 16 fp32 x 2 = 64, AVX2 32.
    A theoretical figure: small matmuls on a loaded machine reach only a fraction of it.
    """
    if os.environ.get("PEAK_FLOPS"):
        return float(os.environ["PEAK_FLOPS"]), "$PEAK_FLOPS"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_FLOPS.items():
            if key in name:
                peak = val if dtype in (torch.bfloat16, torch.float16) else val / 16  # fp32 w/o tensor cores
                return peak, f"{name} data sheet ({'bf16' if peak == val else 'fp32'})"
        return 100e12, f"{name}: unknown GPU, assumed 100 TFLOP/s"
    if device.type == "mps":
        return 10e12, "Apple GPU: assumed 10 TFLOP/s"
    threads = threads or torch.get_num_threads()
    ghz, flags = _cpu_ghz(), _cpu_flags()
    if dtype == torch.bfloat16 and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif dtype == torch.bfloat16 and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX-512 bf16"
    elif "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 fp32"
    elif "avx2" in flags:
        per_cycle, unit = 32, "AVX2 fp32"
    else:
        per_cycle, unit = 8, "scalar"
    return threads * ghz * 1e9 * per_cycle, f"{threads} threads x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle ({unit})"


def mfu(flops_per_tok: float, tokens_per_s: float, peak: float) -> float:
    return flops_per_tok * tokens_per_s / peak


def bits_per_byte(sum_nats: float, n_bytes: int) -> float:
    if n_bytes <= 0:
        raise ValueError("bits per byte needs at least one byte of text")
    return sum_nats / math.log(2) / n_bytes
