"""What the Training tab's form needs from the trainer registry: which fields each kind shows, defaults sized to
finish in minutes on a CPU, and the form's values turned into the kind's config (every value shown reaches the
job; a value the kind does not take is an error, never silently dropped)."""
from __future__ import annotations

from backend.jobs.kinds import config_fields

# Every kind has these, shown in one row.
COMMON = ("max_steps", "max_seconds", "eval_every", "name")
# Only pretraining reads a corpus and builds a model from a preset.
PRETRAIN_ONLY = ("preset", "corpus", "tokenizer", "sample_every", "max_corpus_chars")

# Form defaults that end within minutes on the 2-core CPU these machines have (the time budget ends a run
# whichever comes first); the dataclass defaults stay what a GPU run wants.
QUICK: dict[str, dict] = {
    "pretrain": {"max_steps": 0, "max_seconds": 300, "eval_every": 25, "sample_every": 25},
    "sft": {"max_steps": 30, "max_seconds": 300, "eval_every": 10},
    "reward": {"max_steps": 30, "max_seconds": 300, "eval_every": 10},
    "dpo": {"max_steps": 20, "max_seconds": 300, "eval_every": 10},
    "grpo": {"max_steps": 5, "max_seconds": 600, "eval_every": 5},
    "rlhf": {"max_steps": 5, "max_seconds": 600, "eval_every": 5},
}


def field_names(kind: str) -> list[str]:
    return [f["name"] for f in config_fields(kind)]


def shown(kind: str) -> dict[str, bool]:
    """Which groups of the form this kind shows: the step/time budget row, pretraining's corpus fields, a parent
    model, a dataset (fine-tuning kinds), a reward model (RLHF). A family job has a parent and budgets of its own."""
    names = set(field_names(kind))
    return {"budget": all(k in names for k in COMMON), "pretrain": kind == "pretrain",
            "parent": "parent_model" in names, "dataset": "dataset" in names, "reward_model": "reward_model" in names}


def defaults(kind: str) -> dict:
    """The form's starting values for `kind`: its quick defaults over the config's own."""
    own = {f["name"]: f["default"] for f in config_fields(kind)}
    return {**{k: own.get(k) for k in COMMON if k in own}, **QUICK.get(kind, {})}


def form_config(kind: str, values: dict, extra: dict | None = None) -> dict:
    """The config of a job from the form: empty values (None, "", []) are left to the kind's defaults, every
    other value is kept; a key the kind has no field for is a ValueError naming it. `extra` (the free JSON
    box) wins over the form."""
    names = set(field_names(kind))
    out = {}
    for key, value in values.items():
        if value is None or value == "" or value == []:
            continue
        if key not in names:
            raise ValueError(f"{key}: a {kind} job has no such setting")
        out[key] = value
    return {**out, **(extra or {})}
