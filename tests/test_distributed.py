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
    # and its checkpoint (full tensors, the optimizer's moments gathered from the shards) resumes sharded again
    train(data, *PRETRAIN, "--name", "p3", "--max-steps", "10", "--parallel", "fsdp", "--resume", nproc=2)
    assert_same(curve(metrics(data, "pretrain", "p1")), curve(metrics(data, "pretrain", "p3")))


def finetune(data: Path, kind: str, name: str, nproc: int = 1, **fields) -> str:
    cfg = data.parent / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"parent_model": "tiny", "name": name, "threads": 1, "checkpoint_every": 100,
                                   **fields}))
    return train(data, kind, "--config", str(cfg), nproc=nproc)


SFT = dict(max_steps=4, batch_size=4, seq_len=256, n_examples=40, eval_every=2, protocol_check=0, lr=1e-3, warmup_steps=0)
DPO = dict(max_steps=3, batch_size=4, n_examples=12, eval_every=3, lr=1e-4, max_len=64, warmup_steps=0)


@pytest.mark.parametrize("kind,fields", [("sft", SFT), ("dpo", DPO)])
def test_finetuning_on_two_processes_follows_the_one_process_curve(data, kind, fields):
    finetune(data, kind, f"{kind}1", **fields)
    out = finetune(data, kind, f"{kind}2", nproc=2, **fields)
    assert out.count("done (max_steps)") == 1
    one, two = metrics(data, kind, f"{kind}1"), metrics(data, kind, f"{kind}2")
    assert_same(curve(one), curve(two))  # SFT: ranks hold different numbers of answer tokens, weighed to the global mean
    key = "val_loss"
    assert_same(curve(one, key), curve(two, key))
    assert next(e for e in two if "start" in e)["world_size"] == 2
    assert ModelRegistry(AppConfig(data_dir=data)).get(f"{kind}2").lineage["world_size"] == 2


def test_reward_and_grpo_run_on_two_processes_and_register_once(data):
    finetune(data, "reward", "rm2", nproc=2, max_steps=2, batch_size=2, n_examples=10, k=3, max_len=64, eval_every=2)
    rm = metrics(data, "reward", "rm2")
    assert sorted(curve(rm)) == [1, 2] and next(e for e in rm if "start" in e)["world_size"] == 2
    reg = ModelRegistry(AppConfig(data_dir=data))
    from backend.train.reward import load_reward_model
    load_reward_model(reg, "rm2")  # backbone + head, written by rank 0
    # GRPO: each rank samples the groups of its share of the prompts (rollouts per rank)
    finetune(data, "grpo", "g2", nproc=2, max_steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6,
             n_heldout=2, eval_tokens=6, eval_every=2)
    g = metrics(data, "grpo", "g2")
    assert sorted(curve(g)) == [1, 2] and all("reward" in e and "kl" in e for e in g if "loss" in e)
    assert reg.get("g2").lineage["world_size"] == 2


def test_the_door_refuses_what_cannot_split_or_shard(data):
    from backend.jobs.kinds import parse_config
    app = AppConfig(data_dir=data)
    for kind, cfg, msg in [("pretrain", {"nproc": 3, "batch_size": 4, "max_steps": 1}, "batch_size: 4 does not split evenly over nproc=3"),
                           ("grpo", {"nproc": 4, "prompts_per_step": 2}, "prompts_per_step: 2 does not split evenly"),
                           ("sft", {"lora_rank": 4, "parallel": "fsdp"}, "parallel: 'fsdp' shards the model, not LoRA"),
                           ("dpo", {"parallel": "zero3"}, "parallel: 'ddp' (a full copy per process) or 'fsdp'"),
                           ("reward", {"nproc": 0}, "nproc: must be at least 1")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            parse_config(kind, {"parent_model": "tiny", **cfg} if kind != "pretrain" else cfg, app)
