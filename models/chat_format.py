"""The one chat format: ChatML exactly as SmolLM2-Instruct was trained (its GGUF chat template):

    <|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n
    <|im_start|>assistant\n                      <- the generation prompt

A conversation becomes a list of pieces (special token, or plain text), each marked trainable or not;
the pieces become ids and the assistant-loss mask together. Only our own specials are special: message
content is always encoded as plain text, so "<|im_end|>" typed by a user stays text (no injection).
Plain text between two specials is encoded as one run, so the ids equal what the original tokenizer
gives for the whole rendered text. Each role has its own renderer in RENDERERS.

Thinking and tool calls (issue 7) live inside ONE assistant turn:

    <|im_start|>assistant\n<think>{thinking}</think><tool_call>{"name":"python","arguments":{"code":"..."}}</tool_call>
    <tool_output>{what the tool printed}</tool_output>{answer}<|im_end|>\n

(no newlines between the pieces; search calls are {"name":"search","arguments":{"query":"..."}}).
Parallel calls (client functions, OpenAI's parallel_tool_calls) are written back to back and their
outputs follow in the same order: <tool_call>{a}</tool_call><tool_call>{b}</tool_call><tool_output>{a's
result}</tool_output><tool_output>{b's result}</tool_output>{answer} (segments call, call, output, output, text).
The six tags are special tokens when the encoding has them (`with_tool_tokens`, names "<base>+tools");
otherwise they are plain text in the same shape, so a plain model still chats and can be prompted to
call tools. Loss mask: thinking, the call (tags and JSON) and the answer are trained; the tool output
and its two tags are not (the engine writes them, the model must not learn to invent them).
A structured assistant message is {"role": "assistant", "content", "thinking"?, "tool_calls"?:
[{"tool": "search"|"python", "input", "output"}]} (the labeling store's form). A tool loop that wrote
text between calls keeps the exact order in "segments": [[kind, text], ...] with kind in think, call,
output, text (the call's text is its JSON); segments win over the other fields when present.
"""
from __future__ import annotations

from dataclasses import dataclass

import json

import tiktoken

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_OUTPUT, END_TOOL_OUTPUT = "<tool_output>", "</tool_output>"
TOOL_SPECIALS = (THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, TOOL_OUTPUT, END_TOOL_OUTPUT)
TOOLS_SUFFIX = "+tools"
TOOL_ARG = {"search": "query", "python": "code"}  # the built-in tools and the name of their one argument
SEGMENT_KINDS = ("think", "call", "output", "text")
# what tools_prompt adds when parallel calls are allowed
PARALLEL_NOTE = " To call several at once, write the calls one after another; their results follow in the same order."


@dataclass
class RenderedChat:
    ids: list[int]
    mask: list[int]  # 1 = assistant token that gets training loss (its content and closing <|im_end|>)
    text: str


@dataclass
class Piece:
    text: str
    special: bool = False  # one special token, looked up by its text
    train: bool = False  # the model learns to produce this piece
    tag: bool = False  # a tool/thinking tag: a special token when the encoding has it, else plain text


def turn(role: str, content: str, train: bool) -> list[Piece]:
    """<|im_start|>{role}\n{content}<|im_end|>\n; when `train`, the content and the closing
    <|im_end|> carry loss (the model must learn to stop), the header and the newline after do not."""
    return [Piece(IM_START, special=True), Piece(role + "\n"), Piece(content, train=train),
            Piece(IM_END, special=True, train=train), Piece("\n")]


def function_call_json(name: str, arguments: dict) -> str:
    """The text between <tool_call> and </tool_call>: compact JSON, non-ASCII kept as is."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))


def call_json(tool: str, argument: str) -> str:
    """A built-in tool's call: its one argument under the tool's argument name."""
    return function_call_json(tool, {TOOL_ARG.get(tool, "input"): argument})


def tools_prompt(functions: list[dict], parallel: bool = False) -> str:
    """What a system turn says about functions the client defines (OpenAI `tools`): the same call
    protocol as the built-in tools, so a model tuned here learns one. Each function is one JSON line
    {"name", "description"?, "parameters"?}. `parallel`: the model may write several calls at once."""
    lines = [json.dumps({k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None},
                        ensure_ascii=False) for f in functions]
    return ("You can call functions. To call one, write " + TOOL_CALL + '{"name": "<function name>", "arguments": '
            "{<arguments as JSON>}}" + END_TOOL_CALL + " and its result follows in " + TOOL_OUTPUT + "..."
            + END_TOOL_OUTPUT + "." + (PARALLEL_NOTE if parallel else "") + " The functions:\n" + "\n".join(lines))



def assistant_segments(m: dict) -> list[tuple[str, str]]:
    """A structured assistant message -> its segments in rendering order: think, (call, output)*, text."""
    if m.get("segments") is not None:
        return [(k, t) for k, t in m["segments"]]
    segs: list[tuple[str, str]] = []
    if m.get("thinking"):
        segs.append(("think", m["thinking"]))
    for c in m.get("tool_calls") or []:
        segs += [("call", call_json(c["tool"], c.get("input", ""))), ("output", c.get("output", ""))]
    segs.append(("text", m.get("content", "")))
    return segs


def segment_pieces(segments: list[tuple[str, str]]) -> list[Piece]:
    """Segments -> pieces: thinking and calls trained with their tags, tool output (and its tags) not."""
    out: list[Piece] = []
    for kind, text in segments:
        if kind == "think":
            out += [Piece(THINK, tag=True, train=True), Piece(text, train=True), Piece(END_THINK, tag=True, train=True)]
        elif kind == "call":
            out += [Piece(TOOL_CALL, tag=True, train=True), Piece(text, train=True),
                    Piece(END_TOOL_CALL, tag=True, train=True)]
        elif kind == "output":
            out += [Piece(TOOL_OUTPUT, tag=True), Piece(text), Piece(END_TOOL_OUTPUT, tag=True)]
        else:
            out.append(Piece(text, train=True))
    return out


def assistant_turn(m: dict, close: bool = True) -> list[Piece]:
    """<|im_start|>assistant\n{segments}<|im_end|>\n; close=False leaves the turn open (a prefix to continue)."""
    head = [Piece(IM_START, special=True), Piece("assistant\n")]
    tail = [Piece(IM_END, special=True, train=True), Piece("\n")] if close else []
    return head + segment_pieces(assistant_segments(m)) + tail


RENDERERS = {
    "system": lambda m: turn("system", m["content"], train=False),
    "user": lambda m: turn("user", m["content"], train=False),
    "assistant": assistant_turn,
    "tool": lambda m: turn("tool", m["content"], train=False),
}


def check_assistant(m: dict, where: str) -> None:
    if m.get("thinking") is not None and not isinstance(m["thinking"], str):
        raise ValueError(f"{where}.thinking must be a string")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise ValueError(f"{where}.tool_calls must be a list of {{tool, input, output}}")
        for j, c in enumerate(calls):
            if not isinstance(c, dict) or c.get("tool") not in TOOL_ARG:
                raise ValueError(f"{where}.tool_calls[{j}].tool must be one of {', '.join(TOOL_ARG)}")
            for k in ("input", "output"):
                if not isinstance(c.get(k, ""), str):
                    raise ValueError(f"{where}.tool_calls[{j}].{k} must be a string")
    segs = m.get("segments")
    if segs is not None:
        if not isinstance(segs, list) or any(
                not isinstance(x, (list, tuple)) or len(x) != 2 or x[0] not in SEGMENT_KINDS or not isinstance(x[1], str)
                for x in segs):
            raise ValueError(f"{where}.segments must be a list of [kind, text] with kind in {', '.join(SEGMENT_KINDS)}")


def check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in RENDERERS:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(RENDERERS)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
        if m["role"] == "assistant":
            check_assistant(m, f"messages[{i}]")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"messages[{i}].content is not valid Unicode text (lone surrogate at {e.start})") from None


def chat_pieces(messages: list[dict], add_generation_prompt: bool = False,
                default_system: str | None = DEFAULT_SYSTEM_PROMPT,
                continue_final_message: bool = False, functions: list[dict] | None = None,
                parallel_calls: bool = False) -> list[Piece]:
    check_messages(messages)
    if continue_final_message and (add_generation_prompt or not messages or messages[-1]["role"] != "assistant"):
        raise ValueError("continue_final_message needs a last assistant message and no generation prompt")
    if functions:  # the function list closes the system turn (the default one when there is none)
        if messages and messages[0]["role"] == "system":
            messages = [{**messages[0], "content": messages[0]["content"] + "\n\n" + tools_prompt(functions, parallel_calls)}] + messages[1:]
        else:
            head = (default_system + "\n\n") if default_system else ""
            messages = [{"role": "system", "content": head + tools_prompt(functions, parallel_calls)}] + messages
    pieces: list[Piece] = []
    # SmolLM2's template adds its default system prompt when the conversation does not open with one.
    if messages and messages[0]["role"] != "system" and default_system is not None:
        pieces += RENDERERS["system"]({"role": "system", "content": default_system})
    for i, m in enumerate(messages):
        if continue_final_message and i == len(messages) - 1:
            pieces += assistant_turn(m, close=False)
        else:
            pieces += RENDERERS[m["role"]](m)
    if add_generation_prompt:
        pieces += [Piece(IM_START, special=True), Piece("assistant\n")]
    return pieces


def require_chat_tokens(enc: tiktoken.Encoding) -> None:
    missing = [t for t in (IM_START, IM_END) if t not in enc.special_tokens_set]
    if missing:
        raise ValueError(f"encoding {enc.name!r} has no ChatML special tokens {', '.join(missing)}; use "
                         f"models.tokenizers.with_chat_tokens(enc), i.e. get_encoding('{enc.name}+chatml')")


def has_tool_tokens(enc: tiktoken.Encoding) -> bool:
    return all(t in enc.special_tokens_set for t in TOOL_SPECIALS)


def encode_pieces(pieces: list[Piece], enc: tiktoken.Encoding) -> RenderedChat:
    specials = enc.special_tokens_set
    pieces = [Piece(p.text, special=p.special or p.text in specials, train=p.train) if p.tag else p for p in pieces]
    ids: list[int] = []
    mask: list[int] = []
    i = 0
    while i < len(pieces):
        if pieces[i].special:
            ids.append(enc.encode_single_token(pieces[i].text))
            mask.append(int(pieces[i].train))
            i += 1
            continue
        # One run of plain text up to the next special, encoded at once; trainable byte spans inside it
        # mark every token that overlaps them (a token straddling the header's "\n" and an answer that
        # opens with whitespace, like "\n  " before a digit, is trained: the answer is in it).
        run, spans, pos = [], [], 0
        while i < len(pieces) and not pieces[i].special:
            b = pieces[i].text.encode("utf-8")
            if pieces[i].train:
                spans.append((pos, pos + len(b)))
            run.append(pieces[i].text)
            pos += len(b)
            i += 1
        run_ids = enc.encode_ordinary("".join(run))
        start = 0
        for tid in run_ids:
            end = start + len(enc.decode_single_token_bytes(tid))
            ids.append(tid)
            mask.append(int(any(s < end and start < e for s, e in spans)))
            start = end
    return RenderedChat(ids=ids, mask=mask, text="".join(p.text for p in pieces))


def render_chat(messages: list[dict], enc: tiktoken.Encoding, add_generation_prompt: bool = False,
                default_system: str | None = DEFAULT_SYSTEM_PROMPT,
                continue_final_message: bool = False, functions: list[dict] | None = None,
                open_call: bool = False, parallel_calls: bool = False, open_think: bool = False) -> RenderedChat:
    """Render a conversation to ids + assistant-loss mask + text. `default_system=None` leaves out the
    system prompt SmolLM2's template inserts when the conversation has none. `continue_final_message`
    leaves the last (assistant) turn open, without <|im_end|>: the context a tool loop continues.
    `functions`: client-defined functions listed in the system turn (tools_prompt; `parallel_calls`: it
    says several calls may be written at once). `open_call` ends the
    rendering with an opening <tool_call> tag: the model's next words are a call (a forced call); `open_think`
    with an opening <think> tag, as DeepSeek-R1's own template does to make sure the model thinks."""
    require_chat_tokens(enc)
    pieces = chat_pieces(messages, add_generation_prompt, default_system, continue_final_message, functions,
                         parallel_calls)
    if open_call:
        pieces.append(Piece(TOOL_CALL, tag=True))
    if open_think:
        pieces.append(Piece(THINK, tag=True))
    return encode_pieces(pieces, enc)


def with_tool_tokens(enc: tiktoken.Encoding) -> tiktoken.Encoding:
    """`enc` with the ChatML specials and the six thinking/tool tags, the missing ones at ids past its
    vocabulary, in TOOL_SPECIALS order (a model fine-tuned to use them grows its embedding to
    max_token_value + 1). Named "<name>+tools"; returns `enc` itself when it has them all."""
    from models.tokenizers import with_chat_tokens
    base = with_chat_tokens(enc)
    if has_tool_tokens(base):
        return base
    specials = dict(base._special_tokens)
    next_id = base.max_token_value + 1
    for tok in TOOL_SPECIALS:
        if tok not in specials:
            specials[tok], next_id = next_id, next_id + 1
    name = enc.name[: -len("+chatml")] if enc.name.endswith("+chatml") else enc.name
    return tiktoken.Encoding(name + TOOLS_SUFFIX, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=specials)


def stop_token_ids(enc: tiktoken.Encoding) -> list[int]:
    """Tokens that end an answer: <|im_end|> and <|endoftext|>, those present in `enc`."""
    return [enc.encode_single_token(t) for t in (IM_END, ENDOFTEXT) if t in enc.special_tokens_set]
