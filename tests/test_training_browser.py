"""The Training tab in headless Chromium against a real server with its worker: sign in as an operator,
start a short pretraining run of the tiny preset, watch its loss curve grow point by point, see samples
with their step numbers, cancel it, and find the model it registered in the model list."""
from __future__ import annotations

import re
import time

import httpx
import pytest

from backend.db import Database
from tests.conftest import start_server
from tests.test_labels_api import make_users

pytestmark = pytest.mark.browser



@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("training_browser") / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [("op", "operator")])
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
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=re.compile("^" + re.escape(option))).click()


def test_operator_starts_pretraining_and_watches_the_curve_grow(site, page):
    server, db, people = site
    page.goto(server.base_url + "/")
    page.get_by_role("tab", name="Training").click()
    form = page.locator(".pg-login-form")
    form.locator("input[name=name]").fill("op")
    form.locator("input[name=password]").fill(people["op"][1])
    form.get_by_role("button", name="Log in").click()
    page.locator(".pg-whoami").wait_for(timeout=30_000)

    choose(page, "train-preset", "tiny")
    page.locator("#train-max-seconds input").fill("120")
    page.locator("#train-sample-every input").fill("20")
    page.locator("#train-eval-every input").fill("20")
    page.get_by_text("More settings").click()
    page.locator("#train-max-chars input").fill("40000")
    page.locator("#train-start").click()
    wait_until(lambda: "Queued job" in page.locator("#train-status").inner_text(), 30, "the job to be queued")

    # Points appear, and then more points: the curve grows while the job runs.
    first = wait_until(lambda: curve_points(page), 90, "the first points of the loss curve")
    wait_until(lambda: curve_points(page) > first + 5, 60, "the loss curve to grow")
    assert "running" in page.locator("#train-stats").inner_text()
    assert "tokens/s" in page.locator("#train-stats").inner_text() and "MFU" in page.locator("#train-stats").inner_text()
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
