"""Every model dropdown of the UI, refilled from the registry on page load and whenever a tab is selected.

A job registers its model while the app runs; a dropdown filled once at start would reject the new name
("not in the list of choices") until a restart. Tabs make their model dropdowns with `model_dropdown`, and
`ui.build_ui` wires one refresh of all of them to the page's load and to every tab's select.
"""
from __future__ import annotations

from typing import Callable

import gradio as gr

from ui.login import public

_LISTS: list[tuple[gr.Dropdown, Callable[[], list]]] = []  # of the Blocks being built (build_ui takes them)


def model_dropdown(choices: Callable[[], list], **kwargs) -> gr.Dropdown:
    """A gr.Dropdown whose choices are `choices()` (e.g. backend.models.model_names for a use), now and on
    every refresh."""
    dd = gr.Dropdown(choices(), **kwargs)
    _LISTS.append((dd, choices))
    return dd


def take() -> list[tuple[gr.Dropdown, Callable[[], list]]]:
    lists = list(_LISTS)
    _LISTS.clear()
    return lists


def wire(demo: gr.Blocks, tabs: gr.Tabs) -> dict[str, tuple[gr.Dropdown, Callable[[], list]]]:
    """Refill every model dropdown made so far on page load and when a tab of `tabs` is selected (one listener on
    the Tabs: a select listener on each gr.Tab kept a streaming tab's Stop click from completing). Only lists whose choices
    changed since this page last got them are sent (a per-page State holds what it shows): an unchanged list is
    left alone, so a tab switch never disturbs a dropdown someone is using. Returns elem_id -> (dropdown, its
    choices function) for what else fills them (ui.next_steps)."""
    lists = take()
    if not lists:
        return {}
    shown = gr.State([dd.choices for dd, _ in lists])  # what every new page starts with: the build's choices

    @public  # model names are public (GET /v1/models)
    def refresh(before):
        now = [[tuple(c) if isinstance(c, (list, tuple)) else (c, c) for c in choices()] for _, choices in lists]
        updates = [gr.update(choices=new) if new != [tuple(c) for c in (old or [])] else gr.skip()
                   for new, old in zip(now, before)]
        return *updates, now

    outputs = [dd for dd, _ in lists] + [shown]
    demo.load(refresh, shown, outputs, show_progress="hidden")
    tabs.select(refresh, shown, outputs, show_progress="hidden")
    return {dd.elem_id: (dd, choices) for dd, choices in lists if dd.elem_id}
