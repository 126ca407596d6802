"""What the field's own clients need from /v1, through the official openai client against a real server:
client-side function calling (an agent loop that runs a local Python function), the echo/stop-token
log-prob rule lm-evaluation-harness relies on, and vLLM's tokenizer routes.

The model is a bigram table over cl100k_base+tools (tests/helpers.bigram_model): after the generation
prompt it writes <tool_call>{"name":"square","arguments":{"x":7}}</tool_call>, after </tool_output> it
answers "The square is 49.", and after "Hello world" it ends the text. The call is written in ordinary
tokens, so the grammar that holds calls to the tools' schemas (backend/serving/structured.py) checks it.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import start_server
from tests.helpers import bigram_model

ENC = "cl100k_base+tools"
CALL = '{"name":"square","arguments":{"x":7}}'
ANSWER = "The square is 49."
TOOLS = [{"type": "function", "function": {
    "name": "square", "description": "x squared",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from backend.config import AppConfig
    from models.registry import ModelRegistry
    from models.tokenizers import get_encoding

    data = tmp_path_factory.mktemp("clients") / "data"
    enc = get_encoding(ENC, data)
    ids = enc.encode_ordinary
    special = enc.encode_single_token
    chain = [ids("\n")[0], special("<tool_call>")] + ids(CALL) + [special("</tool_call>")]
    answer = [special("</tool_output>")] + ids(ANSWER) + [special("<|im_end|>")]
    hello = ids("Hello world") + [enc.eot_token]
    table = {}
    for seq in (chain, answer, hello):
        table.update(zip(seq[:-1], seq[1:]))
    model = bigram_model(enc.max_token_value + 1, table, max_seq_len=1024)
    ModelRegistry(AppConfig(data_dir=data)).register("caller", model, ENC, "chatml", {"test": True})
    s = start_server(data, "--model", "caller", "--no-worker")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def square(x: int) -> int:
    return x * x


def test_agent_loop_runs_a_local_function_and_finishes_with_an_answer(client):
    messages = [{"role": "user", "content": "What is 7 squared?"}]
    local = {"square": square}
    for _turn in range(3):
        r = client.chat.completions.create(model="caller", messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=40)
        choice = r.choices[0]
        if choice.finish_reason != "tool_calls":
            break
        [call] = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        result = local[call.function.name](**json.loads(call.function.arguments))
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": str(result)})
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "square", "arguments": '{"x":7}'}
    assert choice.finish_reason == "stop" and choice.message.content == ANSWER
    assert choice.message.tool_calls is None


def test_tool_call_streams_name_then_argument_deltas(client):
    stream = client.chat.completions.create(model="caller", messages=[{"role": "user", "content": "7 squared?"}],
                                            tools=TOOLS, tool_choice="required", temperature=0, max_tokens=40,
                                            stream=True)
    deltas, finish = [], None
    for chunk in stream:
        for ch in chunk.choices:
            deltas += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    assert deltas[0].function.name == "square" and deltas[0].id.startswith("call_")
    pieces = [d.function.arguments for d in deltas[1:]]
    assert len(pieces) > 1 and "".join(pieces) == '{"x":7}'  # argument text arrives as it is written
    assert finish == "tool_calls"


def test_tool_choice_none_and_named_and_bad_requests(client, server):
    named = client.chat.completions.create(model="caller", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "square"}},
                                           temperature=0, max_tokens=40)
    assert named.choices[0].message.tool_calls[0].function.arguments == '{"x":7}'
    # none: the tools are not offered, nothing is parsed: the model's text comes back as it is
    plain = client.chat.completions.create(model="caller", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=3)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    for extra, param in [({"tool_choice": {"type": "function", "function": {"name": "cube"}}}, "tool_choice"),
                         ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
                         ({"messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                                            "name": "square", "arguments": "{not json"}}]},
                                        {"role": "tool", "tool_call_id": "c1", "content": "1"}]},
                          "messages[1].tool_calls[0]"),
                         ({"response_format": {"type": "json_schema"}}, "response_format.json_schema")]:
        body = {"model": "caller", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, **extra}
        r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_echo_logprobs_give_the_stop_token_its_entry(client):
    """lm-evaluation-harness scores a continuation with echo + max_tokens 1 + logprobs and drops the last
    entry (the sampled token): when that token is the stop token it must still be there."""
    r = client.completions.create(model="caller", prompt="Hello world", max_tokens=1, logprobs=1, echo=True,
                                  temperature=0)
    c = r.choices[0]
    assert c.text == "Hello world" and c.finish_reason == "stop"
    assert c.logprobs.tokens == ["Hello", " world", "<|endoftext|>"]
    assert c.logprobs.token_logprobs[0] is None
    assert c.logprobs.token_logprobs[2] == pytest.approx(0.0, abs=1e-3)
    assert c.logprobs.top_logprobs[2] == {"<|endoftext|>": pytest.approx(0.0, abs=1e-3)}
    assert r.usage.completion_tokens == 0  # the stop token is not part of the completion
    streamed = [ch.choices[0] for ch in client.completions.create(
        model="caller", prompt="Hello world", max_tokens=5, logprobs=0, temperature=0, stream=True) if ch.choices]
    tokens = [t for ch in streamed if ch.logprobs for t in ch.logprobs.tokens]
    assert tokens == ["<|endoftext|>"] and streamed[-1].finish_reason == "stop"


def test_tokenizer_routes_round_trip(server, client):
    base = server.base_url
    info = httpx.get(base + "/tokenizer_info").json()  # the default model (--model caller)
    assert info["model"] == "caller" and info["eos_token"] == "<|im_end|>" and "<|im_start|>" in info["chat_template"]
    text = "Hello world <|im_end|> naïve 😀"
    tok = httpx.post(base + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 1024
    assert tok["tokens"][:2] == [9906, 1917] and tok["token_strs"][:2] == ["Hello", " world"]
    assert httpx.post(base + "/detokenize", json={"model": "caller", "tokens": tok["tokens"]}).json()["prompt"] == text
    # messages are rendered as /v1/chat/completions renders them
    msgs = [{"role": "user", "content": "hi"}]
    n = httpx.post(base + "/tokenize", json={"model": "caller", "messages": msgs}).json()["count"]
    assert n == client.chat.completions.create(model="caller", messages=msgs, max_tokens=1).usage.prompt_tokens
    bundled = httpx.get(base + "/tokenizer_info", params={"model": "smollm2-135m-instruct"}, timeout=120).json()
    assert bundled["tokenizer"] == "smollm2" and bundled["model_max_length"] == 8192
    for path, body, status, param in [("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
                                      ("/tokenize", {"prompt": "x", "messages": msgs}, 400, "prompt"),
                                      ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens[1]"),
                                      ("/detokenize", {"tokens": "12"}, 400, "tokens")]:
        r = httpx.post(base + path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
