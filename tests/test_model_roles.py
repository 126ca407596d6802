"""What a model is for (chat, base, reward), as a user meets it on a real server: every listing says it, and no
door generates with a reward model; each answers a 4xx naming the problem before loading anything."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import start_server
from tests.helpers import register_reward_model, register_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("roles") / "data"
    register_tiny_model(data, "tiny", tokenizer="cl100k_base+chatml")
    register_tiny_model(data, "basey", chat_format=None)
    register_reward_model(data, "judge")
    s = start_server(data, "--model", "tiny", "--no-preload", "--no-worker")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_every_listing_names_each_models_role(client, server):
    roles = {m.id: m.model_dump()["role"] for m in client.models.list()}
    assert {k: roles[k] for k in ("smollm2-135m-instruct", "tiny", "basey", "judge")} == {
        "smollm2-135m-instruct": "chat", "tiny": "chat", "basey": "base", "judge": "reward"}
    assert client.models.retrieve("judge").model_dump()["role"] == "reward"
    rest = {m["name"]: m["role"] for m in httpx.get(server.base_url + "/api/models").json()["models"]}
    assert rest["judge"] == "reward" and rest["basey"] == "base"
    # where a scorer is wanted, the reward model is offered, and only it
    assert httpx.get(server.base_url + "/api/practice/reward-models").json() == {"reward_models": ["judge"]}


@pytest.mark.parametrize("stream", [False, True])
def test_v1_refuses_to_generate_with_a_reward_model(client, stream):
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model="judge", messages=[{"role": "user", "content": "hi"}], stream=stream)
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model="judge", prompt="Once upon", max_tokens=4, stream=stream)
    for e in (chat.value, completion.value):
        assert e.status_code == 400 and e.code == "model_not_generative"
        assert "model 'judge' is a reward model (it scores answers and generates no text)" in e.message
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].message is not None  # the chat model still answers


def test_generate_tab_and_practice_doors_refuse_a_reward_model_before_loading_it(server):
    r = httpx.post(server.base_url + "/api/completion/generate", json={"model": "judge", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 422 and "reward model" in r.json()["detail"]
    models = {m["name"]: m for m in httpx.get(server.base_url + "/api/models").json()["models"]}
    assert models["judge"]["loaded"] is False  # refused from its registry entry, never loaded
