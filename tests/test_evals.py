"""Report cards (backend.evals) on tiny models, in seconds: the CLI prints every row and stores the card, an
unknown model is refused before anything loads, a job that registers a model queues its card and the worker
grades it, REST lists the cards side by side, and the Models tab shows them in a table."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from backend.db import Database
from backend.evals.card import LABELS, ROWS
from backend.evals.store import model_cards
from tests.conftest import ROOT, log_in, open_tab, start_server
from tests.helpers import add_user, register_tiny_model, wait_for

KEYS = [k for k, _, _ in ROWS]
CHAT_KEYS = [k for k in KEYS if k != "bpb"]
TINY_JOB = dict(preset="tiny", corpus=["python-docs"], max_corpus_chars=30_000, bpe_vocab_size=512, max_steps=3,
                eval_every=3, eval_tokens=512, sample_every=3, sample_tokens=4, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A chat model, a base model and a reward model (a tiny backbone with a scoring head), all random."""
    import torch

    from backend.config import AppConfig
    from backend.train.reward import RewardModel, save_head
    from models.registry import ModelRegistry
    d = tmp_path_factory.mktemp("evals") / "data"
    register_tiny_model(d, "tiny", tokenizer="cl100k_base+chatml")
    register_tiny_model(d, "tiny-base", tokenizer="cl100k_base", chat_format=None, seed=1)
    spec = register_tiny_model(d, "tiny-rm", tokenizer="cl100k_base+chatml", seed=2)
    rm = RewardModel(ModelRegistry(AppConfig(data_dir=d)).load("tiny-rm"))
    with torch.no_grad():
        rm.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
        rm.head.bias.fill_(0.5)
    save_head(rm, spec.path)
    return d


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.evals", *args, "--data-dir", str(data_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stored(data_dir: Path, model: str) -> list[dict]:
    db = Database(f"sqlite:///{data_dir / 'playground.db'}")
    try:
        return model_cards(db, model)
    finally:
        db.close()


def test_the_cli_prints_a_card_with_every_row_and_stores_it(data):
    r = cli(data, "tiny", "--limit", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("report card: tiny") and "stored as report card" in lines[-1]
    for label in LABELS.values():  # every row, with a value: a random chat model still gets graded
        line = next(x for x in lines if x.startswith(label))
        assert "n/a" not in line, line
    assert "tiny-rm" in next(x for x in lines if x.startswith(LABELS["pelican"]))  # the registered reward model
    card = stored(data, "tiny")[0]
    assert [x["key"] for x in card["rows"]] == KEYS and card["config"]["limit"] == 2
    assert all(0 <= card["values"][k] <= 1 for k in ("problems", "tool_calls", "tool_answers", "idk", "identity"))
    assert card["values"]["bpb"] > 0 and card["rows"][0]["n"] == 2 and card["rows"][0]["samples"]
    assert re.search(r"under the (plain|think) prompt .*(think|plain) prompt \d/2", card["rows"][0]["detail"])  # both

    # A base model: the chat rows are n/a (it continues text), bits per byte is measured.
    r = cli(data, "tiny-base", "--limit", "1")
    assert r.returncode == 0, r.stderr
    base = stored(data, "tiny-base")[0]["values"]
    assert [base[k] for k in CHAT_KEYS] == [None] * len(CHAT_KEYS) and base["bpb"] > 0
    # No model: the stored cards side by side.
    r = cli(data)
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[1:] == ["tiny", "tiny-base"]


def test_saying_so_counts_as_not_knowing_and_a_made_up_answer_does_not():
    from backend.evals.card import says_idk
    for text in ["I don't know.", "I\u2019m not sure who that is.", "Veltravia is a fictional country.",
                 "I do not have any information about the Zarnok Cup.", "I can't know what you are thinking."]:
        assert says_idk(text), text
    for text in ["The capital of Veltravia is NovaVastra.", "It was won by the United States.", "Your cat is 4."]:
        assert not says_idk(text), text


def test_an_unknown_model_is_refused_before_anything_loads(data, tmp_path):
    fresh = tmp_path / "fresh"
    r = cli(fresh, "no-such-model")
    assert r.returncode == 2 and "unknown model 'no-such-model'" in r.stderr and "smollm2-135m-instruct" in r.stderr
    assert not (fresh / "playground.db").exists()  # not even the database was opened
    r = cli(data, "tiny-rm")
    assert r.returncode == 2 and "is a reward model" in r.stderr
    r = cli(data, "tiny", "--limit", "0")
    assert r.returncode == 2 and "limit" in r.stderr
    r = cli(data, "tiny", "--reward-model", "tiny")
    assert r.returncode == 2 and "reward_model: 'tiny' is not a registered reward model" in r.stderr


def test_report_cards_queue_for_chat_and_base_models_only_and_wait_for_training_jobs(data, tmp_path):
    from backend.config import AppConfig
    from backend.evals.job import queue_report_card
    from backend.jobs import queue
    app = AppConfig(data_dir=data, database_url=f"sqlite:///{tmp_path / 'q.db'}", eval_on_register=3)
    db = Database(app.database_url)
    db.migrate()
    try:
        assert queue_report_card(db, app, "tiny-rm") is None  # a reward model writes no answers to grade
        card = queue_report_card(db, app, "tiny", "registered by a test")
        assert card["kind"] == "eval" and card["config"]["limit"] == 3 and card["name"] == f"eval-tiny-j{card['id']}"
        off = AppConfig(data_dir=data, database_url=app.database_url, eval_on_register=0)
        assert queue_report_card(db, off, "tiny") is None
        # a training job queued after the card still runs first: cards are background work
        train = queue.create_job(db, app, None, "pretrain", TINY_JOB)
        assert queue.claim_next(db, "w:1")["id"] == train["id"]
        assert queue.claim_next(db, "w:1")["id"] == card["id"]
        with pytest.raises(ValueError, match="unknown model 'nope'"):
            queue.create_job(db, app, None, "eval", {"model": "nope"})
    finally:
        db.close()


@pytest.fixture(scope="module")
def live(data):
    """The app with its worker, queueing a 2-question card of every model a job registers."""
    people = {name: add_user(data, name, role) for name, role in [("op", "operator"), ("lea", "learner"),
                                                                  ("ad", "admin")]}
    server = start_server(data, "--model", "tiny", "--no-preload", "--eval-on-register", "2")
    yield server, people
    server.stop()



def test_a_registered_model_gets_its_card_and_rest_lists_cards_side_by_side(live):
    server, people = live
    url, op = server.base_url, {"Authorization": f"Bearer {people['op'][1]}"}
    job = httpx.post(f"{url}/api/jobs", json={"kind": "pretrain", "config": TINY_JOB}, headers=op).json()

    def jobs():
        return httpx.get(f"{url}/api/jobs", headers=op).json()["jobs"]

    done = wait_for(lambda: next((j for j in jobs() if j["id"] == job["id"] and j["state"] in
                                  ("succeeded", "failed")), None), 180, "the pretraining job")
    assert done["state"] == "succeeded", done["error"]
    model = done["model"]
    card_job = wait_for(lambda: next((j for j in jobs() if j["kind"] == "eval"), None), 30, "a queued report card")
    assert card_job["config"]["model"] == model and card_job["config"]["limit"] == 2 and card_job["id"] > job["id"]
    finished = wait_for(lambda: next((j for j in jobs() if j["id"] == card_job["id"] and j["state"] in
                                      ("succeeded", "failed", "cancelled")), None), 120, "the report card job")
    assert finished["state"] == "succeeded", finished["error"]

    got = httpx.get(f"{url}/api/evals").json()  # anyone may read the cards, as the model list
    assert [r["key"] for r in got["rows"]] == KEYS
    mine = next(m for m in got["models"] if m["model"] == model)
    assert mine["job_id"] == card_job["id"] and mine["registered"]
    assert [mine["values"][k] for k in CHAT_KEYS] == [None] * len(CHAT_KEYS) and mine["values"]["bpb"] > 0
    # the CLI's cards of the other test (when it ran first) are listed beside it; a model without one is named
    assert set(got["without_card"]) <= {"smollm2-135m-instruct", "tiny", "tiny-base", "tiny-rm"}
    history = httpx.get(f"{url}/api/evals/{model}").json()["cards"]
    assert history[0]["job_id"] == card_job["id"]
    assert httpx.get(f"{url}/api/evals/no-such-model").status_code == 404

    # Operators queue a card through REST; a bad model is a 422 naming it, before anything is queued.
    assert httpx.post(f"{url}/api/evals", json={"model": "tiny"}).status_code == 401
    lea = {"Authorization": f"Bearer {people['lea'][1]}"}
    assert httpx.post(f"{url}/api/evals", json={"model": "tiny"}, headers=lea).status_code == 403
    r = httpx.post(f"{url}/api/evals", json={"model": "no-such-model"}, headers=op)
    assert r.status_code == 422 and "no-such-model" in r.text
    r = httpx.post(f"{url}/api/evals", json={"model": "tiny-rm"}, headers=op)
    assert r.status_code == 422 and "reward model" in r.text
    r = httpx.post(f"{url}/api/evals", json={"model": "tiny", "limit": 1}, headers=op)
    assert r.status_code == 201 and r.json()["kind"] == "eval"
    wait_for(lambda: httpx.get(f"{url}/api/jobs/{r.json()['id']}", headers=op).json()["state"] == "succeeded",
             120, "the chat model's report card")
    tiny = next(m for m in httpx.get(f"{url}/api/evals").json()["models"] if m["model"] == "tiny")
    assert tiny["job_id"] == r.json()["id"] and all(tiny["values"][k] is not None for k in KEYS)


@pytest.mark.browser
def test_the_models_tab_shows_the_cards_side_by_side(live, data):
    server, people = live
    if not stored(data, "tiny-base"):  # run alone: one cheap card, stored while the app runs
        assert cli(data, "tiny-base", "--limit", "1").returncode == 0
    names = [m["model"] for m in httpx.get(f"{server.base_url}/api/evals").json()["models"]]
    with open_tab(server, "Models", "#evals-table") as page:  # opening the tab reads the newest cards
        table = page.locator("#evals-table")
        wait_for(lambda: all(n in table.inner_text() for n in names), 30, "a column per graded model")
        text = table.inner_text()
        assert all(label in text for label in LABELS.values())
        page.locator("#evals-model input").click()
        page.get_by_role("option", name="tiny-base", exact=True).click()
        details = page.locator("#evals-details")
        wait_for(lambda: "tiny-base" in details.inner_text() and LABELS["bpb"] in details.inner_text(), 30,
                 "the card's details")
        assert "n/a: a base model" in details.inner_text()
        # An operator queues a new card of the chosen model from here (the worker grades it like any job).
        log_in(page, "op", people["op"][0])
        page.locator("#evals-limit input").fill("1")
        page.locator("#evals-grade").click()
        status = page.locator("#evals-status")
        said = wait_for(lambda: re.search(r"Queued report card job (\d+)", status.inner_text()), 30, "the queued card")
    job = httpx.get(f"{server.base_url}/api/jobs/{said.group(1)}", headers={"Authorization": f"Bearer {people['op'][1]}"})
    assert job.json()["kind"] == "eval" and job.json()["config"]["model"] == "tiny-base"
    assert job.json()["config"]["limit"] == 1 and job.json()["created_by"] == "op"


def test_a_card_can_add_lm_evaluation_harness_tasks_run_through_our_v1(live, data, tmp_path):
    """The harness's local-completions model against the running app's /v1, on a local multiple-choice task
    (tests/test_lm_eval.py's quiz, offline): its accuracy is a row of the card, listed beside the others."""
    import json

    from tests.test_lm_eval import QUESTIONS, TASK
    server, _ = live
    with open(tmp_path / "quiz.jsonl", "w") as f:
        for q, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": q, "choices": choices, "answer": answer}) + "\n")
    (tmp_path / "pg_quiz.yaml").write_text(TASK.format(path=tmp_path / "quiz.jsonl"))
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    try:
        r = cli(data, "tiny", "--limit", "3", "--lm-eval", "pg_quiz", "--lm-eval-include", str(tmp_path),
                "--lm-eval-url", server.base_url)  # the server's default model: the harness tokenizes with it
    finally:
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.pop(k, None)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next((x for x in r.stdout.splitlines() if x.startswith("lm-eval pg_quiz: acc ")), r.stdout)
    assert "3 documents through" in line and "n/a" not in line, line
    card = stored(data, "tiny")[0]
    assert 0 <= card["values"]["lm_eval/pg_quiz/acc"] <= 1 and [x["key"] for x in card["rows"]][:len(KEYS)] == KEYS
    got = httpx.get(f"{server.base_url}/api/evals").json()
    assert "lm_eval/pg_quiz/acc" in [x["key"] for x in got["rows"]]
    # Another model than the server's default (another tokenizer): the row says why, the card's own rows stand.
    r = cli(data, "tiny-base", "--limit", "1", "--lm-eval", "pg_quiz", "--lm-eval-include", str(tmp_path),
            "--lm-eval-url", server.base_url, "--no-save")
    row = next(x for x in r.stdout.splitlines() if x.startswith("lm-eval pg_quiz"))
    assert r.returncode == 0 and "n/a" in row and "start that server with --model tiny-base" in row, row
    # What the harness did before that check existed: ids of the default model's tokenizer sent to another
    # model. An id that is no token of its tokenizer is a 400 naming the prompt (it was a 500).
    bad = httpx.post(f"{server.base_url}/v1/completions", json={"model": "tiny-base", "prompt": [100264], "max_tokens": 1})
    assert bad.status_code == 400 and "100264" in bad.json()["error"]["message"], bad.text


def test_a_remote_model_is_graded_through_the_server_that_serves_it(live):
    """A model another server serves (here: the running app's own "tiny" through its /v1), registered by an admin,
    gets its card queued and graded through the same engine door as the tabs; bits per byte needs prompt
    log-probs in this process, so it is n/a."""
    server, people = live
    url, admin = server.base_url, {"Authorization": f"Bearer {people['ad'][1]}"}
    r = httpx.post(f"{url}/api/models/remote", headers=admin, timeout=60, json={
        "name": "tiny-remote", "base_url": url + "/v1", "model": "tiny", "tokenizer": "cl100k_base+chatml"})
    assert r.status_code == 201, r.text
    jobs = httpx.get(f"{url}/api/jobs", headers=admin).json()["jobs"]
    job = next(j for j in jobs if j["kind"] == "eval" and j["config"]["model"] == "tiny-remote")
    done = wait_for(lambda: (j := httpx.get(f"{url}/api/jobs/{job['id']}", headers=admin).json())["state"] in
                    ("succeeded", "failed") and j, 180, "the remote model's report card")
    assert done["state"] == "succeeded", done["error"]
    card = httpx.get(f"{url}/api/evals/tiny-remote").json()["cards"][0]
    assert all(card["values"][k] is not None for k in CHAT_KEYS) and card["values"]["bpb"] is None
    assert "remote" in next(x for x in card["rows"] if x["key"] == "bpb")["detail"]
