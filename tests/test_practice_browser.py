"""The Practice tab in headless Chromium against a real server and the coin model (tests/test_practice.py):
sign in, type a problem and its answer, sample 8 solutions, and see them as cards marked right and wrong
with their answers, the vote tally and the curve; a generated problem fills the form."""
from __future__ import annotations

import re

import pytest

from tests.conftest import log_in, open_tab, start_server
from tests.test_labels_api import database_with_users
from tests.test_practice import QUESTION, RIGHT, WRONG, register_coin

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("practice_browser") / "data"
    register_coin(data)
    db, people = database_with_users(data, [("ann", "learner")])
    server = start_server(data, "--model", "coin", "--no-preload", "--no-worker")
    yield server, people
    server.stop()
    db.close()


def test_sample_solutions_see_them_marked_and_the_vote(site):
    server, people = site
    with open_tab(server, "Practice", "#practice-sample", height=1800) as page:
        log_in(page, "ann", people["ann"][1])

        page.locator("#practice-new").click()  # a generated problem fills the form
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
        assert all("answer: 5" in t and WRONG in t or "no answer stated" in t for t in wrong_texts)

        summary = page.locator("#practice-summary").inner_text()
        assert f"{right.count()} of 8 right" in summary and "Majority vote of all 8" in summary
        assert "Best-of-N: no reward model chosen" in summary
        table = page.locator("#practice-curve").inner_text()
        assert all(str(k) in table for k in (1, 2, 4, 8)) and "majority@k" in table
