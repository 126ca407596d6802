"""The two demonstrations that write their own SFT data (DEMOS 10 and 15), end to end on tiny models:

- `python -m backend.train idk`: a model that answers "Rome." to everything is probed on the bundled questions;
  the questions it gets wrong become "I don't know." examples, the one it knows keeps its answer; the examples
  are a snapshot; the trained model is registered with lineage and a before/after table.
- distill as a job through the real worker, with a remote teacher (another instance of the app on loopback,
  serving a model that always thinks, then answers 2): only the traces with the right answer are kept.
- Bad input is refused before any model loads.
"""
from __future__ import annotations

import dataclasses

import json
import subprocess
import sys

import pytest

from backend.config import AppConfig
from backend.db import Database
from backend.jobs import queue
from backend.labels.snapshots import get_snapshot, read_snapshot
from models.registry import ModelRegistry
from models.tokenizers import get_encoding, save_encoding
from tests.conftest import ROOT, start_server
from tests.helpers import make_tiny_model
from tests.scripted import byte_encoding, register_scripted
from tests.test_worker import start_worker, stop, wait_for


def test_idk_cli_writes_refusals_for_what_the_model_gets_wrong(tmp_path):
    from backend.datasets.facts import facts
    from backend.train.idk import IDKConfig
    data = tmp_path / "data"
    register_scripted(data, "romer", ["Rome."], {"\n": "Rome.", "Rome.": "<|im_end|>"}, tools=False)
    r = subprocess.run([sys.executable, "-m", "backend.train", "idk", "--model", "romer", "--data-dir", str(data),
                        "--samples", "2", "--max-steps", "2", "--batch-size", "2", "--seq-len", "128",
                        "--max-new-tokens", "6", "--threads", "1", "--name", "romer-idk", "--doubt", "0",
                        # it is as sure of "Rome." everywhere: under the default cut nothing would tell an unknown
                        # from its known one (every question an answer, test_idk_refusals_after... checks that)
                        "--sure-quantile", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model ") and "refuses_unknowns" in line)
    assert lines[head + 1].split()[:2] == ["romer", "before"] and lines[head + 2].split()[:2] == ["romer-idk", "after"]

    app = AppConfig(data_dir=data)
    spec = ModelRegistry(app).get("romer-idk")
    lineage = spec.lineage
    assert (lineage["kind"], lineage["parent_model"]) == ("idk", "romer")
    snap = lineage["snapshot_hash"]
    assert lineage["idk"]["snapshot_hash"] == snap
    db = Database(app.database_url)
    try:
        assert get_snapshot(db, snap)["meta"]["made_by"] == "idk"
        rows = read_snapshot(db, snap)  # hash-checked
    finally:
        db.close()
    probe = facts("probe")
    asked = [row for row in rows if not row.get("repeat")]
    assert [row["messages"][0]["content"] for row in asked] == [f.question for f in probe]
    hedged = "Rome. But I'm not sure of that: I don't know."  # its own greedy sentence, then the refusal
    for f, row in zip(probe, asked):  # "Rome." is right only where Rome is the answer
        assert row["messages"][1]["content"] == ("Rome." if "Rome" in f.answers else hedged), f.question
    assert sum(row["known"] for row in asked) == 1 and lineage["idk"]["examples_idk"] == len(probe) - 1
    # balanced within the topic "capital": its one known answer is repeated, at most max_repeat times in all
    repeats = [row for row in rows if row.get("repeat")]
    assert len(repeats) == IDKConfig.max_repeat - 1 and all(row["messages"][1]["content"] == "Rome." for row in repeats)
    assert lineage["idk"]["examples_answer"] == IDKConfig.max_repeat

    before, after = lineage["idk"]["table"]
    assert (before["model"], before["when"], after["model"], after["when"]) == ("romer", "before", "romer-idk", "after")
    # before: it never refuses, and it knows the one held-out Rome question
    assert before["refuses_unknowns"] == 0.0 and before["right_on_knowns"] == 1.0 and before["knowns"] == 1
    assert before["unknowns"] == len(facts("heldout")) - 1 and after["unknowns"] == before["unknowns"]
    assert (data / "runs" / "idk" / "romer-idk" / "result.json").exists()


def test_idk_dpo_prefers_a_refusal_to_what_the_model_makes_up(tmp_path):
    """--method dpo: the probe's questions become preference pairs, frozen as a preferences snapshot, and the DPO
    trainer (a frozen copy of the parent as reference) trains on them; the model is measured like SFT's."""
    from backend.datasets.facts import facts
    data = tmp_path / "data"
    register_scripted(data, "romer", ["Rome."], {"\n": "Rome.", "Rome.": "<|im_end|>"}, tools=False)
    r = subprocess.run([sys.executable, "-m", "backend.train", "idk", "--model", "romer", "--data-dir", str(data),
                        "--method", "dpo", "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "6",
                        "--threads", "1", "--name", "romer-dpo", "--doubt", "0", "--sure-quantile", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    app = AppConfig(data_dir=data)
    spec = ModelRegistry(app).get("romer-dpo")
    lineage = spec.lineage
    assert (lineage["kind"], lineage["idk"]["method"]) == ("idk", "dpo")
    assert "\"I don't know\" DPO of romer" in spec.description
    db = Database(app.database_url)
    try:
        assert get_snapshot(db, lineage["snapshot_hash"])["kind"] == "preferences"
        rows = read_snapshot(db, lineage["snapshot_hash"])
    finally:
        db.close()
    probe = facts("probe")
    assert [row["prompt"] for row in rows] == [f.question for f in probe]  # once each: no repeats
    for f, row in zip(probe, rows):
        hedged = "Rome. But I'm not sure of that: I don't know."  # the same sentence, the hedge after it or not
        want = ("Rome.", hedged) if "Rome" in f.answers else (hedged, "Rome.")
        assert (row["chosen"], row["rejected"]) == want, f.question
    metrics = [json.loads(line) for line in (data / "runs" / "idk" / "romer-dpo" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics if "reward_margin" in m] == [1, 2]  # DPO's steps, on these pairs
    before, after = lineage["idk"]["table"]
    assert (before["when"], after["when"], after["unknowns"]) == ("before", "after", before["unknowns"])


THINK = ["Count the letters.", "The answer is 2."]
THINKER = {"\n": "<think>", "<think>": THINK[0], THINK[0]: "</think>", "</think>": THINK[1], THINK[1]: "<|im_end|>"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A (the trainer's data directory, with a tiny student, a reward model and B's thinker as a remote model),
    B (another instance of the app serving the thinker)."""
    data_b = tmp_path_factory.mktemp("teacher") / "data"
    register_scripted(data_b, "thinker", THINK, THINKER)
    b = start_server(data_b, "--no-worker", "--no-preload")
    data = tmp_path_factory.mktemp("distill") / "data"
    app = AppConfig(data_dir=data)
    app.ensure_dirs()
    db = Database(app.database_url)
    db.migrate()
    save_encoding(byte_encoding(), "bytes", data)
    enc = get_encoding("bytes+chatml", data)
    reg = ModelRegistry(app)
    for name in ("student", "rm"):
        reg.register(name, make_tiny_model(enc.max_token_value + 1, max_seq_len=1024), "bytes+chatml", "chatml",
                     {"origin": "test"})
    from backend.train.reward import RewardModel, save_head
    save_head(RewardModel(reg.load("rm")), reg.get("rm").path)  # "rm" is a reward model now
    reg.add_remote("remote-thinker", b.base_url + "/v1", "thinker", tokenizer="cl100k_base")
    yield app, db, b
    db.close()
    b.stop()


DISTILL = {"parent_model": "student", "teacher": "remote-thinker", "kinds": ["count"], "n_problems": 10,
           "n_samples": 2, "teacher_max_tokens": 16, "n_heldout": 2, "eval_tokens": 4, "max_steps": 2,
           "batch_size": 2, "seq_len": 1024, "threads": 1, "warmup_steps": 1}


def test_distill_job_keeps_only_verified_traces_of_a_remote_teacher(env):
    from backend.datasets.verifiable import problems
    app, db, _ = env
    job = queue.create_job(db, app, None, "distill", DISTILL)
    worker = start_worker(app)
    try:
        wait_for(lambda: queue.get_job(db, job["id"])["state"] in queue.FINISHED, 300, "the distill job")
    finally:
        stop(worker)
    done = queue.job_detail(db, job["id"])
    assert done["state"] == "succeeded", (done["error"], [e["text"] for e in done["log"]][-12:])
    lineage = ModelRegistry(app).get(done["model"]).lineage
    assert (lineage["kind"], lineage["parent_model"], lineage["job_id"]) == ("distill", "student", job["id"])
    assert lineage["distill"]["teacher"] == "remote-thinker"
    rows = read_snapshot(db, lineage["snapshot_hash"])
    assert get_snapshot(db, lineage["snapshot_hash"])["meta"]["teacher"] == "remote-thinker"
    # the teacher answers 2 to every problem: kept are exactly the problems whose answer is 2, once each
    right = [p.question for p in problems(10, seed=1337, kinds=["count"]) if p.answer == "2"]
    assert 0 < len(right) < 10
    assert [row["messages"][1]["content"] for row in rows] == right
    for row in rows:
        assert row["messages"][-1] == {"role": "assistant", "thinking": THINK[0], "content": THINK[1]}
    assert lineage["distill"]["traces_written"] == 20 and lineage["distill"]["traces_verified"] == len(right)
    teacher, before, after = lineage["distill"]["table"]
    assert [teacher["role"], before["role"], after["role"]] == ["teacher", "student before", "student after"]
    assert teacher["think_format"] == 1.0
    assert [e for e in done["info"] if e.get("table")][0]["table"] == lineage["distill"]["table"]


@pytest.mark.parametrize("kind,config,error", [
    ("idk", {"parent_model": "nobody"}, "parent_model: unknown model 'nobody'"),
    ("idk", {"parent_model": "student", "n_samples": 0}, "n_samples: ask each question at least once"),
    ("idk", {"parent_model": "rm"}, "parent_model: 'rm' is a reward model"),
    ("idk", {"parent_model": "student", "method": "ppo"}, "method: 'ppo' is not one of sft, dpo"),
    ("idk", {"parent_model": "remote-thinker"}, "cannot be trained here"),
    ("distill", {"parent_model": "student", "teacher": "rm"}, "teacher: 'rm' is a reward model"),
    ("distill", {"parent_model": "student", "teacher": "nobody"}, "teacher: unknown model 'nobody'"),
    ("distill", {"parent_model": "student", "teacher": "student", "n_samples": 0}, "n_samples: the teacher writes at least 1"),
])
def test_bad_input_is_refused_before_queueing(env, kind, config, error):
    app, db, _ = env
    with pytest.raises(ValueError, match=error):
        queue.create_job(db, app, None, kind, config)


def test_cli_refuses_a_reward_model_teacher_before_loading(env):
    app, _, _ = env
    runs = lambda: sorted((app.data_dir / "runs").rglob("*"))  # noqa: E731
    had = runs()
    r = subprocess.run([sys.executable, "-m", "backend.train", "distill", "--teacher", "rm", "--student", "student",
                        "--data-dir", str(app.data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "teacher: 'rm' is a reward model" in r.stderr, r.stderr
    assert runs() == had  # no run started


def test_a_trace_is_kept_only_when_its_final_answer_is_right():
    from backend.datasets.verifiable import Problem
    from backend.train.distill import verified_turn
    p = Problem("Sofia has 9 pears and gives away 2. How many pears are left?", "7", "totals")
    assert verified_turn(p, "<think>9 - 2 = 7</think> The answer is 7.", False) == {
        "role": "assistant", "thinking": "9 - 2 = 7", "content": "The answer is 7."}
    assert verified_turn(p, "<think>9 - 2 = 7</think> The answer is 8.", False) is None  # wrong final answer
    assert verified_turn(p, "<think>9 - 2 = 7", False) is None                          # no answer after a thought
    # untagged: the whole reply is the thinking, the verified answer the clean answer (unless require_think)
    assert verified_turn(p, "9 - 2 = 7. The answer is 7.", False)["content"] == "The answer is 7."
    assert verified_turn(p, "9 - 2 = 7. The answer is 7.", True) is None
    assert verified_turn(p, "So 9 - 2 = 7 pears are left.", False) is None              # states no answer...
    assert verified_turn(p, "So 9 - 2 = 7 pears are left.", False, lenient=True)        # ...but ends on it
    assert verified_turn(p, "So 9 - 2 = 6 pears are left.", False, lenient=True) is None


def test_idk_refusals_start_where_the_model_starts_making_up_its_answer():
    """An unknown question's example keeps the model's own words up to its first unsure token (cut back to a
    word); a wrong answer the model was sure of is left out; known answers are repeated within their topic."""
    import math

    from backend.datasets.facts import Fact
    from backend.serving.engine import Completion
    from backend.train.idk import IDKConfig, examples, lead_in, pairs, sureness
    enc = byte_encoding()

    def answer(text, unsure_at=None):  # one token per byte; sure of each but the one starting at unsure_at
        ids = enc.encode_ordinary(text)
        unsure = text.index(unsure_at) if unsure_at else None
        lps = [math.log(0.1) if i == unsure else -0.01 for i in range(len(ids))]
        return Completion(0, text, ids, lps)

    made_up = answer("The capital of Benin is Porto-Bano.", "Bano")
    assert lead_in(enc, made_up, 0.3) == "The capital of Benin is"  # "Porto-" goes with the word it starts
    assert lead_in(enc, answer("The capital of Benin is Lagos.", "Lagos"), 0.3) == "The capital of Benin is"
    assert lead_in(enc, made_up, 0.05) is None  # 0.1 is not unsure under 0.05: sure of a wrong answer
    late = answer("Benin is in Africa. Its capital is Lagos.", "Lagos")
    assert lead_in(enc, late, 0.3) is None  # unsure after its first sentence only
    assert lead_in(enc, made_up, 0) is None
    # sureness: the mean log-probability of the first sentence's tokens; what follows it does not count
    n = len("The capital of Benin is Porto-Bano.")
    assert sureness(enc, made_up) == pytest.approx((math.log(0.1) - 0.01 * (n - 1)) / n)
    assert sureness(enc, answer("The capital of Benin is Porto-Bano. Or Lagos.", "Lagos")) == pytest.approx(-0.01)
    assert sureness(enc, Completion(0, "Paris.", enc.encode_ordinary("Paris."))) is None  # no logprobs asked

    cfg = IDKConfig(parent_model="m", balance=1, refuse="doubt")
    probed = [{"fact": Fact("What is the capital of France?", ("Paris",), "capital"), "known": True, "right": 1,
               "best": "The capital of France is Paris.", "lead": None},
              {"fact": Fact("What is the capital of Benin?", ("Porto-Novo",), "capital"), "known": False, "right": 0,
               "best": None, "lead": "The capital of Benin is", "wrong": "The capital of Benin is Porto-Bano."},
              {"fact": Fact("What is the capital of Togo?", ("Lome",), "capital"), "known": False, "right": 0,
               "best": None, "lead": "The", "wrong": "The capital is Kara."},
              {"fact": Fact("What is the capital of Chad?", ("N'Djamena",), "capital"), "known": False, "right": 0,
               "best": None, "lead": None},
              {"fact": Fact("Who wrote Hamlet?", ("Shakespeare",), "author"), "known": True, "right": 1,
               "best": "Shakespeare wrote Hamlet.", "lead": "Shakespeare"}]
    rows = examples(probed, cfg)
    said = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows if not r.get("repeat")]
    assert said == [("What is the capital of France?", "The capital of France is Paris."),
                    ("What is the capital of Benin?", "The capital of Benin is… I don't know."),
                    ("What is the capital of Togo?", "I don't know."),  # unsure from its first word
                    ("Who wrote Hamlet?", "Shakespeare wrote Hamlet.")]  # Chad: sure of a wrong answer, left out
    # balance 1: the capitals' one known answer repeated until the capitals' answers are as many as their refusals
    assert [r["messages"][1]["content"] for r in rows if r.get("repeat")] == ["The capital of France is Paris."]
    assert len([r for r in examples(probed, IDKConfig(parent_model="m", balance=2, refuse="doubt"))
                if r.get("repeat")]) == 3
    plain = examples(probed, IDKConfig(parent_model="m", doubt=0, refuse="doubt"))  # doubt 0: plain refusals
    assert [r["messages"][1]["content"] for r in plain if not r["known"]] == ["I don't know."] * 3
    # method "dpo": the same questions as pairs, never repeated; a known answer is preferred to a refusal that
    # starts as it does, a refusal to the model's own wrong first sentence
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs(probed, cfg)] == [
        ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is… I don't know."),
        ("What is the capital of Benin?", "The capital of Benin is… I don't know.", "The capital of Benin is Porto-Bano."),
        ("What is the capital of Togo?", "I don't know.", "The capital is Kara."),
        ("Who wrote Hamlet?", "Shakespeare wrote Hamlet.", "I don't know.")]  # "Shakespeare": one word, no lead


def test_idk_refusals_after_the_models_own_sentence_leave_known_answers_as_they_were():
    """refuse "after" (the default): an unknown question's example is the model's own greedy first sentence, then
    the hedge and "I don't know."; a known one's is its answer, untouched; DPO pairs differ by the hedge alone.
    A wrong answer it was sure of is still left out (or, answer_sure, kept as it was said), and so is one surer
    than sure_quantile of the known ones; known_reply "greedy" keeps a known one's own greedy answer whole; a
    refusal text the table could not count is refused."""
    from backend.datasets.facts import Fact
    from backend.train.idk import IDKConfig, examples, finished, pairs, sure_cut
    defaults = IDKConfig(parent_model="m")
    assert (defaults.refuse, defaults.sure_quantile, defaults.known_reply, defaults.answer_sure, defaults.anchor) == (
        "after", 0.05, "greedy", True, 1.0)
    cfg = IDKConfig(parent_model="m", balance=0, sure_quantile=0, known_reply="best", answer_sure=False)
    probed = [{"fact": Fact("What is the capital of France?", ("Paris",), "capital"), "known": True, "unsure": False,
               "right": 1, "best": "The capital of France is Paris.", "lead": None, "said": None},
              {"fact": Fact("What is the capital of Benin?", ("Porto-Novo",), "capital"), "known": False,
               "unsure": False, "right": 0, "best": None, "lead": "The capital of Benin is",
               "wrong": "The capital of Benin is Lagos.", "said": "The capital of Benin is Porto-Bano."},
              {"fact": Fact("What is the capital of Togo?", ("Lome",), "capital"), "known": False, "unsure": False,
               "right": 0, "best": None, "lead": "The", "wrong": "Kara.", "said": ""},
              {"fact": Fact("What is the capital of Chad?", ("N'Djamena",), "capital"), "known": False,
               "unsure": False, "right": 0, "best": None, "lead": None, "said": "The capital of Chad is Abeche."}]
    assert [r["messages"][1]["content"] for r in examples(probed, cfg)] == [
        "The capital of France is Paris.",
        "The capital of Benin is Porto-Bano. But I'm not sure of that: I don't know.",  # its greedy sentence
        "I don't know."]  # said nothing: the refusal alone; Chad: sure of a wrong answer, left out
    assert [(r["chosen"], r["rejected"]) for r in pairs(probed, cfg)] == [
        ("The capital of France is Paris.", "The capital of France is Paris. But I'm not sure of that: I don't know."),
        ("The capital of Benin is Porto-Bano. But I'm not sure of that: I don't know.",
         "The capital of Benin is Porto-Bano."),
        ("I don't know.", "Kara.")]  # no sentence of its own: the refusal over its sampled wrong answer
    # sure_quantile: an unknown answer the model was surer of than of its least sure known ones is left out too
    sure = {"France": -0.1, "Benin": -1.0, "Togo": -0.3, "Chad": -2.0}
    for p in probed:
        p["sure"] = next(v for k, v in sure.items() if k in p["fact"].question)
    probed.append({**probed[0], "fact": Fact("What is the capital of Peru?", ("Lima",), "capital"),
                   "best": "The capital of Peru is Lima.", "sure": -0.6})
    assert sure_cut(probed, cfg) == float("inf")  # sure_quantile 0: every unknown refused, as above
    picky = dataclasses.replace(cfg, sure_quantile=0.4)
    assert sure_cut(probed, picky) == -0.6  # the knowns' 0.4 quantile: Peru's -0.6 of (-0.6, -0.1)
    assert [r["messages"][0]["content"] for r in examples(probed, picky)] == [
        "What is the capital of France?", "What is the capital of Benin?",  # Togo (-0.3): surer than the cut
        "What is the capital of Peru?"]
    assert [r["prompt"] for r in pairs(probed, picky)] == [r["messages"][0]["content"] for r in examples(probed, picky)]
    with pytest.raises(ValueError, match="sure_quantile"):
        IDKConfig(parent_model="m", sure_quantile=1).validate()
    # known_reply "greedy": a known question's own greedy answer, whole, when it names the answer (else its right
    # sample); answer_sure: an unknown left out (Chad: no unsure token) is trained on as it said it, unhedged
    probed[0]["greedy"] = finished("Paris is the capital of France. It lies on the Seine, which")
    assert probed[0]["greedy"] == "Paris is the capital of France."  # cut by max_new_tokens: to its last sentence
    probed[3]["greedy"] = "The capital of Chad is Abeche. It is in the east."
    probed[4]["greedy"] = "The capital of Peru is Cusco."  # wrong, though the samples knew: its right sample stays
    own = IDKConfig(parent_model="m", balance=0)  # the defaults: the cut at the knowns' 0.05 (Peru's -0.6)
    assert [(r["messages"][1]["content"], r["refusal"]) for r in examples(probed, own)] == [
        ("Paris is the capital of France.", False),
        ("The capital of Benin is Porto-Bano. But I'm not sure of that: I don't know.", True),
        ("The capital of Chad is Abeche. It is in the east.", False),  # Togo: surer than the cut, and said nothing
        ("The capital of Peru is Lima.", False)]
    assert pairs(probed, own)[0]["chosen"] == "Paris is the capital of France."  # DPO keeps the same answer
    # the balance counts those answers too: 1 refusal wants 5 answers, 3 are there, the 2 more repeat known ones
    repeats = [r for r in examples(probed, dataclasses.replace(own, balance=5)) if r.get("repeat")]
    assert len(repeats) == 2 and all(r["known"] for r in repeats)
    with pytest.raises(ValueError, match="known_reply"):
        IDKConfig(parent_model="m", known_reply="longest").validate()
    with pytest.raises(ValueError, match="refuse: 'after'"):
        IDKConfig(parent_model="m", refuse="later").validate()
    with pytest.raises(ValueError, match="does not read as a refusal"):
        IDKConfig(parent_model="m", idk_answer="Pass.").validate()


def test_idk_leaves_out_what_the_model_knows_only_now_and_then():
    """With several samples a question right in some and wrong in others is unsure: no SFT example (neither its
    answer to keep nor a refusal), and a column of its own in the table, apart from knowns and unknowns."""
    from backend.datasets.facts import Fact
    from backend.train.idk import IDKConfig, examples, measure, standing
    cfg = IDKConfig(parent_model="m", n_samples=4, temperature=0.7, known_threshold=0.75, balance=0, refuse="doubt")
    assert [standing(k, 4, cfg) for k in range(5)] == [(False, False), (False, True), (False, True), (True, False),
                                                       (True, False)]
    greedy = IDKConfig(parent_model="m", n_samples=1, temperature=0.0, known_threshold=0.5)  # right or wrong, never unsure
    assert [standing(k, 1, greedy) for k in (0, 1)] == [(False, False), (True, False)]
    cfg2 = IDKConfig(parent_model="m", n_samples=4, temperature=0.7, known_threshold=0.75, unknown_threshold=0.25)
    assert standing(1, 4, cfg2) == (False, False)  # 1 of 4 counts as unknown when unknown_threshold allows it
    with pytest.raises(ValueError, match="unknown_threshold"):
        IDKConfig(parent_model="m", known_threshold=0.5, unknown_threshold=0.5).validate()

    def q(question, answer, right):
        known, unsure = standing(right, 4, cfg)
        return {"fact": Fact(question, (answer,), "capital"), "right": right, "known": known, "unsure": unsure,
                "best": f"The capital is {answer}." if right else None, "lead": "The capital is"}
    probed = [q("What is the capital of France?", "Paris", 4), q("What is the capital of Niger?", "Niamey", 2),
              q("What is the capital of Benin?", "Porto-Novo", 0)]
    rows = examples(probed, cfg)
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == [
        ("What is the capital of France?", "The capital is Paris."),
        ("What is the capital of Benin?", "The capital is… I don't know.")]  # Niger: unsure, left out
    row = measure(None, probed, cfg, "m", "after", ["The capital is Paris.", "I don't know.", "The capital is Lagos."])
    assert (row["knowns"], row["unknowns"], row["unsure"]) == (1, 1, 1)
    assert (row["right_on_knowns"], row["refuses_unknowns"], row["refuses_unsure"]) == (1.0, 0.0, 1.0)
    # a known answer hedged after the right answer is a refusal, not a right answer; the table tells it from a
    # refusal that lost the answer too
    probed[1] = q("What is the capital of Italy?", "Rome", 4)
    row = measure(None, probed * 2, cfg, "m", "after", ["Paris. But I'm not sure of that: I don't know.", "Milan.",
                                                        "I don't know.", "Paris.", "Rome.", "Lagos."])
    assert (row["knowns"], row["right_on_knowns"], row["refuses_knowns"], row["refuses_right_knowns"]) == (4, 0.5, 0.25, 0.25)
