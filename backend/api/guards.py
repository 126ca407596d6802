"""Limits that run before any route does work: two small ASGI middlewares.

BodyLimit: a request body over the limit is answered 413 at once: by its Content-Length before a byte
is read, or, for a chunked body, as soon as the bytes counted so far pass the limit. Imports and
Gradio uploads get their own, larger limit, and so do pushed model weights (POST /api/models/NAME/weights).

FairShare: an expensive request (generation, the sandbox, training a tokenizer) holds one of its
caller's slots (backend/fairness.py) until its response, streamed or not, is fully sent; a caller
whose slots are all taken gets 429 at once.
"""
from __future__ import annotations

import json
import re

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from backend import users
from backend.api.errors import error_response
from backend.auth import client_address, credentials, user_from_request
from backend.fairness import TooManyInFlight

IMPORT_PATHS = ("/api/imports/", "/gradio_api/upload")

# (method, path prefix) -> fairness pool
EXPENSIVE: list[tuple[str, str, str]] = [
    ("POST", "/api/tools/python", "sandbox"),
    ("POST", "/v1/completions", "generation"),
    ("POST", "/v1/chat/completions", "generation"),
    ("POST", "/api/completion/", "generation"),
    ("POST", "/api/arena/battles", "generation"),
    ("POST", "/api/practice/", "generation"),
    ("POST", "/api/bpe/", "generation"),
]


class _TooLarge(Exception):
    pass


async def _send_error(send, status: int, message: str, headers: dict | None = None, extra: dict | None = None) -> None:
    resp = error_response(status, message, headers=headers, extra=extra)
    await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


WEIGHTS_PATH = re.compile(r"^/api/models/[^/]+/weights$")  # a trainer's weight push (admin): a whole model


class BodyLimit:
    def __init__(self, app, max_body_bytes: int, max_import_bytes: int, max_weights_bytes: int | None = None):
        self.app, self.max_body, self.max_import = app, max_body_bytes, max_import_bytes
        self.max_weights = max_weights_bytes or max_import_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if WEIGHTS_PATH.match(path):
            limit, what = self.max_weights, "a weights file"
        elif path.startswith(IMPORT_PATHS):
            limit, what = self.max_import, "an import"
        else:
            limit, what = self.max_body, "a request body"
        message = f"{what} may be at most {limit:,} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_error(send, 400, "Content-Length is not a number")
            if n > limit:
                return await _send_error(send, 413, f"{message}; this one is {n:,}")
        seen, started, refused = 0, False, False

        async def counted_receive():
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit and not refused:
                    # Answer now: the route's body parser would turn any exception raised here into its own 400.
                    refused = True
                    if not started:
                        await _send_error(send, 413, f"{message}; this one is larger")
                    raise _TooLarge()
            return msg

        async def tracked_send(msg):
            nonlocal started
            if refused:  # the 413 went out; whatever the route answers after it is dropped
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            pass


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(obj, path: str = "") -> str | None:
    """The JSON path of the first string holding a lone surrogate, or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            where = lone_surrogate(k, path) or lone_surrogate(v, f"{path}.{k}" if path else str(k))
            if where:
                return where
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if where := lone_surrogate(v, f"{path}[{i}]"):
                return where
    return None


class UnicodeJson:
    """A JSON body whose strings hold a lone surrogate ("\\ud800": valid JSON, not valid Unicode text) is
    refused here, naming the field, before any route stores it or fails to write it back (400 under /v1,
    as OpenAI answers, else 422). Only bodies containing such an escape are parsed here."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if b"json" not in headers.get(b"content-type", b"") or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body):
            try:
                where = lone_surrogate(json.loads(body))
            except (ValueError, RecursionError):
                where = None  # not JSON: the route says so
            if where:
                status = 400 if scope.get("path", "").startswith("/v1/") else 422
                message = f"{where} contains a lone surrogate (not valid Unicode text)"
                return await _send_error(send, status, message, extra={"error": {
                    "message": message, "type": "invalid_request_error", "param": where, "code": None}})
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def caller_of(pg, scope) -> str:
    """'user:ID' for a signed-in caller (valid key or session), else 'addr:HOST'."""
    request = Request(scope)
    cred = credentials(request.headers, request.cookies)
    user = None
    if cred:
        user = users.remembered_user(pg.db, *cred) or await run_in_threadpool(
            user_from_request, pg, request.headers, request.cookies)
    return f"user:{user.id}" if user else f"addr:{client_address(request)}"


class FairShare:
    def __init__(self, app, pg):
        self.app, self.pg = app, pg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope.get("method"), scope.get("path", "")
        pool = next((p for m, prefix, p in EXPENSIVE if m == method and path.startswith(prefix)), None)
        if pool is None:
            return await self.app(scope, receive, send)
        try:
            with self.pg.fairness.slot(pool, await caller_of(self.pg, scope)):
                await self.app(scope, receive, send)  # the slot is held until the last byte is sent
        except TooManyInFlight as e:
            await _send_error(send, 429, str(e), {"Retry-After": "1"})


def prompt_chars(body: dict) -> int:
    """Characters a /v1 request asks the model to read: its prompt(s), or its messages' text."""
    def count(x) -> int:
        if isinstance(x, str):
            return len(x)
        if isinstance(x, list):
            return sum(count(v) for v in x)
        if isinstance(x, dict):
            return sum(count(v) for k, v in x.items() if k in ("content", "text", "reasoning_content", "tool_steps",
                                                                   "input", "output"))
        return 0
    return count(body.get("prompt")) + count(body.get("messages")) + count(body.get("assistant_prefix"))


def too_long(body: dict, limit: int) -> str | None:
    """Why a prompt is refused before it is tokenized (tokenizing is the costly part), or None."""
    n = prompt_chars(body)
    return f"the prompt is {n:,} characters; this server takes at most {limit:,}" if n > limit else None
