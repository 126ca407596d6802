"""Service exceptions to HTTP answers, one rule for every REST module.

Services raise ValueError for bad input (422, the message names the field) and LookupError for
something missing (404), PermissionError for another user's record (403); a module may name exceptions that mean "not available right now" (503).
"""
from __future__ import annotations

from contextlib import contextmanager

from fastapi import HTTPException


@contextmanager
def service_errors(unavailable: tuple[type[BaseException], ...] = ()):
    try:
        yield
    except ValueError as e:
        detail = getattr(e, "http_detail", None)  # a structured 422 body, e.g. an import's line errors
        raise HTTPException(422, detail() if callable(detail) else str(e))
    except LookupError as e:
        raise HTTPException(404, str(e).strip("'\""))
    except PermissionError as e:  # the record exists but is someone else's
        raise HTTPException(403, str(e))
    except unavailable as e:
        raise HTTPException(503, str(e))


# ---- one error serialiser ---------------------------------------------------------------------------
# Every error body goes through here. It cannot fail on what it reports: a lone surrogate ("\ud800"),
# bytes, an exception object or a 50 MB value each become a short, valid, ASCII-escaped JSON string.
MAX_SHOWN = 200


def _plain(value, depth: int = 0):
    if value is None or isinstance(value, (bool, int, float)):
        return value if not isinstance(value, float) or value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + f"… ({len(value):,} characters)"
    if depth > 6:
        return "…"
    if isinstance(value, dict):
        return {str(_plain(k, depth + 1)): _plain(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in list(value)[:50]]
    if isinstance(value, (bytes, bytearray)):
        return _plain(bytes(value[:MAX_SHOWN]).decode("utf-8", "backslashreplace"), depth)
    return _plain(repr(value)[:MAX_SHOWN], depth)


def error_body(status: int, message, extra: dict | None = None) -> bytes:
    """{"detail": ..., "error": {"message", "type", ...}}: the REST shape and the OpenAI shape in one body."""
    import json
    detail = _plain(message)
    text = detail if isinstance(detail, str) else (detail.get("message") if isinstance(detail, dict) else None)
    text = text if isinstance(text, str) else json.dumps(detail, ensure_ascii=True)[:MAX_SHOWN]
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"detail": detail, "error": {"message": text, "type": kind, "param": None, "code": None}, **(extra or {})}
    return json.dumps(_plain(body), ensure_ascii=True).encode("ascii")


def error_response(status: int, message, headers: dict | None = None, extra: dict | None = None):
    from fastapi.responses import Response
    return Response(error_body(status, message, extra), status_code=status, headers=headers,
                    media_type="application/json")


def install_error_handlers(app) -> None:
    """422s for bad requests and every HTTPException answered by error_response."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def validation(request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", ""),
                   "input": e.get("input")} for e in exc.errors()]
        where = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else ""
        first = f"{where}: {errors[0]['msg']}" if errors else "invalid request"
        return error_response(422, errors, extra={"error": {"message": first, "type": "invalid_request_error",
                                                            "param": where or None, "code": None}})

    async def http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, exc.detail, headers=getattr(exc, "headers", None))

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
