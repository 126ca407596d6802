"""Client-side function calling (OpenAI `tools`) on the one chat format of models/chat_format.py.

The client defines functions with JSON schemas; they are listed in the system turn (tools_prompt) and
the model calls one the way it calls the built-in tools, inside its assistant turn:

    <|im_start|>assistant\\n{text}<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

Sampling stops at </tool_call>; the call comes back as `message.tool_calls` (finish_reason "tool_calls")
and the client runs it. Its `role: "tool"` answer is rendered as <tool_output>…</tool_output> in the
same assistant turn, which stays open, so the model goes on writing right after the output, exactly as
after a built-in tool (a model tuned here learns one protocol). An assistant message that follows the
tool answers (the model's reply after the call) is part of that same turn.

tool_choice: "none" (functions not shown, nothing parsed), "auto" (free text; once the model opens a
<tool_call> the call is held to the schemas), "required" / a named function (the prompt ends with the
opening tag and the call is constrained: it always parses and validates). See backend/serving/structured.py.
Parallel calls (parallel_tool_calls, OpenAI's default): the model writes its calls back to back,
<tool_call>…</tool_call><tool_call>…</tool_call>, and the answer ends after the last one; each valid
call is one entry of `message.tool_calls` (streamed with its own `index`). The client's tool messages
are rendered after all the calls, in the calls' order (models/chat_format.py). parallel_tool_calls
false (and a named tool_choice): one call per answer, the turn stops at the first closing tag.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from backend.tool_loop import TagSplitter
from models.chat_format import TOOL_ARG, TOOL_CALL, call_json, function_call_json


class MessageError(ValueError):
    """A conversation that cannot be rendered; `param` names the field (e.g. messages[2].tool_calls)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _arguments(text: str, where: str) -> dict:
    try:
        args = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise MessageError(f"{where}.function.arguments is not valid JSON ({e.msg})", where) from None
    if not isinstance(args, dict):
        raise MessageError(f"{where}.function.arguments must be a JSON object", where)
    return args


def _builtin_steps(m: dict, i: int) -> list[tuple[str, str]]:
    """An assistant message sent back with the built-in tool loop's `tool_steps` -> call/output segments."""
    steps = m.get("tool_steps") or []
    segs = []
    for s in steps:
        if not isinstance(s, dict) or s.get("tool") not in TOOL_ARG or not isinstance(s.get("input", ""), str) \
                or not isinstance(s.get("output", ""), str):
            raise MessageError(f"messages[{i}].tool_steps must be a list of {{tool, input, output}}",
                               f"messages[{i}].tool_steps")
        segs += [("call", call_json(s["tool"], s.get("input", ""))), ("output", s.get("output", ""))]
    return segs


def to_chat_messages(raw: list[dict]) -> tuple[list[dict], bool]:
    """OpenAI chat messages -> models.chat_format messages, and whether the last assistant turn stays open
    (it ends with tool outputs the model has not answered yet).

    An assistant message, the tool messages answering its calls and the assistant message after them
    become one assistant turn of segments: text, call, output, ..., text."""
    out: list[dict] = []
    open_turn = False
    i = 0
    while i < len(raw):
        m = raw[i]
        role = "system" if m["role"] == "developer" else m["role"]
        if role != "assistant":
            out.append({"role": role, "content": m.get("content") or ""})
            i += 1
            continue
        segs: list[tuple[str, str]] = []
        if m.get("reasoning_content"):
            segs.append(("think", m["reasoning_content"]))
        segs += _builtin_steps(m, i)
        ends_with_output = False
        while True:  # this assistant message, the answers to its calls, and the assistant reply after them
            if m.get("content"):
                segs.append(("text", m["content"]))
                ends_with_output = False
            calls = m.get("tool_calls") or []
            answers = {}
            j = i + 1
            while j < len(raw) and raw[j]["role"] == "tool":
                answers[raw[j].get("tool_call_id") or f"#{len(answers)}"] = raw[j].get("content") or ""
                j += 1
            outputs = []
            for k, c in enumerate(calls):  # all the calls, then their outputs in the same order
                where = f"messages[{i}].tool_calls[{k}]"
                segs.append(("call", function_call_json(c["function"]["name"], _arguments(c["function"]["arguments"], where))))
                output = answers.get(c["id"], answers.get(f"#{k}"))
                if output is None and (j < len(raw) or answers):
                    raise MessageError(f"{where} (id {c['id']!r}) has no tool message answering it",
                                       f"messages[{i}].tool_calls")
                outputs.append(output)
            if calls and outputs[0] is not None:  # else the last message: the calls wait for their answers
                segs += [("output", o) for o in outputs]
                ends_with_output = True
            if calls and j < len(raw) and raw[j]["role"] == "assistant":
                i, m = j, raw[j]
                continue
            i = j if calls else i + 1
            break
        out.append({"role": "assistant", "content": "", "segments": [[k, t] for k, t in segs]})
        open_turn = ends_with_output and i >= len(raw)
    return out, open_turn


# -- reading the model's call -------------------------------------------------------------------------
_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def split_call(text: str, names: list[str]) -> tuple[str, str] | None:
    """The JSON between the call tags -> (function name, arguments as JSON text), or None when it is not a
    call of one of `names`. The arguments are the model's own text (the slice after "arguments":), so a
    stream of argument deltas adds up to exactly this string."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names or not isinstance(obj.get("arguments"), dict):
        return None
    m = _NAME.match(text)
    if m is None:  # another key order: re-serialise
        return obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)
    return obj["name"], text[m.end():].rstrip()[:-1].rstrip()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedAnswer:
    content: str | None
    reasoning: str | None
    tool_calls: list[dict] = field(default_factory=list)


def read_calls(split: TagSplitter, text: str, final: bool = False) -> list[tuple[str, str]]:
    """split.feed that reads on past each closed call (TagSplitter pauses there for the built-in tool
    loop's output); returns the pieces and leaves `split.pending_call` set only for the last call, so
    segments keep one "call" segment per call."""
    out = split.feed(text, final=final)
    while split.pending_call and split.buf:
        split.pending_call = False
        out += split.feed("", final=final)
    return out


def parse_answer(text: str, names: list[str], forced: bool, max_calls: int | None = None) -> ParsedAnswer:
    """A whole generated answer -> content, thinking and its calls (those that are valid calls of `names`,
    at most `max_calls`). `forced`: the prompt ended with the opening tag, so the text starts inside a call."""
    split = TagSplitter()
    read_calls(split, (TOOL_CALL if forced else "") + text, final=True)
    if split.mode == "call":
        split.close_call()  # the engine cut the closing tag
    content, thinking, calls = "", "", []
    for kind, t in split.segments:
        room = max_calls is None or len(calls) < max_calls
        if kind == "call" and room and (found := split_call(t, names)) is not None:
            calls.append({"id": new_call_id(), "type": "function",
                          "function": {"name": found[0], "arguments": found[1]}})
        elif kind == "call":
            content += TOOL_CALL + t
        elif kind == "think":
            thinking += t
        elif kind == "text":
            content += t
    return ParsedAnswer(content if content.strip() or not calls else None, thinking or None, calls)


class CallStream:
    """Streamed answer text -> OpenAI deltas: {"content"}, {"reasoning_content"} and {"tool_calls": [...]}.
    Each call has its own `index` (0, 1, ... in the order written); its first delta carries the id and
    the function's name, the next ones pieces of its arguments.

    An argument piece is released only when it surely belongs to the arguments: trailing "}" and spaces
    may be the end of the call object and wait for what follows."""

    def __init__(self, names: list[str], forced: bool, max_calls: int | None = None):
        self.names, self.max_calls = names, max_calls
        self.split = TagSplitter()
        self.sent = 0      # calls whose first delta went out (the next call's index)
        self.calls = 0     # complete, valid calls
        self._next_call()
        self.pending = TOOL_CALL if forced else ""

    def _next_call(self) -> None:
        self.call_text, self.header_sent, self.args_sent, self.call_id = "", False, "", new_call_id()

    def _arg_deltas(self, final: bool) -> list[dict]:
        out = []
        m = _NAME.match(self.call_text)
        if m is None or json.loads(f'"{m.group(1)}"') not in self.names:
            return out
        if not self.header_sent:
            if self.max_calls is not None and self.sent >= self.max_calls:
                return out
            self.header_sent, self.index = True, self.sent
            self.sent += 1
            out.append({"tool_calls": [{"index": self.index, "id": self.call_id, "type": "function",
                                        "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""}}]})
        if final:
            found = split_call(self.call_text, self.names)
            body = found[1] if found else self.call_text[m.end():]
        else:
            body = self.call_text[m.end():].rstrip("} \n\t\r")
        if body.startswith(self.args_sent) and len(body) > len(self.args_sent):
            out.append({"tool_calls": [{"index": self.index, "function": {"arguments": body[len(self.args_sent):]}}]})
            self.args_sent = body
        return out

    def _close_call(self) -> list[dict]:
        """The call being written is complete: its last argument piece, or its text as content when it is
        no valid call (or one past max_calls); the next call starts afresh."""
        out = []
        room = self.header_sent or self.max_calls is None or self.sent < self.max_calls
        if room and split_call(self.call_text, self.names) is not None:
            self.calls += 1
            out = self._arg_deltas(final=True)
        elif not self.header_sent:  # not a valid call: it was text after all
            out = [{"content": TOOL_CALL + self.call_text}]
        self.split.pending_call = False
        self._next_call()
        return out

    def feed(self, text: str, final: bool = False) -> list[dict]:
        text, self.pending = self.pending + text, ""
        out = []
        while True:
            for kind, t in self.split.feed(text, final=final):
                if kind == "call":
                    self.call_text += t
                    out += self._arg_deltas(final=False)
                elif kind == "think":
                    out.append({"reasoning_content": t})
                elif t:
                    out.append({"content": t})
            text = ""
            if not self.split.pending_call:
                break
            out += self._close_call()  # its closing tag came in the text: parallel calls go on after it
        if final and self.split.mode == "call":
            self.split.close_call()  # the engine cut the closing tag (or max_tokens cut the call)
            out += self._close_call()
        return out

    @property
    def called(self) -> bool:
        return self.calls > 0
