"""Two machines, one PostgreSQL, one shared artifact location: a model that worker B trains chats through app A.

Each side has its own data directory and its own cache (as two machines would); they share only the
database (a throwaway PostgreSQL cluster, started and stopped here) and an fsspec URL (a local dir).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import openai
import pytest

from backend.config import AppConfig
from backend.jobs import queue
from models.registry import ModelRegistry
from tests.conftest import ROOT, start_server
from tests.helpers import make_tiny_model
from tests.test_db_postgres import fresh_database, pg_server  # noqa: F401 - the module-scoped cluster fixture
from tests.test_labels_api import make_users
from tests.test_trainers import byte_encoding
from tests.test_worker import stop, wait_for


def side(tmp_path, name: str, db_url: str, artifacts: str) -> tuple[AppConfig, dict]:
    """One machine: its data dir, its cache, and the environment its processes run with."""
    data = tmp_path / name
    cfg = AppConfig(data_dir=data, database_url=db_url, artifacts_url=artifacts, cache_dir=data / "cache")
    cfg.ensure_dirs()
    env = {**os.environ, "DATABASE_URL": db_url, "PLAYGROUND_ARTIFACTS": artifacts,
           "PLAYGROUND_CACHE_DIR": str(data / "cache"), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return cfg, env


def test_model_trained_by_worker_b_chats_through_app_a(pg_server, tmp_path):  # noqa: F811
    from backend.datasets.tool_use import conversations
    from backend.labels.exchange import import_jsonl
    from backend.labels.snapshots import create_snapshot
    from models.tokenizers import get_encoding, save_encoding

    db = fresh_database(pg_server)
    url = db.engine.url.render_as_string(hide_password=False)
    shared = (tmp_path / "shared").as_uri()
    cfg_a, env_a = side(tmp_path, "a", url, shared)
    cfg_b, env_b = side(tmp_path, "b", url, shared)

    # B publishes the parent model; its trained byte-level tokenizer travels inside the artifact
    save_encoding(byte_encoding(), "bytes", cfg_b.data_dir)
    enc = get_encoding("bytes+chatml", cfg_b.data_dir)
    ModelRegistry(cfg_b).register("tiny", make_tiny_model(enc.max_token_value + 1, max_seq_len=1024), "bytes+chatml",
                                  "chatml", {"origin": "test"})
    assert not any(cfg_b.models_dir.iterdir())  # published to the shared location, not B's data dir

    # A's operator snapshots labels (into the shared location) and queues SFT on them
    op, _, _ = make_users(db, [("op", "operator")])["op"]
    import_jsonl(db, op, "sft", "".join(json.dumps(r) + "\n" for r in conversations(12, seed=5)))
    snap = create_snapshot(db, cfg_a.data_dir, op, "sft", artifacts_url=cfg_a.artifacts_url)
    assert snap["path"].startswith(shared + "/snapshots/")
    job = queue.create_job(db, cfg_a, op, "sft", {"parent_model": "tiny", "threads": 1, "warmup_steps": 1,
                                                  "max_steps": 3, "batch_size": 2, "seq_len": 320, "lr": 1e-3,
                                                  "dataset": "snapshot"}, snapshot=snap["hash"])

    # worker B, on its own data dir, takes the job from PostgreSQL and publishes the model it trains
    log = open(tmp_path / "worker-b.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "backend.worker", "--data-dir", str(cfg_b.data_dir),
                               "--threads", "1", "--poll", "0.2"], cwd=ROOT, env=env_b, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: queue.get_job(db, job["id"])["state"] in queue.FINISHED, 300, "the sft job on worker B")
    finally:
        stop(worker)
    done = queue.job_detail(db, job["id"])
    assert done["state"] == "succeeded", (done["error"], (tmp_path / "worker-b.log").read_text()[-3000:])
    name = done["model"]
    assert not any(cfg_b.models_dir.iterdir())

    # app A lists it (same database, same artifacts) and chats with it over HTTP
    a = start_server(cfg_a.data_dir, "--no-worker", "--no-preload", env=env_a)
    try:
        listed = {m["name"]: m for m in httpx.get(a.base_url + "/api/models").json()["models"]}
        assert name in listed and listed[name]["lineage"]["job_id"] == job["id"]
        assert listed[name]["lineage"]["snapshot_hash"] == snap["hash"]
        client = openai.OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, temperature=0, logprobs=True)
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length") and len(choice.logprobs.content) >= 1
    finally:
        a.stop()
    # A downloaded the published version into its own cache and installed the tokenizer it needs
    cached = sorted(p.name for p in (cfg_a.cache_dir / "artifacts").iterdir() if not p.name.startswith("."))
    assert any(p.startswith(name + "-") for p in cached), cached
    assert (cfg_a.tokenizers_dir / "bytes.tiktoken").exists()
    assert not any(cfg_a.models_dir.iterdir())
    db.close()


def test_a_model_directory_without_its_marker_is_invisible_and_delete_is_shared(tmp_path):
    """Half-uploaded models (no playground.json yet) are not listed; deleting on one side deletes for all."""
    shared = (tmp_path / "shared").as_uri()
    a = ModelRegistry(AppConfig(data_dir=tmp_path / "a", artifacts_url=shared, cache_dir=tmp_path / "a" / "cache"))
    b = ModelRegistry(AppConfig(data_dir=tmp_path / "b", artifacts_url=shared, cache_dir=tmp_path / "b" / "cache"))
    (tmp_path / "shared" / "models" / "half").mkdir(parents=True)
    (tmp_path / "shared" / "models" / "half" / "model.safetensors").write_bytes(b"partial")
    from tests.helpers import vocab_size_for
    model = make_tiny_model(vocab_size_for("cl100k_base+chatml"), n_layers=1)
    a.register("m1", model, "cl100k_base+chatml", "chatml", {})
    assert [n for n in b.names() if n != "smollm2-135m-instruct"] == ["m1"]
    v1 = b.get("m1").path
    a.register("m1", make_tiny_model(vocab_size_for("cl100k_base+chatml"), n_layers=1, seed=3), "cl100k_base+chatml",
               "chatml", {}, overwrite=True)
    v2 = b.get("m1").path
    assert v1 != v2  # a re-published name is a new version: the next get downloads it again
    # files added after registration (a reward head) and lineage a job adds reach the other side too
    from backend.jobs.pretrain import add_lineage
    a.amend("m1", lambda d: (d / "reward_head.safetensors").write_bytes(b"head"))
    add_lineage(a.cfg, "m1", {"job_id": 7})
    spec = b.get("m1")
    assert (spec.path / "reward_head.safetensors").read_bytes() == b"head" and spec.lineage["job_id"] == 7
    b.delete("m1")
    assert "m1" not in a.names()
