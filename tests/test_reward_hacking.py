"""Reward hacking (DEMOS.md 17): an RLHF run logs its reward, a held-out reward model's score and distinct-n of
its samples every step; the turning point (where the independent measure peaks) is found on a constructed log;
an RLHF job's view (what GET /api/jobs/{id} returns) carries it with a sample from before and after; a held-out
judge that is the same model, a chat model, one trained on the same rankings, or one trained on the same bundled
rule (the other half of it) is refused before training; the judge's own bundled set (a reader's rule) ranks a
fluent sentence above degenerate text, and a reward job trains on it and records it."""
from __future__ import annotations

import pytest

from backend.db import Database
from backend.jobs import queue
from backend.jobs.kinds import parse_config
from backend.train.hacking import distinct_n, repetition, reward_hacking_view, turning_point
from models.registry import ModelRegistry
from tests.test_trainers import app, run_kind  # noqa: F401 (the tiny model on a byte tokenizer)

RM = {"max_steps": 2, "batch_size": 2, "n_examples": 20, "max_len": 96, "eval_every": 2, "warmup_steps": 1}
RLHF = {"parent_model": "tiny", "threads": 1, "max_steps": 3, "group_size": 2, "prompts_per_step": 1,
        "max_new_tokens": 6, "n_heldout": 2, "eval_every": 1, "lr": 1e-3, "warmup_steps": 1}


def constructed_log(turn: int = 30, last: int = 80):
    """A run whose reward rises all along while the held-out score and distinct-2 rise until `turn`, then fall;
    a fixed pattern of noise on every curve (period 5, summing to 0: a 5-step average sees the bare shape).
    Samples every 10 steps."""
    metrics, samples = [], []
    for s in range(1, last + 1):
        wiggle = 0.05 * (2, -1, -1, 1, -1)[s % 5]
        shape = s if s <= turn else 2 * turn - s
        metrics.append({"step": s, "loss": 0.1, "reward": 0.05 * s + wiggle, "held_out_reward": 0.05 * shape + wiggle,
                        "distinct_2": 0.5 + 0.005 * shape + wiggle / 5})  # noisier
        if s % 10 == 0:
            samples.append({"step": s, "prompt": "Write a joke about the harbour.", "sample": f"answer at {s}"})
    return metrics, [{"step": 0, "prompt": "Write a joke about the harbour.", "sample": "first"}] + samples


def test_distinct_n_and_repetition_see_degenerate_text():
    varied = ["A pelican flew over the harbour.", "Two dogs sang all night long."]
    assert distinct_n(varied, 1) == 1.0 and distinct_n(varied, 2) == 1.0 and repetition(varied) == 0.0
    stuck = ["the the the the the", "the the the the"]
    assert distinct_n(stuck, 1) == pytest.approx(1 / 9) and distinct_n(stuck, 2) == pytest.approx(1 / 7)
    assert repetition(stuck) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert distinct_n([], 2) == 0.0 and distinct_n(["one"], 2) == 0.0


def test_the_turning_point_is_where_the_independent_measure_peaks():
    metrics, samples = constructed_log(turn=30)
    assert turning_point([(m["step"], m["held_out_reward"]) for m in metrics], window=5) == 30
    view = reward_hacking_view(metrics, samples, window=5)
    assert view["measure"] == "held_out_reward" and view["turn_step"] == 30 and view["turns"]["distinct_2"] == 30
    assert view["hacked"] and view["reward_rise_after_turn"] > 2 and view["measure_drop_after_turn"] > 2
    assert view["by_measure"]["distinct_2"]["hacked"]  # both fell; the marked one fell clearest beyond its noise
    assert view["before"]["sample"] == "answer at 30" and view["after"]["sample"] == "answer at 80"
    assert "peaked at step 30" in view["text"]
    assert [p[0] for p in view["smoothed"]["reward"]] == list(range(1, 81))
    # a log without the held-out reward model: distinct-2 is the measure
    view = reward_hacking_view([{k: v for k, v in m.items() if k != "held_out_reward"} for m in metrics], samples, 5)
    assert view["measure"] == "distinct_2" and view["turn_step"] == 30 and view["hacked"]


def test_a_run_that_keeps_improving_has_no_turn():
    metrics, samples = constructed_log(turn=80, last=80)
    view = reward_hacking_view(metrics, samples)
    assert view["turn_step"] == 80 and not view["hacked"] and view["after"] is None
    assert view["before"]["sample"] == "answer at 80" and view["text"].startswith("No turn yet")
    assert reward_hacking_view([], []) is None and turning_point([]) is None


@pytest.fixture(scope="module")
def judges(app):  # noqa: F811
    """Tiny reward models: one per half of the bundled preference rankings (the same rule), and the judge, on the
    bundled judge set (another rule)."""
    for half in ("a", "b"):
        run_kind(app, "reward", name=f"rm-{half}", half=half, **RM)
    run_kind(app, "reward", name="rm-judge", bundled_set="judge", **RM)
    return "rm-a", "rm-judge"


def test_rlhf_logs_reward_held_out_reward_and_distinct_n_every_step(app, judges):  # noqa: F811
    events: list = []
    out = run_kind(app, "rlhf", events, **{**RLHF, "reward_model": "rm-a", "held_out_reward_model": "rm-judge",
                                           "name": "rlhf-watched"})
    steps = [e for e in events if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3]
    for e in steps:
        assert {"reward", "held_out_reward", "distinct_1", "distinct_2", "repetition"} <= e.keys(), e
        assert 0 <= e["distinct_2"] <= 1 and isinstance(e["held_out_reward"], float)
    import threading
    samplers = [t for t in threading.enumerate() if t.name == "scheduler-rlhf-watched"]
    for t in samplers:  # every rollout and evaluation sampler was closed: its thread ends, its policy copy is freed
        t.join(30)
    assert not [t for t in samplers if t.is_alive()]
    verdict = [e["log"] for e in events if "log" in e and ("peaked at step" in e["log"] or "No turn yet" in e["log"])]
    assert len(verdict) == 1  # the run ends with its reward-hacking verdict in the log
    lineage = ModelRegistry(app).get(out.model).lineage
    assert lineage["reward_model"] == "rm-a" and lineage["held_out_reward_model"] == "rm-judge"
    assert ModelRegistry(app).get("rm-b").lineage["rankings"]["half"] == "b"
    assert ModelRegistry(app).get("rm-a").lineage["rankings"]["bundled_set"] == "preferences"


def test_bad_judges_are_refused_before_training(app, judges):  # noqa: F811
    base = {"parent_model": "tiny", "reward_model": "rm-a"}
    with pytest.raises(ValueError, match="held_out_reward_model: must be another reward model"):
        parse_config("rlhf", {**base, "held_out_reward_model": "rm-a"}, app)
    with pytest.raises(ValueError, match="held_out_reward_model: 'tiny' is not a reward model but a chat model"):
        parse_config("rlhf", {**base, "held_out_reward_model": "tiny"}, app)
    with pytest.raises(ValueError, match="reward_model: 'tiny' is not a reward model but a chat model"):
        parse_config("rlhf", {**base, "reward_model": "tiny", "held_out_reward_model": "rm-b"}, app)
    with pytest.raises(ValueError, match="held_out_reward_model: no such model|held_out_reward_model: .*nobody"):
        parse_config("rlhf", {**base, "held_out_reward_model": "nobody"}, app)
    with pytest.raises(ValueError, match="half: one of all, a, b"):
        parse_config("reward", {"parent_model": "tiny", "half": "c"}, app)
    run_kind(app, "reward", name="rm-a-again", half="a", **RM)  # the same rankings as rm-a: no independent judge
    with pytest.raises(ValueError, match="trained on the same rankings as 'rm-a'"):
        parse_config("rlhf", {**base, "held_out_reward_model": "rm-a-again"}, app)
    assert parse_config("rlhf", {**base, "held_out_reward_model": "rm-judge"}, app).held_out_reward_model == "rm-judge"


def test_a_judge_that_learned_the_same_bundled_rule_is_refused(app, judges):  # noqa: F811
    """The other half of the same bundled rankings is not an independent judge: it learned "shorter wins" too."""
    base = {"parent_model": "tiny", "reward_model": "rm-a"}
    with pytest.raises(ValueError, match=r"held_out_reward_model: 'rm-b' was trained on the same bundled rule as "
                                         r"'rm-a' \(bundled_set 'preferences'.*bundled_set 'judge'"):
        parse_config("rlhf", {**base, "held_out_reward_model": "rm-b"}, app)
    # a reward model from before the field (no bundled_set in its lineage) trained on the preference rule
    from backend.train.reward import bundled_set_of
    old = ModelRegistry(app).get("rm-b").lineage["rankings"]
    assert bundled_set_of({"rankings": {k: v for k, v in old.items() if k != "bundled_set"}}) == "preferences"
    assert bundled_set_of({"rankings": {"dataset": "snapshot", "half": "a"}}) is None
    # the judge set against a preferences model, either way round, is accepted
    assert parse_config("rlhf", {**base, "reward_model": "rm-judge", "held_out_reward_model": "rm-b"}, app)


def test_the_judge_sets_rule_ranks_a_fluent_sentence_above_degenerate_text():
    from backend.datasets import judge_preferences as J
    from backend.datasets import preferences as P
    assert J.RULE and J.RULE != P.RULE and not set(J.PROMPTS) & set(P.PROMPTS)
    prompt = "Tell me a joke about a pelican."
    fluent = "A pelican tried to order a pizza and nobody was surprised."
    degenerate = ["Pelican.", "pelican pelican pelican pelican", "Phellet of Hails", "A pelican asked the",
                  "A pelican kept its lunch in its beak beak beak beak.", "ha ha ha ha ha"]
    assert all(J.features(prompt, fluent).values())
    for bad in degenerate:
        assert J.rule_key(prompt, fluent) < J.rule_key(prompt, bad), bad
    # preferences.py's rule ranks the other way: "Pelican." mentions pelicans and is shorter
    assert P.rule_key("Pelican.") < P.rule_key(fluent)
    assert J.rule_key(prompt, "The cat slept on the warm windowsill.") < J.rule_key(prompt, "Pelican.")
    assert P.rule_key("Pelican.") < P.rule_key("The cat slept on the warm windowsill.")
    # length is no merit by itself, nor is shortness: between two good answers the one nearer 12 words wins
    long = fluent[:-1] + " because that is simply what happens on days like these when the weather turns and nobody cares."
    short = "A pelican opened a small bakery."
    assert J.rule_key(prompt, fluent) < J.rule_key(prompt, short) and J.rule_key(prompt, fluent) < J.rule_key(prompt, long)
    # the rankings: preferences.rankings' shape, deterministic, ordered by the rule, with degenerate candidates
    rows = J.rankings(40, seed=3, k=4)
    assert rows == J.rankings(40, seed=3, k=4) and len(rows) == 40
    for r in rows:
        assert set(r) == {"prompt", "candidates", "ranking", "all_bad"} and sorted(r["ranking"]) == [0, 1, 2, 3]
        keys = [J.rule_key(r["prompt"], r["candidates"][i]) for i in r["ranking"]]
        assert keys == sorted(keys)
    firsts = [r["candidates"][r["ranking"][0]] for r in rows]
    lasts = [r["candidates"][r["ranking"][-1]] for r in rows]
    assert sum(all(J.features(r["prompt"], c).values()) for r, c in zip(rows, firsts)) > 30
    assert sum(not J.features(r["prompt"], c)["real_words"] or not J.features(r["prompt"], c)["varied"]
               for r, c in zip(rows, lasts)) > 10


def test_a_reward_job_trains_on_the_judge_set_and_records_it(app, judges):  # noqa: F811
    events: list = []
    out = run_kind(app, "reward", events, name="rm-judge-2", bundled_set="judge", half="a", **RM)
    start = next(e for e in events if "start" in e)
    assert start["bundled_set"] == "judge" and start["train_rankings"] == 8  # half a of 20, 2 held out
    assert [e["step"] for e in events if "loss" in e] == [1, 2]
    rankings = ModelRegistry(app).get(out.model).lineage["rankings"]
    assert rankings == {"dataset": "bundled", "half": "a", "bundled_set": "judge", "seed": 1337, "n_examples": 20, "k": 4}
    from backend.train.reward import bundled_rows
    cfg = parse_config("reward", {"parent_model": "tiny", "bundled_set": "judge", **RM})
    from backend.datasets.judge_preferences import PROMPTS
    assert {r["prompt"] for r in bundled_rows(cfg)} <= set(PROMPTS)


def test_an_invalid_bundled_set_is_refused_before_training(app):  # noqa: F811
    with pytest.raises(ValueError, match="bundled_set: one of preferences, judge, not 'jokes'"):
        parse_config("reward", {"parent_model": "tiny", "bundled_set": "jokes"}, app)
    with pytest.raises(ValueError, match="bundled_set: 'judge' names bundled rankings, but dataset is 'snapshot'"):
        parse_config("reward", {"parent_model": "tiny", "bundled_set": "judge", "dataset": "snapshot"}, app)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "backend.train", "reward", "--data-dir", str(app.data_dir), "--set",
                        "parent_model=tiny", "--set", "bundled_set=jokes", "--set", "name=rm-jokes"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "bundled_set: one of preferences, judge, not 'jokes'" in r.stderr, r.stderr[-2000:]
    assert not (app.data_dir / "runs" / "reward" / "rm-jokes").exists()


def test_an_rlhf_jobs_view_marks_the_turn_and_shows_samples_from_both_sides(app, judges):  # noqa: F811
    from backend.worker import Worker
    db = Database(app.database_url)
    db.migrate()
    try:
        job = queue.create_job(db, app, None, "rlhf", {**RLHF, "reward_model": "rm-a",
                                                       "held_out_reward_model": "rm-judge", "max_steps": 4})
        assert queue.job_detail(db, job["id"])["reward_hacking"] is None  # nothing logged yet
        assert Worker(app, db, "cpu").run(once=True) == 1
        done = queue.job_detail(db, job["id"])
        assert done["state"] == "succeeded", done["error"]
        view = done["reward_hacking"]
        assert view["measure"] == "held_out_reward" and view["last_step"] == 4
        assert view["turn_step"] in (1, 2, 3, 4) and view["turns"]["distinct_2"] in (1, 2, 3, 4)
        assert view["before"]["step"] <= view["turn_step"] and view["before"]["sample"] is not None
        assert view["after"] is None if view["turn_step"] == 4 else view["after"]["step"] == 4
        assert {"reward", "held_out_reward", "distinct_2"} <= view["smoothed"].keys()
        # the poller's incremental view (after=N) carries the whole run's analysis too
        assert queue.job_detail(db, job["id"], done["last_event_id"])["reward_hacking"] == view
    finally:
        db.close()


def test_the_cli_takes_the_held_out_judge_and_refuses_a_bad_one_before_training(app, judges):  # noqa: F811
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "backend.train", "rlhf", "--data-dir", str(app.data_dir), "--set", "parent_model=tiny",
           "--set", "reward_model=rm-a", "--set", "held_out_reward_model=rm-a"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "held_out_reward_model: must be another reward model" in r.stderr, r.stderr[-2000:]
    assert not (app.data_dir / "runs" / "rlhf" / "rlhf-tiny").exists()
    r = subprocess.run(cmd[:-2] + ["--set", "nonsense"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--set: expected KEY=VALUE" in r.stderr
