"""The /v1 service: a parsed request (backend/api/openai_schema.py) becomes prompts and one SamplingParams
(the conversion happens here, once), the engine runs them, and the samples come back whole or as events
for the formatter (backend/api/openai_format.py).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from backend.api.openai_schema import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from backend.chat_tools import MessageError, to_chat_messages
from backend.serving.sampling import SamplingParams
from models.chat_format import END_TOOL_CALL, TOOL_ARG, TOOL_OUTPUT, render_chat
from models.registry import UnknownModel, WrongRole


async def get_engine(pg, name: str):
    try:  # loading a model takes seconds: off the event loop
        return await asyncio.to_thread(pg.engines.get, name)
    except UnknownModel as e:
        raise APIError(404, str(e), "model", code="model_not_found")
    except WrongRole as e:  # a reward model: it scores answers, it generates none
        raise APIError(400, str(e), "model", code="model_not_generative")
    except Exception as e:  # noqa: BLE001 - a model on disk that does not load is the server's problem
        raise APIError(503, f"model {name!r} could not be loaded: {e}", "model", type="server_error",
                       code="model_load_failed")


def resolve_max_tokens(engine, prompt_len: int, asked: list[tuple[str, int | None]], default: int | None,
                       prompt_field: str) -> int:
    """The first of `asked` that is set, checked against the room the context leaves; else the default."""
    ctx = engine.context_length
    if prompt_len >= ctx:
        raise APIError(400, f"{prompt_field} has {prompt_len} tokens; the model's context length is {ctx}",
                       prompt_field, code="context_length_exceeded")
    room = ctx - prompt_len
    for name, v in asked:
        if v is not None:
            if v > room:
                raise APIError(400, f"{name} is {v} but the context length is {ctx} and the prompt takes "
                                    f"{prompt_len} tokens (at most {room} new tokens)", name,
                               code="context_length_exceeded")
            return v
    return room if default is None else min(default, room)


def sampling_params(req: SamplingFields, max_tokens: int, stop_ids: list[int], logprobs: int | None,
                    constraint=None, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    """The request's sampling fields as the engine's SamplingParams: the one conversion."""
    return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, max_tokens=max_tokens,
                          seed=req.seed, stop=list(req.stop) + list(extra_stop), stop_token_ids=list(stop_ids),
                          logprobs=logprobs, frequency_penalty=req.frequency_penalty,
                          presence_penalty=req.presence_penalty, repetition_penalty=req.repetition_penalty,
                          constraint=constraint)


# -- running ---------------------------------------------------------------------------------------
@dataclass
class Sample:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list] = field(default_factory=list)
    finish_reason: str = "length"
    stop_token: tuple[int, float | None, list] | None = None   # (id, log-prob, top) of the stop token


def collect(events, rows: int) -> list[Sample]:
    out = [Sample(i) for i in range(rows)]
    for ev in events:
        s = out[ev.index]
        s.text += ev.text
        if ev.token_id is not None:
            s.token_ids.append(ev.token_id)
            s.logprobs.append(ev.logprob)
            s.top_logprobs.append(ev.top_logprobs or [])
        if ev.finish_reason:
            s.finish_reason = ev.finish_reason
            if ev.stop_token_id is not None:
                s.stop_token = (ev.stop_token_id, ev.logprob, ev.top_logprobs or [])
    return out


def echo_logprobs(engine, prompt_ids, k):
    scored = engine.prompt_logprobs(prompt_ids, k)
    return [lp for lp, _ in scored], [None if lp is None else top for lp, top in scored]


# -- /v1/completions -------------------------------------------------------------------------------
@dataclass
class CompletionPlan:
    prompts: list[list[int]]
    texts: list[str]
    params: SamplingParams
    n: int


def completion_prompts(prompt, engine) -> tuple[list[list[int]], list[str]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    vocab = engine.model.cfg.vocab_size

    def ids_ok(x) -> bool:
        return isinstance(x, list) and len(x) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in x)

    if isinstance(prompt, str):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        items = prompt
    elif ids_ok(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(ids_ok(x) for x in prompt):
        items = prompt
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
            ids.append(toks)
            texts.append(item)
        else:
            try:  # an id inside the embedding but not a token of the encoding (a gap among its specials)
                texts.append(engine.enc.decode(list(item), errors="replace"))
            except KeyError as e:
                raise APIError(400, f"prompt: {e.args[0] if e.args else e} (not a token of {engine.name}'s "
                                    "tokenizer)", "prompt") from None
            ids.append(list(item))
    return ids, texts


def plan_completion(req: CompletionRequest, engine) -> CompletionPlan:
    prompts, texts = completion_prompts(req.prompt, engine)
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(engine, longest, [("max_tokens", req.max_tokens)], 16, "prompt")
    return CompletionPlan(prompts, texts, sampling_params(req, max_tokens, engine.default_stop_ids(), req.logprobs),
                          req.n)


# -- /v1/chat/completions --------------------------------------------------------------------------
def uses_builtin_tools(req: ChatCompletionRequest) -> bool:
    """The server's own tools (backend/api/tool_chat.py): tools_enabled, assistant_prefix, or every tool a
    built-in name without parameters. Mixed with client functions: refused, naming `tools`."""
    if req.tools_enabled or req.assistant_prefix is not None:
        return True
    if not req.tools:
        return False
    builtin = [t.function.name in TOOL_ARG and t.function.parameters is None for t in req.tools]
    if any(builtin) and not all(builtin):
        raise APIError(400, "tools mixes the server's built-in tools (python, search: no parameters) with "
                            "functions the client runs; send one kind per request", "tools")
    return all(builtin)


@dataclass
class ChatPlan:
    prompt: list[int]
    params: SamplingParams
    n: int
    names: list[str]          # client functions the answer may call ([] = plain chat)
    forced: bool              # the prompt ends with an opening <tool_call>
    max_calls: int | None = None   # 1 unless parallel calls are allowed (None: any number)


def chat_messages_of(messages) -> tuple[list[dict], bool]:
    """Parsed ChatMessages -> chat-format messages and whether the last assistant turn stays open."""
    try:
        return to_chat_messages([m.model_dump(exclude_none=True) for m in messages])
    except MessageError as e:
        raise APIError(400, str(e), e.param) from None


def chat_messages(req: ChatCompletionRequest) -> tuple[list[dict], bool]:
    return chat_messages_of(req.messages)


def plan_chat(req: ChatCompletionRequest, engine) -> ChatPlan:
    from backend.serving import structured
    if not getattr(engine.spec, "chat_format", None):
        raise APIError(400, f"model {engine.name!r} is a base model without a chat format; use /v1/completions",
                       "model")
    messages, open_turn = chat_messages(req)
    choice = req.tool_choice or "auto"
    functions = [t.function.model_dump(exclude_none=True) for t in req.tools or []] if choice != "none" else []
    forced = bool(functions) and choice != "auto"
    named = hasattr(choice, "function")
    called = [f for f in functions if f["name"] == choice.function.name] if named else functions
    # Parallel calls (OpenAI's default): the calls follow each other, <tool_call>…</tool_call><tool_call>…,
    # and the answer ends after the last one. A named tool_choice is one call, as in vLLM.
    parallel = bool(functions) and req.parallel_tool_calls is not False and not named
    try:
        if functions or open_turn:
            prompt = list(render_chat(messages, engine.enc, add_generation_prompt=not open_turn,
                                      continue_final_message=open_turn, functions=functions or None,
                                      open_call=forced, parallel_calls=parallel).ids)
        else:  # the engine's own rendering: a remote engine keeps the messages (backend/serving/remote_engine.py)
            prompt = engine.chat_prompt(messages)
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    max_tokens = resolve_max_tokens(engine, len(prompt), [("max_completion_tokens", req.max_completion_tokens),
                                                          ("max_tokens", req.max_tokens)], None, "messages")
    stop_ids = engine.default_stop_ids()
    extra_stop: tuple[str, ...] = ()
    if functions:  # the client runs the calls: the answer ends after the first (or, parallel, after the last)
        # A model tuned on our format goes on to the tool's output tag after its calls: that ends it too.
        end = TOOL_OUTPUT if parallel else END_TOOL_CALL
        extra_stop = (end,)
        if end in engine.enc.special_tokens_set:
            stop_ids = stop_ids + [engine.enc.encode_single_token(end)]
    constraint, param = None, None
    fmt = req.response_format
    try:
        if forced:
            param, constraint = "tool_choice", structured.call_constraint(engine, called, engine.default_stop_ids(),
                                                                          parallel)
        elif fmt is not None and fmt.type != "text":
            schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
            param, constraint = "response_format", structured.json_constraint(engine, schema, engine.default_stop_ids())
        elif functions:
            param, constraint = "tools", structured.triggered_call_constraint(engine, functions,
                                                                              engine.default_stop_ids(), parallel)
    except ValueError as e:
        raise APIError(400, str(e), param) from None
    params = sampling_params(req, max_tokens, stop_ids, req.logprobs_k, constraint, extra_stop)
    return ChatPlan(prompt, params, req.n, [f["name"] for f in functions], forced, None if parallel else 1)
