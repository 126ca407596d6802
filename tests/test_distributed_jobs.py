"""The real worker runs jobs that ask for several processes under torchrun (2 gloo processes on this CPU): the job
succeeds with one model and one curve, a job asking for more processes than the worker offers fails saying so,
cancel stops every rank at a kept checkpoint, and a killed rank fails the job naming that rank."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from backend.config import AppConfig
from backend.db import Database
from backend.jobs import queue
from backend.train.pretrain import latest_checkpoint
from models.registry import ModelRegistry
from tests.test_worker import loss_steps, start_worker, stop, tiny_config, wait_for


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    data = tmp_path_factory.mktemp("distjobs") / "data"
    app = AppConfig(data_dir=data)
    app.ensure_dirs()
    db = Database(app.database_url)
    db.migrate()
    worker = start_worker(app, "--max-procs", "2")
    yield app, db
    stop(worker)
    db.close()


def ranks(job_id: int) -> dict[int, int]:
    """{rank: pid} of the job's live training processes (torchrun's children)."""
    pids = subprocess.run(["pgrep", "-f", "--", f"--job-id {job_id} "], capture_output=True, text=True).stdout.split()
    out = {}
    for pid in pids:
        try:
            environ = open(f"/proc/{pid}/environ").read().split("\0")
        except OSError:
            continue
        rank = [v.split("=", 1)[1] for v in environ if v.startswith("RANK=")]
        if rank:
            out[int(rank[0])] = int(pid)
    return out


def two(**kw) -> dict:
    return tiny_config(nproc=2, batch_size=4, **kw)


def test_a_two_process_job_runs_under_torchrun_with_one_curve_and_one_model(env):
    app, db = env
    job = queue.create_job(db, app, None, "pretrain", two(max_steps=12))
    done = wait_for(lambda: (j := queue.get_job(db, job["id"]))["state"] in queue.FINISHED and j, 240, "the job")
    assert done["state"] == "succeeded", done["error"]
    assert loss_steps(db, job["id"]) == list(range(1, 13))  # rank 0 alone reports: each step once
    log = [e["text"] for e in queue.job_detail(db, job["id"])["log"]]
    assert any("launching 2 processes with torchrun" in t for t in log)
    assert any("world size 2 (ddp, gloo)" in t for t in log)
    spec = ModelRegistry(app).get(done["model"])
    assert spec.lineage["job_id"] == job["id"] and spec.lineage["world_size"] == 2 and spec.lineage["steps"] == 12


def test_a_job_asking_for_more_processes_than_the_worker_offers_fails_saying_so(env):
    app, db = env
    with pytest.raises(ValueError, match="batch_size: 4 does not split evenly over nproc=3"):
        queue.create_job(db, app, None, "pretrain", tiny_config(nproc=3, batch_size=4, max_steps=2))
    job = queue.create_job(db, app, None, "pretrain", tiny_config(nproc=3, batch_size=6, max_steps=2))
    done = wait_for(lambda: (j := queue.get_job(db, job["id"]))["state"] in queue.FINISHED and j, 60, "the refusal")
    assert done["state"] == "failed" and "nproc: the job asks for 3 processes" in done["error"]
    assert "at most 2 (--max-procs 2)" in done["error"] and loss_steps(db, job["id"]) == []


def test_cancel_stops_every_rank_at_a_kept_checkpoint(env):
    app, db = env
    job = queue.create_job(db, app, None, "pretrain", two(max_seconds=300, checkpoint_every=1000))
    wait_for(lambda: queue.get_job(db, job["id"])["step"] >= 5, 180, "5 training steps")
    assert sorted(ranks(job["id"])) == [0, 1]
    queue.cancel_job(db, job["id"])
    wait_for(lambda: queue.get_job(db, job["id"])["state"] == "cancelled", 60, "the job to stop after cancel")
    cancelled = queue.get_job(db, job["id"])
    assert ranks(job["id"]) == {}  # every rank has exited
    run_dir = app.data_dir / "runs" / "pretrain" / cancelled["name"]
    assert latest_checkpoint(run_dir).name == f"ckpt-{cancelled['step']:07d}"
    assert ModelRegistry(app).get(cancelled["model"]).lineage["steps"] == cancelled["step"]
    assert loss_steps(db, job["id"]) == list(range(1, cancelled["step"] + 1))
    # resumed, the two processes continue from that checkpoint
    step = cancelled["step"]
    queue.resume_job(db, app, job["id"], overrides={"max_steps": step + 4, "max_seconds": 0})
    done = wait_for(lambda: (j := queue.get_job(db, job["id"]))["state"] in queue.FINISHED and j, 180, "the resumed job")
    assert done["state"] == "succeeded" and done["attempt"] == 2, done["error"]
    assert loss_steps(db, job["id"]) == list(range(1, step + 5))
    assert ModelRegistry(app).get(done["model"]).lineage["steps"] == step + 4


def test_a_killed_rank_fails_the_job_with_its_error(env):
    app, db = env
    job = queue.create_job(db, app, None, "pretrain", two(max_seconds=300, checkpoint_every=1000))
    wait_for(lambda: queue.get_job(db, job["id"])["step"] >= 3, 180, "3 training steps")
    pid = ranks(job["id"])[1]
    os.kill(pid, signal.SIGKILL)
    failed = wait_for(lambda: (j := queue.get_job(db, job["id"]))["state"] in queue.FINISHED and j, 90, "the failure")
    assert failed["state"] == "failed"
    assert failed["error"] == f"rank 1 (pid {pid}) was killed by signal 9 (SIGKILL)"
    assert failed["resumable"]
    deadline = time.monotonic() + 30
    while ranks(job["id"]) and time.monotonic() < deadline:  # torchrun stops the other rank
        time.sleep(0.2)
    assert ranks(job["id"]) == {}
