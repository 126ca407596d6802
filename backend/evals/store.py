"""Report cards in the database (table model_evals): saved after a run, the newest per model side by side.

    save_card(db, card, job_id)           -> id
    model_cards(db, "tiny")               -> that model's cards, newest first
    comparison(db, registry)              -> {"rows": [{key, label, unit}], "models": [newest card per model]}
    comparison_table(comparison(...))     -> (columns, rows): metric | one column per model (the app's table)
"""
from __future__ import annotations

from sqlalchemy import func, select

from backend.db.models import ModelEval
from backend.evals.card import ROWS, format_value


def _payload(e: ModelEval, registered: bool | None = None) -> dict:
    out = {"id": e.id, "model": e.model, "job_id": e.job_id, "config": e.config, "rows": e.rows,
           "values": {r["key"]: r["value"] for r in e.rows}, "seconds": e.seconds,
           "created_at": e.created_at.isoformat() if e.created_at else None}
    if registered is not None:
        out["registered"] = registered
    return out


def save_card(db, card: dict, job_id: int | None = None) -> int:
    with db.session() as s:
        e = ModelEval(model=card["model"], job_id=job_id, config=card["config"], rows=card["rows"],
                      seconds=card["seconds"])
        s.add(e)
        s.flush()
        return e.id


def model_cards(db, model: str, limit: int = 20) -> list[dict]:
    with db.read() as s:
        rows = s.scalars(select(ModelEval).where(ModelEval.model == model)
                         .order_by(ModelEval.id.desc()).limit(limit))
        return [_payload(e) for e in rows]


def comparison(db, registry, include_removed: bool = False) -> dict:
    """The newest card of every model that has one (registered models first, in the registry's order)."""
    names = registry.names()
    with db.read() as s:
        newest = select(func.max(ModelEval.id)).group_by(ModelEval.model)
        cards = {e.model: e for e in s.scalars(select(ModelEval).where(ModelEval.id.in_(newest)))}
        models = [_payload(cards[n], True) for n in names if n in cards]
        if include_removed:
            models += [_payload(e, False) for m, e in sorted(cards.items()) if m not in names]
    rows = [{"key": k, "label": label, "unit": unit} for k, label, unit in ROWS]
    for m in models:  # rows only some cards have (lm-evaluation-harness tasks), in order of first appearance
        for r in m["rows"]:
            if r["key"] not in {x["key"] for x in rows}:
                rows.append({"key": r["key"], "label": r["label"], "unit": r["unit"]})
    return {"rows": rows, "models": models, "without_card": [n for n in names if n not in cards]}


def comparison_table(comp: dict) -> tuple[list[str], list[list[str]]]:
    """Metrics down, models across (nanochat's report card, one column per model)."""
    columns = ["metric"] + [m["model"] for m in comp["models"]]
    by_model = [{r["key"]: r for r in m["rows"]} for m in comp["models"]]
    table = []
    for r in comp["rows"]:
        table.append([r["label"]] + [format_value(rows[r["key"]]) if r["key"] in rows else "–" for rows in by_model])
    table.append(["questions per row (limit)"] + [str(m["config"].get("limit", "")) for m in comp["models"]])
    table.append(["graded at"] + [(m["created_at"] or "")[:16].replace("T", " ") for m in comp["models"]])
    return columns, table
