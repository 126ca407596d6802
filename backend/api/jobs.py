"""REST for training jobs under /api. Operators and admins start, cancel and resume; anyone signed in watches.

    POST /api/jobs               {"kind": "pretrain", "config": {...}, "snapshot": HASH?, "device": "cpu"?} -> 201 job
    GET  /api/jobs               -> {"jobs": [job, ...]} newest first
    GET  /api/jobs/kinds         -> {"kinds": [{"kind", "description", "fields": [{name, type, default}]}]}
    GET  /api/jobs/{id}?after=N  -> job + metrics, samples, checkpoints, log tail (events with id > N);
                                    an RLHF job also "reward_hacking" (backend/train/hacking.py)
    POST /api/jobs/{id}/cancel   -> job (stops after the current step, keeping a checkpoint)
    POST /api/jobs/{id}/resume   {"config": {overrides}}? -> job (queued again; continues its last checkpoint)

A bad config is a 422 whose detail names the key.
"""
from __future__ import annotations


from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, ConfigDict

from backend.api.errors import service_errors
from backend.auth import require
from backend.jobs import kinds, queue
from backend.users import CurrentUser

router = APIRouter(prefix="/api", tags=["jobs"])
operator, learner = require("operator"), require("learner")


class NewJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    config: dict = {}
    snapshot: str | None = None
    device: str | None = None


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: dict | None = None


@router.post("/jobs", status_code=201)
def create(body: NewJob, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    pg = request.app.state.pg
    with service_errors():
        return queue.create_job(pg.db, pg.cfg, user, body.kind, body.config, body.snapshot, body.device)


@router.get("/jobs")
def list_jobs(request: Request, limit: int = Query(100, ge=1, le=1000), user: CurrentUser = Depends(learner)) -> dict:
    return {"jobs": queue.list_jobs(request.app.state.pg.db, limit)}


@router.get("/jobs/kinds")
def list_kinds(user: CurrentUser = Depends(learner)) -> dict:
    return {"kinds": [{"kind": k, "description": kinds.get_trainer(k).description,
                       "fields": kinds.json_safe(kinds.config_fields(k))} for k in kinds.kinds()]}


@router.get("/jobs/{job_id}")
def get_job(job_id: int, request: Request, after: int = Query(0, ge=0), user: CurrentUser = Depends(learner)) -> dict:
    with service_errors():
        return queue.job_detail(request.app.state.pg.db, job_id, after)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: int, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    with service_errors():
        return queue.cancel_job(request.app.state.pg.db, job_id, user)


@router.post("/jobs/{job_id}/resume")
def resume(job_id: int, request: Request, body: ResumeBody | None = Body(None), user: CurrentUser = Depends(operator)) -> dict:
    pg = request.app.state.pg
    with service_errors():
        return queue.resume_job(pg.db, pg.cfg, job_id, user, body.config if body else None)
