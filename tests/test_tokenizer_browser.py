"""The tokenizer tab in headless Chromium against a real server: type, see the count and coloured chunks,
switch encodings, click a chunk for its merge tree, load a preset."""
from __future__ import annotations

import re

import httpx
import pytest
from tests.conftest import launch_chromium

playwright_api = pytest.importorskip("playwright.sync_api")

TEXT = "Which is bigger, 9.11 or 9.9? <b>not bold</b> ${1+1} {{value}}"


def _count(base_url: str, text: str, encoding: str) -> int:
    r = httpx.post(base_url + "/api/tokenize", json={"text": text, "encoding": encoding}, timeout=60)
    r.raise_for_status()
    return r.json()["count"]


def _wait_count(page, n: int) -> None:
    page.wait_for_function(
        "n => (document.querySelector('#tok-counts')?.innerText || '').startsWith(n + ' tokens')", arg=n, timeout=30_000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import start_server
    s = start_server(tmp_path_factory.mktemp("tokui") / "data", "--no-preload", "--no-worker")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 1600})
    page.goto(server.base_url + "/")
    page.get_by_role("tab", name="Tokenizer", exact=True).click()
    page.wait_for_selector("#tok-chunks [data-ids]", timeout=60_000)
    page.base_url = server.base_url
    yield page
    page.close()


def test_type_text_see_count_and_chunks_then_switch_encoding(page):
    cl100k = _count(page.base_url, TEXT, "cl100k_base")
    smollm2 = _count(page.base_url, TEXT, "smollm2")
    assert cl100k != smollm2  # SmolLM2 splits every digit; cl100k keeps "11" whole

    page.locator("#tok-text textarea").fill(TEXT)
    _wait_count(page, cl100k)
    chunks = page.locator("#tok-chunks [data-ids]")
    assert chunks.count() == cl100k  # ASCII text: one coloured chunk per token
    colours = {chunks.nth(i).get_attribute("style") for i in range(min(cl100k, 8))}
    assert len(colours) > 3
    ids = [int(chunks.nth(i).get_attribute("data-ids")) for i in range(cl100k)]
    assert ids[:4] == [23956, 374, 11493, 11]  # "Which" " is" " bigger" ","
    # the user's "<b>" is shown as text, never turned into markup
    assert page.locator("#tok-chunks b").count() == 0
    shown = page.locator("#tok-chunks .chunks").inner_text().replace("·", " ")
    assert "<b>" in shown and "${1+1}" in shown and "{{value}}" in shown  # no template evaluation either

    page.locator("#tok-encoding input").click()
    page.get_by_role("option", name="smollm2", exact=True).click()
    _wait_count(page, smollm2)
    assert page.locator("#tok-chunks [data-ids]").count() == smollm2


def test_click_a_chunk_shows_its_merge_tree(page):
    page.locator("#tok-text textarea").fill("hello world")
    _wait_count(page, 2)
    page.locator("#tok-chunks [data-ids]").nth(1).click()
    tree = page.locator("#tok-tree textarea")
    page.wait_for_function("() => document.querySelector('#tok-tree textarea').value.startsWith('1917')", timeout=30_000)
    lines = tree.input_value().splitlines()
    assert lines[0].startswith("1917 ' world' = ")
    assert len(lines) == 5  # " world" is 6 bytes: 5 merges


def test_preset_fills_text_and_says_what_to_notice(page):
    page.get_by_role("button", name="177 dots").click()
    _wait_count(page, 5)
    assert "cannot count" in page.locator("#tok-note").inner_text()
    assert page.locator("#tok-text textarea").input_value() == "." * 177
    assert re.search(r"177 characters", page.locator("#tok-counts").inner_text())


def test_bpe_step_mode_shows_merges_and_recolours_the_sample(page):
    page.get_by_role("tab", name="Train your own BPE").click()
    page.get_by_role("radio", name="pasted text").check()
    page.locator("#bpe-pasted textarea").fill("the cat the hat the bat " * 50)
    page.click("#bpe-start")
    page.wait_for_function("() => document.querySelector('#bpe-info').innerText.includes('Ready')", timeout=30_000)
    before = page.locator("#bpe-sample [data-ids]").count()
    assert before == len("The tokenizer turns text into tokens: bytes first, then the most frequent pairs merge.")
    for n in (1, 2, 3):
        page.click("#bpe-step")
        page.wait_for_function("n => document.querySelector('#bpe-info').innerText.startsWith(n + ' merges')",
                               arg=n, timeout=30_000)
    rows = page.locator("#bpe-merges").inner_text()
    assert "256" in rows and "258" in rows
    # " the" pieces ("th", "he", " t") merged first: the sample needs fewer tokens now
    page.wait_for_function(f"() => document.querySelectorAll('#bpe-sample [data-ids]').length < {before}",
                           timeout=30_000)


def test_chat_view_shows_specials_mask_and_generation_prompt(page):
    page.get_by_role("tab", name="Chat format").click()
    page.wait_for_function("() => /tokens for the whole conversation/.test("
                           "document.querySelector('#tok-chat-counts')?.innerText || '')", timeout=60_000)
    chunks = page.locator("#tok-chat-chunks .chunks")
    assert "<|im_start|>" in chunks.inner_text()
    assert page.locator("#tok-chat-chunks .tok.special").count() >= 8  # 4 messages + generation prompt
    assert page.locator("#tok-chat-chunks .tok.masked").count() >= 2  # the assistant's answer
    assert page.locator("#tok-chat-chunks .tok.genprompt").count() >= 2  # <|im_start|> assistant \n
