"""The Chat tab in headless Chromium against a real server and a scripted tool-calling model: a system
prompt, a streamed turn that thinks, searches and answers, the tool step opened to show what came back,
the system prompt in the tokens view, and a past user turn edited and answered again."""
from __future__ import annotations

import pytest

from tests.conftest import log_in, open_tab
from tests.helpers import add_user
from tests.scripted import RAMBLE, register_rambler, register_scripted

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser

THOUGHT = "I should look this up."
CALL = '{"name":"search","arguments":{"query":"FineWeb dataset"}}'
ANSWER = ["FineWeb is", " a pretraining", " dataset", " of web text."]
CHAIN = {"\n": "<think>", "<think>": THOUGHT, THOUGHT: "</think>", "</think>": "<tool_call>", "<tool_call>": CALL,
         CALL: "</tool_call>", "</tool_output>": ANSWER[0], ANSWER[0]: ANSWER[1], ANSWER[1]: ANSWER[2],
         ANSWER[2]: ANSWER[3], ANSWER[3]: "<|im_end|>"}
SYSTEM = "You are Pip, built by the playground tests."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.conftest import start_server
    data = tmp_path_factory.mktemp("chatui") / "data"
    register_scripted(data, "scripted", [THOUGHT, CALL, *ANSWER], CHAIN)
    register_rambler(data, "rambler")  # says "la " until max_tokens: a Stop lands mid-answer
    password, _ = add_user(data, "lea", "learner")  # the tools need a signed-in user
    s = start_server(data, "--model", "scripted", "--no-worker")
    s.password = password
    yield s
    s.stop()


@pytest.fixture
def page(server):
    with open_tab(server, "Chat", "#chat-send") as page:
        log_in(page, "lea", server.password)
        yield page


def wait_status(page, text: str, timeout: int = 60_000) -> None:
    page.wait_for_function("(t) => (document.querySelector('#chat-status')?.innerText || '').includes(t)", arg=text,
                           timeout=timeout)


def send(page, text: str) -> None:
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-send").click()


def test_system_prompt_streamed_turn_and_an_opened_tool_step(page):
    page.locator("#chat-system textarea").fill(SYSTEM)
    # Record every text the conversation shows while the turn streams.
    page.evaluate("""() => { window.seen = []; const bot = document.querySelector('#chat-bot');
        new MutationObserver(() => window.seen.push(bot.innerText)).observe(bot, {subtree: true, childList: true,
        characterData: true}); }""")
    send(page, "What is FineWeb?")
    wait_status(page, "done")
    bot = page.locator("#chat-bot")
    assert "".join(ANSWER) in bot.inner_text()
    seen = page.evaluate("window.seen")
    assert any("FineWeb is" in s and "".join(ANSWER) not in s for s in seen), "the answer did not stream"
    # Thinking and the search are collapsible blocks apart from the answer; open the search step.
    assert bot.get_by_text("Thinking").count() >= 1
    step = bot.get_by_text("search: FineWeb dataset")
    step.first.click()
    page.wait_for_function("() => document.querySelector('#chat-bot').innerText.includes('FineWeb pretraining dataset')",
                           timeout=10_000)
    # The whole context as tokens: the system prompt, the call and its output are in it.
    page.get_by_text("Tokens: the whole context as the model sees it").click()
    page.locator("#chat-show-tokens").click()
    page.wait_for_function("(s) => (document.querySelector('#chat-tokens')?.innerText || '').includes(s)",
                           arg="playground", timeout=20_000)
    tokens = page.locator("#chat-tokens").inner_text()
    assert "<tool_output>" in tokens and "tokens in" in tokens


def test_edit_a_past_user_turn_and_continue(page):
    send(page, "First question")
    wait_status(page, "done")
    send(page, "Second question")
    page.wait_for_function("() => document.querySelectorAll('#chat-bot .user-row, #chat-bot [data-testid=user]').length >= 2 || "
                           "(document.querySelector('#chat-status')?.innerText || '').includes('done')", timeout=60_000)
    wait_status(page, "done")
    first = page.locator("#chat-bot").get_by_text("First question", exact=True)
    first.hover()
    page.locator("#chat-bot button[title='Edit'], #chat-bot button[aria-label='Edit']").first.click()
    box = page.locator("#chat-bot textarea").first
    box.fill("Edited question")
    page.locator("#chat-bot").get_by_role("button", name="Submit").first.click()
    page.wait_for_function("() => document.querySelector('#chat-bot').innerText.includes('Edited question') && "
                           "!document.querySelector('#chat-bot').innerText.includes('Second question') && "
                           "(document.querySelector('#chat-status')?.innerText || '').includes('done')", timeout=60_000)
    assert page.locator("#chat-bot").inner_text().count("".join(ANSWER)) == 1


def test_a_huge_paste_is_answered_with_the_context_limit_in_numbers(page):
    """200,000 characters pasted and sent: the turn ends at once with a note that says how many tokens the
    conversation is and how many the model's context window holds, instead of a silent page."""
    box = page.locator("#chat-input textarea")
    box.evaluate("(el, n) => { el.value = 'a'.repeat(n); el.dispatchEvent(new Event('input', {bubbles: true})); }",
                 200_000)
    page.locator("#chat-send").click()
    page.wait_for_function("() => document.querySelector('#chat-bot').innerText.includes('context window holds')",
                           timeout=60_000)
    note = next(t for t in page.locator("#chat-bot").all_inner_texts() if "context window holds" in t)
    assert "no room is left for an answer" in note and "2,048" in note, note[-300:]
    wait_status(page, "done")


def test_stop_says_stopped_at_once_and_the_answer_stops_growing(page):
    from tests.conftest import set_slider
    page.locator("#chat-model input").click()
    page.get_by_role("option", name="rambler", exact=True).click()
    page.get_by_text("Sampling", exact=True).click()
    set_slider(page, "chat-max-tokens", 2048)  # 2048 tokens of the slow rambler: far longer than the test
    send(page, "Sing.")
    page.wait_for_function("(w) => document.querySelector('#chat-bot').innerText.split(w).length > 4",
                           arg=RAMBLE.strip(), timeout=60_000)  # a few tokens in
    page.locator("#chat-stop").click()
    wait_status(page, "Stopped", timeout=10_000)
    page.wait_for_timeout(1500)  # an update already on its way may land just after the Stop; then nothing more
    answer = page.locator("#chat-bot").inner_text()
    page.wait_for_timeout(1500)
    assert page.locator("#chat-bot").inner_text() == answer and "Stopped" in page.locator("#chat-status").inner_text()
    assert answer.count(RAMBLE.strip()) < 2048
