"""The tokenizer explorer: what an encoding does to a text, as data and as (escaped) HTML.

    tokens = tokenize(enc, "hello world")      # [Token(id=15339, text="hello", bytes=b"hello", start=0, end=5), ...]
    groups = group_tokens("hello world", tokens)  # colour groups: never split a character or grapheme
    merge_tree(enc, 15339)                     # how BPE built the token, down to single bytes
    presplit(enc, text)                        # the regex chunks made before BPE runs
    render_tokens_html(text, tokens)           # coloured chunks + ids, every user string escaped

One character can take several tokens (an emoji is 4 UTF-8 bytes; cl100k gives it 2 or 3 tokens), and a
token can end in the middle of a character. Offsets are in characters (Python str indices); a token that
covers only part of a character gets that whole character as its span and `partial=True`.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import regex
import tiktoken

from models import tokenizers

MAX_TEXT_CHARS = 100_000        # API and UI refuse longer text (a clear 4xx, not a slow page)
MAX_RENDER_TOKENS = 5_000       # HTML shows this many tokens; counts always cover the whole text
MAX_TIP_TREES = 1_500           # hover merge trees for the first tokens only (keeps the page light)
PALETTE = ["#fde68a", "#bfdbfe", "#bbf7d0", "#fecaca", "#ddd6fe", "#fed7aa", "#a5f3fc", "#f5d0fe"]
WHITESPACE_MARKS = {" ": "·", "\t": "→", "\n": "↵\n", "\r": "␍"}


# Presets from the Deep Dive (DEMOS 1-4, 13): (label, text, what to notice). Counts quoted are cl100k_base.
PRESETS: list[tuple[str, str, str]] = [
    ("hello world", "hello world",
     "cl100k_base: 2 tokens, 15339 'hello' and 1917 ' world'. The space belongs to the start of the second token."),
    ("helloworld", "helloworld",
     "Drop the space and the split changes completely: 'h' + 'elloworld', two ids you have not seen before."),
    ("hello  world (two spaces)", "hello  world",
     "The extra space becomes a token of its own, 220 (' '); ' world' keeps its space."),
    ("HELLO WORLD", "HELLO WORLD",
     "3 tokens: 'HEL' 'LO' ' WORLD'. Case matters: capitals are rarer in training text, so they are cut finer."),
    ("ubiquitous", "ubiquitous",
     "3 tokens ('ub', 'iqu', 'itous'): the model never sees the letters, only these chunks."),
    ("strawberry", "strawberry",
     "3 tokens ('str', 'aw', 'berry'); inside a sentence ' strawberry' (with its space) is a single token. Either "
     "way the model sees no letters, so 'how many r's?' asks about something it cannot see."),
    ("177 dots", "." * 177,
     "177 dots are a handful of long tokens (64 + 64 + 32 + 8 + 9 dots): the model cannot count them by looking."),
    ("9.11 vs 9.9", "Which is bigger, 9.11 or 9.9?",
     "'9.11' is '9' '.' '11' and '9.9' is '9' '.' '9': compared token by token, 11 looks bigger than 9."),
    ("Emily's apples", "Emily buys 3 apples and 2 oranges. Each orange costs $2. The total cost of all the fruit is $13. "
     "What is the cost of each apple?",
     "A model does a fixed amount of computation per token: an answer needs tokens to think in, so spread the work "
     "over many tokens (DEMOS 13). Numbers up to 3 digits are single tokens here."),
    ("emoji and accents", "👨‍👩‍👧 naïve café 你好",
     "One family emoji is one grapheme but many tokens (red outline); '~' in the ids marks tokens holding part of a "
     "UTF-8 character. Compare the count with the number of characters."),
]

CHAT_PRESET: list[dict] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 = 4."},
    {"role": "user", "content": "And times 3?"},
]
CHAT_NOTE = ("The conversation becomes one token sequence: every message is wrapped in special tokens "
             "(<|im_start|>role … <|im_end|>). Shaded tokens (green underline) are the assistant's, the only ones that "
             "get training loss. The blue-outlined tail is the generation prompt the server appends before sampling: "
             "the model continues from there.")


class TextError(ValueError):
    """The text cannot be tokenized (too long, lone surrogate); the message names the problem."""


class TextTooLong(TextError):
    pass


# ---------------------------------------------------------------------------------------------- encodings

def get_encoding(name: str, data_dir: Path | None = None) -> tiktoken.Encoding:
    """Any registered encoding by name; UnknownEncoding (a ValueError) names unknown ones."""
    return tokenizers.get_encoding(name, data_dir)


def list_encodings(data_dir: Path | None = None) -> list[str]:
    return tokenizers.list_encodings(data_dir)


def check_text(text, field_name: str = "text", limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(text, str):
        raise TextError(f"{field_name} must be a string")
    if len(text) > limit:
        raise TextTooLong(f"{field_name} is {len(text):,} characters; the limit is {limit:,}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TextError(f"{field_name} contains a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}; "
                        "it is not valid Unicode and has no UTF-8 bytes") from None
    return text


# ------------------------------------------------------------------------------------------------- tokens

@dataclass
class Token:
    id: int
    text: str            # the token's bytes decoded; U+FFFD where the bytes are part of a character
    bytes: bytes
    start: int           # character offsets into the text: text[start:end] contains the token
    end: int
    partial: bool = False  # starts or ends inside a UTF-8 character
    special: bool = False  # a special token such as <|endoftext|>

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "bytes": list(self.bytes), "start": self.start, "end": self.end,
                "partial": self.partial, "special": self.special}


def encode(enc: tiktoken.Encoding, text: str, allow_special: bool = True) -> list[int]:
    """Encode; with allow_special, "<|endoftext|>" typed in the text is the special token, else plain text."""
    return enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())


def tokenize(enc: tiktoken.Encoding, text: str, allow_special: bool = True) -> list[Token]:
    return tokens_from_ids(enc, encode(enc, check_text(text), allow_special))


def tokens_from_ids(enc: tiktoken.Encoding, ids: list[int]) -> list[Token]:
    """Tokens with character offsets into decode(ids)."""
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    data = b"".join(pieces)
    text = data.decode("utf-8", errors="replace")
    # char index of every byte (bytes of an invalid sequence each map to their U+FFFD when decodable alone)
    char_of_byte, char_starts = _char_map(data, text)
    specials = enc.special_tokens_set
    tokens, pos = [], 0
    for i, piece in zip(ids, pieces):
        end_byte = pos + len(piece)
        if piece:
            start, end = char_of_byte[pos], char_of_byte[end_byte - 1] + 1
            partial = pos not in char_starts or end_byte not in char_starts
        else:
            start = end = char_of_byte[pos] if pos < len(char_of_byte) else len(text)
            partial = False
        tokens.append(Token(i, piece.decode("utf-8", errors="replace"), piece, start, end, partial,
                            piece.decode("utf-8", errors="replace") in specials))
        pos = end_byte
    return tokens


def _char_map(data: bytes, text: str) -> tuple[list[int], set[int]]:
    if len(text.encode("utf-8")) == len(data):  # valid UTF-8: the usual case
        char_of_byte, starts, pos = [0] * len(data), set(), 0
        for ci, ch in enumerate(text):
            n = len(ch.encode("utf-8"))
            starts.add(pos)
            char_of_byte[pos:pos + n] = [ci] * n
            pos += n
        starts.add(pos)
        return char_of_byte, starts
    # invalid UTF-8 (ids that do not decode cleanly): walk with the decoder's replacement rule
    char_of_byte, starts, pos, ci = [], set(), 0, 0
    while pos < len(data):
        for n in (1, 2, 3, 4):
            try:
                data[pos:pos + n].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            n = 1
        starts.add(pos)
        char_of_byte.extend([ci] * n)
        pos, ci = pos + n, ci + 1
    starts.add(pos)
    return char_of_byte, starts


@dataclass
class Group:
    """Consecutive tokens shown as one coloured chunk: boundaries only fall between graphemes."""
    start: int
    end: int
    tokens: list[int] = field(default_factory=list)  # indices into the token list

    @property
    def split(self) -> bool:  # one character (or grapheme) spread over several tokens
        return len(self.tokens) > 1


def group_tokens(text: str, tokens: list[Token]) -> list[Group]:
    """Join tokens whose boundary falls inside a UTF-8 character or inside a grapheme cluster
    (an emoji with modifiers, a letter with a combining accent), so each group is whole characters."""
    graphemes = {m.start() for m in regex.finditer(r"\X", text)} | {len(text)}
    char_at_byte, pos = {}, 0  # byte offset of each character start -> character index
    for ci, ch in enumerate(text):
        char_at_byte[pos] = ci
        pos += len(ch.encode("utf-8"))
    char_at_byte[pos] = len(text)
    groups: list[Group] = []
    byte_pos = 0
    for k, tok in enumerate(tokens):
        ci = char_at_byte.get(byte_pos)
        if not groups or (ci is not None and ci in graphemes):
            groups.append(Group(tok.start, tok.end, [k]))
        else:
            groups[-1].tokens.append(k)
            groups[-1].end = max(groups[-1].end, tok.end)
        byte_pos += len(tok.bytes)
    return groups


def counts(text: str, tokens: list[Token]) -> dict:
    n_tok, n_chars = len(tokens), len(text)
    return {"tokens": n_tok, "chars": n_chars, "bytes": len(text.encode("utf-8")),
            "graphemes": len(regex.findall(r"\X", text)),
            "chars_per_token": round(n_chars / n_tok, 2) if n_tok else 0.0}


def visible_whitespace(s: str) -> str:
    return "".join(WHITESPACE_MARKS.get(c, c) for c in s)


# ------------------------------------------------------------------------------------ pre-split and merges

def presplit(enc: tiktoken.Encoding, text: str, allow_special: bool = True) -> list[dict]:
    """The chunks the encoding's regex cuts the text into; BPE never merges across them.
    Special tokens are cut out first, as tiktoken does."""
    check_text(text)
    pat = regex.compile(enc._pat_str)
    specials = sorted(enc.special_tokens_set, key=len, reverse=True) if allow_special else []
    special_re = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    out, pos = [], 0
    segments = []
    for m in (special_re.finditer(text) if special_re else []):
        segments.append((pos, m.start(), False))
        segments.append((m.start(), m.end(), True))
        pos = m.end()
    segments.append((pos, len(text), False))
    for a, b, is_special in segments:
        if is_special:
            out.append({"text": text[a:b], "start": a, "end": b, "special": True})
            continue
        for m in pat.finditer(text, a, b):
            out.append({"text": m.group(), "start": m.start(), "end": m.end(), "special": False})
    return out


def merge_tree(enc: tiktoken.Encoding, token_id: int) -> dict:
    """How byte-level BPE builds this token: replay the lowest-rank merge first on its bytes (what tiktoken
    does) and record each merge. Node: {"id", "bytes", "text", "children": [left, right]} (leaves: one byte)."""
    if not isinstance(token_id, int) or token_id < 0:
        raise ValueError(f"token id must be a non-negative integer, got {token_id!r}")
    try:
        data = enc.decode_single_token_bytes(token_id)
    except KeyError:
        raise ValueError(f"token id {token_id} is not in {enc.name} (vocabulary {enc.n_vocab})") from None
    if token_id in enc._special_tokens.values():
        return _node(token_id, data, [], special=True)
    ranks = enc._mergeable_ranks
    nodes = [_node(ranks[bytes([b])], bytes([b]), []) for b in data]
    while len(nodes) > 1:
        best, best_rank = None, None
        for i in range(len(nodes) - 1):
            r = ranks.get(nodes[i]["bytes"] + nodes[i + 1]["bytes"])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        left, right = nodes[best], nodes[best + 1]
        nodes[best:best + 2] = [_node(best_rank, left["bytes"] + right["bytes"], [left, right])]
    if len(nodes) == 1:
        return nodes[0]
    # not reachable by merges (rare in imported vocabularies): show the pieces BPE gets to
    return _node(token_id, data, nodes, unreachable=True)


def _node(i: int, data: bytes, children: list, **flags) -> dict:
    return {"id": i, "bytes": data, "text": data.decode("utf-8", errors="replace"), "children": children, **flags}


def merge_tree_lines(tree: dict, max_lines: int = 64) -> list[str]:
    """The tree as indented text lines, merges only: `1917 ' world' = 1001 ' w' + 1313 'orld'`."""
    lines: list[str] = []

    def walk(node, depth):
        if len(lines) >= max_lines:
            return
        if node.get("special"):
            lines.append(f"{node['id']} {node['text']!r}: special token, never built by merges")
            return
        if not node["children"]:
            if depth == 0:
                lines.append(f"{node['id']} {_show_bytes(node['bytes'])}: a single byte, the start of every merge")
            return
        parts = " + ".join(f"{c['id']} {_show_bytes(c['bytes'])}" for c in node["children"])
        note = " (not reachable by merges)" if node.get("unreachable") else ""
        lines.append("  " * depth + f"{node['id']} {_show_bytes(node['bytes'])} = {parts}{note}")
        for c in node["children"]:
            walk(c, depth + 1)

    walk(tree, 0)
    if len(lines) >= max_lines:
        lines.append("…")
    return lines


def _show_bytes(b: bytes) -> str:
    try:
        return repr(b.decode("utf-8"))
    except UnicodeDecodeError:
        return "<" + " ".join(f"{x:02X}" for x in b) + ">"


def tree_to_json(tree: dict) -> dict:
    out = {k: v for k, v in tree.items() if k not in ("bytes", "children")}
    out["bytes"] = list(tree["bytes"])
    out["children"] = [tree_to_json(c) for c in tree["children"]]
    return out


# ------------------------------------------------------------------------------------------------ analysis

def explore(enc: tiktoken.Encoding, text: str, allow_special: bool = True) -> dict:
    """Everything the API returns for one text and encoding."""
    tokens = tokenize(enc, text, allow_special)
    return {"encoding": enc.name, "count": len(tokens), "counts": counts(text, tokens),
            "tokens": [t.to_dict() for t in tokens]}


def compare(enc_a: tiktoken.Encoding, enc_b: tiktoken.Encoding, text: str) -> dict:
    a, b = tokenize(enc_a, text), tokenize(enc_b, text)
    diff = len(b) - len(a)
    pct = f"{100 * diff / len(a):+.0f}%" if a else "n/a"
    return {"a": {"encoding": enc_a.name, "count": len(a)}, "b": {"encoding": enc_b.name, "count": len(b)},
            "difference": diff,
            "summary": f"{enc_a.name}: {len(a)} tokens · {enc_b.name}: {len(b)} tokens · difference {diff:+d} ({pct})"}


def chat_encoding(name: str, data_dir: Path | None = None) -> tiktoken.Encoding:
    """The encoding for the chat view: `name` itself when it has the ChatML tokens, else `name+chatml`
    (the same vocabulary with <|im_start|>, <|im_end|>, <|im_sep|> added; GPT-4's ids for cl100k_base)."""
    from models.tokenizers import chat_encoding_name
    return get_encoding(chat_encoding_name(name, data_dir), data_dir)


def chat_view(messages: list[dict], enc: tiktoken.Encoding, add_generation_prompt: bool = True) -> dict:
    """A conversation through the app's chat format (models.chat_format.render_chat): ids, loss mask,
    text with special tokens, and which trailing tokens are the generation prompt the server appends."""
    from models.chat_format import render_chat
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content}")
    full = render_chat(messages, enc, add_generation_prompt=add_generation_prompt)
    gen_from = None
    if add_generation_prompt:
        base = render_chat(messages, enc, add_generation_prompt=False)
        if list(full.ids[:len(base.ids)]) == list(base.ids) and len(full.ids) > len(base.ids):
            gen_from = len(base.ids)
    tokens = tokens_from_ids(enc, list(full.ids))
    text = b"".join(t.bytes for t in tokens).decode("utf-8", errors="replace")
    gen_text = "".join(t.text for t in tokens[gen_from:]) if gen_from is not None else ""
    return {"encoding": enc.name, "count": len(tokens), "ids": list(full.ids), "mask": list(full.mask),
            "text": text, "loss_tokens": int(sum(full.mask)), "generation_prompt_from": gen_from,
            "generation_prompt": gen_text, "tokens": [t.to_dict() for t in tokens]}


# ------------------------------------------------------------------------------------------------- HTML

CSS = """
.tokviz {font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 15px; line-height: 1.9;
  white-space: pre-wrap; word-break: break-all; color: #111;}
.tokviz .tok {border-radius: 3px; padding: 1px 0; position: relative; cursor: pointer; outline: none;}
.tokviz .tok.split {box-shadow: inset 0 0 0 1.5px #dc2626;}
.tokviz .tok.special {font-weight: 700; color: #7c2d12; box-shadow: inset 0 0 0 1.5px #7c2d12;}
.tokviz .tok.masked {border-bottom: 3px solid #16a34a;}
.tokviz .tok.genprompt {box-shadow: inset 0 0 0 2px #2563eb;}
.tokviz .ws {color: #9ca3af;}
.tokviz .tip {display: none; position: absolute; left: 0; top: 1.8em; z-index: 50; background: #111827;
  color: #f9fafb; padding: 6px 8px; border-radius: 6px; font-size: 12px; line-height: 1.4; white-space: pre;
  min-width: 12em; max-width: 60ch; overflow: hidden; pointer-events: none;}
.tokviz .tok:hover > .tip, .tokviz .tok:focus > .tip {display: block;}
.tokviz .ids {margin-top: .8em; font-size: 12px; line-height: 1.8; color: #374151;}
.tokviz .ids span {border-radius: 3px; padding: 0 2px; margin-right: 3px;}
.tokviz .note {font-size: 12px; color: #6b7280;}
"""


def render_tokens_html(text: str, tokens: list[Token], enc: tiktoken.Encoding | None = None, *,
                       show_whitespace: bool = True, show_ids: bool = True, mask: list[int] | None = None,
                       highlight_from: int | None = None) -> str:
    """Coloured chunks (one colour per grapheme-safe group) and the id list. All user text is escaped.
    `mask` shades assistant-loss tokens; tokens from `highlight_from` on are outlined (the generation prompt)."""
    shown = tokens[:MAX_RENDER_TOKENS]
    shown_text = text[:shown[-1].end] if shown else ""
    groups = group_tokens(shown_text, shown)
    chunks, ids = [], []
    for g_index, g in enumerate(groups):
        colour = PALETTE[g_index % len(PALETTE)]
        toks = [shown[k] for k in g.tokens]
        classes = ["tok"]
        if g.split:
            classes.append("split")
        if any(t.special for t in toks):
            classes.append("special")
        if mask is not None and any(mask[k] for k in g.tokens if k < len(mask)):
            classes.append("masked")
        if highlight_from is not None and g.tokens[-1] >= highlight_from:
            classes.append("genprompt")
        piece = text[g.start:g.end]
        body = _escape_ws(piece) if show_whitespace else html.escape(piece)
        tip = html.escape(_tip_text(toks, enc if g.tokens[0] < MAX_TIP_TREES else None, mask, g.tokens))
        ids_attr = " ".join(str(t.id) for t in toks)
        chunks.append(f'<span class="{" ".join(classes)}" tabindex="0" data-ids="{ids_attr}" '
                      f'style="background:{colour}">{body}<span class="tip">{tip}</span></span>')
        for t in toks:
            mark = "~" if t.partial else ""
            ids.append(f'<span style="background:{colour}" title="{html.escape(_show_bytes(t.bytes))}">{t.id}{mark}</span>')
    out = [f'<div class="tokviz"><div class="chunks">{"".join(chunks)}</div>']
    if len(tokens) > len(shown):
        out.append(f'<div class="note">showing the first {len(shown):,} of {len(tokens):,} tokens</div>')
    if show_ids:
        out.append(f'<div class="ids">{"".join(ids)}</div>'
                   '<div class="note">~ marks a token holding part of a UTF-8 character; a red outline marks one '
                   'character (or grapheme) spread over several tokens.</div>')
    out.append("</div>")
    return "".join(out)


def _escape_ws(s: str) -> str:
    out = []
    for c in s:
        if c in WHITESPACE_MARKS:
            # the mark, then the real newline so lines still break
            out.append('<span class="ws">' + WHITESPACE_MARKS[c][0] + "</span>" + ("\n" if c == "\n" else ""))
        else:
            out.append(html.escape(c))
    return "".join(out)


def _tip_text(toks: list[Token], enc, mask, indices) -> str:
    lines = []
    for k, t in zip(indices, toks):
        head = f"id {t.id}  {_show_bytes(t.bytes)}  bytes [{' '.join(f'{b:02X}' for b in t.bytes)}]"
        if t.partial:
            head += "  (part of a character)"
        if t.special:
            head += "  special"
        if mask is not None and k < len(mask):
            head += "  loss: yes" if mask[k] else "  loss: no"
        lines.append(head)
        if enc is not None and len(t.bytes) > 1:
            lines.extend("  " + line for line in merge_tree_lines(merge_tree(enc, t.id), max_lines=12))
    return "\n".join(lines)


def render_presplit_html(chunks: list[dict], show_whitespace: bool = True) -> str:
    spans = []
    for i, c in enumerate(chunks[:MAX_RENDER_TOKENS]):
        body = _escape_ws(c["text"]) if show_whitespace else html.escape(c["text"])
        cls = "tok special" if c["special"] else "tok"
        spans.append(f'<span class="{cls}" style="background:{PALETTE[i % len(PALETTE)]}">{body}</span>')
    return (f'<div class="tokviz"><div class="chunks">{"".join(spans)}</div>'
            f'<div class="note">{len(chunks):,} pre-split chunks{" (the first " + format(MAX_RENDER_TOKENS, ",") + " shown)" if len(chunks) > MAX_RENDER_TOKENS else ""}: '
            'BPE merges happen only inside a chunk.</div></div>')


def counts_markdown(c: dict) -> str:
    graphemes = f" ({c['graphemes']:,} graphemes)" if c.get("graphemes", c["chars"]) != c["chars"] else ""
    return (f"**{c['tokens']:,} tokens** · {c['chars']:,} characters{graphemes} · {c['bytes']:,} UTF-8 bytes · "
            f"{c['chars_per_token']} characters/token")
