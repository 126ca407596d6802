"""Tool calls and thinking inside one assistant turn, on top of Engine.generate (the engine is not changed).

    tools = Tools.from_playground(pg)                       # search + python
    for ev in run_turn(engine, messages, SamplingParams(max_tokens=300), tools):
        ev.type: "text" | "thinking" | "call" (the call's JSON as it is written) | "tool_start" | "tool_end"
                 | "note" (something went wrong, shown to the user) | "done" (ev.result: TurnResult)

How a turn runs (the mechanism of DEMOS 11):
1. The conversation is rendered with the generation prompt (models.chat_format.render_chat) and sampled.
2. The text is split as it streams: <think>…</think> is thinking, <tool_call>…</tool_call> is a call,
   the rest is the answer. Sampling stops at the closing </tool_call>: the special token when the
   encoding has the tool tokens (a "<base>+tools" model), and in any case the plain string
   "</tool_call>" as a stop string, so a plain model that is only *prompted* to call tools works too.
3. The call's JSON {"name": "python"|"search", "arguments": {"code"|"query": "..."}} is parsed and the
   tool runs (outside the engine's single-flight slot, so other requests decode meanwhile).
4. The assistant turn so far plus <tool_output>…</tool_output> is rendered again, left open
   (render_chat(continue_final_message=True)), and sampling continues in the same turn. The output
   tokens carry loss mask 0 when the turn is saved as a demo.
5. A malformed call (bad JSON, unknown tool, a call left open at the token limit) or one past the
   per-turn limit is not run: the turn ends there, the call stays as plain text, and a "note" event
   says why. Nothing raises for what the model writes; cancelling ends the turn at the next token.
`max_tokens` is the budget of generated tokens for the whole turn, all segments together.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

from backend.serving.sampling import SamplingParams
from models.chat_format import (END_THINK, END_TOOL_CALL, THINK, TOOL_ARG, TOOL_CALL, Piece, encode_pieces,
                                has_tool_tokens, render_chat)

MAX_CALLS = 4
MAX_OUTPUT_CHARS = 2000


# -- tools ------------------------------------------------------------------------------------------
class Tools:
    """The tools a turn may call. `python` has .run(code) -> SandboxResult (backend.tools.PythonTool);
    `search` has .search_tool(query, k) -> {"results", "source", "note"} (backend.tools.SearchIndex)."""

    def __init__(self, python=None, search=None, k: int = 3, max_output_chars: int = MAX_OUTPUT_CHARS):
        self.python, self.search, self.k, self.max_output_chars = python, search, k, max_output_chars

    @classmethod
    def from_playground(cls, pg, enabled=("search", "python")) -> "Tools":
        unknown = [t for t in enabled if t not in TOOL_ARG]
        if unknown:
            raise ValueError(f"unknown tool(s) {', '.join(unknown)}; built-in tools: {', '.join(TOOL_ARG)}")
        return cls(python=pg.sandbox if "python" in enabled else None,
                   search=pg.search if "search" in enabled else None)

    def names(self) -> list[str]:
        return [n for n in TOOL_ARG if getattr(self, n) is not None]

    def run(self, tool: str, arg: str) -> tuple[str, bool]:
        """(output text the model reads, ok). Tool failures become output text, never exceptions."""
        try:
            if tool == "python":
                r = self.python.run(arg)
                text, ok = r.as_text(), r.ok
            else:
                from backend.tools import format_results
                found = self.search.search_tool(arg, self.k)
                text = format_results(found["results"])
                if found.get("note"):
                    text = f"({found['note']})\n{text}"
                ok = True
        except Exception as e:  # noqa: BLE001 - busy sandbox, bad query, unreachable web: the model reads it
            text, ok = f"[{tool} failed: {e}]", False
        if len(text) > self.max_output_chars:
            text = text[: self.max_output_chars] + f"\n[output cut to {self.max_output_chars} characters]"
        return text, ok


class ToolCallError(ValueError):
    pass


def parse_call(text: str, available: list[str]) -> tuple[str, str]:
    """The JSON between the call tags -> (tool, argument). ToolCallError says what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"the tool call is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ToolCallError('the tool call must be {"name": ..., "arguments": {...}}')
    name = obj["name"]
    if name not in available:
        raise ToolCallError(f"unknown tool {name!r} (available: {', '.join(available) or 'none'})")
    args = obj.get("arguments")
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ToolCallError("the tool call's arguments are not valid JSON") from None
    arg = args.get(TOOL_ARG[name]) if isinstance(args, dict) else None
    if not isinstance(arg, str) or not arg.strip():
        raise ToolCallError(f'the {name} call needs arguments {{"{TOOL_ARG[name]}": "..."}}')
    return name, arg


# -- splitting streamed text into segments ----------------------------------------------------------
class TagSplitter:
    """Streamed assistant text -> segments [[kind, text]] with kind text | think | call | output.

    Text that might be the start of a tag is held back until it is decided. Inside a call the closing
    </tool_call> marks the call complete (`pending_call`); the engine's stop handling usually cuts it
    before it arrives here, and `close_call()` says so instead."""

    OPEN = {THINK: "think", TOOL_CALL: "call"}

    def __init__(self) -> None:
        self.segments: list[list[str]] = []
        self.mode = "text"
        self.buf = ""
        self.pending_call = False

    def _tags(self) -> dict[str, str]:
        if self.mode == "think":
            return {END_THINK: "text"}
        if self.mode == "call":
            return {END_TOOL_CALL: "closed"}
        return dict(self.OPEN)

    def _add(self, kind: str, text: str, out: list) -> None:
        if not text:
            return
        if self.segments and self.segments[-1][0] == kind:
            self.segments[-1][1] += text
        else:
            self.segments.append([kind, text])
        out.append((kind, text))

    def _open(self, kind: str) -> None:
        self.mode = kind
        if kind in ("think", "call"):
            self.segments.append([kind, ""])  # an empty call or thought is still a segment

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """Add text; returns the (kind, delta) pieces now decided."""
        out: list[tuple[str, str]] = []
        self.buf += text
        while self.buf and not self.pending_call:
            tags = self._tags()
            hits = [(i, t) for t in tags if (i := self.buf.find(t)) >= 0]
            if hits:
                i, tag = min(hits)
                self._add(self.mode, self.buf[:i], out)
                self.buf = self.buf[i + len(tag):]
                if tags[tag] == "closed":
                    self.pending_call = True
                    self.mode = "text"
                else:
                    self._open(tags[tag])
                continue
            keep = 0 if final else max((k for t in tags for k in range(1, len(t)) if self.buf.endswith(t[:k])), default=0)
            self._add(self.mode, self.buf[: len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]
            break
        return out

    def close_call(self) -> None:
        """The engine stopped at </tool_call> (which it cut from the text)."""
        self.feed("", final=True)
        if self.mode == "call":
            self.pending_call, self.mode = True, "text"

    def call_text(self) -> str:
        return self.segments[-1][1] if self.segments and self.segments[-1][0] == "call" else ""

    def demote_call(self, closed: bool) -> str:
        """A call that will not run becomes plain text (tags included); returns that text."""
        self.feed("", final=True)
        text = TOOL_CALL + self.call_text() + (END_TOOL_CALL if closed else "")
        if self.segments and self.segments[-1][0] == "call":
            self.segments.pop()
        self.pending_call, self.mode = False, "text"
        self._add("text", text, [])
        return text

    def add_output(self, text: str) -> None:
        self.pending_call = False
        self.segments.append(["output", text])


# -- the turn ---------------------------------------------------------------------------------------
@dataclass
class TurnResult:
    message: dict                      # structured assistant message (content, thinking, tool_calls, segments)
    finish_reason: str                 # "stop" | "length" | "tool_error" | "call_limit" | "cancelled"
    steps: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prompt_tokens: int = 0             # the first prompt of the turn
    completion_tokens: int = 0         # tokens sampled in the turn (tool output not counted)
    context_ids: list[int] = field(default_factory=list)   # the whole conversation as rendered after the turn
    context_mask: list[int] = field(default_factory=list)  # its training mask (tool output 0)


@dataclass
class ChatEvent:
    type: str                          # text | thinking | call | tool_start | tool_end | note | done
    text: str = ""
    step: dict | None = None
    result: TurnResult | None = None


def message_from_segments(segments) -> dict:
    """Segments -> the labeling store's structured assistant message, plus the exact `segments`."""
    segs = [(k, t) for k, t in segments]
    thinking = "\n".join(t.strip() for k, t in segs if k == "think" and t.strip())
    content = "".join(t for k, t in segs if k == "text").strip()
    calls = []
    for i, (k, t) in enumerate(segs):
        if k == "call":
            try:
                tool, arg = parse_call(t, list(TOOL_ARG))
            except ToolCallError:  # a call cut short by a cancel: keep it as text
                segs[i] = ("text", TOOL_CALL + t)
                continue
            out = segs[i + 1][1] if i + 1 < len(segs) and segs[i + 1][0] == "output" else ""
            calls.append({"tool": tool, "input": arg, "output": out})
    content = "".join(t for k, t in segs if k == "text").strip()
    msg = {"role": "assistant", "content": content}
    if thinking:
        msg["thinking"] = thinking
    if calls:
        msg["tool_calls"] = calls
    msg["segments"] = [[k, t] for k, t in segs]
    return msg


def label_message(m: dict) -> dict:
    """An assistant message as the labeling store takes it (no segments, nothing else extra)."""
    return {k: v for k, v in m.items() if k in ("role", "content", "thinking", "tool_calls")}


def run_turn(engine, messages: list[dict], params: SamplingParams, tools: Tools, max_calls: int = MAX_CALLS,
             cancel: threading.Event | None = None, prefix: str = "", lead_in: str = "") -> Iterator[ChatEvent]:
    """One assistant turn with thinking and tool calls, as events (see the module docstring).

    `prefix`: text the assistant turn starts with, as if the model had written it (a scripted or
    "forced" tool call for models not tuned to call tools); it streams like generated text.
    `lead_in`: scripted text placed after a forced call's output (e.g. "So the answer is"), for a model
    that has never seen a tool output and would otherwise just end its turn there."""
    params.validate()
    enc = engine.enc
    if not isinstance(max_calls, int) or max_calls < 0:
        raise ValueError(f"max_calls must be an integer >= 0, got {max_calls!r}")
    special = has_tool_tokens(enc)
    close_id = enc.encode_single_token(END_TOOL_CALL) if special else None
    stop_ids = list(params.stop_token_ids or engine.default_stop_ids()) + ([close_id] if special else [])
    base = replace(params, stop=list(params.stop) + [END_TOOL_CALL], stop_token_ids=stop_ids)
    first = render_chat(messages, enc, add_generation_prompt=True)  # validates the messages
    available = tools.names()
    split = TagSplitter()
    steps, notes = [], []
    budget, used, finish = params.max_tokens, 0, None

    def events(pieces):
        for kind, delta in pieces:
            if kind in ("text", "think", "call"):
                yield ChatEvent({"think": "thinking"}.get(kind, kind), delta)

    def note(text: str) -> ChatEvent:
        notes.append(text)
        return ChatEvent("note", text)

    def context_ids() -> list[int]:
        """The conversation plus the open assistant turn so far (a thought or call left open stays open)."""
        segs, tail = split.segments, []
        if split.mode in ("think", "call") and segs:
            segs, (kind, text) = segs[:-1], segs[-1]
            tail = encode_pieces([Piece(THINK if kind == "think" else TOOL_CALL, tag=True), Piece(text)], enc).ids
        open_turn = {"role": "assistant", "content": "", "segments": segs}
        return list(render_chat(messages + [open_turn], enc, continue_final_message=True).ids) + list(tail)

    yield from events(split.feed(prefix, final=True))  # a prefix is complete text: nothing held back
    forced = split.pending_call
    generate = not split.pending_call
    while True:
        closed = False
        if generate:
            ids = context_ids()
            room = min(budget, engine.context_length - len(ids))
            if room <= 0:
                finish = "length"
                if engine.context_length - len(ids) <= 0:  # e.g. a huge paste: say the numbers, at once
                    yield note(f"the conversation is {len(ids):,} tokens and this model's context window holds "
                               f"{engine.context_length:,}: no room is left for an answer. Shorten the message or "
                               "clear the chat.")
                break
            stop_tok, finish = None, None
            for ev in engine.generate([ids], replace(base, max_tokens=room), 1, cancel):
                used += ev.token_id is not None
                budget -= ev.token_id is not None
                yield from events(split.feed(ev.text))
                if ev.finish_reason:
                    finish, stop_tok = ev.finish_reason, ev.stop_token_id
            if finish is None:  # the engine returned without finishing the sample: cancelled
                finish = "cancelled"
                yield from events(split.feed("", final=True))
                break
            closed = split.mode == "call" and finish == "stop" and stop_tok in (None, close_id)
            if closed:
                split.close_call()
            elif stop_tok is not None and stop_tok == close_id:
                yield note("the model closed a tool call it never opened; the turn ends here")
                break
        generate = True
        if not split.pending_call:
            yield from events(split.feed("", final=True))
            if split.mode == "call":  # the budget or the context ran out inside a call
                yield ChatEvent("text", split.demote_call(closed=False))
                yield note("the tool call was not closed before the token limit; it was not run")
            break
        try:
            tool, arg = parse_call(split.call_text(), available)
        except ToolCallError as e:
            yield ChatEvent("text", split.demote_call(closed=True))
            yield note(f"{e}; the call was not run and the turn ends here")
            finish = "tool_error"
            break
        if len(steps) >= max_calls:
            yield ChatEvent("text", split.demote_call(closed=True))
            yield note(f"the limit of {max_calls} tool call(s) per turn is reached; this call was not run")
            finish = "call_limit"
            break
        step = {"index": len(steps), "tool": tool, "input": arg, "forced": forced}
        forced = False
        yield ChatEvent("tool_start", step=dict(step))
        t0 = time.perf_counter()
        output, ok = tools.run(tool, arg)
        step.update(output=output, ok=ok, duration_s=round(time.perf_counter() - t0, 3))
        steps.append(step)
        split.add_output(output)
        yield ChatEvent("tool_end", step=dict(step))
        if step["forced"] and lead_in:
            yield from events(split.feed(lead_in, final=True))
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
    message = message_from_segments(split.segments)
    full = render_chat(messages + [message], enc)
    yield ChatEvent("done", result=TurnResult(message, finish or "stop", steps, notes, len(first.ids), used,
                                              list(full.ids), list(full.mask)))


def collect_turn(events: Iterator[ChatEvent]) -> TurnResult:
    """Run a turn to the end; its result."""
    result = None
    for ev in events:
        if ev.type == "done":
            result = ev.result
    return result
