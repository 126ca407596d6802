"""Training under torchrun with 2 gloo processes on CPU, against the same run in 1 process: the same global batch
gives the same loss curve (to 1e-4, float32 sums in another order), rank 0 alone logs and registers (one model,
each step logged once), a 2-process checkpoint resumes (DDP and FSDP2), and every post-training kind runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backend.config import AppConfig
from models.registry import ModelRegistry
from models.tokenizers import get_encoding, save_encoding
from tests.helpers import make_tiny_model
from tests.test_trainers import byte_encoding

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4  # losses are ~1-6; two processes sum gradients in another order than one


def train(data: Path, *args: str, nproc: int = 1, timeout: float = 240) -> str:
    """python -m backend.train ARGS (nproc 1) or the same under torchrun; returns stdout (fails on an error)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *launcher, "-m", "backend.train", *args, "--data-dir", str(data)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def metrics(data: Path, kind: str, name: str) -> list[dict]:
    return [json.loads(line) for line in (data / "runs" / kind / name / "metrics.jsonl").read_text().splitlines()]


def curve(events: list[dict], key: str = "loss") -> dict[int, float]:
    out = {}
    for e in events:
        if key in e and "done" not in e:
            assert e["step"] not in out, f"step {e['step']} logged twice: more than one rank writes"
            out[e["step"]] = e[key]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a, (a, b)
    for k in a:
        assert abs(a[k] - b[k]) <= TOL, (k, a[k], b[k])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("dist") / "data"
    app = AppConfig(data_dir=data)
    app.ensure_dirs()
    save_encoding(byte_encoding(), "bytes", data)
    enc = get_encoding("bytes+chatml", data)
    ModelRegistry(app).register("tiny", make_tiny_model(enc.max_token_value + 1), "bytes+chatml", "chatml",
                                {"origin": "test"})
    return data


PRETRAIN = ["pretrain", "--preset", "tiny", "--corpus", "python-docs", "--max-corpus-chars", "30000",
            "--batch-size", "4", "--eval-every", "3", "--sample-every", "100", "--checkpoint-every", "3", "--threads", "1"]


def test_pretrain_on_two_processes_follows_the_one_process_curve_and_resumes(data):
    one = train(data, *PRETRAIN, "--name", "p1", "--max-steps", "6")
    two = train(data, *PRETRAIN, "--name", "p2", "--max-steps", "6", nproc=2)
    assert two.count("done (max_steps)") == 1 and one.count("done (max_steps)") == 1  # rank 0 alone reports
    start = next(e for e in metrics(data, "pretrain", "p2") if "start" in e)
    assert start["world_size"] == 2 and start["parallel"] == "ddp" and start["backend"] == "gloo"
    assert_same(curve(metrics(data, "pretrain", "p1")), curve(metrics(data, "pretrain", "p2")))
    assert_same(curve(metrics(data, "pretrain", "p1"), "val_bpb"), curve(metrics(data, "pretrain", "p2"), "val_bpb"))
    reg = ModelRegistry(AppConfig(data_dir=data))
    assert reg.get("p2").lineage["world_size"] == 2 and reg.get("p2").lineage["steps"] == 6
    assert len([e for e in metrics(data, "pretrain", "p2") if "done" in e]) == 1

    # Both runs continue from their step-6 checkpoint to step 10: still one curve.
    train(data, *PRETRAIN, "--name", "p1", "--max-steps", "10", "--resume")
    two = train(data, *PRETRAIN, "--name", "p2", "--max-steps", "10", "--resume", nproc=2)
    resumed = curve(metrics(data, "pretrain", "p2"))
    assert sorted(resumed) == list(range(1, 11))
    assert_same(curve(metrics(data, "pretrain", "p1")), resumed)
    assert reg.get("p2").lineage["steps"] == 10
    # TensorBoard beside metrics.jsonl: the same curve, the first attempt's events after its checkpoint purged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(data / "runs" / "pretrain" / "p2" / "tensorboard"))
    tb.Reload()
    assert_same({e.step: e.value for e in tb.Scalars("loss")}, resumed)

    # FSDP2 (parameters sharded over the two processes) gives the same curve too.
    train(data, *PRETRAIN, "--name", "p3", "--max-steps", "6", "--parallel", "fsdp", nproc=2)
    assert next(e for e in metrics(data, "pretrain", "p3") if "start" in e)["parallel"] == "fsdp"
    first6 = {k: v for k, v in curve(metrics(data, "pretrain", "p1")).items() if k <= 6}
    # p1's first 6 steps ran with max_steps 6, like p3's
    assert_same(first6, curve(metrics(data, "pretrain", "p3")))
