"""Labeling tab: sign in, rank candidates, write demonstrations, and (operators) create sets and
watch agreement and progress. Every button calls a backend.labels service; roles are checked there
(via the session cookie of the Gradio request), never only by hiding a control."""
from __future__ import annotations

import functools
import json
import tempfile

import gradio as gr

from backend.labels import agreement, exchange, guidelines, progress, rankings, review, sft, snapshots
from backend.labels.candidates import EXAMPLE_PROMPTS
from backend.labels.messages import flatten
from ui.login import door, public, request_user
from ui.model_lists import model_dropdown
from ui.ranking_widget import build_ranking_widget


def _chat_models(pg) -> list[str]:
    """Models that draft and sample candidates: chat models (backend.models.model_names)."""
    from backend.models import model_names
    return model_names(pg.registry, "chat")


def _set_choices(pg) -> list[tuple[str, int]]:
    """Ranking sets by name, newest first (operators pick, never type ids)."""
    return [(f"{x['name']} · {x['items']} items · K={x['k']}", x["id"]) for x in reversed(rankings.list_sets(pg.db))]


USER_COLUMNS = ["id", "name", "role", "active", "created (UTC)"]


def _user_rows(people: list[dict]) -> list[list]:
    return [[u["id"], u["name"], u["role"], "yes" if u["active"] else "no", u["created_at"][:19].replace("T", " ")]
            for u in people]


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
        gr.Markdown(public(lambda: guidelines.get_guidelines(pg.db)))
    state = gr.State({"demo_id": None, "prompt_id": None})
    with gr.Row():
        load_btn = gr.Button("Next prompt")
        mine = gr.Dropdown(label="My demonstrations (edit later)", choices=[], interactive=True)
        refresh_mine = gr.Button("Refresh list", size="sm")
    with gr.Row():
        with gr.Column(scale=3):
            prompt_md = gr.Markdown("*Press **Next prompt** to get a prompt to answer.*", elem_id="sft-prompt")
            gr.Markdown("**The assistant turn you are writing** (the last one of the conversation)")
            reply = gr.Textbox(label="Reply", lines=6, elem_id="sft-reply")
            thinking = gr.Textbox(label="Thinking (optional: working shown before the answer)", lines=3)
            tools = gr.Dataframe(headers=["tool", "input", "output"], datatype=["str", "str", "str"], type="array",
                                 column_count=3, row_count=1, interactive=True,
                                 label="Tool calls (tool = search or python; input = query or code; output = what it returned)")
            with gr.Row():
                model = model_dropdown(lambda: _chat_models(pg), value=pg.cfg.default_model, label="Model", scale=2,
                                       elem_id="label-draft-model")
                temp = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature", scale=2)
                draft_btn = gr.Button("Draft with model", scale=1)
            with gr.Row():
                save_btn = gr.Button("Save draft")
                submit_btn = gr.Button("Submit", variant="primary")
                skip_btn = gr.Button("Skip")
            info = gr.Markdown()
            with gr.Row():
                user_turn = gr.Textbox(label="Continue: next user turn (multi-turn)", scale=4)
                add_user = gr.Button("Add user turn", scale=1)
            with gr.Accordion("Whole conversation (JSON: system prompt, earlier turns; editable)", open=False):
                convo = gr.Code(language="json", value="[]", interactive=True, lines=14)
        with gr.Column(scale=2):
            preview = gr.Chatbot(label="Preview (as exported)", height=480)
    panel = [reply, thinking, tools]

    def parse(text):
        try:
            msgs = json.loads(text or "[]")
        except json.JSONDecodeError as e:
            raise gr.Error(f"The conversation is not valid JSON: {e.msg} at line {e.lineno}")
        if not isinstance(msgs, list):
            raise gr.Error("The conversation must be a JSON list of messages.")
        return msgs

    def merge(text, reply, thinking, tool_rows) -> list[dict]:
        """The conversation with the panel written into its last assistant turn."""
        msgs = parse(text)
        last = msgs[-1] if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" else None
        turn = dict(last) if last else {"role": "assistant"}
        calls = [{"tool": (r[0] or "").strip(), "input": r[1] or "", "output": r[2] or ""}
                 for r in (tool_rows or []) if len(r) >= 3 and any((c or "").strip() for c in r)]
        turn["content"] = reply or ""
        turn.pop("origin", None)  # the service works it out from model_draft
        for key, value in (("thinking", thinking), ("tool_calls", calls)):
            if value:
                turn[key] = value
            else:
                turn.pop(key, None)
        if last is not None:
            msgs[-1] = turn
        elif reply or thinking or calls:
            msgs.append(turn)
        return msgs

    def split(msgs):
        last = msgs[-1] if msgs and msgs[-1].get("role") == "assistant" else {}
        rows = [[c["tool"], c["input"], c["output"]] for c in last.get("tool_calls", [])] or [["", "", ""]]
        return [last.get("content", ""), last.get("thinking", ""), rows]

    def asked(msgs) -> str:
        """The turn being answered, kept in view above the reply box (the preview may scroll away)."""
        users = [m for m in msgs if m.get("role") == "user"]
        if not users:
            return "*Press **Next prompt** to get a prompt to answer.*"
        system = next((m["content"] for m in msgs if m.get("role") == "system"), "")
        quoted = "\n".join("> " + line for line in str(users[-1].get("content", "")).splitlines() or [""])
        return (f"**System prompt:** {system}\n\n" if system else "") + f"**The user asks:**\n\n{quoted}"

    def render(msgs):
        return [json.dumps(msgs, indent=2, ensure_ascii=False), _chat_preview(msgs), asked(msgs), *split(msgs)]

    def show(payload, note=""):
        st = {"demo_id": payload.get("demo_id"), "prompt_id": payload.get("prompt_id")}
        status = (f"Demo {st['demo_id'] or '(new)'} · status **{payload.get('status')}** · "
                  f"{payload.get('versions', 0)} submitted version(s). {note}")
        return [*render(payload["messages"]), st, status]

    @door(pg, "annotator")
    @_errors_to_gr
    def load_next(st, request: gr.Request):
        user = request_user(pg, request, "annotator")
        nxt = sft.next_prompt(pg.db, user)
        if nxt is None:
            return [*render([]), st, "No prompts waiting. An operator adds them under Operator."]
        return show(nxt)

    @_errors_to_gr
    def save(text, reply, thinking, tool_rows, st, submit, request):
        user = request_user(pg, request, "annotator")
        try:
            out = sft.save(pg.db, user, merge(text, reply, thinking, tool_rows), demo_id=st.get("demo_id"),
                           prompt_id=st.get("prompt_id"), submit=submit)
        except ValueError as e:  # say what is missing on the status line; the prompt, reply and preview stay
            return [gr.skip()] * (len(shown) - 1) + [f"⚠ Not {'submitted' if submit else 'saved'}: {e}"]
        return show(out, "Submitted." if submit else "Draft saved.")

    @door(pg, "annotator")
    def save_draft(text, reply, thinking, tool_rows, st, request: gr.Request):
        return save(text, reply, thinking, tool_rows, st, False, request)

    @door(pg, "annotator")
    def submit(text, reply, thinking, tool_rows, st, request: gr.Request):
        return save(text, reply, thinking, tool_rows, st, True, request)

    @door(pg, "annotator")
    @_errors_to_gr
    def skip(st, request: gr.Request):
        user = request_user(pg, request, "annotator")
        if st.get("prompt_id") is None:
            raise gr.Error("Only a queued prompt can be skipped.")
        sft.skip(pg.db, user, st["prompt_id"])
        return load_next({}, request)

    @door(pg, "annotator")
    @_errors_to_gr
    def draft(text, model_name, temperature, request: gr.Request):
        request_user(pg, request, "annotator")
        msgs = parse(text)
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]  # drafting again replaces the turn being written
        return render(sft.draft_with_model(getattr(pg, "engines", None), model_name, msgs, temperature))

    @public
    @_errors_to_gr
    def append_user(text, reply, thinking, tool_rows, turn):
        if not turn.strip():
            raise gr.Error("Write the user turn first.")
        msgs = merge(text, reply, thinking, tool_rows)
        if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1].get("content", "").strip() \
                and not msgs[-1].get("tool_calls"):
            raise gr.Error("Write the assistant reply before the next user turn.")
        msgs += [{"role": "user", "content": turn}, {"role": "assistant", "content": ""}]
        return [*render(msgs), ""]

    @door(pg, "annotator")
    @_errors_to_gr
    def list_mine(request: gr.Request):
        user = request_user(pg, request, "annotator")
        rows = sft.list_mine(pg.db, user)
        return gr.update(choices=[(f"#{d['demo_id']} [{d['status']}] {d['first_user_turn'][:60]}", d["demo_id"]) for d in rows])

    @door(pg, "annotator")
    @_errors_to_gr
    def open_demo(demo_id, st, request: gr.Request):
        if demo_id is None:
            return [gr.skip()] * 6 + [st, gr.skip()]
        user = request_user(pg, request, "annotator")
        return show(sft.get(pg.db, user, int(demo_id)))

    @public
    def sync_preview(text):
        try:
            msgs = json.loads(text or "[]")
            return _chat_preview(msgs), asked(msgs), *split(msgs)
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()

    shown = [convo, preview, prompt_md, *panel, state, info]
    load_btn.click(load_next, [state], shown)
    save_btn.click(save_draft, [convo, *panel, state], shown)
    submit_btn.click(submit, [convo, *panel, state], shown)
    skip_btn.click(skip, [state], shown)
    draft_btn.click(draft, [convo, model, temp], [convo, preview, prompt_md, *panel])
    add_user.click(append_user, [convo, *panel, user_turn], [convo, preview, prompt_md, *panel, user_turn])
    refresh_mine.click(list_mine, None, [mine])
    mine.change(open_demo, [mine, state], shown)
    convo.blur(sync_preview, [convo], [preview, prompt_md, *panel])


def build_operator(pg) -> None:
    gr.Markdown("### Create a ranking set\nPrompts × K candidates sampled from a model (or supplied in a JSONL import below).")
    with gr.Row():
        name = gr.Textbox(label="Set name", value="pelican jokes")
        model = model_dropdown(lambda: _chat_models(pg), value=pg.cfg.default_model, label="Model", elem_id="op-model")
    prompts = gr.Textbox(label="Prompts, one per line", lines=4, value=EXAMPLE_PROMPTS[0])
    with gr.Row():
        examples = gr.Checkbox(label="Add the built-in example prompts", value=False)
        k = gr.Slider(rankings.K_MIN, rankings.K_MAX, value=4, step=1, label="K candidates")
        temp = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Temperature")
        per_item = gr.Number(value=1, precision=0, label="Annotators per item", minimum=1)
    upload = gr.File(label="Or upload prompts (.txt, one per line)", file_types=[".txt"], type="filepath", height=90)
    create = gr.Button("Sample candidates and create set", variant="primary")
    created = gr.Markdown(elem_id="op-created")

    gr.Markdown("### Queue prompts for demonstrations (Write demos)")
    with gr.Row():
        sft_prompts = gr.Textbox(label="Prompts, one per line", lines=3, scale=3)
        sft_system = gr.Textbox(label="System prompt (optional)", lines=3, scale=2)
    sft_btn = gr.Button("Queue for demonstrations")
    sft_out = gr.Markdown()

    @door(pg, "operator")
    @_errors_to_gr
    def queue_sft(text, system, request: gr.Request):
        user = request_user(pg, request, "operator")
        ids = sft.add_prompts(pg.db, user, text.splitlines(), system)
        return f"Queued {len(ids)} prompt(s)."

    sft_btn.click(queue_sft, [sft_prompts, sft_system], [sft_out])

    gr.Markdown("### Progress and agreement")
    with gr.Row():
        set_id = gr.Dropdown(_set_choices(pg), value=None, label="Ranking set", scale=3, elem_id="op-set")
        sets_refresh = gr.Button("↻ sets", size="sm", scale=0)
        method = gr.Radio(["borda", "ranked_pairs"], value="borda", label="Consensus", scale=2)
        prog_btn = gr.Button("Progress", scale=1)
        agree_btn = gr.Button("Agreement", scale=1)
    summary = gr.Markdown()
    table = gr.Dataframe(headers=["annotator", "ranked", "skipped", "all bad", "last activity (UTC)"],
                         label="Per annotator (pick a set, then Progress or Agreement)", interactive=False,
                         elem_id="op-annotators")
    items_table = gr.Dataframe(headers=["items", "items done", "rankings needed"], label="Per item", interactive=False,
                               elem_id="op-items")

    gr.Markdown("### Data out, data in")
    with gr.Row():
        kind = gr.Radio(list(exchange.KINDS), value="preferences", label="Kind")
        export_btn = gr.Button("Export JSONL")
        snap_btn = gr.Button("Freeze a snapshot")
    exported = gr.File(label="Export", height=90)
    imp = gr.File(label="Import JSONL (a bad file is refused whole)", file_types=[".jsonl", ".json"], type="filepath",
                  height=90)
    imp_btn = gr.Button("Import")
    io_out = gr.Markdown(elem_id="op-io")

    @door(pg, "operator")
    @_errors_to_gr
    def create_set(name, model, prompts, examples, k, temp, per_item, upload, request: gr.Request):
        user = request_user(pg, request, "operator")
        lines = prompts.splitlines()
        if upload:
            lines += open(upload, encoding="utf-8").read().splitlines()
        if examples:
            lines += EXAMPLE_PROMPTS
        made = rankings.create_set_from_model(pg.db, getattr(pg, "engines", None), user, name, lines, model,
                                              int(k), float(temp), int(per_item or 1))
        return (f"Created set **{made['name']}**: {made['items']} prompt(s) × {made['k']} candidates from "
                f"`{made['model']}`, {made['annotators_per_item']} annotator(s) per item. Annotators find it under **Rank**.",
                gr.update(choices=_set_choices(pg), value=made["id"]))

    @door(pg, "operator")
    @_errors_to_gr
    def show_progress(set_id, request: gr.Request):
        request_user(pg, request, "operator")
        if not set_id:
            raise gr.Error("Pick a ranking set first.")
        p = progress.set_progress(pg.db, int(set_id))
        text = (f"**{p['name']}**: {p['items_done']} of {p['items']} items done "
                f"({p['annotators_per_item']} annotator(s) per item; {p['rankings_needed']} rankings needed).")
        rows = [[a["name"], a["ranked"], a["skipped"], a["all_bad"], (a["last_activity"] or "")[:19].replace("T", " ")]
                for a in p["annotators"]] or [["(nobody yet)", 0, 0, 0, ""]]
        return (text, gr.update(value=rows, headers=["annotator", "ranked", "skipped", "all bad", "last activity (UTC)"]),
                gr.update(value=[[p["items"], p["items_done"], p["rankings_needed"]]],
                          headers=["items", "items done", "rankings needed"]))

    @door(pg, "operator")
    @_errors_to_gr
    def show_agreement(set_id, method, request: gr.Request):
        request_user(pg, request, "operator")
        if not set_id:
            raise gr.Error("Pick a ranking set first.")
        a = agreement.set_agreement(pg.db, int(set_id), method)
        text = (f"Mean pairwise Kendall's tau over items: **{a['mean_pairwise_tau']}** (1 = same order, 0 = unrelated, "
                f"-1 = reversed); consensus by {a['method']}, each annotator compared with the others' consensus.")
        people = [[n, v["items"], v["tau_vs_consensus"]] for n, v in a["annotators"].items()]
        items = [[it["item_id"], it["prompt"][:80], it["annotators"], it["mean_pairwise_tau"], str(it["consensus"])]
                 for it in a["items"]]
        return (text, gr.update(value=people, headers=["annotator", "items", "tau vs consensus"]),
                gr.update(value=items, headers=["item", "prompt", "annotators", "mean pairwise tau", "consensus (candidate ids)"]))

    @door(pg, "operator")
    @_errors_to_gr
    def do_export(kind, set_id, request: gr.Request):
        request_user(pg, request, "operator")
        rows = exchange.export(pg.db, kind, int(set_id) if set_id else None)
        f = tempfile.NamedTemporaryFile("w", suffix=f"-{kind}.jsonl", delete=False, encoding="utf-8")
        f.write(exchange.to_jsonl(rows))
        f.close()
        return f.name

    @door(pg, "operator")
    @_errors_to_gr
    def do_snapshot(kind, set_id, request: gr.Request):
        user = request_user(pg, request, "operator")
        snap = snapshots.create_snapshot(pg.db, pg.cfg.data_dir, user, kind, set_id=int(set_id) if set_id else None,
                                         artifacts_url=pg.cfg.artifacts_url)
        return (f"Snapshot **{snap['name']}** ({snap['kind']}, {snap['rows']} rows), hash `{snap['hash'][:16]}…`: pick it "
                "as the training data of a job on the Training tab.")

    @door(pg, "operator")
    @_errors_to_gr
    def do_import(kind, path, request: gr.Request):
        user = request_user(pg, request, "operator")
        if not path:
            raise gr.Error("Choose a file first.")
        try:
            with open(path, "rb") as f:  # read line by line, staged in batches (backend/labels/exchange.py)
                out = exchange.import_lines(pg.db, user, kind, f)
        except exchange.ImportRefused as e:
            return "**Refused whole** (nothing imported):\n\n" + "\n".join(f"- line {n}: {r}" for n, r in e.errors[:50])
        except exchange.ImportBusy as e:
            raise gr.Error(str(e))
        return f"Imported {out['rows']} {out['kind']} row(s)" + (
            f" into set(s) {', '.join(map(str, out['set_ids']))}." if out.get("set_ids") else ".")

    create.click(create_set, [name, model, prompts, examples, k, temp, per_item, upload], [created, set_id])
    sets_refresh.click(door(pg, "operator")(lambda: gr.update(choices=_set_choices(pg))), None, set_id)
    prog_btn.click(show_progress, [set_id], [summary, table, items_table])
    agree_btn.click(show_agreement, [set_id, method], [summary, table, items_table])
    export_btn.click(do_export, [kind, set_id], [exported])
    snap_btn.click(do_snapshot, [kind, set_id], [io_out])
    imp_btn.click(do_import, [kind, imp], [io_out])


def build_review(pg) -> None:
    """Accept, edit or reject others' submitted demonstrations (backend.labels.review)."""
    gr.Markdown("Review the demonstrations others submitted, as Open-Assistant does: **Accept** keeps it for "
                "training, edit the reply first to accept your corrected version (a new version, credited to you), "
                "**Reject** leaves it out (say why). You never review your own. Exports carry the decision.")
    counts = gr.Markdown(elem_id="review-counts")
    nxt = gr.Button("Next to review", elem_id="review-next")
    shown = gr.State(None)
    asked = gr.Markdown(elem_id="review-prompt")
    reply = gr.Textbox(label="The reply (edit it to correct it)", lines=6, elem_id="review-reply")
    note = gr.Textbox(label="Note (why; required to reject)", elem_id="review-note")
    with gr.Row():
        accept = gr.Button("✓ Accept", variant="primary", elem_id="review-accept")
        reject = gr.Button("✗ Reject", variant="stop", elem_id="review-reject")
    said = gr.Markdown(elem_id="review-status")

    def counted() -> str:
        c = review.review_counts(pg.db)
        return f"Submitted demonstrations: **{c['pending']}** pending review · {c['accepted']} accepted · {c['rejected']} rejected."

    def show(d):
        if d is None:
            return None, "*Nothing left to review (your own demos go to someone else).*", "", "", counted()
        msgs = d["messages"]
        user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        reply_text = msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else ""
        quoted = "\n".join("> " + line for line in user.splitlines() or [""])
        return (d, f"**Demo {d['demo_id']}** by {d['author']} ({d['versions']} version(s)). **The user asks:**\n\n{quoted}",
                reply_text, "", counted())

    @door(pg, "annotator")
    @_errors_to_gr
    def load(request: gr.Request):
        return show(review.next_for_review(pg.db, request_user(pg, request, "annotator")))

    @_errors_to_gr
    def decide(decision, d, text, why, request: gr.Request):
        user = request_user(pg, request, "annotator")
        if d is None:
            raise gr.Error("Press Next to review first.")
        if decision == "reject" and not (why or "").strip():
            raise gr.Error("Say why in the note before rejecting.")
        msgs = d["messages"]
        edited = None
        if decision == "accept" and msgs and msgs[-1]["role"] == "assistant" and text != msgs[-1]["content"]:
            edited = msgs[:-1] + [{**msgs[-1], "content": text}]
        out = review.review_demo(pg.db, user, d["demo_id"], decision, why, edited)
        done = (f"Demo {out['demo_id']} **{out['review']}**" + (" with your edit" if edited else "") + ".")
        return (*show(review.next_for_review(pg.db, user))[:-1], counted(), done)

    outs = [shown, asked, reply, note, counts]
    nxt.click(load, None, outs)
    @door(pg, "annotator")
    def do_accept(d, text, why, request: gr.Request):
        return decide("accept", d, text, why, request)

    @door(pg, "annotator")
    def do_reject(d, text, why, request: gr.Request):
        return decide("reject", d, text, why, request)

    accept.click(do_accept, [shown, reply, note], [*outs, said])
    reject.click(do_reject, [shown, reply, note], [*outs, said])


def build_guidelines(pg) -> None:
    text = gr.Markdown(public(lambda: guidelines.get_guidelines(pg.db)))
    with gr.Accordion("Edit (admins)", open=False):
        editor = gr.Textbox(lines=16, label="Markdown", value=public(lambda: guidelines.get_guidelines(pg.db)))
        save = gr.Button("Save guidelines")

    @door(pg, "admin")
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
    secrets_out = gr.Markdown(elem_id="admin-secrets")
    table = gr.Dataframe(headers=USER_COLUMNS, interactive=False, label="Users", elem_id="admin-users")
    refresh = gr.Button("List users", size="sm")

    @door(pg, "admin")
    @_errors_to_gr
    def do_add(name, role, request: gr.Request):
        request_user(pg, request, "admin")
        u, password, api_key = users.add_user(pg.db, name, role)
        return (f"Added **{u.name}** ({u.role}). Shown once, pass them on now: password `{password}` · API key "
                f"`{api_key}`", _user_rows(users.list_users(pg.db)))

    @door(pg, "admin")
    @_errors_to_gr
    def do_disable(name, request: gr.Request):
        me = request_user(pg, request, "admin")
        if name.strip() == me.name:
            raise gr.Error("You cannot disable yourself.")
        users.set_active(pg.db, name.strip(), False)
        return _user_rows(users.list_users(pg.db))

    @door(pg, "admin")
    @_errors_to_gr
    def do_list(request: gr.Request):
        request_user(pg, request, "admin")
        return _user_rows(users.list_users(pg.db))

    add.click(do_add, [name, role], [secrets_out, table])
    disable.click(do_disable, [name], [table])
    refresh.click(do_list, None, [table])


def build(pg) -> None:
    with gr.Tabs() as tabs:
        with gr.Tab("Rank", id="rank"):
            build_ranking_widget()
        with gr.Tab("Write demos", id="sft"):
            build_sft(pg)
        # Shown to the roles that use them (ui.__init__ sets visibility from the session); the handlers check anyway.
        with gr.Tab("Operator", id="operator", visible=False) as operator_tab:
            build_operator(pg)
        with gr.Tab("Review", id="review", visible=False) as review_tab:
            build_review(pg)
        with gr.Tab("Guidelines", id="guidelines"):
            build_guidelines(pg)
        with gr.Tab("Users", id="users", visible=False) as users_tab:
            build_admin(pg)
    return {"tabs": tabs, "_roles": [(review_tab, "annotator"), (operator_tab, "operator"), (users_tab, "admin")]}  # what the Start-here tour sets (ui.tour)
