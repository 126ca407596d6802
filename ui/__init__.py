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
# Which tabs need an account, said in the header before anyone clicks (the handlers check it regardless).
ACCOUNT_NOTE = ("No account needed: **Tokenizer · Generate · Chat** (training a BPE and chat tools need one). Sign in for "
                "**Training** (operators start runs), "
                "**Labeling** (annotators rank, write and review; operators run sets), **Arena** and **Practice** (any "
                "account); **Models** lists every model (admins add served ones, operators export).")


def build_ui(pg) -> gr.Blocks:
    from ui import model_lists, next_steps, tour
    from ui.login import build_login

    model_lists.take()  # nothing left over from an earlier build
    with gr.Blocks(title="LLM Playground") as demo:
        with gr.Row(equal_height=True, elem_id="pg-header"):
            gr.Markdown("# LLM Playground\nEvery stage of building an assistant, on models that really train and serve.",
                        elem_id="pg-title")
            with gr.Column(scale=1, min_width=360):
                build_login()  # one sign-in for every tab, with the role once signed in
                gr.Markdown(ACCOUNT_NOTE if pg.cfg.open_inference else "This server lets only signed-in users use any "
                            "tab; the roles are as follows. " + ACCOUNT_NOTE.split(". ", 1)[1], elem_id="pg-account-note")
        model_status(pg)
        bar = tour.build_bar()
        handles: dict[str, dict] = {}
        with gr.Tabs() as tabs:
            with gr.Tab("Start here", id="start"):
                opens = tour.build_start_here()
            for module, label in TABS:
                with gr.Tab(label, id=module):
                    handles[module] = import_module(f"ui.{module}").build(pg) or {}
        dropdowns = model_lists.wire(demo, tabs)  # a model registered while the app runs is offered without a restart
        steps = handles["training"].pop("_next")  # a finished job's next steps (wired below, by role)
        # Views only some roles use (operator forms): shown once the session's user has the role, on page load
        # and whenever the header's sign-in changes who is signed in (it clicks this hidden button).
        gated = [pair for h in handles.values() for pair in h.pop("_roles", [])]
        auth_changed = gr.Button("auth changed", visible="hidden", elem_id="pg-auth-refresh")
        next_steps.wire(pg, steps, tabs, dropdowns, handles, auth_changed)

        @public  # shows or hides views by the caller's own role; the handlers behind them check it again
        def role_views(request: gr.Request):
            from backend.auth import user_from_request
            user = user_from_request(pg, request.headers, request.cookies) if request is not None else None
            return [gr.Tab(visible=bool(user and user.can(role))) for _, role in gated]

        demo.load(role_views, None, [t for t, _ in gated], show_progress="hidden")
        auth_changed.click(role_views, None, [t for t, _ in gated], show_progress="hidden")
        tour.wire(opens, bar, tabs, handles)
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
