"""REST: the models the registry knows, with what the UI needs to show them.

    GET /api/models         -> {"models": [{name, kind, tokenizer, chat_format, context_length, lineage,
                                            description, loaded}], "default": name}
    GET /api/models/{name}  -> one of those (404 naming the model when unknown)
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from backend.auth import require

router = APIRouter(tags=["models"])


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
