"""python -m backend.bench pretrain [--preset cpu-5min] [--steps 20] [--repeats 3] [--threads 2] [--precision auto]

Training throughput of our pretraining loop (backend.train.pretrain: the real function the CLI and
the worker run, real corpus batches from the memmap, events and metrics included) beside a plain
reference loop written with stock torch: the same Transformer, the same batch size, sequence length
and precision, `torch.optim.AdamW` with its defaults, random token batches, nothing else. A second
peer, when transformers is installed, is Hugging Face's LlamaForCausalLM of the same shape in the same
plain loop. Runs alternate; each side reports tokens/s at its median step time (the machine is shared).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.config import AppConfig
from backend.train.metrics import flops_per_token, peak_flops
from backend.train.pretrain import PretrainConfig, autocast_dtype, pretrain
from models.presets import get_preset, preset_config
from models.transformer import Transformer


def ours(preset: str, steps: int, warmup: int, precision: str, data_dir: Path) -> tuple[list[float], int]:
    """(seconds of each timed step, vocabulary size) of a real pretrain() run."""
    events: list[dict] = []
    cfg = PretrainConfig(preset=preset, corpus=["python-docs"], tokenizer="auto", max_steps=warmup + steps,
                         precision=precision, eval_every=10**9, sample_every=10**9, checkpoint_every=10**9,
                         register=False, fresh=True, name="bench")
    pretrain(cfg, AppConfig(data_dir=data_dir), on_event=events.append)
    start = next(e for e in events if "start" in e)
    return [start["batch_tokens"] / e["tokens_per_s"] for e in events if "lr" in e and e["step"] > warmup], \
        start["vocab_size"]


def plain_loop(model: torch.nn.Module, vocab: int, B: int, T: int, steps: int, warmup: int,
               amp: torch.dtype | None, hf: bool = False) -> list[float]:
    """The textbook loop: forward, cross-entropy, backward, clip, AdamW step. Returns each timed step's seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x = torch.randint(0, vocab, (B, T + 1), generator=g)
        with ctx():
            logits = model(x[:, :-1]).logits if hf else model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def rate(step_times: list[float], tokens_per_step: int) -> float:
    """Tokens/s at the median step time: robust to the spikes other processes cause on a shared machine."""
    return tokens_per_step / statistics.median(step_times) if step_times else 0.0


def hf_model(cfg):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    from models.hf_checkpoint import hf_config
    d = hf_config(cfg)
    d.pop("architectures", None)
    d.pop("model_type", None)
    d.pop("torch_dtype", None)
    return LlamaForCausalLM(LlamaConfig(**d, attn_implementation="sdpa")).train()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m backend.bench pretrain")
    ap.add_argument("--preset", default="cpu-5min")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers peer")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    amp = autocast_dtype(args.precision, device, get_preset(args.preset).model.dim)
    prec = "bf16 autocast" if amp is not None else "fp32"
    preset = get_preset(args.preset)
    B, T = preset.batch_size, preset.seq_len

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        t_ours, t_ref, t_hf = [], [], []
        hf_note = "transformers LlamaForCausalLM, plain loop"
        for r in range(args.repeats):  # alternate, so a busy spell of the machine hits every side
            times, vocab = ours(args.preset, args.steps, args.warmup, args.precision, data_dir)
            t_ours += times
            cfg = preset_config(args.preset, vocab)
            t_ref += plain_loop(Transformer(cfg).init_weights(0).train(), vocab, B, T, args.steps, args.warmup, amp)
            hf = None if args.no_hf else hf_model(cfg)
            if hf is not None:
                t_hf += plain_loop(hf, vocab, B, T, args.steps, args.warmup, amp, hf=True)
            else:
                hf_note = "skipped (--no-hf)" if args.no_hf else "transformers not installed"
            print(f"repeat {r + 1}: median so far: ours {rate(t_ours, B * T):,.0f} tok/s | plain torch loop "
                  f"{rate(t_ref, B * T):,.0f} | HF Llama {rate(t_hf, B * T):,.0f}", flush=True)
        best_ours, best_ref, best_hf = rate(t_ours, B * T), rate(t_ref, B * T), rate(t_hf, B * T)

    fpt = flops_per_token(cfg, T)
    peak, note = peak_flops(device, amp or torch.float32)
    print(f"{args.preset}: {cfg.num_params():,} params, vocab {vocab}, batch {B}x{T}, {prec}, "
          f"{args.threads} threads; {fpt / 1e6:.1f} MFLOPs/token; peak {peak / 1e12:.2f} TFLOP/s ({note})")
    for label, tps in (("ours", best_ours), ("plain torch loop", best_ref), ("HF LlamaForCausalLM", best_hf)):
        if tps:
            print(f"  {label:22s} {tps:9,.0f} tok/s   MFU {100 * fpt * tps / peak:.3f}%")
    results = [
        {"metric": f"{args.preset} training throughput ({prec})", "unit": "tok/s", "ours": round(best_ours, 1),
         "peer": round(best_ref, 1), "peer_name": f"plain stock-torch loop, same Transformer ({prec}, AdamW defaults)",
         "ratio": round(best_ours / best_ref, 3), "goal_ratio": None},
        {"metric": f"{args.preset} MFU ({prec})", "unit": "fraction of stated peak",
         "ours": round(fpt * best_ours / peak, 6), "peer": round(fpt * best_ref / peak, 6),
         "peer_name": f"plain stock-torch loop; peak {note}", "ratio": round(best_ours / best_ref, 3),
         "goal_ratio": None},
        {"metric": f"{args.preset} training throughput vs HF ({prec})", "unit": "tok/s", "ours": round(best_ours, 1),
         "peer": round(best_hf, 1) if best_hf else None, "peer_name": hf_note,
         "ratio": round(best_ours / best_hf, 3) if best_hf else None, "goal_ratio": None},
    ]
    print(json.dumps({"bench": "pretrain", "device": "cpu", "threads": args.threads, "torch": torch.__version__.split("+")[0],
                      "results": results}))
