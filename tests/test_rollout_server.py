"""GRPO/RLHF rollouts from a serving engine: the trainer (this process) samples through app B (a real second
server on loopback) and pushes the policy's weights to it after every step (backend/train/rollout_server.py,
backend/serving/weight_push.py)."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from backend.config import AppConfig
from backend.jobs.kinds import JobContext, get_trainer, parse_config
from backend.serving.remote_engine import RemoteError, _token_bytes_from_str
from backend.train.grpo import group_logprobs
from backend.train.rollout_server import weights_file
from models.registry import ModelRegistry
from models.tokenizers import get_encoding, save_encoding
from tests.conftest import free_port, start_server
from tests.helpers import add_user, make_tiny_model, register_reward_model
from tests.test_trainers import byte_encoding

torch.set_num_threads(1)

TOK = "bytes+chatml"
# The fixed prompt whose greedy answer both sides score: over two of B's 64-token prefix-cache blocks, so a
# cache kept across a push would serve the old weights' keys and values
PROBE = "The harbour at noon, when the boats come in and the gulls circle the nets, smells of salt and tar and fish."
SMALL_BODY = 100_000


def register_tiny(data) -> None:
    save_encoding(byte_encoding(), "bytes", data)
    vocab = get_encoding(TOK, data).max_token_value + 1
    ModelRegistry(AppConfig(data_dir=data)).register("tiny", make_tiny_model(vocab, dim=64, n_layers=2), TOK,
                                                     "chatml", {"origin": "test"}, overwrite=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(trainer's AppConfig, server B, B's admin key, B's learner key)."""
    data_b = tmp_path_factory.mktemp("rollout_b") / "data"
    data_b.mkdir(parents=True)
    register_tiny(data_b)  # the same weights as the trainer's parent (make_tiny_model is seeded)
    _, admin_key = add_user(data_b, "ada", "admin")
    _, learner_key = add_user(data_b, "lee", "learner")
    # a body limit below one weights file: pushes have their own (AppConfig.max_weights_bytes)
    b = start_server(data_b, "--no-worker", "--no-preload", "--model", "tiny", "--max-body-bytes", str(SMALL_BODY))
    data_a = tmp_path_factory.mktemp("rollout_a") / "data"
    app = AppConfig(data_dir=data_a)
    app.ensure_dirs()
    register_tiny(data_a)
    register_reward_model(data_a, "rm", tokenizer=TOK)
    yield app, b, admin_key, learner_key
    b.stop()


def completions_served(b) -> int:
    return b.log().count('"POST /v1/completions HTTP/1.1" 200')


def server_greedy(b) -> tuple[list[int], list[float]]:
    """B's greedy answer to PROBE: (token ids, their log-probs), the stop token's included."""
    enc = get_encoding(TOK, b.data_dir)
    client = openai.OpenAI(base_url=b.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    lp = client.completions.create(model="tiny", prompt=PROBE, max_tokens=8, temperature=0, logprobs=0).choices[0].logprobs
    return [enc.encode_single_token(_token_bytes_from_str(t)) for t in lp.tokens], list(lp.token_logprobs)


def same_greedy(a, b) -> bool:
    """The same greedy answer, to float32 rounding: the same tokens, log-probs within 1e-5 (the server's sums may
    run in another order from one request to the next; a pushed update moves them by far more)."""
    return a[0] == b[0] and max(abs(x - y) for x, y in zip(a[1], b[1])) < 1e-5


def local_logprobs(model, ids: list[int], enc) -> list[float]:
    """The trainer's own log-probs (group_logprobs, as its loss uses) of `ids` after PROBE."""
    with torch.no_grad():
        logp, _ = group_logprobs(model.float().eval(), enc.encode(PROBE), [ids])
    return logp[0].tolist()


def run_with_server(app, kind: str, events: list, **config):
    cfg = parse_config(kind, {"parent_model": "tiny", "threads": 1, **config}, app)
    return get_trainer(kind).run(cfg, JobContext(app, emit=events.append))


def steps_match_the_server(app, b, kind, monkeypatch, **config):
    """Run 2 steps through B with weight pushes; after each step (as its event is emitted) B's greedy log-probs
    of PROBE are recorded, then compared with the step's checkpoint scored here. Returns the step events."""
    monkeypatch.setenv("ROLLOUT_KEY", b.admin_key)
    seen: dict[int, tuple[list[int], list[float]]] = {}
    events: list = []

    def emit(e):
        events.append(e)
        if "loss" in e and "lr" in e:  # a step's event: its push has been answered
            seen[e["step"]] = server_greedy(b)

    before = completions_served(b)
    cfg = parse_config(kind, {"parent_model": "tiny", "threads": 1, "max_steps": 2, "checkpoint_every": 1,
                              "rollout_server": b.base_url + "/v1", "rollout_model": "tiny",
                              "rollout_api_key_env": "ROLLOUT_KEY", **config}, app)
    out = get_trainer(kind).run(cfg, JobContext(app, emit=emit))
    steps = [e for e in events if "loss" in e and "lr" in e]
    assert out.step == 2 and len(steps) == 2
    # the rollouts came from B: one request per prompt and step, beside this test's probe after each step
    # (the held-out checks run in the trainer)
    assert completions_served(b) - before == 2 * cfg.prompts_per_step + len(seen)
    assert all(e["rollouts"] == b.base_url + "/v1" and e["push_s"] >= 0 for e in steps)
    assert any(e.get("log", "").startswith("rollouts from 'tiny' at " + b.base_url) for e in events)
    from backend.train.pretrain import checkpoint_path, load_checkpoint
    enc = get_encoding(TOK, app.data_dir)
    run_dir = app.data_dir / "runs" / kind / cfg.name
    for step in (1, 2):
        model, _ = load_checkpoint(checkpoint_path(run_dir, step), torch.device("cpu"))
        ids, served = seen[step]
        mine = local_logprobs(model, ids, enc)
        assert max(abs(x - y) for x, y in zip(served, mine)) < 1e-4, (step, served, mine)
    return seen


@pytest.fixture
def b(setup):
    app, b, admin_key, learner_key = setup
    b.admin_key, b.learner_key = admin_key, learner_key
    return b


def test_grpo_samples_through_the_server_which_serves_each_steps_policy(setup, b, monkeypatch):
    app = setup[0]
    # weight decay moves the weights even where every group's rewards are equal (a random model solves no
    # problem, so every advantage is 0): the pushed weights differ from the parent's after each step
    seen = steps_match_the_server(app, b, "grpo", monkeypatch, group_size=2, prompts_per_step=2,
                                  max_new_tokens=8, eval_every=2, n_heldout=2, eval_tokens=4, lr=1e-2,
                                  weight_decay=0.5, warmup_steps=0, name="grpo-served", register=False)
    parent = ModelRegistry(app).load("tiny", dtype=torch.float32)
    ids, served = seen[2]
    assert max(abs(x - y) for x, y in zip(served, local_logprobs(parent, ids, get_encoding(TOK, app.data_dir)))) > 1e-3


def test_rlhf_samples_through_the_server_and_pushes_after_each_step(setup, b, monkeypatch):
    seen = steps_match_the_server(setup[0], b, "rlhf", monkeypatch, reward_model="rm", group_size=3,
                                  prompts_per_step=2, max_new_tokens=8, eval_every=2, n_heldout=1, lr=1e-3,
                                  name="rlhf-served", register=False)
    assert seen[1] != seen[2]  # the reward model's advantages moved the policy between the two steps


def test_weight_pushes_are_refused_unless_an_admin_sends_the_models_shapes(setup, b):
    app = setup[0]
    url = f"{b.base_url}/api/models/tiny/weights"
    before = server_greedy(b)
    good = ModelRegistry(app).load("tiny", dtype=torch.float32)
    body = weights_file(good)
    assert len(body) > SMALL_BODY  # B's limit for other bodies
    assert httpx.post(url, content=body).status_code == 401  # anonymous
    assert httpx.post(url, content=body, headers={"Authorization": f"Bearer {b.learner_key}"}).status_code == 403
    admin = {"Authorization": f"Bearer {b.admin_key}"}
    wrong = make_tiny_model(good.cfg.vocab_size, dim=32, n_layers=2, hidden_dim=64)  # other shapes, same names
    r = httpx.post(url, content=weights_file(wrong), headers=admin)
    assert r.status_code == 422 and "shape" in r.text and "model.embed_tokens.weight" in r.text
    fewer = make_tiny_model(good.cfg.vocab_size, dim=64, n_layers=1)  # one layer's tensors missing
    r = httpx.post(url, content=weights_file(fewer), headers=admin)
    assert r.status_code == 422 and "missing" in r.text
    assert httpx.post(url, content=b"not safetensors", headers=admin).status_code == 422
    assert httpx.post(f"{b.base_url}/api/models/nope/weights", content=body, headers=admin).status_code == 404
    assert same_greedy(server_greedy(b), before)  # nothing was swapped
    # an admin's push of the right shapes is served from the next request
    moved = make_tiny_model(good.cfg.vocab_size, dim=64, n_layers=2, seed=7)
    r = httpx.post(url, content=weights_file(moved), headers=admin)
    assert r.status_code == 200 and r.json()["tensors"] == len(dict(moved.named_parameters()))
    ids, served = server_greedy(b)
    mine = local_logprobs(moved, ids, get_encoding(TOK, app.data_dir))
    assert max(abs(x - y) for x, y in zip(served, mine)) < 1e-4


def test_without_weight_sync_the_rollouts_are_logged_off_policy(setup, b, monkeypatch):
    app = setup[0]
    before = server_greedy(b)
    n0 = completions_served(b)
    events: list = []
    run_with_server(app, "grpo", events, max_steps=1, group_size=2, prompts_per_step=1, max_new_tokens=6,
                    eval_every=10, n_heldout=1, eval_tokens=4, lr=1e-2, weight_decay=0.5, register=False,
                    name="grpo-offpolicy", rollout_server=b.base_url + "/v1", rollout_model="tiny", weight_sync="none")
    steps = [e for e in events if "loss" in e and "lr" in e]
    assert steps[0]["rollouts"] == b.base_url + "/v1 (off-policy: weights not synced)" and "push_s" not in steps[0]
    assert completions_served(b) > n0
    assert same_greedy(server_greedy(b), before)  # nothing was pushed


def test_an_unreachable_rollout_server_fails_the_run_before_training(setup):
    app = setup[0]
    url = f"http://127.0.0.1:{free_port()}/v1"
    events: list = []
    with pytest.raises(RemoteError, match=url.replace(".", r"\.")):
        run_with_server(app, "grpo", events, max_steps=2, rollout_server=url, rollout_model="tiny",
                        name="grpo-unreachable", register=False)
    assert not [e for e in events if "loss" in e or "held_out_accuracy" in e]  # no step, no evaluation
    assert "rollout_server" in [e for e in events if "error" in e][-1]["error"]
    assert [e["phase"] for e in events if "phase" in e][-1] == f"reaching the rollout server at {url}…"


@pytest.mark.parametrize("fields, named", [
    ({"rollout_server": "ftp://host/v1", "rollout_model": "m"}, "rollout_server"),
    ({"rollout_server": "http://host:8000", "rollout_model": "m"}, "rollout_server"),  # push needs our /v1
    ({"rollout_server": "http://host:8000/v1"}, "rollout_model"),
    ({"rollout_model": "m"}, "rollout_server"),
    ({"weight_sync": "sometimes"}, "weight_sync"),
    ({"rollout_server": "http://host:8000/v1", "rollout_model": "m", "rollout_api_key_env": "NOT A VAR"},
     "rollout_api_key_env"),
])
def test_rollout_fields_are_checked_before_any_work(fields, named):
    for kind in ("grpo", "rlhf"):
        with pytest.raises(ValueError, match=named):
            parse_config(kind, {"reward_model": "rm", **fields} if kind == "rlhf" else fields)
    # a foreign server's plain base URL is fine without weight pushes
    parse_config("grpo", {"rollout_server": "http://host:8000", "rollout_model": "m", "weight_sync": "none"})


def test_a_model_that_decodes_from_quantized_copies_refuses_pushed_weights(setup):
    """Its decode step reads int8 (or GGUF) copies that float weights would not reach: 409, not a silent no-op."""
    from backend.serving.decode_step import quant_supported
    from backend.serving.engine import Engine
    from backend.serving.weight_push import CannotSwap, swap_weights
    if not quant_supported():
        pytest.skip("no fbgemm on this CPU")
    app = setup[0]
    reg = ModelRegistry(app)
    model = reg.load("tiny", dtype=torch.float32)
    engine = Engine(reg.get("tiny"), model, get_encoding(TOK, app.data_dir), quant="int8")
    try:
        with pytest.raises(CannotSwap, match="PLAYGROUND_QUANT=none"):
            swap_weights(engine, weights_file(model))
    finally:
        engine.close()
