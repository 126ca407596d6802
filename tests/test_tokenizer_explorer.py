"""The explorer's pieces on the real cl100k_base: offsets, grapheme-safe groups, merge trees, pre-split, HTML."""
from __future__ import annotations

import pytest

from backend import tokenizer_explorer as tx


@pytest.fixture(scope="module")
def enc():
    return tx.get_encoding("cl100k_base")


def test_deep_dive_examples_tokenize_as_the_lecture_says(enc):
    ids = lambda s: [t.id for t in tx.tokenize(enc, s)]
    assert ids("hello world") == [15339, 1917]
    assert [t.text for t in tx.tokenize(enc, "helloworld")] == ["h", "elloworld"]
    assert 220 in ids("hello  world")
    assert len(ids("HELLO WORLD")) == 3
    assert len(ids("ubiquitous")) == 3
    assert len(ids("strawberry")) == 3
    dots = tx.tokenize(enc, "." * 177)
    assert len(dots) <= 6 and sum(len(t.bytes) for t in dots) == 177
    assert [t.text for t in tx.tokenize(enc, "9.11")] == ["9", ".", "11"]


def test_every_preset_has_a_note_and_tokenizes(enc):
    for label, text, note in tx.PRESETS:
        assert text and len(note) > 20, label
        assert tx.tokenize(enc, text)


@pytest.mark.parametrize("text", ["hello world", "naïve café, 你好!\n\tTabs and\r\nlines", "👨‍👩‍👧 family 🇫🇷", "e\u0301\u0301x"])
def test_token_bytes_and_offsets_cover_the_text(enc, text):
    tokens = tx.tokenize(enc, text)
    assert b"".join(t.bytes for t in tokens) == text.encode("utf-8")
    for t in tokens:
        assert 0 <= t.start < t.end <= len(text)
        if not t.partial:
            assert text[t.start:t.end].encode("utf-8") == t.bytes
        else:  # a partial token's bytes lie inside the characters of its span
            assert t.bytes in text[t.start:t.end].encode("utf-8") or t.text == "\ufffd" or "\ufffd" in t.text


def test_emoji_tokens_are_partial_bytes_and_share_one_group(enc):
    text = "👨‍👩‍👧 ok"
    tokens = tx.tokenize(enc, text)
    groups = tx.group_tokens(text, tokens)
    family = groups[0]
    assert text[family.start:family.end] == "👨‍👩‍👧"  # one grapheme = one colour, however many tokens
    assert family.split and len(family.tokens) > 3
    assert all(tokens[k].partial for k in family.tokens if len(tokens[k].bytes) < 3)
    assert [text[g.start:g.end] for g in groups[1:]] == [" ok"]


def test_groups_partition_the_text_at_grapheme_boundaries(enc):
    for text in ["cafe\u0301 ok", "🇫🇷🇩🇪 flags", "你好世界", "plain ascii text", "a\u0308\u0301b"]:
        groups = tx.group_tokens(text, tx.tokenize(enc, text))
        assert "".join(text[g.start:g.end] for g in groups) == text
        import regex
        boundaries = {m.start() for m in regex.finditer(r"\X", text)} | {len(text)}
        assert all(g.start in boundaries and g.end in boundaries for g in groups)
    # the combining accent is its own token but must stay with its letter
    text = "cafe\u0301"
    groups = tx.group_tokens(text, tx.tokenize(enc, text))
    assert any(text[g.start:g.end].endswith("e\u0301") and g.split for g in groups)


def test_merge_tree_goes_down_to_bytes_in_rank_order(enc):
    tree = tx.merge_tree(enc, 15339)  # "hello"
    assert tree["id"] == 15339 and tree["bytes"] == b"hello"

    def check(node):
        assert enc._mergeable_ranks[node["bytes"]] == node["id"]
        if node["children"]:
            left, right = node["children"]
            assert left["bytes"] + right["bytes"] == node["bytes"]
            # a merge happens after the merges that built its parts
            assert node["id"] > left["id"] and node["id"] > right["id"]
            return check(left) + check(right)
        assert len(node["bytes"]) == 1
        return [node["bytes"]]

    assert b"".join(check(tree)) == b"hello"
    lines = tx.merge_tree_lines(tree)
    assert lines[0].startswith("15339 'hello' = ")
    assert len(lines) == 4  # hello has 5 bytes: 4 merges


def test_merge_tree_of_special_single_byte_and_unknown_ids(enc):
    assert tx.merge_tree(enc, 100257)["special"]
    assert "special" in tx.merge_tree_lines(tx.merge_tree(enc, 100257))[0]
    assert "single byte" in tx.merge_tree_lines(tx.merge_tree(enc, 220))[0]
    with pytest.raises(ValueError, match="not in"):
        tx.merge_tree(enc, 10 ** 9)


def test_presplit_chunks_bound_every_token(enc):
    text = "Hello world's 12345 <|endoftext|>  indented\n\n\tcode();"
    chunks = tx.presplit(enc, text)
    assert "".join(c["text"] for c in chunks) == text
    assert [c["text"] for c in chunks if c["special"]] == ["<|endoftext|>"]
    assert "123" in [c["text"] for c in chunks] and "45" in [c["text"] for c in chunks]
    cuts = {c["start"] for c in chunks}
    for t in tx.tokenize(enc, text):
        covering = [c for c in chunks if c["start"] <= t.start and t.end <= c["end"]]
        assert covering, f"token {t.text!r} crosses a pre-split boundary"
    assert cuts


def test_special_tokens_follow_the_toggle(enc):
    assert [t.id for t in tx.tokenize(enc, "<|endoftext|>")] == [100257]
    plain = tx.tokenize(enc, "<|endoftext|>", allow_special=False)
    assert len(plain) > 1 and not any(t.special for t in plain)


def test_bad_text_is_refused_with_the_reason(enc):
    with pytest.raises(tx.TextTooLong, match="limit"):
        tx.tokenize(enc, "a" * (tx.MAX_TEXT_CHARS + 1))
    with pytest.raises(tx.TextError, match="lone surrogate"):
        tx.tokenize(enc, "ok \ud800 no")


def test_counts(enc):
    text = "héllo 👋"
    c = tx.counts(text, tx.tokenize(enc, text))
    assert c["chars"] == 7 and c["bytes"] == len(text.encode()) == 11
    assert c["tokens"] == len(enc.encode(text)) and c["chars_per_token"] == round(7 / c["tokens"], 2)


def test_html_escapes_user_text_and_marks_whitespace(enc):
    text = "<script>alert(1)</script> a\tb\nc"
    html_ws = tx.render_tokens_html(text, tx.tokenize(enc, text), enc, show_whitespace=True)
    assert "<script" not in html_ws and "&lt;script" in html_ws
    assert "·" in html_ws and "→" in html_ws and "↵" in html_ws
    html_plain = tx.render_tokens_html(text, tx.tokenize(enc, text), enc, show_whitespace=False)
    assert "·" not in html_plain and "→" not in html_plain
    assert html_ws.count('tabindex="0"') == len(tx.group_tokens(text, tx.tokenize(enc, text)))


def test_compare_reports_the_difference(enc):
    other = tx.tokenize(enc, "9.11 vs 9.9")
    out = tx.compare(enc, enc, "9.11 vs 9.9")
    assert out["a"]["count"] == out["b"]["count"] == len(other) and out["difference"] == 0
    assert "difference +0" in out["summary"]
