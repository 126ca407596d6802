"""Entry point: FastAPI app with the Gradio UI at `/`, the OpenAI-compatible API at `/v1`, REST at `/api`.

    python app.py --host 127.0.0.1 --port 7860 --data-dir DIR
"""
from __future__ import annotations

import argparse
import logging

import gradio as gr
import uvicorn
from fastapi import FastAPI

from backend.api import register_routes
from backend.config import AppConfig
from backend.playground import Playground
from ui import build_ui


def build_app(cfg: AppConfig) -> FastAPI:
    pg = Playground(cfg)
    app = FastAPI(title="LLM Playground", version="0.1.0")
    app.state.pg = pg
    register_routes(app)
    app.add_event_handler("startup", pg.start)
    app.add_event_handler("shutdown", pg.stop)
    return gr.mount_gradio_app(app, build_ui(pg), path="/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    AppConfig.add_cli_args(parser)
    cfg = AppConfig.from_args(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    main()
