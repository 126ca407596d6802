"""The labeling screen in headless Chromium against a real server: sign in as an annotator, rank four
candidates with the keyboard, submit, see the next item, and find the row in the database."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from backend.db import Database
from backend.db.models import Ranking
from backend.labels import rankings as rk
from tests.conftest import start_server
from tests.test_labels_api import make_users

pytestmark = pytest.mark.browser

NASTY = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold?</b>'


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("labeling_browser") / "data"
    data.mkdir()
    db = Database(f"sqlite:///{data / 'playground.db'}")
    db.migrate()
    people = make_users(db, [("ann", "annotator"), ("eve", "annotator"), ("op", "operator")])
    jokes = rk.create_set(db, people["op"][0], "pelicans",
                          ["Write a joke about pelicans", "Write a haiku about the ocean"],
                          [[f"joke {j + 1}" for j in range(4)], [f"haiku {j + 1}" for j in range(4)]])
    nasty = rk.create_set(db, people["op"][0], "escaping", [NASTY], [[NASTY, "two", "three", "four"]])
    server = start_server(data, "--no-preload", "--no-worker")
    yield server, db, people, jokes, nasty
    server.stop()
    db.close()


def sign_in(page, server, name, password):
    page.goto(server.base_url + "/")
    page.get_by_role("tab", name="Labeling").click()
    form = page.locator(".pg-login-form")
    form.locator("input[name=name]").fill(name)
    form.locator("input[name=password]").fill(password)
    form.get_by_role("button", name="Log in").click()
    page.locator(".pg-whoami").wait_for(timeout=30_000)


def settled(page):
    """Wait until the ranking widget has no load in flight."""
    page.wait_for_function("() => document.querySelector('.pg-rank').dataset.busy === '0'", timeout=30_000)


def pick_set(page, set_id):
    settled(page)
    page.locator(".pg-set").select_option(str(set_id))
    settled(page)


def test_annotator_ranks_with_the_keyboard_and_the_row_is_stored(site, page):
    server, db, people, jokes, _ = site
    sign_in(page, server, "ann", people["ann"][1])
    pick_set(page, jokes["id"])
    rank = page.locator(".pg-rank")
    page.locator(".pg-cand").nth(3).wait_for(timeout=30_000)
    assert page.locator(".pg-prompt").inner_text() == "Write a joke about pelicans"
    first_item = int(rank.get_attribute("data-item-id"))
    for key in "3142":
        page.keyboard.press(key)
    assert page.locator(".pg-cand .pg-text").all_inner_texts() == ["joke 3", "joke 1", "joke 4", "joke 2"]
    page.keyboard.press("ArrowDown")  # the last one pressed (joke 2) is selected and already last: no move
    page.keyboard.press("ArrowUp")    # joke 2 moves above joke 4
    assert page.locator(".pg-cand .pg-text").all_inner_texts() == ["joke 3", "joke 1", "joke 2", "joke 4"]
    page.keyboard.press("Enter")
    page.wait_for_function("id => document.querySelector('.pg-rank').dataset.itemId !== String(id)", arg=first_item,
                           timeout=30_000)
    assert page.locator(".pg-prompt").inner_text() == "Write a haiku about the ocean"
    # The ranking is confirmed and the counter moves on, both on the status line.
    status = page.locator(".pg-status").inner_text()
    assert status.startswith('✓ Saved your ranking of Item 1 of 2 in "pelicans".'), status
    assert 'Next: Item 2 of 2 in "pelicans"' in status, status
    with db.read() as s:
        row = s.scalar(select(Ranking).where(Ranking.item_id == first_item, Ranking.user_id == people["ann"][0].id))
        item = rk.get_item(db, people["ann"][0], first_item)
    by_text = {c["text"]: c["id"] for c in item["candidates"]}
    assert row is not None and row.order == [by_text[t] for t in ["joke 3", "joke 1", "joke 2", "joke 4"]]


def test_label_html_is_shown_as_text_never_run(site, page):
    server, db, people, _, nasty = site
    sign_in(page, server, "eve", people["eve"][1])
    pick_set(page, nasty["id"])
    page.locator(".pg-cand").nth(3).wait_for(timeout=30_000)
    assert page.locator(".pg-prompt").inner_text() == NASTY
    assert page.locator(".pg-cand .pg-text").first.inner_text() == NASTY
    assert page.locator(".pg-rank img, .pg-rank script, .pg-rank b").count() == 0
    assert page.evaluate("window.__pwned === undefined")
    page.locator(".pg-guide-btn").click()
    # Guidelines one click away (fetched when opened).
    page.wait_for_function("() => document.querySelector('.pg-guide').textContent.includes('Helpful')", timeout=30_000)
    assert page.locator(".pg-guide").is_visible()
    # Drag the last candidate onto the first place.
    page.locator(".pg-cand").nth(3).drag_to(page.locator(".pg-cand").nth(0))
    assert page.locator(".pg-cand .pg-text").all_inner_texts() == ["four", NASTY, "two", "three"]
    # Flag the script-laden candidate as unsafe; the status confirms it and the export carries it.
    page.locator(".pg-cand").nth(1).locator(".pg-flag").select_option("unsafe")
    page.wait_for_function("() => document.querySelector('.pg-status').innerText.includes('flagged as unsafe')",
                           timeout=30_000)
    assert page.locator(".pg-cand .pg-text").all_inner_texts() == ["four", NASTY, "two", "three"]  # order kept
    from backend.db.models import Candidate
    with db.read() as s:
        assert s.scalar(select(Candidate.flags).where(Candidate.text == NASTY)) == ["unsafe"]


def test_annotator_writes_a_demonstration_in_the_sft_editor(site, page):
    server, db, people, _, _ = site
    from backend.db.models import SFTVersion
    from backend.labels import sft
    sft.add_prompts(db, people["op"][0], ["Who built you?"])
    sign_in(page, server, "ann", people["ann"][1])
    page.get_by_role("tab", name="Write demos").click()
    page.get_by_role("button", name="Next prompt").click()
    page.get_by_text("status **new**").or_(page.get_by_text("status new")).first.wait_for(timeout=30_000)
    # The prompt stays in view above the reply box.
    assert "Who built you?" in page.locator("#sft-prompt").inner_text()
    # An empty submit says what is missing; the prompt and the preview stay.
    page.get_by_role("button", name="Submit", exact=True).click()
    page.get_by_text("Not submitted: missing: the assistant's reply").wait_for(timeout=30_000)
    assert "Who built you?" in page.locator("#sft-prompt").inner_text()
    assert page.get_by_label("Preview (as exported)").or_(page.locator(".chatbot")).first.is_visible()
    page.locator("#sft-reply textarea").fill("The <b>Playground</b> team built me.")
    page.get_by_label("Thinking (optional").fill("Answer from the system prompt.")
    page.get_by_role("button", name="Submit", exact=True).click()
    page.get_by_text("1 submitted version(s)").wait_for(timeout=30_000)
    with db.read() as s:
        [v] = s.scalars(select(SFTVersion).where(SFTVersion.user_id == people["ann"][0].id)).all()
    assert v.messages[0] == {"role": "user", "content": "Who built you?"}
    assert v.messages[-1] == {"role": "assistant", "content": "The <b>Playground</b> team built me.",
                              "thinking": "Answer from the system prompt.", "origin": "human"}


def test_operator_sees_progress_and_an_annotator_is_refused(site, page):
    server, db, people, jokes, _ = site
    sign_in(page, server, "ann", people["ann"][1])
    # Annotators do not see the operator forms (the handlers refuse them regardless: test_labels_api).
    page.get_by_role("tab", name="Write demos").wait_for(timeout=30_000)
    assert page.get_by_role("tab", name="Operator").count() == 0
    page.locator(".pg-logout").click()
    page.locator(".pg-login-form").wait_for(timeout=30_000)
    form = page.locator(".pg-login-form")
    form.locator("input[name=name]").fill("op")
    form.locator("input[name=password]").fill(people["op"][1])
    form.get_by_role("button", name="Log in").click()
    page.locator(".pg-whoami").wait_for(timeout=30_000)
    page.get_by_role("tab", name="Operator").click()  # appears once an operator signs in
    # Sets are picked by name from a list, and progress is a table.
    page.locator("#op-set input").click()
    page.get_by_role("option", name=re.compile("^pelicans · 2 items")).click()
    page.get_by_role("button", name="Progress").click()
    page.get_by_text("rankings needed").first.wait_for(timeout=30_000)
    assert page.get_by_role("columnheader", name="items done").count() >= 1
    page.get_by_role("button", name="Agreement").click()
    page.get_by_text("Mean pairwise Kendall").first.wait_for(timeout=30_000)


def test_annotator_revisits_and_changes_a_submission(site, page):
    server, db, people, jokes, _ = site
    user = people["ann"][0]
    done = [r for r in rk.my_rankings(db, user, jokes["id"]) if not r["skipped"]]
    assert done, "runs after the keyboard test has stored a ranking"
    item_id = done[-1]["item_id"]
    sign_in(page, server, "ann", people["ann"][1])
    settled(page)
    page.wait_for_function(f"() => [...document.querySelectorAll('.pg-mine option')].some(o => o.value === '{item_id}')",
                           timeout=30_000)
    page.locator(".pg-mine").select_option(str(item_id))
    page.wait_for_function(f"() => document.querySelector('.pg-rank').dataset.itemId === '{item_id}'", timeout=30_000)
    settled(page)
    assert page.locator(".pg-cand .pg-text").all_inner_texts() == ["joke 3", "joke 1", "joke 2", "joke 4"]
    for key in "1234":
        page.keyboard.press(key)
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelector('.pg-rank').dataset.itemId !== '{item_id}'", timeout=30_000)
    mine = rk.get_item(db, user, item_id)
    assert mine["my_ranking"]["revision"] == 2
    assert mine["my_ranking"]["order"] == [c["id"] for c in mine["candidates"]]


def test_a_second_annotator_reviews_a_demo_with_an_edit_and_the_export_says_so(site, page):
    server, db, people, _, _ = site
    from backend.labels import exchange
    assert [r for r in exchange.export(db, "sft") if r["review"] == "pending"], "runs after the SFT editor test"
    sign_in(page, server, "eve", people["eve"][1])
    page.get_by_role("tab", name="Review").click()  # shown to annotators once signed in
    page.locator("#review-next").click()
    page.get_by_text("The user asks:").wait_for(timeout=30_000)
    assert "Who built you?" in page.locator("#review-prompt").inner_text() and "by ann" in page.locator("#review-prompt").inner_text()
    assert "Playground" in page.locator("#review-reply textarea").input_value()
    page.locator("#review-reject").click()  # rejecting needs a reason
    page.get_by_text("Say why in the note before rejecting.").first.wait_for(timeout=30_000)
    page.locator("#review-reply textarea").fill("The Playground team built me, as its system prompt says.")
    page.locator("#review-accept").click()
    page.get_by_text("accepted with your edit").wait_for(timeout=30_000)
    assert "1 accepted" in page.locator("#review-counts").inner_text()
    [row] = [r for r in exchange.export(db, "sft") if r["review"] == "accepted"]
    assert row["messages"][-1]["content"].endswith("\nThe Playground team built me, as its system prompt says.")
