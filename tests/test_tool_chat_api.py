"""/v1/chat/completions with the built-in tools, through the openai client against a real server: a scripted
model searches, the server runs the search and the model answers in the same turn; streaming shows the
steps; bad tool requests get a 400 naming the field."""
from __future__ import annotations

import openai
import pytest

from tests.conftest import start_server
from tests.helpers import add_user
from tests.scripted import register_scripted

THOUGHT = "I do not know this; search."
CALL = '{"name":"search","arguments":{"query":"FineWeb dataset"}}'
ANSWER = "FineWeb is a pretraining dataset."
CHAIN = {"\n": "<think>", "<think>": THOUGHT, THOUGHT: "</think>", "</think>": "<tool_call>", "<tool_call>": CALL,
         CALL: "</tool_call>", "</tool_output>": ANSWER, ANSWER: "<|im_end|>"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("toolapi") / "data"
    register_scripted(data, "scripted", [THOUGHT, CALL, ANSWER], CHAIN)
    _, key = add_user(data, "lea", "learner")  # tools need a signed-in user (backend/auth.py)
    s = start_server(data, "--model", "scripted", "--no-worker")
    s.key = key
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.key, max_retries=0, timeout=120)


MSGS = [{"role": "user", "content": "What is FineWeb?"}]
TOOLS = [{"type": "function", "function": {"name": "search"}}]


def test_tool_loop_through_the_api(client):
    r = client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=50)
    m = r.choices[0].message
    assert m.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert m.reasoning_content == THOUGHT
    [step] = m.tool_steps
    assert step["tool"] == "search" and step["input"] == "FineWeb dataset" and "[1] FineWeb pretraining dataset" in step["output"]
    assert [k for k, _ in m.segments] == ["think", "call", "output", "text"]
    assert r.usage.completion_tokens == 6 and m.notes == []
    # Sent back, the steps are rendered into the next turn's context: the scripted model, whose prompt now
    # ends with the user turn again, repeats the same turn (deterministic), proving the request parses.
    again = client.chat.completions.create(
        model="scripted", extra_body={"tools_enabled": True}, max_tokens=50,
        messages=MSGS + [{"role": "assistant", "content": m.content, "reasoning_content": m.reasoning_content,
                          "tool_steps": m.tool_steps}, {"role": "user", "content": "And again?"}])
    assert again.choices[0].message.content == ANSWER
    assert again.usage.prompt_tokens > r.usage.prompt_tokens + len("[1] FineWeb")


def test_streaming_shows_thinking_steps_and_answer(client):
    stream = client.chat.completions.create(model="scripted", messages=MSGS, tools=TOOLS, max_tokens=50, stream=True)
    thinking, content, steps, finish = "", "", [], None
    for ch in stream:
        d = ch.choices[0].delta
        thinking += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        if getattr(d, "tool_step", None):
            steps.append(d.tool_step["event"])
        finish = ch.choices[0].finish_reason or finish
    assert (thinking, content, steps, finish) == (THOUGHT, ANSWER, ["start", "end"], "stop")


def test_without_tools_the_call_is_a_plain_answer(client):
    # Without tools the plain route runs untouched: nothing stops at </tool_call>, the tags stay text.
    r = client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=6)
    assert r.choices[0].message.content == f"<think>{THOUGHT}</think><tool_call>{CALL}</tool_call>"


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "get_weather"}}]}, "tools[0]"),
    ({"tools_enabled": True, "n": 2}, "n"),
    ({"tools_enabled": True, "logprobs": True}, "logprobs"),
    ({"tools_enabled": True, "max_tool_calls": 99}, "max_tool_calls"),
    ({"tools_enabled": True, "tool_choice": "required"}, "tool_choice"),
])
def test_bad_tool_requests_name_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="scripted", messages=MSGS, max_tokens=5, extra_body=extra)
    assert e.value.body["param"] == param
