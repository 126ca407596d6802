"""/v1/chat/completions with the server's built-in tools (search, python) and thinking: the tool loop
of backend/tool_loop.py behind the OpenAI chat API. The plain route hands a request here when it asks
for tools; everything else about the request (model, messages, sampling, max_tokens) is parsed as usual.

Asking for tools (either):
    "tools": [{"type": "function", "function": {"name": "python"}}, {"type": "function", "function": {"name": "search"}}]
    "tools_enabled": true                      # extension: all built-in tools
Options: "tool_choice": "auto" (default) | "none"; "max_tool_calls": 0-16 (default 4, extension);
"assistant_prefix": text the assistant turn starts with, e.g. a scripted <tool_call>…</tool_call> (extension).
Tools need a signed-in learner (api_key=<user key> or the browser session), whatever --open-inference says.
Only the built-in tools exist: the server runs them itself, so the answer never ends with
finish_reason "tool_calls" for the client to execute; n must be 1 and logprobs are not offered.

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

from backend.auth import allow
from backend.engine import aiterate
from backend.tool_loop import MAX_CALLS, Tools, collect_turn, run_turn
from models.chat_format import TOOL_ARG

MAX_TOOL_CALLS = 16


def wants_tools(body: dict) -> bool:
    return bool(body.get("tools")) or body.get("tools_enabled") is True or "assistant_prefix" in body


def parse_tools(body: dict, APIError) -> list[str]:
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise APIError(400, "tool_choice must be 'auto' or 'none' (only the built-in tools run, chosen by the model)",
                       "tool_choice")
    if body.get("tool_choice") == "none":
        return []
    te = body.get("tools_enabled")
    if te is not None and not isinstance(te, bool):
        raise APIError(400, "tools_enabled must be true or false", "tools_enabled")
    tools = body.get("tools")
    if tools is None:
        return list(TOOL_ARG) if te else []
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {type: 'function', function: {name}}", "tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or name not in TOOL_ARG:
            raise APIError(400, f"tools[{i}] must be {{type: 'function', function: {{name}}}} with a built-in tool "
                                f"name ({', '.join(TOOL_ARG)}); this server runs only its own tools", f"tools[{i}]")
        if name not in names:
            names.append(name)
    return names


def restore_steps(body: dict, messages: list[dict], APIError) -> list[dict]:
    """Assistant messages sent back with reasoning_content / tool_steps become structured again."""
    out = [dict(m) for m in messages]
    for i, raw in enumerate(body.get("messages") or []):
        if not isinstance(raw, dict) or raw.get("role") != "assistant" or i >= len(out):
            continue
        if isinstance(raw.get("reasoning_content"), str) and raw["reasoning_content"]:
            out[i]["thinking"] = raw["reasoning_content"]
        steps = raw.get("tool_steps")
        if steps is None:
            continue
        if not isinstance(steps, list) or any(not isinstance(s, dict) or s.get("tool") not in TOOL_ARG
                                              or not isinstance(s.get("input", ""), str)
                                              or not isinstance(s.get("output", ""), str) for s in steps):
            raise APIError(400, f"messages[{i}].tool_steps must be a list of {{tool, input, output}}",
                           f"messages[{i}].tool_steps")
        out[i]["tool_calls"] = [{"tool": s["tool"], "input": s.get("input", ""), "output": s.get("output", "")}
                                for s in steps]
    return out


def finish_of(r) -> str:
    return "length" if r.finish_reason == "length" else "stop"


async def tool_chat_completion(request: Request, body: dict, engine, messages: list[dict], api) -> object:
    """`api` is backend.api.openai_api (its parsers and helpers, passed in to avoid an import cycle)."""
    # Tools run code and read the documents: a signed-in learner at least, even where plain chat is open.
    await allow(request, "learner")
    APIError = api.APIError
    names = parse_tools(body, APIError)
    if api.get_int(body, "n", 1, 1, api.MAX_N) != 1:
        raise APIError(400, "n must be 1 when tools are enabled", "n")
    if api.get_bool(body, "logprobs", False):
        raise APIError(400, "logprobs are not available with tools", "logprobs")
    max_calls = api.get_int(body, "max_tool_calls", MAX_CALLS, 0, MAX_TOOL_CALLS)
    prefix = body.get("assistant_prefix", "")
    if not isinstance(prefix, str):
        raise APIError(400, "assistant_prefix must be a string", "assistant_prefix")
    messages = restore_steps(body, messages, APIError)
    prompt = engine.chat_prompt(messages)
    max_tokens = api.resolve_max_tokens(body, engine, len(prompt), None, ("max_completion_tokens", "max_tokens"),
                                        "messages")
    params = api.sampling_params(body, max_tokens, engine.default_stop_ids(), None)
    tools = Tools.from_playground(request.app.state.pg, names)
    import time
    import uuid
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), engine.name

    def chunk(choices: list[dict]) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "system_fingerprint": None, "choices": choices}

    if api.get_bool(body, "stream", False):
        cancel = threading.Event()
        events = run_turn(engine, messages, params, tools, max_calls, cancel, prefix)
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))

        async def chunks():
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
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
                    yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_of(r),
                                  "tool_loop_finish": r.finish_reason}])
                    if include_usage:
                        yield {**chunk([]), "usage": api.usage(r.prompt_tokens, r.completion_tokens)}
                if delta:
                    yield chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        return api.sse_stream(chunks())

    r = await api.run_blocking(request, lambda cancel: collect_turn(
        run_turn(engine, messages, params, tools, max_calls, cancel, prefix)))
    m = r.message
    message = {"role": "assistant", "content": m["content"], "refusal": None,
               "reasoning_content": m.get("thinking") or None, "tool_steps": r.steps,
               "segments": m["segments"], "notes": r.notes}
    return {"id": rid, "object": "chat.completion", "created": created, "model": name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_of(r),
                         "tool_loop_finish": r.finish_reason}],
            "usage": api.usage(r.prompt_tokens, r.completion_tokens)}
