"""Dataset snapshots: an export frozen into a read-only file named by the sha256 of its bytes.

A training job reads a snapshot by hash; the job and the model it makes record that hash, so every
model traces back to the labels that made it. The same content snapshotted twice is one snapshot.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sqlalchemy import select

from backend.db import Database
from backend.db.models import Snapshot
from backend.labels.exchange import export, to_jsonl
from backend.users import CurrentUser


def _payload(r: Snapshot) -> dict:
    return {"id": r.id, "name": r.name, "kind": r.kind, "hash": r.content_hash, "path": r.path, "rows": r.rows,
            "meta": r.meta, "created_at": r.created_at.isoformat()}


def create_snapshot(db: Database, data_dir: Path, user: CurrentUser, kind: str, name: str = "",
                    set_id: int | None = None, artifacts_url: str | None = None) -> dict:
    """artifacts_url (AppConfig.artifacts_url): write the file there (models/artifacts.py), so workers on
    other machines read it; else under data_dir/snapshots."""
    rows = export(db, kind, set_id)
    if not rows:
        raise ValueError(f"nothing to snapshot: the {kind} export is empty")
    return snapshot_rows(db, data_dir, kind, rows, name, {"set_id": set_id}, user.id, artifacts_url)


def snapshot_rows(db: Database, data_dir: Path, kind: str, rows: list[dict], name: str = "", meta: dict | None = None,
                  user_id: int | None = None, artifacts_url: str | None = None) -> dict:
    """Freeze `rows` (an export, or rows a trainer wrote itself, e.g. the "I don't know" examples) into a
    snapshot; the same rows give the same hash and the existing snapshot."""
    if not rows:
        raise ValueError(f"nothing to snapshot: no {kind} rows")
    data = to_jsonl(rows).encode()
    digest = hashlib.sha256(data).hexdigest()
    with db.session() as s:
        existing = s.scalar(select(Snapshot).where(Snapshot.content_hash == digest))
        if existing is not None:
            return _payload(existing)
        if artifacts_url:
            from models.artifacts import ArtifactStore
            path = ArtifactStore(artifacts_url, Path(data_dir)).put_snapshot(digest, data)
        else:
            path = Path(data_dir) / "snapshots" / f"{digest}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
        if not isinstance(path, str) and not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)  # the file appears whole or not at all
        row = Snapshot(name=name or f"{kind}-{digest[:8]}", kind=kind, content_hash=digest, path=str(path),
                       rows=len(rows), meta=meta or {}, created_by=user_id)
        s.add(row)
        s.flush()
        return _payload(row)


def list_snapshots(db: Database) -> list[dict]:
    with db.read() as s:
        return [_payload(r) for r in s.scalars(select(Snapshot).order_by(Snapshot.id))]


def get_snapshot(db: Database, content_hash: str) -> dict:
    with db.read() as s:
        r = s.scalar(select(Snapshot).where(Snapshot.content_hash == content_hash))
        if r is None:
            raise LookupError(f"no snapshot {content_hash}")
        return _payload(r)


def read_snapshot(db: Database, content_hash: str) -> list[dict]:
    """The rows of a snapshot, after checking the file still hashes to its name (what trainers call)."""
    info = get_snapshot(db, content_hash)
    if "://" in info["path"]:  # in a shared artifact store
        from models.artifacts import read_url
        data = read_url(info["path"])
    else:
        data = Path(info["path"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != content_hash:
        raise ValueError(f"snapshot {content_hash} was modified on disk; refusing to read it")
    return [json.loads(line) for line in data.decode().splitlines() if line]
