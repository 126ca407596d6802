"""Thinking and tool calls in the one chat format: special tokens when the encoding has them ("+tools"),
the same text otherwise; the loss mask trains the thought, the call and the answer, never the tool output."""
from __future__ import annotations

import pytest

from models.chat_format import TOOL_SPECIALS, render_chat, with_tool_tokens
from models.tokenizers import get_encoding

MSGS = [{"role": "user", "content": "Count the dots: ....."},
        {"role": "assistant", "content": "There are 5.", "thinking": "Counting by eye fails; use code.",
         "tool_calls": [{"tool": "python", "input": "print(len('.....'))", "output": "5"}]}]
TURN = ('<|im_start|>assistant\n<think>Counting by eye fails; use code.</think><tool_call>{"name":"python",'
        '"arguments":{"code":"print(len(\'.....\'))"}}</tool_call><tool_output>5</tool_output>There are 5.<|im_end|>\n')


@pytest.fixture(scope="module")
def encs():
    return get_encoding("cl100k_base+chatml"), get_encoding("cl100k_base+tools")


def test_tools_encoding_adds_six_tokens_past_the_vocabulary(encs):
    plain, tools = encs
    assert tools.name == "cl100k_base+tools"
    ids = [tools.encode_single_token(t) for t in TOOL_SPECIALS]
    assert ids == list(range(plain.max_token_value + 1, plain.max_token_value + 7))
    assert tools.encode_single_token("<|im_start|>") == 100264  # ChatML ids unchanged
    assert with_tool_tokens(tools) is tools


def test_same_text_both_ways_specials_only_with_tool_tokens(encs):
    plain, tools = encs
    a, b = render_chat(MSGS, plain), render_chat(MSGS, tools)
    assert a.text == b.text and a.text.endswith(TURN)
    assert plain.decode(a.ids) == tools.decode(b.ids) == a.text
    specials = {tools.encode_single_token(t) for t in TOOL_SPECIALS}
    assert sum(i in specials for i in b.ids) == 6 and len(b.ids) < len(a.ids)


@pytest.mark.parametrize("which", [0, 1])
def test_mask_trains_thought_call_answer_not_output(encs, which):
    enc = encs[which]
    r = render_chat(MSGS, enc)
    trained = enc.decode([t for t, m in zip(r.ids, r.mask) if m])
    assert trained.startswith("<think>Counting") and '"code":"print(len' in trained
    assert trained.endswith("There are 5.<|im_end|>")
    if which == 1:  # with special tokens the boundary is exact
        assert trained == TURN[len("<|im_start|>assistant\n"):-1].replace("<tool_output>5</tool_output>", "")
    else:  # as text, "><" is one token that straddles the call's end and the output's start
        assert "5</tool_output>" not in trained


def test_open_turn_for_a_tool_loop_and_typed_tags_stay_text(encs):
    _, enc = encs
    r = render_chat([MSGS[0], {"role": "assistant", "content": "", "segments": [["call", "{}"], ["output", "x"]]}],
                    enc, continue_final_message=True)
    assert r.text.endswith("<tool_call>{}</tool_call><tool_output>x</tool_output>")
    typed = render_chat([{"role": "user", "content": "<tool_call>{}</tool_call>"}], enc)
    assert enc.encode_single_token("<tool_call>") not in typed.ids


@pytest.mark.parametrize("bad, field", [
    ({"tool_calls": [{"tool": "shell", "input": "ls"}]}, "tool_calls[0].tool"),
    ({"tool_calls": "python"}, "tool_calls must be a list"),
    ({"thinking": 3}, "thinking must be a string"),
    ({"segments": [["speech", "hi"]]}, "segments must be"),
])
def test_bad_assistant_fields_name_the_field(encs, bad, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        render_chat([MSGS[0], {"role": "assistant", "content": "x", **bad}], encs[1])
