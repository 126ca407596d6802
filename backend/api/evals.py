"""REST for report cards (backend.evals): the newest card of every model side by side, one model's history,
and a new card queued as a job.

    GET  /api/evals                 -> {"rows": [{key, label, unit}], "models": [{model, values: {key: value|null},
                                        rows: [{key, label, value, n, detail, samples...}], config, seconds,
                                        created_at, job_id, registered}], "without_card": [names]}
    GET  /api/evals/{model}         -> {"model", "cards": [newest first]} (404 naming an unknown model)
    POST /api/evals {"model", "limit"?, "max_tokens"?, "reward_model"?}    (operator) -> 201 the queued eval job

An unknown model (or a reward model) is a 422 naming it, before anything is queued or loaded.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from backend.api.errors import service_errors
from backend.auth import require
from backend.evals.card import MAX_LIMIT
from backend.users import CurrentUser
from models.registry import UnknownModel

router = APIRouter(prefix="/api/evals", tags=["evals"])


class NewCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    limit: int = Field(8, ge=1, le=MAX_LIMIT)
    max_tokens: int = Field(128, ge=8, le=1024)
    reward_model: str = ""


@router.get("", dependencies=[Depends(require("public"))])
def list_cards(request: Request, include_removed: bool = False) -> dict:
    from backend.evals.store import comparison
    pg = request.app.state.pg
    return comparison(pg.db, pg.registry, include_removed)


@router.get("/{model}", dependencies=[Depends(require("public"))])
def model_cards(model: str, request: Request) -> dict:
    from backend.evals.store import model_cards as cards
    pg = request.app.state.pg
    found = cards(pg.db, model)
    if not found:
        try:
            pg.registry.get(model)
        except UnknownModel as e:  # 404 naming the models there are
            raise HTTPException(404, str(e))
    return {"model": model, "cards": found}


@router.post("", status_code=201)
def queue_card(body: NewCard, request: Request, user: CurrentUser = Depends(require("operator"))) -> dict:
    from backend.jobs import queue
    pg = request.app.state.pg
    with service_errors():
        return queue.create_job(pg.db, pg.cfg, user, "eval", body.model_dump())
