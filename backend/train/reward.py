"""Reward model: the policy's backbone with a scalar head, trained on rankings (InstructGPT, Ouyang et al. 2022).

    score(prompt, answer) = head(h_last)      h_last: the final hidden state (after the last norm) of the
                                              last token of the rendered chat [user prompt, assistant answer]

Loss (Bradley-Terry): for a ranking of K candidates of one prompt, every one of the K-choose-2 pairs
(better w, worse l) contributes -log sigmoid(r_w - r_l); the pairs of one prompt are averaged and sit in
the same batch (each candidate is scored once per step, and the prompt's pairs are not spread over
many steps where they would overfit: InstructGPT section 3.5). Held-out pairwise accuracy (the share of
held-out pairs whose better answer scores higher) is reported every eval_every steps.

Data: dataset "bundled" = the rankings of the field bundled_set: "preferences" (backend/datasets/preferences.py,
the known hidden rule: pelicans, then shorter) or "judge" (backend/datasets/judge_preferences.py, other prompts
ranked by what a reader values: real words, complete sentences, no repetition, on topic, 6-25 words; the
independent judge of an RLHF run against a "preferences" reward model, DEMOS.md 17); "snapshot" = a rankings
snapshot ({"prompt", "candidates", "ranking"} rows) or a preferences snapshot (pair rows, grouped back per
prompt); or a .jsonl of either.

Saved: the backbone as a registered model (HF layout) plus reward_head.safetensors in its directory;
load_reward_model(registry, name) gives the RewardModel back.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn as nn
import torch.nn.functional as F

from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.common import (FineTuneConfig, FineTuneRun, amp_for, check_finite, check_parent, default_name_for,
                                  load_parent, make_opt)
from models.registry import REWARD_HEAD_FILE as HEAD_FILE
HALVES = ("all", "a", "b")
BUNDLED_SETS = ("preferences", "judge")  # backend/datasets/<preferences | judge_preferences>.py


class RewardModel(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.dim, 1)
        nn.init.zeros_(self.head.weight)  # every answer scores 0 at the start
        nn.init.zeros_(self.head.bias)

    def forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Scores [N] of token rows (right-padded internally; the last real token of each row is read)."""
        dev = self.backbone.device
        lens = torch.tensor([len(r) for r in rows], device=dev)
        x = torch.zeros(len(rows), int(lens.max()), dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r, device=dev)
        h = self.backbone(x, return_hidden=True)
        last = h[torch.arange(len(rows), device=dev), lens - 1]
        return self.head(last.float()).squeeze(-1)


@dataclass
class RewardConfig(FineTuneConfig):
    lr: float = 1e-5
    max_steps: int = 150
    batch_size: int = 4            # prompts (rankings) per step; all pairs of each one
    max_len: int = 256             # tokens per rendered prompt + answer (cut from the left)
    n_examples: int = 300          # bundled rankings
    k: int = 4                     # bundled candidates per prompt
    val_fraction: float = 0.2      # held-out rankings (never trained on)
    half: str = "all"              # "all", or "a" / "b": every other ranking of the data, so two reward models
                                   # never see each other's rankings
    bundled_set: str = "preferences"  # dataset "bundled": "preferences" (pelicans, then shorter) or "judge" (a
                                      # reader's rule: RLHF's independent held-out judge, DEMOS.md 17)

    def validate(self) -> None:
        super().validate()
        if self.half not in HALVES:
            raise ValueError(f"half: one of {', '.join(HALVES)}, not {self.half!r}")
        if self.bundled_set not in BUNDLED_SETS:
            raise ValueError(f"bundled_set: one of {', '.join(BUNDLED_SETS)}, not {self.bundled_set!r}")
        if self.bundled_set != "preferences" and self.dataset != "bundled":
            raise ValueError(f"bundled_set: {self.bundled_set!r} names bundled rankings, but dataset is "
                             f"{self.dataset!r}; set dataset to 'bundled' or leave bundled_set at 'preferences'")
        if not 0 < self.val_fraction < 1:
            raise ValueError("val_fraction: must be between 0 and 1")
        if self.max_len < 8 or self.n_examples < 5 or not 2 <= self.k <= 9:
            raise ValueError("max_len must be >= 8, n_examples >= 5 and k between 2 and 9")


def group_rankings(rows: list[dict]) -> list[dict]:
    """Rows as rankings {"prompt", "candidates" (best first)}: ranking rows as they are, pair rows (TRL
    preference shape) grouped per prompt into one item whose pairs are exactly the given ones."""
    out, by_prompt = [], {}
    for i, r in enumerate(rows):
        if "candidates" in r and "ranking" in r:
            if r.get("all_bad"):
                continue
            out.append({"prompt": r["prompt"], "candidates": [r["candidates"][j] for j in r["ranking"]]})
        elif {"prompt", "chosen", "rejected"} <= set(r):
            text = lambda v: v if isinstance(v, str) else v[-1]["content"]  # noqa: E731
            item = by_prompt.setdefault(text(r["prompt"]), {"prompt": text(r["prompt"]), "pairs": []})
            item["pairs"].append((text(r["chosen"]), text(r["rejected"])))
        else:
            raise ValueError(f"dataset row {i}: expected a ranking (prompt, candidates, ranking) or a pair "
                             "(prompt, chosen, rejected)")
    out += list(by_prompt.values())
    if not out:
        raise ValueError("dataset: no rankings or preference pairs")
    return out


def take_half(items: list, half: str) -> list:
    """Half "a" (items 0, 2, 4...) or "b" (1, 3, 5...) of the rankings in their given order, or all of them."""
    return items if half == "all" else items[HALVES.index(half) - 1::2]


def pairs_of(item: dict) -> tuple[list[str], list[tuple[int, int]]]:
    """(answers, [(better index, worse index)]): all K-choose-2 pairs of a ranking, or the given pairs."""
    if "candidates" in item:
        c = item["candidates"]
        return c, list(combinations(range(len(c)), 2))
    answers: list[str] = []
    idx = {}
    for a in (x for p in item["pairs"] for x in p):
        if a not in idx:
            idx[a] = len(answers)
            answers.append(a)
    return answers, [(idx[w], idx[l]) for w, l in item["pairs"]]


def encode_answer(enc, prompt: str, answer: str, max_len: int) -> list[int]:
    from models.chat_format import render_chat
    ids = render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], enc).ids
    return ids[-max_len:]


def bt_loss(scores: torch.Tensor, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, int]:
    """Mean of -log sigmoid(r_better - r_worse) over the pairs; and how many pairs were ordered right."""
    w = torch.tensor([p[0] for p in pairs], device=scores.device)
    l = torch.tensor([p[1] for p in pairs], device=scores.device)
    diff = scores[w] - scores[l]
    return -F.logsigmoid(diff).mean(), int((diff > 0).sum())


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, items: list[dict], enc, max_len: int) -> float:
    was = rm.training
    rm.eval()
    right = total = 0
    for it in items:
        answers, pairs = pairs_of(it)
        scores = rm([encode_answer(enc, it["prompt"], a, max_len) for a in answers])
        right += bt_loss(scores, pairs)[1]
        total += len(pairs)
    rm.train(was)
    return right / max(total, 1)


def save_head(rm: RewardModel, model_dir) -> None:
    from safetensors.torch import save_file
    save_file({"weight": rm.head.weight.detach().cpu().contiguous(), "bias": rm.head.bias.detach().cpu().contiguous()},
              str(model_dir / HEAD_FILE))


def load_reward_model(registry, name: str, device=None) -> RewardModel:
    """A registered reward model (backbone + head), eval mode, float32."""
    from safetensors.torch import load_file
    spec = registry.get(name)
    if spec.path is None or not (spec.path / HEAD_FILE).exists():
        raise ValueError(f"model {name!r} is not a reward model (no {HEAD_FILE})")
    rm = RewardModel(registry.load(name, device=device, dtype=torch.float32))
    sd = load_file(str(spec.path / HEAD_FILE))
    rm.head.load_state_dict(sd)
    return rm.to(rm.backbone.device).eval()


def full_reward_model(rm: RewardModel, d) -> RewardModel:
    """`rm` itself, or under FSDP2 a plain copy with the shards gathered (every rank calls it)."""
    backbone = d.full_model(rm.backbone)
    if backbone is rm.backbone:
        return rm
    full = RewardModel(backbone).to(backbone.device)
    full.head.load_state_dict(d.full_state(rm.head))
    return full.train(rm.training)


def rankings_id(cfg: RewardConfig) -> dict:
    """What names the rankings a reward model trained on (kept in its lineage): two reward models with equal
    ids saw the same rankings, so one cannot stand in as the other's held-out judge."""
    return {"dataset": cfg.dataset, "half": cfg.half,
            **({"bundled_set": cfg.bundled_set, "seed": cfg.seed, "n_examples": cfg.n_examples, "k": cfg.k}
               if cfg.dataset == "bundled" else {})}


def bundled_set_of(lineage: dict) -> str | None:
    """The bundled set a reward model's lineage says it trained on (models from before the field: "preferences"),
    or None when it trained on a snapshot or a file."""
    r = lineage.get("rankings") or {}
    return r.get("bundled_set", "preferences") if r.get("dataset") == "bundled" else None


def bundled_rows(cfg: RewardConfig) -> list[dict]:
    if cfg.bundled_set == "judge":
        from backend.datasets.judge_preferences import rankings
    else:
        from backend.datasets.preferences import rankings
    return rankings(cfg.n_examples, seed=cfg.seed, k=cfg.k)


def run_reward(cfg: RewardConfig, ctx: JobContext) -> Outcome:
    from backend.datasets import load_rows
    from backend.train.pretrain import amp_context
    run = FineTuneRun("reward", cfg, ctx)
    try:
        torch.manual_seed(cfg.seed)
        parent, enc, spec = load_parent(run.app, cfg.parent_model, run.device)
        from models.tokenizers import chat_encoding_name, get_encoding
        tok_name = chat_encoding_name(spec.tokenizer, run.app.data_dir)
        enc = get_encoding(tok_name, run.app.data_dir)
        from backend.train.common import extend_for_tokens
        backbone = run.model_to_train(lambda: extend_for_tokens(parent, enc)).to(run.device)
        del parent
        rm = RewardModel(backbone).to(run.device).train()
        run.phase("reading the rankings…")
        items = take_half(group_rankings(load_rows(cfg.dataset, run.app, ctx.snapshot_hash, lambda: bundled_rows(cfg))),
                          cfg.half)
        random.Random(cfg.seed).shuffle(items)
        n_val = max(1, int(len(items) * cfg.val_fraction))
        val, train = items[:n_val], items[n_val:]
        if not train:
            raise ValueError("dataset: too few rankings to hold some out and train on the rest")
        if run.resume_from is not None:  # the head goes in before the model is sharded
            rm.head.load_state_dict(torch.load(run.resume_from / "trainer.pt", map_location="cpu",
                                               weights_only=False)["head"])
        n_params = rm.backbone.num_params() + 1 + backbone.cfg.dim
        d = run.dist
        step = d.wrap(rm, cfg.parallel)  # DDP / FSDP2 with several processes; optimizer after
        opt = make_opt(rm, cfg, run.device)
        state = run.restore(opt)
        amp = amp_for(cfg, run.device, backbone.cfg.dim)
        run.emit({"step": run.step, "start": run.name, "kind": "reward", "parent_model": cfg.parent_model,
                  **({"bundled_set": cfg.bundled_set} if cfg.dataset == "bundled" else {}), "params": n_params,
                  "train_rankings": len(train),
                  "held_out_rankings": len(val), "device": str(run.device), "resumed": state is not None})

        def accuracy() -> float:
            """Held-out pairwise accuracy: rank 0 measures, every rank gets the number."""
            full = full_reward_model(rm, d)
            return d.sum(pairwise_accuracy(full, val, enc, cfg.max_len) if d.is_main else 0.0)[0]

        acc0 = accuracy()
        if state is None:
            run.emit({"step": 0, "accuracy": round(acc0, 4), "held_out_accuracy": round(acc0, 4)})
        rng = random.Random(cfg.seed + run.step)
        last_loss, acc = None, acc0
        reason = None
        while not (reason := run.should_stop()):
            t0 = time.perf_counter()
            batch = rng.sample(train, min(cfg.batch_size, len(train)))
            mine = d.take(batch)  # every rank draws the same batch and scores its share of the prompts
            lr = run.lr()
            for g in opt.param_groups:
                g["lr"] = lr
            loss_sum, right, n_pairs = 0.0, 0, 0
            for i, it in enumerate(mine):  # one prompt at a time: its K candidates scored once, all its pairs in the loss
                answers, pairs = pairs_of(it)
                rows = [encode_answer(enc, it["prompt"], a, cfg.max_len) for a in answers]
                with d.no_sync(step, last=i == len(mine) - 1):
                    with amp_context(run.device, amp):
                        scores = step(lambda m: m(rows))
                    loss, ok = bt_loss(scores.float(), pairs)
                    (loss / len(mine)).backward()
                loss_sum += loss.item()
                right += ok
                n_pairs += len(pairs)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.step += 1
            loss_sum, right, n_pairs = d.sum(loss_sum, right, n_pairs)
            last_loss = loss_sum / len(batch)
            check_finite(last_loss, run.step)
            ev = {"step": run.step, "loss": round(last_loss, 5), "lr": lr, "train_pair_accuracy": round(right / n_pairs, 4),
                  "pairs": n_pairs, "elapsed": round(run.elapsed(), 2), "step_s": round(time.perf_counter() - t0, 3)}
            if run.step % cfg.eval_every == 0:
                acc = accuracy()
                ev["accuracy"] = ev["held_out_accuracy"] = round(acc, 4)
            run.emit(ev)
            if run.step % cfg.checkpoint_every == 0:
                run.checkpoint(rm.backbone, opt, tok_name, {"head": d.full_state(rm.head)})
        if run.step % cfg.eval_every:
            acc = accuracy()
            run.emit({"step": run.step, "accuracy": round(acc, 4), "held_out_accuracy": round(acc, 4)})
        if run.last_ckpt is None or not run.last_ckpt.name.endswith(f"{run.step:07d}"):
            run.checkpoint(rm.backbone, opt, tok_name, {"head": d.full_state(rm.head)})
        final = full_reward_model(rm, d)
        name = run.register(final.backbone, tok_name, f"reward model from {cfg.parent_model} ({run.step} steps, "
                            f"held-out pairwise accuracy {acc:.1%})",
                            {"reward_model": True, "held_out_accuracy": acc, "initial_accuracy": acc0,
                             "rankings": rankings_id(cfg)})
        if name:
            from models.registry import ModelRegistry
            ModelRegistry(run.app).amend(name, lambda d: save_head(final, d))  # shared artifacts: re-published
        run.emit({"step": run.step, "done": reason, "model": name, "final_loss": last_loss, "held_out_accuracy": acc})
        return Outcome(reason, run.step, str(run.last_ckpt), name,
                       {"loss": last_loss, "held_out_accuracy": acc, "initial_accuracy": acc0})
    except BaseException as e:
        run.emit({"step": run.step, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        run.close()


trainer("reward", RewardConfig, "reward model: backbone + scalar head, Bradley-Terry over all pairs of each ranking",
        check=check_parent, default_name=default_name_for("reward"))(run_reward)
