"""Practice problems and inference-time scaling (DEMOS 14-15): sample N solutions to a problem whose answer
is known, mark each right or wrong, and see what sampling more buys.

    r = practice(pg, "smollm2-135m-instruct", generated_problem("apples", seed=3), PracticeConfig(n=8))
    r["solutions"][0]   -> {"text", "answer" (extracted, or None), "right", "tokens", "finish_reason", "score"?}
    r["pass_at_1"], r["curve"] -> [{"k", "pass_at_k", "majority_at_k", "best_of_k"?}], r["tally"], r["majority"]
    c = scaling_curve(pg, model, "apples", m=5, seed=0, cfg=PracticeConfig(n=8))   # the same curve over m problems

Both take `cancel` (a threading.Event, as the Chat tab passes): once set, the engine stops at its next
token, frees its single-flight slot, and the run raises Stopped instead of summing up partial samples.

Grading is the GRPO trainer's reward: Problem.check from backend/datasets/verifiable.py (the final answer
must be stated: after </think>, in <answer>, or after "the answer is"; a reply that states none is wrong).
The prompt is the GRPO trainer's too: its plain or R1-Zero ("think") system prompt, rendered by the model's
chat format. The N samples of one problem share one prefill (Engine.complete_batch with n=N).

The numbers, for n samples of which c are right:
  pass@k        unbiased estimate of "at least one of k samples is right" (Chen et al. 2021, the Codex
                paper): 1 - C(n-c, k) / C(n, k). pass@1 = c/n, the accuracy of one sample.
  majority@k    self-consistency (Wang et al. 2022): the most common stated answer of k samples is the
                answer; samples that state none do not vote; a tie counts as the share of the tied answers
                that are right (a fair coin among them). Averaged over every k-subset of the n samples
                when there are at most EXACT_SUBSETS of them, else over SAMPLED_SUBSETS random ones.
  best-of-k     the sample a reward model scores highest among k (a registered reward model: a "reward"
                job's model, backend/train/reward.py); exact over all k-subsets (ties in score: first index).
"""
from __future__ import annotations

import math
import random
import threading
from collections import Counter
from dataclasses import dataclass
from itertools import combinations

from backend.datasets.verifiable import GENERATORS, Problem, extract_answer, problems
from backend.serving.sampling import SamplingParams

TEMPLATES = ("plain", "think")   # the GRPO trainer's system prompts: PLAIN_SYSTEM, THINK_SYSTEM (R1-Zero)
MAX_N = 64
MAX_PROBLEMS = 32
MAX_TOKENS = 1024
EXACT_SUBSETS = 5000
SAMPLED_SUBSETS = 2000


class Stopped(Exception):
    """The run's cancel event was set before every sample was in: nothing is graded or summed up, so no
    pass@k is ever reported over a partial set of samples."""


@dataclass
class PracticeConfig:
    n: int = 8                      # samples per problem
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None         # None: a fresh seed, returned so the run can be repeated
    template: str = "plain"         # "plain" or "think" (R1-Zero's <think> template)
    reward_model: str | None = None  # a registered reward model for best-of-N; None: no best-of-N
    lenient: bool = False           # also accept the last number (word) when no answer is stated (GRPO's held-out rule)
    frequency_penalty: float = 0.0  # repetition controls, as SamplingParams
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self) -> PracticeConfig:
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer from 1 to {MAX_N}, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}, got {self.max_tokens!r}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, not {self.template!r}")
        self.params(0).validate()
        return self

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, seed=seed,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              repetition_penalty=self.repetition_penalty)


# -- problems ------------------------------------------------------------------------------------------
def generated_problem(kind: str, seed: int = 0, scale: str = "small") -> Problem:
    """One bundled problem (apples, count, spell), the same for the same seed."""
    return problems(1, seed=seed, kinds=[kind], scale=scale)[0]


def typed_problem(question: str, answer: str) -> Problem:
    """A learner's own problem. The checker compares a whole integer or one word of letters."""
    question, answer = (question or "").strip(), (answer or "").strip()
    if not question:
        raise ValueError("question must not be empty")
    if not (answer.lstrip("-").isdigit() or answer.isalpha()):
        raise ValueError(f"answer must be a whole number (like 7 or -3) or one word of letters (like iio), "
                         f"not {answer!r}: the checker compares the last number or word the reply states")
    return Problem(question, answer.lower() if answer.isalpha() else answer, "custom")


def problem_kinds() -> list[str]:
    return list(GENERATORS)


# -- the numbers -----------------------------------------------------------------------------------------
def ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    out = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return out if out[-1] == n else out + [n]


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them right, is right)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))  # Codex paper's stable product


def tally(answers: list[str | None]) -> list[tuple[str, int]]:
    """Votes per stated answer, most first (ties in first-seen order); samples that state none abstain."""
    return Counter(a for a in answers if a is not None).most_common()


def vote_credit(answers: list[str | None], right: dict[str, bool]) -> float:
    """Majority vote of `answers`: 1 if the top answer is right, 0 if wrong, the right share of a tie."""
    votes = tally(answers)
    if not votes:
        return 0.0
    top = [a for a, n in votes if n == votes[0][1]]
    return sum(right[a] for a in top) / len(top)


def _subsets(n: int, k: int, seed: int):
    if math.comb(n, k) <= EXACT_SUBSETS:
        yield from combinations(range(n), k)
        return
    rng = random.Random(seed)
    for _ in range(SAMPLED_SUBSETS):
        yield rng.sample(range(n), k)


def majority_at_k(answers: list[str | None], rights: list[bool], k: int, seed: int = 0) -> float:
    """Expected majority-vote accuracy of k of these samples (see the module doc)."""
    right = {a: r for a, r in zip(answers, rights) if a is not None}
    credits = [vote_credit([answers[i] for i in s], right) for s in _subsets(len(answers), k, seed)]
    return sum(credits) / len(credits)


def best_of_k(scores: list[float], rights: list[bool], k: int) -> float:
    """Expected accuracy of the top-scored sample of k drawn from these: the i-th best of n is the top of
    C(n-1-i, k-1) of the C(n, k) subsets."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    return sum(math.comb(n - 1 - pos, k - 1) * rights[i] for pos, i in enumerate(order)) / math.comb(n, k)


def curve(answers: list[str | None], rights: list[bool], scores: list[float] | None = None) -> list[dict]:
    n, c = len(rights), sum(rights)
    rows = []
    for k in ks(n):
        row = {"k": k, "pass_at_k": round(pass_at_k(n, c, k), 6),
               "majority_at_k": round(majority_at_k(answers, rights, k), 6)}
        if scores is not None:
            row["best_of_k"] = round(best_of_k(scores, rights, k), 6)
        rows.append(row)
    return rows


# -- sampling and grading ----------------------------------------------------------------------------------
def system_prompt(template: str) -> str:
    from backend.train.grpo import PLAIN_SYSTEM, THINK_SYSTEM
    return THINK_SYSTEM if template == "think" else PLAIN_SYSTEM


def grade(problem: Problem, text: str, lenient: bool = False) -> tuple[str | None, bool]:
    """(the stated final answer, right?) by the GRPO reward's rule; lenient: else the reply's last number (word)."""
    numeric = problem.answer.lstrip("-").isdigit()
    return extract_answer(text, numeric=numeric, lenient=lenient), problem.check(text, lenient=lenient)


def reward_models(registry) -> list[str]:
    """Registered reward models (trained by a "reward" job)."""
    from backend.models import model_names
    return model_names(registry, "reward")


def check_reward_model(pg, name: str) -> None:
    known = reward_models(pg.registry)
    if name not in known:
        raise ValueError(f"reward_model: {name!r} is not a registered reward model; reward models: "
                         f"{', '.join(known) or 'none (train one with a reward job)'}")


def reward_scores(pg, name: str, questions: list[str], texts: list[str], batch: int = 16) -> list[float]:
    """The reward model's score of each (question, answer), as the RLHF trainer scores them."""
    import torch

    from backend.serving.compute_thread import run_in_short_thread
    from backend.train.reward import encode_answer, load_reward_model
    from models.tokenizers import get_encoding
    check_reward_model(pg, name)

    def score() -> list[float]:
        rm = load_reward_model(pg.registry, name, device=pg.engines.device)
        enc = get_encoding(pg.registry.get(name).tokenizer, pg.cfg.data_dir)
        rows = [encode_answer(enc, q, t, min(1024, rm.backbone.cfg.max_seq_len)) for q, t in zip(questions, texts)]
        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                out += rm(rows[i:i + batch]).float().cpu().tolist()
        return out
    # on a thread of its own: a request thread that computed would keep an OpenMP pool that slows every
    # model's steps (backend/serving/compute_thread.py)
    return run_in_short_thread(score, name=f"score-{name}")


def _check_stopped(cancel: threading.Event | None, comps: list, max_tokens: int) -> None:
    """Stopped once the cancel is set: the engine returned early, so some samples may be cut short (their
    finish_reason still says "length"), and a caller that asked to stop wants no grades either way."""
    if cancel is None or not cancel.is_set():
        return
    finished = sum(c.finish_reason == "stop" or len(c.token_ids) >= max_tokens for c in comps)
    raise Stopped(f"stopped with {finished} of {len(comps)} samples finished; nothing is graded")


def sample_solutions(pg, model: str, probs: list[Problem], cfg: PracticeConfig, seed: int,
                     cancel: threading.Event | None = None) -> list[list[dict]]:
    """cfg.n graded solutions of each problem, all problems decoded in one batch (Stopped on a cancel)."""
    engine = pg.engines.get(model)
    system = system_prompt(cfg.template)
    prompts = [engine.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": p.question}])
               for p in probs]
    params = cfg.params(seed)
    params.stop_token_ids = engine.default_stop_ids()
    comps = engine.complete_batch(prompts, params, n=cfg.n, cancel=cancel)
    _check_stopped(cancel, comps, params.max_tokens)
    out = []
    for i, p in enumerate(probs):
        sols = []
        for j, c in enumerate(comps[i * cfg.n:(i + 1) * cfg.n]):
            answer, right = grade(p, c.text, cfg.lenient)
            sols.append({"index": j, "text": c.text, "answer": answer, "right": right, "tokens": len(c.token_ids),
                         "finish_reason": c.finish_reason})
        out.append(sols)
    if cfg.reward_model:
        flat = [(p.question, s) for p, sols in zip(probs, out) for s in sols]
        for (_, s), score in zip(flat, reward_scores(pg, cfg.reward_model, [q for q, _ in flat],
                                                      [s["text"] for _, s in flat])):
            s["score"] = round(score, 4)
    return out


def _mean(xs: list[int]) -> float | None:
    return round(sum(xs) / len(xs), 1) if xs else None


def summarize(problem: Problem, sols: list[dict]) -> dict:
    answers, rights = [s["answer"] for s in sols], [s["right"] for s in sols]
    right = {a: r for a, r in zip(answers, rights) if a is not None}
    votes = tally(answers)
    top = [a for a, n in votes if n == votes[0][1]] if votes else []
    scores = [s["score"] for s in sols] if sols and "score" in sols[0] else None
    out = {"problem": problem.to_dict(), "n": len(sols), "right": sum(rights), "pass_at_1": sum(rights) / len(sols),
           "tally": [{"answer": a, "votes": n, "right": right[a]} for a, n in votes],
           "abstained": sum(a is None for a in answers),
           "majority": {"answers": top, "right": vote_credit(answers, right)},
           "mean_tokens_right": _mean([s["tokens"] for s in sols if s["right"]]),
           "mean_tokens_wrong": _mean([s["tokens"] for s in sols if not s["right"]]),
           "curve": curve(answers, rights, scores)}
    if scores is not None:
        best = max(range(len(sols)), key=lambda i: (scores[i], -i))
        out["best_of_n"] = {"index": best, "answer": sols[best]["answer"], "right": sols[best]["right"],
                            "score": scores[best]}
    return out


def _checked(pg, model: str, cfg: PracticeConfig) -> int:
    cfg.validate()
    if cfg.reward_model:
        check_reward_model(pg, cfg.reward_model)
    if not model:
        raise ValueError("model: choose a chat model")
    return cfg.seed if cfg.seed is not None else random.randrange(2 ** 31)


def practice(pg, model: str, problem: Problem, cfg: PracticeConfig, cancel: threading.Event | None = None) -> dict:
    """N graded solutions of one problem and what they add up to (see the module doc)."""
    seed = _checked(pg, model, cfg)
    sols = sample_solutions(pg, model, [problem], cfg, seed, cancel)[0]
    return {"model": model, "seed": seed, "template": cfg.template, "system": system_prompt(cfg.template),
            "temperature": cfg.temperature, "reward_model": cfg.reward_model,
            "best_of_n_note": None if cfg.reward_model else (
                "no reward model chosen: best-of-N needs one (registered: "
                f"{', '.join(reward_models(pg.registry)) or 'none; train one with a reward job in the Training tab'})"),
            "solutions": sols, **summarize(problem, sols)}


def scaling_curve(pg, model: str, kind: str, m: int, seed: int, cfg: PracticeConfig, scale: str = "small",
                  cancel: threading.Event | None = None) -> dict:
    """Majority@k (and pass@k, best-of-k) for k = 1, 2, 4, ..., N averaged over m bundled problems."""
    if not isinstance(m, int) or not 1 <= m <= MAX_PROBLEMS:
        raise ValueError(f"m must be an integer from 1 to {MAX_PROBLEMS}, got {m!r}")
    sample_seed = _checked(pg, model, cfg)
    probs = problems(m, seed=seed, kinds=[kind], scale=scale)
    per = [summarize(p, s) for p, s in zip(probs, sample_solutions(pg, model, probs, cfg, sample_seed, cancel))]
    keys = [key for key in ("pass_at_k", "majority_at_k", "best_of_k") if key in per[0]["curve"][0]]
    rows = [{"k": row["k"], **{key: sum(p["curve"][i][key] for p in per) / m for key in keys}}
            for i, row in enumerate(per[0]["curve"])]
    return {"model": model, "kind": kind, "m": m, "n": cfg.n, "seed": seed, "sample_seed": sample_seed,
            "temperature": cfg.temperature, "template": cfg.template, "reward_model": cfg.reward_model,
            "pass_at_1": sum(p["pass_at_1"] for p in per) / m, "curve": rows,
            "problems": [{"question": p["problem"]["question"], "answer": p["problem"]["answer"], "right": p["right"],
                          "n": p["n"], "majority": p["majority"], "tally": p["tally"]} for p in per]}
