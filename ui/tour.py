"""The "Start here" landing tab and the tour bar above the tabs: each step of backend.tour opens its tab (and
sub-tab) with its preset set, and the bar says what to notice, with Back / Next. Layout and wiring only."""
from __future__ import annotations

import gradio as gr

from backend.tour import STEPS, step_markdown
from ui.login import public

INTRO = ("## Start here\nA guided tour through *Deep Dive into LLMs like ChatGPT*, in the lecture's order: tokens, "
         "pretraining, the base model, SFT, hallucinations and tools, RL, RLHF and the Arena. Each **Open** switches to "
         "the tab with the example set up; the bar above the tabs says what to notice and takes you to the next step. "
         "Tokenizer, Generate and Chat need no account; Training, Labeling, Arena and Practice ask you to sign in "
         "(top right).")


def build_start_here() -> list[gr.Button]:
    """The landing tab's list of steps; returns one Open button per step (wired by `wire`)."""
    gr.Markdown(INTRO)
    buttons, chapter = [], None
    for i, s in enumerate(STEPS):
        if s.chapter != chapter:
            chapter = s.chapter
            gr.Markdown(f"### {chapter}")
        with gr.Row(equal_height=True):
            gr.Markdown(f"**{s.demo}. {s.title}** · {s.notice}", elem_classes=["pg-tour-step"])
            buttons.append(gr.Button("Open →", size="sm", scale=0, min_width=90, elem_id=f"tour-open-{i + 1}"))
    return buttons


def build_bar():
    """The tour bar (hidden until a step is opened): what to notice, Back, Next, Close."""
    with gr.Row(visible=False, elem_id="tour-bar", equal_height=True) as bar:
        text = gr.Markdown(elem_id="tour-text")
        back = gr.Button("← Back", size="sm", scale=0, min_width=80, elem_id="tour-back")
        nxt = gr.Button("Next →", size="sm", scale=0, min_width=80, elem_id="tour-next")
        close = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id="tour-close")
    return bar, text, back, nxt, close


def wire(opens: list[gr.Button], bar_parts, tabs: gr.Tabs, handles: dict[str, dict]) -> None:
    """`handles[tab id]` are the controls a tab lets the tour set ("tabs" for its inner tabs, "preset", ...)."""
    bar, text, back, nxt, close = bar_parts
    at = gr.State(0)
    targets = [(tab, key, comp) for tab, h in handles.items() for key, comp in h.items()]
    outputs = [at, bar, text, tabs, *[c for _, _, c in targets]]

    def go(i: int):
        i = max(0, min(len(STEPS) - 1, i))
        s = STEPS[i]
        sets = []
        for tab, key, _ in targets:
            if tab != s.tab:
                sets.append(gr.skip())
            elif key == "tabs":
                sets.append(gr.Tabs(selected=s.subtab) if s.subtab else gr.skip())
            else:
                sets.append(s.value if key == s.target and s.value is not None else gr.skip())
        return i, gr.Row(visible=True), step_markdown(i), gr.Tabs(selected=s.tab), *sets

    # Tour steps only switch tabs and fill presets: public.
    for i, b in enumerate(opens):
        b.click(public(lambda i=i: go(i)), None, outputs)
    back.click(public(lambda i: go(i - 1)), at, outputs)
    nxt.click(public(lambda i: go(i + 1)), at, outputs)
    close.click(public(lambda: gr.Row(visible=False)), None, bar)
