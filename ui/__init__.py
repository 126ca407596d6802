"""The Gradio UI: one module per tab, each a `build(pg)` that lays out its part and wires events to
backend services. No logic lives here.
"""
from __future__ import annotations

from importlib import import_module

import gradio as gr

from ui.login import public

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
        model_status(pg)
        with gr.Tabs():
            for module, label in TABS:
                with gr.Tab(label, id=module):
                    import_module(f"ui.{module}").build(pg)
    return demo


def model_status(pg) -> None:
    """A line under the title while the default model loads (or if it failed): requests meanwhile wait for
    it rather than fail. Polled from the backend's readiness, the same that /readyz answers."""
    def show():
        r = pg.readiness()
        return gr.update(value=f"⏳ {r['message']}" if not r["ready"] else "", visible=not r["ready"])

    first = show()
    status = gr.Markdown(first["value"], visible=first["visible"], elem_id="model-status")
    timer = gr.Timer(2.0, active=not pg.ready)
    timer.tick(public(lambda: (show(), gr.Timer(active=not pg.ready))), outputs=[status, timer], show_progress="hidden")
