"""The Playground: every backend service, built once from the config.

The HTTP API (via `request.app.state.pg`), the Gradio tabs (passed `pg`) and the CLIs share this one
object, so there is one registry of models, one engine pool and one database.
"""
from __future__ import annotations

import logging

from backend.config import AppConfig

log = logging.getLogger(__name__)


class Playground:
    def __init__(self, cfg: AppConfig):
        cfg.ensure_dirs()
        self.cfg = cfg
        from backend.db import Database
        self.db = Database(cfg.database_url)
        self.db.migrate()  # every start brings the schema to the newest migration

    def start(self) -> None:
        """Called once when the server starts (after the app is built)."""

    def stop(self) -> None:
        """Called once when the server stops."""

    def health(self) -> dict:
        return {"status": "ok"}
