"""Generate tab: pick a model, type a prompt, watch the completion stream in.

Layout and wiring only: the engine (backend.engine) does the work, through the same service the
OpenAI-compatible API uses.
"""
from __future__ import annotations

import asyncio
import html
import threading

import gradio as gr

from backend.engine import aiterate
from backend.sampling import SamplingParams

EXAMPLE = "The three most useful things to know about transformers are"


def build(pg) -> None:
    names = pg.registry.names()
    default = pg.cfg.default_model if pg.cfg.default_model in names else names[0]

    with gr.Row():
        model = gr.Dropdown(names, value=default, label="Model", scale=3, elem_id="gen-model")
        mode = gr.Radio(["completion", "chat"], value="completion", label="Prompt as", scale=2,
                        info="chat wraps the prompt as one user message in the model's chat format")
        refresh = gr.Button("↻ models", scale=0, size="sm")
    prompt = gr.Textbox(label="Prompt", value=EXAMPLE, lines=4, elem_id="gen-prompt")
    with gr.Row():
        temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature (0 = greedy)", elem_id="gen-temperature")
        top_p = gr.Slider(0.01, 1, value=0.95, step=0.01, label="Top-p")
        top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
        max_tokens = gr.Slider(1, 4096, value=128, step=1, label="Max new tokens", elem_id="gen-max-tokens")
    with gr.Row():
        seed = gr.Textbox(label="Seed", placeholder="empty = random; a number reproduces the sample")
        stop = gr.Textbox(label="Stop strings (one per line)", lines=1)
    with gr.Row():
        run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        halt = gr.Button("Stop", variant="stop", elem_id="gen-stop")
    output = gr.Textbox(label="Completion", lines=10, interactive=False, elem_id="gen-output")
    status = gr.Markdown(elem_id="gen-status")

    async def generate(name, mode, text, temperature, top_p, top_k, max_tokens, seed, stop):
        try:
            seed = (seed or "").strip()
            if seed and not seed.lstrip("-").isdigit():
                raise ValueError(f"seed must be a whole number, not {seed!r}")
            engine = await asyncio.to_thread(pg.engines.get, name)  # may load the model the first time
            params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                    max_tokens=int(max_tokens), seed=int(seed) if seed else None,
                                    stop=[s for s in (stop or "").splitlines() if s])
            stream = engine.stream_text(text or "", params, chat=(mode == "chat"), cancel=(cancel := threading.Event()))
        except (ValueError, ImportError) as e:
            yield "", f"⚠ {html.escape(str(e))}"
            return
        answer = ""
        try:
            async for answer in aiterate(stream, cancel):
                yield answer, "generating…"
        except ValueError as e:
            yield answer, f"⚠ {html.escape(str(e))}"
            return
        yield answer, f"done · {engine.name}"

    event = run.click(generate, [model, mode, prompt, temperature, top_p, top_k, max_tokens, seed, stop],
                      [output, status])
    submitted = prompt.submit(generate, [model, mode, prompt, temperature, top_p, top_k, max_tokens, seed, stop],
                              [output, status])
    halt.click(None, None, None, cancels=[event, submitted])
    refresh.click(lambda: gr.update(choices=pg.registry.names()), None, model)
