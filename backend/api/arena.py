"""REST for the Arena (backend.arena): blind battles, one vote each, and the leaderboard.

    POST /api/arena/battles {"prompt", "models"?: [names], "temperature"=0.7, "top_p"=0.95, "max_tokens"=256,
                             "seed"?, "stream"=false}                              learner
         -> {"id", "prompt", "status": "ready", "answer_a", "answer_b", "model_a": null, "model_b": null, ...}
         stream: SSE events {"side": "a"|"b", "delta"} then {"battle": {...}}, ending in data: [DONE]
    GET  /api/arena/battles/{id}                                                   learner (the battle's owner)
    POST /api/arena/battles/{id}/follow-up {"prompt", "stream"=false}              learner (the owner, before the vote)
         -> the battle answered again, each model continuing its own conversation; "turns" holds the earlier ones
    POST /api/arena/battles/{id}/vote {"winner": "a"|"b"|"tie"|"both_bad"}         learner (the owner, once)
         -> the battle with "winner", "model_a" and "model_b" revealed
    GET  /api/arena/leaderboard?bootstrap=100&seed=0&k=32                          anyone
         -> {"votes", "rows": [{model, rating, ci_low, ci_high, rank, elo, battles, wins, losses, ties,
             win_rate}], "win_rate": {"models", "rate", "battles"}, "method"}

Without "models" the two models are drawn from every registered chat model. Errors: 422 names the field
(an empty prompt, a base model, fewer than two models, a second vote, a vote before the answers); 404 an
unknown battle; 403 someone else's battle; 503 a model that does not load.
"""
from __future__ import annotations

import asyncio
import threading

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from backend.api.errors import service_errors
from backend.api.openai_api import sse_stream
from backend.arena import battles as arena
from backend.auth import require
from backend.serving.engine import aiterate
from backend.users import CurrentUser

router = APIRouter(prefix="/api/arena", tags=["arena"])
learner = require("learner")


def arena_errors():
    return service_errors(unavailable=(arena.ModelUnavailable,))


class NewBattle(BaseModel):
    prompt: str = Field(min_length=1, max_length=arena.MAX_PROMPT_CHARS)
    models: list[str] | None = None
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, le=arena.MAX_TOKENS)
    seed: int | None = None
    stream: bool = False


class FollowUp(BaseModel):
    prompt: str = Field(min_length=1, max_length=arena.MAX_PROMPT_CHARS)
    stream: bool = False


class Vote(BaseModel):
    winner: str = Field(pattern="^(a|b|tie|both_bad)$")


@router.post("/battles")
async def new_battle(body: NewBattle, request: Request, user: CurrentUser = Depends(learner)):
    pg = request.app.state.pg
    with arena_errors():
        params = arena.sampling_params(body.temperature, body.top_p, body.max_tokens, body.seed)
        battle = await asyncio.to_thread(arena.start_battle, pg, user, body.prompt, body.models, params)
    return await answered(pg, user, battle, body.stream)


@router.post("/battles/{battle_id}/follow-up")
async def follow_up(battle_id: int, body: FollowUp, request: Request, user: CurrentUser = Depends(learner)):
    pg = request.app.state.pg
    with arena_errors():
        battle = await asyncio.to_thread(arena.follow_up, pg, user, battle_id, body.prompt)
    return await answered(pg, user, battle, body.stream)


async def answered(pg, user, battle: dict, stream: bool):
    """The battle's current turn answered: the battle when done, or (stream) its SSE events."""
    cancel = threading.Event()
    events = arena.answer_events(pg, user, battle["id"], cancel)
    if not stream:
        with arena_errors():
            async for _ in aiterate(events, cancel):  # on the engine thread; a client gone cancels the battle
                pass
            return await asyncio.to_thread(arena.get_battle, pg, user, battle["id"])

    async def chunks():
        yield {"battle": battle}
        async for side, delta in aiterate(events, cancel):
            yield {"side": side, "delta": delta}
        yield {"battle": await asyncio.to_thread(arena.get_battle, pg, user, battle["id"])}
    return sse_stream(chunks())


@router.get("/battles/{battle_id}")
def get_battle(battle_id: int, request: Request, user: CurrentUser = Depends(learner)) -> dict:
    with arena_errors():
        return arena.get_battle(request.app.state.pg, user, battle_id)


@router.post("/battles/{battle_id}/vote")
def vote(battle_id: int, body: Vote, request: Request, user: CurrentUser = Depends(learner)) -> dict:
    with arena_errors():
        return arena.vote(request.app.state.pg, user, battle_id, body.winner)


@router.get("/leaderboard", dependencies=[Depends(require("public"))])
def leaderboard(request: Request, bootstrap: int = 100, seed: int = 0, k: float = 32.0) -> dict:
    with arena_errors():
        return arena.leaderboard(request.app.state.pg.db, bootstrap, seed, k)
