"""Every post-training kind runs as a job through the real worker process on a real SQLite file and
registers its model with lineage (parent model, snapshot hash, job id); SFT reads a labeling snapshot and RLHF
optimises against the model the reward job made."""
from __future__ import annotations

import json

import pytest

from backend.config import AppConfig
from backend.db import Database
from backend.jobs import queue
from models.registry import ModelRegistry
from models.tokenizers import get_encoding, save_encoding
from tests.helpers import make_tiny_model
from tests.test_trainers import byte_encoding
from tests.test_worker import start_worker, stop, wait_for

TINY = {"parent_model": "tiny", "threads": 1, "warmup_steps": 1}
CONFIGS = {
    "sft": {**TINY, "max_steps": 3, "batch_size": 2, "seq_len": 320, "lr": 1e-3, "dataset": "snapshot"},
    "reward": {**TINY, "max_steps": 3, "batch_size": 2, "n_examples": 20, "max_len": 96, "eval_every": 3},
    "dpo": {**TINY, "max_steps": 3, "batch_size": 2, "n_examples": 10, "max_len": 96},
    "grpo": {**TINY, "max_steps": 2, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 6,
             "n_heldout": 2, "eval_tokens": 4, "eval_every": 2},
}
RLHF = {**TINY, "max_steps": 2, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 6, "n_heldout": 2,
        "eval_every": 2}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    data = tmp_path_factory.mktemp("trainer-jobs") / "data"
    app = AppConfig(data_dir=data)
    app.ensure_dirs()
    db = Database(app.database_url)
    db.migrate()
    save_encoding(byte_encoding(), "bytes", data)
    enc = get_encoding("bytes+chatml", data)
    ModelRegistry(app).register("tiny", make_tiny_model(enc.max_token_value + 1, max_seq_len=1024), "bytes+chatml",
                                "chatml", {"origin": "test"})
    yield app, db
    db.close()


def sft_snapshot(app, db) -> str:
    from backend.datasets.tool_use import conversations
    from backend.labels.exchange import import_jsonl
    from backend.labels.snapshots import create_snapshot
    from backend.users import add_user
    op, _, _ = add_user(db, "op", "operator")
    rows = conversations(12, seed=5)
    import_jsonl(db, op, "sft", "".join(json.dumps(r) + "\n" for r in rows))
    return create_snapshot(db, app.data_dir, op, "sft")["hash"]


def test_each_kind_runs_as_a_job_and_registers_its_model_with_lineage(env):
    app, db = env
    snap = sft_snapshot(app, db)
    jobs = {kind: queue.create_job(db, app, None, kind, cfg, snapshot=snap if kind == "sft" else None)
            for kind, cfg in CONFIGS.items()}
    worker = start_worker(app)
    try:
        for kind, job in jobs.items():
            wait_for(lambda: queue.get_job(db, job["id"])["state"] in queue.FINISHED, 300, f"the {kind} job")
            done = queue.job_detail(db, job["id"])
            assert done["state"] == "succeeded", (kind, done["error"], [e["text"] for e in done["log"]][-12:])
            spec = ModelRegistry(app).get(done["model"])
            assert spec.lineage["job_id"] == job["id"] and spec.lineage["parent_model"] == "tiny", kind
            assert spec.lineage["kind"] == kind
            assert any("loss" in m for m in queue.job_events(db, job["id"], kinds=("metric",)))
            # what it did before its first step is reported (the progress line shows it while it lasts)
            assert any(e["text"] == "loading the parent model…" for e in queue.job_events(db, job["id"], kinds=("log",))), kind
            assert done["progress"]["fraction"] == 1 and done["progress"]["next"], kind
        assert ModelRegistry(app).get(queue.get_job(db, jobs["sft"]["id"])["model"]).lineage["snapshot_hash"] == snap
        # RLHF optimises against a reward model, so it is queued once the reward job has registered one
        rm = queue.get_job(db, jobs["reward"]["id"])["model"]
        job = queue.create_job(db, app, None, "rlhf", {**RLHF, "reward_model": rm})
        wait_for(lambda: queue.get_job(db, job["id"])["state"] in queue.FINISHED, 300, "the rlhf job")
        done = queue.job_detail(db, job["id"])
        assert done["state"] == "succeeded", (done["error"], [e["text"] for e in done["log"]][-12:])
        lineage = ModelRegistry(app).get(done["model"]).lineage
        assert (lineage["kind"], lineage["job_id"], lineage["reward_model"]) == ("rlhf", job["id"], rm)
        metrics = queue.job_events(db, job["id"], kinds=("metric",))
        assert [m["kl"] for m in metrics if "rm_score" in m][0] == 0.0  # the policy starts as its reference
        assert any("held_out_rm_score" in m for m in metrics)
    finally:
        stop(worker)
