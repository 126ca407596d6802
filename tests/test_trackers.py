"""Metrics beside metrics.jsonl: TensorBoard event files hold the same curve; Weights & Biases starts only when
WANDB_API_KEY is set, writes a run (offline mode, no network here), and when it cannot reach its server the run
goes on and says why."""
from __future__ import annotations

import json
import socket

import pytest

from backend.config import AppConfig
from backend.train.pretrain import PretrainConfig, pretrain


@pytest.fixture
def app(tmp_path) -> AppConfig:
    app = AppConfig(data_dir=tmp_path / "data")
    app.ensure_dirs()
    return app


def run(app: AppConfig, name: str):
    cfg = PretrainConfig(preset="tiny", corpus=["python-docs"], max_corpus_chars=30_000, bpe_vocab_size=512,
                         max_steps=4, batch_size=4, eval_every=2, eval_tokens=512, sample_every=100, threads=1,
                         name=name, register=False)
    events: list = []
    pretrain(cfg, app, on_event=events.append)
    return events, app.data_dir / "runs" / "pretrain" / name


def test_tensorboard_holds_the_curve_and_wandb_stays_off_without_a_key(app, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    events, run_dir = run(app, "tb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run_dir / "tensorboard"))
    tb.Reload()
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {e.step: round(e.value, 5) for e in tb.Scalars("loss")} == {e["step"]: e["loss"] for e in jsonl if "loss" in e}
    assert [e.step for e in tb.Scalars("val_bpb")] == [0, 2, 4]
    assert not (run_dir / "wandb").exists()
    assert not any("Weights & Biases" in e.get("log", "") for e in events)


def test_wandb_writes_an_offline_run_when_its_key_is_set(app, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    events, run_dir = run(app, "wb")
    assert any("Weights & Biases run 'wb'" in e.get("log", "") for e in events)
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_wandb_unreachable_is_a_clear_message_and_training_goes_on(app, monkeypatch):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    events, run_dir = run(app, "wb-off")
    msg = next(e["log"] for e in events if "Weights & Biases" in e.get("log", ""))
    assert msg.startswith("Weights & Biases could not start") and "offline?" in msg and "TensorBoard only" in msg
    assert next(e for e in events if "done" in e)["done"] == "max_steps"
