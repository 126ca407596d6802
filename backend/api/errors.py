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
