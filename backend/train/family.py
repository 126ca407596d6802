"""A model family, one command away: `python -m backend.train family` (and the Training tab's button).

From one parent (the bundled SmolLM2-135M-Instruct by default) the family job trains, one after another:

    <prefix>-tools        SFT on the bundled tool-use conversations: calls search and Python unprompted
    <prefix>-think-sft    SFT on bundled solutions written as <think>…</think> then the answer (most thought at a glance,
                          some worked out step by step)
    <prefix>-think        GRPO from it with accuracy + format rewards (DeepSeek-R1's recipe): the worked habit wins,
                          accuracy rises and answers grow longer
    <prefix>-pelican-rm   a reward model on the bundled pelican-joke rankings
    <prefix>-pelican-sft  SFT on the annotators' bundled demonstrations for the same prompts (a quarter about pelicans)
    <prefix>-pelican      RLHF from pelican-sft against pelican-rm (InstructGPT's order: SFT, reward model, RL from
                          the SFT model; the parent itself never mentions a pelican, so RL from it found nothing
                          the reward model wanted but "shorter")

Each member is a normal job (its own row, progress, checkpoints, registered model with lineage) that this job
creates once the member before it is registered (a member's parent must exist when its job is queued) and runs
right here, in the same worker. A member whose model is already registered is skipped and a member job that
was stopped is resumed from its checkpoint, so running the family again continues where it stopped.

Budgets (BUDGETS) cap each member's wall clock and steps: "cpu-1h" is sized for the bundled 135M model on 2 CPU
cores; "tiny" is for tests on toy models.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from backend.config import AppConfig
from backend.jobs.kinds import JobContext, Outcome, trainer

# budget -> member -> config fields: a wall-clock cap (max_seconds) and a step cap, so a fast machine does not
# overtrain. "cpu-1h" is about an hour of wall clock for the bundled 135M model on 2 cores: the caps add up to 65
# minutes, and the reward model and pelican-sft stop at their step caps well before theirs.
# The tools member uses `bench tool_sft`'s measured recipe (4 x 256 tokens a step, lr 2e-4: 100% well-formed
# calls on held-out questions after 60 steps); with the SFT defaults (8 x 512, lr 5e-5) a step took ~30 s on 2
# idle cores, and a run on a loaded machine ended its 900 s after 5 steps with 0% well-formed calls.
BUDGETS = {
    "cpu-1h": {"tools": {"max_seconds": 900.0, "max_steps": 300, "batch_size": 4, "seq_len": 256, "lr": 2e-4,
                         "warmup_steps": 10},
               "think-sft": {"max_seconds": 800.0, "max_steps": 30},
               "think": {"max_seconds": 1000.0, "max_steps": 30},
               "pelican-rm": {"max_seconds": 300.0, "max_steps": 150},
               "pelican-sft": {"max_seconds": 300.0, "max_steps": 30, "batch_size": 4, "seq_len": 128, "n_examples": 200},
               "pelican": {"max_seconds": 600.0, "max_steps": 60}},
    "tiny": {"tools": {"max_steps": 2, "batch_size": 2, "seq_len": 256, "n_examples": 8, "protocol_check": 2},
             "think-sft": {"max_steps": 2, "batch_size": 2, "seq_len": 1024, "n_examples": 8},
             "think": {"max_steps": 1, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 8,
                       "n_heldout": 2, "eval_tokens": 4, "eval_every": 1},
             "pelican-rm": {"max_steps": 2, "batch_size": 2, "n_examples": 8, "max_len": 64},
             "pelican-sft": {"max_steps": 2, "batch_size": 2, "seq_len": 128, "n_examples": 8},
             "pelican": {"max_steps": 1, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 8,
                         "n_heldout": 2, "eval_every": 1}},
}
MEMBERS = ("tools", "think-sft", "think", "pelican-rm", "pelican-sft", "pelican")


@dataclass
class FamilyConfig:
    parent_model: str = "smollm2-135m-instruct"  # a registry name: the family's common ancestor
    prefix: str = "family"                       # members are named <prefix>-<member>
    budget: str = "cpu-1h"                       # a key of BUDGETS
    members: list[str] = dataclasses.field(default_factory=lambda: list(MEMBERS))
    threads: int = 0                             # torch threads per member (0: torch's default)

    def validate(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget: one of {', '.join(BUDGETS)}, not {self.budget!r}")
        unknown = [m for m in self.members if m not in MEMBERS]
        if unknown or not self.members:
            raise ValueError(f"members: pick from {', '.join(MEMBERS)}" + (f", not {unknown[0]!r}" if unknown else ""))
        if "think" in self.members and "think-sft" not in self.members:
            raise ValueError("members: 'think' (GRPO) starts from 'think-sft'; add it")
        for needs in ("pelican-rm", "pelican-sft"):
            if "pelican" in self.members and needs not in self.members:
                raise ValueError(f"members: 'pelican' (RLHF) starts from 'pelican-sft' against 'pelican-rm'; add {needs!r}")


def check(cfg: FamilyConfig, app: AppConfig) -> None:
    from models.registry import ModelRegistry, validate_name
    try:
        spec = ModelRegistry(app).get(cfg.parent_model)
    except ValueError as e:
        raise ValueError(f"parent_model: {e}") from None
    if getattr(spec, "kind", None) == "remote":
        raise ValueError(f"parent_model: {cfg.parent_model!r} is served by another server; a family trains local weights")
    try:
        validate_name(f"{cfg.prefix}-pelican-rm")
    except ValueError as e:
        raise ValueError(f"prefix: {e}") from None


def plan(cfg: FamilyConfig) -> list[tuple[str, str, dict]]:
    """(member, job kind, job config) in the order they train; each member's parent is registered before it."""
    p, name = cfg.parent_model, (lambda m: f"{cfg.prefix}-{m}")
    common = {"threads": cfg.threads}
    jobs = {
        "tools": ("sft", {"parent_model": p, "bundled": "tool-use"}),
        # The thinking pair's recipe (measured 2026-12-07; README "R1's two curves"): SFT on the GRPO run's own kind of
        # problem, three quarters thought at a glance and a quarter worked out, with <think> written as text (the
        # parent already writes "<", "think", ">"; new tag tokens were still at 38% after 30 steps, and the
        # rollouts looped "think think…" for want of </think>); GRPO at T 0.7 on 4 prompts x 8 answers a step,
        # the answer opened with <think>, rewards only accuracy and format, and the worked habit, right more
        # often, wins: held-out accuracy up and answers longer, DeepSeek-R1's two curves.
        "think-sft": ("sft", {"parent_model": p, "bundled": "reasoning", "kinds": ["apples"], "terse_fraction": 0.75,
                              "tool_tokens": False}),
        "think": ("grpo", {"parent_model": name("think-sft"), "think": True, "kinds": ["apples"], "temperature": 0.7,
                           "lr": 1e-5, "prompts_per_step": 4, "max_new_tokens": 128, "eval_tokens": 128,
                           "n_heldout": 64, "eval_every": 5}),
        "pelican-rm": ("reward", {"parent_model": p}),
        "pelican-sft": ("sft", {"parent_model": p, "bundled": "demonstrations", "tool_tokens": False}),
        "pelican": ("rlhf", {"parent_model": name("pelican-sft"), "reward_model": name("pelican-rm")}),
    }
    out = []
    for m in MEMBERS:
        if m in cfg.members:
            kind, config = jobs[m]
            out.append((m, kind, {**config, **common, **BUDGETS[cfg.budget][m], "name": name(m)}))
    return out


def run_family(cfg: FamilyConfig, ctx: JobContext) -> Outcome:
    from backend.db import Database
    from backend.jobs import queue
    from backend.worker import Worker
    from models.registry import ModelRegistry

    db = Database(ctx.app.database_url)
    db.migrate()  # from the CLI, on a data directory the app may never have opened
    registry = ModelRegistry(ctx.app)
    members = plan(cfg)
    done: list[str] = []
    try:
        for i, (member, kind, config) in enumerate(members, 1):
            if ctx.stop.is_set():
                return Outcome("stopped", i - 1, model=done[-1] if done else None, summary={"members": done})
            if config["name"] in registry.names():
                ctx.emit({"step": i, "log": f"{member}: {config['name']} is already registered; skipped"})
                done.append(config["name"])
                continue
            job = _member_job(db, ctx.app, queue, kind, config)
            ctx.emit({"step": i - 1, "phase": f"member {i} of {len(members)}: {member} ({kind}, job {job['id']})"})
            state = _run_here(db, ctx, Worker, queue, job["id"])
            if state != "succeeded":
                if state == "cancelled" or ctx.stop.is_set():
                    return Outcome("stopped", i - 1, model=done[-1] if done else None, summary={"members": done})
                raise RuntimeError(f"member {member} (job {job['id']}) ended {state}: {queue.get_job(db, job['id'])['error']}")
            model = queue.get_job(db, job["id"])["model"]
            done.append(model)
            ctx.emit({"step": i, "member": member, "model": model, "job": job["id"]})
    finally:
        db.close()
    ctx.emit({"step": len(members), "done": "members", "models": done})
    return Outcome("members", len(members), model=done[-1] if done else None, summary={"members": done})


def _member_job(db, app, queue, kind: str, config: dict) -> dict:
    """The member's job: a stopped or failed earlier one of the same name resumes from its checkpoint,
    else a new one is queued (its config checked now that its parent exists)."""
    for j in queue.list_jobs(db, limit=500):
        if j["kind"] == kind and j["name"] == config["name"] and j["state"] in ("cancelled", "failed"):
            return queue.resume_job(db, app, j["id"])
    return queue.create_job(db, app, None, kind, config)


def _run_here(db, ctx: JobContext, Worker, queue, job_id: int) -> str:
    """Run queued job `job_id` in this process, as a worker would; the family's stop stops it too."""
    worker = Worker(ctx.app, db, ctx.device or "cpu")
    job = queue.claim_next(db, worker.id, ctx.device, only=job_id)
    if job is None:  # the app's own worker took it first: follow it there
        while (state := queue.get_job(db, job_id)["state"]) not in queue.FINISHED:
            if ctx.stop.wait(1.0):
                queue.cancel_job(db, job_id)
        return state
    finished = threading.Event()

    def relay_stop():  # the member's own stop flag exists only while it runs
        while not finished.is_set():
            if ctx.stop.wait(0.2) and worker._stop is not None:
                worker._stop.set()
                return
    threading.Thread(target=relay_stop, name=f"family-stop-{job_id}", daemon=True).start()
    try:
        return worker.run_job(job)
    finally:
        finished.set()


trainer("family", FamilyConfig, "a model family from one parent: tool use, thinking (SFT then GRPO), pelican RLHF",
        check=check)(run_family)
