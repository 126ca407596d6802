"""The /v1 requests as typed models: every body is parsed once, at the door, into one of these.

    req: ChatCompletionRequest = Depends(parsed(ChatCompletionRequest))

A bad body gets OpenAI's error shape with a 400 naming the field (pydantic's location written the way
OpenAI writes it, e.g. "messages[0].role"):
    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages[0].role", "code": null}}
Fields follow OpenAI's API; extensions are marked. Checks that need the model (context length, token
ids in the vocabulary, chat format) are made by the service once the engine is known.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 64
MAX_LOGPROBS = 20
MAX_STOP = 16
MAX_TOOLS = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


async def api_error_handler(_request: Request, exc: APIError) -> JSONResponse:
    """Installed on the app (backend/api/__init__.py): an APIError raised anywhere in a /v1 route or its
    dependencies becomes OpenAI's error JSON."""
    return exc.response()


# -- reading a body --------------------------------------------------------------------------------
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


def param_of(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's param: ("messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    param = param_of(err["loc"])
    got = json.dumps(err.get("input"), default=str)[:60] if "input" in err and err["loc"] else None
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param or 'body'}: {msg}" + (f" (got {got})" if got else ""), param)


def parse_body(raw: bytes, model: type[BaseModel], max_prompt_chars: int | None = None):
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
    if max_prompt_chars is not None:
        from backend.api.guards import too_long
        if why := too_long(body, max_prompt_chars):  # before any tokenizing
            raise APIError(400, why, "messages" if "messages" in body else "prompt", code="context_length_exceeded")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    check = getattr(req, "check", None)
    if check is not None:
        check()
    return req


def parsed(model: type[BaseModel]):
    """A FastAPI dependency that reads the request body into `model` (or raises APIError)."""
    async def dependency(request: Request):
        return parse_body(await request.body(), model, request.app.state.pg.cfg.max_prompt_chars)
    dependency.__name__ = f"parse_{model.__name__}"
    return dependency


# -- pieces --------------------------------------------------------------------------------------
class Strict(BaseModel):
    """No silent coercion ("yes" is not true, "2" is not 2); unknown fields are ignored, as OpenAI's SDKs
    send fields a server may not know (user, metadata, store, ...)."""
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or any(not isinstance(s, str) for s in v):
        raise ValueError("must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise ValueError(f"takes at most {MAX_STOP} strings")
    return [s for s in v if s]


class StreamOptions(Strict):
    include_usage: bool = False


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None   # a JSON schema (None: the built-in tool's own, or any object)
    strict: bool | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(Strict):
    name: str
    arguments: str                   # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str = "schema"
    description: str | None = None
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None       # assistant: the calls it made (client-side tools)
    tool_call_id: str | None = None                # tool: which call this answers
    reasoning_content: str | None = None           # extension: thinking sent back (DeepSeek's field)
    tool_steps: list[dict] | None = None           # extension: built-in tool steps sent back

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):  # content parts: only text here
            parts = []
            for j, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"part {j} must be a text part {{type: 'text', text: ...}}")
                parts.append(part["text"])
            return "".join(parts)
        raise ValueError("must be a string or a list of text parts")


# -- the two requests ----------------------------------------------------------------------------
class SamplingFields(Strict):
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)                           # extension (vLLM)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)          # extension (vLLM)
    logit_bias: dict | None = None
    max_tokens: int | None = Field(None, ge=0)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return _stop_list(v)

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v:
            raise ValueError("is not supported by this server")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Any                                  # str | list[str] | list[int] | list[list[int]], checked by the service
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    def check(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (other than equal to n)", "best_of")
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported by this server", "suffix")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Any = None                      # "auto" | "none" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # extensions for the server's built-in tools (backend/api/tool_chat.py)
    tools_enabled: bool | None = None
    max_tool_calls: int | None = Field(None, ge=0, le=16)
    assistant_prefix: str | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v is None or v in ("auto", "none", "required"):
            return v
        if isinstance(v, dict):
            return NamedToolChoice.model_validate(v)
        raise ValueError("must be 'auto', 'none', 'required' or {type: 'function', function: {name}}")

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise APIError(400, "tool_choice names a tool but no tools are given", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise APIError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not in "
                                    f"tools ({', '.join(names)})", "tool_choice")
        if self.response_format is not None and self.response_format.type == "json_schema" \
                and self.response_format.json_schema is None:
            raise APIError(400, "response_format json_schema needs a json_schema {name, schema}",
                           "response_format.json_schema")
        for i, m in enumerate(self.messages):
            if m.content is None and m.role not in ("assistant",):
                raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
