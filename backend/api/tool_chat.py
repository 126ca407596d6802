"""/v1/chat/completions with the server's built-in tools (search, python) and thinking: the tool loop
of backend/tool_loop.py behind the OpenAI chat API. The plain route hands a request here when it asks
for tools; everything else about the request (model, messages, sampling, max_tokens) is parsed as usual.

Asking for tools (either):
    "tools": [{"type": "function", "function": {"name": "python"}}, {"type": "function", "function": {"name": "search"}}]
    "tools_enabled": true                      # extension: all built-in tools
Options: "tool_choice": "auto" (default) | "none"; "max_tool_calls": 0-16 (default 4, extension);
"assistant_prefix": text the assistant turn starts with, e.g. a scripted <tool_call>…</tool_call> (extension).
Tools need a signed-in learner (api_key=<user key> or the browser session), whatever --open-inference says.
A tool is built-in when its name is python or search and it gives no `parameters`; the server runs it
itself, so the answer never ends with finish_reason "tool_calls". Functions the client runs are
backend/chat_tools.py's (one kind per request). n must be 1 and logprobs are not offered here.

What comes back (OpenAI fields plus extensions that the openai client keeps as extra attributes):
    choices[0].message: {"role": "assistant", "content": the answer,
        "reasoning_content": the thinking or null (the field DeepSeek's API uses),
        "tool_steps": [{"index", "tool", "input", "output", "ok", "duration_s", "forced"}],
        "segments": [[kind, text], ...] the exact order (think, call, output, text),
        "notes": ["the tool call is not valid JSON …", ...]}
    choices[0].finish_reason: "stop" | "length"; choices[0].tool_loop_finish: stop | length | tool_error |
        call_limit | cancelled
Streaming: chunks whose delta carries "content", "reasoning_content", "tool_step" ({"event": "start"|"end",
…the step}) or "note"; the last chunk has finish_reason (and tool_loop_finish).
To continue a conversation, send the assistant message back with its "reasoning_content" and
"tool_steps": they are rendered into the context again (thinking, calls and outputs in the one turn).
"""
from __future__ import annotations

import threading

from fastapi import Request

from backend.api import openai_format as fmt
from backend.api import openai_service as svc
from backend.api.openai_schema import APIError, ChatCompletionRequest
from backend.auth import allow
from backend.serving.engine import aiterate
from backend.tool_loop import MAX_CALLS, Tools, collect_turn, run_turn
from models.chat_format import TOOL_ARG


def tool_names(req: ChatCompletionRequest) -> list[str]:
    if req.tool_choice not in (None, "auto", "none"):
        raise APIError(400, "tool_choice must be 'auto' or 'none' (only the built-in tools run, chosen by the model)",
                       "tool_choice")
    if req.tool_choice == "none":
        return []
    if req.tools is None:
        return list(TOOL_ARG) if req.tools_enabled else []
    names = []
    for t in req.tools:
        if t.function.name not in names:
            names.append(t.function.name)
    return names


def finish_of(r) -> str:
    return "length" if r.finish_reason == "length" else "stop"


async def tool_chat_completion(request: Request, req: ChatCompletionRequest, engine) -> object:
    from backend.api.openai_api import run_v1, sse_stream
    # Tools run code and read the documents: a signed-in learner at least, even where plain chat is open.
    await allow(request, "learner")
    names = tool_names(req)
    if req.n != 1:
        raise APIError(400, "n must be 1 when tools are enabled", "n")
    if req.logprobs:
        raise APIError(400, "logprobs are not available with tools", "logprobs")
    if not getattr(engine.spec, "chat_format", None):
        raise APIError(400, f"model {engine.name!r} is a base model without a chat format; use /v1/completions",
                       "model")
    max_calls = MAX_CALLS if req.max_tool_calls is None else req.max_tool_calls
    prefix = req.assistant_prefix or ""
    messages, _ = svc.chat_messages(req)
    prompt = engine.chat_prompt(messages)
    max_tokens = svc.resolve_max_tokens(engine, len(prompt), [("max_completion_tokens", req.max_completion_tokens),
                                                              ("max_tokens", req.max_tokens)], None, "messages")
    params = svc.sampling_params(req, max_tokens, engine.default_stop_ids(), None)
    tools = Tools.from_playground(request.app.state.pg, names)
    meta = fmt.Meta(engine.name, "chatcmpl")

    if req.stream:
        cancel = threading.Event()
        events = run_turn(engine, messages, params, tools, max_calls, cancel, prefix)

        async def chunks():
            yield fmt.chat_chunk(meta, [fmt.delta_choice(0, {"role": "assistant", "content": ""})])
            async for ev in aiterate(events, cancel):
                delta = None
                if ev.type == "text" and ev.text:
                    delta = {"content": ev.text}
                elif ev.type == "thinking" and ev.text:
                    delta = {"reasoning_content": ev.text}
                elif ev.type in ("tool_start", "tool_end"):
                    delta = {"tool_step": {"event": ev.type[5:], **ev.step}}
                elif ev.type == "note":
                    delta = {"note": ev.text}
                elif ev.type == "done":
                    r = ev.result
                    yield fmt.chat_chunk(meta, [fmt.delta_choice(0, {}, None, finish_of(r),
                                                                 tool_loop_finish=r.finish_reason)])
                    if req.include_usage:
                        yield fmt.chat_chunk(meta, [], fmt.usage(r.prompt_tokens, r.completion_tokens))
                if delta:
                    yield fmt.chat_chunk(meta, [fmt.delta_choice(0, delta)])
        return sse_stream(chunks())

    r = await run_v1(request, lambda cancel: collect_turn(
        run_turn(engine, messages, params, tools, max_calls, cancel, prefix)))
    m = r.message
    message = fmt.chat_message(m["content"], reasoning_content=m.get("thinking") or None, tool_steps=r.steps,
                               segments=m["segments"], notes=r.notes)
    return fmt.chat_body(meta, [fmt.chat_choice(0, message, None, finish_of(r), tool_loop_finish=r.finish_reason)],
                         fmt.usage(r.prompt_tokens, r.completion_tokens))
