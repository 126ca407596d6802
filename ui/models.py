"""Models tab: every registered model; admins add a model that another server serves (vLLM, SGLang,
llama.cpp, TGI, another playground) or remove one; operators export a model for those engines. Report cards
(backend.evals): the newest card of every model side by side; operators queue a new one."""
from __future__ import annotations

import gradio as gr
import pandas as pd
from gradio.context import Context

from ui.login import door, public, request_user
from ui.model_lists import model_dropdown

COLUMNS = ["name", "kind", "role", "context", "where", "description"]


def _table(pg) -> pd.DataFrame:
    rows = [[s.name, s.kind, s.role, s.context_length,
             f"{s.remote['model']} @ {s.remote['base_url']}" if s.remote else ("bundled" if s.kind == "bundled" else ""),
             s.description] for s in pg.registry.list()]
    return pd.DataFrame(rows, columns=COLUMNS)


def _cards(pg) -> tuple[pd.DataFrame, str]:
    """The report cards side by side (backend.evals.store) and a line on the models without one."""
    from backend.evals.store import comparison, comparison_table
    comp = comparison(pg.db, pg.registry)
    columns, rows = comparison_table(comp)
    note = (f"No card yet: {', '.join(comp['without_card'])}." if comp["without_card"] else "")
    return pd.DataFrame(rows, columns=columns), note


def _card_details(pg, name: str | None) -> str:
    from backend.evals.card import format_value
    from backend.evals.store import model_cards
    cards = model_cards(pg.db, name, limit=1) if name else []
    if not cards:
        return ""
    c = cards[0]
    lines = [f"**{name}**, graded {c['created_at'][:16].replace('T', ' ')} in {c['seconds']:.0f} s "
             f"({c['config'].get('limit')} questions per row at most):", ""]
    lines += [f"- {r['label']}: **{format_value(r)}**: {r['detail']}" for r in c["rows"]]
    return "\n".join(lines)


def _local_names(pg) -> list[str]:
    return [s.name for s in pg.registry.list() if s.kind != "remote"]


def build(pg) -> None:
    from backend.serving.remote_engine import register_remote
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
    with gr.Accordion("Remove or export a model", open=False) as export_box:
        with gr.Row():
            pick = model_dropdown(pg.registry.names, label="Model", elem_id="models-pick")
            fmt = gr.Radio(["hf", "gguf"], value="hf", label="Export format")
            repo = gr.Textbox(label="Push to Hugging Face repo (optional, needs network)", placeholder="user/my-model")
        with gr.Row():
            export = gr.Button("Export (operators)", elem_id="models-export")
            remove = gr.Button("Remove (admins)", variant="stop", elem_id="models-remove")
    status = gr.Markdown(elem_id="models-status")
    with gr.Accordion("Report cards", open=True):
        gr.Markdown("The same questions asked of every model, greedy, as nanochat's report: held-out problems with "
                    "exact answers, tool questions (a call the tool loop runs, the right answer), questions nobody "
                    "can answer (does it say so?), who it says it is, the reward model's score of its answers to "
                    "the pelican prompts, and bits per byte of held-out text. A job that registers a model queues "
                    "its card; `python -m backend.evals MODEL` prints one.")
        first_table, first_note = _cards(pg)
        cards = gr.Dataframe(first_table, label="Newest report card of each model", interactive=False,
                             elem_id="evals-table")
        cards_note = gr.Markdown(first_note, elem_id="evals-note")
        with gr.Row():
            card_model = gr.Dropdown(pg.registry.names(), label="Model", elem_id="evals-model", scale=3)
            card_limit = gr.Number(8, label="Questions per row", precision=0, minimum=1, maximum=256,
                                   elem_id="evals-limit", scale=1)
            grade = gr.Button("Grade it (operators)", elem_id="evals-grade", scale=1)
            cards_refresh = gr.Button("↻ refresh cards", size="sm", elem_id="evals-refresh", scale=1)
        card_status = gr.Markdown(elem_id="evals-status")
        card_details = gr.Markdown(elem_id="evals-details")

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
        from backend.evals.job import queue_report_card
        card = queue_report_card(pg.db, pg.cfg, spec.name, "registered as a remote model")
        return (*refreshed(), f"Added **{spec.name}**: `{spec.remote['model']}` at {spec.remote['base_url']} "
                              f"(context {spec.context_length})." + (f" Its report card is queued (job {card['id']})."
                                                                     if card else ""))

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

    @public
    def cards_refreshed(name):
        t, note = _cards(pg)
        return t, note, gr.update(choices=pg.registry.names()), _card_details(pg, name)

    @door(pg, "operator")
    def on_grade(n, limit, request: gr.Request):
        user = request_user(pg, request, "operator")
        from backend.jobs import queue
        try:
            job = queue.create_job(pg.db, pg.cfg, user, "eval", {"model": n or "", "limit": int(limit or 8)})
        except (ValueError, LookupError) as e:
            raise gr.Error(str(e))
        return (f"Queued report card job {job['id']} ({job['name']}); the worker grades it after the training jobs "
                "ahead of it. Refresh to see it.")

    here = Context.block if isinstance(Context.block, gr.Tab) else None
    if here is not None and isinstance(here.parent, gr.Tabs):  # fresh cards whenever this tab is opened
        @public
        def on_tab(name, evt: gr.SelectData):
            return cards_refreshed(name) if evt.value == here.label else (gr.update(),) * 4

        here.parent.select(on_tab, card_model, [cards, cards_note, card_model, card_details], show_progress="hidden")
    cards_refresh.click(cards_refreshed, card_model, [cards, cards_note, card_model, card_details])
    card_model.change(public(lambda n: _card_details(pg, n)), card_model, card_details)
    grade.click(on_grade, [card_model, card_limit], card_status)
    refresh.click(refreshed, None, [table, pick])
    add.click(on_add, [name, base_url, remote_model, key_env, tokenizer, chat, check], [table, pick, status])
    remove.click(on_remove, pick, [table, pick, status])
    export.click(on_export, [pick, fmt, repo], status)
    return {"export": export_box}  # what a finished job's "Export it" opens (ui.next_steps)
