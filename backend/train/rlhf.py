"""RLHF: optimise the policy against a reward model, with a KL penalty to the reference (DEMOS.md 16-17).

The same loop as GRPO (backend/train/grpo.py: sampling through the Engine, group-relative advantages,
clipped objective, k3 KL to the frozen parent), with the reward model's score of (prompt, answer) as the
reward instead of a rule ("GRPO with the reward model as reward"). Curves per step: the mean RM score
("reward"), the KL to the reference, the mean response length; every eval_every steps a held-out check
on prompts the RM never saw: the RM score of greedy answers, and two things the RM does not measure
directly: how often answers follow the hidden rule the annotators used (they mention pelicans,
backend/datasets/preferences.py) and the share of distinct words (it drops when text degenerates
into "the the the").

With held_out_reward_model (a reward model trained on other rankings, by another rule: a reward job with
bundled_set "judge", backend/datasets/judge_preferences.py) every step also logs that model's score of the same
samples ("held_out_reward"), and every step logs distinct-1/2 and repetition of its samples: the independent
measures of backend/train/hacking.py, which finds the step where they turn (the job view's "reward_hacking").
A judge trained on the same bundled rule as reward_model (the other half of the same set: reward.py's half
"a" / "b") is refused: it learned the rule the policy exploits ("shorter wins"), so its score rises with the
reward while the answers collapse; it cannot see the hacking.

preset "reward-hacking": no KL (beta 0), a higher learning rate and many steps: the RM score keeps
rising while the samples collapse into whatever the RM over-rewards. That is why RLHF is run briefly
and stopped (the Deep Dive's point; DEMOS.md 17).

Prompts: those of the dataset the job names and records in its lineage (dataset "snapshot": the job's
rankings, preferences or SFT snapshot; a .jsonl of such rows), or the bundled ones (dataset "bundled").
Each step's event names the prompt its first group was sampled from ("rollout_prompt").
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.common import check_parent, default_name_for
from backend.train.grpo import PolicyConfig, policy_optimization
from backend.train.hacking import distinct_n, sample_metrics
from backend.train.reward import bundled_set_of

PRESETS = {
    "default": {},
    "reward-hacking": {"beta": 0.0, "lr": 3e-5, "max_steps": 300},
    # The same within 15 CPU-minutes (SmolLM2-135M, 1 thread): smaller groups and answers for more updates, a
    # higher rate, a greedy sample every 5 steps for the before/after pair; give held_out_reward_model too.
    # Measured before bundled_set existed (reward models of 40 steps on halves a/b, held-out pairwise accuracy 92.5% /
    # 74.2%): 105 steps in 893 CPU-s; the RM score rose (-0.15 -> 0.18), distinct-2 peaked at step 46 and fell
    # 0.99 -> 0.13 (all samples "Phellet of Hails"), the held-out RM's score did not fall (both learned "shorter
    # wins"; answers went to one or two made-up words from step ~20): such a judge is now refused (check below).
    # Measured with the judge set (2 shared CPU cores, 1 thread): proxy RM 40 steps on bundled preferences half a
    # (91.1% held-out pairwise accuracy, 475 CPU-s), judge RM 30 steps on bundled_set "judge" (82.2%, 394 CPU-s);
    # RLHF 99 steps in 890 CPU-s: mean proxy score of steps 1-10 / 90-99 -0.026 -> +0.004 (smoothed rise 0.044),
    # the judge's score peaked at once (smoothed turn step 1, raw best step 5: 0.050) and fell 0.030 -> -0.010
    # (smoothed fall 0.053); distinct-2 0.97 -> 0.19 (turn step 14), mean answer length 25 -> 3 tokens. Greedy
    # answers to "Write a joke about the harbour.": step 0 "A harbour is a place where people can find a place to
    # relax and enjoy a good laugh.", step 5 "Aye, aye, aye, aye, ...", step 10 "MOLLEMLAD!", step 15 "MOLLIM!",
    # step 99 "Haul" (rollouts: "<|im_start|>bay"). The scores are small (short RM runs) but the verdict is
    # "hacked" on both measures. python -m backend.train reward --set name=rm-proxy --set half=a --set
    # max_steps=40; ... --set name=rm-judge --set bundled_set=judge --set max_steps=30; python -m backend.train
    # rlhf --set preset=reward-hacking-cpu --set reward_model=rm-proxy --set held_out_reward_model=rm-judge
    "reward-hacking-cpu": {"beta": 0.0, "lr": 5e-5, "max_steps": 300, "group_size": 4, "prompts_per_step": 2,
                           "max_new_tokens": 32, "eval_every": 5, "warmup_steps": 3, "max_cpu_seconds": 900.0,
                           "checkpoint_every": 1000},
}
HELD_OUT_PROMPTS = ["Write a joke about the harbour.", "Say something cheerful.", "Describe a windy afternoon.",
                    "Write one sentence about lunch.", "What is a good name for a cat?", "Tell me about the weather."]


@dataclass
class RLHFConfig(PolicyConfig):
    reward_model: str = ""          # a registered reward model (a "reward" job's model)
    held_out_reward_model: str = ""  # optional: a second reward model, trained on other rankings, that only watches
    preset: str = "default"         # "default", "reward-hacking" (beta 0, lr 3e-5, 300 steps) or "reward-hacking-cpu"
    max_new_tokens: int = 48
    n_heldout: int = 6

    def validate(self) -> None:
        super().validate()
        if self.preset not in PRESETS:
            raise ValueError(f"preset: one of {', '.join(PRESETS)}, not {self.preset!r}")
        if not self.reward_model:
            raise ValueError("reward_model: name the registered reward model to optimise against")
        if self.held_out_reward_model and self.held_out_reward_model == self.reward_model:
            raise ValueError("held_out_reward_model: must be another reward model than reward_model (one trained on "
                             "other rankings, e.g. reward job half 'b' beside half 'a'); a model cannot judge itself")


def check(cfg: RLHFConfig, app) -> None:
    check_parent(cfg, app)
    rm = _reward_spec(app, "reward_model", cfg.reward_model)
    if cfg.held_out_reward_model:
        held = _reward_spec(app, "held_out_reward_model", cfg.held_out_reward_model)
        seen = lambda s: (s.lineage.get("snapshot_hash"), s.lineage.get("rankings"))  # noqa: E731
        if seen(rm)[1] is not None and seen(rm) == seen(held):
            raise ValueError(f"held_out_reward_model: {held.name!r} was trained on the same rankings as {rm.name!r} "
                             f"({seen(rm)[1]}); train it on other rankings (a reward job with bundled_set 'judge') "
                             "to get an independent judge")
        rule = bundled_set_of(rm.lineage)
        if rule is not None and rule == bundled_set_of(held.lineage):
            raise ValueError(f"held_out_reward_model: {held.name!r} was trained on the same bundled rule as {rm.name!r} "
                             f"(bundled_set {rule!r}, only another half of it), so it shares the rule the policy "
                             "exploits and cannot see the hacking; train the judge with a reward job with bundled_set "
                             "'judge' (a reader's rule: real words, complete sentences, no repetition, on topic)")


def _reward_spec(app, field: str, name: str):
    """The registered reward model `name` (the registry's role: models/registry.py), else a ValueError naming `field`."""
    from models.registry import ModelRegistry
    try:
        spec = ModelRegistry(app).get(name)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    if spec.role != "reward":
        raise ValueError(f"{field}: {name!r} is not a reward model but a {spec.role} model (train one with a reward job)")
    return spec


def prompt_of(row: dict) -> str | None:
    """The user prompt of a dataset row: rankings and preference rows ("prompt": text or chat messages),
    SFT conversations ("messages": the first user turn)."""
    p = row.get("prompt")
    if isinstance(p, str):
        return p.strip() or None
    turns = p if isinstance(p, list) else row.get("messages") or []
    users = [m["content"] for m in turns if isinstance(m, dict) and m.get("role") == "user"
             and isinstance(m.get("content"), str)]
    if not users:
        return None
    return (users[-1] if isinstance(p, list) else users[0]).strip() or None


def train_prompts(cfg: RLHFConfig, app, snapshot_hash: str | None) -> list[str]:
    """The distinct prompts of the job's dataset, in their first order (bundled: preferences.PROMPTS)."""
    from backend.datasets import load_rows
    from backend.datasets.preferences import PROMPTS
    rows = load_rows(cfg.dataset, app, snapshot_hash, lambda: [{"prompt": p} for p in PROMPTS])
    prompts = list(dict.fromkeys(p for p in map(prompt_of, rows) if p))
    if not prompts:
        raise ValueError(f"dataset: no prompts in {cfg.dataset!r} (rows need a 'prompt' or user 'messages')")
    return prompts


def distinct_ratio(texts: list[str]) -> float:
    return distinct_n(texts, 1)


def run_rlhf(cfg: RLHFConfig, ctx: JobContext) -> Outcome:
    from backend.datasets.preferences import mentions_pelican
    from backend.train.reward import encode_answer, load_reward_model
    from models.registry import ModelRegistry
    from models.tokenizers import get_encoding
    cfg = dataclasses.replace(cfg, **PRESETS[cfg.preset])
    reg = ModelRegistry(ctx.app)
    rm = load_reward_model(reg, cfg.reward_model, device=ctx.device if ctx.device and cfg.device == "auto" else None)
    rm_enc = get_encoding(reg.get(cfg.reward_model).tokenizer, ctx.app.data_dir)
    max_len = 256
    held_rm = held_enc = None
    if cfg.held_out_reward_model:
        held_rm = load_reward_model(reg, cfg.held_out_reward_model, device=rm.backbone.device)
        held_enc = get_encoding(reg.get(cfg.held_out_reward_model).tokenizer, ctx.app.data_dir)

    @torch.no_grad()
    def scores(prompts, texts, model=rm, enc=rm_enc):
        return model([encode_answer(enc, p, t, max_len) for p, t in zip(prompts, texts)]).float().cpu()

    def render(prompt):
        return [{"role": "user", "content": prompt}]

    def reward_fn(items, texts):
        s = scores(items, texts)
        watch = sample_metrics(texts)  # the independent measures, never part of the reward
        if held_rm is not None:
            watch["held_out_reward"] = round(float(scores(items, texts, held_rm, held_enc).mean()), 4)
        return s, {"rm_score": round(float(s.mean()), 4), **watch}

    def evaluate(engine, prompts, prompt_ids):
        from backend.serving.sampling import SamplingParams
        from models.chat_format import stop_token_ids
        params = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens, stop_token_ids=stop_token_ids(engine.enc))
        texts = [c.text for c in engine.complete_batch([prompt_ids(p) for p in prompts], params)]
        return ({"held_out_rm_score": round(float(scores(prompts, texts).mean()), 4),
                 "held_out_rule_rate": round(sum(map(mentions_pelican, texts)) / len(texts), 4),
                 "held_out_distinct_words": round(distinct_ratio(texts), 4)}, (prompts[0], texts[0]))

    held = (HELD_OUT_PROMPTS * (cfg.n_heldout // len(HELD_OUT_PROMPTS) + 1))[:cfg.n_heldout]
    train = train_prompts(cfg, ctx.app, ctx.snapshot_hash)
    random.Random(cfg.seed).shuffle(train)
    out = policy_optimization("rlhf", cfg, ctx, train, held, render, reward_fn, evaluate,
                              f"RLHF of {cfg.parent_model} against {cfg.reward_model} (preset {cfg.preset}, beta {cfg.beta})")
    if out.model:
        from backend.jobs.pretrain import add_lineage
        add_lineage(ctx.app, out.model, {"reward_model": cfg.reward_model, "preset": cfg.preset,
                                         **({"held_out_reward_model": cfg.held_out_reward_model} if held_rm else {})})
    if out.checkpoint:  # the verdict of the whole run in its log (the job view recomputes it live)
        from pathlib import Path
        from backend.train.hacking import view_of_run
        view = view_of_run(Path(out.checkpoint).parent)
        if view:
            ctx.emit({"log": view["text"], "step": out.step})
    return out


trainer("rlhf", RLHFConfig, "RLHF: the policy against a reward model with a KL penalty (GRPO with the RM as reward)",
        check=check, default_name=default_name_for("rlhf"))(run_rlhf)
