"""The tokenizer routes vLLM serves at the root, for every registered model (lm-evaluation-harness's
`remote` tokenizer backend uses them: it probes GET /tokenizer_info, then tokenizes through the server):

    POST /tokenize   {"model"?, "prompt", "add_special_tokens"?, "return_token_strs"?}
                     or {"model"?, "messages", "add_generation_prompt"?, "continue_final_message"?}
                     -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize {"model"?, "tokens"} -> {"prompt"}
    GET  /tokenizer_info?model=NAME -> the tokenizer_config.json an exported model carries
                     (eos_token, pad_token, chat_template, model_max_length, ...)

`model` defaults to the server's default model (--model), as vLLM serves one. A prompt is tokenized as
/v1/completions tokenizes a prompt string (special-token text such as <|im_end|> is the special token),
messages as /v1/chat/completions renders them. Our tokenizers add no BOS, so add_special_tokens changes
nothing. Errors have /v1's shape (a 400 naming the field, 404 for an unknown model). Access: as /v1
(tokenizing is inference; the info is public).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from backend.api.openai_schema import APIError, ChatMessage, Strict, parsed
from backend.auth import require
from models.registry import UnknownModel

router = APIRouter(tags=["tokenizer"])


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


async def tokenizer_of(request: Request, name: str | None):
    """(ModelSpec, tiktoken Encoding) of a registered model, without loading its weights."""
    from models.tokenizers import get_encoding
    pg = request.app.state.pg
    name = name or pg.cfg.default_model
    try:
        spec = pg.registry.get(name)
    except UnknownModel as e:
        raise APIError(404, str(e), "model", code="model_not_found") from None
    try:
        enc = await asyncio.to_thread(get_encoding, spec.tokenizer, pg.cfg.data_dir)
    except ValueError as e:
        raise APIError(503, f"the tokenizer of {name!r} is not available: {e}", "model", type="server_error") from None
    return spec, enc


@router.post("/tokenize", dependencies=[Depends(require("inference"))])
async def tokenize(request: Request, req: TokenizeRequest = Depends(parsed(TokenizeRequest))) -> dict:
    spec, enc = await tokenizer_of(request, req.model)
    if req.prompt is not None:
        ids = enc.encode(req.prompt, allowed_special="all")
    else:
        from backend.api.openai_service import chat_messages_of
        from models.chat_format import render_chat
        if not spec.chat_format:
            raise APIError(400, f"model {spec.name!r} is a base model without a chat format", "messages")
        messages, open_turn = chat_messages_of(req.messages)
        try:
            ids = render_chat(messages, enc, add_generation_prompt=req.add_generation_prompt and not open_turn
                              and not req.continue_final_message,
                              continue_final_message=open_turn or req.continue_final_message).ids
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
    strs = None
    if req.return_token_strs:
        strs = [enc.decode_single_token_bytes(t).decode("utf-8", errors="replace") for t in ids]
    return {"count": len(ids), "max_model_len": spec.context_length, "tokens": list(ids), "token_strs": strs}


@router.post("/detokenize", dependencies=[Depends(require("inference"))])
async def detokenize(request: Request, req: DetokenizeRequest = Depends(parsed(DetokenizeRequest))) -> dict:
    _, enc = await tokenizer_of(request, req.model)
    for i, t in enumerate(req.tokens):
        try:
            enc.decode_single_token_bytes(t)
        except (KeyError, ValueError, OverflowError):
            raise APIError(400, f"tokens[{i}] = {t} is not a token id of this tokenizer "
                                f"(ids 0..{enc.max_token_value})", f"tokens[{i}]") from None
    return {"prompt": enc.decode(req.tokens, errors="replace")}


@router.get("/tokenizer_info", dependencies=[Depends(require("public"))])
async def tokenizer_info(request: Request, model: str | None = None) -> dict:
    from models.hf_tokenizer import tokenizer_config
    spec, enc = await tokenizer_of(request, model)
    return {**tokenizer_config(enc, spec.chat_format, spec.context_length), "model": spec.name,
            "tokenizer": spec.tokenizer, "vocab_size": enc.max_token_value + 1}
