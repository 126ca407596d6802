"""Practice tab (DEMOS 14-15): sample many solutions to a problem with a known answer, see them marked right
and wrong, and what voting (self-consistency) and best-of-N buy over one sample. Layout and wiring only:
backend.practice does the work."""
from __future__ import annotations

import asyncio
import html
import random
import threading

import gradio as gr
import pandas as pd

from backend import chat_service as cs
from backend import practice as svc
from ui.fields import RUNNING, parse_seed, penalty_values, repetition_controls, wire_stop
from ui.login import door, public, request_user
from ui.model_lists import model_dropdown

INTRO = ("**Practice problems with a known answer.** Pick a model and a problem (a generated one, or type your own "
         "with its exact answer), and sample N solutions at a temperature. Each solution is graded by the rule the "
         "GRPO trainer rewards: the final answer must be stated (\"The answer is 7.\", or after `</think>`) and match "
         "exactly; lenient grading also accepts the reply's last number (word). Sign in to sample (any account).")

NOTICE = ("**What to notice.** (1) The answer varies from sample to sample: at temperature > 0 the model is a "
          "distribution over solutions, and pass@1 is how often one draw is right. (2) Voting over samples "
          "(majority@k, self-consistency) usually beats one sample when the right answer is the most common "
          "one, even if most samples are wrong in different ways; pass@k (at least one of k right) is the "
          "ceiling a perfect picker would reach, and what RL on verifiable rewards learns from: a problem "
          "with no right sample gives no signal. (3) Compare the lengths: solutions that work through the steps "
          "are longer, and a solution cut off at the token limit states no answer and counts as wrong. "
          "Training on the right ones (GRPO, Training tab) turns pass@k into pass@1.")
NO_RM = "(none)"
STOPPED = ("⏹ Stopped before all samples were in, so nothing is graded: no pass@k or vote over a partial set. "
           "Run it again, perhaps with fewer samples or tokens.")
CURVE_NAMES = {"pass_at_k": "pass@k", "majority_at_k": "majority@k", "best_of_k": "best-of-k (reward model)"}


def curve_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{"k": r["k"], "accuracy": r[key], "metric": name}
                         for r in rows for key, name in CURVE_NAMES.items() if key in r],
                        columns=["k", "accuracy", "metric"])


def curve_table(rows: list[dict]) -> list[list]:
    return [[r["k"], *(f"{r[key]:.0%}" if key in r else "—" for key in CURVE_NAMES)] for r in rows]


def card(s: dict) -> str:
    mark, color = ("✓ right", "#2e7d32") if s["right"] else ("✗ wrong", "#c62828")
    answer = "no answer stated" if s["answer"] is None else f"answer: <b>{html.escape(s['answer'])}</b>"
    extra = " · cut off at the token limit" if s["finish_reason"] == "length" else ""
    score = f" · reward model {s['score']:+.3f}" if "score" in s else ""
    return (f'<div class="pg-practice-card {"right" if s["right"] else "wrong"}" style="border:2px solid {color};'
            f'border-radius:8px;padding:.5em;margin:.4em 0">'
            f'<div style="color:{color}"><b>#{s["index"] + 1} {mark}</b> · {answer} · {s["tokens"]} tokens{extra}{score}</div>'
            f'<pre style="white-space:pre-wrap;margin:.3em 0 0">{html.escape(s["text"]) or "(empty)"}</pre></div>')


def summary_md(r: dict) -> str:
    tally = ", ".join(f"**{html.escape(t['answer'])}** ×{t['votes']}{' ✓' if t['right'] else ''}" for t in r["tally"])
    maj = r["majority"]
    if not maj["answers"]:
        vote = "no sample stated an answer, so there is nothing to vote on"
    elif len(maj["answers"]) > 1:
        vote = f"a tie between {', '.join(map(html.escape, maj['answers']))} (counts {maj['right']:.0%} right)"
    else:
        vote = f"{html.escape(maj['answers'][0])}, {'right ✓' if maj['right'] else 'wrong ✗'}"
    best = (f"Best-of-{r['n']} by {html.escape(r['reward_model'])}: sample #{r['best_of_n']['index'] + 1} "
            f"({'right ✓' if r['best_of_n']['right'] else 'wrong ✗'})" if "best_of_n" in r
            else f"Best-of-N: {html.escape(r['best_of_n_note'])}")
    length = lambda v: "—" if v is None else f"{v:g}"
    silent = f"; {r['abstained']} stated no answer" if r["abstained"] else ""
    return (f"**{r['right']} of {r['n']} right** (pass@1 = {r['pass_at_1']:.0%}; the answer is "
            f"**{html.escape(r['problem']['answer'])}**). Votes: {tally or 'none'}{silent}.  \n"
            f"Majority vote of all {r['n']}: {vote}.  \n{best}.  \n"
            f"Mean length: right {length(r['mean_tokens_right'])} tokens, wrong {length(r['mean_tokens_wrong'])} tokens. "
            f"Seed {r['seed']} repeats this run.")


def build(pg) -> None:
    gr.Markdown(INTRO)
    with gr.Row():
        model = model_dropdown(lambda: cs.chat_models(pg.registry), value=pg.cfg.default_model if pg.cfg.default_model
                               in cs.chat_models(pg.registry) else None, label="Model", scale=4, elem_id="practice-model")
        refresh = gr.Button("↻ models", scale=0, size="sm")
    with gr.Row():
        kind = gr.Dropdown(svc.problem_kinds(), value="apples", label="Problem kind", scale=2, elem_id="practice-kind")
        scale = gr.Radio(["small", "large"], value="small", label="Numbers up to 10 (small) or 200 (large)", scale=2)
        new = gr.Button("🎲 New problem", scale=1, elem_id="practice-new")
    first = svc.generated_problem("apples", 0, "small")  # the tab opens with a problem ready: Sample works at once
    with gr.Row():
        question = gr.Textbox(first.question, label="Problem (generated, or type your own)", lines=2, scale=4,
                              elem_id="practice-question")
        answer = gr.Textbox(first.answer, label="Exact answer (a whole number or one word)", scale=1,
                            elem_id="practice-answer")
    with gr.Row():
        n = gr.Slider(1, svc.MAX_N, value=8, step=1, label="N samples", elem_id="practice-n")
        temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature", elem_id="practice-temperature")
        max_tokens = gr.Slider(16, svc.MAX_TOKENS, value=256, step=16, label="Max tokens per solution",
                               elem_id="practice-max-tokens")
        seed = gr.Textbox("", label="Seed (empty = random)", elem_id="practice-seed")  # a gr.Number shows empty as 0
    with gr.Row():
        template = gr.Radio([("Plain: end with 'The answer is N.'", "plain"), ("R1-Zero: <think> … </think> answer", "think")],
                            value="plain", label="System prompt (the GRPO trainer's)")
        rm = model_dropdown(lambda: [NO_RM, *svc.reward_models(pg.registry)], value=NO_RM,
                            label="Reward model for best-of-N", elem_id="practice-rm")
        lenient = gr.Checkbox(False, label="Lenient grading: no stated answer counts the reply's last number (word)",
                              elem_id="practice-lenient")
    with gr.Accordion("Repetition controls", open=False):
        with gr.Row():
            penalties = repetition_controls("practice")
    with gr.Row():
        go = gr.Button("Sample N solutions", variant="primary", scale=4, elem_id="practice-sample")
        halt = gr.Button("■ Stop", variant="stop", scale=1, elem_id="practice-stop")
    summary = gr.Markdown(elem_id="practice-summary")
    with gr.Row():
        plot = gr.LinePlot(curve_frame([]), x="k", y="accuracy", color="metric", y_lim=[0, 1],
                           title="Accuracy with k samples", elem_id="practice-plot")
        table = gr.Dataframe(headers=["k", *CURVE_NAMES.values()], interactive=False, elem_id="practice-curve")
    cards = gr.HTML(elem_id="practice-cards")
    gr.Markdown(NOTICE)

    gr.Markdown("### Scaling curve over several problems\nThe same N samples for each of M generated problems of "
                "the kind above; majority@k averaged over the problems, for k = 1, 2, 4, …, N.")
    with gr.Row():
        m = gr.Slider(1, svc.MAX_PROBLEMS, value=5, step=1, label="M problems", elem_id="practice-m")
        problem_seed = gr.Number(0, precision=0, label="Problem set seed")
        go_curve = gr.Button("Run the scaling curve", elem_id="practice-scale")
        halt_curve = gr.Button("■ Stop", variant="stop", scale=0, elem_id="practice-scale-stop")
    curve_status = gr.Markdown(elem_id="practice-scale-summary")
    with gr.Row():
        curve_plot = gr.LinePlot(curve_frame([]), x="k", y="accuracy", color="metric", y_lim=[0, 1],
                                 title="Accuracy with k samples, over M problems", elem_id="practice-scale-plot")
        curve_tab = gr.Dataframe(headers=["k", *CURVE_NAMES.values()], interactive=False, elem_id="practice-scale-table")
    per_problem = gr.Dataframe(headers=["Problem", "Answer", "Right of N", "Majority answer"], interactive=False,
                               elem_id="practice-scale-problems")

    def config(n_, temperature_, max_tokens_, seed_, template_, rm_, lenient_, freq_=0, pres_=0, rep_=1) -> svc.PracticeConfig:
        return svc.PracticeConfig(int(n_), float(temperature_), 1.0, int(max_tokens_),
                                  parse_seed(seed_), template_, None if rm_ == NO_RM else rm_, bool(lenient_),
                                  **penalty_values(freq_, pres_, rep_))

    @public
    def on_new(kind_, scale_):
        p = svc.generated_problem(kind_, random.randrange(10 ** 6), scale_)
        return p.question, p.answer

    async def outcome(fn, *args) -> tuple[dict | None, str | None]:
        """(fn(*args, cancel=...) run in a thread, None), or (None, the status to show) if it failed or stopped.
        ■ Stop cancels the awaiting task (Gradio's `cancels`, as in the Chat tab); the `finally` then sets
        `cancel`, so the engine stops at its next token and is free for the next request."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(fn, *args, cancel=cancel), None
        except svc.Stopped:
            return None, STOPPED
        except ValueError as e:
            return None, f"⚠ {html.escape(str(e))}"
        finally:
            cancel.set()

    @door(pg, "learner")
    async def on_sample(model_, question_, answer_, n_, temperature_, max_tokens_, seed_, template_, rm_,
                        lenient_, freq_, pres_, rep_, request: gr.Request):
        user = request_user(pg, request, "learner")  # noqa: F841 - the login is the guard
        try:
            problem = svc.typed_problem(question_, answer_)
            cfg = config(n_, temperature_, max_tokens_, seed_, template_, rm_, lenient_, freq_, pres_, rep_)
        except ValueError as e:
            yield f"⚠ {html.escape(str(e))}", gr.skip(), gr.skip(), gr.skip()
            return
        yield f"{RUNNING} Sampling {cfg.n} solutions…", curve_frame([]), [], ""
        r, failed = await outcome(svc.practice, pg, model_, problem, cfg)
        if failed:
            yield failed, gr.skip(), gr.skip(), gr.skip()
            return
        yield summary_md(r), curve_frame(r["curve"]), curve_table(r["curve"]), "".join(map(card, r["solutions"]))

    @door(pg, "learner")
    async def on_curve(model_, kind_, scale_, m_, pseed, n_, temperature_, max_tokens_, seed_, template_, rm_,
                       lenient_, freq_, pres_, rep_, request: gr.Request):
        request_user(pg, request, "learner")
        try:
            cfg = config(n_, temperature_, max_tokens_, seed_, template_, rm_, lenient_, freq_, pres_, rep_)
        except ValueError as e:
            yield f"⚠ {html.escape(str(e))}", gr.skip(), gr.skip(), gr.skip()
            return
        yield f"{RUNNING} Sampling {cfg.n} solutions of each of {int(m_)} problems…", curve_frame([]), [], []
        r, failed = await outcome(svc.scaling_curve, pg, model_, kind_, int(m_), int(pseed or 0), cfg, scale_)
        if failed:
            yield failed, gr.skip(), gr.skip(), gr.skip()
            return
        rows = [[p["question"], p["answer"], f"{p['right']} of {p['n']}",
                 " / ".join(p["majority"]["answers"]) or "(none)"] for p in r["problems"]]
        last = r["curve"][-1]
        status = (f"{r['m']} {html.escape(r['kind'])} problems × {r['n']} samples: pass@1 {r['pass_at_1']:.0%}, "
                  f"majority@{last['k']} {last['majority_at_k']:.0%}, pass@{last['k']} {last['pass_at_k']:.0%}. "
                  f"Sampling seed {r['sample_seed']}.")
        yield status, curve_frame(r["curve"]), curve_table(r["curve"]), rows

    sampling = [n, temperature, max_tokens, seed, template, rm, lenient, *penalties]
    new.click(on_new, [kind, scale], [question, answer])
    # progress (and a ■ Stop's end) shows on the status line alone, not as "Error" on the emptied results
    sampled = go.click(on_sample, [model, question, answer, *sampling], [summary, plot, table, cards],
                       show_progress_on=[summary])
    curved = go_curve.click(on_curve, [model, kind, scale, m, problem_seed, *sampling],
                            [curve_status, curve_plot, curve_tab, per_problem], show_progress_on=[curve_status])
    wire_stop(halt, [sampled], summary, STOPPED)
    wire_stop(halt_curve, [curved], curve_status, STOPPED)
    refresh.click(public(lambda: (gr.update(choices=cs.chat_models(pg.registry)),
                           gr.update(choices=[NO_RM, *svc.reward_models(pg.registry)]))), None, [model, rm])
