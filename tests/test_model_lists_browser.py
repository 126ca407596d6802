"""A model registered while the app runs (a real registry write, as a finishing job makes one) is offered by the
tabs' model lists at the next tab switch or page load, without a restart, and answers when picked; a reward
model is never offered where text is generated."""
from __future__ import annotations

import re

import pytest

from tests.conftest import log_in, open_tab
from tests.helpers import add_user, register_reward_model
from tests.scripted import register_scripted

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser

FIRST, NEW = "First model here.", "Newly trained model here."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import start_server
    data = tmp_path_factory.mktemp("model-lists") / "data"
    register_scripted(data, "first", [FIRST], {"\n": FIRST, FIRST: "<|im_end|>"}, tools=False)
    register_reward_model(data, "judge")
    password, _ = add_user(data, "lea", "learner")
    s = start_server(data, "--model", "first", "--no-worker", "--no-preload")
    s.data, s.password = data, password
    yield s
    s.stop()


def options(page, elem_id: str) -> list[str]:
    """The names a dropdown offers. Gradio opens the list on focus: a list re-rendered by a refresh while it had
    the focus stays shut, so blur it and click again."""
    box = page.locator(f"#{elem_id} input")
    opts = page.locator("[role=option]:visible")  # the open list's (another tab may hold hidden options)
    for attempt in range(3):
        box.blur()
        box.click()
        try:
            opts.first.wait_for(timeout=5_000)
            break
        except playwright_api.Error:
            if attempt == 2:
                raise
    names = [t.replace("✓", "").strip() for t in opts.all_inner_texts()]  # the selected one carries a tick
    page.keyboard.press("Escape")
    return names


def offered(page, elem_id: str, name: str, timeout_s: float = 20.0) -> list[str]:
    """The dropdown's options once `name` is among them (the tab switch's refresh arrives a moment after the
    switch), or as they are at the deadline."""
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        names = options(page, elem_id)
        if any(o.startswith(name) for o in names) or time.monotonic() > deadline:
            return names
        page.wait_for_timeout(300)


def test_a_model_registered_while_the_app_runs_is_offered_and_answers(server):
    with open_tab(server, "Chat", "#chat-send") as page:
        log_in(page, "lea", server.password)
        before = options(page, "chat-model")
        assert "first" in before and "newbie" not in before and "judge" not in before  # judge only scores
        register_scripted(server.data, "newbie", [NEW], {"\n": NEW, NEW: "<|im_end|>"}, tools=False)
        page.get_by_role("tab", name="Generate", exact=True).click()  # switching tabs refreshes every model list
        listed = offered(page, "gen-model", "newbie")
        assert any(o.startswith("newbie") for o in listed) and not any(o.startswith("judge") for o in listed)
        page.get_by_role("tab", name="Chat", exact=True).click()
        page.locator("#chat-model input").click()
        page.get_by_role("option", name=re.compile("^newbie$")).click()
        page.locator("#chat-input textarea").fill("Who are you?")
        page.locator("#chat-send").click()  # Gradio accepts the new name: it is in the list now
        page.wait_for_function("(t) => document.querySelector('#chat-bot').innerText.includes(t)", arg=NEW,
                               timeout=60_000)
        # a fresh page load offers it too (the Arena's draw)
        page.reload()
        page.get_by_role("tab", name="Arena", exact=True).click()
        assert {"first", "newbie"} <= set(options(page, "arena-models"))
