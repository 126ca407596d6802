"""A finished job's next steps as buttons under its progress bar: each opens the place it names with the job's
model already picked (Chat, Generate, the Arena's draw, a ranking round, an SFT or RLHF job from it, export).
Which steps a job offers is backend.jobs.progress.next_actions; this module only lays out and wires buttons."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ui.login import public

# action -> (button label, top-level tab id, sub-tab id of that tab or None, elem_id of the model dropdown it sets)
PLACES = {
    "chat": ("Open in Chat", "chat", None, "chat-model"),
    "generate": ("Open in Generate", "completion", None, "gen-model"),
    "arena": ("Put it in the Arena", "arena", None, "arena-models"),
    "rank": ("Start a ranking round on it", "labeling", "operator", "op-model"),
    "sft": ("Fine-tune it (SFT job)", "training", None, "train-parent"),
    "rlhf": ("Use it in an RLHF job", "training", None, "train-reward-model"),
    "export": ("Export it", "models", None, "models-pick"),
}
TRAINING_KIND = {"sft": "sft", "rlhf": "rlhf"}  # the actions that start a new job of this kind on the Training tab
OPERATOR_ACTIONS = {"rank", "sft", "rlhf", "export"}  # offered to operators only: the forms they open are theirs


@dataclass
class NextSteps:
    row: gr.Row
    buttons: dict[str, gr.Button]
    job: gr.State  # {"model", "parent", "actions"} of the job shown, or None


def build() -> NextSteps:
    """The (hidden) row of buttons; the Training tab puts it under the progress bar."""
    with gr.Row(visible=False, elem_id="train-next") as row:
        buttons = {a: gr.Button(label, size="sm", visible=False, elem_id=f"train-next-{a}")
                   for a, (label, *_) in PLACES.items()}
    return NextSteps(row, buttons, gr.State(None))


def shown(job: dict | None, operator: bool) -> list:
    """Row and button visibility for the job shown (`job`: the State's value) to a user who is an operator or not."""
    actions = [a for a in (job or {}).get("actions") or [] if operator or a not in OPERATOR_ACTIONS]
    return [gr.Row(visible=bool(actions))] + [gr.Button(visible=a in actions) for a in PLACES]


def wire(pg, steps: NextSteps, tabs: gr.Tabs, dropdowns: dict, handles: dict[str, dict], auth_changed: gr.Button) -> None:
    """`auth_changed`: the header's sign-in clicks it when who is signed in changes (the buttons follow the role).
    `dropdowns`: elem_id -> (dropdown, its choices function) of every model list (ui.model_lists.wire);
    `handles`: each tab's controls (ui.build_ui): the Labeling tab's inner "tabs", the Training tab's "kind", the
    Models tab's "export" accordion."""
    from backend.auth import user_from_request

    @public  # shows buttons by the caller's own role; what they open checks it again
    def show(job, request: gr.Request):
        user = user_from_request(pg, request.headers, request.cookies) if request is not None else None
        return shown(job, bool(user and user.can("operator")))

    steps.job.change(show, steps.job, [steps.row, *steps.buttons.values()], show_progress="hidden")
    auth_changed.click(show, steps.job, [steps.row, *steps.buttons.values()], show_progress="hidden")
    for action, (_, tab, subtab, elem_id) in PLACES.items():
        if elem_id not in dropdowns:
            continue
        dd, choices = dropdowns[elem_id]
        outputs = [tabs, dd]
        extra = []  # (component, a function making its update: made in the handler, not here inside the Blocks)
        if subtab:
            extra.append((handles[tab]["tabs"], lambda subtab=subtab: gr.Tabs(selected=subtab)))
        if action in TRAINING_KIND:
            extra.append((handles["training"]["kind"], lambda kind=TRAINING_KIND[action]: kind))
        if action == "export" and "export" in handles.get("models", {}):
            extra.append((handles["models"]["export"], lambda: gr.Accordion(open=True)))
        outputs += [c for c, _ in extra]

        def go(job, tab=tab, dd=dd, choices=choices, extra=extra):
            model = (job or {}).get("model")
            if not model:
                return (gr.skip(),) * (2 + len(extra))
            names = [c[1] if isinstance(c, (list, tuple)) else c for c in choices()]
            value = model
            if dd.multiselect:  # the Arena's draw: the new model against its parent when that can chat too
                parent = job.get("parent")
                value = [model] + ([parent] if parent and parent != model and parent in names else [])
            # The list is refreshed with the value: a model registered since the page loaded is not in it yet.
            return (gr.Tabs(selected=tab), gr.Dropdown(choices=choices(), value=value), *(update() for _, update in extra))

        # Only switches tabs and fills a model list with a public model name; what is done there is checked there.
        steps.buttons[action].click(public(go), steps.job, outputs, show_progress="hidden")
