"""Trainers. Each is one plain function `KIND(config, app_cfg, on_event=None, stop=None)` that the CLI
(`python -m backend.train KIND ...`) and the job worker both call; `run` dispatches by name:

    pretrain (backend/train/pretrain.py): a GPT from scratch on a corpus.

    run("pretrain", {"preset": "cpu-5min", "max_seconds": 300}, app_cfg, on_event=print, stop=threading.Event())
"""
from __future__ import annotations

import threading
from typing import Callable

KINDS = ("pretrain",)


def run(kind: str, config: dict, app, on_event: Callable[[dict], None] | None = None,
        stop: threading.Event | None = None):
    """Run one training job of `kind` from a plain dict of config fields (a YAML file, a job row)."""
    if kind == "pretrain":
        from backend.train.pretrain import PretrainConfig, pretrain
        return pretrain(PretrainConfig.from_dict(config), app, on_event=on_event, stop=stop)
    raise ValueError(f"unknown training kind {kind!r}; kinds: {', '.join(KINDS)}")
