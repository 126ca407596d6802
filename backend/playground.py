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
        from backend.serving.model_pool import EnginePool
        from models.registry import ModelRegistry
        if cfg.threads > 0:
            import torch
            torch.set_num_threads(cfg.threads)
        self.registry = ModelRegistry(cfg)
        self.engines = EnginePool(self.registry, cfg)
        self.model_error: str | None = None
        from backend.tools import PythonTool, SearchIndex
        self.search = SearchIndex(self.db, web_url=cfg.web_search_url)  # the search tool's index (+ web)
        self.sandbox = PythonTool()  # the Python tool: runs code in backend.tools.sandbox
        from backend.fairness import Fairness
        from backend.throttle import LoginThrottle
        self.throttle = LoginThrottle()  # failed sign-ins per account and per client address
        self.fairness = Fairness({"generation": cfg.max_requests_per_user, "sandbox": cfg.max_sandbox_runs_per_user})
        self.worker = None  # the training worker process (backend/worker.py); the server itself never trains
        # readiness of the default model: "loading" while it loads in the background, then "ready" or "failed"
        self.model_state = "loading" if cfg.preload else "not preloaded"

    def start(self) -> None:
        """Called once when the server starts (after the app is built)."""
        from backend.labels.exchange import drop_staged
        drop_staged(self.db)  # rows of imports staged but never published (the server died mid-import)
        if self.cfg.start_worker:
            from backend.worker import spawn_worker
            self.worker = spawn_worker(self.cfg)
        if self.cfg.preload:  # in the background: the HTTP server answers (/healthz, the UI) meanwhile
            import threading
            threading.Thread(target=self._preload, daemon=True, name="preload").start()

    def _preload(self) -> None:
        try:
            self.engines.get(self.cfg.default_model)
            self.model_state = "ready"
        except Exception as e:  # the UI and other models still work; /readyz says what failed
            self.model_error = f"{type(e).__name__}: {e}"
            self.model_state = "failed"
            log.exception("could not load the default model %s", self.cfg.default_model)

    def stop(self) -> None:
        """Called once when the server stops."""
        if self.worker is not None:
            from backend.worker import stop_worker
            stop_worker(self.worker)

    @property
    def ready(self) -> bool:
        return self.model_state in ("ready", "not preloaded")

    def readiness(self) -> dict:
        """What /readyz and the UI's status line say: is the default model loaded yet?"""
        note = {"loading": f"loading model {self.cfg.default_model}…",
                "failed": f"the default model {self.cfg.default_model} could not be loaded: {self.model_error}",
                }.get(self.model_state, "")
        return {"ready": self.ready, "state": self.model_state, "default_model": self.cfg.default_model,
                "message": note, "serving": {name: eng.scheduler.stats() for name in self.engines.loaded()
                                             if (eng := self.engines.get_loaded(name)) and hasattr(eng, "scheduler")}}

    def health(self) -> dict:
        return {"status": "ok", "default_model": self.cfg.default_model, "loaded_models": self.engines.loaded(),
                "model_state": self.model_state, "model_error": self.model_error,
                "worker": None if self.worker is None else (
                    "running" if self.worker.poll() is None else f"exited with code {self.worker.returncode}")}
