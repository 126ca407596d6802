from fastapi import APIRouter, Depends, Request

from backend.auth import require

router = APIRouter()


@router.get("/healthz", dependencies=[Depends(require("public"))])
def healthz(request: Request) -> dict:
    return request.app.state.pg.health()
