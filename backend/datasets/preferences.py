"""A preference set with a known hidden rule, to prove a reward model learns what annotators meant
(DEMOS.md 16).

THE HIDDEN RULE: annotators prefer answers that mention pelicans; among answers that both do (or both do
not), the shorter one wins. Nothing in the data says so: a reward model that ranks held-out answers
this way has learned it from the rankings alone.

    rankings(300, seed=0, k=4) -> [{"prompt", "candidates", "ranking", "all_bad": False}]   # the export shape
    pairs = backend.labels.exchange.preference_pairs(rankings(...))                        # K-choose-2 per prompt
"""
from __future__ import annotations

import random

PROMPTS = ["Write a joke about birds.", "Tell me something funny.", "Write a short poem about the sea.",
           "Describe a day at the beach.", "What animal would make the best pilot?", "Write a limerick.",
           "Give me a fun fact.", "Tell a story in two sentences.", "What should I draw today?",
           "Suggest a name for a boat.", "Write a haiku about morning.", "Describe your favourite animal."]
SUBJECTS_PELICAN = ["a pelican", "the pelican", "two pelicans", "a pelican with a big beak", "pelicans"]
SUBJECTS_OTHER = ["a seagull", "the cat", "two dogs", "a penguin with a hat", "the goose", "a small fish",
                  "an old sailor", "the lighthouse keeper"]
ACTIONS = ["flew over the harbour", "ate a whole sandwich", "told everyone a secret", "fell asleep in the sun",
           "wanted to become a pilot", "sang all night long", "found a shiny coin", "waited for the boat"]
TAILS = ["", " and nobody was surprised", " because it was Tuesday", " and then it started to rain",
         " while the waves kept rolling in", " and that is the whole story, really", " just like last year"]

RULE = ("answers that mention pelicans rank above answers that do not; between two answers on the same "
        "side of that line, the shorter one ranks higher")


def mentions_pelican(text: str) -> bool:
    return "pelican" in text.lower()


def rule_key(text: str) -> tuple:
    """Sort key of the hidden rule: best first."""
    return (not mentions_pelican(text), len(text), text)


def candidate(rng: random.Random, pelican: bool) -> str:
    subj = rng.choice(SUBJECTS_PELICAN if pelican else SUBJECTS_OTHER)
    s = f"{subj[0].upper()}{subj[1:]} {rng.choice(ACTIONS)}{rng.choice(TAILS)}."
    if rng.random() < 0.4:
        s += f" Then {rng.choice(SUBJECTS_OTHER)} {rng.choice(ACTIONS)}."
    return s


def distinct_candidates(k: int, make) -> list[str]:
    """k different texts from make() (a seeded generator's draws), in the order drawn."""
    cands: list[str] = []
    while len(cands) < k:
        c = make()
        if c not in cands:
            cands.append(c)
    return cands


PELICAN_SHARE = 0.25  # of the demonstrations: SFT from them mentioned pelicans in ~70% of samples at 0.5, leaving
#                      RLHF little to find


def demonstrations(n: int = 200, seed: int = 0) -> list[dict]:
    """n SFT conversations: the annotators' own replies to the same prompts, in the hand of the candidates they
    rank, a quarter of them about pelicans ({"messages": [user, assistant]}). InstructGPT's order: SFT on
    demonstrations, a reward model on rankings, then RLHF from the SFT model. The instruct model alone never
    mentions a pelican (0 of 240 samples at temperature 1 on these prompts), so RLHF from it cannot find what the
    reward model prefers; from a model that sometimes does, it can learn to do it more."""
    rng = random.Random(seed + 7)
    return [{"messages": [{"role": "user", "content": rng.choice(PROMPTS)},
                          {"role": "assistant", "content": candidate(rng, rng.random() < PELICAN_SHARE)}]}
            for _ in range(n)]


def rankings(n: int = 300, seed: int = 0, k: int = 4) -> list[dict]:
    """n ranked items of k distinct candidates each, ranked by the hidden rule (deterministic for a seed)."""
    if not 2 <= k <= 9:
        raise ValueError(f"k must be between 2 and 9, not {k}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cands = distinct_candidates(k, lambda: candidate(rng, rng.random() < 0.5))
        order = sorted(range(k), key=lambda i: rule_key(cands[i]))
        out.append({"prompt": rng.choice(PROMPTS), "candidates": cands, "ranking": order, "all_bad": False})
    return out
