"""A report card for every model, like nanochat's report: the same questions asked of each registered model,
stored with it and compared side by side.

    python -m backend.evals MODEL [--limit N]          # prints the card, stores it (backend/evals/__main__.py)
    card = report_card(pg, EvalConfig(model="smollm2-135m-instruct", limit=8))
    GET /api/evals                                      # the newest card of every model (backend/api/evals.py)

Rows (backend/evals/card.py says how each is measured): held-out verifiable problems, tool questions (well-formed
calls, correct answers), "I don't know" on unknowable questions, identity, pelican reward-model score, bits per
byte of held-out text. A job that registers a model queues its card (backend/evals/job.py, kind "eval"), with
a small limit (AppConfig.eval_on_register). Answers come from the app's own engines (the model pool's
scheduler, or the server of a remote model), greedy, so a card is repeatable.
"""
from __future__ import annotations

import threading
import time

from backend.evals.card import LABELS, ROWS, EvalConfig, Stopped, format_value, measure

__all__ = ["EvalConfig", "Stopped", "check_model", "report_card", "render", "ROWS", "LABELS"]


def check_model(registry, cfg: EvalConfig):
    """The model's spec, or ValueError naming what is wrong (an unknown model, a reward model): before any
    weights are loaded."""
    from backend.practice import reward_models
    cfg.validate()
    spec = registry.get(cfg.model)  # UnknownModel (a ValueError) names the models there are
    rms = reward_models(registry)
    if cfg.model in rms:
        raise ValueError(f"model: {cfg.model!r} is a reward model (it scores answers, it does not write them); "
                         "report cards grade chat and base models")
    if cfg.reward_model and cfg.reward_model not in rms:
        raise ValueError(f"reward_model: {cfg.reward_model!r} is not a registered reward model; reward models: "
                         f"{', '.join(rms) or 'none'}")
    return spec


def report_card(pg, cfg: EvalConfig, cancel: threading.Event | None = None, on_row=lambda row: None) -> dict:
    """Every row for cfg.model: {"model", "kind", "config", "rows", "seconds"}. Nothing is stored here."""
    from backend.jobs.kinds import config_dict
    spec = check_model(pg.registry, cfg)
    t0 = time.perf_counter()
    engine = pg.engines.get(cfg.model)
    load_s = time.perf_counter() - t0
    rows = measure(pg, engine, cfg, cancel, on_row)
    config = {k: v for k, v in config_dict(cfg).items() if k not in ("model", "name")}
    return {"model": cfg.model, "kind": spec.kind, "config": config, "rows": rows,
            "load_seconds": round(load_s, 2), "seconds": round(time.perf_counter() - t0, 2)}


def render(card: dict) -> str:
    """The card as a text table (what the CLI prints)."""
    width = max(len(r["label"]) for r in card["rows"])
    lines = [f"report card: {card['model']} ({card['kind']}), {card['config']['limit']} questions per row at most, "
             f"greedy, {card['seconds']:.1f} s",
             f"{'':{width}}  {'value':>8}  {'n':>3}  detail", "-" * (width + 40)]
    for r in card["rows"]:
        lines.append(f"{r['label']:{width}}  {format_value(r):>8}  {r['n']:>3}  {r['detail']}")
    return "\n".join(lines)
