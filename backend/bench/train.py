"""python -m backend.bench train [--model smollm2-135m-instruct] [--batch-size 4] [--seq-len 256] [--steps 4]

SFT throughput (tokens/s, MFU) of our trainer (backend.train.sft.run_sft: the function the worker runs,
packing, assistant-only loss, clipping, AdamW, events) beside Hugging Face transformers training the
same model: LlamaForCausalLM loaded with from_pretrained from the same HF-layout weights (our model,
vocabulary extended to "+tools" exactly as SFT does, saved with save_hf_dir), attention "sdpa".

Same work on both sides: the very batches the trainer drew (its shuffle of the bundled tool-use
conversations, then its order; checked step by step against the trainer's trained_tokens), B rows x
T tokens packed the same way, the same masked loss, clipping at 1.0, AdamW with the same betas and lr,
the same precision (autocast bf16 where our trainer picks it, else fp32). The HF model gets the packed
rows as plain causal rows (no block-diagonal mask: less work than ours, its usual packed setup).
A step is timed from taking its conversations to the optimizer's zero_grad on both sides; the first
`warmup` steps are not timed. Tokens counted: the real (non-padding) tokens of each batch, the same
count on both sides; tok/s = total tokens / total seconds of the timed steps. Runs alternate; each side
keeps its best repeat.

MFU = tok/s x training FLOPs per token / peak FLOP/s, with FLOPs per token = 6 x (matmul parameters,
lm_head included) + 12 x layers x dim x T for attention (backend.train.metrics.flops_per_token): the
model's FLOPs, so work a side skips (our output layer runs only where the loss is) counts as speed.
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


def sft_config(app: AppConfig, model: str, B: int, T: int, steps: int, precision: str):
    from backend.jobs.kinds import parse_config
    return parse_config("sft", {"parent_model": model, "max_steps": steps, "batch_size": B, "seq_len": T,
                                "precision": precision, "eval_every": 10**6, "checkpoint_every": 10**6,
                                "register": False, "val_fraction": 0.0, "n_examples": 200, "name": "bench-sft",
                                "protocol_check": 0}, app)


def trainer_batches(cfg, docs: list, steps: int):
    """The (x, y, doc_ids) batches run_sft draws from `docs` on a fresh run with val_fraction 0: its
    shuffle of the conversations, then backend.train.sft.train_batches."""
    import itertools
    import random

    from backend.train.sft import train_batches
    train = list(docs)
    random.Random(cfg.seed).shuffle(train)
    return itertools.islice(train_batches(train, cfg, random.Random(cfg.seed)), steps)


def ours(app: AppConfig, cfg, warmup: int, tokens: list[int]) -> tuple[float, list[int]]:
    """(tok/s over the timed steps, trained_tokens of every step) of run_sft."""
    from backend.jobs.kinds import JobContext
    from backend.train.sft import run_sft
    events: list[dict] = []
    run_sft(cfg, JobContext(app, emit=events.append))
    steps = [e for e in events if "lr" in e and "loss" in e]
    # each event's tokens_per_s = real tokens of the step / its seconds
    secs = sum(n / e["tokens_per_s"] for n, e in zip(tokens, steps) if e["step"] > warmup)
    return sum(tokens[warmup:]) / secs, [e["trained_tokens"] for e in steps]


def hf_side(app: AppConfig, cfg, warmup: int, amp) -> tuple[float, list[int]]:
    """(tok/s over the timed steps, trained_tokens of every step) of transformers on the same batches."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from backend.datasets.tool_use import conversations
    from backend.train.common import extend_for_tokens, load_parent, masked_ce
    from backend.train.sft import render_rows, sft_tokenizer
    from models.hf_checkpoint import save_hf_dir
    parent, enc, spec = load_parent(app, cfg.parent_model, torch.device("cpu"))
    _, enc = sft_tokenizer(spec.tokenizer, enc, True, app.data_dir)
    parent = extend_for_tokens(parent, enc)
    docs = render_rows(conversations(cfg.n_examples, seed=cfg.seed), enc, cfg.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_dir(parent, Path(tmp), {"name": "bench"})
        del parent
        hf_logging.disable_progress_bar()
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=torch.float32).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ctx = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext
    total_tok, total_s, trained = 0, 0.0, []
    batches = trainer_batches(cfg, docs, cfg.max_steps)
    for i in range(cfg.max_steps):
        t0 = time.perf_counter()
        x, y, d = next(batches)
        with ctx():
            logits = hf(input_ids=x).logits
        loss = masked_ce(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            total_s += time.perf_counter() - t0
            total_tok += int((d >= 0).sum())
        trained.append(int((y != -100).sum()))
    return total_tok / total_s, trained


def batch_tokens(app: AppConfig, cfg) -> list[int]:
    """Real tokens of each batch the trainer draws (counted the same way for both sides)."""
    from backend.datasets.tool_use import conversations
    from backend.train.sft import render_rows, sft_tokenizer
    from models.registry import ModelRegistry
    from models.tokenizers import get_encoding
    spec = ModelRegistry(app).get(cfg.parent_model)
    _, enc = sft_tokenizer(spec.tokenizer, get_encoding(spec.tokenizer, app.data_dir), True, app.data_dir)
    docs = render_rows(conversations(cfg.n_examples, seed=cfg.seed), enc, cfg.seq_len)
    return [int((d >= 0).sum()) for _, _, d in trainer_batches(cfg, docs, cfg.max_steps)]


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
        mcfg = ModelRegistry(app).load(args.model, device="cpu", dtype=torch.float32).cfg
        amp = autocast_dtype(args.precision, torch.device("cpu"), mcfg.dim)
        prec = "bf16 autocast" if amp is not None else "fp32"
        try:
            import transformers  # noqa: F401
            have_hf = True
        except ImportError:
            have_hf = False
        cfg = sft_config(app, args.model, B, T, args.warmup + args.steps, args.precision)
        tokens = batch_tokens(app, cfg)
        best_ours = best_hf = 0.0
        for r in range(args.repeats):
            tps, trained = ours(app, cfg, args.warmup, tokens)
            best_ours = max(best_ours, tps)
            if have_hf:
                tps, hf_trained = hf_side(app, cfg, args.warmup, amp)
                if hf_trained != trained:  # the comparison is only meaningful on the same batches
                    raise RuntimeError(f"the HF side trained on other batches than the trainer: loss tokens per "
                                       f"step {hf_trained} vs {trained}")
                best_hf = max(best_hf, tps)
            print(f"repeat {r + 1}: ours {best_ours:,.0f} tok/s | HF LlamaForCausalLM {best_hf:,.0f} tok/s (best so far)",
                  flush=True)
    fpt = flops_per_token(mcfg, T)
    peak, note = peak_flops(torch.device("cpu"), amp or torch.float32)
    print(f"{args.model}: {mcfg.num_params():,} params, batch {B}x{T}, {prec}, {args.threads} threads; "
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
