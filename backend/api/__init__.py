"""HTTP doors onto the backend services. Each module has a `router`; this list mounts them.

Add a router by adding one line to ROUTES; keep route logic in backend services, not here.
"""
from __future__ import annotations

from importlib import import_module

from fastapi import FastAPI

# (module under backend.api, URL prefix)
ROUTES: list[tuple[str, str]] = [
    ("health", ""),
    ("tokenize", ""),
    ("auth", ""),
    ("labels", ""),
    ("openai_api", ""),
    ("tokenizer_routes", ""),
    ("models_api", ""),
    ("tools", ""),
    ("jobs", ""),
    ("completion", ""),
    ("arena", ""),
    ("practice", ""),
]


def register_routes(app: FastAPI) -> None:
    from backend.api.openai_schema import APIError, api_error_handler
    app.add_exception_handler(APIError, api_error_handler)  # /v1's OpenAI-shaped errors
    for module, prefix in ROUTES:
        app.include_router(import_module(f"backend.api.{module}").router, prefix=prefix)
