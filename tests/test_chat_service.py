"""The Chat tab's services: the demo presets are well-formed (their forced calls parse and name real tools),
code blocks are found for "run as tool call", and a chat with thinking and tool calls goes to the labeling
store as an editable SFT draft that renders with the tool output masked."""
from __future__ import annotations

import pytest

from backend import chat_service as cs
from backend.db import Database
from backend.labels import sft
from backend.tool_loop import TagSplitter, parse_call
from backend.users import add_user
from models.chat_format import TOOL_ARG, render_chat
from models.tokenizers import get_encoding


def test_the_think_preset_is_the_prompt_the_thinkers_were_trained_under():
    """family-think thinks in <think> blocks under the system prompt of its SFT rows and its GRPO prompts (measured:
    with SmolLM2's default prompt it answers without them); Chat offers that prompt as a preset."""
    from backend.train.sft import reasoning_rows
    assert cs.SYSTEM_PRESETS["Think (R1-Zero's template)"] == reasoning_rows(1, seed=0)[0]["messages"][0]["content"]


@pytest.mark.parametrize("demo", cs.DEMOS, ids=lambda d: d.title)
def test_presets_are_well_formed(demo):
    assert demo.system in cs.SYSTEM_PRESETS and demo.note and demo.user
    assert set(demo.tools) <= set(TOOL_ARG)
    if "<tool_call>" in demo.prefix:  # a forced call: complete, valid, and for a tool the preset enables
        split = TagSplitter()
        split.feed(demo.prefix, final=True)
        assert split.pending_call
        tool, _ = parse_call(split.call_text(), demo.tools)
        assert "forced" in demo.title and "SmolLM2-135M was never fine-tuned to call tools" in demo.note
        assert demo.lead_in or "no scripted lead-in" in demo.note  # scripted text never claims what a tool did not say


def test_forced_calls_compute_the_right_answers():
    import contextlib
    import io
    outputs = []
    for d in cs.DEMOS:
        if "python" in d.tools and d.prefix.startswith("<tool_call>"):
            split = TagSplitter()
            split.feed(d.prefix, final=True)
            _, code = parse_call(split.call_text(), ["python"])
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(code, {})  # our own preset code, not model-written
            outputs.append(buf.getvalue().strip())
    assert sorted(outputs) == ["177", "3.0", "uqts"]


def test_last_code_block():
    assert cs.last_code_block("Try:\n```python\nprint(1)\n```\nor\n```\nprint(2)\n```") == "print(2)"
    assert cs.last_code_block("no code here") is None


def test_chat_with_tools_becomes_an_sft_draft(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    db.migrate()
    user, _, _ = add_user(db, "ann", "annotator")

    class PG:  # the two attributes send_demo uses
        pass
    pg = PG()
    pg.db = db
    turn = {"role": "assistant", "content": "There are 177.", "thinking": "Count with code.",
            "tool_calls": [{"tool": "python", "input": "print(177)", "output": "177"}],
            "segments": [["think", "Count with code."], ["call", '{"name":"python","arguments":{"code":"print(177)"}}'],
                         ["output", "177"], ["text", "There are 177."]],
            "_view": [{"kind": "text", "text": "There are 177."}]}
    conv = [{"role": "user", "content": "How many dots?"}, turn]
    saved = cs.send_demo(pg, user, "Use tools.", conv)
    assert saved["status"] == "draft"
    stored = sft.get(db, user, saved["demo_id"])["messages"]
    assert stored[0] == {"role": "system", "content": "Use tools."}
    assert stored[2]["tool_calls"] == turn["tool_calls"] and stored[2]["thinking"] == "Count with code."
    enc = get_encoding("cl100k_base+tools")
    r = render_chat([{k: v for k, v in m.items() if k != "origin"} for m in stored], enc)
    assert r.ids == render_chat(cs.full_messages("Use tools.", conv), enc).ids  # the same tokens as in the chat
    db.close()
