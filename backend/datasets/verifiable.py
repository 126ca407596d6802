"""Practice problems with exact answers (the R1 recipe's "verifiable rewards"), generated offline.

    problems(200, seed=0, kinds=("apples", "count", "spell"), scale="small") -> [Problem]
    p.check("... <think>...</think> The answer is 7.")  -> True / False

Kinds:
  apples  Emily-style word problems (the Deep Dive's example): "Emily buys 3 apples and 2 oranges. Each
          orange costs $2. The total cost of all the fruit is $13. What is the cost of each apple?"
          and simpler totals ("Emily has 4 apples and buys 5 more..."). scale small: numbers up to 10;
          large: up to 200 (23 apples and 177 oranges).
  totals  only the simpler totals (one addition or subtraction)
  count   how many times a letter appears in a word ("strawberry" has 3 r's)
  spell   every n-th letter of a word ("ubiquitous", every third letter: "iio")

The checker reads the final answer: inside <answer>...</answer> when present, else the text after
</think>, else what follows the last "the answer is" / "answer:"; numbers compare as the last number in
it, words as the last word (letters only, case-insensitive). A reply that states no answer is wrong
(strict, the reward); check(reply, lenient=True) then reads the last number (word) of the whole reply. gsm8k(split) fetches GSM8K when online.
"""
from __future__ import annotations

import json
import random
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

WORDS = ["strawberry", "ubiquitous", "banana", "mississippi", "pelican", "committee", "bookkeeper", "parallel",
         "occurrence", "tokenizer", "assistant", "pretraining", "embedding", "transformer", "reinforcement",
         "apple", "orange", "letter", "balloon", "success", "necessary", "address", "coffee", "raccoon",
         "chocolate", "keyboard", "penguin", "giraffe", "elephant", "mountain", "umbrella", "dictionary"]
NAMES = ["Emily", "Tom", "Aisha", "Lucas", "Mei", "Omar", "Sofia", "Noah"]
FRUITS = [("apple", "apples"), ("orange", "oranges"), ("pear", "pears"), ("banana", "bananas")]


@dataclass
class Problem:
    question: str
    answer: str          # the exact answer: an integer as text, or letters
    kind: str            # "apples" | "count" | "spell" | "gsm8k"
    solution: str = ""   # worked steps that end in the answer (for SFT before RL)
    short: str = ""      # the answer stated at a glance, no steps (the terse thinking of SFT's mixed set)

    def check(self, reply: str, lenient: bool = False) -> bool:
        got = extract_answer(reply, numeric=self.answer.lstrip("-").isdigit(), lenient=lenient)
        return got is not None and got == self.answer.lower()

    def to_dict(self) -> dict:
        return asdict(self)


# R1-Zero's template, in chat form: GRPO's and the reasoning SFT set's system prompt, and a Chat preset.
THINK_SYSTEM = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
                "The assistant first thinks about the reasoning process in the mind and then provides the user "
                "with the answer. The reasoning process is enclosed within <think> </think>, followed by the "
                "answer, i.e., <think> reasoning process here </think> The answer is 42.")

ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\**\$?\s*(-?\d[\d,]*(?:\.\d+)?|[A-Za-z]+)", re.I)


def final_part(reply: str) -> str | None:
    """Where the final answer is: inside <answer>...</answer>, after </think>, or after "the answer is";
    None when the reply states no answer (a truncated or rambling reply earns no accuracy reward)."""
    m = re.search(r"<answer>(.*?)</answer>", reply, re.S)
    if m:
        return m.group(1)
    if "</think>" in reply:
        return reply.rsplit("</think>", 1)[1]
    hits = ANSWER_IS.findall(reply)
    return hits[-1] if hits else None


def extract_answer(reply: str, numeric: bool, lenient: bool = False) -> str | None:
    """The stated final answer; lenient: when none is stated, the last number (or word) of the whole reply,
    so an evaluation can tell "learned the answer" from "learned to state it"."""
    part = final_part(reply)
    if part is None:
        if not lenient:
            return None
        part = reply
    if numeric:
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", part)
        if not nums:
            return None
        n = nums[-1].replace(",", "")
        return n[:-2] if n.endswith(".0") else n.rstrip(".")
    words = re.findall(r"[A-Za-z]+", part)
    return words[-1].lower() if words else None


def format_ok(reply: str) -> bool:
    """R1-Zero's format: reasoning inside <think>...</think>, then a non-empty answer after it."""
    m = re.fullmatch(r"\s*<think>(.+?)</think>\s*(.+)", reply, re.S)
    return bool(m) and "<think>" not in m.group(2)


def _limit(scale: str) -> int:
    if scale not in ("small", "large"):
        raise ValueError(f"scale must be 'small' or 'large', not {scale!r}")
    return 10 if scale == "small" else 200


def apples(rng: random.Random, scale: str = "small") -> Problem:
    hi = _limit(scale)
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        (s1, p1), (s2, p2) = rng.sample(FRUITS, 2)
        a, o = rng.randint(1, hi), rng.randint(1, hi)
        pa, po = rng.randint(1, 9), rng.randint(1, 9)
        total = a * pa + o * po
        q = (f"{name} buys {a} {p1 if a > 1 else s1} and {o} {p2 if o > 1 else s2}. Each {s2} costs ${po}. "
             f"The total cost of all the fruit is ${total}. What is the cost of each {s1}?")
        sol = (f"The {p2} cost {o} * {po} = {o * po}. The {p1} cost {total} - {o * po} = {total - o * po}. "
               f"Each {s1} costs {total - o * po} / {a} = {pa}.")
        return Problem(q, str(pa), "apples", sol, f"Each {s1} costs {pa}.")
    return totals(rng, scale, name, "apples")


def totals(rng: random.Random, scale: str = "small", name: str | None = None, kind: str = "totals") -> Problem:
    """One addition or subtraction in words ("Emily has 4 apples and buys 5 more..."): the easy half of apples."""
    hi, name = _limit(scale), name or rng.choice(NAMES)
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    s, p = rng.choice(FRUITS)
    if rng.random() < 0.5:
        q = f"{name} has {a} {p} and buys {b} more. How many {p} does {name} have now?"
        return Problem(q, str(a + b), kind, f"{a} + {b} = {a + b}.", f"{name} has {a + b} {p} now.")
    big, small = max(a, b), min(a, b)
    q = f"{name} has {big} {p} and gives away {small}. How many {p} are left?"
    return Problem(q, str(big - small), kind, f"{big} - {small} = {big - small}.", f"{big - small} {p} are left.")


def count(rng: random.Random, scale: str = "small") -> Problem:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    n = word.count(letter)
    q = f"How many times does the letter '{letter}' appear in the word '{word}'?"
    sol = f"Spelled out: {'-'.join(word)}. The letter '{letter}' appears {n} time{'s' if n != 1 else ''}."
    return Problem(q, str(n), "count", sol, f"'{word}' has {n} '{letter}'.")


def spell(rng: random.Random, scale: str = "small") -> Problem:
    word = rng.choice([w for w in WORDS if len(w) >= 6])
    k = rng.choice([2, 3])
    ans = word[k - 1::k]
    nth = {2: "second", 3: "third"}[k]
    q = f"What do you get if you take every {nth} letter of the word '{word}', starting with letter number {k}?"
    sol = f"Spelled out: {'-'.join(word)}. Every {nth} letter: {'-'.join(ans)}. Together: {ans}."
    return Problem(q, ans, "spell", sol, f"Every {nth} letter of '{word}' gives {ans}.")


GENERATORS = {"apples": apples, "totals": totals, "count": count, "spell": spell}


def check_kinds(kinds, also: tuple[str, ...] = ()) -> None:
    """Refuse an empty list or a kind that is not a generator (nor one of `also`, such as "gsm8k"), by name."""
    names = (*GENERATORS, *also)
    bad = [k for k in kinds if k not in names]
    if bad or not kinds:
        raise ValueError(f"kinds: unknown problem kind {bad[0] if bad else None!r}; kinds: {', '.join(names)}")


def problems(n: int, seed: int = 0, kinds: tuple[str, ...] | list[str] = ("apples", "count", "spell"),
             scale: str = "small") -> list[Problem]:
    """n problems, deterministic for a seed (different seeds: the train and held-out sets)."""
    check_kinds(kinds)
    _limit(scale)
    rng = random.Random(seed)
    return [GENERATORS[kinds[i % len(kinds)]](rng, scale) for i in range(n)]


# -- GSM8K (online only) -----------------------------------------------------------------------------
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"


class DatasetUnavailable(ValueError):
    pass


def fetch_text(url: str, timeout: float = 30.0) -> str:
    """The one network call of this module (tests replace it)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8")


def gsm8k(split: str = "test") -> list[Problem]:
    """GSM8K (Cobbe et al. 2021) from OpenAI's repository; answers are the number after '####'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    url = GSM8K_URL.format(split=split)
    try:
        text = fetch_text(url)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DatasetUnavailable(f"GSM8K needs the network and {url} could not be fetched ({e}); "
                                 "offline, use the bundled problems (kinds apples, count, spell)") from None
    out = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            steps, _, ans = row["answer"].rpartition("####")
            out.append(Problem(row["question"], ans.strip().replace(",", ""), "gsm8k", steps.strip()))
    return out
