"""The Training tab in headless Chromium against a real server with its worker: sign in as an operator,
start a short pretraining run of the tiny preset, watch its loss curve grow point by point, see samples
with their step numbers, cancel it, and find the model it registered in the model list; an RLHF run watched
by a held-out reward model shows its turning point and a sample from each side of it."""
from __future__ import annotations

import re
import time

import httpx
import pytest

from backend.db import Database
from tests.conftest import log_in, start_server
from tests.helpers import register_reward_model, register_tiny_model
from tests.test_labels_api import make_users

pytestmark = pytest.mark.browser



@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("training_browser") / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [("op", "operator"), ("lea", "learner")])
    register_tiny_model(data, "tiny-parent")  # a parent for fine-tuning kinds that loads in a blink
    register_tiny_model(data, "tiny-chat", tokenizer="cl100k_base+chatml")  # RLHF samples chat answers
    for i, judge in enumerate(("tiny-rm-a", "tiny-rm-b")):  # an RLHF job's reward model and its held-out judge
        register_reward_model(data, judge, tokenizer="cl100k_base+chatml", seed=i + 1)
    server = start_server(data, "--no-preload", "--threads", "1")  # with the worker process
    yield server, db, people
    server.stop()
    db.close()


def curve_points(page) -> int:
    m = re.search(r"loss curve: (\d+) points", page.locator("#train-curve-info").inner_text())
    return int(m.group(1)) if m else 0


def wait_until(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()  # the options of this dropdown (several lists can hold a name)
    page.locator(f"#{elem_id}").get_by_role("option", name=re.compile("^" + re.escape(option))).click()


def sign_in(page, server, people) -> None:
    page.goto(server.base_url + "/")
    page.get_by_role("tab", name="Training").click()
    form = page.locator(".pg-login-form").first
    form.locator("input[name=name]").fill("op")
    form.locator("input[name=password]").fill(people["op"][1])
    form.get_by_role("button", name="Log in").click()
    page.locator(".pg-whoami").first.wait_for(timeout=30_000)


def test_operator_starts_pretraining_and_watches_the_curve_grow(site, page):
    server, db, people = site
    sign_in(page, server, people)

    choose(page, "train-preset", "tiny")
    page.locator("#train-max-seconds input").fill("120")
    page.locator("#train-sample-every input").fill("20")
    page.locator("#train-eval-every input").fill("20")
    page.locator("#train-max-chars input").fill("40000")
    page.locator("#train-start").click()
    wait_until(lambda: "Queued job" in page.locator("#train-status").inner_text(), 30, "the job to be queued")

    # Points appear, and then more points: the curve grows while the job runs.
    first = wait_until(lambda: curve_points(page), 90, "the first points of the loss curve")
    wait_until(lambda: curve_points(page) > first + 5, 60, "the loss curve to grow")
    assert "running" in page.locator("#train-stats").inner_text()
    assert "tokens/s" in page.locator("#train-stats").inner_text() and "MFU" in page.locator("#train-stats").inner_text()
    # The progress line: the step, time spent of the 120 s budget, time left, and a bar as wide as the fraction done.
    bar = page.locator("#train-progress .pg-progress")
    assert re.search(r"step \d+ · \d:\d\d elapsed of a 2:00 budget · about \d:\d\d left", bar.inner_text()), bar.inner_text()
    assert 0 < float(bar.get_attribute("data-fraction")) < 1
    # The plot itself drew something (Vega renders into the plot's container).
    assert page.locator("#train-loss-plot canvas, #train-loss-plot svg").count() > 0
    # Samples come with their step numbers, step 0 (untrained gibberish) first.
    wait_until(lambda: page.locator("#train-samples .pg-sample").count() >= 2, 60, "two samples")
    steps = [int(s) for s in page.locator("#train-samples .pg-sample").evaluate_all(
        "els => els.map(e => e.dataset.step)")]
    assert 0 in steps and any(s >= 20 and s % 20 == 0 for s in steps)

    page.locator("#train-cancel").click()
    wait_until(lambda: "cancelled" in page.locator("#train-stats").inner_text(), 30, "the job to stop")
    stats = page.locator("#train-stats").inner_text()
    model = re.search(r"model (\S+)", stats.split("MFU")[1]).group(1)
    key = people["op"][2]
    names = [m["name"] for m in httpx.get(server.base_url + "/api/models", timeout=10).json()["models"]]
    assert model in names
    job = httpx.get(server.base_url + "/api/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["jobs"][0]
    assert job["state"] == "cancelled" and job["model"] == model and job["checkpoint"]


def test_every_field_of_the_sft_form_reaches_the_job(site, page):
    """The SFT form shows its own fields (no corpus, no preset; a parent model and a dataset picker), and what is
    typed is what the stored job runs with: 12 steps and 150 s, not the trainer's 200 steps and no time limit."""
    server, db, people = site
    sign_in(page, server, people)
    choose(page, "train-kind", "sft")
    wait_until(lambda: "supervised" in page.locator("#train-kind-note").inner_text(), 30, "the SFT form")
    assert not page.locator("#train-preset").is_visible() and not page.locator("#train-corpus").is_visible()
    assert page.locator("#train-parent").is_visible() and page.locator("#train-data").is_visible()
    # Defaults sized for a CPU: a step limit and a time budget both set.
    assert int(page.locator("#train-max-steps input").input_value()) <= 50
    assert 0 < float(page.locator("#train-max-seconds input").input_value()) <= 600
    choose(page, "train-parent", "tiny-parent")
    page.locator("#train-max-steps input").fill("12")
    page.locator("#train-max-seconds input").fill("150")
    page.locator("#train-eval-every input").fill("4")
    page.locator("#train-name textarea").fill("sft-from-the-form")
    page.locator("#train-start").click()
    wait_until(lambda: "Queued job" in page.locator("#train-status").inner_text(), 30, "the job to be queued")
    key = people["op"][2]
    job = httpx.get(server.base_url + "/api/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["jobs"][0]
    httpx.post(server.base_url + f"/api/jobs/{job['id']}/cancel", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert job["kind"] == "sft" and job["name"] == "sft-from-the-form"
    cfg = job["config"]
    assert (cfg["max_steps"], cfg["max_seconds"], cfg["eval_every"]) == (12, 150.0, 4)
    assert cfg["parent_model"] == "tiny-parent" and cfg["dataset"] == "bundled" and job["parent_model"] == "tiny-parent"
    # The page shows its progress from the first second: queued or already loading, a bar, the 2:30 budget.
    wait_until(lambda: "2:30" in page.locator("#train-progress").inner_text(), 30, "the job's progress line")


def test_an_rlhf_run_with_a_held_out_judge_shows_the_turn_and_samples_side_by_side(site, page):
    server, db, people = site
    sign_in(page, server, people)
    choose(page, "train-kind", "rlhf")
    wait_until(lambda: page.locator("#train-held-out-reward-model").is_visible(), 30, "the RLHF form")
    choose(page, "train-parent", "tiny-chat")
    choose(page, "train-reward-model", "tiny-rm-a")
    choose(page, "train-held-out-reward-model", "tiny-rm-b")
    page.locator("#train-max-steps input").fill("4")
    page.locator("#train-eval-every input").fill("1")
    page.locator("#train-name textarea").fill("rlhf-watched")
    page.get_by_text("Other settings (JSON)").click()  # small rollouts: a few seconds a step on the tiny model
    page.locator("#train-extra .cm-content").fill('{"group_size": 2, "prompts_per_step": 1, "max_new_tokens": 6, '
                                                  '"n_heldout": 2}')
    page.locator("#train-start").click()
    wait_until(lambda: "Queued job" in page.locator("#train-status").inner_text(), 30, "the job to be queued")
    key = people["op"][2]
    job = httpx.get(server.base_url + "/api/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["jobs"][0]
    assert job["config"]["held_out_reward_model"] == "tiny-rm-b" and job["config"]["reward_model"] == "tiny-rm-a"
    assert job["config"]["group_size"] == 2
    stats = page.locator("#train-stats")
    wait_until(lambda: re.search(r"succeeded|failed", stats.inner_text()), 180, "the RLHF job to finish")
    assert "succeeded" in stats.inner_text(), stats.inner_text()
    view = httpx.get(server.base_url + f"/api/jobs/{job['id']}", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).json()["reward_hacking"]
    turn = view["turn_step"]
    panel = page.locator("#train-hacking").first
    wait_until(lambda: panel.is_visible() and f"step {turn}" in page.locator("#train-hacking-text").inner_text(), 30,
               "the reward-hacking panel")
    assert f"turn at step {turn}" in page.locator("#train-hacking-reward").inner_text()
    before, after = page.locator("#train-hacking-before"), page.locator("#train-hacking-after")
    assert f"Before the turn: step {view['before']['step']}" in before.inner_text()
    assert view["before"]["prompt"] in before.inner_text()
    if view["after"]:
        assert f"After the turn: step {view['after']['step']}" in after.inner_text()
    else:
        assert "No sample logged after the turn" in after.inner_text()
    bb, ab = before.bounding_box(), after.bounding_box()
    assert abs(bb["y"] - ab["y"]) < 5 and bb["x"] + bb["width"] <= ab["x"] + 1  # side by side, before on the left


def test_a_finished_job_offers_its_next_steps_as_buttons_that_open_them(site, page):
    """A finished SFT job's next steps are buttons: each opens its tab with the new model already picked (Chat,
    the Arena's draw against its parent, export in the Models tab); none for another kind (no RLHF from an SFT)."""
    server, db, people = site
    sign_in(page, server, people)
    choose(page, "train-kind", "sft")
    wait_until(lambda: page.locator("#train-parent").is_visible(), 30, "the SFT form")
    choose(page, "train-parent", "tiny-parent")
    page.locator("#train-max-steps input").fill("2")
    page.locator("#train-eval-every input").fill("2")
    page.locator("#train-name textarea").fill("sft-next")
    page.locator("#train-start").click()
    wait_until(lambda: "Queued job" in page.locator("#train-status").inner_text(), 30, "the job to be queued")
    stats = page.locator("#train-stats")  # this job's line (an earlier test's job may be shown until the poll)
    wait_until(lambda: "sft-next" in stats.inner_text() and re.search(r"succeeded|failed", stats.inner_text()), 180,
               "the SFT job to finish")
    assert "succeeded" in stats.inner_text(), stats.inner_text()
    page.locator("#train-next-chat").wait_for(timeout=30_000)
    assert page.locator("#train-next-rlhf").is_hidden() and page.locator("#train-next-sft").is_hidden()

    page.locator("#train-next-chat").click()
    page.wait_for_function("() => document.querySelector('#chat-model input')?.value === 'sft-next'", timeout=30_000)
    assert page.locator("#chat-model").is_visible()

    page.get_by_role("tab", name="Training", exact=True).click()
    page.locator("#train-next-arena").click()
    draw = page.locator("#arena-models")
    wait_until(lambda: draw.is_visible() and "sft-next" in draw.inner_text(), 30, "the Arena's draw")
    assert "tiny-parent" in draw.inner_text()  # against the model it started from

    page.get_by_role("tab", name="Training", exact=True).click()
    page.locator("#train-next-export").click()
    page.wait_for_function("() => document.querySelector('#models-pick input')?.value === 'sft-next'", timeout=30_000)
    assert page.locator("#models-export").is_visible()  # the export form is open

    # A learner watching the same job is offered what a learner can do: chat with it, put it in the Arena.
    page.locator("#pg-header .pg-logout").click()
    log_in(page, "lea", people["lea"][1])
    page.get_by_role("tab", name="Training", exact=True).click()
    wait_until(lambda: "sft-next" in stats.inner_text(), 30, "the job's line")
    page.locator("#train-next-arena").wait_for(timeout=30_000)
    assert all(page.locator(f"#train-next-{a}").is_hidden() for a in ("rank", "export", "sft", "rlhf"))
