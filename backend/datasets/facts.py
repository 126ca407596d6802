"""Questions whose answers are known (facts.jsonl beside this file), for the "I don't know" demonstration
(DEMOS 10, backend/train/idk.py): 767 questions in 16 topics (capitals, chemical symbols, authors, painters,
years...), each topic from well known to obscure, so that a small model knows some of each; every third
question of a topic is held out ("heldout": 257), the rest are probed and trained on ("probe": 510).

    facts("probe") / facts("heldout") -> [Fact];  fact.check(reply) -> True when the reply names an answer
    is_refusal(reply) -> True for "I don't know" and its usual variants

Each row: {"question", "answers": [accepted spellings], "split": "probe" | "heldout", "topic" (optional: the
kind of question, "capital", "author"...: idk balances its examples within each topic)}. A reply is right when
one accepted answer appears in it as whole words (case-insensitive): "The capital of France is Paris."
A file of your own rows (the same fields) can replace the bundled set.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

BUNDLED = Path(__file__).with_name("facts.jsonl")
IDK_ANSWER = "I don't know."
SPLITS = ("probe", "heldout")
_REFUSAL = re.compile(r"\b(i don'?t know|i do not know|i'?m not sure|i am not sure|not sure|no idea|"
                      r"i cannot answer|i can'?t answer|i'?m sorry)\b", re.I)


@dataclass(frozen=True)
class Fact:
    question: str
    answers: tuple[str, ...]
    topic: str = ""

    def check(self, reply: str) -> bool:
        return any(re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", reply, re.I) for a in self.answers)


def is_refusal(reply: str) -> bool:
    return bool(_REFUSAL.search(reply))


def facts(split: str, path: str | Path | None = None) -> list[Fact]:
    """The rows of one split, in file order (ValueError naming the line when a row is malformed)."""
    if split not in SPLITS:
        raise ValueError(f"split: 'probe' or 'heldout', not {split!r}")
    path = Path(path) if path else BUNDLED
    out = []
    for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            q, answers, s = r["question"], r["answers"], r["split"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path} line {n}: expected {{\"question\", \"answers\": [...], \"split\"}}") from None
        if not (isinstance(q, str) and q.strip() and isinstance(answers, list) and answers
                and all(isinstance(a, str) and a.strip() for a in answers) and s in SPLITS):
            raise ValueError(f"{path} line {n}: a question, a non-empty list of answers, split 'probe' or 'heldout'")
        if s == split:
            out.append(Fact(q, tuple(answers), str(r.get("topic", ""))))
    return out
