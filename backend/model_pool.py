"""EnginePool: one Engine per model name, loaded lazily through the registry and kept while used.

All engines share one single-flight guard: on a small machine two models decoding at once only slow
each other down, so requests for any model queue in arrival order.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

import torch

from backend.engine import Engine, SingleFlight
from models.device import pick_device

log = logging.getLogger(__name__)


def engine_dtype(device: torch.device) -> torch.dtype:
    """Inference dtype. CPU: float32 unless PLAYGROUND_DTYPE says otherwise. On this project's CPUs
    (AMX/avx512_bf16) bf16 weights measured slower than float32 for single-stream decoding and faster
    for 8 samples at once (backend/bench/decode.py); float32 also keeps outputs exact to the reference."""
    forced = os.environ.get("PLAYGROUND_DTYPE")
    if forced:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[forced]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def engine_quant(device: torch.device) -> str | None:
    """Decode-time weight quantization: PLAYGROUND_QUANT=int8 opts in (CPU only); default none (float)."""
    q = os.environ.get("PLAYGROUND_QUANT", "").strip().lower() or None
    if q in (None, "none", "fp32", "float32"):
        return None
    if q != "int8":
        raise ValueError(f"PLAYGROUND_QUANT must be 'int8' or 'none', not {q!r}")
    return q if device.type == "cpu" else None


class EnginePool:
    def __init__(self, registry, cfg, max_loaded: int = 3, quant: str | None = "env", dtype: torch.dtype | None = None):
        self.registry = registry
        self.cfg = cfg
        self.max_loaded = max_loaded
        self.guard = SingleFlight()
        self.device = pick_device(cfg.device)
        self.dtype = dtype or engine_dtype(self.device)
        self.quant = engine_quant(self.device) if quant == "env" else quant
        if self.quant:
            self.dtype = torch.float32  # int8 decoding quantizes float32 weights
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.load_seconds: dict[str, float] = {}

    def loaded(self) -> list[str]:
        return list(self._engines)

    @staticmethod
    def _stamp(spec) -> tuple | None:
        """Identity of a model directory on disk: re-registering a name (overwrite) replaces the directory."""
        if spec.kind == "bundled" or spec.path is None:
            return None
        try:
            st = spec.path.stat()
        except OSError:
            return ("gone",)
        return (st.st_ino, st.st_mtime_ns)

    def _current(self, name: str) -> Engine | None:
        with self._lock:
            eng = self._engines.get(name)
            if eng is None:
                return None
            if self._stamp(eng.spec) != eng.disk_stamp:  # overwritten or deleted since it was loaded
                self._engines.pop(name, None)
                return None
            self._engines.move_to_end(name)
            return eng

    def get(self, name: str) -> Engine:
        """The engine for a registry name (UnknownModel, a ValueError, when there is none).

        A model re-registered under the same name since it was loaded is loaded again."""
        eng = self._current(name)
        if eng is not None:
            return eng
        with self._lock:
            load_lock = self._loading.setdefault(name, threading.Lock())
        with load_lock:  # one load per name; other callers wait for it
            eng = self._current(name)
            if eng is not None:
                return eng
            spec = self.registry.get(name)
            stamp = self._stamp(spec)
            t0 = time.perf_counter()
            model = self.registry.load(name, device=self.device, dtype=self.dtype)
            from models.tokenizers import get_encoding
            enc = get_encoding(spec.tokenizer, self.cfg.data_dir)
            eng = Engine(spec, model, enc, guard=self.guard, quant=self.quant)
            eng.disk_stamp = stamp
            self.load_seconds[name] = time.perf_counter() - t0
            log.info("loaded model %s (%s, %s%s) in %.2fs", name, self.device, self.dtype,
                     ", int8 decode" if self.quant else "", self.load_seconds[name])
            with self._lock:
                self._engines[name] = eng
                while len(self._engines) > self.max_loaded:
                    old, _ = self._engines.popitem(last=False)
                    log.info("unloaded model %s", old)
            return eng

    def unload(self, name: str) -> None:
        """Forget a loaded engine (e.g. after the model was overwritten on disk); the next get reloads."""
        with self._lock:
            self._engines.pop(name, None)
