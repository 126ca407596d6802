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


def wire(demo: gr.Blocks, tabs: list[gr.Tab]) -> None:
    """Refill every model dropdown made so far on page load and on each tab's select."""
    lists = take()
    if not lists:
        return

    @public  # model names are public (GET /v1/models)
    def refresh():
        return [gr.update(choices=choices()) for _, choices in lists]

    outputs = [dd for dd, _ in lists]
    demo.load(refresh, None, outputs, show_progress="hidden")
    for tab in tabs:
        tab.select(refresh, None, outputs, show_progress="hidden")
