"""Labeling tab: sign in, rank candidates, write demonstrations, and (operators) create sets and
watch agreement and progress. Every button calls a backend.labels service; roles are checked there
(via the session cookie of the Gradio request), never only by hiding a control."""
from __future__ import annotations

import functools
import json
import tempfile

import gradio as gr

from backend.labels import agreement, exchange, guidelines, progress, rankings, sft, snapshots
from backend.labels.candidates import EXAMPLE_PROMPTS
from backend.labels.messages import flatten
from ui.login import build_login, request_user
from ui.ranking_widget import build_ranking_widget


def _model_names(pg) -> list[str]:
    try:
        return [m.name for m in pg.registry.list()]
    except Exception:  # the registry may not be wired in this build
        return [pg.cfg.default_model]


def _errors_to_gr(fn):
    """Service errors become a visible message instead of a stack trace. (functools.wraps keeps the
    signature, which Gradio reads to pass `request: gr.Request`.)"""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, LookupError, PermissionError) as e:
            raise gr.Error(str(e))
    return wrapped


def _chat_preview(messages: list[dict]) -> list[dict]:
    return [m for m in flatten(messages) if m["role"] in ("user", "assistant")] if messages else []


def build_sft(pg) -> None:
    gr.Markdown("Write the ideal assistant reply. **Draft with model** gives you a first version to fix; "
                "the record keeps what the model wrote. Submit keeps every version; Save draft lets you come back.")
    with gr.Accordion("Guidelines", open=False):
        gr.Markdown(lambda: guidelines.get_guidelines(pg.db))
    state = gr.State({"demo_id": None, "prompt_id": None})
    with gr.Row():
        load_btn = gr.Button("Next prompt")
        mine = gr.Dropdown(label="My demonstrations (edit later)", choices=[], interactive=True)
        refresh_mine = gr.Button("Refresh list", size="sm")
    with gr.Row():
        with gr.Column(scale=3):
            convo = gr.Code(label="Conversation (structured messages; assistant turns may have thinking and tool_calls)",
                            language="json", value="[]", interactive=True, lines=16)
            with gr.Row():
                user_turn = gr.Textbox(label="Next user turn", scale=4)
                add_user = gr.Button("Add user turn", scale=1)
            with gr.Row():
                model = gr.Dropdown(_model_names(pg), value=pg.cfg.default_model, label="Model", scale=2)
                temp = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature", scale=2)
                draft_btn = gr.Button("Draft with model", scale=1)
            with gr.Row():
                save_btn = gr.Button("Save draft")
                submit_btn = gr.Button("Submit", variant="primary")
                skip_btn = gr.Button("Skip")
            info = gr.Markdown()
        with gr.Column(scale=2):
            preview = gr.Chatbot(label="Preview (as exported)", height=420)

    def parse(text):
        try:
            return json.loads(text or "[]")
        except json.JSONDecodeError as e:
            raise gr.Error(f"The conversation is not valid JSON: {e.msg} at line {e.lineno}")

    def show(payload, st, note=""):
        st = {"demo_id": payload.get("demo_id"), "prompt_id": payload.get("prompt_id")}
        msgs = payload["messages"]
        status = f"Demo {st['demo_id'] or '(new)'} · status **{payload.get('status')}** · {payload.get('versions', 0)} submitted version(s). {note}"
        return json.dumps(msgs, indent=2, ensure_ascii=False), _chat_preview(msgs), st, status

    @_errors_to_gr
    def load_next(st, request: gr.Request):
        user = request_user(pg, request, "annotator")
        nxt = sft.next_prompt(pg.db, user)
        if nxt is None:
            return "[]", [], st, "No prompts waiting. An operator adds them under Operator."
        return show(nxt, st)

    @_errors_to_gr
    def save(text, st, submit, request: gr.Request):
        user = request_user(pg, request, "annotator")
        out = sft.save(pg.db, user, parse(text), demo_id=st.get("demo_id"), prompt_id=st.get("prompt_id"), submit=submit)
        return show(out, st, "Submitted." if submit else "Draft saved.")

    @_errors_to_gr
    def skip(st, request: gr.Request):
        user = request_user(pg, request, "annotator")
        if st.get("prompt_id") is None:
            raise gr.Error("Only a queued prompt can be skipped.")
        sft.skip(pg.db, user, st["prompt_id"])
        return load_next({}, request)

    @_errors_to_gr
    def draft(text, model_name, temperature, st, request: gr.Request):
        request_user(pg, request, "annotator")
        msgs = sft.draft_with_model(getattr(pg, "engines", None), model_name, parse(text), temperature)
        return json.dumps(msgs, indent=2, ensure_ascii=False), _chat_preview(msgs)

    @_errors_to_gr
    def append_user(text, turn):
        msgs = parse(text)
        if not turn.strip():
            raise gr.Error("Write the user turn first.")
        if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1].get("content", "").strip():
            msgs = msgs[:-1]
        msgs += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
        return json.dumps(msgs, indent=2, ensure_ascii=False), _chat_preview(msgs), ""

    @_errors_to_gr
    def list_mine(request: gr.Request):
        user = request_user(pg, request, "annotator")
        rows = sft.list_mine(pg.db, user)
        return gr.update(choices=[(f"#{d['demo_id']} [{d['status']}] {d['first_user_turn'][:60]}", d["demo_id"]) for d in rows])

    @_errors_to_gr
    def open_demo(demo_id, st, request: gr.Request):
        if demo_id is None:
            return gr.skip(), gr.skip(), st, gr.skip()
        user = request_user(pg, request, "annotator")
        return show(sft.get(pg.db, user, int(demo_id)), st)

    def save_draft(text, st, request: gr.Request):
        return save(text, st, False, request)

    def submit(text, st, request: gr.Request):
        return save(text, st, True, request)

    load_btn.click(load_next, [state], [convo, preview, state, info])
    save_btn.click(save_draft, [convo, state], [convo, preview, state, info])
    submit_btn.click(submit, [convo, state], [convo, preview, state, info])
    skip_btn.click(skip, [state], [convo, preview, state, info])
    draft_btn.click(draft, [convo, model, temp, state], [convo, preview])
    add_user.click(append_user, [convo, user_turn], [convo, preview, user_turn])
    refresh_mine.click(list_mine, None, [mine])
    mine.change(open_demo, [mine, state], [convo, preview, state, info])


def build_operator(pg) -> None:
    gr.Markdown("### Create a ranking set\nPrompts × K candidates sampled from a model (or supplied in a JSONL import below).")
    with gr.Row():
        name = gr.Textbox(label="Set name", value="pelican jokes")
        model = gr.Dropdown(_model_names(pg), value=pg.cfg.default_model, label="Model")
    prompts = gr.Textbox(label="Prompts, one per line", lines=4, value=EXAMPLE_PROMPTS[0])
    with gr.Row():
        examples = gr.Checkbox(label="Add the built-in example prompts", value=False)
        k = gr.Slider(rankings.K_MIN, rankings.K_MAX, value=4, step=1, label="K candidates")
        temp = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Temperature")
        per_item = gr.Number(value=1, precision=0, label="Annotators per item", minimum=1)
    upload = gr.File(label="Or upload prompts (.txt, one per line)", file_types=[".txt"], type="filepath")
    create = gr.Button("Sample candidates and create set", variant="primary")
    created = gr.JSON(label="Created")

    gr.Markdown("### Progress and agreement")
    with gr.Row():
        set_id = gr.Number(label="Set id", precision=0)
        method = gr.Radio(["borda", "ranked_pairs"], value="borda", label="Consensus")
        prog_btn = gr.Button("Progress")
        agree_btn = gr.Button("Agreement")
    report = gr.JSON(label="Report")

    gr.Markdown("### Data out, data in")
    with gr.Row():
        kind = gr.Radio(list(exchange.KINDS), value="preferences", label="Kind")
        export_btn = gr.Button("Export JSONL")
        snap_btn = gr.Button("Freeze a snapshot")
    exported = gr.File(label="Export")
    imp = gr.File(label="Import JSONL (a bad file is refused whole)", file_types=[".jsonl", ".json"], type="filepath")
    imp_btn = gr.Button("Import")
    io_out = gr.JSON(label="Result")

    @_errors_to_gr
    def create_set(name, model, prompts, examples, k, temp, per_item, upload, request: gr.Request):
        user = request_user(pg, request, "operator")
        lines = prompts.splitlines()
        if upload:
            lines += open(upload, encoding="utf-8").read().splitlines()
        if examples:
            lines += EXAMPLE_PROMPTS
        return rankings.create_set_from_model(pg.db, getattr(pg, "engines", None), user, name, lines, model,
                                              int(k), float(temp), int(per_item or 1))

    @_errors_to_gr
    def show_progress(set_id, request: gr.Request):
        request_user(pg, request, "operator")
        return progress.set_progress(pg.db, int(set_id or 0))

    @_errors_to_gr
    def show_agreement(set_id, method, request: gr.Request):
        request_user(pg, request, "operator")
        return agreement.set_agreement(pg.db, int(set_id or 0), method)

    @_errors_to_gr
    def do_export(kind, set_id, request: gr.Request):
        request_user(pg, request, "operator")
        rows = exchange.export(pg.db, kind, int(set_id) if set_id else None)
        f = tempfile.NamedTemporaryFile("w", suffix=f"-{kind}.jsonl", delete=False, encoding="utf-8")
        f.write(exchange.to_jsonl(rows))
        f.close()
        return f.name

    @_errors_to_gr
    def do_snapshot(kind, set_id, request: gr.Request):
        user = request_user(pg, request, "operator")
        return snapshots.create_snapshot(pg.db, pg.cfg.data_dir, user, kind, set_id=int(set_id) if set_id else None)

    @_errors_to_gr
    def do_import(kind, path, request: gr.Request):
        user = request_user(pg, request, "operator")
        if not path:
            raise gr.Error("Choose a file first.")
        try:
            return exchange.import_jsonl(pg.db, user, kind, open(path, encoding="utf-8").read())
        except exchange.ImportRefused as e:
            return {"refused": True, "errors": [{"line": n, "reason": r} for n, r in e.errors]}

    create.click(create_set, [name, model, prompts, examples, k, temp, per_item, upload], [created])
    prog_btn.click(show_progress, [set_id], [report])
    agree_btn.click(show_agreement, [set_id, method], [report])
    export_btn.click(do_export, [kind, set_id], [exported])
    snap_btn.click(do_snapshot, [kind, set_id], [io_out])
    imp_btn.click(do_import, [kind, imp], [io_out])


def build_guidelines(pg) -> None:
    text = gr.Markdown(lambda: guidelines.get_guidelines(pg.db))
    with gr.Accordion("Edit (admins)", open=False):
        editor = gr.Textbox(lines=16, label="Markdown", value=lambda: guidelines.get_guidelines(pg.db))
        save = gr.Button("Save guidelines")

    @_errors_to_gr
    def do_save(new, request: gr.Request):
        user = request_user(pg, request, "admin")
        guidelines.set_guidelines(pg.db, user, new)
        return new

    save.click(do_save, [editor], [text])


def build_admin(pg) -> None:
    from backend import users
    from backend.db.models import ROLES
    gr.Markdown("Admins add people here (or with `python -m backend.users add NAME --role ROLE`). "
                "The password and API key are shown once.")
    with gr.Row():
        name = gr.Textbox(label="Name")
        role = gr.Dropdown(list(ROLES), value="annotator", label="Role")
        add = gr.Button("Add user", variant="primary")
        disable = gr.Button("Disable user")
    secrets_out = gr.JSON(label="New credentials (shown once)")
    table = gr.JSON(label="Users")
    refresh = gr.Button("List users", size="sm")

    @_errors_to_gr
    def do_add(name, role, request: gr.Request):
        request_user(pg, request, "admin")
        u, password, api_key = users.add_user(pg.db, name, role)
        return {"name": u.name, "role": u.role, "password": password, "api_key": api_key}, users.list_users(pg.db)

    @_errors_to_gr
    def do_disable(name, request: gr.Request):
        me = request_user(pg, request, "admin")
        if name.strip() == me.name:
            raise gr.Error("You cannot disable yourself.")
        users.set_active(pg.db, name.strip(), False)
        return users.list_users(pg.db)

    @_errors_to_gr
    def do_list(request: gr.Request):
        request_user(pg, request, "admin")
        return users.list_users(pg.db)

    add.click(do_add, [name, role], [secrets_out, table])
    disable.click(do_disable, [name], [table])
    refresh.click(do_list, None, [table])


def build(pg) -> None:
    build_login()
    with gr.Tabs():
        with gr.Tab("Rank", id="rank"):
            build_ranking_widget()
        with gr.Tab("Write demos", id="sft"):
            build_sft(pg)
        with gr.Tab("Operator", id="operator"):
            build_operator(pg)
        with gr.Tab("Guidelines", id="guidelines"):
            build_guidelines(pg)
        with gr.Tab("Users", id="users"):
            build_admin(pg)
