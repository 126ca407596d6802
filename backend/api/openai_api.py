"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streaming as SSE).

Shaped so the official `openai` Python client works unchanged. Each route is the same three steps:
the body is parsed once into a typed request (backend/api/openai_schema.py, a FastAPI dependency, so a
bad field is a 400 naming it before any work), the service turns it into prompts + SamplingParams and
runs the engine (backend/api/openai_service.py), the formatter writes OpenAI's shapes
(backend/api/openai_format.py). Routes are plain FastAPI functions: auth or limits attach as
dependencies or middleware.

Generation runs in a thread, never on the event loop; a client that disconnects cancels its request,
which frees the engine at the next decode step. Extensions: `top_k`, `repetition_penalty` (vLLM's),
the built-in tools (backend/api/tool_chat.py). Client-side function calling: backend/chat_tools.py;
structured output (response_format, forced calls): backend/serving/structured.py.
"""
from __future__ import annotations

import asyncio
import json
import threading

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from backend.api import openai_format as fmt
from backend.api import openai_service as svc
from backend.api.openai_schema import APIError, ChatCompletionRequest, CompletionRequest, parsed
from backend.auth import require
from backend.chat_tools import CallStream, parse_answer
from backend.serving.engine import aiterate

router = APIRouter(tags=["openai"])


# -- running generation off the event loop -------------------------------------------------------
async def run_blocking(request: Request, fn):
    """Run fn(cancel) in a thread; cancel it when the client goes away."""
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def work():
        try:
            res = fn(cancel)
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(res))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
            try:
                # bind e now: Python unbinds the except variable when the block ends
                loop.call_soon_threadsafe(lambda err=e: fut.done() or fut.set_exception(err))
            except RuntimeError:
                pass  # loop closed (server shutting down)

    threading.Thread(target=work, daemon=True, name="generate").start()
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.5)
            if done:
                return fut.result()
            if await request.is_disconnected():
                cancel.set()
                return await fut
    finally:
        cancel.set()


async def run_v1(request: Request, fn):
    """run_blocking for /v1: a ValueError from the engine (a request it refuses) is a 400."""
    try:
        return await run_blocking(request, fn)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_stream(chunks):
    async def gen():
        try:
            async for c in chunks:
                yield sse(c)
        except APIError as e:
            yield sse(e.body())
        except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-band
            yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                 "code": None}})
        yield "data: [DONE]\n\n"
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def start(engine, prompts, params, n):
    """Engine events and their cancel flag; a request the engine refuses is a 400 before streaming starts."""
    cancel = threading.Event()
    try:
        return engine.generate(prompts, params, n, cancel), cancel
    except ValueError as e:
        raise APIError(400, str(e)) from None


# -- /v1/models ----------------------------------------------------------------------------------
def model_card(spec) -> dict:
    created = 0
    if spec.path is not None and spec.path.exists():
        created = int(spec.path.stat().st_mtime)
    # max_model_len as vLLM reports it: clients that register this server as a remote model read it
    # role (chat, base, reward): what the model is for; a reward model only scores, /v1 generation refuses it
    return {"id": spec.name, "object": "model", "created": created, "owned_by": "playground",
            "max_model_len": spec.context_length, "role": spec.role}


@router.get("/v1/models", dependencies=[Depends(require("public"))])
def list_models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(s) for s in request.app.state.pg.registry.list()]}


@router.get("/v1/models/{name}", dependencies=[Depends(require("public"))])
def get_model(name: str, request: Request):
    try:
        return model_card(request.app.state.pg.registry.get(name))
    except ValueError as e:
        return APIError(404, str(e), "model", code="model_not_found").response()


# -- /v1/completions -----------------------------------------------------------------------------
@router.post("/v1/completions", dependencies=[Depends(require("inference"))])
async def completions(request: Request, req: CompletionRequest = Depends(parsed(CompletionRequest))):
    engine = await svc.get_engine(request.app.state.pg, req.model)
    plan = svc.plan_completion(req, engine)
    meta = fmt.Meta(engine.name, "cmpl")
    k = req.logprobs
    if req.stream:
        return sse_stream(stream_completion(req, engine, plan, meta))
    rows = len(plan.prompts) * plan.n
    samples = await run_v1(request, lambda cancel: svc.collect(
        engine.generate(plan.prompts, plan.params, plan.n, cancel), rows))
    choices = []
    for s in samples:
        p_ids, p_text = plan.prompts[s.index // plan.n], plan.texts[s.index // plan.n]
        lp = None
        if k is not None:
            ids, lps, tops = list(s.token_ids), list(s.logprobs), list(s.top_logprobs)
            if s.stop_token is not None:  # the stop token keeps its entry (openai_format's rule)
                ids, lps, tops = ids + [s.stop_token[0]], lps + [s.stop_token[1]], tops + [s.stop_token[2]]
            if req.echo:
                e_lps, e_tops = await run_v1(request, lambda cancel, p=p_ids: svc.echo_logprobs(engine, p, k))
                ids, lps, tops = list(p_ids) + ids, e_lps + lps, e_tops + tops
            lp = fmt.completion_logprobs(engine, ids, lps, tops)
        choices.append(fmt.completion_choice(s.index, (p_text + s.text) if req.echo else s.text, lp, s.finish_reason))
    use = fmt.usage(sum(len(p) for p in plan.prompts), sum(len(s.token_ids) for s in samples))
    return fmt.completion_body(meta, choices, use)


async def stream_completion(req: CompletionRequest, engine, plan: svc.CompletionPlan, meta: fmt.Meta):
    events, cancel = start(engine, plan.prompts, plan.params, plan.n)
    echoes = {i: plan.texts[i // plan.n] for i in range(len(plan.prompts) * plan.n)} if req.echo else {}
    count = 0
    async for ev in aiterate(events, cancel):
        text = echoes.pop(ev.index, "") + ev.text
        tok = ev.token_id if ev.token_id is not None else ev.stop_token_id
        lp = None
        if req.logprobs is not None and tok is not None:
            lp = fmt.completion_logprobs(engine, [tok], [ev.logprob], [ev.top_logprobs])
        count += ev.token_id is not None
        if text or lp or ev.finish_reason:
            yield fmt.completion_body(meta, [fmt.completion_choice(ev.index, text, lp, ev.finish_reason)])
    if req.include_usage:
        yield fmt.completion_body(meta, [], fmt.usage(sum(len(p) for p in plan.prompts), count))


# -- /v1/chat/completions ------------------------------------------------------------------------
@router.post("/v1/chat/completions", dependencies=[Depends(require("inference"))])
async def chat_completions(request: Request, req: ChatCompletionRequest = Depends(parsed(ChatCompletionRequest))):
    engine = await svc.get_engine(request.app.state.pg, req.model)
    if svc.uses_builtin_tools(req):  # the server's own tools and thinking
        from backend.api import tool_chat
        return await tool_chat.tool_chat_completion(request, req, engine)
    plan = svc.plan_chat(req, engine)
    meta = fmt.Meta(engine.name, "chatcmpl")
    if req.stream:
        return sse_stream(stream_chat(req, engine, plan, meta))
    samples = await run_v1(request, lambda cancel: svc.collect(
        engine.generate([plan.prompt], plan.params, plan.n, cancel), plan.n))
    choices = []
    for s in samples:
        lp = None
        if plan.params.logprobs is not None:
            lp = {"content": [fmt.chat_logprob(engine, t, v, tp)
                              for t, v, tp in zip(s.token_ids, s.logprobs, s.top_logprobs)]}
        finish = s.finish_reason
        if plan.names:
            a = parse_answer(s.text, plan.names, plan.forced, plan.max_calls)
            message = fmt.chat_message(a.content, a.tool_calls, a.reasoning)
            finish = "tool_calls" if a.tool_calls else finish
        else:
            message = fmt.chat_message(s.text)
        choices.append(fmt.chat_choice(s.index, message, lp, finish))
    return fmt.chat_body(meta, choices, fmt.usage(len(plan.prompt), sum(len(s.token_ids) for s in samples)))


async def stream_chat(req: ChatCompletionRequest, engine, plan: svc.ChatPlan, meta: fmt.Meta):
    events, cancel = start(engine, [plan.prompt], plan.params, plan.n)
    parsers = [CallStream(plan.names, plan.forced, plan.max_calls) for _ in range(plan.n)] if plan.names else None
    for i in range(plan.n):
        yield fmt.chat_chunk(meta, [fmt.delta_choice(i, {"role": "assistant", "content": ""})])
    count = 0
    async for ev in aiterate(events, cancel):
        lp = None
        if ev.token_id is not None:
            count += 1
            if plan.params.logprobs is not None:
                lp = {"content": [fmt.chat_logprob(engine, ev.token_id, ev.logprob, ev.top_logprobs)]}
        if parsers is None:
            deltas = [{"content": ev.text}] if ev.text or lp else []
        else:
            deltas = parsers[ev.index].feed(ev.text, final=bool(ev.finish_reason))
            if lp and not deltas:
                deltas = [{}]
        for j, d in enumerate(deltas):
            yield fmt.chat_chunk(meta, [fmt.delta_choice(ev.index, d, lp if j == 0 else None)])
        if ev.finish_reason:
            finish = "tool_calls" if parsers is not None and parsers[ev.index].called else ev.finish_reason
            yield fmt.chat_chunk(meta, [fmt.delta_choice(ev.index, {}, None, finish)])
    if req.include_usage:
        yield fmt.chat_chunk(meta, [], fmt.usage(len(plan.prompt), count))
