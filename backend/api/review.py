"""REST for label review under /api (backend.labels.review): annotators and above review others' demos and flag
candidates, the same service as the Labeling tab's Review view.

    GET  /api/review/next                 -> the oldest pending demo you did not write, or {"done": true}
    GET  /api/review/counts               -> {"pending": n, "accepted": n, "rejected": n}
    POST /api/review/{demo_id}            {"decision": "accept"|"reject", "note"?, "messages"? (an edit)} -> demo
    POST /api/candidates/{id}/flags       {"flag": "spam"|"unsafe"|"off-topic", "on": true} -> {"flags": [...]}
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from backend.api.errors import service_errors
from backend.auth import require
from backend.labels import review
from backend.users import CurrentUser

router = APIRouter(prefix="/api", tags=["review"])
annotator = require("annotator")


class ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: str
    note: str = ""
    messages: list | None = None


class FlagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flag: str
    on: bool = True


@router.get("/review/next")
def next_demo(request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    return review.next_for_review(request.app.state.pg.db, user) or {"done": True}


@router.get("/review/counts")
def counts(request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    return review.review_counts(request.app.state.pg.db)


@router.post("/review/{demo_id}")
def review_demo(demo_id: int, body: ReviewBody, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return review.review_demo(request.app.state.pg.db, user, demo_id, body.decision, body.note, body.messages)


@router.post("/candidates/{candidate_id}/flags")
def flag(candidate_id: int, body: FlagBody, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return {"flags": review.flag_candidate(request.app.state.pg.db, user, candidate_id, body.flag, body.on)}
