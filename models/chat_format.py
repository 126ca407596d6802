"""The one chat format: ChatML exactly as SmolLM2-Instruct was trained (its GGUF chat template):

    <|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n
    <|im_start|>assistant\n                      <- the generation prompt

A conversation becomes a list of pieces (special token, or plain text), each marked trainable or not;
the pieces become ids and the assistant-loss mask together. Only our own specials are special: message
content is always encoded as plain text, so "<|im_end|>" typed by a user stays text (no injection).
Plain text between two specials is encoded as one run, so the ids equal what the original tokenizer
gives for the whole rendered text. Each role has its own renderer in RENDERERS, so tool calls and
thinking (issue 7) can add their pieces there.
"""
from __future__ import annotations

from dataclasses import dataclass

import tiktoken

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


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


def turn(role: str, content: str, train: bool) -> list[Piece]:
    """<|im_start|>{role}\n{content}<|im_end|>\n; when `train`, the content and the closing
    <|im_end|> carry loss (the model must learn to stop), the header and the newline after do not."""
    return [Piece(IM_START, special=True), Piece(role + "\n"), Piece(content, train=train),
            Piece(IM_END, special=True, train=train), Piece("\n")]


RENDERERS = {
    "system": lambda m: turn("system", m["content"], train=False),
    "user": lambda m: turn("user", m["content"], train=False),
    "assistant": lambda m: turn("assistant", m["content"], train=True),
    "tool": lambda m: turn("tool", m["content"], train=False),
}


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
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"messages[{i}].content is not valid Unicode text (lone surrogate at {e.start})") from None


def chat_pieces(messages: list[dict], add_generation_prompt: bool = False,
                default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> list[Piece]:
    check_messages(messages)
    pieces: list[Piece] = []
    # SmolLM2's template adds its default system prompt when the conversation does not open with one.
    if messages and messages[0]["role"] != "system" and default_system is not None:
        pieces += RENDERERS["system"]({"role": "system", "content": default_system})
    for m in messages:
        pieces += RENDERERS[m["role"]](m)
    if add_generation_prompt:
        pieces += [Piece(IM_START, special=True), Piece("assistant\n")]
    return pieces


def require_chat_tokens(enc: tiktoken.Encoding) -> None:
    missing = [t for t in (IM_START, IM_END) if t not in enc.special_tokens_set]
    if missing:
        raise ValueError(f"encoding {enc.name!r} has no ChatML special tokens {', '.join(missing)}; use "
                         f"models.tokenizers.with_chat_tokens(enc), i.e. get_encoding('{enc.name}+chatml')")


def encode_pieces(pieces: list[Piece], enc: tiktoken.Encoding) -> RenderedChat:
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
                default_system: str | None = DEFAULT_SYSTEM_PROMPT) -> RenderedChat:
    """Render a conversation to ids + assistant-loss mask + text. `default_system=None` leaves out the
    system prompt SmolLM2's template inserts when the conversation has none."""
    require_chat_tokens(enc)
    return encode_pieces(chat_pieces(messages, add_generation_prompt, default_system), enc)


def stop_token_ids(enc: tiktoken.Encoding) -> list[int]:
    """Tokens that end an answer: <|im_end|> and <|endoftext|>, those present in `enc`."""
    return [enc.encode_single_token(t) for t in (IM_END, ENDOFTEXT) if t in enc.special_tokens_set]
