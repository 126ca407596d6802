"""The Generate tab in headless Chromium against a real server: the streamed text is the engine's, and Stop
frees the engine."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.helpers import register_tiny_model

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import start_server
    data = tmp_path_factory.mktemp("genui") / "data"
    register_tiny_model(data, "tiny8k", tokenizer="cl100k_base+chatml", max_seq_len=8192)
    s = start_server(data, "--model", "tiny8k", "--no-worker")
    yield s
    s.stop()


@pytest.fixture
def page(server):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        page.goto(server.base_url + "/")
        page.get_by_role("tab", name="Generate", exact=True).click()
        page.wait_for_selector("#gen-run")
        yield page
        browser.close()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_greedy_completion_streams_the_engines_text(page, server):
    prompt = "Once upon a time"
    page.locator("#gen-prompt textarea").fill(prompt)
    set_number(page, "gen-temperature", 0)
    set_number(page, "gen-max-tokens", 20)
    page.locator("#gen-run").click()
    page.wait_for_function("() => (document.querySelector('#gen-status')?.innerText || '').includes('done')",
                           timeout=60_000)
    shown = page.locator("#gen-output textarea").input_value()
    api = httpx.post(server.base_url + "/v1/completions", timeout=60,
                     json={"model": "tiny8k", "prompt": prompt, "max_tokens": 20, "temperature": 0}).json()
    assert shown == api["choices"][0]["text"] and len(shown) > 0


def test_stop_halts_generation_and_frees_the_engine(page, server):
    set_number(page, "gen-max-tokens", 4096)  # tens of seconds of tokens, far longer than this test waits
    page.locator("#gen-run").click()
    page.wait_for_function("() => (document.querySelector('#gen-output textarea')?.value || '').length > 20",
                           timeout=60_000)
    page.locator("#gen-stop").click()
    t0 = time.monotonic()
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"model": "tiny8k", "prompt": "after stop", "max_tokens": 3})
    assert r.status_code == 200 and time.monotonic() - t0 < 10, "the stopped generation kept the engine busy"
    length = len(page.locator("#gen-output textarea").input_value())
    page.wait_for_timeout(1000)  # the output no longer grows once stopped
    assert len(page.locator("#gen-output textarea").input_value()) == length
    assert "done" not in page.locator("#gen-status").inner_text()
