"""Practice problems and inference-time scaling (backend.practice): pass@k, majority vote and best-of-k
against hand-computed cases; N samples of a "coin" chat model whose answers are known (a bigram table that
after the assistant prompt writes "The answer is 7." half the time, "Hmm." then "The answer is 5." a quarter,
"I am not sure." a quarter) graded right and wrong; then the REST doors on a real server."""
from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from backend import practice as svc
from backend.api import practice as practice_api
from backend.config import AppConfig
from backend.playground import Playground
from tests.conftest import start_server
from tests.helpers import make_tiny_model, register_tiny_model
from tests.scripted import (
    RAMBLE,
    register_rambler,
    script_encoding,
    scripted_model,
    tok,
)
from tests.test_labels_api import ROLES, auth, database_with_users, required_role

RIGHT, HMM, WRONG, UNSURE = "The answer is 7.", "Hmm.", "The answer is 5.", "I am not sure."
QUESTION = "Emily has 3 apples and buys 4 more. How many apples does Emily have now?"


def register_coin(data: Path, name: str = "coin") -> None:
    """The coin model (see the module doc) and a reward model on its tokenizer ("coin-rm", a random tiny
    backbone with a random head: its scores are arbitrary but fixed)."""
    import math

    import torch

    from backend.train.reward import RewardModel, save_head
    from models.registry import ModelRegistry
    from models.tokenizers import save_encoding
    enc = script_encoding([RIGHT, HMM, WRONG, UNSURE], tools=False, name=name)
    save_encoding(enc, name, data)
    model = scripted_model(enc, {"\n": RIGHT, RIGHT: "<|im_end|>", HMM: WRONG, WRONG: "<|im_end|>",
                                 UNSURE: "<|im_end|>"})
    with torch.no_grad():  # slot 0 is "\n": logits 80 + 8 ln 2 for RIGHT, 80 for HMM and UNSURE -> 1/2, 1/4, 1/4
        model.lm_head.weight[tok(enc, RIGHT), 0] += math.log(2) / 8
        model.lm_head.weight[tok(enc, HMM), 0] = 10.0
        model.lm_head.weight[tok(enc, UNSURE), 0] = 10.0
    reg = ModelRegistry(AppConfig(data_dir=data))
    reg.register(name, model, tokenizer=name, chat_format="chatml", lineage={"origin": "tests.test_practice"})
    backbone = make_tiny_model(enc.max_token_value + 1, seed=3)
    spec = reg.register(f"{name}-rm", backbone, tokenizer=name, chat_format="chatml", lineage={"origin": "tests"})
    rm = RewardModel(backbone)
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    save_head(rm, spec.path)


# -- the numbers, by hand ------------------------------------------------------------------------------
def test_pass_at_k_matches_the_combinatorial_definition():
    assert svc.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert svc.pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)       # 1 - C(3,2)/C(4,2)
    assert svc.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)      # 1 - C(3,2)/C(5,2)
    assert svc.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)   # 1 - C(7,5)/C(10,5)
    assert svc.pass_at_k(4, 0, 4) == 0.0 and svc.pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        svc.pass_at_k(4, 5, 1)


def test_majority_vote_at_k_by_hand():
    answers, rights = ["7", "7", "5", None], [True, True, False, False]
    assert svc.tally(answers) == [("7", 2), ("5", 1)]
    assert svc.majority_at_k(answers, rights, 1) == pytest.approx(0.5)   # one sample: pass@1
    # six pairs: {7,7} 1, {7,5} x2 ties 1/2, {7,-} x2 1, {5,-} 0  ->  4/6
    assert svc.majority_at_k(answers, rights, 2) == pytest.approx(4 / 6)
    assert svc.majority_at_k(answers, rights, 4) == 1.0
    # voting beats one sample when the right answer is the most common of several wrong ones
    answers, rights = ["7", "7", "5", "4", "3"], [True, True, False, False, False]
    assert svc.majority_at_k(answers, rights, 5) == 1.0 > svc.majority_at_k(answers, rights, 1) == pytest.approx(0.4)
    assert svc.vote_credit([None, None], {}) == 0.0
    assert svc.ks(8) == [1, 2, 4, 8] and svc.ks(6) == [1, 2, 4, 6] and svc.ks(1) == [1]


def test_best_of_k_picks_the_top_scored_sample_of_every_subset():
    scores, rights = [0.1, 0.9, 0.5, 0.2], [False, True, False, True]
    assert svc.best_of_k(scores, rights, 1) == pytest.approx(0.5)
    # pairs: {0,1}->1 T, {0,2}->2 F, {0,3}->3 T, {1,2}->1 T, {1,3}->1 T, {2,3}->2 F
    assert svc.best_of_k(scores, rights, 2) == pytest.approx(4 / 6)
    assert svc.best_of_k(scores, rights, 4) == 1.0


def test_a_typed_problem_needs_an_answer_the_checker_can_compare():
    p = svc.typed_problem(" What is 3 + 4? ", "7")
    assert p.check("The answer is 7.") and not p.check("The answer is 5.") and not p.check("7")
    assert svc.typed_problem("Every other letter of 'banana'?", "AAA").check("The answer is aaa")
    for bad in ("seven apples", "2.5", ""):
        with pytest.raises(ValueError, match="answer"):
            svc.typed_problem("What?", bad)
    with pytest.raises(ValueError, match="question"):
        svc.typed_problem("  ", "7")


# -- the service on the coin model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    data = tmp_path_factory.mktemp("practice") / "data"
    register_coin(data)
    register_rambler(data)
    register_tiny_model(data, "basey", tokenizer="cl100k_base", chat_format=None)
    pg = Playground(AppConfig(data_dir=data, start_worker=False, preload=False))
    yield pg
    pg.db.close()


def expected_vote(votes7: int, votes5: int) -> float:
    """The majority vote's credit when "7" is right: win 1, tie 1/2, lose 0 (no votes at all: 0)."""
    return 0.0 if votes7 == votes5 == 0 else 1.0 if votes7 > votes5 else 0.5 if votes7 == votes5 else 0.0


def test_lenient_grading_credits_a_worked_answer_that_never_says_the_answer_is():
    problem = svc.typed_problem("Emily has 7 pears and eats 1. How many are left?", "6")
    worked = "Emily starts with 7 pears. 7 - 1 = 6 pears are left."
    assert svc.grade(problem, worked) == (None, False)              # strict: the GRPO reward wants it stated
    assert svc.grade(problem, worked, lenient=True) == ("6", True)  # lenient: the reply's last number
    assert svc.grade(problem, "7 - 1 = 5", lenient=True) == ("5", False)
    assert svc.grade(problem, "The answer is 6. Then 7 more.", lenient=True) == ("6", True)  # a stated answer wins


def test_samples_are_graded_by_the_grpo_rule_and_add_up(pg):
    r = svc.practice(pg, "coin", svc.typed_problem(QUESTION, "7"), svc.PracticeConfig(n=32, temperature=1.0, seed=1))
    sols = r["solutions"]
    assert len(sols) == 32 and r["seed"] == 1
    texts = Counter(s["text"] for s in sols)
    assert set(texts) == {RIGHT, HMM + WRONG, UNSURE}          # the answer varies from sample to sample
    assert 4 <= texts[RIGHT] <= 28                              # about half (binomial 32, 1/2; 4 sd either side)
    for s in sols:
        expected = {RIGHT: ("7", True, 1), HMM + WRONG: ("5", False, 2), UNSURE: (None, False, 1)}[s["text"]]
        assert (s["answer"], s["right"], s["tokens"]) == expected
        assert s["finish_reason"] == "stop"
    c, w = texts[RIGHT], texts[HMM + WRONG]
    assert r["right"] == c and r["pass_at_1"] == pytest.approx(c / 32)
    assert r["tally"] == sorted([{"answer": "7", "votes": c, "right": True}, {"answer": "5", "votes": w, "right": False}],
                                key=lambda t: -t["votes"])
    assert r["abstained"] == texts[UNSURE]
    assert r["mean_tokens_right"] == 1 and r["mean_tokens_wrong"] == pytest.approx((2 * w + texts[UNSURE]) / (32 - c), abs=0.05)
    assert [row["k"] for row in r["curve"]] == [1, 2, 4, 8, 16, 32]
    assert r["curve"][0]["majority_at_k"] == pytest.approx(c / 32) and r["curve"][0]["pass_at_k"] == pytest.approx(c / 32)
    assert r["majority"]["right"] == r["curve"][-1]["majority_at_k"] == expected_vote(c, w)
    assert r["curve"][-1]["pass_at_k"] == 1.0
    assert "best_of_k" not in r["curve"][0] and "reward model" in r["best_of_n_note"]
    again = svc.practice(pg, "coin", svc.typed_problem(QUESTION, "7"), svc.PracticeConfig(n=32, temperature=1.0, seed=1))
    assert [s["text"] for s in again["solutions"]] == [s["text"] for s in sols]  # the seed repeats the run


def test_greedy_gives_one_answer_and_the_think_template_is_the_grpo_one(pg):
    from backend.train.grpo import THINK_SYSTEM
    r = svc.practice(pg, "coin", svc.typed_problem(QUESTION, "5"),
                     svc.PracticeConfig(n=4, temperature=0.0, template="think"))
    assert [s["text"] for s in r["solutions"]] == [RIGHT] * 4 and r["system"] == THINK_SYSTEM
    assert r["pass_at_1"] == 0.0 and r["majority"] == {"answers": ["7"], "right": 0.0}
    assert all(row["pass_at_k"] == 0.0 for row in r["curve"])


def test_best_of_n_by_a_reward_model(pg):
    assert svc.reward_models(pg.registry) == ["coin-rm"]
    r = svc.practice(pg, "coin", svc.typed_problem(QUESTION, "7"),
                     svc.PracticeConfig(n=16, temperature=1.0, seed=2, reward_model="coin-rm"))
    sols = r["solutions"]
    assert all(len({s["score"] for s in sols if s["text"] == t}) == 1 for t in {s["text"] for s in sols})  # same text, same score
    top = max(range(16), key=lambda i: (sols[i]["score"], -i))
    assert r["best_of_n"]["index"] == top and r["best_of_n"]["right"] == sols[top]["right"]
    assert r["curve"][0]["best_of_k"] == pytest.approx(r["pass_at_1"])
    assert r["curve"][-1]["best_of_k"] == float(sols[top]["right"])


def test_scaling_curve_over_generated_problems(pg):
    from backend.datasets.verifiable import problems
    probs = problems(3, seed=8, kinds=["apples"])
    assert [p.answer for p in probs] == ["2", "5", "7"]  # the coin model says 7 (p 1/2) or 5 (p 1/4) or nothing
    r = svc.scaling_curve(pg, "coin", "apples", m=3, seed=8, cfg=svc.PracticeConfig(n=16, temperature=1.0, seed=5))
    assert [p["question"] for p in r["problems"]] == [p.question for p in probs]
    two, five, seven = r["problems"]
    votes = [{t["answer"]: t["votes"] for t in p["tally"]} for p in r["problems"]]
    assert two["right"] == 0 and two["majority"]["right"] == 0.0
    assert five["right"] == votes[1].get("5", 0) and seven["right"] == votes[2].get("7", 0)
    assert five["majority"]["right"] == expected_vote(votes[1].get("5", 0), votes[1].get("7", 0))
    assert seven["majority"]["right"] == expected_vote(votes[2].get("7", 0), votes[2].get("5", 0))
    assert [row["k"] for row in r["curve"]] == [1, 2, 4, 8, 16]
    assert r["pass_at_1"] == pytest.approx((five["right"] + seven["right"]) / 48)
    assert r["curve"][0]["majority_at_k"] == pytest.approx(r["pass_at_1"])
    assert r["curve"][-1]["majority_at_k"] == pytest.approx((five["majority"]["right"] + seven["majority"]["right"]) / 3)
    assert r["curve"][-1]["pass_at_k"] == pytest.approx(((five["right"] > 0) + (seven["right"] > 0)) / 3)


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_stop_mid_run_grades_nothing_and_frees_the_engine_for_the_next_request(pg):
    problem = svc.typed_problem(QUESTION, "7")
    scheduler = pg.engines.get("rambler").scheduler  # loaded up front, so the run below is all decoding
    cancel, outcome = threading.Event(), {}

    def run():
        try:
            outcome["result"] = svc.practice(pg, "rambler", problem, svc.PracticeConfig(n=8, max_tokens=1024), cancel)
        except svc.Stopped as e:
            outcome["stopped"] = str(e)

    worker = threading.Thread(target=run)
    worker.start()
    wait_until(lambda: scheduler.stats()["rows"] == 8)  # its 8 samples are in the running batch
    time.sleep(0.3)  # and decoding: 8 x 1024 tokens take far longer than this
    cancel.set()
    worker.join(timeout=60)
    assert not worker.is_alive()
    # Not one of the 8 samples reached its 1024 tokens (an unstopped run ends with all 8), and no pass@k is made up.
    assert outcome == {"stopped": "stopped with 0 of 8 samples finished; nothing is graded"}
    # The engine is free: the next request runs to the end.
    r = svc.practice(pg, "rambler", problem, svc.PracticeConfig(n=2, max_tokens=16))
    assert [s["text"] for s in r["solutions"]] == [RAMBLE * 16] * 2 and r["right"] == 0
    assert all(s["finish_reason"] == "length" for s in r["solutions"])
    stopped = threading.Event()
    stopped.set()  # a scaling curve stopped before it starts grades nothing either
    with pytest.raises(svc.Stopped, match="0 of 8 samples"):
        svc.scaling_curve(pg, "coin", "apples", 2, 0, svc.PracticeConfig(n=4), cancel=stopped)
    assert svc.practice(pg, "coin", problem, svc.PracticeConfig(n=4))["n"] == 4


def test_bad_requests_name_the_problem(pg):
    p = svc.typed_problem(QUESTION, "7")
    with pytest.raises(ValueError, match="base model"):
        svc.practice(pg, "basey", p, svc.PracticeConfig(n=2))
    with pytest.raises(ValueError, match="unknown model"):
        svc.practice(pg, "nope", p, svc.PracticeConfig(n=2))
    with pytest.raises(ValueError, match="n must"):
        svc.practice(pg, "coin", p, svc.PracticeConfig(n=0))
    with pytest.raises(ValueError, match="reward_model"):
        svc.practice(pg, "coin", p, svc.PracticeConfig(n=2, reward_model="coin"))
    with pytest.raises(ValueError, match="template"):
        svc.practice(pg, "coin", p, svc.PracticeConfig(n=2, template="cot"))
    with pytest.raises(ValueError, match="kind"):
        svc.scaling_curve(pg, "coin", "riddles", 2, 0, svc.PracticeConfig(n=2))


# -- REST on a real server -----------------------------------------------------------------------------
ROUTES = [(m, r.path, required_role(r)) for r in practice_api.router.routes if isinstance(r, APIRoute)
          for m in sorted(r.methods)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    data = tmp_path_factory.mktemp("practice_api") / "data"
    register_coin(data)
    register_rambler(data, layers=64)  # 64 x 1024 tokens of it take minutes: a hang-up must stop it
    db, people = database_with_users(data, [(r, r) for r in ROLES])
    server = start_server(data, "--model", "coin", "--no-preload", "--no-worker")
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client, {n: auth(p[2]) for n, p in people.items()}
    server.stop()
    db.close()


def test_every_practice_route_declares_who_may_use_it():
    assert {(m, p): role for m, p, role in ROUTES} == {
        ("GET", "/api/practice/problems"): None, ("GET", "/api/practice/reward-models"): None,
        ("POST", "/api/practice/sample"): "learner", ("POST", "/api/practice/scaling"): "learner"}


def test_sampling_over_rest(live):
    client, keys = live
    body = {"model": "coin", "problem": {"question": QUESTION, "answer": "7"}, "n": 8, "temperature": 1.0, "seed": 3}
    assert client.post("/api/practice/sample", json=body).status_code == 401
    for role in ROLES:  # a learner is enough
        assert client.post("/api/practice/sample", json={}, headers=keys[role]).status_code == 422
    r = client.post("/api/practice/sample", json=body, headers=keys["learner"])
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["solutions"]) == 8 and out["right"] == sum(s["text"] == RIGHT for s in out["solutions"])
    assert [row["k"] for row in out["curve"]] == [1, 2, 4, 8]
    with_rm = client.post("/api/practice/sample", json={**body, "reward_model": "coin-rm"}, headers=keys["learner"]).json()
    assert "best_of_n" in with_rm and "best_of_k" in with_rm["curve"][0]
    assert client.get("/api/practice/reward-models").json() == {"reward_models": ["coin-rm"]}


def test_bundled_problems_and_the_scaling_curve_over_rest(live):
    client, keys = live
    got = client.get("/api/practice/problems", params={"kind": "count", "seed": 4}).json()
    assert got["problems"][0]["question"] == svc.generated_problem("count", 4).question and "spell" in got["kinds"]
    r = client.post("/api/practice/sample", headers=keys["learner"],
                    json={"model": "coin", "kind": "count", "problem_seed": 4, "n": 2})
    assert r.status_code == 200 and r.json()["problem"]["question"] == got["problems"][0]["question"]
    r = client.post("/api/practice/scaling", headers=keys["learner"],
                    json={"model": "coin", "kind": "apples", "m": 2, "n": 4, "seed": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["problems"]) == 2 and [row["k"] for row in r.json()["curve"]] == [1, 2, 4]


def test_a_client_that_hangs_up_stops_its_sampling_and_frees_the_engine(live):
    """64 x 1024 tokens of a 64-layer rambler would hold the engine for minutes (its 16-layer kin took ~5 s
    for 64 x 256); the client gives up after 1 s, and the next request is answered within seconds."""
    client, keys = live
    body = {"model": "rambler", "problem": {"question": QUESTION, "answer": "7"}}
    assert client.post("/api/practice/sample", json={**body, "n": 2, "max_tokens": 4},
                       headers=keys["learner"]).status_code == 200  # loaded, so the next run is all decoding
    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/practice/sample", json={**body, "n": svc.MAX_N, "max_tokens": svc.MAX_TOKENS},
                    headers=keys["learner"], timeout=1.0)
    t0 = time.monotonic()
    r = client.post("/api/practice/sample", json={**body, "n": 2, "max_tokens": 8}, headers=keys["learner"])
    assert r.status_code == 200 and [s["text"] for s in r.json()["solutions"]] == [RAMBLE * 8] * 2
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("body,field", [
    ({"model": "coin", "problem": {"question": "What?", "answer": "seven apples"}}, "answer"),
    ({"model": "coin", "kind": "riddles"}, "kind"),
    ({"model": "coin"}, "problem"),
    ({"model": "coin", "kind": "apples", "reward_model": "coin"}, "reward_model"),
    ({"model": "nope", "kind": "apples"}, "unknown model"),
    ({"model": "coin", "kind": "apples", "n": 1000}, "n"),
])
def test_bad_requests_get_a_422_naming_the_field(live, body, field):
    client, keys = live
    r = client.post("/api/practice/sample", json=body, headers=keys["learner"])
    assert r.status_code == 422 and re.search(field, r.text), r.text
