"""EnginePool: one Engine per model name, loaded lazily through the registry and kept while used.

Each engine serves through its own continuous-batching scheduler; one compute thread runs all of them (the
process's, backend/serving/compute_thread.py), so on a small machine two models take turns step by step
instead of slowing each other down, and only that thread holds an OpenMP pool. Loads run on a short-lived
thread of their own: a model being loaded does not stop the others serving, and its OpenMP threads go away
when it is done.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

import torch

from backend.serving import q4_kernel
from backend.serving.decode_step import gguf_supported, load_packed, packed_file_name, save_packed
from backend.serving.engine import Engine
from backend.serving.compute_thread import run_in_short_thread, shared_compute
from backend.serving.scheduler import ServeConfig
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


QUANT_MODES = ("gguf", "gguf-torch", "none", "int8")


def engine_quant(device: torch.device) -> str:
    """Decode-time weights, PLAYGROUND_QUANT: "gguf" (default) decodes a GGUF-loaded model on the CPU with
    the file's own 4-bit blocks (backend/serving/decode_step.py; other models stay float) on our block kernel
    where the CPU has AVX512-VNNI or AVX2, else on torch's int4 kernel ("gguf-torch" forces that one), "none"
    decodes with the float weights, "int8" re-quantizes any float32 model to int8 rows (CPU only)."""
    q = os.environ.get("PLAYGROUND_QUANT", "").strip().lower() or "gguf"
    q = {"fp32": "none", "float32": "none", "float": "none"}.get(q, q)
    if q not in QUANT_MODES:
        raise ValueError(f"PLAYGROUND_QUANT must be one of {', '.join(QUANT_MODES)}, not {q!r}")
    return q if device.type == "cpu" else "none"


class EnginePool:
    def __init__(self, registry, cfg, max_loaded: int = 3, quant: str | None = "env", dtype: torch.dtype | None = None,
                 serve: ServeConfig | None = None):
        """quant: one of QUANT_MODES (None means "none"), or "env" to read PLAYGROUND_QUANT."""
        self.registry = registry
        self.cfg = cfg
        self.max_loaded = max_loaded
        self.serve = serve or getattr(cfg, "serve", None) or ServeConfig()
        self.compute = shared_compute()
        self.compute.use_threads(torch.get_num_threads())  # the app's --threads, set before the pool is made
        self.device = pick_device(cfg.device)
        self.dtype = dtype or engine_dtype(self.device)
        self.quant = engine_quant(self.device) if quant == "env" else (quant or "none")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)}, not {self.quant!r}")
        if self.quant == "int8":
            self.dtype = torch.float32  # int8 decoding quantizes float32 weights
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.load_seconds: dict[str, float] = {}

    def loaded(self) -> list[str]:
        return list(self._engines)

    def get_loaded(self, name: str) -> Engine:
        """A loaded engine (KeyError if it is not loaded): never starts a load."""
        return self._engines[name]

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
                self._engines.pop(name, None).close()
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
            from models.registry import GENERATES, require_role
            spec = require_role(self.registry.get(name), GENERATES, "generating text")  # before any load
            stamp = self._stamp(spec)
            if spec.kind == "remote":  # another server serves it (backend/serving/remote_engine.py): no weights to load
                from backend.serving.remote_engine import remote_engine
                eng = remote_engine(spec, self.cfg.data_dir)
                eng.disk_stamp = stamp
                with self._lock:
                    self._engines[name] = eng
                return eng
            t0 = time.perf_counter()
            eng = run_in_short_thread(lambda: self._load(spec), name=f"load-{name}")
            eng.disk_stamp = stamp
            self.load_seconds[name] = time.perf_counter() - t0
            quant, kernel = eng.step.quant, eng.step.kernel
            log.info("loaded model %s (%s, %s%s) in %.2fs", name, self.device, self.dtype,
                     f", {quant} decode{' on our kernel' if kernel else ''}" if quant else "", self.load_seconds[name])
            with self._lock:
                self._engines[name] = eng
                while len(self._engines) > self.max_loaded:
                    old, old_engine = self._engines.popitem(last=False)
                    old_engine.close()
                    log.info("unloaded model %s", old)
            return eng

    def _load(self, spec) -> Engine:
        name = spec.name
        model = self.registry.load(name, device=self.device, dtype=self.dtype)
        from models.tokenizers import get_encoding
        enc = get_encoding(spec.tokenizer, self.cfg.data_dir)
        quant, blocks, packed, pack_file, kernel = self._decode_weights(spec, model)
        eng = Engine(spec, model, enc, quant=quant, blocks=blocks, packed=packed, kernel=kernel,
                     serve=self.serve, compute=self.compute)
        if pack_file is not None and not packed:  # first load here: keep the packing for the next
            try:
                save_packed(pack_file, eng.step.packed)
            except OSError as e:
                log.warning("could not save %s: %s", pack_file, e)
        return eng

    def _decode_weights(self, spec, model):
        """(quant, GGUF blocks, packed kernel operands, file to keep them in, our block kernel or None) for
        an engine: the GGUF's own blocks where the model was loaded from one (the bundled model; its cache
        directory keeps them) and they can run here; else the float weights. Packing the blocks takes
        seconds, so the packed operands are kept beside them for the next load."""
        none = (None, None, None, None, None)
        if self.quant == "int8":
            return "int8", None, None, None, None
        if not (self.quant in ("gguf", "gguf-torch") and spec.kind == "bundled" and model.dtype == torch.float32
                and gguf_supported(model.device)):
            return none
        from models.gguf_loader import load_gguf_blocks
        kernel = q4_kernel.load(self.cfg.cache_dir / "kernels") if self.quant == "gguf" else None
        cache = self.cfg.cache_dir / spec.name  # where the registry loaded the model from
        pack_file = cache / packed_file_name(kernel is not None)
        packed = load_packed(pack_file)
        blocks = {} if packed else load_gguf_blocks(cache)
        return ("gguf", blocks, packed, pack_file, kernel) if packed or blocks else none

    def unload(self, name: str) -> None:
        """Forget a loaded engine (e.g. after the model was overwritten on disk); the next get reloads."""
        with self._lock:
            eng = self._engines.pop(name, None)
        if eng is not None:
            eng.close()
