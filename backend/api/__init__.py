"""HTTP doors onto the backend services. Each module has a `router`; this list mounts them.

Add a router by adding one line to ROUTES; keep route logic in backend services, not here.
"""
from __future__ import annotations

from importlib import import_module

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from backend.serving.scheduler import QueueFull

# (module under backend.api, URL prefix)
ROUTES: list[tuple[str, str]] = [
    ("health", ""),
    ("tokenize", ""),
    ("auth", ""),
    ("labels", ""),
    ("review", ""),
    ("openai_api", ""),
    ("tokenizer_routes", ""),
    ("models_api", ""),
    ("tools", ""),
    ("jobs", ""),
    ("completion", ""),
    ("arena", ""),
    ("practice", ""),
    ("evals", ""),
]


def register_routes(app: FastAPI) -> None:
    from backend.api.openai_schema import APIError, api_error_handler
    app.add_exception_handler(APIError, api_error_handler)  # /v1's OpenAI-shaped errors
    for module, prefix in ROUTES:
        app.include_router(import_module(f"backend.api.{module}").router, prefix=prefix)
    app.add_exception_handler(QueueFull, queue_full)


async def queue_full(_request: Request, exc: QueueFull) -> JSONResponse:
    """Every door's answer when a model's scheduler has too many requests waiting (OpenAI's error shape)."""
    return JSONResponse({"error": {"message": str(exc), "type": "server_error", "param": None, "code": "queue_full"},
                         "detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})
