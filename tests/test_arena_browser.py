"""The Arena tab in headless Chromium against a real server: sign in, pick two scripted models, battle,
vote for A, see the names revealed (matching who wrote which answer) and the leaderboard update. Then
■ Stop mid-answer on two ramblers (tests/test_practice.py): nothing to vote on, nothing in the leaderboard,
and the next battle comes right back."""
from __future__ import annotations

import re

import pytest

from tests.conftest import log_in, open_tab, set_slider, start_server
from tests.scripted import RAMBLE, register_rambler, register_scripted
from tests.test_labels_api import database_with_users

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser

LINES = {"alpha": "Alpha answers first.", "beta": "Beta has another answer."}
RAMBLERS = ("ramble-a", "ramble-b")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("arena_browser") / "data"
    for name, line in LINES.items():
        register_scripted(data, name, [line], {"\n": line, line: "<|im_end|>"}, tools=False)
    for name in RAMBLERS:
        register_rambler(data, name)
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


def pick(page, names) -> None:
    """The draw: just these models (the bundled SmolLM2 stays unloaded)."""
    for name in names:
        page.locator("#arena-models input").click()
        page.get_by_role("option", name=name, exact=True).click()


def test_battle_vote_reveal_and_leaderboard(site, page):
    _, people = site
    log_in(page, "ann", people["ann"][1])
    assert "alpha" not in text_of(page, "arena-leaderboard")  # no votes yet

    pick(page, LINES)
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
    # One vote is not enough for an interval or a rank: the table says how many more it needs, and why.
    assert "needs 9 more vote(s)" in first and "needs 9 more vote(s)" in second
    assert "1 + the models whose interval lies entirely above" in text_of(page, "arena-board-help")


def test_a_follow_up_turn_goes_to_both_models_and_each_shows_its_own_conversation(site, page):
    _, people = site
    log_in(page, "ann", people["ann"][1])
    pick(page, LINES)
    page.locator("#arena-prompt textarea").fill("First question?")
    page.locator("#arena-battle").click()
    page.wait_for_function("() => !document.querySelector('#arena-vote-a').disabled", timeout=60_000)
    first_a = text_of(page, "arena-answer-a").strip()
    page.locator("#arena-prompt textarea").fill("Second question?")
    page.locator("#arena-follow-up").click()
    page.wait_for_function("() => (document.querySelector('#arena-answer-a')?.innerText || '').includes('Second question?')"
                           " && !document.querySelector('#arena-vote-a').disabled", timeout=60_000)
    a, b = text_of(page, "arena-answer-a"), text_of(page, "arena-answer-b")
    assert a.count(first_a) == 2 and "First question?" in a  # A's own answer to both turns, never B's
    other = next(line for line in LINES.values() if line != first_a)
    assert other not in a and b.count(other) == 2
    page.locator("#arena-vote-tie").click()
    page.wait_for_function("() => (document.querySelector('#arena-status')?.innerText || '').includes('Model A was')",
                           timeout=30_000)


def set_max_tokens(page, value: int) -> None:
    set_slider(page, "arena-max-tokens", value)


def test_stop_mid_answer_then_the_next_battle_comes_right_back(site, page):
    _, people = site
    log_in(page, "ann", people["ann"][1])
    page.get_by_text("Sampling (the same for both models)").click()
    set_max_tokens(page, 2048)  # 2 x 2048 tokens of the slow rambler: a minute or more
    pick(page, RAMBLERS)
    page.locator("#arena-prompt textarea").fill("Sing.")
    page.locator("#arena-battle").click()
    page.wait_for_function("(w) => document.querySelector('#arena-answer-a').innerText.split(w).length > 3",
                           arg=RAMBLE.strip(), timeout=60_000)  # model A is a few tokens in
    page.locator("#arena-stop").click()
    page.wait_for_function("() => (document.querySelector('#arena-status')?.innerText || '').includes('Stopped')",
                           timeout=30_000)
    # Both models stream at once (one batch), so an update already on its way may land just after the Stop's own
    # "Stopped"; the cancelled run's end then says "Stopped" again. Judge the state once that has settled.
    page.wait_for_timeout(1500)
    assert "no answers to vote on" in text_of(page, "arena-status")
    answer = text_of(page, "arena-answer-a")
    page.wait_for_timeout(1500)
    assert text_of(page, "arena-answer-a") == answer and not text_of(page, "arena-answer-b").strip()  # it stopped
    assert "Stopped" in text_of(page, "arena-status")  # and says so still
    assert not any("Error" in text_of(page, part) for part in ("arena-answer-a", "arena-answer-b"))  # no error badge
    assert all(page.locator(f"#arena-vote-{w}").is_disabled() for w in ("a", "b", "tie", "both_bad"))

    # The engine is free: a short battle on the same pair is ready within seconds, and its tie is the pair's
    # only battle in the win-rate table (the stopped one never counts).
    set_max_tokens(page, 4)
    page.locator("#arena-battle").click()
    page.wait_for_function("() => !document.querySelector('#arena-vote-tie').disabled", timeout=20_000)
    assert text_of(page, "arena-answer-a").strip() == text_of(page, "arena-answer-b").strip() == (RAMBLE * 4).strip()
    page.locator("#arena-vote-tie").click()
    page.wait_for_function("() => (document.querySelector('#arena-status')?.innerText || '').includes('Model A was')",
                           timeout=30_000)
    page.wait_for_function("() => document.querySelector('#arena-winrate').innerText.includes('50% of 1')",
                           timeout=30_000)
    rows = page.locator("#arena-winrate [role=row]").all_inner_texts()
    ramblers = [r for r in rows if r.strip().startswith("ramble-")]
    assert len(ramblers) == 2 and all("of 1" in r and "of 2" not in r for r in ramblers), rows
