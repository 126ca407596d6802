"""Pieces every post-training trainer (sft, reward, dpo, grpo, rlhf) shares, written once:

- FineTuneConfig: the fields they all have (parent model, budget, optimizer, device, checkpoints).
- load_parent: the parent model (float32, train mode) and its tokenizer, through the registry.
- resize_vocab: new special tokens get embedding (and lm_head) rows initialised to the mean of the
  existing rows, so at step 0 the new tokens are "average" and the old ones are untouched.
- pack_examples: (ids, loss mask) documents packed into rows of seq_len. Packing without
  cross-contamination uses block-diagonal attention: each packed row carries doc_ids, and
  Transformer.forward(doc_ids=...) restarts RoPE positions and masks attention at every document start.
- completion_logprobs: log-prob of each completion token given its prompt (DPO, GRPO, RLHF).
- FineTuneRun: run directory, events (metrics.jsonl + the job's callback), checkpoints, resume,
  registration with lineage (parent model, snapshot hash, job id); under torchrun its `dist`
  (backend/train/dist.py) makes rank 0 alone log, checkpoint and register, and every rank stop together.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backend.config import AppConfig
from models.transformer import Transformer

IGNORE = -100  # target id that carries no loss


@dataclass
class FineTuneConfig:
    parent_model: str = "smollm2-135m-instruct"  # a registry name
    name: str | None = None           # run and model name; default <kind>-<parent>-j<job id>
    dataset: str = "bundled"          # "bundled" (the kind's built-in set), "snapshot" (the job's snapshot), or a .jsonl path
    max_steps: int = 100
    max_seconds: float = 0.0          # wall-clock budget of this invocation; 0: none
    batch_size: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 5
    grad_clip: float = 1.0
    precision: str = "auto"           # "auto", "bf16" (autocast) or "fp32"
    device: str = "auto"
    threads: int = 0
    seed: int = 1337
    eval_every: int = 20
    checkpoint_every: int = 100
    register: bool = True
    nproc: int = 1                    # processes (devices) the worker launches with torchrun; see backend/train/dist.py
    parallel: str = "ddp"             # with several processes: "ddp" (a copy each) or "fsdp" (FSDP2: parameters sharded)

    def validate(self) -> None:
        from backend.train.dist import check_parallel_fields
        check_parallel_fields(self.nproc, self.parallel, *self.global_batch())
        for k in ("max_steps", "batch_size", "eval_every", "checkpoint_every"):
            if getattr(self, k) < (0 if k == "max_steps" else 1):
                raise ValueError(f"{k}: must be at least {0 if k == 'max_steps' else 1}")
        if not self.max_steps and not self.max_seconds:
            raise ValueError("max_steps: give max_steps or max_seconds (or both): a run needs an end")
        if self.max_seconds < 0 or self.warmup_steps < 0:
            raise ValueError("max_seconds and warmup_steps must not be negative")
        if not self.lr > 0:
            raise ValueError("lr: must be positive")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: must be 'auto', 'bf16' or 'fp32', not {self.precision!r}")
        if not isinstance(self.parent_model, str) or not self.parent_model:
            raise ValueError("parent_model: name a registered model")


    def global_batch(self) -> tuple[str, int]:
        """(field, size) of what one step splits over the processes."""
        return "batch_size", self.batch_size


def check_parent(cfg: FineTuneConfig, app: AppConfig) -> None:
    """Before queueing: the parent model exists, the name is valid, a dataset path exists."""
    from models.registry import ModelRegistry, validate_name
    try:
        ModelRegistry(app).get(cfg.parent_model)
    except ValueError as e:
        raise ValueError(f"parent_model: {e}") from None
    if cfg.name is not None:
        try:
            validate_name(cfg.name)
        except ValueError as e:
            raise ValueError(f"name: {e}") from None
    if cfg.dataset not in ("bundled", "snapshot") and not Path(cfg.dataset).is_file():
        raise ValueError(f"dataset: {cfg.dataset!r} is neither 'bundled', 'snapshot' nor an existing .jsonl file")


def check_chat_model(app: AppConfig, field: str, name: str, trainable: bool = True):
    """Before loading anything: `name` is a registered chat model (not a reward model, not a base model) and,
    when `trainable`, its weights are here (a remote model can write text, not be trained). Its spec."""
    from models.registry import ROLE_WORDS, ModelRegistry
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field}: name a registered model")
    try:
        spec = ModelRegistry(app).get(name)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    if spec.role != "chat":  # the registry's one notion of what a model is for (models/registry.py ModelSpec.role)
        raise ValueError(f"{field}: {name!r} is {ROLE_WORDS[spec.role]}; name a chat model")
    if trainable and spec.kind == "remote":
        raise ValueError(f"{field}: {name!r} is served by another server ({spec.remote['base_url']}); "
                         "its weights cannot be trained here")
    return spec


def default_name_for(kind: str):
    def default_name(cfg: FineTuneConfig, job_id: int) -> str:
        suffix = f"-j{job_id}"
        return f"{kind}-{cfg.parent_model}"[:64 - len(suffix)].rstrip("-.") + suffix
    return default_name


def requested_device(cfg: FineTuneConfig, ctx) -> str:
    """The device a run asks dist.setup for: the worker's, unless the config names one; else the app's."""
    if ctx.device and cfg.device == "auto":
        return ctx.device
    return cfg.device if cfg.device != "auto" else ctx.app.device


# -- models and tokenizers ------------------------------------------------------------------------
def load_parent(app: AppConfig, name: str, device: torch.device):
    """(model float32 in train mode, encoding, spec) of a registered model."""
    from models.registry import ModelRegistry
    from models.tokenizers import get_encoding
    reg = ModelRegistry(app)
    spec = reg.get(name)
    model = reg.load(name, device=device, dtype=torch.float32).train()
    return model, get_encoding(spec.tokenizer, app.data_dir), spec


@torch.no_grad()
def resize_vocab(model: Transformer, new_size: int) -> Transformer:
    """Grow the embedding (and an untied lm_head) to `new_size` rows in place; new rows = the mean of the
    old ones (Hewitt 2021, "Initializing new word embeddings"; what HF resize_token_embeddings does with
    mean_resizing=True): the new tokens start with average logits instead of random, large ones."""
    old = model.cfg.vocab_size
    if new_size <= old:
        return model
    emb = model.model.embed_tokens.weight
    rows = emb.mean(0, keepdim=True).expand(new_size - old, -1)
    new_emb = torch.nn.Parameter(torch.cat([emb, rows.to(emb.dtype)], 0))
    model.model.embed_tokens.weight = new_emb
    model.model.embed_tokens.num_embeddings = new_size
    if model.cfg.tie_embeddings:
        model.lm_head.weight = new_emb
    else:
        head = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(torch.cat([head, head.mean(0, keepdim=True).expand(new_size - old, -1)], 0))
    model.lm_head.out_features = new_size
    model.cfg = dataclasses.replace(model.cfg, vocab_size=new_size)
    return model


def extend_for_tokens(model: Transformer, enc) -> Transformer:
    """Make every id of `enc` (specials included) a valid input and output of `model`."""
    need = enc.max_token_value + 1
    return resize_vocab(model, need) if need > model.cfg.vocab_size else model


# -- batches ---------------------------------------------------------------------------------------
def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pack: bool = True):
    """Documents (ids, mask) -> (inputs [N, T], targets [N, T], doc_ids [N, T]) LongTensors.

    Each document contributes inputs ids[:-1] and targets ids[1:] (IGNORE where mask is 0), cut to
    seq_len. With pack=True documents are placed first-fit into rows; padding has target IGNORE and
    doc id -1. With pack=False every document gets its own row (the reference packing must match).
    """
    docs = []
    for ids, mask in examples:
        x = ids[:-1][:seq_len]
        y = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])][:seq_len]
        if x:
            docs.append((x, y))
    rows: list[list] = []  # [x, y, d, used]
    for i, (x, y) in enumerate(docs):
        row = next((r for r in rows if pack and r[3] + len(x) <= seq_len), None)
        if row is None:
            row = [[], [], [], 0]
            rows.append(row)
        row[0] += x
        row[1] += y
        row[2] += [i] * len(x)
        row[3] += len(x)
    T = max((r[3] for r in rows), default=1)
    inputs = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    doc_ids = torch.full((len(rows), T), -1, dtype=torch.long)
    for j, (x, y, d, n) in enumerate(rows):
        inputs[j, :n], targets[j, :n], doc_ids[j, :n] = torch.tensor(x), torch.tensor(y), torch.tensor(d)
    return inputs, targets, doc_ids


def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE (0 when there are none)."""
    if not (targets != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def masked_lm_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """masked_ce(model(x), y) computed only where it counts: the output layer runs on the positions that
    have a target. In SFT most tokens are prompt (no loss), and the [tokens x vocabulary] logits are the
    biggest tensor of a small model's step, so this skips most of that work and memory."""
    keep = y != IGNORE
    if not keep.any():  # still a forward through every weight: a data-parallel step expects all gradients
        return model(x[:, :1], return_hidden=True).sum() * 0.0 + model.lm_head.weight.sum() * 0.0
    h = model(x, doc_ids=doc_ids, return_hidden=True)
    logits = model.lm_head(h[keep])
    return F.cross_entropy(logits.float(), y[keep])


def anchored_lm_loss(model: Transformer, ref: Transformer, x: torch.Tensor, y: torch.Tensor,
                     doc_ids: torch.Tensor | None, weight: float) -> torch.Tensor:
    """masked_lm_loss where the target is new to `ref` (the frozen parent); where it is ref's own greedy token,
    weight x KL(ref || model) instead. What the parent already says is held where it was, its whole distribution,
    neither sharpened nor drifted: only the new tokens are learned (self-distillation against forgetting, as in
    SDFT, Yang et al. 2024). The KL is 0 at the start and grows only as the model drifts. The mean over targets,
    as masked_lm_loss."""
    keep = y != IGNORE
    if not keep.any():
        return masked_lm_loss(model, x, y, doc_ids)
    logp = F.log_softmax(model.lm_head(model(x, doc_ids=doc_ids, return_hidden=True)[keep]).float(), -1)
    with torch.no_grad():
        ref_logp = F.log_softmax(ref.lm_head(ref(x, doc_ids=doc_ids, return_hidden=True)[keep]).float(), -1)
    target = y[keep]
    ce = -logp.gather(-1, target[:, None]).squeeze(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return torch.where(ref_logp.argmax(-1) == target, weight * kl, ce).mean()


def token_logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position without materialising a second [B, T, V] tensor (log_softmax)."""
    logits = logits.float()
    return logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def completion_logprobs(model: Transformer, prompts: list[list[int]], completions: list[list[int]],
                        amp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion given its prompt: ([N, Lmax], mask [N, Lmax]) right-padded.

    One forward over prompt+completion rows (right padding: causal attention never sees the padding of
    its own row's future). Differentiable when called with grad enabled.
    """
    from backend.train.pretrain import amp_context
    dev = model.device
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T = max(lens)
    x = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        x[i, :lens[i]] = torch.tensor(p + c)
    x = x.to(dev)
    with amp_context(dev, amp):
        logits = model(x[:, :-1])
    lp_all = token_logprobs_of(logits, x[:, 1:])  # [N, T-1]: position t predicts token t+1
    L = max(len(c) for c in completions)
    out = torch.zeros(len(prompts), max(L, 1), device=dev)
    mask = torch.zeros(len(prompts), max(L, 1), device=dev)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if c:
            out[i, :len(c)] = lp_all[i, len(p) - 1:len(p) - 1 + len(c)]
            mask[i, :len(c)] = 1
    return out, mask


# -- the run ---------------------------------------------------------------------------------------
class FineTuneRun:
    """Run directory data_dir/runs/<kind>/<name>/: metrics.jsonl, config.json, ckpt-<step>/ (HF layout +
    trainer.pt), `latest`. The same layout and checkpoint code as pretraining (backend.train.pretrain)."""

    def __init__(self, kind: str, cfg: FineTuneConfig, ctx):
        from backend.train.dist import setup
        from backend.train.pretrain import _Events, latest_checkpoint
        from models.registry import validate_name
        cfg.validate()
        self.kind, self.cfg, self.ctx, self.app = kind, cfg, ctx, ctx.app
        self.name = validate_name(cfg.name or default_name_for(kind)(cfg, ctx.job_id or int(time.time())))
        self.dir = self.app.data_dir / "runs" / kind / self.name
        self.dist = setup(requested_device(cfg, ctx))  # joins the group when the trainer made it first (idk)
        self.device = self.dist.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.resume_from = latest_checkpoint(self.dir) if ctx.resume else None
        self.events = None
        with self.dist.main_first():  # rank 0 alone clears and writes the run directory
            if self.dist.is_main:
                if not ctx.resume and self.dir.exists():
                    shutil.rmtree(self.dir)  # a fresh job of the same name starts over
                self.dir.mkdir(parents=True, exist_ok=True)
                if self.resume_from is None and (self.dir / "metrics.jsonl").exists():
                    (self.dir / "metrics.jsonl").unlink()
                (self.dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
                self.events = _Events(self.dir / "metrics.jsonl", ctx.emit, run=self.name, config=asdict(cfg))
        self.t0 = time.monotonic()
        self.step = 0
        self.elapsed_before = 0.0
        self.last_ckpt: Path | None = None
        self.phase("loading the parent model…")

    def emit(self, ev: dict) -> None:
        if self.events is not None:  # rank 0 only
            self.events({**ev, **self.dist.describe()} if "start" in ev else ev)

    def log(self, text: str) -> None:
        self.emit({"log": text, "step": self.step})

    def phase(self, text: str) -> None:
        """What the run does before its first step (the job's progress line shows it until training starts)."""
        self.emit({"phase": text, "step": self.step})

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t0

    def restore(self, opt: torch.optim.Optimizer | None = None) -> dict | None:
        """Load the latest checkpoint's trainer state into `opt`; returns it (None on a fresh run)."""
        from backend.train.pretrain import _truncate_metrics
        if self.resume_from is None:
            return None
        state = torch.load(self.resume_from / "trainer.pt", map_location="cpu", weights_only=False)
        if opt is not None:
            self.dist.load_optimizer_state(opt, state["optimizer"])
        self.step, self.elapsed_before = state["step"], state.get("elapsed", 0.0)
        torch.set_rng_state(state["torch_rng"])
        if self.dist.is_main:
            _truncate_metrics(self.dir / "metrics.jsonl", self.step)
        self.log(f"resuming from {self.resume_from.name}")
        return state

    def model_to_train(self, fallback):
        """The checkpoint's model when resuming, else fallback() (the parent, possibly extended)."""
        from backend.train.pretrain import load_checkpoint
        if self.resume_from is not None:
            model, _ = load_checkpoint(self.resume_from, self.device)
            return model
        return fallback()

    def checkpoint(self, model: Transformer, opt, tokenizer: str, extra_state: dict | None = None) -> Path:
        """Every rank calls it (FSDP2 gathers shards); rank 0 writes."""
        from backend.train.pretrain import checkpoint_path, save_checkpoint
        model, opt_state = self.dist.full_model(model), self.dist.optimizer_state(opt)
        st = {"step": self.step, "elapsed": self.elapsed(), "torch_rng": torch.get_rng_state(),
              "world_size": self.dist.world, **(extra_state or {})}
        extra = {"name": self.name, "kind": "checkpoint", "tokenizer": tokenizer, "chat_format": "chatml",
                 "lineage": {"kind": self.kind, "parent_model": self.cfg.parent_model, "steps": self.step}}
        self.last_ckpt = checkpoint_path(self.dir, self.step)
        if self.dist.is_main:
            save_checkpoint(self.dir, model, opt_state, st, extra)
            self.emit({"step": self.step, "checkpoint": str(self.last_ckpt)})
        return self.last_ckpt

    def should_stop(self, extra: str | None = None) -> str | None:
        """Why to stop now, the same answer on every rank (rank 0's clock; anyone's cancel). `extra`: a
        reason of the trainer's own (GRPO's CPU budget). A collective: every rank calls it once a step."""
        reason = extra
        if self.cfg.max_steps and self.step >= self.cfg.max_steps:
            reason = "max_steps"
        elif self.cfg.max_seconds and time.monotonic() - self.t0 >= self.cfg.max_seconds:
            reason = "max_seconds"
        elif self.ctx.stop is not None and self.ctx.stop.is_set():
            reason = "stopped"
        return self.dist.agree(reason)

    def lr(self) -> float:
        """Linear warmup, then linear decay to 10% over max_steps (constant when only a time budget)."""
        c = self.cfg
        warm = min(1.0, (self.step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        decay = 1.0 - 0.9 * min(1.0, self.step / c.max_steps) if c.max_steps else 1.0
        return c.lr * warm * decay

    def lineage(self, extra: dict | None = None) -> dict:
        return {"kind": self.kind, "parent_model": self.cfg.parent_model, "snapshot_hash": self.ctx.snapshot_hash,
                "dataset": self.cfg.dataset, "job_id": self.ctx.job_id, "run": self.name, "steps": self.step,
                "world_size": self.dist.world, **(extra or {})}

    def register(self, model: Transformer, tokenizer: str, description: str, extra: dict | None = None) -> str | None:
        """Every rank calls it; rank 0 registers (None elsewhere)."""
        if not self.cfg.register:
            return None
        model = self.dist.full_model(model)
        if not self.dist.is_main:
            return None
        from models.registry import ModelRegistry
        spec = ModelRegistry(self.app).register(self.name, model, tokenizer, "chatml", self.lineage(extra),
                                                description, overwrite=True)
        return spec.name

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        self.dist.close()


def make_opt(model_or_params, cfg: FineTuneConfig, device: torch.device):
    from backend.train.pretrain import make_optimizer
    return make_optimizer(model_or_params, cfg.lr, cfg.weight_decay, cfg.betas, device)


def amp_for(cfg: FineTuneConfig, device: torch.device, dim: int):
    from backend.train.pretrain import autocast_dtype
    return autocast_dtype(cfg.precision, device, dim)


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}: lower the learning rate")
