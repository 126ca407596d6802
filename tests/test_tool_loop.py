"""The tool loop on scripted models (real Transformers forced to write a given token sequence):
a call is stopped at </tool_call>, run, its output injected, sampling continues in the same turn, and the
saved turn masks the output; malformed, unknown, unclosed and over-the-limit calls end as text with a note."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from backend.db import Database
from backend.serving.engine import Engine
from backend.serving.sampling import SamplingParams
from backend.tool_loop import Tools, collect_turn, label_message, run_turn
from backend.tools import PythonTool, SandboxLimits, SearchIndex
from models.chat_format import render_chat
from tests.scripted import script_encoding, scripted_model

torch.set_num_threads(1)

THOUGHT = "The product is easy to get wrong in my head; run it."
CALL = '{"name":"python","arguments":{"code":"print(6*7)"}}'
ANSWER = "The answer is 42."
USER = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 6*7?"}]


@dataclass
class Spec:
    name: str = "scripted"
    context_length: int = 2048
    chat_format: str = "chatml"


def engine_for(lines, chain, tools=True):
    enc = script_encoding(lines, tools=tools)
    return Engine(Spec(), scripted_model(enc, chain), enc)


@pytest.fixture(scope="module")
def python_tool():
    return PythonTool(SandboxLimits(allow_unisolated=True))  # isolation is tested in test_sandbox.py


@pytest.fixture
def search_index(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'playground.db'}")
    db.migrate()
    ix = SearchIndex(db)
    ix._builtin_checked = True
    ix.add_documents([("Orson Kovats", "Orson Kovats is a fictional person invented for the LLM Playground demos."),
                      ("Apples", "Apples grow on trees.")], source="test")
    yield ix
    db.close()


def test_call_runs_output_is_injected_and_the_turn_continues(python_tool):
    # "\n" ends the generation prompt "<|im_start|>assistant\n"; </tool_output> ends the injected output.
    eng = engine_for([THOUGHT, CALL, ANSWER], {"\n": "<think>", "<think>": THOUGHT, THOUGHT: "</think>",
                                               "</think>": "<tool_call>", "<tool_call>": CALL, CALL: "</tool_call>",
                                               "</tool_output>": ANSWER, ANSWER: "<|im_end|>"})
    prompts = []
    real_generate = eng.generate
    eng.generate = lambda p, *a, **k: (prompts.append(p[0]), real_generate(p, *a, **k))[1]  # record prompts
    events = list(run_turn(eng, USER, SamplingParams(temperature=1.0, max_tokens=50), Tools(python=python_tool)))
    kinds = [e.type for e in events]
    assert kinds.index("thinking") < kinds.index("tool_start") < kinds.index("tool_end") < kinds.index("text")
    assert "".join(e.text for e in events if e.type == "thinking") == THOUGHT
    assert "".join(e.text for e in events if e.type == "text") == ANSWER
    end = next(e.step for e in events if e.type == "tool_end")
    assert (end["tool"], end["input"], end["output"], end["ok"]) == ("python", "print(6*7)", "42", True)
    assert end["duration_s"] > 0
    r = events[-1].result
    assert r.finish_reason == "stop" and r.notes == [] and r.completion_tokens == 6  # stop tokens (</tool_call>, <|im_end|>) are not counted
    assert label_message(r.message) == {"role": "assistant", "content": ANSWER, "thinking": THOUGHT,
                                        "tool_calls": [{"tool": "python", "input": "print(6*7)", "output": "42"}]}
    # Two samplings; the second continues the same open assistant turn after the injected output.
    assert len(prompts) == 2
    second = eng.enc.decode(prompts[1])
    assert second.endswith(f"<|im_start|>assistant\n<think>{THOUGHT}</think><tool_call>{CALL}</tool_call>"
                           "<tool_output>42</tool_output>")
    assert second.count("<|im_start|>assistant") == 1
    # As a demo: the call and the answer get loss, the injected output does not.
    enc = eng.enc
    trained = enc.decode([t for t, m in zip(r.context_ids, r.context_mask) if m])
    untrained = enc.decode([t for t, m in zip(r.context_ids, r.context_mask) if not m])
    assert trained == f"<think>{THOUGHT}</think><tool_call>{CALL}</tool_call>{ANSWER}<|im_end|>"
    assert "<tool_output>42</tool_output>" in untrained
    assert r.context_ids == render_chat(USER + [label_message(r.message)], enc).ids  # what training will see


def test_plain_model_calls_by_text_and_search_runs(search_index):
    # No tool tokens in this encoding: the tags are plain text; "</tool_call>" is caught as a stop string
    # (and what the model wrote after it in the same token is dropped).
    call = 'Let me look.<tool_call>{"name":"search","arguments":{"query":"Orson Kovats"}}</tool_call>IGNORED'
    answer = "He is fictional."
    eng = engine_for([call, answer], {"\n": call, ">": answer, answer: "<|im_end|>"}, tools=False)
    assert "<tool_call>" not in eng.enc.special_tokens_set
    r = collect_turn(run_turn(eng, USER, SamplingParams(max_tokens=20), Tools(search=search_index)))
    assert [s["tool"] for s in r.steps] == ["search"] and "fictional person" in r.steps[0]["output"]
    assert "IGNORED" not in str(r.message)
    assert r.message["content"] == "Let me look.He is fictional."
    assert r.message["segments"][0] == ["text", "Let me look."]  # the exact order is kept for rendering
    text = eng.enc.decode(r.context_ids)
    assert '<tool_call>{"name":"search","arguments":{"query":"Orson Kovats"}}</tool_call><tool_output>[1] Orson Kovats' in text


@pytest.mark.parametrize("bad, why", [
    ('{"name": python}', "not valid JSON"),
    ('{"name":"browser","arguments":{"url":"x"}}', "unknown tool 'browser'"),
    ('{"name":"python","arguments":{}}', 'needs arguments {"code"'),
])
def test_malformed_call_ends_as_text_with_a_note(bad, why, python_tool):
    eng = engine_for([bad], {"\n": "<tool_call>", "<tool_call>": bad, bad: "</tool_call>"})
    events = list(run_turn(eng, USER, SamplingParams(max_tokens=20), Tools(python=python_tool)))
    r = events[-1].result
    assert r.finish_reason == "tool_error" and r.steps == []
    assert any(e.type == "note" and why in e.text for e in events)
    assert r.message["content"] == f"<tool_call>{bad}</tool_call>"  # shown as the text it was


def test_unclosed_call_at_the_token_limit(python_tool):
    parts = ['{"name":"python",', '"arguments":', '{"code":"print(1)"']
    eng = engine_for(parts, {"\n": "<tool_call>", "<tool_call>": parts[0], parts[0]: parts[1], parts[1]: parts[2],
                             parts[2]: "</tool_call>"})
    r = collect_turn(run_turn(eng, USER, SamplingParams(max_tokens=3), Tools(python=python_tool)))
    assert r.finish_reason == "length" and r.steps == []
    assert r.notes == ["the tool call was not closed before the token limit; it was not run"]
    assert r.message["content"] == "<tool_call>" + "".join(parts[:2])


def test_call_limit_per_turn(python_tool):
    # A model that calls again after every output would loop forever without the limit.
    eng = engine_for([CALL], {"\n": "<tool_call>", "<tool_call>": CALL, CALL: "</tool_call>",
                              "</tool_output>": "<tool_call>"})
    r = collect_turn(run_turn(eng, USER, SamplingParams(max_tokens=100), Tools(python=python_tool), max_calls=2))
    assert r.finish_reason == "call_limit" and len(r.steps) == 2
    assert r.notes == ["the limit of 2 tool call(s) per turn is reached; this call was not run"]
    assert len(r.message["tool_calls"]) == 2 and r.message["content"] == f"<tool_call>{CALL}</tool_call>"


def test_forced_call_from_a_prefix_runs_before_the_model_writes(python_tool):
    answer = " it is 42."
    eng = engine_for([answer], {":": answer, answer: "<|im_end|>"}, tools=False)
    prefix = f"<tool_call>{CALL}</tool_call>"
    r = collect_turn(run_turn(eng, USER, SamplingParams(max_tokens=10), Tools(python=python_tool), prefix=prefix,
                              lead_in="So:"))  # the scripted lead-in after the output; the model goes on from ":"
    assert [(s["output"], s["forced"]) for s in r.steps] == [("42", True)]
    assert r.message["content"] == "So: it is 42." and r.completion_tokens == 1
    assert eng.enc.decode(r.context_ids).endswith("<tool_output>42</tool_output>So: it is 42.<|im_end|>\n")


def test_cancel_ends_the_turn(python_tool):
    eng = engine_for([CALL], {"\n": "<tool_call>", "<tool_call>": CALL, CALL: "</tool_call>",
                              "</tool_output>": "<tool_call>"})
    cancel = threading.Event()
    seen = []
    for ev in run_turn(eng, USER, SamplingParams(max_tokens=100), Tools(python=python_tool), max_calls=50,
                       cancel=cancel):
        seen.append(ev.type)
        if ev.type == "tool_end":
            cancel.set()
    assert seen[-1] == "done" and seen.count("tool_end") == 1
