"""GRPO with verifiable rewards (DeepSeekMath, Shao et al. 2024; used for DeepSeek-R1-Zero and R1).

Each step, for each of prompts_per_step problems:
  1. sample a group of G = group_size answers with THE sampler (backend.serving.engine.Engine over a copy of the
     policy in eval mode, no grad; temperature 1.0), or, with rollout_server set, from a serving engine that
     gets the policy's weights after every step (backend/train/rollout_server.py, as TRL does with vLLM);
  2. reward each by rule: accuracy (1 if the final answer is exactly right, backend/datasets/verifiable.py)
     + format_weight * format (1 if the reply is "<think>...</think> answer", R1-Zero's template);
  3. advantage A_i = (r_i - mean(r)) / (std(r) + 1e-4) within the group: no value network (scale_rewards
     "group"; "batch": the std of the whole step's rewards; "none": r_i - mean(r) alone, as Dr. GRPO);
  4. loss per token t of answer i (a differentiable forward of the policy):
        -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * KL_t
     ratio = pi / pi_old (pi_old = the policy that sampled: one update per batch, as TRL's default
     num_iterations=1, so ratio = 1 in value and the clip matters only with several updates);
     KL_t = exp(ref - logp) - (ref - logp) - 1 (the unbiased "k3" estimator, DeepSeekMath eq. 4) to the
     frozen parent; averaged over each answer's tokens, then over answers (DeepSeekMath's GRPO loss,
     loss_type "grpo"), or summed over all tokens and divided by one number for the step (loss_type "bnpo",
     "dapo", "dr_grpo"; grpo_loss says which and why).

Defaults and where they come from: group_size 8 (TRL GRPOConfig num_generations=8; DeepSeekMath used 64),
clip eps 0.2 (DeepSeekMath, TRL epsilon=0.2), beta 0.04 (DeepSeekMath and TRL's default before v0.19;
TRL now defaults to 0.0), temperature 1.0 (TRL), lr 5e-6 (TRL uses 1e-6 for long runs; our runs are a few
hundred steps). Curves (R1 figures 2 and 3): held-out accuracy (greedy; strict = a stated answer, and
lenient = else the reply's last number) every eval_every steps and the mean response length, reward, KL
and CPU seconds of each step: the job's metrics, and curves.json in the run directory.

Cost on a CPU: the G answers of a prompt share one forward of the prompt (group_logprobs), the sampler
decodes a bf16 copy of the policy, and max_cpu_seconds stops a run on its CPU budget (load-independent).
Preset "cpu-30min" (PRESETS, python -m backend.bench grpo) is the 30-CPU-minute demonstration.

The same loop serves RLHF (backend/train/rlhf.py): only the reward function and the prompts differ.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from backend.datasets.verifiable import THINK_SYSTEM
from backend.jobs.kinds import JobContext, Outcome, trainer
from backend.train.common import (FineTuneConfig, FineTuneRun, amp_for, check_finite, check_parent, default_name_for,
                                  load_parent, make_opt)

PLAIN_SYSTEM = "You are a helpful assistant. Solve the problem and end with 'The answer is N.'"


@dataclass
class PolicyConfig(FineTuneConfig):
    """What GRPO and RLHF share."""
    lr: float = 5e-6
    max_steps: int = 50
    group_size: int = 8            # G answers per prompt (TRL num_generations)
    prompts_per_step: int = 2
    max_new_tokens: int = 96
    temperature: float = 1.0
    clip_eps: float = 0.2
    beta: float = 0.04             # KL to the reference (0 turns it off)
    eval_every: int = 10
    n_heldout: int = 32
    eval_tokens: int = 96
    max_cpu_seconds: float = 0.0   # CPU budget (user+sys of this process since the run began, final eval included); 0: none
    sample_dtype: str = "auto"     # weights the sampler decodes with: "auto" (bf16 where training autocasts to bf16), "bf16", "fp32"
    # Rollouts from a serving engine instead of the in-process sampler (backend/train/rollout_server.py); "": in-process
    rollout_server: str = ""       # the server's OpenAI base URL, http://host:port/v1
    rollout_model: str = ""        # the model it serves the policy under
    rollout_api_key_env: str = ""  # environment variable with its API key (this app: an admin's, to push weights)
    weight_sync: str = "push"      # "push": the policy's weights to the server after each step; "none": off-policy rollouts
    # How the per-token losses add up and how rewards become advantages: TRL GRPOConfig's fields and values
    # (grpo_loss, group_advantages). Our defaults are DeepSeekMath's GRPO (TRL's default is now "dapo").
    loss_type: str = "grpo"        # "grpo", "bnpo", "dr_grpo" or "dapo"
    scale_rewards: str = "group"   # "group", "batch" or "none" (Dr. GRPO: no std division)
    mask_truncated_completions: bool = False  # answers cut at max_new_tokens leave the loss (DAPO's overlong filter)

    def global_batch(self) -> tuple[str, int]:
        return "prompts_per_step", self.prompts_per_step

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise ValueError("group_size: at least 2 (advantages are relative to the group)")
        if self.prompts_per_step < 1 or self.max_new_tokens < 1 or self.n_heldout < 1:
            raise ValueError("prompts_per_step, max_new_tokens and n_heldout must be at least 1")
        if self.beta < 0 or not 0 < self.clip_eps < 1 or not self.temperature > 0:
            raise ValueError("beta must be >= 0, clip_eps in (0, 1), temperature > 0")
        if self.max_cpu_seconds < 0:
            raise ValueError("max_cpu_seconds must not be negative")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: one of {', '.join(LOSS_TYPES)}, not {self.loss_type!r}")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards: 'group', 'batch' or 'none', not {self.scale_rewards!r}")
        if self.sample_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"sample_dtype: 'auto', 'bf16' or 'fp32', not {self.sample_dtype!r}")
        from backend.train.rollout_server import check_rollout_fields
        check_rollout_fields(self)


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

# A preset sets its fields over the config's (as RLHF's presets do).
PRESETS = {
    "default": {},
    # python -m backend.bench grpo: SmolLM2-135M-Instruct on one-step word problems ("Emily has 4 apples and
    # buys 5 more...", numbers <= 10) with a plain prompt asking for "The answer is N." (the 135M model
    # almost never writes R1's <think> tags, so a format reward would have no signal); temperature 0.7 (at
    # 1.0 one probe of 32 answers had 1 right, at 0.7 3: too few groups with any signal), answers of <= 48
    # tokens, lr 3e-5; the run's budget 1740 CPU-seconds leaves 60 of the 1800 for loading the model and
    # saving the checkpoint (max_steps is not reached: ~74 steps measured).
    "cpu-30min": {"kinds": ["totals"], "scale": "small", "think": False, "group_size": 8, "prompts_per_step": 2,
                  "temperature": 0.7, "max_new_tokens": 48, "eval_tokens": 64, "n_heldout": 64, "eval_every": 10,
                  "lr": 3e-5, "warmup_steps": 3, "max_steps": 100, "max_cpu_seconds": 1740.0,
                  "checkpoint_every": 1000},
}


@dataclass
class GRPOConfig(PolicyConfig):
    preset: str = "default"         # a name in PRESETS: its fields replace the config's
    kinds: list[str] = dataclasses.field(default_factory=lambda: ["apples"])  # verifiable problem kinds
    scale: str = "small"            # numbers up to 10 ("small") or 200 ("large")
    think: bool = True              # R1-Zero's <think> template and a format reward
    open_think: bool = True         # think: the answer starts inside an opened <think> tag (DeepSeek-R1's template
    #                                 enforces it); the rewards read "<think>" + the sampled text
    format_weight: float = 0.5      # reward = accuracy + format_weight * format
    n_train: int = 2000             # bundled training problems (seed) ; held-out ones use another seed

    def validate(self) -> None:
        super().validate()
        from backend.datasets.verifiable import check_kinds
        check_kinds(self.kinds, also=("gsm8k",))
        if self.scale not in ("small", "large"):
            raise ValueError("scale: 'small' or 'large'")
        if self.preset not in PRESETS:
            raise ValueError(f"preset: one of {', '.join(PRESETS)}, not {self.preset!r}")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     batch_std: float | None = None) -> torch.Tensor:
    """r - group mean, divided by (std + 1e-4) of the group ("group", GRPO), of all the rewards given ("batch",
    TRL's scale_rewards="batch"; batch_std: that std over every process's rewards), or not at all ("none");
    groups of group_size consecutive rewards.

    Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like Training", sec. 3.1) drops the std: dividing by it
    weighs the groups that are almost all right or almost all wrong (small std) most, a question-difficulty bias."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale == "group":
        a = a / (r.std(1, keepdim=True) + 1e-4)
    elif scale == "batch":
        std = batch_std if batch_std is not None else float(rewards.std()) if rewards.numel() > 1 else 0.0
        a = a / (std + 1e-4)
    elif scale != "none":
        raise ValueError(f"scale_rewards: 'group', 'batch' or 'none', not {scale!r}")
    return a.view(-1)


def grpo_loss(logp, old_logp, ref_logp, mask, adv, clip_eps: float, beta: float, loss_type: str = "grpo",
              normalizer: float | None = None, loss_mask=None):
    """(loss, mean KL per token over `mask`). All [N, L] but adv [N]; loss_mask: the tokens in the loss, when
    fewer than `mask`'s (mask_truncated_completions leaves cut answers out of the loss, not out of the KL curve).

    How the per-token losses become one number, by TRL's loss_type (GRPOTrainer._compute_loss):
      "grpo"     each answer's mean over its tokens, then the mean over answers (DeepSeekMath). The 1/|o_i| favours
                 short answers when right (each token gets a larger share of a positive advantage) and long ones
                 when wrong (a smaller share of the penalty): Dr. GRPO (Liu et al. 2025, sec. 3.1) traces the
                 growth of wrong answers' length in R1-Zero-like runs to it;
      "bnpo"     the sum over all tokens / the number of tokens in this process's batch;
      "dapo"     the same over every process's tokens (DAPO, Yu et al. 2025: every token weighs the same);
      "dr_grpo"  the sum over all tokens / (answers x max_new_tokens), a constant (Dr. GRPO): no length bias.
    normalizer: what the sum (or, for "grpo", the sum of the answers' means) is divided by, for the whole step
    when a step's batch is fed one group at a time (the groups' losses then add up to the step's); None: this
    batch alone ("dr_grpo" needs it: answers x max_new_tokens)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    per_token = -surrogate + beta * kl
    kl_mean = float((kl.detach() * mask).sum() / mask.sum().clamp_min(1))
    mask = mask if loss_mask is None else loss_mask
    if loss_type == "grpo":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp_min(1)
        return per_seq.sum() / (normalizer if normalizer is not None else len(per_seq)), kl_mean
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    if normalizer is None:
        if loss_type == "dr_grpo":
            raise ValueError("loss_type 'dr_grpo' divides by answers x max_new_tokens: pass it as normalizer")
        normalizer = float(mask.sum())
    return (per_token * mask).sum() / max(normalizer, 1.0), kl_mean


def loss_normalizer(loss_type: str, lengths: list[int], max_new_tokens: int, all_tokens: float, world: int) -> float:
    """grpo_loss's normalizer for a step whose answers (this process's) have `lengths` tokens in the loss;
    all_tokens: the tokens in the loss of every process's answers. DDP averages the processes' gradients, so
    "dapo" divides by all_tokens / world (TRL: num_items_in_batch / num_processes)."""
    return {"grpo": float(len(lengths)), "bnpo": float(sum(lengths)), "dapo": all_tokens / world,
            "dr_grpo": float(len(lengths) * max_new_tokens)}[loss_type]


def group_logprobs(model, prompt: list[int], completions: list[list[int]], amp=None):
    """Per-token log-probs of the G completions of ONE prompt: ([G, L], mask [G, L]), right-padded.

    The prompt's forward runs once and its keys and values are shared by the G rows (the KV cache,
    differentiable here), instead of G copies of the prompt in the batch (backend.train.common.
    completion_logprobs); the output layer runs only where a completion token is predicted. With a
    ~50-token prompt and 8 answers of <= 64 tokens this is ~40% fewer CPU-seconds per GRPO step."""
    from backend.train.common import token_logprobs_of
    from backend.train.pretrain import amp_context
    dev, G = model.device, len(completions)
    L = max(max(len(c) for c in completions), 1)
    x = torch.zeros(G, L, dtype=torch.long)
    for i, c in enumerate(completions):
        x[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    x = x.to(dev)
    mask = (torch.arange(L, device=dev)[None] < torch.tensor([len(c) for c in completions], device=dev)[:, None]).float()
    with amp_context(dev, amp):
        cache = model.new_cache(1, len(prompt) + L - 1)
        h = model(torch.tensor([prompt], device=dev), cache, return_hidden=True)[:, -1:]  # predicts token 0
        h = h.expand(G, 1, h.shape[-1])
        if L > 1:  # the completions' own tokens predict the rest, attending to the shared prompt
            h = torch.cat([h, model(x[:, :-1], cache.expand(G), return_hidden=True)], 1)
        logits = model.lm_head(h)
    return token_logprobs_of(logits, x) * mask, mask


def rollout_engine(policy, spec, enc, dtype: torch.dtype | None = None):
    """THE sampler over a frozen copy of the policy (the Engine fuses weights for decoding, so it gets its own).
    dtype bf16: decoding 16 samples at once measured 1.6x fewer CPU-seconds per token than float32 here
    (AMX); the policy trains in float32 weights, so samples come from its bf16 rounding (as vLLM rollouts do)."""
    from backend.serving.engine import Engine
    return Engine(spec, copy.deepcopy(policy).eval().requires_grad_(False).to(dtype or policy.dtype), enc)


def sample_groups(engine, prompts: list[list[int]], n: int, max_tokens: int, temperature: float, seed: int):
    """(text, token ids, truncated) of each prompt's n completions (prompt-major); the ids include the stop
    token; truncated: cut at max_tokens (no stop token)."""
    from backend.serving.sampling import SamplingParams
    from models.chat_format import stop_token_ids
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed,
                            stop_token_ids=stop_token_ids(engine.enc))
    comps = engine.complete_batch(prompts, params, n=n)
    out = []
    for c in comps:
        ids = list(c.token_ids) + ([c.stop_token_id] if c.stop_token_id is not None else [])
        out.append((c.text, ids or [stop_token_ids(engine.enc)[0]], c.finish_reason == "length"))
    return out


def policy_optimization(kind: str, cfg: PolicyConfig, ctx: JobContext, train_prompts: list, heldout: list,
                        render: Callable, reward_fn: Callable, evaluate: Callable, describe: str,
                        open_think: bool = False) -> Outcome:
    """The loop GRPO and RLHF share.

    render(item) -> chat messages; reward_fn(items, texts) -> (rewards tensor, metrics dict);
    evaluate(engine, heldout, prompt_ids) -> (metrics dict with "held_out_accuracy" or other numbers, a sample
    (prompt, text)). open_think: every answer starts inside <think>: the prompt ends with it, and the texts that
    reward_fn sees begin with it (evaluate adds it to its own).
    """
    from models.chat_format import THINK, render_chat
    opened = THINK if open_think else ""
    run = FineTuneRun(kind, cfg, ctx)
    server = None
    try:
        torch.manual_seed(cfg.seed)
        if cfg.rollout_server:  # reached before anything is loaded: a wrong URL fails the run at once
            from backend.train.rollout_server import RolloutServer
            from models.registry import ModelRegistry
            from models.tokenizers import get_encoding
            run.phase(f"reaching the rollout server at {cfg.rollout_server}…")
            tokenizer = ModelRegistry(run.app).get(cfg.parent_model).tokenizer
            server = RolloutServer(cfg, get_encoding(tokenizer, run.app.data_dir), tokenizer)
            run.log(server.describe())
            run.phase("loading the parent model…")
        parent, enc, spec = load_parent(run.app, cfg.parent_model, run.device)
        ref = copy.deepcopy(parent).eval().requires_grad_(False)
        policy = run.model_to_train(lambda: parent).to(run.device).train()
        spec = dataclasses.replace(spec, name=run.name)
        d = run.dist
        step = d.wrap(policy, cfg.parallel)  # DDP / FSDP2 with several processes; optimizer after
        opt = make_opt(policy, cfg, run.device)
        state = run.restore(opt)
        amp = amp_for(cfg, run.device, policy.cfg.dim)
        sample_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": amp}[cfg.sample_dtype]
        cpu0 = time.process_time()  # CPU seconds (user+sys, all threads) of this run: a load-independent budget
        prompt_ids = lambda item: render_chat(render(item), enc, add_generation_prompt=True,  # noqa: E731
                                              open_think=open_think).ids
        run.emit({"step": run.step, "start": run.name, "kind": kind, "parent_model": cfg.parent_model,
                  "group_size": cfg.group_size, "beta": cfg.beta, "clip_eps": cfg.clip_eps, "peak_lr": cfg.lr,
                  "train_prompts": len(train_prompts), "held_out": len(heldout), "device": str(run.device),
                  "resumed": state is not None})

        def push_weights() -> float:
            """The policy's weights to the rollout server (weight_sync "push"): rank 0 sends, every rank
            waits for it, so no rank samples from the old weights. Seconds it took."""
            if server is None or server.sync != "push":
                return 0.0
            t = time.perf_counter()
            full = d.full_model(policy)
            if d.is_main:
                server.push(full)
            d.barrier()
            return time.perf_counter() - t

        push_weights()  # the server starts from the policy (parent or resumed); a model that does not fit fails here
        curves: list[dict] = []  # the step and eval events, saved as curves.json in the run directory
        eval_cpu = [0.0]

        def do_eval():
            """Rank 0 evaluates (the others get {}: only rank 0 reports)."""
            t = time.process_time()
            full = d.full_model(policy)
            if not d.is_main:
                return {}
            engine = rollout_engine(full, spec, enc, sample_dtype)
            try:
                metrics, (p, text) = evaluate(engine, heldout, prompt_ids)
            finally:
                engine.close()  # its scheduler thread would otherwise keep this copy of the policy alive
            run.emit({"step": run.step, "prompt": p, "sample": text})
            eval_cpu[0] = time.process_time() - t
            return {**metrics, "eval_cpu_s": round(eval_cpu[0], 1)}

        def save_curves(ev: dict) -> None:
            if d.is_main:
                curves.append({k: v for k, v in ev.items() if isinstance(v, (int, float))})
                (run.dir / "curves.json").write_text(json.dumps(curves))

        summary = {}
        if state is None:
            run.phase(f"checking the starting model on {len(heldout)} held-out prompts before the first step…")
            summary = do_eval()
            run.emit({"step": 0, **summary, **_accuracy(summary)})
            save_curves({"step": 0, **summary, "cpu_s": round(time.process_time() - cpu0, 1)})
        rng = random.Random(cfg.seed + run.step)
        reason, step_cpu = None, 0.0
        while True:
            # another step and the final evaluation would not fit the CPU budget (rank 0's count decides)
            over = cfg.max_cpu_seconds and time.process_time() - cpu0 + step_cpu + eval_cpu[0] > cfg.max_cpu_seconds
            if (reason := run.should_stop("max_cpu_seconds" if over else None)):
                break
            t0, c0 = time.perf_counter(), time.process_time()
            # Rollouts per rank: every rank draws the same prompts and samples the groups of its share with its
            # own sampler (its replica of the policy; under FSDP2 a gathered copy), as nanochat's chat_rl does.
            items = d.take(rng.sample(train_prompts, min(cfg.prompts_per_step, len(train_prompts))),
                           what="prompts_per_step")
            prompts = [prompt_ids(it) for it in items]
            engine = server.engine if server else rollout_engine(d.full_model(policy), spec, enc, sample_dtype)
            samples = sample_groups(engine, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                                    seed=cfg.seed * 100003 + run.step + 7919 * d.rank)
            samples = [(opened + text, ids, cut) for text, ids, cut in samples]
            if server is None:
                engine.close()  # ends its scheduler thread: a copy of the policy per step stayed in memory (10 GB at step 15)
            del engine
            t_sample = time.perf_counter() - t0
            group_items = [it for it in items for _ in range(cfg.group_size)]
            rewards, rmetrics = reward_fn(group_items, [t for t, _, _ in samples])
            batch_std = None
            if cfg.scale_rewards == "batch":  # the std of every process's rewards this step
                n_r, s1, s2 = d.sum(float(rewards.numel()), float(rewards.sum()), float((rewards ** 2).sum()))
                batch_std = (max(s2 - s1 * s1 / n_r, 0.0) / max(n_r - 1, 1.0)) ** 0.5
            adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards, batch_std).to(run.device)
            C = [ids for _, ids, _ in samples]
            truncated = [cut for _, _, cut in samples]
            # the tokens each answer puts in the loss: none for a cut answer under mask_truncated_completions
            in_loss = [0 if cut and cfg.mask_truncated_completions else len(c) for c, cut in zip(C, truncated)]
            (all_tokens,) = d.sum(float(sum(in_loss)))
            normalizer = loss_normalizer(cfg.loss_type, in_loss, cfg.max_new_tokens, all_tokens, d.world)
            lr = run.lr()
            for g in opt.param_groups:
                g["lr"] = lr
            G, loss_sum, kl_sum, n_tokens = cfg.group_size, 0.0, 0.0, 0.0
            for g, prompt in enumerate(prompts):  # one group's graph at a time; gradients add up
                rows = slice(g * G, (g + 1) * G)
                with torch.no_grad():
                    ref_logp, _ = group_logprobs(ref, prompt, C[rows], amp)  # also with beta 0: the KL curve is shown
                with d.no_sync(step, last=g == len(prompts) - 1):  # the ranks exchange gradients once a step
                    logp, mask = step(lambda m: group_logprobs(m, prompt, C[rows], amp))
                    loss_mask = None
                    if cfg.mask_truncated_completions:
                        kept = torch.tensor([0.0 if cut else 1.0 for cut in truncated[rows]], device=mask.device)
                        loss_mask = mask * kept[:, None]
                    loss, kl = grpo_loss(logp, logp.detach(), ref_logp, mask, adv[rows], cfg.clip_eps, cfg.beta,
                                         cfg.loss_type, normalizer, loss_mask)
                    loss.backward()  # the groups' losses add up to the step's (normalizer: the whole step's)
                loss_sum += loss.item()
                kl_sum, n_tokens = kl_sum + kl * float(mask.sum()), n_tokens + float(mask.sum())
            kl_sum, n_tokens, len_sum, n_answers, reward_sum, n_cut = d.sum(kl_sum, n_tokens, sum(len(c) for c in C),
                                                                            len(C), float(rewards.sum()), sum(truncated))
            (loss_sum,) = d.mean(loss_sum)
            rmetrics = dict(zip(rmetrics, (round(v, 4) for v in d.mean(*rmetrics.values()))))
            loss, kl = torch.tensor(loss_sum), kl_sum / max(n_tokens, 1.0)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.step += 1
            check_finite(loss.item(), run.step)
            push_s = push_weights()
            step_cpu = time.process_time() - c0  # sampling + update, without the evaluation
            ev = {"step": run.step, "loss": round(loss.item(), 6), "lr": lr, "reward": round(reward_sum / n_answers, 4),
                  "kl": round(kl, 6), "response_length": round(len_sum / n_answers, 2),
                  "truncated": round(n_cut / n_answers, 4),
                  "sample_s": round(t_sample, 2), "step_s": round(time.perf_counter() - t0, 2),
                  "elapsed": round(run.elapsed(), 2), "cpu_s": round(time.process_time() - cpu0, 1), **rmetrics,
                  # where the rollouts came from: the first group's prompt and one of its samples
                  "rollout_prompt": render(items[0])[-1]["content"], "rollout_sample": samples[0][0][:200]}
            if server is not None:
                ev["rollouts"] = server.base_url + (" (off-policy: weights not synced)" if server.sync == "none" else "")
                if server.sync == "push":
                    ev["push_s"] = round(push_s, 2)
            if run.step % cfg.eval_every == 0:
                summary = do_eval()
                ev.update(summary)
                if "held_out_accuracy" in summary:
                    ev["accuracy"] = summary["held_out_accuracy"]
            run.emit(ev)
            save_curves(ev)
            if run.step % cfg.checkpoint_every == 0:
                run.checkpoint(policy, opt, spec.tokenizer)
        if run.step % cfg.eval_every and run.step > 0:
            summary = do_eval()
            run.emit({"step": run.step, **summary, **_accuracy(summary)})
            save_curves({"step": run.step, **summary, "cpu_s": round(time.process_time() - cpu0, 1)})
        if run.last_ckpt is None or not run.last_ckpt.name.endswith(f"{run.step:07d}"):
            run.checkpoint(policy, opt, spec.tokenizer)
        name = run.register(policy, spec.tokenizer, f"{describe} ({run.step} steps)", {"beta": cfg.beta, **summary})
        run.emit({"step": run.step, "done": reason, "model": name, **summary})
        return Outcome(reason, run.step, str(run.last_ckpt), name, summary)
    except BaseException as e:
        run.emit({"step": run.step, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if server is not None:
            server.close()
        run.close()


def _accuracy(summary: dict) -> dict:
    """The job queue files events with "accuracy" as metrics (curves)."""
    return {"accuracy": summary["held_out_accuracy"]} if "held_out_accuracy" in summary else {}


# -- GRPO with verifiable rewards ---------------------------------------------------------------------
def grpo_problems(cfg: GRPOConfig, app, snapshot_hash):
    from backend.datasets import load_rows
    from backend.datasets.verifiable import Problem, gsm8k, problems
    if "gsm8k" in cfg.kinds:
        return gsm8k("train"), gsm8k("test")[:cfg.n_heldout]
    if cfg.dataset == "bundled":
        return (problems(cfg.n_train, seed=cfg.seed, kinds=cfg.kinds, scale=cfg.scale),
                problems(cfg.n_heldout, seed=cfg.seed + 99991, kinds=cfg.kinds, scale=cfg.scale))
    rows = load_rows(cfg.dataset, app, snapshot_hash, lambda: [])
    try:
        probs = [Problem(r["question"], str(r["answer"]), r.get("kind", "custom")) for r in rows]
    except (KeyError, TypeError):
        raise ValueError("dataset: GRPO rows need 'question' and 'answer'") from None
    n = max(1, len(probs) // 10)
    return probs[n:], probs[:n]


def run_grpo(cfg: GRPOConfig, ctx: JobContext) -> Outcome:
    from backend.datasets.verifiable import format_ok
    from models.chat_format import THINK
    cfg = dataclasses.replace(cfg, **PRESETS[cfg.preset])
    train, heldout = grpo_problems(cfg, ctx.app, ctx.snapshot_hash)
    system = THINK_SYSTEM if cfg.think else PLAIN_SYSTEM
    open_think = cfg.think and cfg.open_think  # the answers start inside <think>
    opened = THINK if open_think else ""

    def render(p):
        return [{"role": "system", "content": system}, {"role": "user", "content": p.question}]

    def reward_fn(items, texts):
        acc = torch.tensor([float(p.check(t)) for p, t in zip(items, texts)])
        fmt = torch.tensor([float(format_ok(t)) for t in texts]) if cfg.think else torch.zeros(len(texts))
        return acc + cfg.format_weight * fmt, {"train_accuracy": round(float(acc.mean()), 4),
                                               "format_reward": round(float(fmt.mean()), 4)}

    def evaluate(engine, problems, prompt_ids):
        from backend.serving.sampling import SamplingParams
        from models.chat_format import stop_token_ids
        params = SamplingParams(temperature=0.0, max_tokens=cfg.eval_tokens, stop_token_ids=stop_token_ids(engine.enc))
        comps = engine.complete_batch([prompt_ids(p) for p in problems], params)
        texts = [opened + c.text for c in comps]
        right = [p.check(t) for p, t in zip(problems, texts)]
        lenient = [p.check(t, lenient=True) for p, t in zip(problems, texts)]
        return ({"held_out_accuracy": round(sum(right) / len(right), 4),
                 "held_out_accuracy_lenient": round(sum(lenient) / len(lenient), 4),
                 "held_out_format": round(sum(format_ok(t) for t in texts) / len(texts), 4),
                 "held_out_length": round(sum(len(c.token_ids) for c in comps) / len(comps), 2)},
                (problems[0].question, texts[0]))

    return policy_optimization("grpo", cfg, ctx, train, heldout, render, reward_fn, evaluate,
                               f"GRPO of {cfg.parent_model} on {'+'.join(cfg.kinds)} problems", open_think)


trainer("grpo", GRPOConfig, "GRPO with verifiable rewards (accuracy + format), group-normalised advantages, KL to the parent",
        check=check_parent, default_name=default_name_for("grpo"))(run_grpo)
