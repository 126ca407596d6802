"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streaming as SSE).

Shaped so the official `openai` Python client works unchanged. Requests are parsed by hand (not by
pydantic) so every bad request gets an OpenAI-style error naming the field:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

Generation runs in a thread, never on the event loop; a client that disconnects cancels its request,
which frees the engine's single-flight slot at the next decode step. Log-probs are the model's raw
distribution (temperature 1, no top-k/top-p), as OpenAI reports them. Extension: `top_k`.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from backend.api.guards import too_long
from backend.auth import require
from backend.engine import aiterate
from backend.sampling import SamplingParams
from models.registry import UnknownModel

router = APIRouter(tags=["openai"])

MAX_N = 64
MAX_LOGPROBS = 20
MAX_STOP = 16
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# -- parsing -------------------------------------------------------------------------------------
def _check_strings(obj, path: str) -> None:
    """Reject lone surrogates (valid JSON escapes like "\\ud800" that are not valid Unicode text)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{path or 'body'} contains a lone surrogate (not valid Unicode text)", path or None)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(k, path)
            _check_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_strings(v, f"{path}[{i}]")


async def read_body(request: Request) -> dict:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_strings(body, "")
    if why := too_long(body, request.app.state.pg.cfg.max_prompt_chars):  # before any tokenizing
        raise APIError(400, why, "messages" if "messages" in body else "prompt", code="context_length_exceeded")
    return body


def _type_error(name: str, want: str, value) -> APIError:
    return APIError(400, f"{name} must be {want}, got {json.dumps(value)[:60]}", name)


def get_int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise APIError(400, f"{name} must be {rng}, got {v}", name)
    return v


def get_number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _type_error(name, "a number", v)
    return float(v)


def get_bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(name, "true or false", v)
    return v


def get_stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or any(not isinstance(s, str) for s in v):
        raise _type_error("stop", "a string or a list of strings", v)
    if len(v) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} strings", "stop")
    return [s for s in v if s]


def sampling_params(body: dict, max_tokens: int, stop_ids: list[int], logprobs: int | None) -> SamplingParams:
    temperature = get_number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = get_number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = get_int(body, "top_k", 0, 0)
    seed = get_int(body, "seed", None)
    for name in ("frequency_penalty", "presence_penalty"):
        if get_number(body, name, 0.0) != 0:
            raise APIError(400, f"{name} is not supported by this server (use 0)", name)
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens, seed=seed,
                          stop=get_stop(body), stop_token_ids=stop_ids, logprobs=logprobs)


async def get_engine(request: Request, body: dict):
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise APIError(400, "model is required (a model name from /v1/models)", "model")
    try:  # loading a model takes seconds: off the event loop
        return await asyncio.to_thread(request.app.state.pg.engines.get, name)
    except UnknownModel as e:
        raise APIError(404, str(e), "model", code="model_not_found")
    except Exception as e:  # noqa: BLE001 - a model on disk that does not load is the server's problem
        raise APIError(503, f"model {name!r} could not be loaded: {e}", "model", type="server_error",
                       code="model_load_failed")


def resolve_max_tokens(body: dict, engine, prompt_len: int, default: int | None, names: tuple[str, ...],
                       prompt_field: str) -> int:
    ctx = engine.context_length
    if prompt_len >= ctx:
        raise APIError(400, f"{prompt_field} has {prompt_len} tokens; the model's context length is {ctx}",
                       prompt_field, code="context_length_exceeded")
    room = ctx - prompt_len
    for name in names:
        v = get_int(body, name, None, 0)
        if v is not None:
            if v > room:
                raise APIError(400, f"{name} is {v} but the context length is {ctx} and the prompt takes "
                                    f"{prompt_len} tokens (at most {room} new tokens)", name,
                               code="context_length_exceeded")
            return v
    return room if default is None else min(default, room)


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


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_stream(chunks):
    async def gen():
        try:
            async for c in chunks:
                yield sse(c)
        except APIError as e:
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-band
            yield sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                 "code": None}})
        yield "data: [DONE]\n\n"
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def handle_errors(fn):
    """Turn APIError (and ValueError from the engine) into OpenAI-style JSON errors."""
    import functools

    @functools.wraps(fn)
    async def wrapper(request: Request):
        try:
            return await fn(request)
        except APIError as e:
            return e.response()
        except ValueError as e:
            return APIError(400, str(e)).response()
    return wrapper


# -- /v1/models ----------------------------------------------------------------------------------
def model_card(spec) -> dict:
    created = 0
    if spec.path is not None and spec.path.exists():
        created = int(spec.path.stat().st_mtime)
    # max_model_len as vLLM reports it: clients that register this server as a remote model read it
    return {"id": spec.name, "object": "model", "created": created, "owned_by": "playground",
            "max_model_len": spec.context_length}


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
def parse_prompts(body: dict, engine) -> tuple[list[list[int]], list[str]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    p = body.get("prompt")
    vocab = engine.model.cfg.vocab_size

    def ids_ok(x) -> bool:
        return isinstance(x, list) and len(x) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in x)

    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        items = p
    elif ids_ok(p):
        items = [p]
    elif isinstance(p, list) and p and all(ids_ok(x) for x in p):
        items = p
    else:
        raise APIError(400, "prompt must be a non-empty string, list of strings, list of token ids "
                            f"(each in [0, {vocab})) or list of such lists", "prompt")
    ids, texts = [], []
    for item in items:
        if isinstance(item, str):
            toks = engine.encode(item)
            if not toks:  # an empty prompt starts from the end-of-text token, as OpenAI does
                eot = getattr(engine.enc, "eot_token", None)
                if eot is None:
                    raise APIError(400, "prompt must not be empty", "prompt")
                toks = [eot]
                item = ""
            ids.append(toks)
            texts.append(item)
        else:
            ids.append(list(item))
            texts.append(engine.enc.decode(list(item), errors="replace"))
    return ids, texts


def completion_logprobs(engine, token_ids, lps, tops, start_offset: int) -> dict:
    tokens, offsets, off = [], [], start_offset
    for t in token_ids:
        s = engine.token_str(t)
        tokens.append(s)
        offsets.append(off)
        off += len(engine.token_bytes(t).decode("utf-8", errors="replace"))
    return {"tokens": tokens, "token_logprobs": list(lps),
            "top_logprobs": [None if top is None else {engine.token_str(i): lp for i, lp in top} for top in tops],
            "text_offset": offsets}


def echo_logprobs(engine, prompt_ids, k):
    scored = engine.prompt_logprobs(prompt_ids, k)
    return [lp for lp, _ in scored], [None if lp is None else top for lp, top in scored]


@router.post("/v1/completions", dependencies=[Depends(require("inference"))])
@handle_errors
async def completions(request: Request):
    body = await read_body(request)
    engine = await get_engine(request, body)
    prompts, prompt_texts = parse_prompts(body, engine)
    n = get_int(body, "n", 1, 1, MAX_N)
    best_of = get_int(body, "best_of", None, 1, MAX_N)
    if best_of is not None and best_of != n:
        raise APIError(400, "best_of is not supported (other than equal to n)", "best_of")
    if body.get("suffix") is not None:
        raise APIError(400, "suffix is not supported by this server", "suffix")
    k = get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = get_bool(body, "echo", False)
    stream = get_bool(body, "stream", False)
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(body, engine, longest, 16, ("max_tokens",), "prompt")
    params = sampling_params(body, max_tokens, engine.default_stop_ids(), k)
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), engine.name

    def chunk(choices: list[dict]) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices}

    if stream:
        cancel = threading.Event()
        events = engine.generate(prompts, params, n, cancel)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
            body.get("stream_options"), dict) else False

        async def chunks():
            echoes = {}
            if echo:
                for i in range(len(prompts) * n):
                    echoes[i] = prompt_texts[i // n]
            counts = [0] * (len(prompts) * n)
            async for ev in aiterate(events, cancel):
                text = echoes.pop(ev.index, "") + ev.text
                lp = None
                if k is not None and ev.token_id is not None:
                    lp = completion_logprobs(engine, [ev.token_id], [ev.logprob], [ev.top_logprobs], 0)
                if ev.token_id is not None:
                    counts[ev.index] += 1
                if text or lp or ev.finish_reason:
                    yield chunk([{"text": text, "index": ev.index, "logprobs": lp,
                                  "finish_reason": ev.finish_reason}])
            if include_usage:
                u = usage(sum(len(p) for p in prompts), sum(counts))
                yield {**chunk([]), "usage": u}
        return sse_stream(chunks())

    results = await run_blocking(request, lambda cancel: engine.complete_batch(prompts, params, n, cancel))
    choices = []
    for c in results:
        p_ids, p_text = prompts[c.index // n], prompt_texts[c.index // n]
        text = (p_text + c.text) if echo else c.text
        lp = None
        if k is not None:
            ids, lps, tops = list(c.token_ids), list(c.logprobs), list(c.top_logprobs)
            if echo:
                e_lps, e_tops = await run_blocking(request, lambda cancel, p=p_ids: echo_logprobs(engine, p, k))
                ids, lps, tops = list(p_ids) + ids, e_lps + lps, e_tops + tops
            lp = completion_logprobs(engine, ids, lps, tops, 0)
        choices.append({"text": text, "index": c.index, "logprobs": lp, "finish_reason": c.finish_reason})
    completion_tokens = sum(len(c.token_ids) for c in results)
    return {**chunk(choices), "usage": usage(sum(len(p) for p in prompts), completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- /v1/chat/completions ------------------------------------------------------------------------
def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}",
                           f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # content parts: only text here
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}.content[{j}] must be a text part {{type: 'text', text: ...}}",
                                   f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def chat_logprobs(engine, token_id: int, lp: float, top) -> dict:
    def entry(t, v):
        return {"token": engine.token_str(t), "logprob": v, "bytes": list(engine.token_bytes(t))}
    return {**entry(token_id, lp), "top_logprobs": [entry(t, v) for t, v in (top or [])]}


@router.post("/v1/chat/completions", dependencies=[Depends(require("inference"))])
@handle_errors
async def chat_completions(request: Request):
    body = await read_body(request)
    engine = await get_engine(request, body)
    messages = parse_messages(body)
    if not getattr(engine.spec, "chat_format", None):
        raise APIError(400, f"model {engine.name!r} is a base model without a chat format; "
                            "use /v1/completions", "model")
    from backend.api import tool_chat
    if tool_chat.wants_tools(body):  # the server's own tools and thinking (backend/api/tool_chat.py)
        import sys
        return await tool_chat.tool_chat_completion(request, body, engine, messages, sys.modules[__name__])
    n = get_int(body, "n", 1, 1, MAX_N)
    want_lp = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want_lp:
        raise APIError(400, "top_logprobs requires logprobs: true", "top_logprobs")
    k = (top or 0) if want_lp else None
    stream = get_bool(body, "stream", False)
    prompt = engine.chat_prompt(messages)
    max_tokens = resolve_max_tokens(body, engine, len(prompt), None, ("max_completion_tokens", "max_tokens"),
                                    "messages")
    params = sampling_params(body, max_tokens, engine.default_stop_ids(), k)
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.name

    def chunk(choices: list[dict]) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": None, "choices": choices}

    if stream:
        cancel = threading.Event()
        events = engine.generate([prompt], params, n, cancel)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))

        async def chunks():
            for i in range(n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            count = 0
            async for ev in aiterate(events, cancel):
                lp = None
                if ev.token_id is not None:
                    count += 1
                    if k is not None:
                        lp = {"content": [chat_logprobs(engine, ev.token_id, ev.logprob, ev.top_logprobs)]}
                if ev.text or lp:
                    yield chunk([{"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp,
                                  "finish_reason": None}])
                if ev.finish_reason:
                    yield chunk([{"index": ev.index, "delta": {}, "logprobs": None,
                                  "finish_reason": ev.finish_reason}])
            if include_usage:
                yield {**chunk([]), "usage": usage(len(prompt), count)}
        return sse_stream(chunks())

    results = await run_blocking(request, lambda cancel: engine.complete(prompt, params, n, cancel))
    choices = []
    for c in results:
        lp = None
        if k is not None:
            lp = {"content": [chat_logprobs(engine, t, v, tp)
                              for t, v, tp in zip(c.token_ids, c.logprobs, c.top_logprobs)]}
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": name, "system_fingerprint": None,
            "choices": choices, "usage": usage(len(prompt), sum(len(c.token_ids) for c in results))}
