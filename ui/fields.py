"""Small helpers shared by tabs: parsing an input, wiring a Stop button (no app logic)."""
from __future__ import annotations

import gradio as gr

from ui.login import public

RUNNING = "⏳"  # a status line that starts with this says a run is going (see wire_stop)


def parse_seed(text: str | None) -> int | None:
    """A seed typed in a textbox: empty means random (None). A gr.Number cannot be empty: it shows and sends 0."""
    text = (text or "").strip()
    if text and not text.lstrip("-").isdigit():
        raise ValueError(f"seed must be a whole number or empty, not {text!r}")
    return int(text) if text else None


def wire_stop(halt: gr.Button, runs: list, status: gr.components.Component, stopped: str) -> None:
    """■ Stop for handlers that stream a status line: it says `stopped` at once, cancels the runs (Gradio's `cancels`, as the Chat
    tab's Stop; the handler's `finally` sets the engine's cancel event, so it stops at its next token) and,
    once a cancelled run is over (it counts as failed), puts `stopped` on the status line if that still said
    the run was going, not over an error such as a missing login."""
    # "stopped" shows the moment Stop is pressed (the cancelled run's end may come a token later).
    halt.click(public(lambda s: stopped if (s or "").startswith(RUNNING) else gr.skip()), [status], [status], cancels=runs,
               show_progress="hidden")
    for run in runs:
        run.failure(public(lambda s: stopped if (s or "").startswith(RUNNING) else gr.skip()), [status], [status])


def repetition_controls(prefix: str) -> list[gr.Slider]:
    """The three repetition controls of SamplingParams (OpenAI's frequency/presence penalties, and the
    multiplicative repetition penalty of HF/vLLM), as sliders with elem_ids `<prefix>-frequency-penalty`..."""
    return [
        gr.Slider(-2, 2, value=0, step=0.05, elem_id=f"{prefix}-frequency-penalty",
                  label="Frequency penalty (−2…2): lowers a token's logit by this × how often it already appeared"),
        gr.Slider(-2, 2, value=0, step=0.05, elem_id=f"{prefix}-presence-penalty",
                  label="Presence penalty (−2…2): lowers every token that already appeared, once"),
        gr.Slider(1, 2, value=1, step=0.05, elem_id=f"{prefix}-repetition-penalty",
                  label="Repetition penalty (1 = off): divides the logits of tokens already seen"),
    ]


def penalty_values(freq, pres, rep) -> dict:
    """The sliders' values as SamplingParams fields."""
    return {"frequency_penalty": float(freq or 0), "presence_penalty": float(pres or 0),
            "repetition_penalty": float(rep or 1)}
