"""REST: the models the registry knows, with what the UI needs to show them.

    GET    /api/models               -> {"models": [{name, kind, role, tokenizer, chat_format, context_length,
                                                     lineage, description, remote, loaded}], "default": name}
                                     role: chat | base | reward (a reward model scores answers, generates none)
    GET    /api/models/{name}        -> one of those (404 naming the model when unknown)
    POST   /api/models/remote        (admin) register a model an OpenAI-compatible server serves (and queue its
                                     report card, backend/evals, as a job that registers a model does)
    DELETE /api/models/{name}        (admin) delete a model (a remote one: only its registration)
    POST   /api/models/{name}/weights (admin) body: a safetensors file of the model's parameters (a trainer's
                                     push, backend/serving/weight_push.py) -> {model, tensors, version}; the
                                     served model answers with them from its next step (422: names or shapes
                                     do not fit, nothing swapped; 409: a remote or quantized-decode model)
    POST   /api/models/{name}/export (operator) {format: hf|gguf, push_to_hub?} -> {path, url?}: written
                                     under the data directory's exports/ folder
"""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from backend.auth import require
from backend.users import CurrentUser
from models.registry import ModelExists, UnknownModel

router = APIRouter(tags=["models"])


class NewRemote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    base_url: str = Field(min_length=1, max_length=2048)
    model: str = Field(min_length=1, max_length=512)
    api_key_env: str | None = Field(default=None, max_length=128)
    tokenizer: str = Field(default="cl100k_base", min_length=1, max_length=64)
    chat_format: Literal["chatml"] | None = "chatml"
    context_length: int | None = Field(default=None, ge=2, le=10_000_000)
    description: str = Field(default="", max_length=1000)
    check: bool = True


class ExportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["hf", "gguf"] = "hf"
    push_to_hub: str | None = Field(default=None, min_length=3, max_length=200)


def describe(spec, pg) -> dict:
    d = spec.to_dict()
    d["loaded"] = spec.name in pg.engines.loaded()
    return d


@router.get("/api/models", dependencies=[Depends(require("public"))])
def list_models(request: Request) -> dict:
    pg = request.app.state.pg
    return {"models": [describe(s, pg) for s in pg.registry.list()], "default": pg.cfg.default_model}


@router.get("/api/models/{name}", dependencies=[Depends(require("public"))])
def get_model(name: str, request: Request) -> dict:
    pg = request.app.state.pg
    try:
        return describe(pg.registry.get(name), pg)
    except ValueError as e:
        raise HTTPException(404, str(e))


@router.post("/api/models/remote", status_code=201)
def add_remote(body: NewRemote, request: Request, user: CurrentUser = Depends(require("admin"))) -> dict:
    from backend.serving.remote_engine import RemoteError, register_remote
    pg = request.app.state.pg
    try:
        spec = register_remote(pg.registry, body.name, body.base_url, body.model, body.api_key_env, body.tokenizer,
                               body.chat_format, body.context_length, body.description, body.check)
    except ModelExists as e:
        raise HTTPException(409, str(e))
    except RemoteError as e:
        raise HTTPException(502, str(e))
    except (ValueError, LookupError) as e:
        raise HTTPException(422, str(e))
    from backend.evals.job import queue_report_card
    queue_report_card(pg.db, pg.cfg, spec.name, "registered as a remote model")  # graded through its server
    return describe(spec, pg)


@router.delete("/api/models/{name}")
def delete_model(name: str, request: Request, user: CurrentUser = Depends(require("admin"))) -> dict:
    pg = request.app.state.pg
    try:
        pg.registry.delete(name)
    except UnknownModel as e:
        raise HTTPException(404, str(e))
    except ValueError as e:
        raise HTTPException(422, str(e))
    pg.engines.unload(name)
    return {"deleted": name}


@router.post("/api/models/{name}/export")
async def export_model(name: str, body: ExportBody, request: Request,
                       user: CurrentUser = Depends(require("operator"))) -> dict:
    from models.export import HubUnavailable, export_model as export, export_dest
    pg = request.app.state.pg
    try:
        pg.registry.get(name)
        dest = export_dest(pg.cfg, name, body.format)
        return await run_in_threadpool(export, pg.registry, name, dest, body.format, body.push_to_hub)
    except UnknownModel as e:
        raise HTTPException(404, str(e))
    except HubUnavailable as e:
        raise HTTPException(502, str(e))
    except ValueError as e:
        raise HTTPException(422, str(e))


@router.post("/api/models/{name}/weights")
async def push_weights(name: str, request: Request, user: CurrentUser = Depends(require("admin"))) -> dict:
    from backend.serving.weight_push import CannotSwap, swap_weights
    pg = request.app.state.pg
    body = await request.body()  # read only after the caller is known to be an admin
    try:
        engine = await run_in_threadpool(pg.engines.get, name)
        return await run_in_threadpool(swap_weights, engine, body)
    except UnknownModel as e:
        raise HTTPException(404, str(e))
    except CannotSwap as e:
        raise HTTPException(409, str(e))
    except ValueError as e:
        raise HTTPException(422, str(e))
