"""A newcomer's first minute in headless Chromium against a real server: the sign-in sits in the page header on
every tab and says the role once signed in, the header says which tabs need an account, the Start-here tour opens
each demonstration's tab with its preset and says what to notice, Practice opens with a problem ready, and a
200,000-character paste into the Tokenizer answers with its size limit within a second."""
from __future__ import annotations

import pytest

from tests.conftest import launch_chromium, log_in, start_server
from tests.test_labels_api import database_with_users

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    data = tmp_path_factory.mktemp("tour_browser") / "data"
    data.mkdir()
    db, people = database_with_users(data, [("ann", "annotator")])
    server = start_server(data, "--no-preload", "--no-worker")
    yield server, people
    server.stop()
    db.close()


def test_first_minute_header_sign_in_tour_ready_practice_and_huge_paste(site):
    sync_api = pytest.importorskip("playwright.sync_api")
    server, people = site
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.base_url + "/")
        # The landing tab is the tour; the header already offers sign-in and names the tabs that need it.
        page.locator("#pg-header .pg-login-form").wait_for(timeout=30_000)
        assert "Sign in for" in page.locator("#pg-account-note").inner_text()
        assert page.get_by_role("button", name="Open →").count() == 18
        log_in(page, "ann", people["ann"][1])
        assert "(annotator)" in page.locator("#pg-header .pg-whoami").inner_text()
        for tab in ("Arena", "Training", "Tokenizer"):  # the same header, signed in, on every tab
            page.get_by_role("tab", name=tab, exact=True).click()
            assert page.locator("#pg-header .pg-whoami").is_visible()

        # Tour step 7 opens Generate with the 2+2 preset and says what to notice; Next moves to few-shot prompting.
        page.get_by_role("tab", name="Start here", exact=True).click()
        page.locator("#tour-open-7").click()
        page.wait_for_function("() => (document.querySelector('#gen-prompt textarea')?.value || '').startsWith('What is 2+2')",
                               timeout=30_000)
        assert page.locator("#gen-prompt").is_visible()
        assert "Tour 7 of 18" in page.locator("#tour-text").inner_text()
        assert "What to notice" in page.locator("#tour-text").inner_text()
        page.locator("#tour-next").click()
        page.wait_for_function("() => document.querySelector('#tour-text').innerText.includes('Tour 8 of 18')",
                               timeout=30_000)
        assert "Few-shot" in page.locator("#gen-preset input").input_value()
        # Step 11 goes to Chat with the forced search call preset.
        page.get_by_role("tab", name="Start here", exact=True).click()
        page.locator("#tour-open-11").click()
        page.wait_for_function("() => (document.querySelector('#chat-demo input')?.value || '').includes('with search')",
                               timeout=30_000)

        page.get_by_role("tab", name="Practice", exact=True).click()
        assert len(page.locator("#practice-question textarea").input_value()) > 20
        assert page.locator("#practice-answer input, #practice-answer textarea").first.input_value().isdigit()

        page.get_by_role("tab", name="Tokenizer", exact=True).click()
        box = page.locator("#tok-text textarea")
        # Paste 200,000 characters and time, in the page, until the size note is there (the test's own
        # round trips to the browser are not the page's answer time on a loaded machine).
        took = box.evaluate("""(el, n) => new Promise((done) => {
            const note = document.querySelector('#tok-size-note');
            const t0 = performance.now();
            const seen = () => note.innerText.includes('limit is') ? done((performance.now() - t0) / 1000)
                                                                    : requestAnimationFrame(seen);
            el.value = 'a'.repeat(n);
            el.dispatchEvent(new Event('input', {bubbles: true}));
            seen();
        })""", 200_000)
        assert "200,000 characters; the limit is 100,000" in page.locator("#tok-size-note").inner_text()
        assert took < 1.0, f"the size limit took {took:.2f}s to show"
        # and the server's answer (the counts line) says the same, instead of a silent page
        page.wait_for_function("() => document.querySelector('#tok-counts').innerText.includes('the limit is')",
                               timeout=10_000)
        browser.close()
