"""DPO (Rafailov et al. 2023): learn from preference pairs directly, without a reward model or sampling.

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

pi is the policy being trained, ref a frozen copy of the parent (its log-probs computed once per pair,
under no_grad), y_w the chosen and y_l the rejected answer; log-probs are sums over the answer's
tokens (the assistant turn with its closing <|im_end|>, as render_chat masks it). beta = 0.1: the DPO
paper's and TRL's DPOConfig default; larger keeps the policy closer to the reference.
Metrics: loss, reward accuracy (share of pairs with a positive margin) and the mean implicit reward
margin beta * (...) on the batch, and the same on held-out pairs every eval_every steps.

Data: "bundled" = every K-choose-2 pair of the hidden-rule rankings (backend/datasets/preferences.py,
through backend.labels.exchange.preference_pairs); "snapshot" = a preferences snapshot; or a .jsonl
of {"prompt", "chosen", "rejected"} (strings or message lists) or ranking rows.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.common import (FineTuneConfig, FineTuneRun, amp_for, check_finite, check_parent, completion_logprobs,
                                  default_name_for, extend_for_tokens, load_parent, make_opt)


@dataclass
class DPOConfig(FineTuneConfig):
    lr: float = 5e-6
    max_steps: int = 100
    beta: float = 0.1             # DPO paper / TRL default
    batch_size: int = 4           # pairs per step
    max_len: int = 256            # prompt + answer tokens (prompt cut from the left)
    n_examples: int = 200         # bundled rankings (each gives K-choose-2 pairs)
    val_fraction: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ValueError("beta: must be positive")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction: must be in [0, 1)")


def to_pairs(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) from pair rows, or every pair of ranking rows."""
    from backend.labels.exchange import preference_pairs
    text = lambda v: v if isinstance(v, str) else v[-1]["content"]  # noqa: E731
    out = []
    for i, r in enumerate(rows):
        if "candidates" in r and "ranking" in r:
            out += [(text(p["prompt"]), text(p["chosen"]), text(p["rejected"])) for p in preference_pairs([r])]
        elif {"prompt", "chosen", "rejected"} <= set(r):
            out.append((text(r["prompt"]), text(r["chosen"]), text(r["rejected"])))
        else:
            raise ValueError(f"dataset row {i}: expected a pair (prompt, chosen, rejected) or a ranking")
    if not out:
        raise ValueError("dataset: no preference pairs")
    return out


def encode_pair(enc, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer is the assistant turn's trained tokens (render_chat's mask)."""
    from models.chat_format import render_chat
    rc = render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], enc)
    start = rc.mask.index(1)
    end = len(rc.mask) - rc.mask[::-1].index(1)
    p, a = rc.ids[:start], rc.ids[start:end]
    a = a[:max_len - 1]
    return p[-(max_len - len(a)):], a


def dpo_terms(policy, ref, enc, pairs, max_len, beta, amp, step=None):
    """(loss, accuracy, mean margin) on a list of (prompt, chosen, rejected). `step`: the policy behind its
    data-parallel wrapper (backend.train.dist), through which the trained forward goes."""
    prompts, answers = [], []
    for p, c, r in pairs:
        pc, ac = encode_pair(enc, p, c, max_len)
        pr, ar = encode_pair(enc, p, r, max_len)
        prompts += [pc, pr]
        answers += [ac, ar]
    if step is not None:
        lp, m = step(lambda pm: completion_logprobs(pm, prompts, answers, amp))
    else:
        lp, m = completion_logprobs(policy, prompts, answers, amp)
    with torch.no_grad():
        rlp, _ = completion_logprobs(ref, prompts, answers, amp)
    pi = (lp * m).sum(1)
    rf = (rlp * m).sum(1)
    logits = beta * ((pi[0::2] - rf[0::2]) - (pi[1::2] - rf[1::2]))
    return -F.logsigmoid(logits).mean(), float((logits > 0).float().mean()), float(logits.detach().mean())


def bundled_rows(cfg: DPOConfig) -> list[dict]:
    from backend.datasets.preferences import rankings
    return rankings(cfg.n_examples, seed=cfg.seed, k=4)


def run_dpo(cfg: DPOConfig, ctx: JobContext, kind: str = "dpo", describe: str | None = None) -> Outcome:
    """`kind` and `describe`: as run_sft's (idk's method "dpo" writes its pairs first, then trains here)."""
    from backend.datasets import load_rows
    run = FineTuneRun(kind, cfg, ctx)
    try:
        torch.manual_seed(cfg.seed)
        parent, enc, spec = load_parent(run.app, cfg.parent_model, run.device)
        from models.tokenizers import chat_encoding_name, get_encoding
        tok_name = chat_encoding_name(spec.tokenizer, run.app.data_dir)
        enc = get_encoding(tok_name, run.app.data_dir)
        parent = extend_for_tokens(parent, enc)
        ref = copy.deepcopy(parent).eval().requires_grad_(False)  # the frozen reference: the parent
        policy = run.model_to_train(lambda: parent).to(run.device).train()
        run.phase("reading the preference pairs…")
        pairs = to_pairs(load_rows(cfg.dataset, run.app, ctx.snapshot_hash, lambda: bundled_rows(cfg)))
        random.Random(cfg.seed).shuffle(pairs)
        n_val = int(len(pairs) * cfg.val_fraction)
        val, train = pairs[:n_val][:64], pairs[n_val:]
        d = run.dist
        step = d.wrap(policy, cfg.parallel)  # DDP / FSDP2 with several processes; optimizer after
        opt = make_opt(policy, cfg, run.device)
        state = run.restore(opt)
        amp = amp_for(cfg, run.device, policy.cfg.dim)
        run.emit({"step": run.step, "start": run.name, "kind": kind, "parent_model": cfg.parent_model, "beta": cfg.beta,
                  "pairs": len(train), "held_out_pairs": len(val), "device": str(run.device), "resumed": state is not None})
        rng = random.Random(cfg.seed + run.step)
        last_loss, reason = None, None
        while not (reason := run.should_stop()):
            t0 = time.perf_counter()
            lr = run.lr()
            for g in opt.param_groups:
                g["lr"] = lr
            batch = d.take(rng.sample(train, min(cfg.batch_size, len(train))))  # this rank's share of the pairs
            loss, acc, margin = dpo_terms(policy, ref, enc, batch, cfg.max_len, cfg.beta, amp, step)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.step += 1
            last_loss, acc, margin = d.mean(loss.item(), acc, margin)  # equal shares: means of the ranks' means
            check_finite(last_loss, run.step)
            ev = {"step": run.step, "loss": round(last_loss, 5), "lr": lr, "reward_accuracy": round(acc, 4),
                  "reward_margin": round(margin, 5), "elapsed": round(run.elapsed(), 2),
                  "step_s": round(time.perf_counter() - t0, 3)}
            if val and run.step % cfg.eval_every == 0:
                full = d.full_model(policy)
                if d.is_main:
                    with torch.no_grad():
                        vl, va, vm = dpo_terms(full, ref, enc, val, cfg.max_len, cfg.beta, amp)
                    ev.update(val_loss=round(vl.item(), 5), accuracy=round(va, 4), val_margin=round(vm, 5))
            run.emit(ev)
            if run.step % cfg.checkpoint_every == 0:
                run.checkpoint(policy, opt, tok_name)
        if run.last_ckpt is None or not run.last_ckpt.name.endswith(f"{run.step:07d}"):
            run.checkpoint(policy, opt, tok_name)
        what = describe or f"DPO of {cfg.parent_model}"
        name = run.register(policy, tok_name, f"{what} (beta {cfg.beta}, {run.step} steps)",
                            {"beta": cfg.beta})
        run.emit({"step": run.step, "done": reason, "model": name, "final_loss": last_loss})
        return Outcome(reason, run.step, str(run.last_ckpt), name, {"loss": last_loss})
    except BaseException as e:
        run.emit({"step": run.step, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        run.close()


trainer("dpo", DPOConfig, "direct preference optimisation from preference pairs (frozen reference, beta 0.1)",
        check=check_parent, default_name=default_name_for("dpo"))(run_dpo)
