"""Conversation messages as stored in SFT demos, and their flat chat form for export.

Stored (structured) message:
    {"role": "system" | "user" | "assistant" | "tool", "content": str,
     # assistant only, all optional:
     "thinking": str,                                   # reasoning shown before the answer
     "tool_calls": [{"tool": "search" | "python", "input": str, "output": str}],
     "model_draft": str,                                # what the model wrote, kept when a person edits it
     "origin": "human" | "model" | "model_edited"}      # set by the service, not trusted from clients

Flat (exported, TRL/`datasets` "messages" format): only role + content. Thinking becomes
`<think>...</think>` before the content; each tool call becomes an assistant turn
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` followed by a tool turn with its output.
"""
from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool")
TOOLS = {"search": "query", "python": "code"}
ASSISTANT_KEYS = {"role", "content", "thinking", "tool_calls", "model_draft", "origin"}
MAX_TEXT = 100_000


def _text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string")
    if len(value) > MAX_TEXT:
        raise ValueError(f"{where} is longer than {MAX_TEXT} characters")
    return value


def validate_messages(messages, complete: bool = True) -> list[dict]:
    """Check a conversation and return a clean copy with `origin` computed.

    complete=True (submit, import): at least one user turn and the last turn is the assistant's.
    """
    if not isinstance(messages, list):
        raise ValueError("messages must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}")
        allowed = ASSISTANT_KEYS if role == "assistant" else {"role", "content"}
        extra = set(m) - allowed
        if extra:
            raise ValueError(f"{where} has unknown field(s) {', '.join(sorted(extra))} for role {role}")
        if role == "system" and i != 0:
            raise ValueError(f"{where}: a system message may only come first")
        clean = {"role": role, "content": _text(m.get("content", ""), f"{where}.content")}
        if role == "assistant":
            if m.get("thinking"):
                clean["thinking"] = _text(m["thinking"], f"{where}.thinking")
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ValueError(f"{where}.tool_calls must be a list")
            clean_calls = []
            for j, c in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                if not isinstance(c, dict) or c.get("tool") not in TOOLS:
                    raise ValueError(f"{cw}.tool must be one of {', '.join(TOOLS)}")
                if set(c) - {"tool", "input", "output"}:
                    raise ValueError(f"{cw} has unknown fields; use tool, input, output")
                clean_calls.append({"tool": c["tool"], "input": _text(c.get("input", ""), f"{cw}.input"),
                                    "output": _text(c.get("output", ""), f"{cw}.output")})
            if clean_calls:
                clean["tool_calls"] = clean_calls
            if "model_draft" in m and m["model_draft"] is not None:
                clean["model_draft"] = _text(m["model_draft"], f"{where}.model_draft")
                clean["origin"] = "model" if clean["content"] == clean["model_draft"] else "model_edited"
            else:
                clean["origin"] = "human"
        out.append(clean)
    if complete:
        if not any(m["role"] == "user" for m in out):
            raise ValueError("messages need at least one user turn")
        if out[-1]["role"] != "assistant" or not (out[-1]["content"].strip() or out[-1].get("tool_calls")):
            raise ValueError("missing: the assistant's reply (the last turn is empty); write it, or Draft with model "
                             "and edit, then submit")
    return out


def flatten(messages: list[dict]) -> list[dict]:
    """Structured messages -> plain role/content chat messages (what trainers read)."""
    flat = []
    for m in messages:
        if m["role"] != "assistant":
            flat.append({"role": m["role"], "content": m["content"]})
            continue
        prefix = f"<think>\n{m['thinking']}\n</think>\n" if m.get("thinking") else ""
        for c in m.get("tool_calls", []):
            call = json.dumps({"name": c["tool"], "arguments": {TOOLS[c["tool"]]: c["input"]}}, ensure_ascii=False)
            flat.append({"role": "assistant", "content": f"{prefix}<tool_call>{call}</tool_call>"})
            flat.append({"role": "tool", "content": c["output"]})
            prefix = ""
        flat.append({"role": "assistant", "content": prefix + m["content"]})
    return flat
