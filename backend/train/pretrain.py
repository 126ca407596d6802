"""Pretrain a GPT from scratch: next-token prediction on a corpus, as in nanoGPT / nanochat.

    result = pretrain(PretrainConfig(preset="cpu-5min", corpus=["python-docs"], tokenizer="bpe-docs-4k",
                                     max_seconds=300), app_cfg, on_event=print, stop=threading.Event())

One plain function, called by the CLI (`python -m backend.train pretrain`) and by the job worker.
Events go to `on_event(dict)` and, one JSON object a line, to run_dir/metrics.jsonl:
  {"step", "loss", "lr", "tokens_per_s", "mfu", "elapsed"[, "val_bpb"]}   every step (val_bpb every eval_every)
  {"step", "sample", "prompt"}                                            every sample_every steps
  {"step", "checkpoint"}, and finally {"step", "done": reason, "model": registered name}
A run lives in data_dir/runs/pretrain/<name>/: checkpoints ckpt-<step>/ (HF layout + trainer.pt with
optimizer, step and RNG state), `latest` naming the newest, config.json and metrics.jsonl.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from backend.config import AppConfig
from backend.train.data import TokenData, corpus_text, token_byte_lengths
from backend.train.metrics import bits_per_byte, flops_per_token, mfu, peak_flops
from backend.train.regurgitation import sample_ids
from models.presets import get_preset, preset_config
from models.transformer import Transformer


@dataclass
class PretrainConfig:
    preset: str = "cpu-5min"
    corpus: list[str] = field(default_factory=lambda: ["python-docs"])
    # A models.tokenizers.get_encoding name, or "auto": a BPE of bpe_vocab_size tokens trained (once, with
    # rustbpe) on the corpus's training split. Small models want a small vocabulary: with cl100k_base's
    # 100k tokens the embedding and output layer would be most of the parameters and of the compute.
    tokenizer: str = "auto"
    bpe_vocab_size: int | None = None  # default: the preset's
    name: str | None = None           # run and model name; default <preset>-<corpus>-<tokenizer>
    max_steps: int = 0                # 0: no step limit (then max_seconds must be set)
    max_seconds: float = 0.0          # wall-clock budget of this invocation; 0: none
    batch_size: int | None = None     # sequences per micro-batch (default: the preset's)
    seq_len: int | None = None        # tokens per sequence (default: the preset's)
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float | None = None           # peak learning rate (default: the preset's)
    min_lr_frac: float = 0.1          # the schedule ends at lr * min_lr_frac
    warmup_steps: int = 20
    # "linear": constant, then a linear warmdown over the last warmdown_frac (nanochat's choice; it suits
    # time-limited runs: the rate stays high while the model learns most); or "cosine".
    schedule: str = "linear"
    warmdown_frac: float = 0.3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0            # max global grad norm; 0 turns clipping off
    precision: str = "auto"           # "auto", "bf16" (autocast; weights stay fp32) or "fp32"
    device: str = "auto"
    threads: int = 0                  # torch threads; 0 keeps torch's default
    seed: int = 1337
    val_fraction: float = 0.05
    max_corpus_chars: int | None = None
    eval_every: int = 50
    eval_tokens: int = 32768
    sample_every: int = 50
    sample_tokens: int = 64
    sample_prompt: str | None = None  # default: the start of the held-out text
    sample_temperature: float = 0.8
    checkpoint_every: int = 200
    resume: bool = False              # continue the run's latest checkpoint
    fresh: bool = False               # delete an existing run of the same name first
    register: bool = True             # register the final checkpoint as a base model
    nproc: int = 1                    # processes (devices) the worker launches with torchrun; see backend/train/dist.py
    parallel: str = "ddp"             # with several processes: "ddp" (a copy each) or "fsdp" (FSDP2: parameters sharded)

    def validate(self) -> None:
        from backend.train.dist import check_parallel_fields
        get_preset(self.preset)
        check_parallel_fields(self.nproc, self.parallel, "batch_size", self.batch_size or get_preset(self.preset).batch_size)
        if self.max_steps < 0 or self.max_seconds < 0:
            raise ValueError("max_steps and max_seconds must not be negative")
        if not self.max_steps and not self.max_seconds:
            raise ValueError("give max_steps or max_seconds (or both): a run needs an end")
        for name in ("grad_accum", "eval_every", "sample_every", "checkpoint_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("batch_size", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must not be negative")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr must be positive")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', not {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', not {self.precision!r}")
        if self.resume and self.fresh:
            raise ValueError("resume and fresh contradict each other")

    def vocab_for_auto(self) -> int:
        return self.bpe_vocab_size or get_preset(self.preset).bpe_vocab_size

    def corpus_slug(self) -> str:
        corpus = "+".join(Path(c).stem if not c.startswith("hf:") else c[3:].split("/")[-1] for c in self.corpus)
        return re.sub(r"[^a-z0-9._-]+", "-", corpus.lower()).strip("-")[:40]

    def run_name(self, tokenizer: str) -> str:
        if self.name:
            return self.name
        tok = f"bpe{self.vocab_for_auto()}" if self.tokenizer == "auto" else tokenizer
        slug = re.sub(r"[^a-z0-9._-]+", "-", f"{self.preset}-{self.corpus_slug()}-{tok}".lower()).strip("-")
        return slug[:64]


@dataclass
class PretrainResult:
    name: str
    run_dir: Path
    step: int
    reason: str                 # "max_steps" | "max_seconds" | "stopped"
    loss: float | None
    val_bpb: float | None
    checkpoint: Path
    model: str | None           # registered model name
    transformer: Transformer    # the trained network, in memory (train mode, float32 weights)


# -- precision ----------------------------------------------------------------------------------
# Below this width, bf16 autocast does not pay on a CPU: the casts cost what AMX saves (measured below).
CPU_BF16_MIN_DIM = 256


def autocast_dtype(precision: str, device: torch.device, dim: int = CPU_BF16_MIN_DIM) -> torch.dtype | None:
    """The autocast dtype for a model of width `dim`, or None for plain fp32.

    "auto": bf16 on CUDA when supported; on a CPU with AMX only for dim >= 256. Measured on this
    machine's 2-core Xeon (AMX bf16), one training step fp32 vs bf16 autocast, best of 4-12 under load:
    cpu-1h (dim 256) 400 vs 578 tok/s (bf16 1.44x faster); cpu-5min (dim 128) 1029 vs 1112 tok/s with
    1 thread and 2214 vs 2090 with 2: a tie, so small models stay fp32 (same speed, exact numerics).
    fp32 elsewhere (mps autocast is patchy; CPUs without AMX emulate bf16 slowly).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and dim >= CPU_BF16_MIN_DIM:
        from backend.train.metrics import _cpu_flags
        return torch.bfloat16 if "amx_bf16" in _cpu_flags() else None
    return None


def amp_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# -- pieces a trainer is made of ----------------------------------------------------------------
def make_optimizer(model: Transformer, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, norm gains do not. Fused kernel where torch has one, else foreach."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=device.type != "cpu" or None)


def lr_at(step: int, progress: float, cfg: PretrainConfig, peak: float) -> float:
    """Linear warmup over warmup_steps, times cosine (or constant + linear warmdown) from peak to min_lr.

    `progress` is the fraction of the budget used (steps, or seconds for a time-limited run), so the
    same schedule serves both kinds of budget.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    low = peak * cfg.min_lr_frac
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return warm * (low + (peak - low) * 0.5 * (1 + math.cos(math.pi * p)))
    if p < 1 - cfg.warmdown_frac:
        return warm * peak
    return warm * (low + (peak - low) * (1 - p) / cfg.warmdown_frac)


@torch.no_grad()
def evaluate_bpb(model: Transformer, data: TokenData, seq_len: int, batch_size: int, max_tokens: int,
                 token_bytes: torch.Tensor, amp: torch.dtype | None = None) -> float:
    """Bits per byte over the first max_tokens of the held-out split (the same windows every time).

    Targets that are special tokens carry no bytes and are left out of both sums.
    """
    was_training = model.training
    model.eval()
    device = model.device
    nats, nbytes = 0.0, 0
    windows = data.val_windows(seq_len, max_tokens)
    for i in range(0, len(windows), batch_size):
        buf = torch.from_numpy(np.stack(windows[i:i + batch_size])).to(device)
        x, y = buf[:, :-1], buf[:, 1:]
        with amp_context(device, amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        b = token_bytes[y.reshape(-1)]
        nats += float((loss * (b > 0)).sum())
        nbytes += int(b.sum())
    model.train(was_training)
    return bits_per_byte(nats, nbytes)


# -- checkpoints --------------------------------------------------------------------------------
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    f = run_dir / "latest"
    if not f.exists():
        return None
    ckpt = run_dir / f.read_text().strip()
    return ckpt if (ckpt / "trainer.pt").exists() else None


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / f"ckpt-{step:07d}"


def save_checkpoint(run_dir: Path, model: Transformer, opt: torch.optim.Optimizer | dict, state: dict, extra: dict,
                    keep: int = 2) -> Path:
    """ckpt-<step>/ = HF layout + trainer.pt, written under a temp name and renamed; then `latest`.
    `opt`: the optimizer, or its state dict (gathered by backend.train.dist under FSDP2)."""
    from models.hf_checkpoint import save_hf_dir

    step = state["step"]
    final = checkpoint_path(run_dir, step)
    tmp = run_dir / f".ckpt-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_dir(model, tmp, extra)
    torch.save({**state, "optimizer": opt if isinstance(opt, dict) else opt.state_dict()}, tmp / "trainer.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(run_dir / "latest", final.name)
    old = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir())
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, device: torch.device) -> tuple[Transformer, dict]:
    from models.hf_checkpoint import load_hf_dir

    _, model = load_hf_dir(ckpt)
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    return model.to(device).train(), state


# -- the trainer --------------------------------------------------------------------------------
class _Events:
    """Fan events out to the callback, to metrics.jsonl (one JSON object a line, flushed) and to the trackers
    (TensorBoard beside it, W&B when its key is set: backend/train/trackers.py)."""

    def __init__(self, path: Path, callback: Callable[[dict], None] | None, run: str | None = None,
                 config: dict | None = None):
        from backend.train.trackers import open_trackers
        self.f = open(path, "a", buffering=1)
        self.callback = callback
        self.trackers, notes = open_trackers(path.parent, run or path.parent.name, config or {})
        for note in notes:
            self({"log": note, "step": 0})

    def __call__(self, event: dict) -> None:
        self.f.write(json.dumps(event) + "\n")
        for t in self.trackers:
            t.log(event)
        if self.callback is not None:
            self.callback(event)

    def close(self) -> None:
        self.f.close()
        for t in self.trackers:
            t.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop events logged after the checkpoint, so the curve continues without a fork."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step and "done" not in json.loads(line):
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    _atomic_write_text(path, "".join(k + "\n" for k in keep))


def resolve_tokenizer(cfg: PretrainConfig, text: str, data_dir: Path) -> str:
    """The encoding name to use; for "auto", train a BPE on the training split unless one exists."""
    if cfg.tokenizer != "auto":
        return cfg.tokenizer
    from backend.bpe import train_and_register
    from backend.train.data import split_text
    from models.tokenizers import list_encodings

    train_text, _ = split_text(text, cfg.val_fraction)
    digest = hashlib.sha256(train_text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    vocab = cfg.vocab_for_auto()
    name = f"bpe{vocab}-{cfg.corpus_slug()[:30]}-{digest}"
    if name not in list_encodings(data_dir):
        train_and_register(train_text, vocab, "gpt4", name, data_dir)
    return name


def default_prompt(enc, data: TokenData) -> str:
    """The opening words of the held-out text (text the model never trains on), cut at a space."""
    text = enc.decode(data.val[:32].astype("int64").tolist())
    cut = text.rfind(" ", 0, 40)
    return text[:cut] if cut > 0 else text[:40]


class _Silent:
    """The events of a rank other than 0: dropped (rank 0 alone logs)."""

    def __call__(self, event: dict) -> None:
        pass

    def close(self) -> None:
        pass


def pretrain(cfg: PretrainConfig, app: AppConfig, on_event: Callable[[dict], None] | None = None,
             stop: threading.Event | None = None) -> PretrainResult:
    """Under torchrun every rank runs this; rank 0 alone logs, evaluates, samples, checkpoints and registers."""
    from backend.train.dist import setup
    cfg.validate()
    t_start = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = setup(cfg.device if cfg.device != "auto" else app.device)
    try:
        return _pretrain(cfg, app, dist, on_event, stop, t_start)
    finally:
        dist.close()


def _pretrain(cfg: PretrainConfig, app: AppConfig, dist, on_event, stop, t_start: float) -> PretrainResult:
    device = dist.device
    preset = get_preset(cfg.preset)
    B = cfg.batch_size or preset.batch_size
    T = cfg.seq_len or preset.seq_len
    peak_lr = cfg.lr or preset.lr
    rows = dist.share(B)  # this rank's rows of each batch of B
    from models.registry import validate_name
    from models.tokenizers import get_encoding

    if on_event is not None and dist.is_main:  # the job's progress line until the first step
        on_event({"step": 0, "phase": "reading and tokenizing the corpus…"})
    with dist.main_first():  # rank 0 trains the tokenizer and fills the token cache; the others then read them
        text = corpus_text(cfg.corpus, cfg.max_corpus_chars)
        tokenizer = resolve_tokenizer(cfg, text, app.data_dir)
        enc = get_encoding(tokenizer, app.data_dir)
        name = validate_name(cfg.run_name(tokenizer))
        run_dir = app.data_dir / "runs" / "pretrain" / name
        data = TokenData.build(text, enc, tokenizer, app.cache_dir, cfg.val_fraction)
        del text
        data.check_fits(T)
        # Fresh model or the run's latest checkpoint.
        if cfg.fresh and run_dir.exists() and dist.is_main:
            shutil.rmtree(run_dir)
    token_bytes = torch.from_numpy(token_byte_lengths(enc)).to(device)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not cfg.resume:
        raise ValueError(f"run {name!r} already has a checkpoint ({ckpt.name}): resume it, start it over "
                         "with fresh, or choose another name")
    if cfg.resume and ckpt is None:
        raise ValueError(f"run {name!r} has no checkpoint to resume (looked in {run_dir})")
    torch.manual_seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    if ckpt is not None:
        model, state = load_checkpoint(ckpt, device)
        if model.cfg != preset_config(cfg.preset, enc.n_vocab):
            raise ValueError(f"checkpoint {ckpt} is not a {cfg.preset!r} model with tokenizer {tokenizer!r} "
                             f"({enc.n_vocab} tokens): resume with the run's own preset and tokenizer")
        step, elapsed_before = state["step"], state["elapsed"]
        data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if dist.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    else:
        model = Transformer(preset_config(cfg.preset, enc.n_vocab)).init_weights(cfg.seed).to(device).train()
        step, elapsed_before, state = 0, 0.0, None
    if T > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {T} exceeds the preset's context length {model.cfg.max_seq_len}")
    n_params = model.num_params()
    train_step = dist.wrap(model, cfg.parallel)  # DDP / FSDP2 with several processes; the optimizer comes after
    opt = make_optimizer(model, peak_lr, cfg.weight_decay, cfg.betas, device)
    if state is not None:
        dist.load_optimizer_state(opt, state["optimizer"])
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "config.json", json.dumps({**asdict(cfg), "name": name, "tokenizer": tokenizer,
                                                                  "batch_size": B, "seq_len": T, "lr": peak_lr}, indent=2))

    amp = autocast_dtype(cfg.precision, device, model.cfg.dim)
    fpt = flops_per_token(model.cfg, T)
    peak, peak_note = peak_flops(device, amp or torch.float32)
    if dist.world > 1:
        peak, peak_note = peak * dist.world, f"{dist.world} x {peak_note}"
    lineage = {"kind": "pretrain", "preset": cfg.preset, "corpus": list(cfg.corpus), "corpus_hash": data.corpus_hash,
               "max_corpus_chars": cfg.max_corpus_chars, "val_fraction": cfg.val_fraction,
               "tokenizer": tokenizer, "train_tokens": int(data.n_train), "run": name, "world_size": dist.world}
    prompt_ids = enc.encode_ordinary(cfg.sample_prompt or default_prompt(enc, data))
    sample_gen_seed = cfg.seed + 1

    events = _Events(run_dir / "metrics.jsonl", on_event, run=name, config=asdict(cfg)) if dist.is_main else _Silent()
    last_loss, last_bpb = None, None

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - t_start

    def progress() -> float:
        by_steps = step / cfg.max_steps if cfg.max_steps else 0.0
        by_time = elapsed() / (elapsed_before + cfg.max_seconds) if cfg.max_seconds else 0.0
        return max(by_steps, by_time)

    def checkpoint() -> Path:
        full, opt_state = dist.full_model(model), dist.optimizer_state(opt)  # collectives under FSDP2
        st = {"step": step, "elapsed": elapsed(), "data_rng": data_gen.get_state(), "torch_rng": torch.get_rng_state(),
              "config": asdict(cfg), "loss": last_loss, "val_bpb": last_bpb, "world_size": dist.world}
        extra = {"name": name, "kind": "checkpoint", "tokenizer": tokenizer, "chat_format": None,
                 "lineage": {**lineage, "steps": step}}
        path = checkpoint_path(run_dir, step)
        if dist.is_main:
            save_checkpoint(run_dir, full, opt_state, st, extra)
            events({"step": step, "checkpoint": str(path)})
        return path

    def sample() -> None:
        full = dist.full_model(model)
        if dist.is_main:
            gen = torch.Generator().manual_seed(sample_gen_seed)  # the same coin flips each time: only the model changes
            ids = sample_ids(full, prompt_ids, cfg.sample_tokens, cfg.sample_temperature, 0, gen, amp)
            events({"step": step, "prompt": enc.decode(prompt_ids), "sample": enc.decode(ids)})

    def evaluate() -> float:
        """Rank 0 evaluates; every rank gets the number (so all take the same branches)."""
        full = dist.full_model(model)
        bpb = evaluate_bpb(full, data, T, B, cfg.eval_tokens, token_bytes, amp) if dist.is_main else 0.0
        return dist.sum(bpb)[0]

    events({"step": step, "start": name, "preset": cfg.preset, "tokenizer": tokenizer, "vocab_size": enc.n_vocab,
            "params": n_params, "flops_per_token": fpt,
            "peak_flops": peak, "peak_flops_source": peak_note, "precision": str(amp or torch.float32),
            "device": str(device), "batch_tokens": B * T * cfg.grad_accum, "train_tokens": int(data.n_train),
            "val_tokens": int(len(data.val)), "resumed": state is not None,
            "setup_seconds": round(time.monotonic() - t_start, 2), **dist.describe()})
    if state is None:
        last_bpb = evaluate()
        events({"step": 0, "val_bpb": round(last_bpb, 5)})
        sample()
    # The time budget (and `elapsed`) counts training, not the setup above: reading and tokenizing a
    # corpus, training a BPE, or the first evaluation must not eat a short run's minutes.
    t_start = time.monotonic()
    reason = None
    last_ckpt = ckpt
    V = model.cfg.vocab_size
    try:
        while True:
            if cfg.max_steps and step >= cfg.max_steps:
                reason = "max_steps"
            elif cfg.max_seconds and time.monotonic() - t_start >= cfg.max_seconds:
                reason = "max_seconds"
            elif stop is not None and stop.is_set():
                reason = "stopped"
            reason = dist.agree(reason)  # rank 0's clock decides for all: the ranks stop at the same step
            if reason:
                break
            t0 = time.perf_counter()
            lr = lr_at(step, progress(), cfg, peak_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = data.batch("train", B, T, data_gen, device, rows=rows)
                with dist.no_sync(train_step, last=micro == cfg.grad_accum - 1):
                    with amp_context(device, amp):
                        loss = train_step(lambda m: F.cross_entropy(m(x).float().view(-1, V), y.reshape(-1)))
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            (last_loss,) = dist.mean(loss_sum / cfg.grad_accum)  # equal shares: the mean of the ranks' means
            dt = time.perf_counter() - t0
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}: lower the learning rate")
            tps = B * T * cfg.grad_accum / dt
            ev = {"step": step, "loss": round(last_loss, 5), "lr": lr, "tokens_per_s": round(tps, 1),
                  "mfu": round(mfu(fpt, tps, peak), 6), "elapsed": round(elapsed(), 2)}
            if step % cfg.eval_every == 0:
                last_bpb = ev["val_bpb"] = round(evaluate(), 5)
            events(ev)
            if step % cfg.sample_every == 0:
                sample()
            if step % cfg.checkpoint_every == 0:
                last_ckpt = checkpoint()
        # The end, whatever the reason: a last eval, sample and checkpoint (skipped if nothing changed).
        if last_ckpt is None or int(last_ckpt.name.split("-")[1]) != step:
            if step % cfg.eval_every:
                last_bpb = evaluate()
                events({"step": step, "val_bpb": round(last_bpb, 5)})
            if step % cfg.sample_every:
                sample()
            last_ckpt = checkpoint()
        model_name = None
        final = dist.full_model(model)
        if cfg.register and dist.is_main:
            from models.registry import ModelRegistry
            desc = (f"base model pretrained from scratch: preset {cfg.preset}, {step} steps on "
                    f"{', '.join(cfg.corpus)} with tokenizer {tokenizer}"
                    + (f", {dist.world} processes ({cfg.parallel})" if dist.world > 1 else ""))
            spec = ModelRegistry(app).register(name, final, tokenizer, None, {**lineage, "steps": step},
                                               desc, overwrite=True)
            model_name = spec.name
        events({"step": step, "done": reason, "model": model_name, "final_loss": last_loss, "final_val_bpb": last_bpb,
                "elapsed": round(elapsed(), 2)})
    except BaseException as e:
        events({"step": step, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        events.close()
    return PretrainResult(name, run_dir, step, reason, last_loss, last_bpb, last_ckpt, model_name, final)
