"""Does an answer say which model wrote it? Such a vote is not blind, so it is set aside from the leaderboard
(stored and shown, never counted), as Chatbot Arena filters votes whose answers reveal a model's identity.

A model's names: its registry name, matched as a whole word as written (registry names are lowercase, so
"Alpha answers" does not name a model called "alpha"), and its family, matched in any case: the leading
letters of the source its lineage descends from ("HuggingFaceTB/SmolLM2-135M-Instruct" gives "SmolLM"; a
served model's remote id likewise; a trained model inherits its parent's family).
"""
from __future__ import annotations

import re

MIN_FAMILY = 3  # a family name shorter than this would match ordinary words


def family(registry, name: str, depth: int = 8) -> str | None:
    """The family name of a registered model, following parent_model up its lineage; None when unknown."""
    for _ in range(depth):
        try:
            spec = registry.get(name)
        except ValueError:
            return None
        source = spec.lineage.get("source") or (spec.remote or {}).get("model")
        if source:
            m = re.match(r"[A-Za-z]+", source.rsplit("/", 1)[-1])
            return m.group(0) if m and len(m.group(0)) >= MIN_FAMILY else None
        name = spec.lineage.get("parent_model")
        if not name:
            return None
    return None


def named_in(text: str, registry, models: list[str]) -> str | None:
    """The first of `models` that `text` names (registry name or family), as "NAME" or "NAME (family F)"."""
    for name in models:
        if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", text or ""):
            return name
        fam = family(registry, name)
        if fam and re.search(rf"\b{re.escape(fam)}", text or "", re.IGNORECASE):
            return f"{name} (family {fam})"
    return None


def identity_leak(registry, answers: dict[str, str], models: list[str]) -> str | None:
    """Why the vote is set aside ("answer A names smollm2-135m-instruct (family SmolLM)"), or None when neither
    answer names either model of the battle."""
    for side, text in answers.items():
        hit = named_in(text, registry, models)
        if hit:
            return f"answer {side.upper()} names {hit}"
    return None
