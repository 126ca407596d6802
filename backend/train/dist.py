"""Data-parallel training with torch.distributed: one helper every trainer uses, the same code for 1 or N processes.

    torchrun --standalone --nproc_per_node 2 -m backend.train sft --config sft.yaml     # 2 processes
    python -m backend.train sft --config sft.yaml                                       # 1 process, same code

How a trainer uses it (sft.py, pretrain.py... are the examples to copy):

    d = setup(cfg.device)                 # reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun's env); a no-op alone
    model = ... (every rank builds or loads the same full model on d.device, from the same seed)
    step = d.wrap(model, cfg.parallel)    # DDP (default) or FSDP2 (fully_shard); plain with one process
    opt = make_optimizer(model, ...)      # AFTER wrap: under FSDP2 the parameters are now shards
    loss = step(lambda m: loss_fn(m, *d.take(x, y)))   # the whole loss inside one call: DDP/FSDP hooks see it
    loss.backward(); clip; opt.step()
    reason = d.agree(reason)              # rank 0's stop decision (budget, cancel) for every rank, each step
    m = d.full_model(model)               # (every rank) the plain full model: the model itself unless FSDP2
    if d.is_main: evaluate(m), log, checkpoint, register          # rank 0 alone

Rules that keep N processes equal to one:
- The global batch is what the config says; `take` gives each rank its contiguous share (2 procs x B/2 == 1 x B).
  Every rank draws the same random choices (same seeds), then reads only its share.
- Gradients are averaged across ranks (DDP all-reduce, FSDP2 reduce-scatter): a rank's loss must be the mean over
  its share. When shares hold different numbers of targets (SFT's masked tokens), scale with `global_mean`.
- Several backward passes per step (gradient accumulation, one group at a time): all but the last inside
  `d.no_sync(step, last)` so gradients are exchanged once.
- Work done once before training (idk's probe, distill's teacher traces: one dataset snapshot) runs on rank 0
  inside `d.from_main(make)`, and its result reaches every rank.
- Collectives (wrap, agree, full_model, optimizer_state, sum, from_main) must be called by every rank in the same order;
  evaluation, sampling, logging, checkpoint writing and registration happen on rank 0 only.
- NCCL on cuda (one GPU per local rank), gloo on CPU; mps cannot run several processes.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")
STOP_REASONS = (None, "max_steps", "max_seconds", "max_cpu_seconds", "stopped")
MAIN_WORK_TIMEOUT = datetime.timedelta(hours=6)  # how long the other ranks wait for rank 0's from_main work


def check_parallel_fields(nproc: int, parallel: str, batch_field: str | None = None, batch: int | None = None) -> None:
    """Validate the two config fields every trainer has (FineTuneConfig and PretrainConfig); the global batch
    (`batch_field` = `batch`) must split evenly over nproc processes."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError("nproc: must be at least 1 (processes the worker launches with torchrun)")
    if batch is not None and batch % nproc:
        raise ValueError(f"{batch_field}: {batch} does not split evenly over nproc={nproc} processes; "
                         f"use a multiple of {nproc}")
    if parallel not in PARALLEL:
        raise ValueError(f"parallel: 'ddp' (a full copy per process) or 'fsdp' (parameters sharded, "
                         f"FSDP2 fully_shard), not {parallel!r}")


class Step(nn.Module):
    """The model (and any extra trainable module, such as LoRA adapters or a reward head) behind one forward:
    step(fn) returns fn(model). DDP and FSDP2 hook a module's forward, so the whole loss runs inside it and the
    trainer's code keeps the plain Transformer (.lm_head, .new_cache, .cfg) in its hands."""

    def __init__(self, model: nn.Module, extra: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.extra = extra

    def forward(self, fn):
        return fn(self.model)


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    parallel: str | None = None      # set by wrap
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def describe(self) -> dict:
        """Fields for a trainer's start event (the log states the world size)."""
        return {"world_size": self.world, "parallel": self.parallel if self.active else None, "backend": self.backend}

    # -- data -----------------------------------------------------------------------------------------
    def share(self, n: int, what: str = "batch_size") -> slice:
        """This rank's contiguous share of n global items; n must divide evenly (else the runs would differ)."""
        if n % self.world:
            raise ValueError(f"{what}: {n} does not split evenly over {self.world} processes; "
                             f"use a multiple of {self.world}")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def take(self, *batch, what: str = "batch_size"):
        """This rank's rows of each tensor (or list) of a global batch (all of the same length)."""
        part = self.share(len(batch[0]), what)
        out = tuple(b[part] for b in batch)
        return out if len(out) > 1 else out[0]

    # -- the model ------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, parallel: str = "ddp", extra: nn.Module | None = None) -> Step:
        """Step(model) behind DDP or FSDP2 (every rank calls it; build the optimizer afterwards)."""
        check_parallel_fields(1, parallel)
        step = Step(model, extra)
        if not self.active:
            return step
        self.parallel = parallel
        if parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            from models.transformer import Block
            if extra is not None and any(p.requires_grad for p in extra.parameters()):
                raise ValueError("parallel: 'fsdp' shards the model only; use 'ddp' with LoRA adapters")
            for m in model.modules():  # each transformer block its own unit: gathered just before it runs
                if isinstance(m, Block):
                    fully_shard(m)
            fully_shard(step)
            return step
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        # rope tables are constant buffers: no need to broadcast them at every forward
        return DDP(step, device_ids=ids, forward_sync_buffers=False)

    def no_sync(self, step: nn.Module, last: bool):
        """Context for one backward of several in a step: gradients are exchanged on the last one only."""
        if last or not self.active:
            return contextlib.nullcontext()
        if hasattr(step, "no_sync"):  # DDP
            return step.no_sync()
        return _fsdp_no_sync(step)

    def full_model(self, model: nn.Module) -> nn.Module:
        """The plain model with full weights, for evaluation, sampling and saving: `model` itself unless FSDP2,
        where the shards are gathered (a collective: every rank calls it, every rank gets a copy)."""
        from models.transformer import Transformer
        if not _sharded(model):
            return model
        if not isinstance(model, Transformer):
            raise TypeError(f"full_model: cannot rebuild a {type(model).__name__}; gather it with full_state")
        full = Transformer.from_state_dict(model.cfg, self.full_state(model))
        return full.to(self.device).train(model.training)

    def full_state(self, module: nn.Module) -> dict:
        """module.state_dict() with FSDP2's shards gathered (a collective when sharded), detached copies."""
        from torch.distributed.tensor import DTensor
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in module.state_dict().items()}

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """opt.state_dict() with full tensors (FSDP2's sharded moments gathered: every rank calls it), so a
        checkpoint resumes under any world size and either parallel mode."""
        sd = opt.state_dict()
        if self.parallel != "fsdp" or not self.active:
            return sd
        from torch.distributed.tensor import DTensor
        state = {i: {k: (v.full_tensor().cpu() if isinstance(v, DTensor) else v) for k, v in sorted(s.items())}
                 for i, s in sorted(sd["state"].items())}
        return {**sd, "state": state}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, sd: dict) -> None:
        """Load a full optimizer state (from optimizer_state or a single-process run) into opt, resharding."""
        if self.parallel == "fsdp" and self.active:
            from torch.distributed.tensor import DTensor, distribute_tensor
            params = [p for g in opt.param_groups for p in g["params"]]
            state = {}
            for i, s in sd["state"].items():
                p = params[int(i)]
                state[i] = {k: (distribute_tensor(v.to(self.device), p.device_mesh, p.placements)
                                if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v)
                            for k, v in s.items()}
            sd = {**sd, "state": state}
        opt.load_state_dict(sd)

    # -- agreement ------------------------------------------------------------------------------------
    def agree(self, reason: str | None) -> str | None:
        """Rank 0's stop decision (its clock, its cancel flag), or any rank's 'stopped', for every rank."""
        if not self.active:
            return reason
        code = torch.tensor([STOP_REASONS.index(reason) if self.is_main else 0,
                             int(reason == "stopped")], device=self.device)
        tdist.all_reduce(code, op=tdist.ReduceOp.MAX)
        return "stopped" if code[1] else STOP_REASONS[int(code[0])]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (float64; a collective)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def mean(self, *values: float) -> list[float]:
        return [v / self.world for v in self.sum(*values)]

    def global_mean(self, local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
        """A loss whose averaged gradient is that of sum over all ranks / global count: local_sum * world / N.
        (DDP averages the ranks' gradients; shares with different counts would otherwise weigh unequally.)"""
        (total,) = self.sum(local_count)
        return local_sum * (self.world / max(total, 1.0))

    def from_main(self, make):
        """make() run by rank 0 alone, its result (any picklable value) on every rank; an exception of make()
        is raised on every rank. For work that must happen once, before training: idk's probe and distill's
        teacher traces write one dataset snapshot, and every rank trains on it. A collective.
        The result travels over a gloo group of its own with a long timeout: the other ranks wait while rank 0
        generates, possibly for longer than the default group's timeout (NCCL's watchdog stops a wait of 10
        minutes)."""
        if not self.active:
            return make()
        group = tdist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)  # every rank, before rank 0 starts
        box: list = [None]
        try:
            if self.is_main:
                try:
                    box[0] = ("ok", make())
                except Exception as e:
                    box[0] = ("error", e)
            tdist.broadcast_object_list(box, src=0, group=group)
        finally:
            tdist.destroy_process_group(group)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (writes caches, trains a tokenizer), the others after it (they read)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self.owns_group = False


def _sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())


@contextlib.contextmanager
def _fsdp_no_sync(step):
    step.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        step.set_requires_gradient_sync(True)


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world size) as torchrun sets them; (0, 0, 1) otherwise."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 0, 1


def setup(requested_device: str = "auto") -> Dist:
    """The process group from torchrun's environment: NCCL with cuda:LOCAL_RANK, gloo on CPU. Alone: no group,
    the requested device."""
    from models.device import pick_device
    rank, local_rank, world = world_from_env()
    device = pick_device(requested_device)
    if world == 1:
        return Dist(device=device)
    if device.type == "mps":
        raise ValueError("device: mps cannot train with several processes; use nproc 1 or a cpu/cuda device")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"nproc: local rank {local_rank} has no GPU (this machine has "
                             f"{torch.cuda.device_count()}); use at most that many processes")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Dist(rank, local_rank, world, device, backend, owns_group=owns)
