"""The Generate tab in headless Chromium against a real server: the streamed text is the engine's, tokens are
shaded and clickable, an alternative branches the completion, step mode shows the distribution and the coin
flip, a text gets a perplexity, and Stop frees the engine."""
from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import open_tab
from tests.helpers import register_tiny_model
from tests.scripted import register_scripted

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser

PROMPT = "Once upon a time"
ANSWER = "2 + 2 = 4."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import start_server
    data = tmp_path_factory.mktemp("genui") / "data"
    register_tiny_model(data, "tiny8k", tokenizer="cl100k_base+chatml", max_seq_len=8192)
    # an instruct model that, like SmolLM2-Instruct on "What is 2+2?", ends raw text at once and answers in chat
    register_scripted(data, "instructed", [ANSWER], {"?": "<|endoftext|>", "\n": ANSWER, ANSWER: "<|im_end|>"},
                      tools=False)
    s = start_server(data, "--model", "tiny8k", "--no-worker")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page(server):  # one browser page for the module: loading the Gradio page costs seconds on a busy machine
    with open_tab(server, "Generate", "#gen-run", width=1300, height=1400) as page:
        yield page


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def token_texts(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('#gen-tokens .pg-tok')].map(s => s.textContent)")


def greedy_completion(page, n: int) -> None:
    page.locator("#gen-prompt textarea").fill(PROMPT)
    set_number(page, "gen-temperature", 0)
    set_number(page, "gen-max-tokens", n)
    page.locator("#gen-run").click()
    wait_done_with(page, n)


def wait_done_with(page, n_tokens: int) -> None:
    page.wait_for_function("(n) => (document.querySelector('#gen-status')?.innerText || '').startsWith('done')"
                           " && document.querySelectorAll('#gen-tokens .pg-tok').length === n", arg=n_tokens,
                           timeout=60_000)
    page.wait_for_function(  # the plain-text box has caught up with the token view (no stop strings here)
        "() => document.querySelector('#gen-output textarea').value === [...document.querySelectorAll("
        "'#gen-tokens .pg-tok')].map(s => s.textContent).join('').replaceAll('↵', '')", timeout=60_000)


def test_greedy_completion_streams_the_engines_text(page, server):
    greedy_completion(page, 20)
    shown = page.locator("#gen-output textarea").input_value()
    api = httpx.post(server.base_url + "/v1/completions", timeout=60,
                     json={"model": "tiny8k", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}).json()
    assert shown == api["choices"][0]["text"] and len(shown) > 0
    # the token view holds the same text, one shaded span per token
    spans = page.locator("#gen-tokens .pg-tok")
    assert spans.count() == 20
    assert page.evaluate("() => [...document.querySelectorAll('#gen-tokens .pg-tok')].map(s => s.textContent).join('')").replace("↵", "") == shown
    assert "hsla(" in (spans.first.get_attribute("style") or "")


def test_click_a_token_shows_alternatives_and_an_alternative_branches(page, server):
    greedy_completion(page, 8)
    before = token_texts(page)
    page.locator("#gen-tokens .pg-tok").nth(2).click()
    page.wait_for_selector("#gen-alts .pg-alt")
    alts = page.locator("#gen-alts .pg-alt")
    assert alts.count() == 10
    assert "%" in alts.first.inner_text()
    assert "pg-chosen" in (alts.first.get_attribute("class") or "")  # greedy picked the most likely token
    alt_id = int(alts.nth(1).get_attribute("data-alt"))
    alts.nth(1).click()
    page.wait_for_function("(id) => document.querySelectorAll('#gen-tokens .pg-tok').length === 8 && (document."
                           "querySelector('#gen-status')?.innerText || '').startsWith('done') && document.querySelector("
                           "'#gen-alts .pg-chosen')?.dataset.alt === String(id)", arg=alt_id, timeout=60_000)
    wait_done_with(page, 8)
    after = token_texts(page)
    assert after[:2] == before[:2]
    # the API's branch from the same prefix with the same token gives the same text as the page
    gen = httpx.post(server.base_url + "/api/completion/generate", timeout=60,
                     json={"model": "tiny8k", "prompt": PROMPT, "temperature": 0, "max_tokens": 2}).json()
    prefix = gen["prompt_ids"] + [t["id"] for t in gen["tokens"]]
    branch = httpx.post(server.base_url + "/api/completion/branch", timeout=60,
                        json={"model": "tiny8k", "prefix_ids": prefix, "token_id": alt_id, "temperature": 0,
                              "max_tokens": 6}).json()
    assert branch["tokens"][0]["id"] == alt_id
    assert page.locator("#gen-output textarea").input_value() == gen["text"] + branch["text"]
    assert after[2:] == [t["text"] for t in branch["tokens"]]


def test_step_mode_shows_the_distribution_and_the_coin_flip(page):
    page.locator("#gen-prompt textarea").fill("One step at a time")  # a new prompt: step starts afresh
    page.locator("#gen-seed input, #gen-seed textarea").first.fill("5")
    page.locator("#gen-step").click()
    page.wait_for_selector("#gen-dist #gen-coin")
    rows = page.locator("#gen-dist table tr")
    assert rows.count() == 21  # header + 20 tokens
    assert page.locator("#gen-dist .pg-picked").count() <= 1
    u = float(page.locator("#gen-coin").inner_text())
    assert 0 <= u < 1
    page.locator("#gen-step").click()
    page.wait_for_function("() => document.querySelectorAll('#gen-tokens .pg-tok').length === 2", timeout=60_000)


def test_score_a_text_gives_its_perplexity(page):
    page.get_by_text("Score a text").click()
    page.locator("#gen-score-text textarea").fill("The quick brown fox")
    page.locator("#gen-score-run").click()
    page.wait_for_selector("#gen-score")
    assert "perplexity" in page.locator("#gen-score").inner_text()


def test_prompt_text_is_shown_as_text_never_as_markup(page):
    prompt = "<b>bold</b> <img src=x onerror=alert(1)> ${1+1} {{value}}"
    page.locator("#gen-prompt textarea").fill(prompt)
    set_number(page, "gen-max-tokens", 3)
    page.locator("#gen-run").click()
    wait_done_with(page, 3)
    assert page.locator("#gen-tokens b, #gen-tokens img").count() == 0
    assert page.locator("#gen-tokens .pg-prompt").text_content() == prompt


def test_resample_draws_a_new_seed_and_shows_it(page):
    set_number(page, "gen-temperature", 1)
    before = page.locator("#gen-seed textarea, #gen-seed input").first.input_value()
    page.locator("#gen-resample").click()
    page.wait_for_function("(old) => { const s = document.querySelector('#gen-seed textarea, #gen-seed input').value;"
                           " return s !== old && /^[0-9]+$/.test(s) && (document.querySelector('#gen-status')"
                           "?.innerText || '').includes('seed ' + s); }", arg=before, timeout=60_000)


def test_greedy_gives_the_same_output_every_time(page, server):
    prompt = "Greedy decoding"
    api = httpx.post(server.base_url + "/v1/completions", timeout=60,
                     json={"model": "tiny8k", "prompt": prompt, "max_tokens": 12, "temperature": 0}).json()
    greedy_text = api["choices"][0]["text"]
    page.locator("#gen-prompt textarea").fill(prompt)
    set_number(page, "gen-max-tokens", 12)
    shows = ("(want) => { const out = document.querySelector('#gen-output textarea').value;"
             " return (document.querySelector('#gen-status')?.innerText || '').startsWith('done')"
             " && document.querySelectorAll('#gen-tokens .pg-tok').length === 12 && WANT; }")
    for _ in range(2):
        # a hot sample in between, so the page visibly changes before each greedy run
        set_number(page, "gen-temperature", 1.5)
        page.locator("#gen-run").click()
        page.wait_for_function(shows.replace("WANT", "out.length > 0 && out !== want"), arg=greedy_text, timeout=60_000)
        page.locator("#gen-greedy").click()
        page.wait_for_function(shows.replace("WANT", "out === want"), arg=greedy_text, timeout=60_000)
        assert page.locator("#gen-temperature input[type=number]").input_value() == "0"


def test_stop_halts_generation_and_frees_the_engine(page, server):
    page.locator("#gen-prompt textarea").fill(PROMPT)
    set_number(page, "gen-max-tokens", 4096)  # tens of seconds of tokens, far longer than this test waits
    page.locator("#gen-run").click()
    page.wait_for_function("() => (document.querySelector('#gen-output textarea')?.value || '').length > 20",
                           timeout=60_000)
    page.locator("#gen-stop").click()
    t0 = time.monotonic()
    # The status line says so at once.
    page.wait_for_function("() => (document.querySelector('#gen-status')?.innerText || '').includes('Stopped')",
                           timeout=5_000)
    assert time.monotonic() - t0 < 2, f"'Stopped' took {time.monotonic() - t0:.1f}s to show"
    t0 = time.monotonic()
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"model": "tiny8k", "prompt": "after stop", "max_tokens": 3})
    assert r.status_code == 200 and time.monotonic() - t0 < 10, "the stopped generation kept the engine busy"
    length = len(page.locator("#gen-output textarea").input_value())
    page.wait_for_timeout(1000)  # the output no longer grows once stopped
    assert len(page.locator("#gen-output textarea").input_value()) == length
    assert "done" not in page.locator("#gen-status").inner_text()


def test_an_instruct_models_empty_answer_to_raw_text_is_explained(page, server):
    page.locator("#gen-model input").click()
    page.get_by_role("option", name=re.compile("^instructed")).click()
    page.locator("#gen-prompt textarea").fill("What is 2+2?")
    set_number(page, "gen-temperature", 0)
    set_number(page, "gen-max-tokens", 8)
    page.locator("#gen-run").click()
    page.wait_for_function("() => (document.querySelector('#gen-status')?.innerText || '').startsWith('done')",
                           timeout=60_000)
    status = page.locator("#gen-status").inner_text()
    assert "0 tokens" in status and "its first token was end-of-text" in status
    assert "instructed is an instruct model" in status and "pretrain one in the Training tab" in status
    # the REST door says the same
    r = httpx.post(server.base_url + "/api/completion/generate",
                   json={"model": "instructed", "prompt": "What is 2+2?", "max_tokens": 8, "temperature": 0})
    assert r.json()["text"] == "" and "instruct model" in r.json()["note"]
    # asked in the chat format, it answers
    page.get_by_label("chat", exact=True).check()
    page.locator("#gen-run").click()
    page.wait_for_function("(a) => document.querySelector('#gen-output textarea').value.includes(a)", arg=ANSWER,
                           timeout=60_000)
    assert "instruct model" not in page.locator("#gen-status").inner_text()


def test_the_presence_penalty_slider_reaches_the_sampler(page, server):
    """The Repetition controls are offered on the page and sent with the run: a greedy completion with a presence
    penalty of 2 is the API's greedy completion with presence_penalty=2, not the unpenalised one."""
    from tests.conftest import set_slider
    body = {"model": "tiny8k", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    plain = httpx.post(server.base_url + "/v1/completions", timeout=60, json=body).json()["choices"][0]["text"]
    penalised = httpx.post(server.base_url + "/v1/completions", timeout=60,
                           json={**body, "presence_penalty": 2.0}).json()["choices"][0]["text"]
    assert penalised != plain
    page.locator("#gen-model input").click()  # the module shares one page: the tiny model, raw text
    page.get_by_role("option", name=re.compile("^tiny8k")).click()
    page.get_by_label("completion", exact=True).check()
    page.get_by_text("Repetition controls").click()
    set_slider(page, "gen-presence-penalty", 2)
    try:
        greedy_completion(page, 20)
        assert page.locator("#gen-output textarea").input_value() == penalised
    finally:
        set_slider(page, "gen-presence-penalty", 0)  # the module shares one page
