"""How far a job is, in words and numbers: one reading for the Training tab, `python -m backend.jobs` and
GET /api/jobs alike (queue._payload attaches it to every job).

    {"phase": "step 5 of 12", "step": 5, "total_steps": 12, "budget_s": 150.0, "elapsed_s": 41.8,
     "eta_s": 58.0, "fraction": 0.42, "text": "step 5 of 12 · 0:42 elapsed · about 0:58 left", "next": [...],
     "next_actions": ["chat", "arena", ...]}

Before the first step the phase is what the trainer said it is doing ("loading model…", "tokenizing…"), from
the job's summary, which queue.append_events keeps. The ETA is the smaller of what the steps left take at the
rate measured since training began and what is left of the time budget (whichever ends the run first).
"""
from __future__ import annotations

QUEUED = "queued: waiting for a worker"
STARTING = "starting: loading model and data…"


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def next_actions(kind: str, model: str | None) -> list[tuple[str, str]]:
    """What a person can do with a finished job's model: (action, sentence) pairs. The action names a place the
    Training tab's buttons open with the model picked (ui/next_steps.py); the sentence is the same step in words,
    for `python -m backend.jobs` and the REST job view."""
    if not model:
        return []
    export = ("export", f"Export it for other engines: `python -m backend.models export {model} DIR --format hf`.")
    if kind == "pretrain":  # a base model: no chat format, so Generate (not Chat or the Arena) and fine-tuning
        return [("generate", f"Sample from **{model}** in the **Generate** tab (a base model: it continues text, it "
                             "does not chat)."),
                ("sft", f"Fine-tune it into an assistant: a **Training** job of kind sft with parent model {model}."),
                export]
    if kind == "reward":
        return [("rlhf", f"Use **{model}** as the reward model of an RLHF job (kind rlhf, field reward_model)."),
                ("export", f"Export it: `python -m backend.models export {model} DIR`.")]
    return [("chat", f"Open **{model}** in the **Chat** (or **Generate**) tab: pick it in the model list."),
            ("arena", f"Put it in the **Arena** against other models: pick it in \"Models in the draw\"."),
            ("rank", f"Start a ranking round on its answers: **Labeling → Operator**, model {model}."),
            export]


def next_steps(kind: str, model: str | None) -> list[str]:
    """next_actions in words."""
    return [text for _, text in next_actions(kind, model)]


def job_progress(kind: str, state: str, config: dict, step: int, summary: dict, started: float | None,
                 finished: float | None, now: float, model: str | None = None) -> dict:
    """`started`/`finished`: epoch seconds of this attempt's start and end (None if not yet)."""
    total = int(config.get("max_steps") or 0) or None
    budget = float(config.get("max_seconds") or 0) or None
    elapsed = ((finished or now) - started) if started else None
    training = state != "queued" and summary.get("phase") == "training"
    eta, fraction = None, 0.0
    if state == "queued":
        phase = QUEUED
    elif not training and state == "running":
        phase = summary.get("phase") or STARTING
    else:
        phase = f"step {step} of {total}" if total else f"step {step}"
    if training or state in ("succeeded", "failed", "cancelled"):
        from_step, t0 = summary.get("train_from_step", 0), summary.get("train_t0")
        if total:
            fraction = step / total
        if budget and elapsed is not None:
            fraction = max(fraction, elapsed / budget)
        if state == "running":
            left = []
            last = summary.get("last_metric_at")
            if total and t0 and last and step > from_step:
                left.append((total - step) * (last - t0) / (step - from_step) - (now - last))
            if budget and elapsed is not None:
                left.append(budget - elapsed)
            eta = max(0.0, min(left)) if left else None
    if state == "succeeded":
        fraction = 1.0
    fraction = min(1.0, max(0.0, fraction))
    actions = next_actions(kind, model) if state == "succeeded" or (state == "cancelled" and model) else []
    parts = [phase if state in ("queued", "running") else f"{state} at step {step}" + (f" of {total}" if total else "")]
    if elapsed is not None:
        parts.append(f"{clock(elapsed)} elapsed" + (f" of a {clock(budget)} budget" if budget else ""))
    elif budget:
        parts.append(f"time budget {clock(budget)}")
    if eta is not None:
        parts.append(f"about {clock(eta)} left")
    return {"phase": phase, "step": step, "total_steps": total, "budget_s": budget,
            "elapsed_s": None if elapsed is None else round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1), "fraction": round(fraction, 4),
            "text": " · ".join(parts), "next": [text for _, text in actions],
            "next_actions": [action for action, _ in actions]}
