"""The pretrain kind: backend.train.pretrain behind the trainer interface `run(config, ctx)`."""
from __future__ import annotations

import dataclasses
import re

from backend.config import AppConfig
from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.pretrain import PretrainConfig, latest_checkpoint, pretrain


def check(cfg: PretrainConfig, app: AppConfig) -> None:
    """What can be known before the job runs: the tokenizer exists and every corpus source can be read."""
    from pathlib import Path

    from backend.corpora import BUILTIN_CORPORA
    from backend.train.data import HF_PREFIX
    from models.tokenizers import list_encodings

    if cfg.tokenizer != "auto" and cfg.tokenizer not in list_encodings(app.data_dir):
        raise ValueError(f"tokenizer: unknown encoding {cfg.tokenizer!r}; available: auto, "
                         f"{', '.join(list_encodings(app.data_dir))}")
    if not cfg.corpus:
        raise ValueError("corpus: give at least one source (a built-in name, a file, or hf:NAME)")
    for src in cfg.corpus:
        if not (src in BUILTIN_CORPORA or src.startswith(HF_PREFIX) or Path(src).is_file()):
            raise ValueError(f"corpus: {src!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}), "
                             f"an existing file, nor {HF_PREFIX}NAME")
    if cfg.name is not None:
        from models.registry import validate_name
        try:
            validate_name(cfg.name)
        except ValueError as e:
            raise ValueError(f"name: {e}") from None


def default_name(cfg: PretrainConfig, job_id: int) -> str:
    """<preset>-<corpus>-<tokenizer>-j<id>: unique per job, so two jobs never share a run directory."""
    suffix = f"-j{job_id}"
    base = re.sub(r"-+$", "", cfg.run_name(cfg.tokenizer)[:64 - len(suffix)])
    return base + suffix


def add_lineage(app: AppConfig, model: str, extra: dict) -> None:
    """Record the job in a registered model's lineage (playground.json, rewritten atomically)."""
    import json
    import os

    from models.hf_checkpoint import PLAYGROUND_FILE, read_extra
    from models.registry import ModelRegistry

    def write(d):
        meta = read_extra(d)
        meta["lineage"] = {**meta.get("lineage", {}), **extra}
        tmp = d / f".{PLAYGROUND_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        os.replace(tmp, d / PLAYGROUND_FILE)
    ModelRegistry(app).amend(model, write)  # in place, or re-published to shared artifacts


@trainer("pretrain", PretrainConfig, "pretrain a GPT from scratch on a corpus (next-token prediction)",
         check=check, default_name=default_name)
def run(cfg: PretrainConfig, ctx: JobContext) -> Outcome:
    changes: dict = {}
    if ctx.device and cfg.device == "auto":
        changes["device"] = ctx.device
    if ctx.resume and cfg.name:
        changes["fresh"] = False
        # A resumed job continues its run's latest checkpoint; one that died before its first checkpoint starts over.
        run_dir = ctx.app.data_dir / "runs" / "pretrain" / cfg.name
        changes["resume"] = latest_checkpoint(run_dir) is not None
        if changes["resume"]:
            ctx.log(f"resuming from {latest_checkpoint(run_dir).name}")
    cfg = dataclasses.replace(cfg, **changes)
    r = pretrain(cfg, ctx.app, on_event=ctx.emit, stop=ctx.stop)
    if r.model and ctx.job_id is not None:
        add_lineage(ctx.app, r.model, {"job_id": ctx.job_id})
    return Outcome(reason=r.reason, step=r.step, checkpoint=str(r.checkpoint), model=r.model,
                   summary={"loss": r.loss, "val_bpb": r.val_bpb})
