"""Report cards as jobs (kind "eval"), so the worker grades a model the moment a job registers it.

    queue_report_card(db, app, "sft-j12", why="registered by job 12")   # what the worker calls
    POST /api/jobs {"kind": "eval", "config": {"model": "sft-j12", "limit": 8}}  # or any other door

The job builds the app's own services (backend.playground.Playground: the model pool, the sandbox, the search
index) in the worker process, stores the card (backend/evals/store.py) and reports each row as a metric, so
the Training tab shows its progress like any job. It registers no model, so it never queues another card.
"""
from __future__ import annotations

import logging

from backend.evals.card import EvalConfig, Stopped
from backend.jobs.kinds import JobContext, Outcome, trainer

log = logging.getLogger(__name__)


def check(cfg: EvalConfig, app) -> None:
    """Before queueing: the model exists and is not a reward model (the same check as the CLI)."""
    from backend.evals import check_model
    from models.registry import ModelRegistry
    try:
        check_model(ModelRegistry(app), cfg)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(("model:", "reward_model:")) else f"model: {e}") from None


def run_eval(cfg: EvalConfig, ctx: JobContext) -> Outcome:
    from backend.evals import report_card
    from backend.evals.card import ROWS
    from backend.evals.store import save_card
    from backend.playground import Playground
    keys = [k for k, _, _ in ROWS]
    ctx.emit({"step": 0, "phase": f"loading {cfg.model}…"})
    pg = Playground(ctx.app)
    try:
        def on_row(r: dict) -> None:
            step = keys.index(r["key"]) + 1
            if r["value"] is not None:
                ctx.emit({"step": step, r["key"]: r["value"]})
            ctx.log(f"{r['label']}: {r['detail']}")

        try:
            card = report_card(pg, cfg, cancel=ctx.stop, on_row=on_row)
        except Stopped:
            return Outcome("stopped", 0)
        card_id = save_card(pg.db, card, ctx.job_id)
        ctx.log(f"report card {card_id} of {cfg.model} stored ({card['seconds']:.1f} s)")
        return Outcome("graded", len(keys), summary={r["key"]: r["value"] for r in card["rows"]})
    finally:
        for name in pg.engines.loaded():
            pg.engines.unload(name)
        pg.db.close()


trainer("eval", EvalConfig, "report card: grade a registered model (problems, tools, I don't know, identity, "
        "pelican RM score, bits per byte) and store it", check=check,
        default_name=lambda cfg, job_id: f"eval-{cfg.model}-j{job_id}", trains=False)(run_eval)


def queue_report_card(db, app, model: str, why: str = "") -> dict | None:
    """Queue a small report card of a newly registered model (AppConfig.eval_on_register questions per row;
    0 turns this off). None when off or when the model is a reward model (it writes no answers to grade).
    Never raises: the registration that called it has happened either way."""
    from backend.jobs import queue
    from backend.practice import reward_models
    from models.registry import ModelRegistry
    limit = int(getattr(app, "eval_on_register", 0) or 0)
    try:
        if limit <= 0 or model in reward_models(ModelRegistry(app)):
            return None
        job = queue.create_job(db, app, None, "eval", {"model": model, "limit": limit})
    except Exception:  # noqa: BLE001 - a busy database, a model deleted meanwhile: logged, not fatal
        log.exception("could not queue the report card of %s", model)
        return None
    log.info("queued report card job %s for %s%s", job["id"], model, f" ({why})" if why else "")
    return job
