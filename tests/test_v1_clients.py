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

from backend.chat_tools import to_chat_messages
from models.chat_format import render_chat
from tests.conftest import start_server
from tests.helpers import bigram_model
from tests.scripted import register_scripted

ENC = "cl100k_base+tools"
CALL = '{"name":"square","arguments":{"x":7}}'
ANSWER = "The square is 49."
TOOLS = [{"type": "function", "function": {
    "name": "square", "description": "x squared",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
PAIR_CALLS = ['{"name":"square","arguments":{"x":7}}', '{"name":"cube","arguments":{"x":2}}']
PAIR_WORDS = tuple(f"<tool_call>{c}</tool_call>" for c in PAIR_CALLS)
PAIR_ANSWER = "7 squared is 49 and 2 cubed is 8."
PAIR_TOOLS = TOOLS + [{"type": "function", "function": {
    "name": "cube", "description": "x cubed",
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
    table = {special("</tool_call>"): special("<tool_output>")}  # after its call, the tool's output
    hello = ids("Hello world") + [enc.eot_token]
    for seq in (chain, answer, hello):
        table.update(zip(seq[:-1], seq[1:]))
    model = bigram_model(enc.max_token_value + 1, table, max_seq_len=1024)
    ModelRegistry(AppConfig(data_dir=data)).register("caller", model, ENC, "chatml", {"test": True})
    # plain-text tags: the prompt after the tool outputs ends with the ">" of </tool_output>
    register_scripted(data, "pair", [], {"\n": PAIR_WORDS[0], PAIR_WORDS[0]: PAIR_WORDS[1],
                                         PAIR_WORDS[1]: "<|im_end|>", ">": PAIR_ANSWER, PAIR_ANSWER: "<|im_end|>"},
                      tools=False, words=PAIR_WORDS + (PAIR_ANSWER,))
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


def test_parallel_calls_come_back_as_several_tool_calls(client):
    r = client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "7 squared, 2 cubed?"}],
                                       tools=PAIR_TOOLS, temperature=0, max_tokens=20)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("square", {"x": 7}), ("cube", {"x": 2})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") and c.type == "function" for c in calls)


def test_parallel_calls_stream_with_one_index_each(client):
    kw = dict(model="pair", messages=[{"role": "user", "content": "7 squared, 2 cubed?"}], tools=PAIR_TOOLS,
              temperature=0, max_tokens=20)
    deltas, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            deltas += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and sorted({d.index for d in deltas}) == [0, 1]
    for i, call in enumerate(PAIR_CALLS):
        mine = [d for d in deltas if d.index == i]
        assert mine[0].id.startswith("call_") and mine[0].function.name == json.loads(call)["name"]
        assert "".join(d.function.arguments or "" for d in mine) == json.dumps(json.loads(call)["arguments"],
                                                                              separators=(",", ":"))
    # the openai client's own stream helper accumulates the deltas by index into the same two calls
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [("square", '{"x":7}'), ("cube", '{"x":2}')]
    assert calls[0].id != calls[1].id


def test_parallel_tool_calls_false_keeps_one_call(client):
    r = client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "7 squared, 2 cubed?"}],
                                       tools=PAIR_TOOLS, parallel_tool_calls=False, temperature=0, max_tokens=20)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("square", '{"x":7}')
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens == 1  # decoding stopped there


def test_agent_loop_answers_both_calls_and_goes_on(client, server):
    messages = [{"role": "user", "content": "7 squared, 2 cubed?"}]
    local = {"square": lambda x: x * x, "cube": lambda x: x ** 3}
    r = client.chat.completions.create(model="pair", messages=messages, tools=PAIR_TOOLS, temperature=0, max_tokens=20)
    message = r.choices[0].message
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        result = local[call.function.name](**json.loads(call.function.arguments))
        messages.append({"role": "tool", "tool_call_id": call.id, "content": str(result)})
    done = client.chat.completions.create(model="pair", messages=messages, tools=PAIR_TOOLS, temperature=0,
                                          max_tokens=20)
    assert done.choices[0].finish_reason == "stop" and done.choices[0].message.content == PAIR_ANSWER
    # the prompt holds both calls and then both results, in the calls' order, in the one chat format
    ids = httpx.post(server.base_url + "/tokenize", json={"model": "pair", "messages": messages}).json()["tokens"]
    text = httpx.post(server.base_url + "/detokenize", json={"model": "pair", "tokens": ids}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n" + "".join(PAIR_WORDS)
                         + "<tool_output>49</tool_output><tool_output>8</tool_output>")
    from models.tokenizers import get_encoding
    chat, open_turn = to_chat_messages(messages)
    rendered = render_chat(chat, get_encoding("pair", server.data_dir), continue_final_message=open_turn,
                           functions=[t["function"] for t in PAIR_TOOLS], parallel_calls=True)
    assert open_turn and done.usage.prompt_tokens == len(rendered.ids)
