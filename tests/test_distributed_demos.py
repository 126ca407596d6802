"""idk and distill (the trainers that write their own SFT data) under torchrun with 2 gloo processes on CPU, against
the same run in 1 process: rank 0 alone writes the examples, so both runs freeze the same snapshot (same content
hash, same rows); the SFT on it follows the 1-process loss curve (to tests/test_distributed.TOL); rank 0 alone
reports and registers one model with its before/after table; and jobs asking for nproc=2 run through the real
worker under torchrun: an idk job succeeds, a distill job whose teacher writes nothing right fails with that error,
and cancel during the probe stops every rank before training."""
from __future__ import annotations

import pytest
import yaml

from backend.config import AppConfig
from backend.db import Database
from backend.jobs import queue
from backend.labels.snapshots import read_snapshot
from models.registry import ModelRegistry
from models.tokenizers import get_encoding, save_encoding
from tests.helpers import make_tiny_model
from tests.scripted import byte_encoding, register_rambler, register_scripted
from tests.test_distributed import assert_same, curve, metrics, train
from tests.test_distributed_jobs import ranks
from tests.test_idk_distill import THINK, THINKER
from tests.test_worker import start_worker, stop, wait_for

ROMER = {"\n": "Rome.", "Rome.": "<|im_end|>"}  # answers "Rome." to everything: knows one question in each split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data directory with the scripted "romer" (idk's parent), the scripted "thinker" (distill's teacher: it
    thinks, then answers 2) and a tiny "student"."""
    data = tmp_path_factory.mktemp("distdemos") / "data"
    app = AppConfig(data_dir=data)
    app.ensure_dirs()
    register_scripted(data, "romer", ["Rome."], ROMER, tools=False)
    register_scripted(data, "thinker", THINK, THINKER)
    save_encoding(byte_encoding(), "bytes", data)
    enc = get_encoding("bytes+chatml", data)
    ModelRegistry(app).register("student", make_tiny_model(enc.max_token_value + 1, max_seq_len=1024),
                                "bytes+chatml", "chatml", {"origin": "test"})
    return data


IDK = {"parent_model": "romer", "n_samples": 2, "max_new_tokens": 6, "max_steps": 3, "batch_size": 2,
       "seq_len": 192, "eval_every": 1, "lr": 1e-3, "warmup_steps": 0, "threads": 1, "doubt": 0, "sure_quantile": 0}
DISTILL = {"parent_model": "student", "teacher": "thinker", "kinds": ["count"], "n_problems": 30, "n_samples": 2,
           "teacher_max_tokens": 16, "n_heldout": 2, "eval_tokens": 4, "max_steps": 2, "batch_size": 2,
           "seq_len": 1024, "lr": 1e-3, "warmup_steps": 0, "threads": 1}


def run(data, kind: str, name: str, fields: dict, nproc: int = 1) -> str:
    cfg = data.parent / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**fields, "name": name}))
    return train(data, kind, "--config", str(cfg), nproc=nproc, timeout=400)


def snapshot_rows(data, snapshot_hash: str) -> list[dict]:
    db = Database(AppConfig(data_dir=data).database_url)
    try:
        return read_snapshot(db, snapshot_hash)  # hash-checked
    finally:
        db.close()


@pytest.mark.parametrize("kind,fields,table_rows", [("idk", IDK, 2), ("distill", DISTILL, 3)])
def test_two_processes_write_the_same_data_follow_the_same_curve_and_register_one_model(data, kind, fields, table_rows):
    reg = ModelRegistry(AppConfig(data_dir=data))
    one = run(data, kind, f"{kind}1", fields)
    had = set(reg.names())
    two = run(data, kind, f"{kind}2", fields, nproc=2)
    assert set(reg.names()) - had == {f"{kind}2"}  # one model for the two processes
    for name, out in ((f"{kind}1", one), (f"{kind}2", two)):  # rank 0 alone writes the examples and reports
        assert out.count("done (max_steps)") == 1 and out.count("snapshot ") == 1, out[-2000:]
        assert sum(line.startswith(f"{name} ") for line in out.splitlines()) == 1  # the table's last row, once

    a, b = reg.get(f"{kind}1").lineage, reg.get(f"{kind}2").lineage
    assert a["snapshot_hash"] == b["snapshot_hash"]  # the same rows, in the same order
    assert snapshot_rows(data, b["snapshot_hash"])
    assert (b["world_size"], b[kind]["world_size"], a[kind]["world_size"]) == (2, 2, 1)
    assert len(b[kind]["table"]) == table_rows and b[kind]["table"][-1]["model"] == f"{kind}2"
    ev1, ev2 = metrics(data, kind, f"{kind}1"), metrics(data, kind, f"{kind}2")
    assert next(e for e in ev2 if "start" in e)["world_size"] == 2  # the log states the world size
    assert sorted(curve(ev2)) == list(range(1, fields["max_steps"] + 1))  # each step logged once
    assert_same(curve(ev1), curve(ev2))
    if kind == "idk":
        assert_same(curve(ev1, "val_loss"), curve(ev2, "val_loss"))
    assert (data / "runs" / kind / f"{kind}2" / "result.json").exists()


@pytest.fixture(scope="module")
def jobs(data):
    """The app's database and a real worker that launches up to 2 processes."""
    app = AppConfig(data_dir=data)
    db = Database(app.database_url)
    db.migrate()
    worker = start_worker(app, "--max-procs", "2")
    yield app, db
    stop(worker)
    db.close()


def finished(db, job_id: int, timeout: float = 400) -> dict:
    return wait_for(lambda: (j := queue.get_job(db, job_id))["state"] in queue.FINISHED and j, timeout, "the job")


def test_an_idk_job_asking_for_two_processes_runs_under_torchrun(jobs):
    app, db = jobs
    job = queue.create_job(db, app, None, "idk", {**IDK, "nproc": 2})
    done = finished(db, job["id"])
    detail = queue.job_detail(db, job["id"])
    assert done["state"] == "succeeded", (done["error"], [e["text"] for e in detail["log"]][-12:])
    log = [e["text"] for e in detail["log"]]
    assert any("launching 2 processes with torchrun" in t for t in log)
    assert any("world size 2 (ddp, gloo)" in t for t in log)
    lineage = ModelRegistry(app).get(done["model"]).lineage
    assert lineage["job_id"] == job["id"] and lineage["world_size"] == 2
    assert [e for e in detail["info"] if e.get("table")][0]["table"] == lineage["idk"]["table"]
    # an odd global batch cannot split over the two processes: refused at the door
    with pytest.raises(ValueError, match="batch_size: 3 does not split evenly over nproc=2"):
        queue.create_job(db, app, None, "idk", {**IDK, "nproc": 2, "batch_size": 3})


def test_a_two_process_job_whose_data_phase_fails_fails_with_its_error(jobs):
    """Rank 0's teacher writes nothing right: every rank stops with rank 0's error (Dist.from_main raises it on
    every rank, so whichever rank torchrun reports carries it), never the signal torchrun then sent."""
    app, db = jobs
    job = queue.create_job(db, app, None, "distill", {**DISTILL, "teacher": "romer", "n_problems": 4,
                                                      "n_samples": 1, "nproc": 2})
    failed = finished(db, job["id"], 300)
    assert failed["state"] == "failed" and failed["error"].startswith(("rank 0 failed: ", "rank 1 failed: ")), failed["error"]
    assert "signal" not in failed["error"] and "SIGTERM" not in failed["error"], failed["error"]
    assert "teacher: none of the 4 traces of 'romer' states the right answer" in failed["error"]


def test_cancel_during_the_probe_stops_every_rank_before_training(jobs, data):
    app, db = jobs
    register_rambler(data)  # says "la " until max_tokens, slowly: the probe takes a while
    job = queue.create_job(db, app, None, "idk", {**IDK, "parent_model": "rambler", "max_new_tokens": 256,
                                                  "nproc": 2, "name": "rambler-idk"})
    wait_for(lambda: any("probing rambler" in e["text"] for e in queue.job_detail(db, job["id"])["log"]), 120,
             "the probe to start")
    queue.cancel_job(db, job["id"])
    done = finished(db, job["id"], 120)
    assert done["state"] == "cancelled" and done["model"] is None, done["error"]
    assert ranks(job["id"]) == {}  # every rank has exited
    assert "rambler-idk" not in ModelRegistry(app).names() and not (data / "runs" / "idk" / "rambler-idk").exists()
