"""Entry point: FastAPI app with the Gradio UI at `/`, the OpenAI-compatible API at `/v1`, REST at `/api`.

    python app.py --host 127.0.0.1 --port 7860 --data-dir DIR
"""
from __future__ import annotations

import argparse
import logging
import os
from contextlib import asynccontextmanager

# Offline by default: no usage analytics calls from Gradio.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# OMP_WAIT_POLICY and friends (backend/runtime.py), before torch is imported; the worker inherits them.
from backend.runtime import apply_runtime_env  # noqa: E402

apply_runtime_env()

import gradio as gr
import uvicorn
from fastapi import FastAPI

from backend.api import register_routes
from backend.api.errors import install_error_handlers
from backend.api.guards import BodyLimit, FairShare, UnicodeJson
from backend.config import AppConfig
from backend.playground import Playground
from ui import build_ui


def build_app(cfg: AppConfig) -> FastAPI:
    pg = Playground(cfg)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        pg.start()
        yield
        pg.stop()

    app = FastAPI(title="LLM Playground", version="0.1.0", lifespan=lifespan)
    app.state.pg = pg
    register_routes(app)
    install_error_handlers(app)
    # Added last = runs first: the body limit answers before anything reads the body.
    app.add_middleware(FairShare, pg=pg)
    app.add_middleware(UnicodeJson)
    app.add_middleware(BodyLimit, max_body_bytes=cfg.max_body_bytes, max_import_bytes=cfg.max_import_bytes,
                       max_weights_bytes=cfg.max_weights_bytes)
    ui = build_ui(pg)
    # Gradio's queue polls for events every 1 ms (progress every 10 ms) while idle: ~7% of a core
    # doing nothing, and a tax on every API request. Gradio's own Windows defaults (50/100 ms) instead.
    # A private attribute (checked on gradio 6): skipped, not fatal, if a later gradio renames it.
    queue = getattr(ui, "_queue", None)
    if hasattr(queue, "sleep_when_free") and hasattr(queue, "progress_update_sleep_when_free"):
        queue.sleep_when_free, queue.progress_update_sleep_when_free = 0.05, 0.1
    return gr.mount_gradio_app(app, ui, path="/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    AppConfig.add_cli_args(parser)
    cfg = AppConfig.from_args(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
