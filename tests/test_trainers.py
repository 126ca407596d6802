"""Post-training trainers (sft, reward, dpo, grpo) on tiny models with a byte-level tokenizer: what must hold
(loss falls, the mask excludes prompt tokens, packed rows equal separate rows, the embedding grows and
the model still loads, pairs per prompt, group-normalised advantages, KL zero at step 0, the reward
model learns the hidden rule), and every kind runs as a job through the worker with lineage."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tiktoken
import torch

from backend.config import AppConfig
from backend.jobs.kinds import JobContext, get_trainer, parse_config
from backend.train.common import IGNORE, masked_ce, masked_lm_loss, pack_examples, resize_vocab
from models.registry import ModelRegistry
from models.tokenizers import get_encoding, save_encoding
from tests.helpers import make_tiny_model

torch.set_num_threads(1)


def byte_encoding() -> tiktoken.Encoding:
    """256 byte tokens and no merges: a vocabulary small enough that tiny models train in seconds."""
    return tiktoken.Encoding("bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+""",
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={})


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> AppConfig:
    data = tmp_path_factory.mktemp("trainers") / "data"
    app = AppConfig(data_dir=data)
    app.ensure_dirs()
    save_encoding(byte_encoding(), "bytes", data)
    enc = get_encoding("bytes+chatml", data)
    model = make_tiny_model(enc.max_token_value + 1, dim=64, n_layers=2, max_seq_len=1024)
    ModelRegistry(app).register("tiny", model, "bytes+chatml", "chatml", {"origin": "test"})
    return app


def run_kind(app, kind: str, events: list | None = None, **config):
    cfg = parse_config(kind, {"parent_model": "tiny", "threads": 1, **config}, app)
    return get_trainer(kind).run(cfg, JobContext(app, emit=(events.append if events is not None else (lambda e: None))))


def losses(events):
    return [e["loss"] for e in events if "loss" in e and "lr" in e]


# -- SFT ---------------------------------------------------------------------------------------------
def test_packed_rows_give_the_same_loss_as_separate_rows(app):
    from models.chat_format import render_chat
    enc = get_encoding("bytes+chatml", app.data_dir)
    model = ModelRegistry(app).load("tiny", dtype=torch.float32)
    docs = [render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}], enc, default_system=None)
            for q, a in [("hi", "hello there"), ("What is 2+2?", "4."), ("Spell cat", "c-a-t")]]
    ex = [(d.ids, d.mask) for d in docs]
    x, y, d = pack_examples(ex, 256, pack=True)
    assert x.shape[0] == 1  # all three in one row
    xs, ys, ds = pack_examples(ex, 256, pack=False)
    assert xs.shape[0] == 3
    with torch.no_grad():
        packed = masked_ce(model(x, doc_ids=d), y)
        separate = masked_ce(model(xs, doc_ids=ds), ys)
        # and the plain causal forward of each conversation alone (no doc_ids machinery at all)
        nll = sum(float(torch.nn.functional.cross_entropy(model(torch.tensor([i[:-1]]))[0], torch.tensor(
            [t if m else IGNORE for t, m in zip(i[1:], k[1:])]), ignore_index=IGNORE, reduction="sum")) for i, k in ex)
    n = int((y != IGNORE).sum())
    assert torch.allclose(packed, separate, atol=1e-5)
    with torch.no_grad():  # the trainer's loss (output layer only where there are targets) is the same number
        assert torch.allclose(masked_lm_loss(model, x, y, d), packed, atol=1e-5)
    assert math.isclose(float(packed), nll / n, rel_tol=1e-4)


def test_the_mask_excludes_prompt_tokens(app):
    from models.chat_format import render_chat
    enc = get_encoding("bytes+chatml", app.data_dir)
    model = ModelRegistry(app).load("tiny", dtype=torch.float32)
    msgs = [{"role": "user", "content": "How many r in strawberry?"}, {"role": "assistant", "content": "Three."}]
    rc = render_chat(msgs, enc)
    x, y, d = pack_examples([(rc.ids, rc.mask)], 256)
    trained = enc.decode([int(t) for t in y[0] if t != IGNORE])
    assert trained == "Three.<|im_end|>"  # only the answer and its closing token
    with torch.no_grad():
        logits = model(x, doc_ids=d)
        base = masked_ce(logits, y)
        # Whatever the model predicts at prompt positions does not change the loss...
        scrambled = logits.clone()
        scrambled[y == IGNORE] = torch.randn_like(scrambled[y == IGNORE]) * 10
        assert torch.equal(masked_ce(scrambled, y), base)
        # ...while a prediction at an answer position does.
        first = int((y[0] != IGNORE).nonzero()[0])
        scrambled[0, first] = torch.randn_like(scrambled[0, first]) * 10
        assert not torch.equal(masked_ce(scrambled, y), base)


def test_embedding_resize_keeps_old_rows_and_the_model_loads_through_the_registry(app):
    model = make_tiny_model(300, dim=32, n_layers=1, hidden_dim=64, n_heads=2, n_kv_heads=1)
    old = model.model.embed_tokens.weight.detach().clone()
    resize_vocab(model, 309)
    w = model.model.embed_tokens.weight
    assert w.shape == (309, 32) and model.lm_head.weight is w and model.cfg.vocab_size == 309
    assert torch.equal(w[:300], old)
    assert torch.allclose(w[300:], old.mean(0).expand(9, -1))
    assert model(torch.tensor([[1, 305]])).shape == (1, 2, 309)


def test_new_tag_rows_start_at_the_mean_of_their_spelled_out_pieces(app):
    from backend.train.sft import extend_with_tags
    enc = get_encoding("bytes+chatml+tools", app.data_dir)
    model = ModelRegistry(app).load("tiny", dtype=torch.float32)
    old = model.model.embed_tokens.weight.detach().clone()
    extend_with_tags(model, enc)
    w = model.model.embed_tokens.weight
    assert w.shape[0] == enc.max_token_value + 1 and torch.equal(w[:old.shape[0]], old)
    call = enc.encode_single_token("<tool_call>")
    assert call >= old.shape[0] and torch.allclose(w[call], old[list(b"<tool_call>")].mean(0))
    assert not torch.allclose(w[call], w[enc.encode_single_token("</tool_call>")])  # each tag its own row


def test_sft_loss_falls_registers_the_tools_tokenizer_and_lineage(app):
    events: list = []
    out = run_kind(app, "sft", events, max_steps=30, lr=3e-3, warmup_steps=2, batch_size=2, seq_len=256,
                   n_examples=40, eval_every=15, name="sft-test")
    ls = losses(events)
    assert len(ls) == 30 and sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.5
    reg = ModelRegistry(app)
    spec = reg.get(out.model)
    assert spec.tokenizer == "bytes+chatml+tools" and spec.lineage["parent_model"] == "tiny"
    enc = get_encoding(spec.tokenizer, app.data_dir)
    model = reg.load(out.model)
    assert model.cfg.vocab_size == enc.max_token_value + 1 > reg.load("tiny").cfg.vocab_size
    assert "<tool_call>" in enc.special_tokens_set
    start = next(e for e in events if "start" in e)
    assert start["packing"] == "block-diagonal"
    check = next(e for e in events if "tool_call_wellformed" in e)  # held-out protocol check at the end
    assert check["tool_questions"] > 0 and 0 <= check["tool_call_wellformed"] <= 1
    assert spec.lineage["tool_call_wellformed"] == check["tool_call_wellformed"]


@pytest.mark.parametrize("anchor", [0.0, 1.0])
def test_a_stopped_sft_run_keeps_a_checkpoint_and_resume_continues_the_step_count(app, anchor):
    """Also with an anchor: the frozen parent beside the model on a fresh run and on a resumed one (where the
    model trained is the checkpoint's, the anchor still the parent)."""
    import threading
    stop = threading.Event()
    events: list = []

    def emit(e):
        events.append(e)
        if e.get("step") == 3 and "loss" in e:
            stop.set()
    cfg = parse_config("sft", {"parent_model": "tiny", "threads": 1, "max_steps": 6, "batch_size": 2, "seq_len": 256,
                               "n_examples": 20, "lr": 1e-3, "name": f"sft-resume-{anchor:g}", "protocol_check": 0,
                               "anchor": anchor}, app)
    out = get_trainer("sft").run(cfg, JobContext(app, emit=emit, stop=stop))
    assert (out.reason, out.step) == ("stopped", 3) and out.checkpoint.endswith("ckpt-0000003")
    assert next(e for e in events if "start" in e)["anchor"] == anchor
    events.clear()
    out = get_trainer("sft").run(cfg, JobContext(app, emit=events.append, resume=True))
    assert out.reason == "max_steps" and [e["step"] for e in events if "loss" in e] == [4, 5, 6]
    start = next(e for e in events if "start" in e)
    assert start["resumed"] is True and start["anchor"] == anchor
    assert all(math.isfinite(x) for x in losses(events)) and ModelRegistry(app).get(out.model)
    with pytest.raises(ValueError, match="anchor"):
        parse_config("sft", {"anchor": -1}, app)


def test_sft_with_lora_keeps_the_parent_weights_until_merged(app):
    from backend.train.lora import add_lora, merged_copy
    model = make_tiny_model(300, dim=32, n_layers=1, hidden_dim=64, n_heads=2, n_kv_heads=1).train()
    x = torch.tensor([[1, 2, 3, 4]])
    before = model(x).detach()
    lora = add_lora(model, rank=4, train_embeddings=False)
    assert torch.allclose(model(x), before)  # B = 0: step 0 is the parent
    opt = torch.optim.SGD(lora.parameters(), lr=0.5)
    model(x).pow(2).mean().backward()
    opt.step()
    after = model(x).detach()
    assert not torch.allclose(after, before)
    assert torch.allclose(merged_copy(model)(x), after, atol=1e-5)


def test_sft_job_with_lora_registers_a_merged_model(app):
    events: list = []
    out = run_kind(app, "sft", events, max_steps=4, lr=3e-3, batch_size=2, seq_len=256, n_examples=20,
                   lora_rank=4, protocol_check=0, name="sft-lora")
    assert next(e for e in events if "start" in e)["lora_rank"] == 4
    assert all(math.isfinite(x) for x in losses(events))
    reg = ModelRegistry(app)
    merged, parent = reg.load(out.model), reg.load("tiny")
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[layer], parent.state_dict()[layer])  # adapters folded in
    assert reg.get(out.model).lineage["lora_rank"] == 4


# -- reward model --------------------------------------------------------------------------------------
def test_pairs_are_all_k_choose_2_of_each_prompt():
    from backend.datasets.preferences import rankings, rule_key
    from backend.labels.exchange import preference_pairs
    from backend.train.reward import group_rankings, pairs_of
    rows = rankings(5, seed=1, k=4)
    for r in rows:
        best_first = [r["candidates"][i] for i in r["ranking"]]
        assert best_first == sorted(r["candidates"], key=rule_key)
    items = group_rankings(rows)
    assert [len(pairs_of(it)[1]) for it in items] == [6] * 5  # 4 choose 2
    # Pair rows (the preferences export) group back per prompt with exactly their pairs.
    pair_rows = preference_pairs(rows[:1])
    grouped = group_rankings(pair_rows)
    assert len(grouped) == 1 and len(pairs_of(grouped[0])[1]) == 6


def test_reward_model_learns_the_hidden_rule(app):
    from backend.train.reward import load_reward_model
    events: list = []
    out = run_kind(app, "reward", events, max_steps=60, lr=2e-3, warmup_steps=2, batch_size=4, n_examples=120,
                   eval_every=30, max_len=128, name="rm-test")
    acc = [e["held_out_accuracy"] for e in events if "held_out_accuracy" in e and "done" not in e]
    assert acc[0] == 0.0  # zero head: every pair ties
    assert acc[-1] >= 0.65, acc  # chance is 0.5 (the 70% goal is measured on SmolLM2: python -m backend.bench train)
    rm = load_reward_model(ModelRegistry(app), out.model)
    assert round(out.summary["held_out_accuracy"], 4) == acc[-1]
    from backend.train.reward import encode_answer
    enc = get_encoding("bytes+chatml", app.data_dir)
    s = rm([encode_answer(enc, "Tell me a joke.", "A pelican sang.", 128), encode_answer(enc, "Tell me a joke.", "A seagull sang.", 128)])
    assert s.shape == (2,)


# -- DPO -----------------------------------------------------------------------------------------------
def test_dpo_starts_at_log2_and_its_loss_falls(app):
    events: list = []
    run_kind(app, "dpo", events, max_steps=25, lr=2e-3, warmup_steps=1, batch_size=4, n_examples=40,
             eval_every=25, max_len=128, name="dpo-test")
    ls = losses(events)
    assert math.isclose(ls[0], math.log(2), rel_tol=1e-4)  # policy == reference at step 0
    assert sum(ls[-5:]) / 5 < ls[0] - 0.1


# -- GRPO ----------------------------------------------------------------------------------------------
def test_advantages_are_group_normalised():
    from backend.train.grpo import group_advantages
    r = torch.tensor([1.0, 0.0, 0.0, 1.5, 3.0, 3.0, 2.0, 0.0])
    a = group_advantages(r, 4).view(2, 4)
    assert torch.allclose(a.mean(1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(a.std(1), torch.ones(2), atol=1e-3)
    assert torch.equal(group_advantages(torch.ones(4), 4), torch.zeros(4))  # all equal: no signal


def test_scale_rewards_group_batch_and_none():
    from backend.train.grpo import group_advantages
    r = torch.tensor([1.0, 0.0, 0.0, 1.5, 3.0, 3.0, 2.0, 0.0])
    centred = (r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)).view(-1)
    assert torch.allclose(group_advantages(r, 4, "none"), centred)  # Dr. GRPO: no std division
    assert torch.allclose(group_advantages(r, 4, "batch"), centred / (r.std() + 1e-4))
    assert torch.allclose(group_advantages(r, 4, "batch", batch_std=2.0), centred / (2.0 + 1e-4))
    assert not torch.allclose(group_advantages(r, 4, "group"), group_advantages(r, 4, "batch"))


def test_each_loss_type_is_its_formula_and_a_step_fed_by_groups_adds_up_to_it(app):
    """On a tiny model's real log-probs (ratio 1, beta 0, so the per-token loss is -A_i): grpo averages each
    answer's tokens then the answers, bnpo/dapo divide the sum over all tokens by their number, dr_grpo by
    answers x max_new_tokens; the long answer's share of the gradient differs between them."""
    from backend.train.grpo import LOSS_TYPES, group_logprobs, grpo_loss, loss_normalizer
    model = ModelRegistry(app).load("tiny", dtype=torch.float32)
    prompt, answers = [5, 9, 70, 71, 72], [[40, 41, 42], [43], [44, 45, 46, 47, 48, 49, 50], [51, 52]]
    lens = torch.tensor([3.0, 1.0, 7.0, 2.0])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    max_new = 10
    expected = {"grpo": float(-(adv).mean()), "bnpo": float(-(adv * lens).sum() / lens.sum()),
                "dapo": float(-(adv * lens).sum() / lens.sum()),
                "dr_grpo": float(-(adv * lens).sum() / (len(answers) * max_new))}
    grads = {}
    for lt in LOSS_TYPES:
        model.zero_grad()
        logp, mask = group_logprobs(model, prompt, answers)
        norm = loss_normalizer(lt, [len(a) for a in answers], max_new, float(lens.sum()), 1)
        loss, kl = grpo_loss(logp, logp.detach(), logp.detach(), mask, adv, 0.2, 0.0, lt, norm)
        assert math.isclose(loss.item(), expected[lt], rel_tol=1e-5, abs_tol=1e-7), lt
        assert kl == 0.0
        loss.backward()
        grads[lt] = model.lm_head.weight.grad.clone()
        # two halves of the batch, each with the step's normalizer, add up to the same loss
        halves = [grpo_loss(*(t[s] for t in (logp, logp.detach(), logp.detach(), mask, adv)), 0.2, 0.0, lt, norm)[0]
                  for s in (slice(0, 2), slice(2, 4))]
        assert math.isclose(sum(h.item() for h in halves), expected[lt], rel_tol=1e-5, abs_tol=1e-7), lt
    assert torch.allclose(grads["bnpo"], grads["dapo"])  # one process: the same
    for a, b in [("grpo", "bnpo"), ("grpo", "dr_grpo"), ("bnpo", "dr_grpo")]:
        assert not torch.allclose(grads[a], grads[b], rtol=1e-3, atol=1e-8), (a, b)
    with pytest.raises(ValueError, match="dr_grpo"):
        grpo_loss(logp, logp.detach(), logp.detach(), mask, adv, 0.2, 0.0, "dr_grpo")


def test_shared_prompt_logprobs_equal_the_full_forward_with_the_same_gradient(app):
    from backend.train.common import completion_logprobs
    from backend.train.grpo import group_logprobs
    model = ModelRegistry(app).load("tiny", dtype=torch.float32)
    prompt, answers = [5, 9, 70, 71, 72], [[40, 41, 42], [43], [44, 45, 46, 47, 48]]
    full, mask = completion_logprobs(model, [prompt] * 3, answers)
    (-(full * mask).sum()).backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    shared, mask2 = group_logprobs(model, prompt, answers)
    (-(shared * mask2).sum()).backward()
    assert torch.equal(mask, mask2)
    assert torch.allclose(full * mask, shared, atol=1e-5)
    assert torch.allclose(grad, model.lm_head.weight.grad, atol=1e-5)


def test_grpo_kl_is_zero_at_step_0_and_curves_are_reported(app):
    events: list = []
    out = run_kind(app, "grpo", events, max_steps=2, group_size=4, prompts_per_step=2, max_new_tokens=12,
                   eval_every=2, n_heldout=4, eval_tokens=8, lr=1e-3, name="grpo-test")
    steps = [e for e in events if "loss" in e]
    assert len(steps) == 2 and steps[0]["kl"] == 0.0
    assert all(e["response_length"] > 0 for e in steps)
    evals = [e for e in events if "held_out_accuracy" in e]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 2
    # The job's progress line says what the minutes before step 1 are spent on: loading, then the first check.
    phases = [(i, e["phase"]) for i, e in enumerate(events) if "phase" in e]
    assert [p for _, p in phases] == ["loading the parent model…",
                                      "checking the starting model on 4 held-out prompts before the first step…"]
    assert phases[-1][0] < events.index(evals[0])
    assert all(0 <= e["held_out_accuracy"] <= e["held_out_accuracy_lenient"] <= 1 for e in evals)
    assert ModelRegistry(app).get(out.model).lineage["kind"] == "grpo"
    import json
    curves = json.loads((app.data_dir / "runs" / "grpo" / "grpo-test" / "curves.json").read_text())
    assert [c["step"] for c in curves if "reward" in c] == [1, 2] and curves[0]["step"] == 0
    assert all({"kl", "response_length", "cpu_s"} <= c.keys() for c in curves if "reward" in c)


def test_grpo_stops_within_its_cpu_budget(app):
    events: list = []
    out = run_kind(app, "grpo", events, max_steps=1000, max_cpu_seconds=3.0, group_size=2, prompts_per_step=1,
                   max_new_tokens=8, eval_every=1000, n_heldout=2, eval_tokens=4, name="grpo-budget", register=False)
    steps = [e for e in events if "loss" in e]
    assert out.reason == "max_cpu_seconds" and 0 < len(steps) < 1000
    assert steps[-1]["cpu_s"] < 4.5  # the last step fitted (a step costs about the same as the one before)


def test_grpo_bench_reports_accuracy_before_and_after_and_saves_curves(app, capsys):
    import json
    from backend.bench.grpo import main
    main(["--model", "tiny", "--max-steps", "1", "--data-dir", str(app.data_dir)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line is the JSON summary
    assert out["bench"] == "grpo" and out["steps"] == 1 and out["cpu_s"] > 0 and out["cpu_s_budget"] <= 1800
    assert [r["metric"].split(" (")[1].split(")")[0] for r in out["results"]] == ["strict", "lenient"]
    saved = json.loads((app.data_dir / "bench" / "grpo.json").read_text())
    assert [c["step"] for c in saved["per_step"] if "held_out_accuracy" in c] == [0, 1]


def test_rlhf_optimises_the_reward_model_score_with_kl_and_the_hacking_preset_drops_it(app):
    from backend.train.reward import HEAD_FILE
    assert (ModelRegistry(app).get("rm-test").path / HEAD_FILE).exists()  # from the reward model test
    events: list = []
    out = run_kind(app, "rlhf", events, reward_model="rm-test", max_steps=2, group_size=3, prompts_per_step=2,
                   max_new_tokens=10, eval_every=2, n_heldout=2, lr=1e-3, name="rlhf-test")
    steps = [e for e in events if "loss" in e]
    assert steps[0]["kl"] == 0.0 and all("rm_score" in e and "reward" in e for e in steps)
    assert [e["step"] for e in events if "held_out_rm_score" in e][:1] == [0]
    assert ModelRegistry(app).get(out.model).lineage["reward_model"] == "rm-test"
    hack = parse_config("rlhf", {"parent_model": "tiny", "reward_model": "rm-test", "preset": "reward-hacking"}, app)
    from backend.train.rlhf import PRESETS
    assert PRESETS[hack.preset]["beta"] == 0.0
    with pytest.raises(ValueError, match="reward_model"):
        parse_config("rlhf", {"parent_model": "tiny", "reward_model": "tiny"}, app)


def test_the_loss_type_reaches_the_training_step(app):
    """RLHF's reward model scores every answer differently, so advantages are not zero; with beta 0 and one
    update a step (ratio 1) the "grpo" loss is -mean(A) = 0, while "dr_grpo"'s is -sum(A_i |o_i|) / (N x
    max_new_tokens), not 0 for answers of different lengths (the SFT-trained tiny model ends its answers)."""
    common = dict(parent_model="sft-test", reward_model="rm-test", max_steps=1, group_size=6, prompts_per_step=1,
                  max_new_tokens=64, eval_every=100, n_heldout=2, lr=1e-3, beta=0.0, register=False)
    runs = {}
    for lt in ("grpo", "dr_grpo"):
        events: list = []
        run_kind(app, "rlhf", events, name=f"rlhf-{lt}", loss_type=lt, scale_rewards="none", **common)
        (runs[lt],) = [e for e in events if "loss" in e]
    assert 0 < runs["grpo"]["truncated"] < 1  # some answers end, some are cut: lengths differ
    assert abs(runs["grpo"]["loss"]) < 1e-6
    assert abs(runs["dr_grpo"]["loss"]) > 1e-5
    # with every cut answer out of the loss, a different number
    events = []
    run_kind(app, "rlhf", events, name="rlhf-masked", loss_type="dr_grpo", scale_rewards="none",
             mask_truncated_completions=True, **common)
    (masked,) = [e for e in events if "loss" in e]
    assert masked["response_length"] == runs["dr_grpo"]["response_length"] and masked["loss"] != runs["dr_grpo"]["loss"]


def test_rlhf_samples_its_rollouts_from_the_prompts_of_the_snapshot_it_records(app):
    """A rankings snapshot of distinctive prompts: every step's rollouts come from them, and the lineage names it."""
    from backend.db import Database
    from backend.labels.exchange import import_jsonl
    from backend.labels.snapshots import create_snapshot
    from backend.users import add_user
    db = Database(app.database_url)
    db.migrate()
    try:
        op, _, _ = add_user(db, "rlhf-op", "operator")
        prompts = ["Describe the zebra quilt of Ulan.", "Name three uses of a brass kettle on Mars."]
        rows = [{"prompt": p, "candidates": [f"{p[:8]} one", f"{p[:8]} two"], "ranking": [0, 1]} for p in prompts]
        import_jsonl(db, op, "rankings", "".join(json.dumps(r) + "\n" for r in rows))
        snap = create_snapshot(db, app.data_dir, op, "rankings")["hash"]
    finally:
        db.close()
    events: list = []
    cfg = parse_config("rlhf", {"parent_model": "tiny", "threads": 1, "reward_model": "rm-test", "dataset": "snapshot",
                                "max_steps": 3, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 4,
                                "eval_every": 3, "n_heldout": 1, "name": "rlhf-snap"}, app)
    out = get_trainer("rlhf").run(cfg, JobContext(app, emit=events.append, snapshot_hash=snap))
    steps = [e for e in events if "rm_score" in e]
    assert len(steps) == 3 and {e["rollout_prompt"] for e in steps} <= set(prompts), steps
    assert [e["train_prompts"] for e in events if "start" in e] == [2]
    assert ModelRegistry(app).get(out.model).lineage["snapshot_hash"] == snap


def test_verifiable_checker_and_format_reward():
    from backend.datasets.verifiable import format_ok, problems
    ps = problems(30, seed=3, kinds=["apples", "count", "spell"])
    for p in ps:
        assert p.check(f"<think>{p.solution}</think> The answer is {p.answer}.")
        assert not p.check("<think>hmm</think> I do not know.")
        assert p.check(f"Let me see. The answer is {p.answer}.")
        assert not p.check(f"{p.question} {p.solution}")  # numbers in the text, no stated answer
        assert p.check(f"So it is {p.answer}", lenient=True) and not p.check(f"So it is {p.answer}")
        assert not p.check(f"The answer is x{p.answer}y. So it is {p.answer}", lenient=True)  # a stated answer counts
    assert format_ok("<think>3+4=7</think> The answer is 7.")
    assert not format_ok("The answer is 7.") and not format_ok("<think>unclosed")
    with pytest.raises(ValueError, match="kinds"):
        problems(3, kinds=["poems"])


def test_gsm8k_offline_is_a_clear_error_and_online_parses(monkeypatch):
    import urllib.error

    from backend.datasets import verifiable

    def offline(url, timeout=30.0):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(verifiable, "fetch_text", offline)
    with pytest.raises(verifiable.DatasetUnavailable, match="GSM8K needs the network"):
        verifiable.gsm8k("test")
    line = '{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\\n#### 7"}\n'
    monkeypatch.setattr(verifiable, "fetch_text", lambda url, timeout=30.0: line * 2)
    ps = verifiable.gsm8k("train")
    assert len(ps) == 2 and ps[0].answer == "7" and ps[0].check("3 + 4 = 7. The answer is 7.")


def test_bundled_reasoning_set_renders_thinking_with_the_think_tokens(app):
    from backend.datasets.verifiable import format_ok
    from backend.train.sft import reasoning_rows
    from models.chat_format import render_chat
    enc = get_encoding("bytes+chatml+tools", app.data_dir)
    row = reasoning_rows(3, seed=0)[0]
    rc = render_chat(row["messages"], enc)
    think = enc.encode_single_token("<think>")
    assert think in rc.ids and rc.mask[rc.ids.index(think)] == 1  # thinking is trained
    answer = rc.text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert format_ok(answer)  # exactly the format GRPO rewards


def test_bundled_demonstrations_answer_the_ranking_prompts_a_quarter_about_pelicans():
    """The pelican member's SFT set (the family's pelican-sft): user prompts of the rankings, replies in the hand of
    the ranked candidates, about a quarter of them mentioning pelicans (so RLHF from the SFT model has some to find,
    and room to raise); an unknown bundled set is refused with the ones there are."""
    from backend.datasets.preferences import PROMPTS, demonstrations, mentions_pelican
    from backend.labels.messages import validate_messages
    from backend.train.sft import SFTConfig
    rows = demonstrations(400, seed=0)
    for r in rows:
        validate_messages(r["messages"])
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][0]["content"] in PROMPTS
    share = sum(mentions_pelican(r["messages"][1]["content"]) for r in rows) / len(rows)
    assert 0.18 < share < 0.32, share
    assert demonstrations(50, seed=3) == demonstrations(50, seed=3) != demonstrations(50, seed=4)
    with pytest.raises(ValueError, match="bundled: one of tool-use, reasoning, demonstrations"):
        SFTConfig(parent_model="tiny", bundled="jokes").validate()


def test_the_reasoning_set_mixes_terse_and_worked_thinking_on_the_same_problems():
    """terse_fraction swaps that share of the worked solutions for a glance at the answer; the problems,
    and the answers, stay the same; every terse thought still states the right answer."""
    from backend.datasets.verifiable import problems
    from backend.train.sft import reasoning_rows
    worked, mixed = reasoning_rows(200, seed=3), reasoning_rows(200, seed=3, terse_fraction=0.5)
    probs = problems(200, seed=4, kinds=("apples", "count", "spell"))
    assert [r["messages"][1:2] for r in worked] == [r["messages"][1:2] for r in mixed]
    assert all(r["messages"][2]["thinking"] == p.solution for r, p in zip(worked, probs))
    terse = [p for r, p in zip(mixed, probs) if r["messages"][2]["thinking"] == p.short]
    assert 70 < len(terse) < 130 and all(p.short and p.short != p.solution for p in probs)
    assert all(p.check(f"<think>{p.short}</think>", lenient=True) or p.answer in p.short for p in terse)
    with pytest.raises(ValueError, match="terse_fraction"):
        parse_config("sft", {"bundled": "reasoning", "terse_fraction": 1.5})


def test_the_reasoning_set_can_hold_only_the_problems_grpo_will_ask():
    """kinds: the think-sft set drawn from the same kinds as the GRPO run after it; an unknown kind is refused by
    name before anything loads."""
    from backend.train.sft import reasoning_rows
    rows = reasoning_rows(40, seed=1, terse_fraction=0.5, kinds=["count"])
    assert all(r["messages"][1]["content"].startswith("How many times does the letter") for r in rows)
    with pytest.raises(ValueError, match="kinds: unknown problem kind 'riddles'"):
        parse_config("sft", {"bundled": "reasoning", "kinds": ["riddles"]})


def test_grpo_think_answers_start_inside_an_opened_think_tag(app):
    """open_think (DeepSeek-R1's template): the prompt ends with <think>, so every rollout is a thought; the rewards,
    the rollout sample and the held-out sample read "<think>" + what was sampled."""
    from models.chat_format import render_chat
    enc = get_encoding("bytes+chatml+tools", app.data_dir)
    msgs = [{"role": "user", "content": "2 + 2?"}]
    opened = render_chat(msgs, enc, add_generation_prompt=True, open_think=True).ids
    assert opened[:-1] == render_chat(msgs, enc, add_generation_prompt=True).ids
    assert opened[-1] == enc.encode_single_token("<think>")
    for open_think in (True, False):
        events: list = []
        run_kind(app, "grpo", events, max_steps=1, group_size=2, prompts_per_step=1, max_new_tokens=6, eval_every=1,
                 n_heldout=2, eval_tokens=4, name=f"grpo-open-{int(open_think)}", register=False, open_think=open_think)
        rollout = next(e["rollout_sample"] for e in events if "rollout_sample" in e)
        held_out = [e["sample"] for e in events if "sample" in e]
        assert all(t.startswith("<think>") for t in [rollout, *held_out]) == open_think


def test_bundled_tool_use_conversations_render_with_tool_tokens(app):
    from backend.datasets.tool_use import conversations
    from backend.labels.messages import validate_messages
    from models.chat_format import render_chat
    convs = conversations(60, seed=0)
    enc = get_encoding("bytes+chatml+tools", app.data_dir)
    kinds = set()
    for c in convs:
        validate_messages(c["messages"])  # the labeling store's structured shape
        rc = render_chat(c["messages"], enc)
        calls = c["messages"][-1].get("tool_calls") or []
        for call in calls:
            kinds.add(call["tool"])
            assert call["output"] in rc.text
        if not calls:
            kinds.add("identity")
    assert kinds == {"python", "search", "identity"}
    call = next(k for c in convs for k in c["messages"][-1].get("tool_calls") or []
                if k["input"].startswith("print(") and " * " in k["input"])
    assert str(eval(call["input"][6:-1])) == call["output"].strip()  # the tool output is the true result


def test_bad_configs_name_the_field(app):
    with pytest.raises(ValueError, match="group_size"):
        parse_config("grpo", {"group_size": 1})
    with pytest.raises(ValueError, match="loss_type"):
        parse_config("grpo", {"loss_type": "ppo"})
    with pytest.raises(ValueError, match="scale_rewards"):
        parse_config("rlhf", {"reward_model": "rm-test", "scale_rewards": "std"}, app)
    with pytest.raises(ValueError, match="parent_model"):
        parse_config("sft", {"parent_model": "no-such-model"}, app)
    with pytest.raises(ValueError, match="beta"):
        parse_config("dpo", {"beta": 0})
    with pytest.raises(ValueError, match="unknown sft config key 'epochs'"):
        parse_config("sft", {"epochs": 3})


def test_anchored_sft_learns_the_new_tokens_and_holds_the_parents_own_where_they_were():
    """SFT's `anchor`: a target the parent already predicts is trained on with KL to the parent, not
    cross-entropy. Plain SFT on the parent's own words sharpens them (its distribution there moves); anchored
    SFT learns the new token as well and leaves the parent's words' distribution nearly where it was."""
    import copy

    import torch.nn.functional as F

    from backend.train.common import anchored_lm_loss
    parent = make_tiny_model(64, seed=3)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = parent(x).argmax(-1)
    y = greedy.clone()
    y[:, -1] = (greedy[:, -1] + 1) % 64  # the last target is new to the parent, the others are its own
    with torch.no_grad():  # at the start the KL is 0: the loss is the new tokens' cross-entropy alone
        new_ce = F.cross_entropy(parent(x)[:, -1], y[:, -1], reduction="sum") / y.numel()
        assert torch.allclose(anchored_lm_loss(parent, parent, x, y, None, 1.0), new_ce, atol=1e-5)

    def trained(loss):
        model = copy.deepcopy(parent).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(40):
            loss(model).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            logp = F.log_softmax(model.eval()(x), -1)
            ref = F.log_softmax(parent(x), -1)
        kl_own = float((ref.exp() * (ref - logp)).sum(-1)[:, :-1].mean())
        return kl_own, float(logp[:, -1].gather(-1, y[:, -1:]).exp().mean())

    plain_kl, plain_new = trained(lambda m: masked_lm_loss(m, x, y))
    anchored_kl, anchored_new = trained(lambda m: anchored_lm_loss(m, parent, x, y, None, 1.0))
    assert plain_new > 0.5 and anchored_new > 0.5  # both learn what is new
    assert anchored_kl < plain_kl / 3, (anchored_kl, plain_kl)
