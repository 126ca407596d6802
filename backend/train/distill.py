"""Distillation (DEMOS 15; DeepSeek-R1's small models): SFT a student on a teacher's verified reasoning traces.

    python -m backend.train distill --teacher TEACHER --student STUDENT [--problems 64] [--samples 2]
    torchrun --standalone --nproc_per_node 2 -m backend.train distill ...   # the SFT on 2 processes

1. The teacher answers bundled verifiable problems (backend/datasets/verifiable.py: word problems, letter
   counting, spelling, each with an exact answer) under R1's template (backend/train/grpo.py THINK_SYSTEM):
   "<think> reasoning </think> answer", n_samples traces per problem, through the app's generation entry
   point (backend/serving/model_pool.py), so any registered chat model teaches: a trained one, or a remote one
   (`python -m backend.models add-remote`) that a bigger model behind vLLM or another server answers for.
2. Each trace is checked: the final answer it states must be the problem's exact answer (the problem's own
   checker; every bundled problem has one, so no code needs to run). Only verified traces are kept, as
   {"thinking", "content"} assistant turns, frozen as a snapshot. A trace without <think> tags (the bundled
   135M model seldom writes them) keeps its whole text as the thinking and "The answer is N." as the clean
   answer, unless require_think; with `lenient` (default) it is right when its last number is the answer, as
   small models end "... so 9 - 2 = 7 pears are left." without "the answer is" (measured on the bundled
   model, totals: 1 of 16 traces states the right answer, 5 of 16 end on it).
3. The student is SFT-trained on them (backend/train/sft.py; tool_tokens makes <think> one token) and
   registered with lineage (student as parent, the snapshot, the job, and the teacher).
4. Held-out problems, greedy: accuracy, format (<think> then an answer) and length of the student before and
   after, and of the teacher: the table is stored with the model, the run directory and the job.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.common import check_chat_model, check_parent, default_name_for
from backend.train.sft import SFTConfig

_THINK = re.compile(r"\s*<think>(.+?)</think>\s*(.+)", re.S)


@dataclass
class DistillConfig(SFTConfig):
    teacher: str = "smollm2-135m-instruct"  # any registered chat model, remote ones included (not a reward model)
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["totals"])  # problem kinds (verifiable.py)
    scale: str = "small"           # numbers up to 10 ("small") or 200 ("large")
    n_problems: int = 64           # problems the teacher answers
    n_samples: int = 2             # traces per problem
    temperature: float = 0.7       # of the teacher's traces
    teacher_max_tokens: int = 128
    require_think: bool = False    # keep only traces the teacher wrote in <think>...</think> form
    lenient: bool = True           # a trace without tags that states no answer counts by its last number (word)
    n_heldout: int = 16            # held-out problems for the before/after table
    eval_tokens: int = 128
    # SFT of the student: a trace with R1's system prompt is ~150-250 tokens; 4 rows of 320 a step
    max_steps: int = 20
    batch_size: int = 4
    seq_len: int = 320
    lr: float = 3e-5
    warmup_steps: int = 3
    eval_every: int = 10
    checkpoint_every: int = 1000
    protocol_check: int = 0

    def validate(self) -> None:
        super().validate()
        from backend.datasets.verifiable import check_kinds
        check_kinds(self.kinds)
        if self.scale not in ("small", "large"):
            raise ValueError("scale: 'small' or 'large'")
        if self.n_samples < 1:
            raise ValueError("n_samples: the teacher writes at least 1 trace per problem")
        if self.n_problems < 1 or self.n_heldout < 1:
            raise ValueError("n_problems and n_heldout must be at least 1")
        if self.temperature < 0 or self.teacher_max_tokens < 1 or self.eval_tokens < 1:
            raise ValueError("temperature must be >= 0, teacher_max_tokens and eval_tokens at least 1")
        if self.dataset != "bundled":
            raise ValueError("dataset: distill writes its own SFT snapshot from the teacher's verified traces")
        if not self.register:
            raise ValueError("register: distill registers the student (the table's 'after' row measures it)")


def check(cfg: DistillConfig, app) -> None:
    """Before anything loads: a chat model as teacher (here or remote), a trainable chat model as student."""
    check_chat_model(app, "teacher", cfg.teacher, trainable=False)
    check_chat_model(app, "parent_model (the student)", cfg.parent_model)
    check_parent(cfg, app)


def messages(question: str) -> list[dict]:
    from backend.train.grpo import THINK_SYSTEM
    return [{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": question}]


def verified_turn(problem, reply: str, require_think: bool, lenient: bool = False) -> dict | None:
    """The assistant turn {"thinking", "content"} of a right trace, else None. Right: "<think>...</think>
    answer" whose answer states the problem's answer; without tags (unless require_think), a reply that states
    it ("The answer is 7."), or with `lenient` one whose last number (word) is it ("... 9 - 2 = 7 pears left.")."""
    m = _THINK.fullmatch(reply)
    if m and "<think>" not in m.group(2):
        if not problem.check(reply):
            return None
        return {"role": "assistant", "thinking": m.group(1).strip(), "content": m.group(2).strip()}
    if require_think or "<think>" in reply or "</think>" in reply:
        return None  # tags, but not one well-formed thought then an answer
    if not problem.check(reply, lenient=lenient):
        return None
    return {"role": "assistant", "thinking": reply.strip(), "content": f"The answer is {problem.answer}."}


def measure(engine, problems, cfg: DistillConfig, who: str, role: str) -> dict:
    from backend.datasets.verifiable import format_ok
    from backend.serving.sampling import SamplingParams
    from backend.train.generated import ask
    comps = [c[0] for c in ask(engine, [messages(p.question) for p in problems],
                               SamplingParams(temperature=0.0, max_tokens=cfg.eval_tokens))]
    n = len(problems)
    return {"model": who, "role": role,
            "accuracy": round(sum(p.check(c.text) for p, c in zip(problems, comps)) / n, 4),
            "accuracy_lenient": round(sum(p.check(c.text, lenient=True) for p, c in zip(problems, comps)) / n, 4),
            "think_format": round(sum(format_ok(c.text) for c in comps) / n, 4),
            "tokens": round(sum(len(c.token_ids) for c in comps) / n), "problems": n}  # mean answer length


def write_traces(cfg: DistillConfig, ctx: JobContext) -> dict | None:
    """The teacher's traces, verified and frozen as a snapshot, and the teacher and student measured on the
    held-out problems (one process: rank 0 under torchrun). None when stopped meanwhile."""
    from backend.datasets.verifiable import problems
    from backend.serving.sampling import SamplingParams
    from backend.train.generated import ask, freeze, serving
    train = problems(cfg.n_problems, seed=cfg.seed, kinds=cfg.kinds, scale=cfg.scale)
    held = problems(cfg.n_heldout, seed=cfg.seed + 99991, kinds=cfg.kinds, scale=cfg.scale)
    with serving(ctx.app) as engines:
        ctx.emit({"phase": f"{cfg.teacher} writes {cfg.n_samples} traces for each of {len(train)} problems…", "step": 0})
        teacher = engines.get(cfg.teacher)
        params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.teacher_max_tokens, seed=cfg.seed)
        traces = ask(teacher, [messages(p.question) for p in train], params, cfg.n_samples, ctx.stop)
        if ctx.stop.is_set():
            return None
        ctx.emit({"phase": "measuring the teacher and the student on held-out problems…", "step": 0})
        teacher_row = measure(teacher, held, cfg, cfg.teacher, "teacher")
        before = {**teacher_row, "role": "student before"} if cfg.teacher == cfg.parent_model else \
            measure(engines.get(cfg.parent_model), held, cfg, cfg.parent_model, "student before")
    if ctx.stop.is_set():
        return None
    rows, seen, written = [], set(), 0
    for p, comps in zip(train, traces):
        for c in comps:
            written += 1
            turn = verified_turn(p, c.text, cfg.require_think, cfg.lenient) if c.finish_reason == "stop" else None
            if turn is None or (p.question, c.text) in seen:
                continue
            seen.add((p.question, c.text))
            rows.append({"messages": [*messages(p.question), turn], "answer": p.answer, "teacher": cfg.teacher})
    ctx.emit({"log": f"{cfg.teacher} wrote {written} traces; {len(rows)} verified (right final answer) and kept",
              "step": 0})
    if not rows:
        raise ValueError(f"teacher: none of the {written} traces of {cfg.teacher!r} states the right answer; "
                         "use a stronger teacher, easier kinds (totals), more samples or a larger teacher_max_tokens")
    snap = freeze(ctx.app, "distill", rows, f"distill-{cfg.teacher}"[:200],
                  {"teacher": cfg.teacher, "kinds": cfg.kinds, "scale": cfg.scale, "traces": written,
                   "verified": len(rows)})
    ctx.emit({"log": f"snapshot {snap['hash']} ({snap['rows']} verified traces)", "step": 0})
    return {"snapshot": snap["hash"], "held": held, "teacher_row": teacher_row, "before": before,
            "written": written, "verified": len(rows)}


def run_distill(cfg: DistillConfig, ctx: JobContext) -> Outcome:
    from backend.train.generated import processes, record, serving, sft_part, stopped_early, train_on
    with processes(cfg, ctx) as d:
        # Rank 0 alone asks the teacher and writes the snapshot (the same code and seed as one process: the same
        # rows); every rank gets its hash and trains on it. An error there (no verified trace) stops every rank.
        made = d.from_main(lambda: write_traces(cfg, ctx))
        if made is None:
            return stopped_early(ctx)
        out = train_on("distill", sft_part(cfg, SFTConfig), ctx, made["snapshot"],
                       f"{cfg.parent_model} distilled from {cfg.teacher} ({made['verified']} verified traces)")
        if not out.model:
            return out  # the ranks but 0: rank 0 alone registered the student, it alone measures it
        with serving(ctx.app) as engines:
            after = measure(engines.get(out.model), made["held"], cfg, out.model, "student after")
        return record(ctx.app, out, ctx, "distill", [made["teacher_row"], made["before"], after],
                      {"teacher": cfg.teacher, "snapshot_hash": made["snapshot"], "traces_written": made["written"],
                       "traces_verified": made["verified"], "kinds": cfg.kinds, "scale": cfg.scale,
                       "world_size": d.world})


trainer("distill", DistillConfig, "distillation: SFT a student on a teacher's verified <think> traces",
        check=check, default_name=default_name_for("distill"))(run_distill)
