"""The Practice tab in headless Chromium against a real server and the coin model (tests/test_practice.py):
sign in, type a problem and its answer, sample 8 solutions, and see them as cards marked right and wrong
with their answers, the vote tally and the curve; a generated problem fills the form. Then ■ Stop during a
long run of the rambler (tests/test_practice.py): nothing graded, and the next run comes right back."""
from __future__ import annotations

import re

import pytest

from tests.conftest import log_in, open_tab, set_slider, start_server
from tests.scripted import RAMBLE, register_rambler
from tests.test_labels_api import database_with_users
from tests.test_practice import QUESTION, RIGHT, WRONG, register_coin

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("practice_browser") / "data"
    register_coin(data)
    register_rambler(data)
    db, people = database_with_users(data, [("ann", "learner")])
    server = start_server(data, "--model", "coin", "--no-preload", "--no-worker")
    yield server, people
    server.stop()
    db.close()


def test_sample_solutions_see_them_marked_and_the_vote(site):
    server, people = site
    with open_tab(server, "Practice", "#practice-sample", height=1800) as page:
        log_in(page, "ann", people["ann"][1])

        # a generated problem fills the form; the field is emptied first, so that the wait below is for the reply
        # (the tab opens with a problem of its own: waiting on that one raced the reply under load, which then
        # overwrote the question and answer typed next)
        page.locator("#practice-question textarea").fill("")
        page.locator("#practice-new").click()
        page.wait_for_function("() => document.querySelector('#practice-question textarea').value.length > 10",
                               timeout=30_000)
        assert re.fullmatch(r"\d+", page.locator("#practice-answer input, #practice-answer textarea").first.input_value())

        page.locator("#practice-question textarea").fill(QUESTION)
        page.locator("#practice-answer input, #practice-answer textarea").first.fill("7")
        page.locator("#practice-sample").click()
        page.wait_for_selector("#practice-cards .pg-practice-card", timeout=60_000)
        cards = page.locator("#practice-cards .pg-practice-card")
        assert cards.count() == 8
        right = page.locator("#practice-cards .pg-practice-card.right")
        for i in range(right.count()):
            assert "answer: 7" in right.nth(i).inner_text() and RIGHT in right.nth(i).inner_text()
        wrong_texts = [page.locator("#practice-cards .pg-practice-card.wrong").nth(i).inner_text()
                       for i in range(8 - right.count())]
        assert all("answer: 5" in t and WRONG in t or "no answer stated" in t for t in wrong_texts), wrong_texts

        summary = page.locator("#practice-summary").inner_text()
        assert f"{right.count()} of 8 right" in summary and "Majority vote of all 8" in summary
        assert "Best-of-N: no reward model chosen" in summary
        table = page.locator("#practice-curve").inner_text()
        assert all(str(k) in table for k in (1, 2, 4, 8)) and "majority@k" in table


def summary_of(page) -> str:
    return page.locator("#practice-summary").inner_text()


def test_stop_a_long_run_then_the_next_run_comes_right_back(site):
    server, people = site
    with open_tab(server, "Practice", "#practice-stop", height=1800) as page:
        log_in(page, "ann", people["ann"][1])
        page.locator("#practice-model input").click()
        page.get_by_role("option", name="rambler", exact=True).click()
        page.locator("#practice-question textarea").fill(QUESTION)
        page.locator("#practice-answer input, #practice-answer textarea").first.fill("7")
        set_slider(page, "practice-n", 32)
        set_slider(page, "practice-max-tokens", 1024)  # 32 x 1024 tokens of the rambler: a minute or more

        page.locator("#practice-sample").click()
        page.wait_for_function("() => document.querySelector('#practice-summary').innerText.includes('Sampling 32')",
                               timeout=30_000)
        page.locator("#practice-stop").click()
        page.wait_for_function("() => document.querySelector('#practice-summary').innerText.includes('Stopped')",
                               timeout=30_000)
        page.wait_for_timeout(1000)
        assert "nothing is graded" in summary_of(page) and "pass@1" not in summary_of(page)  # and says so still
        assert page.locator("#practice-cards .pg-practice-card").count() == 0
        assert not any("Error" in page.locator(f"#{part}").inner_text()
                       for part in ("practice-plot", "practice-curve", "practice-cards"))  # a stop is no error

        # The engine is free and the tab works: a short run comes back within seconds, not after the long one.
        set_slider(page, "practice-n", 2)
        set_slider(page, "practice-max-tokens", 16)
        page.locator("#practice-sample").click()
        page.wait_for_selector("#practice-cards .pg-practice-card", timeout=20_000)
        cards = page.locator("#practice-cards .pg-practice-card")
        assert cards.count() == 2 and all(
            "cut off at the token limit" in cards.nth(i).inner_text() and RAMBLE.strip() in cards.nth(i).inner_text()
            for i in range(2))
        assert "0 of 2 right" in summary_of(page) and "Stopped" not in summary_of(page)
