"""REST for the completion playground (backend.completion): raw completions with probabilities.

    POST /api/completion/distribution {model, prompt | prompt_ids, temperature, top_k, top_p, seed, top_n}
         -> next-token distribution before (raw) and after (filtered) temperature/top-k/top-p, the coin flip
    POST /api/completion/step         same body -> the distribution plus the picked token and the extended prompt_ids
    POST /api/completion/generate     {model, prompt | prompt_ids, temperature, top_k, top_p, seed, max_tokens, stop}
         -> {prompt_ids, tokens: [{id, text, prob, logprob, top: [{id, text, prob}]}], text, finish_reason}
    POST /api/completion/branch       {model, prefix_ids, token_id, ...sampling} -> tokens[0] is token_id, then the continuation
    POST /api/completion/score        {model, text} -> per-token log-probs, total, perplexity
    POST /api/completion/regurgitation {model, n_samples, max_new_tokens, temperature, prompt}
         -> longest span copied verbatim from the model's own training text (models pretrained here)
    GET  /api/completion/presets      -> the Deep Dive base-model demos

Prompts are raw text (no chat template). Errors: unknown model 404; bad fields 422 naming the field.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field, model_validator

from backend import completion as svc
from backend.auth import require
from backend.presets_completion import BASE_MODEL_NOTE, presets
from backend.serving.sampling import SamplingParams
from models.registry import UnknownModel, WrongRole

router = APIRouter(tags=["completion"])

MAX_API_TOKENS = 1024
MAX_TEXT_CHARS = 200_000


class Shaping(BaseModel):
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=5)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


class PromptRequest(Shaping):
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="raw text (no chat template)")
    prompt_ids: list[int] | None = Field(None, description="token ids instead of prompt")

    @model_validator(mode="after")
    def one_prompt(self):
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt or prompt_ids")
        return self


class DistributionRequest(PromptRequest):
    top_n: int = Field(svc.TOP_N, ge=1, le=svc.MAX_TOP_N)


class GenerateRequest(PromptRequest):
    max_tokens: int = Field(64, ge=1, le=MAX_API_TOKENS)
    stop: list[str] = Field(default_factory=list, max_length=16)
    top_logprobs: int = Field(svc.TOP_ALTERNATIVES, ge=0, le=50)


class BranchRequest(Shaping):
    prefix_ids: list[int] = Field(min_length=1)
    token_id: int
    max_tokens: int = Field(64, ge=1, le=MAX_API_TOKENS)
    stop: list[str] = Field(default_factory=list, max_length=16)
    top_logprobs: int = Field(svc.TOP_ALTERNATIVES, ge=0, le=50)


class ScoreRequest(BaseModel):
    model: str = Field(min_length=1)
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class RegurgitationRequest(BaseModel):
    model: str = Field(min_length=1)
    n_samples: int = Field(4, ge=1, le=32)
    max_new_tokens: int = Field(64, ge=1, le=512)
    temperature: float = Field(0.8, ge=0, le=5)
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    seed: int = 0


def _engine(request: Request, name: str):
    try:
        return request.app.state.pg.engines.get(name)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None
    except WrongRole as e:  # a reward model generates no text
        raise HTTPException(422, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a model on disk that does not load is the server's problem, said plainly
        raise HTTPException(503, f"model {name!r} could not be loaded: {e}") from None


def _params(req, max_tokens: int = 1) -> SamplingParams:
    stop = [s for s in getattr(req, "stop", []) if s]
    return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                          max_tokens=max_tokens, stop=stop)


def _prompt_ids(engine, req: PromptRequest) -> list[int]:
    return svc.encode_prompt(engine, req.prompt) if req.prompt is not None else req.prompt_ids


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:  # the services name the field or the problem
        raise HTTPException(422, str(e)) from None


# Plain `def` routes: FastAPI runs them in its thread pool, off the event loop.
@router.post("/api/completion/distribution", dependencies=[Depends(require("inference"))])
def distribution(req: DistributionRequest, request: Request) -> dict:
    engine = _engine(request, req.model)
    return _call(lambda: svc.next_token_distribution(engine, _prompt_ids(engine, req), _params(req), req.seed, req.top_n))


@router.post("/api/completion/step", dependencies=[Depends(require("inference"))])
def step(req: DistributionRequest, request: Request) -> dict:
    engine = _engine(request, req.model)
    return _call(lambda: svc.step(engine, _prompt_ids(engine, req), _params(req), req.seed, req.top_n))


@router.post("/api/completion/generate", dependencies=[Depends(require("inference"))])
def generate(req: GenerateRequest, request: Request) -> dict:
    engine = _engine(request, req.model)
    return _call(lambda: svc.generate_tokens(engine, _prompt_ids(engine, req), _params(req, req.max_tokens),
                                             req.top_logprobs))


@router.post("/api/completion/branch", dependencies=[Depends(require("inference"))])
def branch(req: BranchRequest, request: Request) -> dict:
    engine = _engine(request, req.model)
    return _call(svc.continue_from, engine, req.prefix_ids, req.token_id, _params(req, req.max_tokens),
                 req.top_logprobs)


@router.post("/api/completion/score", dependencies=[Depends(require("inference"))])
def score(req: ScoreRequest, request: Request) -> dict:
    engine = _engine(request, req.model)
    return _call(svc.score_text, engine, req.text)


@router.post("/api/completion/regurgitation", dependencies=[Depends(require("inference"))])
def regurgitation(req: RegurgitationRequest, request: Request) -> dict:
    from backend.train.regurgitation import measure_for_model
    pg = request.app.state.pg
    try:
        pg.registry.get(req.model)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None
    return _call(measure_for_model, pg.cfg, req.model, n_samples=req.n_samples, max_new_tokens=req.max_new_tokens,
                 temperature=req.temperature, prompt=req.prompt, seed=req.seed)


@router.get("/api/completion/presets", dependencies=[Depends(require("public"))])
def list_presets() -> dict:
    return {"note": BASE_MODEL_NOTE, "presets": [p.to_dict() for p in presets()]}
