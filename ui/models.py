"""Models tab: every registered model; admins add a model that another server serves (vLLM, SGLang,
llama.cpp, TGI, another playground) or remove one; operators export a model for those engines."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from ui.login import door, public, request_user
from ui.model_lists import model_dropdown

COLUMNS = ["name", "kind", "role", "context", "where", "description"]


def _table(pg) -> pd.DataFrame:
    rows = [[s.name, s.kind, s.role, s.context_length,
             f"{s.remote['model']} @ {s.remote['base_url']}" if s.remote else ("bundled" if s.kind == "bundled" else ""),
             s.description] for s in pg.registry.list()]
    return pd.DataFrame(rows, columns=COLUMNS)


def _local_names(pg) -> list[str]:
    return [s.name for s in pg.registry.list() if s.kind != "remote"]


def build(pg) -> None:
    from backend.remote_engine import register_remote
    from models.export import export_dest, export_model

    gr.Markdown("Every model the tabs can use. A **served** model runs on another engine that speaks the OpenAI "
                "API; Chat, Generate, Practice, Arena and Labeling use it like a local one (step mode and "
                "prompt log-probs need local weights). **Export** writes a model for those engines.")
    table = gr.Dataframe(_table(pg), label="Registered models", interactive=False, elem_id="models-table")
    refresh = gr.Button("↻ refresh", size="sm")
    with gr.Accordion("Add a served model (admins)", open=False):
        with gr.Row():
            name = gr.Textbox(label="Name here", placeholder="llama-on-vllm", elem_id="remote-name")
            base_url = gr.Textbox(label="Server /v1 URL", placeholder="http://gpu-node:8000/v1", elem_id="remote-url")
            remote_model = gr.Textbox(label="Model id on that server", elem_id="remote-model")
        with gr.Row():
            key_env = gr.Textbox(label="API key environment variable (optional)", elem_id="remote-key-env")
            tokenizer = gr.Textbox("cl100k_base", label="Local tokenizer matching the server's", elem_id="remote-tokenizer")
            chat = gr.Checkbox(True, label="Chat model (ChatML)")
            check = gr.Checkbox(True, label="Ask the server first", elem_id="remote-check")
        add = gr.Button("Add served model", variant="primary", elem_id="remote-add")
    with gr.Accordion("Remove or export a model", open=False):
        with gr.Row():
            pick = model_dropdown(pg.registry.names, label="Model", elem_id="models-pick")
            fmt = gr.Radio(["hf", "gguf"], value="hf", label="Export format")
            repo = gr.Textbox(label="Push to Hugging Face repo (optional, needs network)", placeholder="user/my-model")
        with gr.Row():
            export = gr.Button("Export (operators)", elem_id="models-export")
            remove = gr.Button("Remove (admins)", variant="stop", elem_id="models-remove")
    status = gr.Markdown(elem_id="models-status")

    @public
    def refreshed():
        return _table(pg), gr.update(choices=pg.registry.names())

    @door(pg, "admin")
    def on_add(n, url, rm, env, tok, is_chat, ask, request: gr.Request):
        request_user(pg, request, "admin")
        try:
            spec = register_remote(pg.registry, (n or "").strip(), (url or "").strip(), (rm or "").strip(),
                                   (env or "").strip() or None, (tok or "").strip() or "cl100k_base",
                                   "chatml" if is_chat else None, None, "", ask)
        except (ValueError, LookupError) as e:
            raise gr.Error(str(e))
        return (*refreshed(), f"Added **{spec.name}**: `{spec.remote['model']}` at {spec.remote['base_url']} "
                              f"(context {spec.context_length}).")

    @door(pg, "admin")
    def on_remove(n, request: gr.Request):
        request_user(pg, request, "admin")
        try:
            pg.registry.delete(n)
        except ValueError as e:
            raise gr.Error(str(e))
        pg.engines.unload(n)
        return (*refreshed(), f"Removed **{n}**.")

    @door(pg, "operator")
    def on_export(n, f, r, request: gr.Request):
        request_user(pg, request, "operator")
        try:
            out = export_model(pg.registry, n, export_dest(pg.cfg, n, f), f, (r or "").strip() or None)
        except (ValueError, LookupError) as e:
            raise gr.Error(str(e))
        return f"Exported **{n}** ({f}) to `{out['path']}`" + (f", pushed to {out['url']}" if out.get("url") else ".")

    refresh.click(refreshed, None, [table, pick])
    add.click(on_add, [name, base_url, remote_model, key_env, tokenizer, chat, check], [table, pick, status])
    remove.click(on_remove, pick, [table, pick, status])
    export.click(on_export, [pick, fmt, repo], status)
