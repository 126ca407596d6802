"""Tokenizer tab: explore any encoding, compare two, see a chat rendered, train your own BPE.

Layout and wiring only: every computation is in backend.tokenizer_explorer, backend.bpe and backend.corpora.
"""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import pandas as pd

from backend import bpe, corpora
from backend import tokenizer_explorer as tx
from ui.login import door, public

# Clicking a chunk copies its ids into the "inspect" box, which shows the merge tree (server side).
SIZE_JS = """
const note = element.querySelector('.tok-size-note');
document.addEventListener('input', (e) => {
  const t = e.target;
  if (!t.closest || !t.closest('#tok-text')) return;
  const n = t.value.length;
  note.textContent = n > LIMIT ? '⚠ text is ' + n.toLocaleString('en-US') + ' characters; the limit is '
    + (LIMIT).toLocaleString('en-US') : '';
}, true);
"""
CLICK_JS = """
element.addEventListener('click', (e) => {
  const tok = e.target.closest('[data-ids]');
  if (!tok) return;
  const box = document.querySelector('#tok-inspect textarea, #tok-inspect input');
  if (!box) return;
  box.value = tok.dataset.ids.split(' ')[0];
  box.dispatchEvent(new Event('input', {bubbles: true}));
});
"""
SAMPLE_BPE_TEXT = "The tokenizer turns text into tokens: bytes first, then the most frequent pairs merge."


def _error(e: Exception) -> str:
    return f"⚠ {html.escape(str(e))}"


def build(pg) -> None:
    data_dir = pg.cfg.data_dir

    def encoding_choices() -> list[str]:
        return tx.list_encodings(data_dir)

    @public
    def view(text, name, show_ws, show_ids, allow_special):
        try:
            enc = tx.get_encoding(name, data_dir)
            tokens = tx.tokenize(enc, text or "", allow_special)
        except ValueError as e:
            return _error(e), "", ""
        shown = tx.render_tokens_html(text or "", tokens, enc, show_whitespace=show_ws, show_ids=show_ids)
        chunks = tx.render_presplit_html(tx.presplit(enc, text or "", allow_special), show_ws)
        return tx.counts_markdown(tx.counts(text or "", tokens)), shown, chunks

    @public
    def side_by_side(text, name_a, name_b, show_ws):
        if not name_b:
            return "Pick a second encoding.", ""
        try:
            enc_a, enc_b = tx.get_encoding(name_a, data_dir), tx.get_encoding(name_b, data_dir)
            summary = tx.compare(enc_a, enc_b, text or "")["summary"]
            tokens_b = tx.tokenize(enc_b, text or "")
        except ValueError as e:
            return _error(e), ""
        return summary, tx.render_tokens_html(text or "", tokens_b, enc_b, show_whitespace=show_ws)

    @public
    def inspect(token_id, name):
        try:
            enc = tx.get_encoding(name, data_dir)
            tid = int(str(token_id).strip())
            return "\n".join(tx.merge_tree_lines(tx.merge_tree(enc, tid), max_lines=200))
        except ValueError as e:
            return f"⚠ {e}"

    gr.Markdown("Text becomes UTF-8 bytes (256 symbols), then byte-pair merges make longer tokens. "
                "Type, or pick a preset. Hover or click a chunk for its id, bytes and merge tree.")
    with gr.Tabs() as tabs:
        with gr.Tab("Explore", id="tok-explore"):
            with gr.Row():
                enc_a = gr.Dropdown(encoding_choices(), value="cl100k_base", label="Encoding", elem_id="tok-encoding",
                                    allow_custom_value=False, scale=2)
                show_ws = gr.Checkbox(True, label="Show whitespace (· space, → tab, ↵ newline)")
                show_ids = gr.Checkbox(True, label="Show ids")
                allow_special = gr.Checkbox(True, label="Special tokens in text (<|endoftext|>) are special")
                refresh = gr.Button("↻ encodings", size="sm", scale=0)
            with gr.Row():
                preset_buttons = [gr.Button(label, size="sm", elem_classes=["tok-preset"]) for label, _, _ in tx.PRESETS]
            note = gr.Markdown("", elem_id="tok-note")
            text = gr.Textbox(value=tx.PRESETS[0][1], lines=5, max_lines=20, label="Text", elem_id="tok-text",
                              placeholder="Type or paste text")
            # A paste over the limit is answered in the browser at once (the server says the same a moment later).
            gr.HTML('<div class="tok-size-note" role="status"></div>', js_on_load=SIZE_JS.replace(
                "LIMIT", str(tx.MAX_TEXT_CHARS)), elem_id="tok-size-note", padding=False)
            counts0, html0, split0 = view(tx.PRESETS[0][1], "cl100k_base", True, True, True)
            counts_md = gr.Markdown(counts0, elem_id="tok-counts")
            chunks = gr.HTML(html0, css_template=tx.CSS, js_on_load=CLICK_JS, elem_id="tok-chunks")
            with gr.Row():
                inspect_id = gr.Textbox(label="Inspect token id (click a chunk, or type an id)", elem_id="tok-inspect",
                                        scale=1)
                tree = gr.Textbox(label="Merge tree: how BPE built it, down to single bytes", lines=6, max_lines=30,
                                  elem_id="tok-tree", scale=3)
            with gr.Accordion("Regex pre-split: the chunks made before BPE (merges never cross them)", open=False):
                presplit_html = gr.HTML(split0, css_template=tx.CSS, elem_id="tok-presplit")
            with gr.Accordion("Side by side: the same text in a second encoding", open=True):
                enc_b = gr.Dropdown(encoding_choices(), value=None, label="Second encoding", elem_id="tok-encoding-b")
                compare_md = gr.Markdown("Pick a second encoding.", elem_id="tok-compare")
                compare_html = gr.HTML("", css_template=tx.CSS, elem_id="tok-chunks-b")

            main_inputs = [text, enc_a, show_ws, show_ids, allow_special]
            for trigger in (text.change, enc_a.change, show_ws.change, show_ids.change, allow_special.change):
                trigger(view, main_inputs, [counts_md, chunks, presplit_html], show_progress="hidden")
            for trigger in (text.change, enc_a.change, enc_b.change, show_ws.change):
                trigger(side_by_side, [text, enc_a, enc_b, show_ws], [compare_md, compare_html], show_progress="hidden")
            inspect_id.change(inspect, [inspect_id, enc_a], tree, show_progress="hidden")
            for button, (_, preset_text, preset_note) in zip(preset_buttons, tx.PRESETS):
                button.click(public(lambda t=preset_text, n=preset_note: (t, f"**What to notice:** {n}")), None, [text, note])
            refresh.click(public(lambda: (gr.update(choices=encoding_choices()),) * 2), None, [enc_a, enc_b])

        with gr.Tab("Chat format", id="tok-chat") as chat_tab:
            _chat_tab(data_dir, encoding_choices, chat_tab)

        with gr.Tab("Train your own BPE", id="tok-bpe"):
            _bpe_tab(pg, encoding_choices, [enc_a, enc_b])
    return {"tabs": tabs, "text": text}  # what the Start-here tour sets (ui.tour)


def _chat_tab(data_dir: Path, encoding_choices, tab) -> None:
    @public
    def render(rows, name, gen_prompt, show_ws):
        messages = [{"role": str(r[0]).strip(), "content": str(r[1])} for r in _rows(rows) if str(r[0]).strip()]
        try:
            enc = tx.chat_encoding(name, data_dir)
            v = tx.chat_view(messages, enc, gen_prompt)
        except (ValueError, KeyError) as e:
            return _error(e), "", ""
        except ImportError:
            return "⚠ the chat format (models.chat_format) is not available yet", "", ""
        tokens = tx.tokens_from_ids(enc, v["ids"])
        summary = (f"**{v['count']:,} tokens** for the whole conversation · {v['loss_tokens']} get training loss "
                   f"(assistant) · generation prompt: `{v['generation_prompt']!r}`" if v["generation_prompt"]
                   else f"**{v['count']:,} tokens** · {v['loss_tokens']} get training loss")
        shown = tx.render_tokens_html(v["text"], tokens, enc, show_whitespace=show_ws, mask=v["mask"],
                                      highlight_from=v["generation_prompt_from"])
        return summary, shown, v["text"]

    gr.Markdown(tx.CHAT_NOTE)
    with gr.Row():
        enc = gr.Dropdown(encoding_choices(), value="smollm2", label="Encoding", elem_id="tok-chat-encoding")
        gen_prompt = gr.Checkbox(True, label="Append the generation prompt (what the server adds before sampling)")
        show_ws = gr.Checkbox(True, label="Show whitespace")
    rows = gr.Dataframe([[m["role"], m["content"]] for m in tx.CHAT_PRESET], headers=["role", "content"],
                        datatype=["str", "str"], interactive=True, label="Messages (role: system, user, assistant, tool)",
                        elem_id="tok-chat-rows", wrap=True)
    go = gr.Button("Render", variant="primary")
    summary = gr.Markdown(elem_id="tok-chat-counts")
    shown = gr.HTML("", css_template=tx.CSS, elem_id="tok-chat-chunks")
    raw = gr.Code(label="Rendered text with special tokens", language=None, elem_id="tok-chat-text")
    inputs = [rows, enc, gen_prompt, show_ws]
    for trigger in (go.click, tab.select, enc.change, gen_prompt.change, show_ws.change, rows.input):
        trigger(render, inputs, [summary, shown, raw], show_progress="hidden")


def _rows(rows) -> list:
    if isinstance(rows, pd.DataFrame):
        return rows.values.tolist()
    return list(rows or [])


def _bpe_tab(pg, encoding_choices, encoding_dropdowns) -> None:
    data_dir = pg.cfg.data_dir

    def corpus(source, pasted, files, max_chars):
        if source == "pasted text":
            return corpora.load_corpus(text=pasted or "", max_chars=max_chars)
        if source == "uploaded files":
            if not files:
                raise ValueError("upload .txt, .md or .jsonl files first")
            return corpora.load_corpus([Path(f if isinstance(f, str) else f.name) for f in files], max_chars=max_chars)
        return corpora.load_corpus(source, max_chars=max_chars)

    def pattern_of(preset, custom):
        return custom if preset == "custom" else preset

    @public
    def start(source, pasted, files, max_chars, preset, custom, sample, show_ws=True):
        try:
            key = bpe.STEP_SESSIONS.start(corpus(source, pasted, files, int(max_chars)), pattern_of(preset, custom))
        except ValueError as e:
            return None, _error(e), [], ""
        trainer = bpe.STEP_SESSIONS.get(key)
        info = (f"Ready: {sum(len(w) * c for w, c in zip(trainer.words, trainer.weights)):,} bytes in "
                f"{len(trainer.words):,} distinct chunks. Press Step: the most frequent adjacent pair becomes token 256.")
        return key, info, [], _recolour(trainer, sample, show_ws)

    def step(key, n, sample, show_ws, table):
        trainer = bpe.STEP_SESSIONS.get(key)
        if trainer is None:
            return key, "Press Start first (step mode keeps only the few most recent sessions).", table, ""
        rows = list(_rows(table))
        for _ in range(n):
            m = trainer.step()
            if m is None:
                break
            rows.append([m.new_id, f"{m.pair[0]} + {m.pair[1]}",
                         tx.visible_whitespace(bpe._show(m.left) + " + " + bpe._show(m.right)),
                         tx.visible_whitespace(bpe._show(m.bytes)), m.count])
        info = f"{len(trainer.merges)} merges · vocabulary {trainer.vocab_size}"
        return key, info, rows, _recolour(trainer, sample, show_ws)

    @door(pg, "learner")
    def train(source, pasted, files, max_chars, preset, custom, vocab_size, name):
        try:
            text = corpus(source, pasted, files, int(max_chars))
            pattern = pattern_of(preset, custom)
            result = bpe.train_and_register(text, int(vocab_size), pattern, (name or "").strip(), data_dir,
                                            source=source)
            enc = tx.get_encoding(result["name"], data_dir)
            curve = bpe.length_curve(text, enc._mergeable_ranks, pattern)
        except ValueError as e:
            return (_error(e), None) + (gr.update(),) * len(encoding_dropdowns)
        msg = (f"Trained **{result['name']}** with rustbpe in {result['seconds']} s: {result['merges']:,} merges, "
               f"vocabulary {result['vocab_size']:,} (with <|endoftext|>, <|im_start|>, <|im_end|>), "
               f"{result['tokens_per_1000_chars']} tokens per 1000 characters. Saved to `{result['path']}`; "
               "pick it in the Explore tab or for pretraining.")
        frame = pd.DataFrame(curve)
        choices = encoding_choices()
        return (msg, frame) + tuple(gr.update(choices=choices) for _ in encoding_dropdowns)

    gr.Markdown("Train a byte-level BPE on a corpus. **Step** shows the first merges one at a time (the pair, its "
                "count, the new id) and re-colours the sample; **Train** runs rustbpe to the full vocabulary, saves a "
                "tiktoken encoding and draws the trade-off: a bigger vocabulary means shorter sequences.\n\n"
                "**What to notice:** the text starts as UTF-8 bytes, 256 symbols. The most frequent adjacent pair "
                "becomes symbol 256 (with split pattern *none* on English prose it is a pair like 'e' + ' ' or "
                "'t' + 'h'; on code, runs of spaces), then the next, and so on: every merge adds one symbol to the "
                "vocabulary and removes as many tokens from the corpus as the pair's count.")
    with gr.Row():
        source = gr.Radio(corpora.list_corpora() + ["pasted text", "uploaded files"], value="python-docs",
                          label="Corpus", elem_id="bpe-source")
        max_chars = gr.Number(1_000_000, label="Use at most this many characters", precision=0, minimum=1000)
    with gr.Row():
        pasted = gr.Textbox(lines=4, label="Pasted text", elem_id="bpe-pasted")
        files = gr.File(file_count="multiple", file_types=[".txt", ".md", ".jsonl"], label="Upload .txt / .md / .jsonl")
    with gr.Row():
        preset = gr.Dropdown(list(bpe.SPLIT_PATTERNS) + ["custom"], value="gpt4", label="Split pattern")
        custom = gr.Textbox(label="Custom split regex", placeholder=r"\w+|\s+|[^\w\s]+")
    trainer = gr.State(None)  # the key of this session's trainer in bpe.STEP_SESSIONS
    with gr.Row():
        start_btn = gr.Button("Start / reset step mode", elem_id="bpe-start")
        step1 = gr.Button("Step", variant="primary", elem_id="bpe-step")
        step10 = gr.Button("Step ×10")
    step_info = gr.Markdown(elem_id="bpe-info")
    merges = gr.Dataframe(headers=["new id", "pair (ids)", "pair", "token", "count"], interactive=False,
                          label="Merges so far", elem_id="bpe-merges")
    sample = gr.Textbox(SAMPLE_BPE_TEXT, label="Sample text, tokenized with the merges so far")
    sample_html = gr.HTML("", css_template=tx.CSS, elem_id="bpe-sample")
    corpus_inputs = [source, pasted, files, max_chars, preset, custom]
    start_btn.click(start, corpus_inputs + [sample], [trainer, step_info, merges, sample_html])
    # one queue for both step buttons: a trainer must not be stepped by two events at once
    step1.click(public(lambda t, s, m: step(t, 1, s, True, m)), [trainer, sample, merges],
                [trainer, step_info, merges, sample_html], concurrency_id="bpe-step")
    step10.click(public(lambda t, s, m: step(t, 10, s, True, m)), [trainer, sample, merges],
                 [trainer, step_info, merges, sample_html], concurrency_id="bpe-step")
    sample.change(public(lambda k, s: _recolour(bpe.STEP_SESSIONS.get(k), s, True)), [trainer, sample], sample_html,
                  show_progress="hidden")

    with gr.Row():
        vocab_size = gr.Number(4096, label="Vocabulary size (merges + 256)", precision=0, minimum=257,
                               maximum=bpe.MAX_VOCAB)
        name = gr.Textbox(label="Save as (encoding name)", placeholder="my-bpe-4k", elem_id="bpe-name")
        train_btn = gr.Button("Train with rustbpe", variant="primary", elem_id="bpe-train")
    train_info = gr.Markdown(elem_id="bpe-train-info")
    curve = gr.LinePlot(x="vocab_size", y="tokens_per_1000_chars", title="Sequence length vs vocabulary size",
                        x_title="vocabulary size", y_title="tokens per 1000 characters", elem_id="bpe-curve")
    train_btn.click(train, corpus_inputs + [vocab_size, name], [train_info, curve, *encoding_dropdowns])


def _recolour(trainer, sample, show_ws) -> str:
    if trainer is None or not sample:
        return ""
    try:
        enc = trainer.encoding()
        tokens = tx.tokenize(enc, sample, allow_special=False)
    except ValueError as e:
        return _error(e)
    return (tx.render_tokens_html(sample, tokens, enc, show_whitespace=show_ws)
            + f'<div class="tokviz"><div class="note">{len(tokens)} tokens for {len(sample)} characters</div></div>')
