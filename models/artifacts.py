"""Artifacts shared between machines: models (with their trained tokenizers) and dataset snapshots under
one fsspec URL (`PLAYGROUND_ARTIFACTS` / --artifacts: file:///shared/path, s3://bucket/prefix, ...).

Layout under the root:  models/<name>/{config.json, model.safetensors, playground.json, tokenizer/...}
                        snapshots/<sha256>.jsonl
Object stores have no atomic rename, so `playground.json` is the commit marker: it is written last
(and removed first on delete or overwrite), and a model directory without it is invisible. Each
publication carries a fresh `artifact_version`; a machine downloads a version once into its cache
(<cache_dir>/artifacts/<name>-<version>) and loads it from there, so re-publishing a name is noticed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec

MARKER = "playground.json"
TOKENIZER_DIR = "tokenizer"  # a trained encoding's files travel with the model that uses it


class ArtifactStore:
    def __init__(self, url: str, cache_dir: Path):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.cache_dir = Path(cache_dir) / "artifacts"

    def _models(self) -> str:
        return f"{self.root}/models"

    # -- models --------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        try:
            entries = self.fs.ls(self._models(), detail=False)
        except FileNotFoundError:
            return []
        names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [n for n in names if not n.startswith(".") and self.fs.exists(f"{self._models()}/{n}/{MARKER}")]

    def read_meta(self, name: str) -> dict | None:
        """The model's playground.json, or None when no model of that name is published."""
        try:
            with self.fs.open(f"{self._models()}/{name}/{MARKER}", "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.fs.exists(f"{self._models()}/{name}/{MARKER}")

    def local_path(self, name: str, meta: dict) -> Path:
        return self.cache_dir / f"{name}-{meta.get('artifact_version', 'v0')}"

    def fetch(self, name: str, meta: dict) -> Path:
        """The published model in the local cache, downloaded on first use (atomically: temp dir + rename)."""
        target = self.local_path(name, meta)
        if (target / MARKER).exists():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=self.cache_dir))
        try:
            src = f"{self._models()}/{name}"
            for path in self.fs.find(src):
                rel = path[len(src) + 1:]
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(tmp / rel))
            if json.loads((tmp / MARKER).read_text()).get("artifact_version") != meta.get("artifact_version"):
                raise OSError(f"model {name!r} was re-published while it downloaded; try again")
            tmp.chmod(0o755)
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / MARKER).exists():  # not a lost race with another loader
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def publish(self, name: str, local_dir: Path, overwrite: bool) -> None:
        """Upload a model directory; playground.json (with a new artifact_version) last."""
        from models.registry import ModelExists
        dest = f"{self._models()}/{name}"
        if self.exists(name):
            if not overwrite:
                raise ModelExists(f"a model named {name!r} already exists in {self.url}")
            self.delete(name)
        meta = json.loads((Path(local_dir) / MARKER).read_text())
        meta["artifact_version"] = uuid.uuid4().hex[:16]
        for p in sorted(Path(local_dir).rglob("*")):
            if p.is_file() and p.name != MARKER:
                self.fs.makedirs(f"{dest}/{p.parent.relative_to(local_dir).as_posix()}".rstrip("/."), exist_ok=True)
                self.fs.put_file(str(p), f"{dest}/{p.relative_to(local_dir).as_posix()}")
        with self.fs.open(f"{dest}/{MARKER}", "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")

    def delete(self, name: str) -> None:
        dest = f"{self._models()}/{name}"
        try:
            self.fs.rm(f"{dest}/{MARKER}")  # invisible at once; then the rest
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(dest, recursive=True)
        except FileNotFoundError:
            pass

    # -- dataset snapshots ---------------------------------------------------------------------
    def put_snapshot(self, digest: str, data: bytes) -> str:
        """Write snapshots/<digest>.jsonl once (content-addressed) and return its URL."""
        path = f"{self.root}/snapshots/{digest}.jsonl"
        if not self.fs.exists(path):
            self.fs.makedirs(f"{self.root}/snapshots", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        return self.fs.unstrip_protocol(path)


def read_url(url: str) -> bytes:
    """The bytes of a local path or any fsspec URL (what a snapshot row's path holds)."""
    with fsspec.open(url, "rb") as f:
        return f.read()


def bundle_tokenizer(tokenizer: str, data_dir: Path, dest: Path) -> None:
    """Copy a trained encoding's files (for `name` or `name+chatml`) into dest/tokenizer/."""
    from models.tokenizers import _trained_paths
    base = tokenizer.split("+", 1)[0]
    files = [p for p in _trained_paths(base, data_dir) if p.exists()]
    if len(files) == 2:
        (dest / TOKENIZER_DIR).mkdir(exist_ok=True)
        for p in files:
            shutil.copy2(p, dest / TOKENIZER_DIR / p.name)


def install_tokenizer(model_dir: Path, data_dir: Path) -> None:
    """Put a model's bundled encoding files into data_dir/tokenizers/ unless that encoding is there already."""
    src = Path(model_dir) / TOKENIZER_DIR
    if not src.is_dir():
        return
    dest = Path(data_dir) / "tokenizers"
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if not (dest / p.name).exists():
            tmp = dest / f".{p.name}.tmp-{os.getpid()}"
            shutil.copy2(p, tmp)
            os.replace(tmp, dest / p.name)
