"""REST for labeling under /api: ranking sets and queue, SFT demos, agreement, progress, exports,
imports, snapshots, guidelines. Every route names the least role it admits (backend.auth.require)."""
from __future__ import annotations

import tempfile

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from backend.api.errors import service_errors
from backend.auth import require
from backend.labels import agreement, exchange, guidelines, progress, rankings, sft, snapshots
from backend.labels.candidates import EXAMPLE_PROMPTS
from backend.users import CurrentUser

router = APIRouter(prefix="/api", tags=["labels"])
annotator, operator, admin, learner = require("annotator"), require("operator"), require("admin"), require("learner")


def _pg(request: Request):
    return request.app.state.pg


# ---- guidelines ---------------------------------------------------------------------------

class GuidelinesBody(BaseModel):
    text: str


@router.get("/guidelines")
def get_guidelines(request: Request, user: CurrentUser = Depends(learner)) -> dict:
    return {"text": guidelines.get_guidelines(_pg(request).db)}


@router.put("/guidelines")
def put_guidelines(body: GuidelinesBody, request: Request, user: CurrentUser = Depends(admin)) -> dict:
    with service_errors():
        guidelines.set_guidelines(_pg(request).db, user, body.text)
    return {"ok": True}


# ---- ranking sets ---------------------------------------------------------------------------

class NewRankingSet(BaseModel):
    name: str
    prompts: list[str] = Field(default_factory=list)
    use_examples: bool = False  # add the built-in example prompts ("Write a joke about pelicans", ...)
    # Either candidates (one list per prompt, supplied by the operator) or a model to sample K from.
    candidates: list[list[str]] | None = None
    model: str | None = None
    k: int = 4
    temperature: float = 1.0
    max_tokens: int = Field(200, ge=1, le=2048)
    annotators_per_item: int = 1


@router.get("/ranking-sets")
def list_ranking_sets(request: Request, user: CurrentUser = Depends(annotator)) -> list[dict]:
    return rankings.list_sets(_pg(request).db)


@router.get("/ranking-sets/examples")
def example_prompts(user: CurrentUser = Depends(annotator)) -> list[str]:
    return EXAMPLE_PROMPTS


@router.post("/ranking-sets")
def create_ranking_set(body: NewRankingSet, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    pg = _pg(request)
    prompts = body.prompts + (EXAMPLE_PROMPTS if body.use_examples else [])
    with service_errors():
        if body.candidates is not None:
            return rankings.create_set(pg.db, user, body.name, prompts, body.candidates, model=body.model or "",
                                       temperature=body.temperature, annotators_per_item=body.annotators_per_item)
        if not body.model:
            raise ValueError("give either candidates or a model to sample them from")
        return rankings.create_set_from_model(pg.db, getattr(pg, 'engines', None), user, body.name, prompts, body.model, body.k,
                                              body.temperature, body.annotators_per_item, body.max_tokens)


@router.get("/ranking-sets/{set_id}/progress")
def set_progress(set_id: int, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    with service_errors():
        return progress.set_progress(_pg(request).db, set_id)


@router.get("/ranking-sets/{set_id}/agreement")
def set_agreement(set_id: int, request: Request, method: str = "borda", user: CurrentUser = Depends(operator)) -> dict:
    with service_errors():
        return agreement.set_agreement(_pg(request).db, set_id, method)


# ---- ranking queue --------------------------------------------------------------------------

class RankingBody(BaseModel):
    order: list[int] = Field(default_factory=list, description="candidate ids, best first")
    all_bad: bool = False
    skipped: bool = False


# The two calls an annotator makes per ranking answer with a ready JSONResponse: FastAPI then neither
# walks the dict through jsonable_encoder nor validates a `-> dict` result on a second worker thread.
@router.get("/rankings/next")
def next_ranking_item(request: Request, set_id: int | None = None, user: CurrentUser = Depends(annotator)) -> JSONResponse:
    item = rankings.next_item(_pg(request).db, user, set_id)
    return JSONResponse(item if item is not None else {"done": True, "message": "nothing left to rank"})


@router.get("/rankings/mine")
def my_rankings(request: Request, set_id: int | None = None, user: CurrentUser = Depends(annotator)) -> list[dict]:
    return rankings.my_rankings(_pg(request).db, user, set_id)


@router.get("/rankings/items/{item_id}")
def get_ranking_item(item_id: int, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return rankings.get_item(_pg(request).db, user, item_id)


@router.post("/rankings/items/{item_id}")
def submit_ranking(item_id: int, body: RankingBody, request: Request, user: CurrentUser = Depends(annotator)) -> JSONResponse:
    with service_errors():
        return JSONResponse(rankings.submit(_pg(request).db, user, item_id, body.order, body.all_bad, body.skipped))


# ---- SFT demonstrations ---------------------------------------------------------------------

class SFTPrompts(BaseModel):
    prompts: list[str]
    system: str = ""


class DemoBody(BaseModel):
    messages: list[dict]
    prompt_id: int | None = None
    submit: bool = False


class DraftBody(BaseModel):
    model: str
    messages: list[dict]
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(300, ge=1, le=2048)


@router.post("/sft/prompts")
def add_sft_prompts(body: SFTPrompts, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    with service_errors():
        return {"ids": sft.add_prompts(_pg(request).db, user, body.prompts, body.system)}


@router.get("/sft/next")
def next_sft_prompt(request: Request, user: CurrentUser = Depends(annotator)):
    item = sft.next_prompt(_pg(request).db, user)
    return item if item is not None else JSONResponse({"done": True, "message": "no prompts waiting"})


@router.post("/sft/prompts/{prompt_id}/skip")
def skip_sft_prompt(prompt_id: int, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return sft.skip(_pg(request).db, user, prompt_id)


@router.get("/sft/demos")
def list_my_demos(request: Request, user: CurrentUser = Depends(annotator)) -> list[dict]:
    return sft.list_mine(_pg(request).db, user)


@router.post("/sft/demos")
def create_demo(body: DemoBody, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return sft.save(_pg(request).db, user, body.messages, prompt_id=body.prompt_id, submit=body.submit)


@router.get("/sft/demos/{demo_id}")
def get_demo(demo_id: int, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return sft.get(_pg(request).db, user, demo_id)


@router.put("/sft/demos/{demo_id}")
def update_demo(demo_id: int, body: DemoBody, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return sft.save(_pg(request).db, user, body.messages, demo_id=demo_id, submit=body.submit)


@router.post("/sft/draft")
def draft_with_model(body: DraftBody, request: Request, user: CurrentUser = Depends(annotator)) -> dict:
    with service_errors():
        return {"messages": sft.draft_with_model(getattr(_pg(request), 'engines', None), body.model, body.messages, body.temperature,
                                                  body.max_tokens)}


# ---- data out, data in ----------------------------------------------------------------------

@router.get("/exports/{kind}")
def export_jsonl(kind: str, request: Request, set_id: int | None = None, user: CurrentUser = Depends(operator)):
    with service_errors():
        rows = exchange.export(_pg(request).db, kind, set_id)
    return PlainTextResponse(exchange.to_jsonl(rows), media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="{kind}.jsonl"'})


@router.post("/imports/{kind}")
async def import_jsonl(kind: str, request: Request, name: str = Query("import", max_length=150),
                       user: CurrentUser = Depends(operator)) -> dict:
    # Streamed to a temporary file (memory up to 8 MB, then disk; the body limit is AppConfig.max_import_bytes),
    # then read line by line: a 50 MB file never sits in memory as one string.
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 2**20)
    try:
        async for chunk in request.stream():
            spool.write(chunk)
        spool.seek(0)
        with service_errors():
            try:
                return await run_in_threadpool(exchange.import_lines, _pg(request).db, user, kind, spool, name)
            except exchange.ImportBusy as e:
                raise HTTPException(409, str(e)) from None
    finally:
        spool.close()


class SnapshotBody(BaseModel):
    kind: str
    name: str = ""
    set_id: int | None = None


@router.post("/snapshots")
def create_snapshot(body: SnapshotBody, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    pg = _pg(request)
    with service_errors():
        return snapshots.create_snapshot(pg.db, pg.cfg.data_dir, user, body.kind, body.name, body.set_id,
                                         artifacts_url=pg.cfg.artifacts_url)


@router.get("/snapshots")
def list_snapshots(request: Request, user: CurrentUser = Depends(operator)) -> list[dict]:
    return snapshots.list_snapshots(_pg(request).db)


@router.get("/snapshots/{content_hash}")
def get_snapshot(content_hash: str, request: Request, user: CurrentUser = Depends(operator)) -> dict:
    with service_errors():
        return snapshots.get_snapshot(_pg(request).db, content_hash)
