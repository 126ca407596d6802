"""The OpenAI-compatible API through the official `openai` client against a real server on loopback."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import start_server
from tests.helpers import register_tiny_model
from tests.test_engine import bigram_model

# After the chat prompt (or the completion prompt "The"), the bigram model says this, then <|endoftext|>.
CHAIN = [b"The", b" cat", b" sat", b" on", b" the", b" mat", b".", b" ", b"\xf0", b"\x9f", b"\x98", b"\x80"]
ANSWER = " cat sat on the mat. 😀"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from backend.config import AppConfig
    from models.chat_format import render_chat
    from models.registry import ModelRegistry
    from models.tokenizers import get_encoding

    data = tmp_path_factory.mktemp("api") / "data"
    chatml = "cl100k_base+chatml"
    register_tiny_model(data, "tiny", tokenizer=chatml)
    register_tiny_model(data, "tiny8k", tokenizer=chatml, max_seq_len=8192)
    register_tiny_model(data, "base", chat_format=None)
    enc = get_encoding(chatml, data)
    prompt_end = render_chat([{"role": "user", "content": "hi"}], enc, add_generation_prompt=True).ids[-1]
    ids = [enc.encode_single_token(p) for p in CHAIN] + [enc.eot_token]
    table = dict(zip(ids[:-1], ids[1:]))
    table[prompt_end] = ids[0]
    model = bigram_model(enc.max_token_value + 1, table)
    ModelRegistry(AppConfig(data_dir=data)).register("bigram", model, chatml, "chatml", {"test": True})
    s = start_server(data, "--model", "tiny", "--no-worker")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_text(client, **kw) -> str:
    r = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "hi"}], **kw)
    return r.choices[0].message.content


def test_models_list_names_every_registered_model(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "smollm2-135m-instruct"
    assert {"tiny", "tiny8k", "base", "bigram"} <= set(ids)
    assert client.models.retrieve("tiny").id == "tiny"
    rest = httpx.get(server.base_url + "/api/models").json()
    tiny = next(m for m in rest["models"] if m["name"] == "tiny")
    assert tiny["tokenizer"] == "cl100k_base+chatml" and tiny["context_length"] == 1024 and tiny["loaded"] is True
    health = httpx.get(server.base_url + "/healthz").json()
    assert health["default_model"] == "tiny" and "tiny" in health["loaded_models"]


def test_chat_answer_usage_and_stop_token(client):
    r = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "hi"}])
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "The" + ANSWER
    assert choice.finish_reason == "stop"  # ended by <|endoftext|>, which is not in the content
    assert r.usage.completion_tokens == len(CHAIN)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == "bigram"


def test_chat_streaming_matches_and_keeps_characters_whole(client):
    stream = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "hi"}],
                                            stream=True, stream_options={"include_usage": True})
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                deltas.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert "".join(deltas) == "The" + ANSWER
    assert deltas[-1].endswith("😀") and all("\ufffd" not in d for d in deltas)
    assert finish == "stop"
    assert usage.completion_tokens == len(CHAIN)


def test_sse_ends_with_done(server):
    body = {"model": "bigram", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_string_spanning_tokens_is_cut(client):
    r = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "hi"}],
                                       stop=["sat o"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("The cat ", "stop")
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="bigram", messages=[{"role": "user", "content": "hi"}], stop=["sat o"], stream=True) if c.choices]
    assert "".join(parts) == "The cat "


def test_chat_logprobs_and_max_completion_tokens(client):
    r = client.chat.completions.create(model="bigram", messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=2, max_completion_tokens=3)
    choice = r.choices[0]
    assert choice.message.content == "The cat sat" and choice.finish_reason == "length"
    content = choice.logprobs.content
    assert [c.token for c in content] == ["The", " cat", " sat"]
    assert all(c.logprob == pytest.approx(0.0, abs=1e-3) for c in content)  # the table is certain
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    assert content[1].bytes == list(b" cat")


def test_completions_echo_logprobs_and_lists(client):
    r = client.completions.create(model="bigram", prompt="The", max_tokens=3, logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text == "The cat sat on"
    assert c.logprobs.tokens == ["The", " cat", " sat", " on"]
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.token_logprobs[1] == pytest.approx(0, abs=1e-3)
    assert c.logprobs.text_offset == [0, 3, 7, 11]
    r = client.completions.create(model="tiny", prompt=["Hello", "A longer prompt here"], max_tokens=4,
                                  temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    assert r.usage.completion_tokens == 16


def test_seed_reproduces_and_n_gives_different_samples(client):
    kw = dict(model="tiny", prompt="Sample me", max_tokens=8, temperature=1.0, n=3, seed=1234)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    c = [c.text for c in client.completions.create(**{**kw, "seed": 4321}).choices]
    assert a == b and a != c and len(set(a)) > 1


def test_completion_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="Stream it", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    parts = [ch.choices[0].text for ch in client.completions.create(stream=True, **kw) if ch.choices]
    assert "".join(parts) == whole


def error_of(server, path: str, content: bytes | dict) -> tuple[int, dict]:
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    r = httpx.post(server.base_url + path, content=data, headers={"content-type": "application/json"}, timeout=30)
    return r.status_code, r.json()


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"model": "nope", "messages": MSG}, "model"),
    (CHAT, {"model": "tiny", "messages": MSG, "temperature": -0.5}, "temperature"),
    (CHAT, {"model": "tiny", "messages": MSG, "top_p": 0}, "top_p"),
    (CHAT, {"model": "tiny", "messages": MSG, "top_p": 1.5}, "top_p"),
    (CHAT, {"model": "tiny", "messages": MSG, "max_tokens": 5000}, "max_tokens"),
    (CHAT, {"model": "tiny", "messages": MSG, "max_completion_tokens": 10**9}, "max_completion_tokens"),
    (CHAT, {"model": "tiny", "messages": "hi"}, "messages"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (CHAT, {"model": "tiny", "messages": MSG, "n": "two"}, "n"),
    (CHAT, {"model": "tiny", "messages": MSG, "stream": "yes"}, "stream"),
    (CHAT, {"model": "tiny", "messages": MSG, "stop": 5}, "stop"),
    (CHAT, {"model": "tiny", "messages": MSG, "top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"model": "base", "messages": MSG}, "model"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "word " * 1100}]}, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 1100}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 10**9]}, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
])
def test_bad_requests_get_a_4xx_naming_the_field(server, path, body, param):
    status, err = error_of(server, path, body)
    assert 400 <= status < 500, err
    assert err["error"]["param"] == param, err
    assert err["error"]["message"]


def test_invalid_utf8_lone_surrogates_and_bad_json_are_rejected(server, client):
    status, err = error_of(server, CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert status == 400 and "UTF-8" in err["error"]["message"]
    status, err = error_of(server, CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert status == 400 and err["error"]["param"] == "messages[0].content"
    status, err = error_of(server, CHAT, b'{"model": ')
    assert status == 400 and "JSON" in err["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MSG)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, temperature=-1)
    assert "temperature" in str(e.value)
    # The server is still healthy and serving.
    assert client.completions.create(model="tiny", prompt="still alive", max_tokens=2).choices[0].text


def test_disconnected_stream_frees_the_engine_and_healthz_answers_meanwhile(server, client):
    body = {"model": "tiny8k", "prompt": "go on forever", "max_tokens": 8000, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # generation is running
        t0 = time.monotonic()
        assert httpx.get(server.base_url + "/healthz", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 5
    assert any(line.startswith("data: {") for line in got)
    # The client went away after a few tokens; 8000 tokens would take far longer than this deadline.
    t0 = time.monotonic()
    r = client.completions.create(model="tiny8k", prompt="next please", max_tokens=3, timeout=30)
    assert len(r.choices[0].text) > 0
    assert time.monotonic() - t0 < 5, "the abandoned stream kept the engine busy"


def test_concurrent_requests_are_served_fairly(client):
    prompts = ["one", "two two", "three three three", "four"]
    solo = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
            for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6,
                                               temperature=0).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == solo


@pytest.mark.slow
def test_bundled_smollm2_answers_through_the_openai_client(tmp_path):
    """The real bundled model, preloaded at start, answers a greedy chat and streams the same text."""
    s = start_server(tmp_path / "data", "--no-worker")
    try:
        health = httpx.get(s.base_url + "/healthz").json()
        assert health["loaded_models"] == ["smollm2-135m-instruct"]
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, temperature=0,
                                           max_tokens=40)
        answer = r.choices[0].message.content
        assert "Paris" in answer  # SmolLM2-135M-Instruct says: "The capital of France is Paris."
        assert r.choices[0].finish_reason == "stop" and "<|im_end|>" not in answer
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m-instruct", messages=msgs, temperature=0, max_tokens=40, stream=True) if c.choices]
        assert "".join(parts) == answer
        c = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                      max_tokens=3, temperature=0, logprobs=2)
        assert c.choices[0].text.startswith(" Paris")
        assert c.choices[0].logprobs.tokens[0] == " Paris"
    finally:
        s.stop()


def test_presence_frequency_and_repetition_penalties_cut_the_repeats_of_a_greedy_answer(client):
    """OpenAI's frequency_penalty and presence_penalty (and the repetition_penalty extension, as vLLM takes it)
    reach the sampler: a greedy answer of the tiny random model repeats its tokens, the penalised one much less."""
    def tokens(**kw) -> list[int]:
        r = client.completions.create(model="tiny", prompt="The", max_tokens=40, temperature=0, logprobs=1, **kw)
        return r.choices[0].logprobs.tokens

    plain = tokens()
    repeats = lambda toks: len(toks) - len(set(toks))  # noqa: E731
    assert repeats(plain) > 10, plain  # a random model's greedy text loops
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        assert repeats(tokens(**kw)) < repeats(plain), kw
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        tokens(presence_penalty=3.0)  # OpenAI's range is -2..2
