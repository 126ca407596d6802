"""Arena tab (DEMOS 18): a prompt, two anonymous answers side by side, a vote, the names revealed, and the
leaderboard the votes make. Layout and wiring only: backend.arena does the work."""
from __future__ import annotations

import asyncio
import html
import threading
import time

import gradio as gr

from backend import chat_service as cs
from backend.arena import battles as arena
from backend.arena.ratings import MIN_BATTLES
from backend.serving.engine import aiterate
from ui.chat import _md
from ui.fields import RUNNING, parse_seed, penalty_values, repetition_controls, wire_stop
from ui.login import door, public, request_user
from ui.model_lists import model_dropdown

INTRO = ("**Comparing models the way LM Arena does.** Two models, drawn at random, answer your prompt; you see "
         "only \"Model A\" and \"Model B\". Vote for the better answer (or a tie, or both bad) and the names are "
         "revealed. Every blind vote goes into the leaderboard below (a vote where an answer names its model, e.g. "
         "\"I am SmolLM\", is set aside, as LM Arena does): a Bradley-Terry model fitted on the votes (ties "
         "count half), with 95% bootstrap intervals, and online Elo beside it for comparison. **What to notice:** "
         "with a handful of votes the intervals are wide and overlap, so the ranks are ties; Elo changes with the "
         "order of the votes, Bradley-Terry does not. Open-ended prompts with no checkable answer (a joke about "
         "pelicans) are what people-vote arenas are for. Sign in to vote (any account).")

STREAM_EVERY_S = 0.1  # redraw the streaming answers at most this often
STOPPED = ("⏹ Stopped. This battle has no answers to vote on and stays out of the leaderboard; "
           "start a new one when you like.")
VOTES = [("a", "👈 A is better"), ("b", "👉 B is better"), ("tie", "🤝 Tie"), ("both_bad", "👎 Both are bad")]
VOTE_WORDS = dict(VOTES)
BOARD_HEADERS = ["Rank (UB)", "Model", "Bradley-Terry", "95% CI", "Online Elo", "Battles", "Wins", "Losses", "Ties",
                 "Win rate"]


def board_rows(board: dict) -> list[list]:
    def settled(r) -> bool:
        return r["battles"] >= MIN_BATTLES
    return [[r["rank"] if settled(r) else "—", r["model"], round(r["rating"]),
             f"{r['ci_low']:.0f} – {r['ci_high']:.0f}" if settled(r) else f"needs {MIN_BATTLES - r['battles']} more vote(s)",
             round(r["elo"]), r["battles"], r["wins"], r["losses"], r["ties"], f"{r['win_rate']:.0%}"]
            for r in board["rows"]]


def matrix_value(board: dict) -> dict:
    wr = board["win_rate"]
    rows = [[m] + ["—" if r is None else f"{r:.0%} of {n}" for r, n in zip(rates, games)]
            for m, rates, games in zip(wr["models"], wr["rate"], wr["battles"])]
    return {"headers": ["row vs column"] + wr["models"], "data": rows or [["(no votes yet)"]]}


def tables(pg) -> tuple[list[list], dict]:
    board = arena.leaderboard(pg.db)
    return board_rows(board), matrix_value(board)


def build(pg) -> None:
    gr.Markdown(INTRO)
    battle_id = gr.State(None)
    with gr.Row():
        draw = model_dropdown(lambda: cs.chat_models(pg.registry), value=[], multiselect=True, scale=4,
                              elem_id="arena-models", label="Models in the draw (empty = every chat model; two are drawn at random)")
        refresh = gr.Button("↻ models", scale=0, size="sm")
    with gr.Accordion("Sampling (the same for both models)", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            max_tokens = gr.Slider(1, arena.MAX_TOKENS, value=256, step=1, label="Max new tokens per answer",
                                   elem_id="arena-max-tokens")
            seed = gr.Textbox("", label="Seed (empty = random)")  # a gr.Number shows empty as 0
        with gr.Row():
            penalties = repetition_controls("arena")
    sample = gr.Dropdown(arena.SAMPLE_PROMPTS, value=None, label="Sample prompts", elem_id="arena-sample")
    with gr.Row():
        prompt = gr.Textbox(placeholder="Ask both models something", show_label=False, scale=5, elem_id="arena-prompt")
        go = gr.Button("⚔ Battle", variant="primary", scale=1, elem_id="arena-battle")
        more = gr.Button("↪ Follow up", scale=1, elem_id="arena-follow-up")  # the same two models, another turn
        halt = gr.Button("■ Stop", variant="stop", scale=0, elem_id="arena-stop")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("### Model A")
            answer_a = gr.Markdown(elem_id="arena-answer-a")
        with gr.Column():
            gr.Markdown("### Model B")
            answer_b = gr.Markdown(elem_id="arena-answer-b")
    with gr.Row():
        buttons = [gr.Button(label, interactive=False, elem_id=f"arena-vote-{w}") for w, label in VOTES]
    status = gr.Markdown(elem_id="arena-status")
    gr.Markdown("### Leaderboard")
    gr.Markdown(f"**How to read it:** a model's Bradley-Terry rating is the strength that best explains who beat whom "
                f"in all the votes; the 95% interval is how far it moves when the votes are resampled, and the rank is "
                f"1 + the models whose interval lies entirely above it (overlapping intervals share a rank). Ranks and "
                f"intervals appear once a model has {MIN_BATTLES} battles.", elem_id="arena-board-help")
    board = gr.Dataframe(public(lambda: board_rows(arena.leaderboard(pg.db))), headers=BOARD_HEADERS, interactive=False, elem_id="arena-leaderboard")
    gr.Markdown("Win rate of the row model against the column model (ties count half), and how many battles.")
    matrix = gr.Dataframe(public(lambda: matrix_value(arena.leaderboard(pg.db, bootstrap=0))), interactive=False, elem_id="arena-winrate")
    show = gr.Button("↻ Refresh leaderboard", size="sm", elem_id="arena-refresh")

    def locked(v=False):
        return [gr.update(interactive=v) for _ in buttons]

    @door(pg, "learner")
    async def on_battle(text, models, temperature_, max_tokens_, seed_, freq_, pres_, rep_, request: gr.Request):
        user = request_user(pg, request, "learner")
        try:
            params = arena.sampling_params(float(temperature_), 0.95, int(max_tokens_), parse_seed(seed_),
                                           **penalty_values(freq_, pres_, rep_))
        except ValueError as e:
            yield None, "", "", f"⚠ {html.escape(str(e))}", *locked()
            return
        # Say "running" before the battle exists, so no yield sits between its creation and its answers: a ■ Stop
        # after the creation reaches the battle through `cancel` (marked stopped); one during the insert leaves it
        # "answering", which is never votable and never in the leaderboard.
        yield None, "", "", f"{RUNNING} Drawing two models…", *locked()
        try:
            battle = await asyncio.to_thread(arena.start_battle, pg, user, text, list(models or []), params)
        except ValueError as e:
            yield None, "", "", f"⚠ {html.escape(str(e))}", *locked()
            return
        async for out in answering(user, battle):
            yield out

    def transcript(battle: dict, side: str, latest: str) -> str:
        """One side's conversation: the earlier turns (prompt, its own answer), then the latest answer."""
        past = "".join(f"**You:** {_md(t['prompt'])}\n\n{_md(t[f'answer_{side}'])}\n\n---\n\n" for t in battle["turns"])
        return past + (f"**You:** {_md(battle['prompt'])}\n\n" if battle["turns"] else "") + _md(latest)

    async def answering(user, battle: dict):
        """Stream the battle's current turn into both answer views; votable when both are in."""
        shown = {"a": "", "b": ""}
        cancel = threading.Event()
        view = lambda: (transcript(battle, "a", shown["a"]), transcript(battle, "b", shown["b"]))  # noqa: E731
        last = 0.0
        try:
            async for side, delta in aiterate(arena.answer_events(pg, user, battle["id"], cancel), cancel):
                shown[side] += delta
                # Two growing Markdown views re-rendered per token keep the browser busy enough to delay a click
                # on ■ Stop: redraw at most every STREAM_EVERY_S (the end's own update shows every token).
                if time.monotonic() - last >= STREAM_EVERY_S:
                    last = time.monotonic()
                    yield (battle["id"], *view(), f"{RUNNING} Model {side.upper()} is answering…", *locked())
        except Exception as e:  # noqa: BLE001 - the battle is marked failed; say why
            yield battle["id"], *view(), f"⚠ {html.escape(str(e))}", *locked()
            return
        finally:
            cancel.set()  # ■ Stop cancels this task (Gradio's `cancels`, as in the Chat tab): the engine stops
        done = await asyncio.to_thread(arena.get_battle, pg, user, battle["id"])
        if done["status"] != "ready":
            yield battle["id"], *view(), STOPPED, *locked()
            return
        yield (battle["id"], transcript(done, "a", done["answer_a"]) or "(empty answer)",
               transcript(done, "b", done["answer_b"]) or "(empty answer)",
               "Which answer is better? The names appear after your vote; or ↪ Follow up to ask both again "
               "(each keeps its own conversation).", *locked(True))

    @door(pg, "learner")
    async def on_follow_up(bid, text, request: gr.Request):
        user = request_user(pg, request, "learner")
        try:
            if bid is None:
                raise ValueError("start a battle first")
            battle = await asyncio.to_thread(arena.follow_up, pg, user, bid, text)
        except (ValueError, LookupError, PermissionError) as e:
            yield gr.skip(), gr.skip(), gr.skip(), f"⚠ {html.escape(str(e))}", *[gr.skip() for _ in buttons]
            return
        async for out in answering(user, battle):
            yield out

    def on_vote(winner, bid, request: gr.Request):
        try:
            user = request_user(pg, request, "learner")
            if bid is None:
                raise ValueError("start a battle first")
            b = arena.vote(pg, user, bid, winner)
        except (ValueError, LookupError, PermissionError) as e:
            return f"⚠ {html.escape(str(e))}", *locked(), gr.skip(), gr.skip()
        counted = (f"Battle #{b['id']} is in the leaderboard." if not b["set_aside"] else
                   f"⚠ Battle #{b['id']} is **set aside** from the leaderboard: {html.escape(b['set_aside'])}, so the "
                   "vote was not blind (Chatbot Arena drops such votes too).")
        reveal = (f"**Model A was {html.escape(b['model_a'])}, Model B was {html.escape(b['model_b'])}.** "
                  f"You voted: {VOTE_WORDS[winner]}. {counted}")
        return reveal, *locked(), *tables(pg)

    def voter(winner):
        @door(pg, "learner")
        def handler(bid, request: gr.Request):
            return on_vote(winner, bid, request)
        return handler

    outs = [battle_id, answer_a, answer_b, status, *buttons]
    # progress (and a ■ Stop's end) shows on the status line alone, not as "Error" on the answers
    asked = [prompt, draw, temperature, max_tokens, seed, *penalties]
    battled = go.click(on_battle, asked, outs, show_progress_on=[status])
    submitted = prompt.submit(on_battle, asked, outs, show_progress_on=[status])
    followed = more.click(on_follow_up, [battle_id, prompt], outs, show_progress_on=[status])
    wire_stop(halt, [battled, submitted, followed], status, STOPPED)
    for (winner, _), button in zip(VOTES, buttons):
        button.click(voter(winner), [battle_id], [status, *buttons, board, matrix])
    sample.change(public(lambda s: s or gr.skip()), [sample], [prompt])
    show.click(public(lambda: tables(pg)), None, [board, matrix])
    refresh.click(public(lambda: gr.update(choices=cs.chat_models(pg.registry))), None, draw)
    return {"sample": sample}  # what the Start-here tour sets (ui.tour)
