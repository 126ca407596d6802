"""Structured output on the untuned bundled SmolLM2-135M-Instruct, through the openai client against a real
server: constrained decoding (backend/serving/structured.py) makes every sample valid, where the bare model
rarely writes the JSON asked for. 20 samples each (n=10 at two seeds, short answers)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.conftest import start_server

MODEL = "smollm2-135m-instruct"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"enum": ["Paris", "London", "Tokyo"]}},
    "required": ["name", "age", "city"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 16}}, "required": ["city"],
                                               "additionalProperties": False}}}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("structured") / "data", "--no-worker")
    yield openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    s.stop()


def samples(client, **kw):
    out = []
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, n=10, seed=seed, temperature=1.0, **kw)
        out += r.choices
    return out


def test_json_schema_output_validates_every_time(client):
    msgs = [{"role": "user", "content": "Invent a person: name, age and city."}]
    choices = samples(client, messages=msgs, max_tokens=40,
                      response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert len(choices) == 20
    for c in choices:
        jsonschema.validate(json.loads(c.message.content), PERSON)
        assert c.finish_reason == "stop"
    assert len({c.message.content for c in choices}) > 5  # still the model's own sampling
    bare = client.chat.completions.create(model=MODEL, n=10, seed=1, temperature=1.0, messages=msgs, max_tokens=40)
    assert sum(valid(c.message.content, PERSON) for c in bare.choices) < 5  # what the constraint fixes


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_tool_choice_required_always_gives_a_schema_valid_call(client):
    msgs = [{"role": "user", "content": "Is it raining in Paris?"}]
    choices = samples(client, messages=msgs, tools=TOOLS, tool_choice="required", max_tokens=48)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for c in choices:
        assert c.finish_reason == "tool_calls", c.message
        assert c.message.tool_calls  # parallel calls are allowed (the default): one or more, each valid
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
