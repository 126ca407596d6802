"""REST for practice problems and inference-time scaling (backend.practice).

    GET  /api/practice/problems?kind=apples&seed=0&n=1&scale=small     -> {"kinds", "problems": [{question, answer, kind, solution}]}
    GET  /api/practice/reward-models                                   -> {"reward_models": [names]}
    POST /api/practice/sample  {"model", "problem": {"question", "answer"} | "kind" + "problem_seed",
                                "n"=8, "temperature"=0.8, "top_p"=1, "max_tokens"=256, "seed"?, "template"="plain",
                                "reward_model"?}                                                          learner
         -> {"solutions": [{index, text, answer, right, tokens, finish_reason, score?}], "pass_at_1", "tally",
             "majority", "curve": [{k, pass_at_k, majority_at_k, best_of_k?}], "best_of_n"?, "seed", ...}
    POST /api/practice/scaling {"model", "kind", "m"=5, "problem_seed"=0, "scale"="small", same sampling fields}   learner
         -> {"curve": [{k, pass_at_k, majority_at_k, best_of_k?}] averaged over m problems, "problems": [...], ...}

Errors: 422 names the field (a bad answer, an unknown kind, a base model, n out of range); 401 without a login.
A client that disconnects stops the sampling at the next token (nothing is graded).
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from backend import practice as svc
from backend.api.errors import service_errors
from backend.api.openai_api import run_blocking
from backend.auth import require
from backend.users import CurrentUser

router = APIRouter(prefix="/api/practice", tags=["practice"])
learner = require("learner")


class TypedProblem(BaseModel):
    question: str = Field(min_length=1, max_length=8000)
    answer: str = Field(min_length=1, max_length=100)


class Sampling(BaseModel):
    model: str = Field(min_length=1)
    n: int = Field(8, ge=1, le=svc.MAX_N)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, le=svc.MAX_TOKENS)
    seed: int | None = None
    template: str = Field("plain", pattern="^(plain|think)$")
    reward_model: str | None = None
    lenient: bool = False

    def config(self) -> svc.PracticeConfig:
        return svc.PracticeConfig(self.n, self.temperature, self.top_p, self.max_tokens, self.seed, self.template,
                                  self.reward_model or None, self.lenient)


class SampleRequest(Sampling):
    problem: TypedProblem | None = None
    kind: str | None = None          # a bundled problem instead of a typed one
    problem_seed: int = 0
    scale: str = "small"


class ScalingRequest(Sampling):
    kind: str = "apples"
    m: int = Field(5, ge=1, le=svc.MAX_PROBLEMS)
    problem_seed: int = 0
    scale: str = "small"


@router.get("/problems", dependencies=[Depends(require("public"))])
def problems(kind: str = "apples", seed: int = 0, n: int = 1, scale: str = "small") -> dict:
    with service_errors():
        if not 1 <= n <= 100:
            raise ValueError(f"n must be from 1 to 100, got {n}")
        from backend.datasets.verifiable import problems as generate
        return {"kinds": svc.problem_kinds(), "problems": [p.to_dict() for p in generate(n, seed, [kind], scale)]}


@router.get("/reward-models", dependencies=[Depends(require("public"))])
def reward_models(request: Request) -> dict:
    return {"reward_models": svc.reward_models(request.app.state.pg.registry)}


@router.post("/sample")
async def sample(body: SampleRequest, request: Request, user: CurrentUser = Depends(learner)) -> dict:
    with service_errors(unavailable=(svc.Stopped,)):
        if (body.problem is None) == (body.kind is None):
            raise ValueError("problem: send either a typed problem {question, answer} or a bundled problem kind")
        problem = (svc.typed_problem(body.problem.question, body.problem.answer) if body.problem is not None
                   else svc.generated_problem(body.kind, body.problem_seed, body.scale))
        return await run_blocking(request, lambda cancel: svc.practice(request.app.state.pg, body.model, problem,
                                                                       body.config(), cancel))


@router.post("/scaling")
async def scaling(body: ScalingRequest, request: Request, user: CurrentUser = Depends(learner)) -> dict:
    with service_errors(unavailable=(svc.Stopped,)):
        return await run_blocking(request, lambda cancel: svc.scaling_curve(
            request.app.state.pg, body.model, body.kind, body.m, body.problem_seed, body.config(), body.scale, cancel))
