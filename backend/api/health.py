"""Liveness and readiness, as load balancers and Kubernetes probe them: /healthz answers as soon as the
HTTP server is up; /readyz answers 200 once the default model is loaded (503 with what is happening before)."""
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from backend.auth import require

router = APIRouter()


@router.get("/healthz", dependencies=[Depends(require("public"))])
def healthz(request: Request) -> dict:
    return request.app.state.pg.health()


@router.get("/readyz", dependencies=[Depends(require("public"))])
def readyz(request: Request):
    state = request.app.state.pg.readiness()
    return JSONResponse(state, status_code=200 if state["ready"] else 503)
