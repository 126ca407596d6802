"""Small input helpers shared by tabs (parsing only; no app logic)."""
from __future__ import annotations


def parse_seed(text: str | None) -> int | None:
    """A seed typed in a textbox: empty means random (None). A gr.Number cannot be empty: it shows and sends 0."""
    text = (text or "").strip()
    if text and not text.lstrip("-").isdigit():
        raise ValueError(f"seed must be a whole number or empty, not {text!r}")
    return int(text) if text else None
