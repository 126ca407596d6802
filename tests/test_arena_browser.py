"""The Arena tab in headless Chromium against a real server: sign in, pick two scripted models, battle,
vote for A, see the names revealed (matching who wrote which answer) and the leaderboard update."""
from __future__ import annotations

import re

import pytest

from tests.conftest import log_in, open_tab, start_server
from tests.scripted import register_scripted
from tests.test_labels_api import database_with_users

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser

LINES = {"alpha": "Alpha answers first.", "beta": "Beta has another answer."}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("arena_browser") / "data"
    for name, line in LINES.items():
        register_scripted(data, name, [line], {"\n": line, line: "<|im_end|>"}, tools=False)
    db, people = database_with_users(data, [("ann", "learner")])
    server = start_server(data, "--model", "alpha", "--no-preload", "--no-worker")
    yield server, people
    server.stop()
    db.close()


@pytest.fixture
def page(site):
    server, _ = site
    with open_tab(server, "Arena", "#arena-battle") as page:
        yield page


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def test_battle_vote_reveal_and_leaderboard(site, page):
    _, people = site
    log_in(page, "ann", people["ann"][1])
    assert "alpha" not in text_of(page, "arena-leaderboard")  # no votes yet

    for name in LINES:  # the draw: just the two scripted models (the bundled SmolLM2 stays unloaded)
        page.locator("#arena-models input").click()
        page.get_by_role("option", name=name, exact=True).click()
    page.locator("#arena-prompt textarea").fill("Who are you?")
    page.locator("#arena-battle").click()
    page.wait_for_function("() => !document.querySelector('#arena-vote-a').disabled", timeout=60_000)
    answer_a, answer_b = text_of(page, "arena-answer-a").strip(), text_of(page, "arena-answer-b").strip()
    assert {answer_a, answer_b} == set(LINES.values())
    assert "The names appear after your vote" in text_of(page, "arena-status")

    page.locator("#arena-vote-a").click()
    page.wait_for_function("() => (document.querySelector('#arena-status')?.innerText || '').includes('Model A was')",
                           timeout=30_000)
    m = re.search(r"Model A was (\w+), Model B was (\w+)", text_of(page, "arena-status"))
    assert m, text_of(page, "arena-status")
    writer = {line: name for name, line in LINES.items()}
    assert (m.group(1), m.group(2)) == (writer[answer_a], writer[answer_b])
    assert page.locator("#arena-vote-a").is_disabled()  # one vote per battle

    # The leaderboard now ranks the model voted for first, with one battle each.
    page.wait_for_function("(w) => (document.querySelector('#arena-leaderboard')?.innerText || '').includes(w)",
                           arg=m.group(1), timeout=30_000)
    first, second = (page.locator(f'#arena-leaderboard [role=row][aria-rowindex="{i}"]').inner_text() for i in (2, 3))
    assert m.group(1) in first and "100%" in first and m.group(2) in second and "0%" in second
