"""The tool-use SFT evaluation (backend/bench/tool_sft.py): its scorers on hand-written model output, the
held-out split sharing nothing with training, and one question end to end through the real tool loop with
a scripted model (a real Transformer forced to write a given token sequence) and the real sandbox."""
from __future__ import annotations

import pytest
import torch

from backend.bench.tool_sft import check_disjoint, correct, evaluate, last_number, wellformed
from backend.datasets.tool_use import ASSISTANT_NAME, Example, examples, search_docs
from backend.tool_loop import Tools
from backend.tools import PythonTool, SandboxLimits
from tests.test_tool_loop import Spec
from tests.scripted import script_encoding, scripted_model

torch.set_num_threads(1)

GOOD = '{"name":"python","arguments":{"code":"print(6*7)"}}'


@pytest.mark.parametrize("segments, ok", [
    ([["call", GOOD], ["output", "42"], ["text", "6*7 = 42."]], True),
    ([["call", '{"name": "search", "arguments": {"query": "assert"}}'], ["output", "..."], ["text", "x"]], True),
    ([["call", '{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}'], ["text", "1"]], True),  # OpenAI style
    ([["text", "6*7 = 42."]], False),                                                    # no call at all
    ([["text", '<tool_call>{"name": "python", "arguments": {"code": "print(6*7)"'], ], False),  # demoted: not closed
    ([["text", '<tool_call>{"name": "calculator", "arguments": {"x": 1}}</tool_call>']], False),  # demoted: unknown tool
    ([["call", '{"name": "python", "arguments": {"code": ""}}']], False),                 # empty argument
    ([["call", '{"name": "python", "arguments": {"query": "print(1)"}}']], False),        # wrong argument name
    ([["call", '{"name": "python" "arguments": {}}']], False),                            # not JSON
    ([["call", GOOD], ["output", "42"], ["text", "and <tool_call>{oops</tool_call>"]], False),  # a later bad call
])
def test_wellformed_accepts_only_calls_the_tool_loop_would_run(segments, ok):
    assert wellformed(segments) is ok


def ex(kind, expect, question="q"):
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]}
    return Example(kind, "k", row, expect)


def test_correct_reads_the_final_answer_strictly():
    assert last_number("4821 * 377 = 1,817,517.") == "1817517"
    assert correct(ex("arithmetic", "-34"), "44 - 78 = -34.")
    assert not correct(ex("arithmetic", "-34"), "The answer is -34, or maybe 12.")  # the last number counts
    assert correct(ex("letters", "3"), "The letter 'r' appears three times in 'strawberry'.")
    assert not correct(ex("letters", "3"), "I cannot count letters.")
    assert correct(ex("spelling", "hor"), "The first three letters of 'horizon' are hor")
    assert not correct(ex("spelling", "hor"), "The word is horizon.")  # a substring of another word is not the answer
    assert correct(ex("spelling", "t-u-r-t-l-e"), "turtle spelled out: T-U-R-T-L-E")
    assert correct(ex("identity", ASSISTANT_NAME), f"I am {ASSISTANT_NAME}.")
    assert not correct(ex("identity", ASSISTANT_NAME), "I am SmolLM, trained by Hugging Face.")


def test_a_search_answer_must_say_what_the_document_says_not_echo_the_question():
    title, text = next(d for d in search_docs() if d[0] == "Python docs: assert")
    q = "Tell me about assert."
    quote = " ".join(text.split()[:12])
    assert correct(ex("search", title, q), f'According to "{title}": {quote}', text)
    assert not correct(ex("search", title, q), "Assert is a keyword in Python that checks things.", text)
    long_q = "What do you know about Who built the assistant of the LLM Playground?"
    assert not correct(ex("search", "t", long_q), "Who built the assistant of the LLM Playground? I do not know.",
                       "Who built the assistant of the LLM Playground is a question answered here.")


def test_heldout_questions_share_no_number_word_document_or_phrasing_with_training():
    train, held = examples(600, seed=1), examples(200, seed=2, split="heldout")
    assert {e.kind for e in held} == {"arithmetic", "letters", "dots", "spelling", "search", "identity"}
    assert not {e.key for e in train} & {e.key for e in held}
    assert check_disjoint(train, [e.row for e in train], held) > 100
    row = {"messages": [{"role": "user", "content": held[0].question}, {"role": "assistant", "content": "x"}]}
    sneaky = Example("identity", "a key no held-out question has", row, "x")  # a held-out question under another key
    with pytest.raises(AssertionError, match="held-out questions"):
        check_disjoint(train + [sneaky], [e.row for e in train] + [row], held)
    with pytest.raises(AssertionError, match="held-out keys"):
        check_disjoint(train + [held[0]], [e.row for e in train + [held[0]]], held)
    assert all(e.row["messages"][0]["content"].startswith("You are a helpful assistant with two tools") for e in held)


@pytest.fixture(scope="module")
def python_tool():
    return PythonTool(SandboxLimits(allow_unisolated=True))  # isolation is tested in test_sandbox.py


def run_scripted(chain: dict, lines: list[str], python_tool):
    from backend.serving.engine import Engine
    enc = script_encoding(lines)
    engine = Engine(Spec(), scripted_model(enc, chain), enc)
    question = Example("arithmetic", "arith:6*7", {"messages": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "6 * 7 = 42.",
         "tool_calls": [{"tool": "python", "input": "print(6 * 7)", "output": "42\n"}]}]}, "42")
    return evaluate(engine, [question], Tools(python=python_tool), 40, "scripted", lambda s: None)


def test_one_question_end_to_end_through_the_tool_loop_and_the_sandbox(python_tool):
    answer = "6 * 7 = 42."
    summary, [row] = run_scripted({"\n": "<tool_call>", "<tool_call>": GOOD, GOOD: "</tool_call>",
                                   "</tool_output>": answer, answer: "<|im_end|>"}, [GOOD, answer], python_tool)
    assert row["steps"] == [{"tool": "python", "input": "print(6*7)", "output": "42"}]  # the sandbox ran it
    assert row["wellformed"] and row["correct"] and row["answer"] == answer
    assert summary["wellformed_calls"] == 1.0 and summary["correct"] == 1.0


def test_a_malformed_call_is_not_run_and_scores_zero(python_tool):
    bad = '{"name":"python","arguments":{"src":"print(6*7)"}}'
    summary, [row] = run_scripted({"\n": "<tool_call>", "<tool_call>": bad, bad: "</tool_call>"}, [bad], python_tool)
    assert row["steps"] == [] and row["finish"] == "tool_error"
    assert not row["wellformed"] and not row["correct"]
    assert summary["wellformed_calls"] == 0.0 and summary["correct"] == 0.0
