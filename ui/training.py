"""Training tab: start a job (pretraining now; the other kinds as their trainers land), watch its loss and
validation bits-per-byte curves grow, read samples with their step numbers, tokens/s and MFU, the
log tail; cancel and resume. Layout and wiring only: every button calls backend.jobs.queue, the same
service the REST API (/api/jobs) and the CLI use, and the worker process does the training."""
from __future__ import annotations

import html
import json
import re
import shutil
import time
from pathlib import Path

import gradio as gr
import pandas as pd
from gradio.context import Context

from backend.auth import user_from_request
from backend.jobs import form, kinds, queue
from ui import next_steps
from ui.login import door, public, request_user

MAX_PLOT_POINTS = 2000
JOB_COLUMNS = ["id", "kind", "name", "state", "step", "loss", "model", "by"]
# The second curve shows the first of these a job reports (any other number it reports can be picked).
PREFERRED_CURVES = ("val_bpb", "held_out_accuracy", "accuracy", "val_loss", "reward", "kl", "response_length")
CURVE_TITLES = {"loss": "Training loss (nats per token)", "val_bpb": "Validation bits per byte",
                "held_out_accuracy": "Held-out accuracy", "val_loss": "Validation loss", "kl": "KL to the reference",
                "response_length": "Mean response length (tokens)", "reward": "Mean reward",
                "held_out_reward": "Held-out reward model's score of the samples", "distinct_2": "Distinct-2 of the samples"}
NOT_CURVES = {"step", "elapsed", "time", "id"}


def _empty_state() -> dict:
    return {"job": None, "after": 0, "series": {}, "samples": [], "log": [], "sig": None, "choices": None,
            "curves": None}


def _second_curve(series: dict, picked: str | None) -> str | None:
    if picked in series:
        return picked
    return next((k for k in PREFERRED_CURVES if k in series), next((k for k in series if k != "loss"), None))


def _x_span(job: dict, series: dict) -> list[int]:
    """The steps axis runs from 0 to the run's last step (max_steps when known): a first point sits at the
    left of a full-length axis instead of alone in the middle of a one-step one."""
    last = max([p[0] for v in series.values() for p in v[-1:]] or [0])
    return [0, max(job["progress"]["total_steps"] or 0, last, 1)]


def _loss_plot(points: list, span: list[int]):
    return gr.LinePlot(_plot(points, "loss"), x_lim=span)


def _curve_plot(series: dict, key: str | None, span: list[int] | None = None):
    points = series.get(key, []) if key else []
    title = CURVE_TITLES.get(key, key) if key else "Second curve (appears with the first validation)"
    return gr.LinePlot(_plot(points, "value"), title=title, y_title=key or "", x_lim=span)


def _plot(points: list, y: str) -> pd.DataFrame:
    if len(points) > MAX_PLOT_POINTS:  # keep the browser fast on long runs: every k-th point, and the last
        k = -(-len(points) // MAX_PLOT_POINTS)
        points = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
    return pd.DataFrame(points, columns=["step", y]) if points else pd.DataFrame({"step": [], y: []})


def _fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "–"


def _stats(job: dict) -> str:
    s = job["summary"]
    state = job["state"] + (" (cancel requested)" if job["cancel_requested"] and job["state"] == "running" else "")
    if job["state"] == "running" and job["heartbeat_age"] and job["heartbeat_age"] > 15:
        state += f" (no heartbeat for {job['heartbeat_age']:.0f}s)"
    parts = [f"**Job {job['id']}** `{job['name']}` · **{state}** · step **{job['step']}**",
             f"loss {_fmt(s.get('loss'), '.4f')}"]
    if job["kind"] == "pretrain" or "val_bpb" in s:
        parts.append(f"val bpb {_fmt(s.get('val_bpb'), '.4f')}")
    for key in ("held_out_accuracy", "val_loss", "reward", "kl"):
        if key in s:
            parts.append(f"{key.replace('_', ' ')} {_fmt(s[key], '.4f')}")
    parts += [f"{_fmt(s.get('tokens_per_s'), ',.0f')} tokens/s", f"MFU {_fmt(100 * s['mfu'] if 'mfu' in s else None, '.2f')}%"]
    if s.get("params"):
        parts.append(f"{s['params']:,} parameters on {s.get('device', '?')}")
    if job["model"]:
        parts.append(f"model **{job['model']}** (in the Generate tab's list)")
    if job["error"]:
        parts.append(f"\n\n⚠ {job['error']}")
    return " · ".join(parts) + _table_md(s.get("table"))


def _table_md(table) -> str:
    """A demo's before/after table (idk, distill: backend/train/generated.py) under the job's line."""
    if not isinstance(table, list) or not table or not isinstance(table[0], dict):
        return ""
    cols = list(table[0])
    cell = lambda v: f"{v:.0%}" if isinstance(v, float) else ("–" if v is None else str(v))  # noqa: E731
    return ("\n\n" + "| " + " | ".join(c.replace("_", " ") for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
            + "".join("| " + " | ".join(cell(r.get(c)) for c in cols) + " |\n" for r in table))


def _progress_html(job: dict) -> str:
    """The job's progress (backend.jobs.progress) as a bar and a line, with what to do next once it is done."""
    p = job["progress"]
    pct = round(100 * p["fraction"])
    busy = job["state"] in ("queued", "running") and not p["phase"].startswith("step")
    bar = ('<div style="background:var(--neutral-200,#e5e7eb);border-radius:6px;height:14px;overflow:hidden">'
           f'<div class="pg-progress-fill{" pg-busy" if busy else ""}" style="width:{max(pct, 2 if busy else 0)}%;'
           'height:14px;background:var(--color-accent,#f97316)"></div></div>')
    nxt = "".join(f"<li>{_md_bold(n)}</li>" for n in p["next"])
    return (f'<div class="pg-progress" data-fraction="{p["fraction"]}"><div style="display:flex;justify-content:space-between">'
            f'<span class="pg-progress-text">{html.escape(p["text"])}</span><b>{pct}%</b></div>{bar}'
            + (f'<div class="pg-next"><b>What next:</b><ul>{nxt}</ul></div>' if nxt else "") + "</div>")


def _md_bold(text: str) -> str:
    """**bold** and `code` of a next-step line as HTML (the text is ours; escaped all the same)."""
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _samples_html(samples: list[dict]) -> str:
    if not samples:
        return '<div class="pg-samples"><i>Samples appear here every few steps, each with its step number.</i></div>'
    rows = []
    for s in reversed(samples[-20:]):  # newest first
        rows.append(f'<div class="pg-sample" data-step="{int(s["step"])}"><b>step {int(s["step"])}</b>'
                    f'<pre style="white-space:pre-wrap;margin:.2em 0 .6em 0"><span style="opacity:.6">'
                    f'{html.escape(s.get("prompt", ""))}</span>{html.escape(s["sample"])}</pre></div>')
    return '<div class="pg-samples" style="max-height:32em;overflow-y:auto">' + "".join(rows) + "</div>"


HACK_CURVES = {"reward": "reward model (optimised)", "held_out_reward": "held-out reward model",
               "distinct_2": "distinct-2 of the samples", "distinct_1": "distinct-1 of the samples"}


def _hacking_plot(view: dict, keys: tuple[str, ...], title: str):
    """The smoothed curves of an RLHF run (backend/train/hacking.py) with the turning point as a vertical line."""
    rows = [[s, v, HACK_CURVES[k]] for k in keys for s, v in view["smoothed"].get(k, [])]
    if rows:
        lo, hi = min(r[1] for r in rows), max(r[1] for r in rows)
        rows += [[view["turn_step"], lo, "turning point"], [view["turn_step"], hi, "turning point"]]
    return gr.LinePlot(pd.DataFrame(rows or None, columns=["step", "value", "curve"]), x="step", y="value",
                       color="curve", title=f"{title} · turn at step {view['turn_step']}")


def _side_html(sample: dict | None, label: str, side: str) -> str:
    if not sample:
        return (f'<div class="pg-hack-{side}"><b>{label}</b><p><i>No sample logged after the turn yet: the run is '
                "still at its best, or stopped there.</i></p></div>")
    return (f'<div class="pg-hack-{side}" data-step="{int(sample["step"])}"><b>{label}: step {int(sample["step"])}</b>'
            f'<pre style="white-space:pre-wrap;margin:.2em 0"><span style="opacity:.6">{html.escape(sample["prompt"])}'
            f'</span>\n{html.escape(sample["sample"])}</pre></div>')


def _hacking_updates(view: dict | None) -> tuple:
    """The reward-hacking panel of an RLHF job: hidden until the job has logged a step."""
    if not view:
        return gr.update(visible=False), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    at, fin = view["at_turn"], view["final"]
    nums = " · ".join(f"{HACK_CURVES.get(k, k)} {at[k]:.3f} → {fin[k]:.3f}" for k in HACK_CURVES if k in at and k in fin)
    md = (f"**{view['text']}**\n\nSmoothed over {view['window']} steps, at the turn → at the last step: {nums}. "
          f"Independent measure: `{view['measure']}`; the policy is optimised against the reward model only.")
    return (gr.update(visible=True), md,
            _hacking_plot(view, ("reward", "held_out_reward"), "Reward model vs held-out reward model"),
            _hacking_plot(view, ("distinct_1", "distinct_2"), "Distinct-n of the samples"),
            _side_html(view["before"], "Before the turn", "before"), _side_html(view["after"], "After the turn", "after"))


def _jobs_table(jobs: list[dict]) -> pd.DataFrame:
    rows = [[j["id"], j["kind"], j["name"], j["state"], j["step"], _fmt(j["summary"].get("loss"), ".4f"),
             j["model"] or "", j["created_by"] or ""] for j in jobs]
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


SNAP = "snapshot:"  # a data choice naming a frozen snapshot by its hash


def _data_choices(pg) -> list[tuple[str, str]]:
    from backend.labels.snapshots import list_snapshots
    return [("the kind's built-in set", "bundled")] + [
        (f"snapshot {x['name']} · {x['kind']} · {x['rows']} rows · {x['hash'][:12]}", SNAP + x["hash"])
        for x in reversed(list_snapshots(pg.db))]


def _kind_note(kind: str) -> str:
    d = form.defaults(kind)
    if not form.shown(kind)["budget"]:
        return f"*{kinds.get_trainer(kind).description}.* Its time budget is one of its own settings (below)."
    return (f"*{kinds.get_trainer(kind).description}.* Defaults end within minutes on a CPU: "
            f"{d.get('max_steps') or 'no'} step limit, {d.get('max_seconds') or 'no'} s time budget (whichever comes first).")


def _fields_md(kind: str) -> str:
    return "All fields of this kind (type: default): " + ", ".join(
        f"`{f['name']}` ({f['type']}: {f['default']!r})" for f in kinds.config_fields(kind))


def _save_uploads(pg, files) -> list[str]:
    """Uploaded corpus files go to data_dir/corpora/ (the worker reads them from there)."""
    out = []
    folder = pg.cfg.data_dir / "corpora"
    for f in files or []:
        src = Path(f if isinstance(f, str) else f.name)
        if src.suffix.lower() not in (".txt", ".md", ".jsonl", ".parquet"):
            raise ValueError(f"corpus: {src.name} is not a .txt, .md, .jsonl or .parquet file")
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / re.sub(r"[^A-Za-z0-9._-]+", "-", src.name)
        shutil.copyfile(src, dest)
        out.append(str(dest))
    return out


def build(pg) -> None:
    from backend.corpora import list_corpora
    from models.presets import PRESETS
    from models.tokenizers import list_encodings

    gr.Markdown("Start a training run and watch it learn: the loss falls from ln(vocabulary) as the model "
                "stops guessing uniformly, the held-out **bits per byte** say how well it compresses text it "
                "never trained on, and the samples go from gibberish to local coherence. The run ends in a "
                "checkpoint registered as a model you can sample from in the Generate tab. Operators and "
                "admins start and cancel runs; everyone signed in can watch.")
    from backend.models import model_names
    from ui.model_lists import model_dropdown
    models = model_names(pg.registry, "generate")
    first = form.defaults("pretrain")
    with gr.Row():
        kind = gr.Dropdown([(f"{k}: {kinds.get_trainer(k).description}", k) for k in kinds.kinds(training_only=True)],
                           value="pretrain", label="Kind", scale=3, elem_id="train-kind")
        name = gr.Textbox(label="Run / model name (empty: automatic)", scale=2, elem_id="train-name")
    with gr.Row() as budget_row:
        max_steps = gr.Number(first["max_steps"], label="Max steps (0: no limit)", precision=0, minimum=0,
                              elem_id="train-max-steps")
        max_seconds = gr.Number(first["max_seconds"], label="Max seconds (0: no limit)", precision=0, minimum=0,
                                elem_id="train-max-seconds")
        eval_every = gr.Number(first["eval_every"], label="Validate every N steps", precision=0, minimum=1,
                               elem_id="train-eval-every")
    kind_note = gr.Markdown(_kind_note("pretrain"), elem_id="train-kind-note")
    with gr.Group(visible=True) as pretrain_box:
        with gr.Row():
            preset = gr.Dropdown([(f"{n}: {p.description}", n) for n, p in PRESETS.items()], value="cpu-5min",
                                 label="Model size (preset)", scale=3, elem_id="train-preset")
            corpus = gr.Dropdown(list_corpora(), value=["python-docs"], multiselect=True, label="Corpus", scale=2,
                                 elem_id="train-corpus")
            tokenizer = gr.Dropdown(["auto", *list_encodings(pg.cfg.data_dir)], value="auto", allow_custom_value=True,
                                    label="Tokenizer (auto: a BPE trained on the corpus)", scale=2,
                                    elem_id="train-tokenizer")
        with gr.Row():
            sample_every = gr.Number(first["sample_every"], label="Sample every N steps", precision=0, minimum=1,
                                     elem_id="train-sample-every")
            max_chars = gr.Number(0, label="Use only the first N corpus characters (0: all)", precision=0, minimum=0,
                                  elem_id="train-max-chars")
        uploads = gr.File(label="Add corpus files (.txt .md .jsonl .parquet)", file_count="multiple", height=90)
    with gr.Group(visible=False) as parent_box:
        with gr.Row():
            parent = model_dropdown(lambda: model_names(pg.registry, "generate"), value=pg.cfg.default_model if pg.cfg.default_model in models else None,
                                 label="Parent model (the model this run starts from)", scale=2, elem_id="train-parent")
            data = gr.Dropdown(_data_choices(pg), value="bundled", scale=3, elem_id="train-data",
                               label="Training data: the kind's built-in set, or a frozen snapshot of your labels")
            snap_refresh = gr.Button("↻", scale=0, size="sm", min_width=40)
    with gr.Group(visible=False) as reward_box:
        with gr.Row():
            reward_model = model_dropdown(lambda: model_names(pg.registry, "reward"), value=None,
                                          label="Reward model (a model trained by a reward job)",
                                          elem_id="train-reward-model")
            held_out_model = model_dropdown(lambda: model_names(pg.registry, "reward"), value=None,
                                            elem_id="train-held-out-reward-model",
                                            label="Held-out reward model (optional: trained on the other half of the "
                                                  "rankings; it only watches, to show reward hacking)")
    with gr.Accordion("Other settings (JSON)", open=False):
        extra = gr.Code(value="{}", language="json", label="Other config fields (JSON), e.g. {\"lr\": 0.002}",
                        elem_id="train-extra")
        fields_md = gr.Markdown(_fields_md("pretrain"))
    start = gr.Button("Start training", variant="primary", elem_id="train-start")
    status = gr.Markdown(elem_id="train-status")

    gr.Markdown("### Watch a job")
    with gr.Row():
        job_pick = gr.Dropdown([], value=None, label="Job", scale=4, elem_id="train-job")
        cancel = gr.Button("Cancel", variant="stop", scale=1, elem_id="train-cancel")
        resume = gr.Button("Resume", scale=1, elem_id="train-resume")
    gr.Markdown("Cancel stops after the current step and keeps a checkpoint (registered as a model too); Resume "
                "continues from the last checkpoint with the job's settings: a time-limited run gets its time budget "
                "again, the step count goes on.")
    stats = gr.Markdown(elem_id="train-stats")
    progress_box = gr.HTML('<div class="pg-progress"><i>Pick or start a job to see its progress.</i></div>',
                           elem_id="train-progress")
    steps = next_steps.build()  # a finished job's next steps as buttons (wired in ui.build_ui)
    with gr.Row():
        loss_plot = gr.LinePlot(_plot([], "loss"), x="step", y="loss", title="Training loss (nats per token)",
                                elem_id="train-loss-plot")
        with gr.Column():
            curve = gr.Dropdown(["val_bpb"], value="val_bpb", label="Second curve", allow_custom_value=True,
                                elem_id="train-curve")
            bpb_plot = gr.LinePlot(_plot([], "value"), x="step", y="value", title=CURVE_TITLES["val_bpb"],
                                   y_title="val_bpb", elem_id="train-bpb-plot")
    curve_info = gr.Markdown(elem_id="train-curve-info")
    with gr.Group(visible=False, elem_id="train-hacking") as hack_box:
        gr.Markdown("#### Reward hacking: the score the policy chases against measures it does not see")
        hack_md = gr.Markdown(elem_id="train-hacking-text")
        with gr.Row():
            hack_plot = gr.LinePlot(x="step", y="value", color="curve", elem_id="train-hacking-reward")
            distinct_plot = gr.LinePlot(x="step", y="value", color="curve", elem_id="train-hacking-distinct")
        with gr.Row():
            before_box = gr.HTML(elem_id="train-hacking-before")
            after_box = gr.HTML(elem_id="train-hacking-after")
    with gr.Row():
        with gr.Column(scale=3):
            samples = gr.HTML(_samples_html([]), label="Samples", elem_id="train-samples")
        with gr.Column(scale=2):
            log_box = gr.Textbox(label="Log (newest first)", lines=14, max_lines=14, interactive=False,
                                 autoscroll=False, elem_id="train-log")
    jobs_table = gr.Dataframe(pd.DataFrame(columns=JOB_COLUMNS), label="All jobs (newest first)",
                              interactive=False, elem_id="train-jobs")
    state = gr.State(_empty_state())
    # Poll once a second; the poll reads the database only while this tab is shown (an annotator's page
    # on the Labeling tab should not read the job tables every second).
    here = Context.block if isinstance(Context.block, gr.Tab) else None
    shown = gr.State(here is None)
    timer = gr.Timer(1.0)
    if here is not None and isinstance(here.parent, gr.Tabs):
        @public
        def on_tab(evt: gr.SelectData) -> bool:
            return evt.value == here.label

        here.parent.select(on_tab, None, shown, show_progress="hidden")

    def on_kind(k):
        d, show = form.defaults(k), form.shown(k)
        return (gr.update(visible=show["pretrain"]), gr.update(visible=show["parent"]),
                gr.update(visible=show["reward_model"]), d.get("max_steps", 0), d.get("max_seconds", 0),
                d.get("eval_every", 1), _kind_note(k), _fields_md(k), "{}", gr.update(visible=show["budget"]),
                gr.update(visible=show["dataset"]), gr.update(visible=show["dataset"]))

    kind.change(public(on_kind), kind, [pretrain_box, parent_box, reward_box, max_steps, max_seconds, eval_every, kind_note,
                               fields_md, extra, budget_row, data, snap_refresh])
    snap_refresh.click(public(lambda: gr.update(choices=_data_choices(pg))), None, data)

    @door(pg, "operator")
    def start_job(k, nm, steps, secs, e_every, pre, corp, tok, s_every, chars, files, par, dat, rm, held_rm, extra_json,
                  request: gr.Request):
        user = request_user(pg, request, "operator")
        try:
            more = json.loads(extra_json or "{}")
        except json.JSONDecodeError as e:
            raise gr.Error(f"Other config fields are not valid JSON: {e.msg}")
        if not isinstance(more, dict):
            raise gr.Error("Other config fields: give a JSON object such as {\"lr\": 0.002}")
        show = form.shown(k)
        values = {"name": (nm or "").strip()}
        if show["budget"]:
            values.update(max_steps=int(steps or 0), max_seconds=float(secs or 0), eval_every=int(e_every or 1))
        snapshot = None
        try:
            if show["pretrain"]:
                values.update(preset=pre, corpus=list(corp or []) + _save_uploads(pg, files), tokenizer=tok,
                              sample_every=int(s_every or 1), max_corpus_chars=int(chars) if chars else None)
            if show["parent"]:
                if not par:
                    raise ValueError("parent model: pick the model this run starts from")
                values["parent_model"] = par
            if show["dataset"]:
                values["dataset"] = "snapshot" if (dat or "").startswith(SNAP) else (dat or "bundled")
                snapshot = dat[len(SNAP):] if (dat or "").startswith(SNAP) else None
            if show["reward_model"]:
                values["reward_model"] = rm or ""
                values["held_out_reward_model"] = held_rm or ""
            job = queue.create_job(pg.db, pg.cfg, user, k, form.form_config(k, values, more), snapshot=snapshot)
        except (ValueError, LookupError) as e:
            raise gr.Error(str(e))
        note = f"Queued job **{job['id']}** (`{job['name']}`); the worker picks it up within a second or two."
        if pg.worker is None or pg.worker.poll() is not None:
            note += (" This server runs no worker (`--no-worker`, or it exited): start one with "
                     "`python -m backend.worker --data-dir DIR`.")
        return note, {**_empty_state(), "job": job["id"]}, gr.update(
            choices=[(f"#{job['id']} {job['name']} ({job['state']})", job["id"])], value=job["id"])

    start.click(start_job, [kind, name, max_steps, max_seconds, eval_every, preset, corpus, tokenizer, sample_every,
                            max_chars, uploads, parent, data, reward_model, held_out_model, extra],
                [status, state, job_pick])

    def act(fn, job_id, request: gr.Request):
        user = request_user(pg, request, "operator")
        if not job_id:
            raise gr.Error("Pick a job first.")
        try:
            job = fn(job_id, user)
        except (ValueError, LookupError) as e:
            raise gr.Error(str(e))
        return f"Job {job['id']} is now **{job['state']}**" + (" (stopping after this step)" if job["cancel_requested"] else "")

    @door(pg, "operator")
    def cancel_job(job_id, request: gr.Request):
        return act(lambda i, u: queue.cancel_job(pg.db, i, u), job_id, request)

    @door(pg, "operator")
    def resume_job(job_id, request: gr.Request):
        return act(lambda i, u: queue.resume_job(pg.db, pg.cfg, i, u), job_id, request)

    cancel.click(cancel_job, job_pick, status)
    resume.click(resume_job, job_pick, status)

    @public
    def tick_and_next(st, selected, picked, visible, shown_next, request: gr.Request):
        """tick, and the next-step buttons' job ({"model", "parent", "actions"}) when it changed."""
        out = tick(st, selected, picked, visible, request)
        now = out[0].get("next") if isinstance(out[0], dict) and "job" in out[0] else shown_next  # not a skip
        return (*out, now if now != shown_next else gr.skip())

    def tick(st, selected, picked, visible, request: gr.Request):
        skip = gr.skip()
        if not visible:
            return (skip,) * 17
        user = user_from_request(pg, request.headers, request.cookies) if request is not None else None
        if user is None:
            return (st, skip, skip, "Log in (above) to start or watch training jobs.") + (skip,) * 13
        jobs = queue.list_jobs(pg.db, 100)
        sig = [(j["id"], j["state"], j["step"]) for j in jobs]
        table = _jobs_table(jobs) if sig != st["sig"] else skip
        choices = [(f"#{j['id']} {j['name']} ({j['state']})", j["id"]) for j in jobs]
        pick = gr.update(choices=choices) if choices != st["choices"] else skip
        st = {**st, "sig": sig, "choices": choices}
        job_id = selected or st["job"] or (jobs[0]["id"] if jobs else None)
        if job_id is None:
            return (st, table, pick, "No jobs yet: start one above.") + (skip,) * 13
        if job_id != st["job"]:
            st = {**_empty_state(), "sig": sig, "choices": choices, "job": job_id}
            if not selected:
                pick = gr.update(choices=choices, value=job_id)
        try:
            d = queue.job_detail(pg.db, job_id, st["after"])
        except LookupError:
            return ({**st, "job": None}, table, pick, f"No job {job_id}.") + (skip,) * 13
        st = {**st, "next": {"model": d["model"], "parent": d.get("parent_model"),
                             "actions": d["progress"].get("next_actions", [])}}
        if d["reset"]:
            st = {**st, "after": 0, "series": {}, "samples": [], "log": []}
        new_metrics = d["metrics"]
        series = {k: list(v) for k, v in st["series"].items()}
        for m in new_metrics:
            for k, v in m.items():
                if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                    series.setdefault(k, []).append([m["step"], v])
        loss = series.get("loss", [])
        keys = sorted((k for k in series if k != "loss"),
                      key=lambda k: (PREFERRED_CURVES.index(k) if k in PREFERRED_CURVES else len(PREFERRED_CURVES), k))
        second = _second_curve(series, picked)
        curve_pick = gr.update(choices=keys, value=second) if keys != st["curves"] else skip
        smp = (st["samples"] + [{"step": s["step"], "prompt": s.get("prompt", ""), "sample": s["sample"]}
                                for s in d["samples"]])[-20:]
        log = (st["log"] + [f"{time.strftime('%H:%M:%S', time.localtime(e['time']))}  {e['text']}"
                            for e in d["log"]])[-queue.LOG_TAIL:]
        changed = bool(new_metrics or d["samples"] or d["log"] or d["reset"] or st["after"] == 0)
        st = {**st, "after": d["last_event_id"], "series": series, "samples": smp, "log": log, "curves": keys,
              "span": _x_span(d, series)}
        if not changed:
            return (st, table, pick, _stats(d), _progress_html(d), skip, skip, skip, skip, skip, curve_pick) + (skip,) * 6
        info = (f"loss curve: {len(loss)} points" + (f" (steps {loss[0][0]}–{loss[-1][0]})" if loss else "")
                + (f" · {second}: {len(series.get(second, []))} points" if second else ""))
        span = _x_span(d, series)
        return (st, table, pick, _stats(d), _progress_html(d), _loss_plot(loss, span),
                _curve_plot(series, second, span), _samples_html(smp), "\n".join(reversed(log)), info, curve_pick,
                *_hacking_updates(d.get("reward_hacking")))

    timer.tick(tick_and_next, [state, job_pick, curve, shown, steps.job],
               [state, jobs_table, job_pick, stats, progress_box, loss_plot, bpb_plot, samples, log_box, curve_info,
                curve, hack_box, hack_md, hack_plot, distinct_plot, before_box, after_box, steps.job],
               show_progress="hidden")
    curve.input(public(lambda st, key: _curve_plot(st["series"], _second_curve(st["series"], key), st.get("span"))),
                [state, curve], bpb_plot)
    return {"kind": kind, "_next": steps}  # the kind is what the Start-here tour sets (ui.tour)
