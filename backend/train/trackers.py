"""Where a run's metrics go besides metrics.jsonl: TensorBoard event files, and Weights & Biases when its key is set.

    trackers = open_trackers(run_dir, run_name, config)    # rank 0 only (backend.train.pretrain._Events does it)
    for t in trackers: t.log(event)                         # every event a trainer emits
    for t in trackers: t.close()

TensorBoard: run_dir/tensorboard/events.out.tfevents.* (torch.utils.tensorboard); every number of an event but
the step becomes a scalar at that step ("loss", "val_bpb", "reward"...), a sample becomes text. Watch with
`tensorboard --logdir DATA_DIR/runs`.

W&B: only when WANDB_API_KEY is set (project $WANDB_PROJECT, default "llm-playground"; WANDB_MODE=offline keeps it
on disk for `wandb sync`). wandb is imported only then. When it cannot start (no network, bad key) the run goes on
without it and says why in its log: training never fails for a dashboard.
"""
from __future__ import annotations

import os
from pathlib import Path

WANDB_INIT_TIMEOUT = 20.0  # seconds ($WANDB_INIT_TIMEOUT overrides); offline, wandb would otherwise wait 90


def _numbers(event: dict) -> dict:
    return {k: float(v) for k, v in event.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "tensorboard"
        self.w = None

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run hides what the first attempt logged after its checkpoint (as metrics.jsonl)
        self.w = SummaryWriter(log_dir=str(self.dir), flush_secs=5, purge_step=purge_step)

    def log(self, ev: dict) -> None:
        step = int(ev.get("step", 0) or 0)
        if "start" in ev or "done" in ev:
            if "start" in ev and self.w is None:
                self._open(step + 1 if ev.get("resumed") else None)
            return  # descriptions (parameter counts, world size), not curves
        if "log" in ev or "checkpoint" in ev:
            return
        if self.w is None:
            self._open()
        if "sample" in ev:
            self.w.add_text("sample", f"**{ev.get('prompt', '')}**{ev['sample']}", step)
            return
        for k, v in _numbers(ev).items():
            self.w.add_scalar(k, v, step)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


class WandB:
    def __init__(self, run_dir: Path, name: str, config: dict):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llm-playground"), name=name, config=config,
                              dir=str(run_dir), reinit="finish_previous",
                              settings=wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT)),
                                                      silent=True))

    def log(self, ev: dict) -> None:
        nums = _numbers(ev)
        if "sample" in ev:
            nums["sample"] = ev["sample"]
        if nums and "start" not in ev:
            self.run.log(nums, step=int(ev.get("step", 0) or 0))

    def close(self) -> None:
        self.run.finish()
        self.wandb.teardown()  # wandb keeps settings process-wide: the next run reads the environment afresh


def open_trackers(run_dir: Path, name: str, config: dict) -> tuple[list, list[str]]:
    """(trackers, log lines saying what was opened or why not)."""
    out, notes = [TensorBoard(run_dir)], [f"TensorBoard events in {Path(run_dir) / 'tensorboard'}"]
    if os.environ.get("WANDB_API_KEY"):
        try:
            out.append(WandB(run_dir, name, config))
            notes.append(f"Weights & Biases run {name!r} in project {os.environ.get('WANDB_PROJECT', 'llm-playground')}")
        except ImportError:
            notes.append("WANDB_API_KEY is set but the wandb package is not installed (pip install wandb): "
                         "metrics go to metrics.jsonl and TensorBoard only")
        except Exception as e:  # no network, a bad key, a timeout: wandb raises its own errors
            import wandb
            wandb.teardown()
            notes.append(f"Weights & Biases could not start ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); offline? "
                         "set WANDB_MODE=offline to keep the run on disk for `wandb sync`. "
                         "Metrics go to metrics.jsonl and TensorBoard only")
    return out, notes
