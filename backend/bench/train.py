"""python -m backend.bench train [--model smollm2-135m-instruct] [--batch-size 4] [--seq-len 256] [--steps 4]

SFT throughput (tokens/s, MFU) of our trainer (backend.train.sft.run_sft: the function the worker runs,
packing, assistant-only loss, clipping, AdamW, events) beside Hugging Face transformers training the
same model: LlamaForCausalLM loaded with from_pretrained from the same HF-layout weights (our model,
vocabulary extended to "+tools" exactly as SFT does, saved with save_hf_dir), the same packed batches of
the bundled tool-use conversations (B rows x T tokens), the same masked loss, clipping and AdamW, the
same precision (autocast bf16 where our trainer picks it, else fp32). Tokens counted are the real
(non-padding) tokens of each batch on both sides. Runs alternate; each side keeps its best repeat.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from backend.config import AppConfig


def ours(app: AppConfig, model: str, B: int, T: int, steps: int, warmup: int, precision: str) -> float:
    from backend.jobs.kinds import JobContext, parse_config
    from backend.train.sft import run_sft
    events: list[dict] = []
    cfg = parse_config("sft", {"parent_model": model, "max_steps": warmup + steps, "batch_size": B, "seq_len": T,
                               "precision": precision, "eval_every": 10**6, "checkpoint_every": 10**6,
                               "register": False, "val_fraction": 0.0, "n_examples": 200, "name": "bench-sft",
                               "protocol_check": 0}, app)
    run_sft(cfg, JobContext(app, emit=events.append))
    timed = [e for e in events if "lr" in e and "loss" in e and e["step"] > warmup]
    tokens = [e["tokens_per_s"] for e in timed]
    # each event's tokens_per_s = real tokens / step seconds; combine as total tokens / total seconds
    return len(tokens) / sum(1 / t for t in tokens)  # harmonic mean (equal tokens per step)


def hf_side(app: AppConfig, model: str, B: int, T: int, steps: int, warmup: int, amp) -> float:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from backend.datasets.tool_use import conversations
    from backend.train.common import extend_for_tokens, load_parent, masked_ce, pack_examples
    from backend.train.sft import render_rows, sft_tokenizer
    from models.hf_checkpoint import save_hf_dir
    parent, enc, spec = load_parent(app, model, torch.device("cpu"))
    _, enc = sft_tokenizer(spec.tokenizer, enc, True, app.data_dir)
    parent = extend_for_tokens(parent, enc)
    docs = render_rows(conversations(200, seed=1337), enc, T)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_dir(parent, Path(tmp), {"name": "bench"})
        del parent
        hf_logging.disable_progress_bar()
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=5e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext
    pos, total_tok, total_s = 0, 0, 0.0
    for i in range(warmup + steps):
        picked, ntok = [], 0
        while ntok < B * T:
            picked.append(docs[pos % len(docs)])
            ntok += min(len(picked[-1][0]), T + 1) - 1
            pos += 1
        x, y, d = pack_examples(picked, T)
        x, y, d = x[:B], y[:B], d[:B]
        t0 = time.perf_counter()
        with ctx():
            logits = hf(input_ids=x).logits
        loss = masked_ce(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            total_s += time.perf_counter() - t0
            total_tok += int((d >= 0).sum())
    return total_tok / total_s


def main(argv: list[str]) -> None:
    from backend.train.metrics import flops_per_token, peak_flops
    from backend.train.pretrain import autocast_dtype
    from models.registry import ModelRegistry
    ap = argparse.ArgumentParser(prog="python -m backend.bench train")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--data-dir", default=None, help="app data directory (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, T = args.batch_size, args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        app = AppConfig(data_dir=Path(args.data_dir or tmp))
        app.ensure_dirs()
        cfg = ModelRegistry(app).load(args.model, device="cpu", dtype=torch.float32).cfg
        amp = autocast_dtype(args.precision, torch.device("cpu"), cfg.dim)
        prec = "bf16 autocast" if amp is not None else "fp32"
        try:
            import transformers  # noqa: F401
            have_hf = True
        except ImportError:
            have_hf = False
        best_ours = best_hf = 0.0
        for r in range(args.repeats):
            best_ours = max(best_ours, ours(app, args.model, B, T, args.steps, args.warmup, args.precision))
            if have_hf:
                best_hf = max(best_hf, hf_side(app, args.model, B, T, args.steps, args.warmup, amp))
            print(f"repeat {r + 1}: ours {best_ours:,.0f} tok/s | HF LlamaForCausalLM {best_hf:,.0f} tok/s (best so far)",
                  flush=True)
    fpt = flops_per_token(cfg, T)
    peak, note = peak_flops(torch.device("cpu"), amp or torch.float32)
    print(f"{args.model}: {cfg.num_params():,} params, batch {B}x{T}, {prec}, {args.threads} threads; "
          f"{fpt / 1e6:.1f} MFLOPs/token; peak {peak / 1e12:.2f} TFLOP/s ({note})")
    for label, tps in (("ours (SFT trainer)", best_ours), ("HF LlamaForCausalLM", best_hf)):
        if tps:
            print(f"  {label:22s} {tps:9,.0f} tok/s   MFU {100 * fpt * tps / peak:.3f}%")
    hf_name = f"transformers LlamaForCausalLM from the same weights, same packed batches ({prec})" if have_hf \
        else "transformers not installed"
    results = [
        {"metric": f"SFT training throughput, {args.model}, {B}x{T} ({prec})", "unit": "tok/s",
         "ours": round(best_ours, 1), "peer": round(best_hf, 1) if best_hf else None, "peer_name": hf_name,
         "ratio": round(best_ours / best_hf, 3) if best_hf else None, "goal_ratio": 1.2},
        {"metric": f"SFT MFU, {args.model} ({prec})", "unit": "fraction of stated peak",
         "ours": round(fpt * best_ours / peak, 6), "peer": round(fpt * best_hf / peak, 6) if best_hf else None,
         "peer_name": f"{hf_name}; peak {note}", "ratio": round(best_ours / best_hf, 3) if best_hf else None,
         "goal_ratio": 1.2},
    ]
    print(json.dumps({"bench": "train", "device": "cpu", "threads": args.threads,
                      "torch": torch.__version__.split("+")[0], "results": results}))
