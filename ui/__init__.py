"""The Gradio UI: one module per tab, each a `build(pg)` that lays out its part and wires events to
backend services. No logic lives here.
"""
from __future__ import annotations

from importlib import import_module

import gradio as gr

# (module under ui, tab label) in the order a learner meets them.
TABS: list[tuple[str, str]] = [
    ("tokenizer", "Tokenizer"),  # first: learners start here (issue 3)
    ("completion", "Generate"),
    ("chat", "Chat"),  # system prompts, tools, thinking (issue 7)
    ("training", "Training"),
    ("labeling", "Labeling"),
    ("arena", "Arena"),  # blind side-by-side votes become a leaderboard (DEMOS 18)
    ("practice", "Practice"),  # many samples of a problem with a known answer; voting, best-of-N (DEMOS 14-15)
    ("models", "Models"),  # the registry: served (remote) models for admins, export for operators (issue 14)
]


def build_ui(pg) -> gr.Blocks:
    with gr.Blocks(title="LLM Playground") as demo:
        gr.Markdown("# LLM Playground\nEvery stage of building an assistant, on models that really train and serve.")
        with gr.Tabs():
            for module, label in TABS:
                with gr.Tab(label, id=module):
                    import_module(f"ui.{module}").build(pg)
    return demo
