"""python -m backend.evals MODEL [--limit N] [--max-tokens N] [--reward-model NAME] [--no-save] [--json]
        [--lm-eval TASKS [--lm-eval-url http://127.0.0.1:7860] [--lm-eval-include DIR]]
   python -m backend.evals                    # no model: the stored cards side by side

Grades a registered model (backend/evals/card.py), prints its report card and stores it in the app's database
(the Models tab and GET /api/evals show it beside the others). Like `python -m backend.models`, it works on the
data directory directly. An unknown model (or a reward model) is refused before anything is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys

from backend.config import AppConfig


def main(argv: list[str] | None = None) -> int:
    from backend.evals import EvalConfig, Stopped, check_model, render, report_card
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="python -m backend.evals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="registry name of the model to grade (none: compare the stored cards)")
    p.add_argument("--limit", type=int, default=d.limit, help=f"questions per row at most (default {d.limit})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"tokens per answer (default {d.max_tokens})")
    p.add_argument("--reward-model", default=d.reward_model, help="for the pelican row (default: the newest one)")
    p.add_argument("--parallel", type=int, default=d.parallel, help=f"tool turns at once (default {d.parallel})")
    p.add_argument("--lm-eval", default="", metavar="TASKS",
                   help="also run these lm-evaluation-harness tasks (comma-separated) through a running server's /v1")
    p.add_argument("--lm-eval-url", default="", help="that server (default http://127.0.0.1:7860)")
    p.add_argument("--lm-eval-include", default="", metavar="DIR", help="a folder of your own task YAMLs")
    p.add_argument("--no-save", dest="save", action="store_false", help="print the card without storing it")
    p.add_argument("--json", action="store_true", help="print the card as JSON (with sample answers)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--data-dir", default=None, help="the app's data directory (default ./data or $PLAYGROUND_HOME)")
    args = p.parse_args(argv)
    app = AppConfig(**({"data_dir": args.data_dir} if args.data_dir else {}), threads=args.threads,
                    start_worker=False, preload=False)
    app.ensure_dirs()
    from models.registry import ModelRegistry
    if args.model is None:
        return compare(app)
    cfg = EvalConfig(model=args.model, limit=args.limit, max_tokens=args.max_tokens, reward_model=args.reward_model,
                     parallel=args.parallel, lm_eval_tasks=[t for t in args.lm_eval.split(",") if t.strip()],
                     lm_eval_url=args.lm_eval_url, lm_eval_include=args.lm_eval_include)
    try:
        check_model(ModelRegistry(app), cfg)  # before the database, the sandbox or any weights
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from backend.playground import Playground
    pg = Playground(app)
    try:
        card = report_card(pg, cfg, on_row=lambda r: print(f"  {r['label']}: {r['detail']} ({r['seconds']} s)",
                                                            file=sys.stderr, flush=True))
        if args.save:
            from backend.evals.store import save_card
            card["id"] = save_card(pg.db, card)
    except (ValueError, Stopped) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for name in pg.engines.loaded():
            pg.engines.unload(name)
        pg.db.close()
    print(json.dumps(card, indent=2) if args.json else render(card))
    if args.save and not args.json:
        print(f"stored as report card {card['id']} of {card['model']} in {app.database_url}")
    return 0


def compare(app: AppConfig) -> int:
    from backend.db import Database
    from backend.evals.store import comparison, comparison_table
    from models.registry import ModelRegistry
    db = Database(app.database_url)
    db.migrate()
    try:
        comp = comparison(db, ModelRegistry(app))
    finally:
        db.close()
    if not comp["models"]:
        print("no report cards yet: python -m backend.evals MODEL")
        return 0
    columns, rows = comparison_table(comp)
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    for line in [columns, *rows]:
        print("  ".join(f"{str(x):{w}}" for x, w in zip(line, widths)))
    if comp["without_card"]:
        print(f"without a card: {', '.join(comp['without_card'])}")
    return 0


if __name__ == "__main__":
    from backend.runtime import exit_process
    exit_process(main())
