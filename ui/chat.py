"""Chat tab: a conversation with any chat model, with a system prompt, tools (search, Python) and
thinking shown as collapsible steps, the context as tokens, demo presets (DEMOS 10-13) and "send to
labeling". Layout and wiring only: backend.chat_service and backend.tool_loop do the work."""
from __future__ import annotations

import asyncio
import html
import threading
import time

import gradio as gr

from backend import chat_service as cs
from backend.auth import AccessDenied, check
from backend.serving.engine import aiterate
from backend.serving.sampling import SamplingParams
from backend.tokenizer_explorer import CSS as TOKENS_CSS, render_tokens_html, tokens_from_ids
from ui.fields import RUNNING, penalty_values, repetition_controls, wire_stop
from ui.login import door, public, request_user
from ui.model_lists import model_dropdown

INTRO = ("Chat with any registered chat model. Tool calls and their outputs appear as collapsible steps, thinking "
         "as a collapsible block apart from the answer. No model here has been tuned to call tools yet (the SFT "
         "tool-use preset of the Training tab makes one), so presets marked *forced* write the call for the model "
         "and **▶ Run code block as tool call** runs a code block the model wrote as if it had called Python.")


STREAM_EVERY_S = 0.1  # redraw the streaming answer at most this often (the turn's end shows all of it)
STOPPED = "⏹ Stopped. Send a message or regenerate to go on."


# -- display: conversation -> gr.Chatbot messages ----------------------------------------------------
def _md(text: str) -> str:
    """Text for the Chatbot's markdown: '<' outside code fences escaped, so tags like <tool_call> show."""
    parts = (text or "").split("```")
    return "```".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def _fence(text: str, lang: str = "") -> str:
    ticks = "````" if "```" in text else "```"
    return f"{ticks}{lang}\n{text}\n{ticks}"


def _step_message(step: dict, done: bool) -> dict:
    tool, arg = step["tool"], step["input"]
    body = ("Code:\n" + _fence(arg, "python")) if tool == "python" else f"Query: **{html.escape(arg)}**"
    if done:
        body += "\n\nOutput:\n" + _fence(step.get("output", ""))
    short = arg.replace("\n", " ")
    meta = {"title": f"🛠 {tool}{' (forced)' if step.get('forced') else ''}: {short[:60]}{'…' if len(short) > 60 else ''}",
            "status": "done" if done else "pending"}
    if done:
        meta["duration"] = step.get("duration_s", 0.0)
        if not step.get("ok", True):
            meta["log"] = "failed"
    return {"role": "assistant", "content": body, "metadata": meta}


def view_messages(parts: list[dict], live: bool = False) -> list[dict]:
    """One assistant turn's display parts (think / step / text / note, in order) -> Chatbot messages."""
    out = []
    for i, p in enumerate(parts):
        last = live and i == len(parts) - 1
        if p["kind"] == "think":
            out.append({"role": "assistant", "content": _md(p["text"]),
                        "metadata": {"title": "💭 Thinking", "status": "pending" if last else "done"}})
        elif p["kind"] == "step":
            out.append(_step_message(p["step"], "output" in p["step"]))
        elif p["kind"] == "note":
            out.append({"role": "assistant", "content": "⚠ " + _md(p["text"])})
        elif p["kind"] == "scripted":
            out.append({"role": "assistant", "content": _md(p["text"]),
                        "metadata": {"title": "✍ Scripted by the preset (not the model)", "status": "done"}})
        elif p["text"].strip():
            out.append({"role": "assistant", "content": _md(p["text"])})
    return out


def display(conv: list[dict], live_parts: list[dict] | None = None) -> tuple[list[dict], list[int]]:
    """Chatbot messages for the conversation, and for each shown message the conversation index it shows."""
    msgs, where = [], []
    for i, m in enumerate(conv):
        if m["role"] == "user":
            shown = [{"role": "user", "content": m["content"]}]
        else:
            shown = view_messages(m.get("_view") or [{"kind": "text", "text": m["content"]}]) or \
                [{"role": "assistant", "content": "(empty answer)"}]
        msgs += shown
        where += [i] * len(shown)
    if live_parts is not None:
        shown = view_messages(live_parts, live=True)
        msgs += shown
        where += [len(conv)] * len(shown)
    return msgs, where


def add_part(parts: list[dict], ev, scripted: bool = False) -> None:
    """`scripted`: this text was written by the preset (a lead-in), not sampled; it is shown marked as such."""
    if ev.type in ("text", "thinking"):
        kind = "scripted" if scripted and ev.type == "text" else "think" if ev.type == "thinking" else "text"
        if parts and parts[-1]["kind"] == kind:
            parts[-1]["text"] += ev.text
        else:
            parts.append({"kind": kind, "text": ev.text})
    elif ev.type == "tool_start":
        parts.append({"kind": "step", "step": dict(ev.step)})
    elif ev.type == "tool_end":
        for p in reversed(parts):
            if p["kind"] == "step" and p["step"]["index"] == ev.step["index"]:
                p["step"] = dict(ev.step)
                break
    elif ev.type == "note":
        parts.append({"kind": "note", "text": ev.text})


def tokens_html(pg, model, system, conv) -> str:
    try:
        v, enc = cs.tokens_view(pg, model, system, conv)
    except Exception as e:  # noqa: BLE001 - shown in place of the view
        return f"<p>⚠ {html.escape(str(e))}</p>"
    tokens = tokens_from_ids(enc, v["ids"])
    loss = v["loss_tokens"]
    head = (f"<p><b>{v['count']}</b> tokens in <code>{html.escape(v['encoding'])}</code>; {loss} would get training "
            "loss if this were saved as a demo (green underline; the tool output is not among them). Special tokens "
            "are outlined; the generation prompt the server appends is boxed in blue.</p>")
    return head + render_tokens_html(v["text"], tokens, enc, mask=v["mask"], highlight_from=v["generation_prompt_from"])


# -- the tab -----------------------------------------------------------------------------------------
def build(pg) -> None:
    names = cs.chat_models(pg.registry)
    default = pg.cfg.default_model if pg.cfg.default_model in names else (names[0] if names else None)
    gr.Markdown(INTRO)
    conv = gr.State([])       # structured messages, no system prompt
    where = gr.State([])      # display index -> conversation index
    with gr.Row():
        model = model_dropdown(lambda: cs.chat_models(pg.registry), value=default, label="Model", scale=3,
                               elem_id="chat-model")
        refresh = gr.Button("↻ models", scale=0, size="sm")
        tools = gr.CheckboxGroup(["search", "python"], value=["search", "python"], label="Tools the model may call",
                                 scale=2, elem_id="chat-tools")
        max_calls = gr.Slider(0, 8, value=4, step=1, label="Tool calls per turn (limit)", scale=2)
    with gr.Row():
        with gr.Column(scale=1):
            demo = gr.Dropdown([d.title for d in cs.DEMOS], value=None, label="Deep Dive presets (DEMOS 10-13)",
                               elem_id="chat-demo")
            demo_note = gr.Markdown(elem_id="chat-demo-note")
            run_demo = gr.Button("▶ Run preset", elem_id="chat-run-demo")
            preset = gr.Radio(list(cs.SYSTEM_PRESETS), value="Plain assistant", label="System prompt preset",
                              elem_id="chat-system-preset")
            system = gr.Textbox(cs.SYSTEM_PRESETS["Plain assistant"], label="System prompt (empty = the model's default)",
                                lines=4, elem_id="chat-system")
            with gr.Accordion("Sampling", open=False):
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)", elem_id="chat-temperature")
                top_p = gr.Slider(0.01, 1, value=0.95, step=0.01, label="Top-p")
                max_tokens = gr.Slider(1, 2048, value=300, step=1, label="Max new tokens per turn", elem_id="chat-max-tokens")
                seed = gr.Textbox(label="Seed", placeholder="empty = random")
                penalties = repetition_controls("chat")
        with gr.Column(scale=3):
            bot = gr.Chatbot(label="Conversation", height=520, editable="user", elem_id="chat-bot",
                             buttons=["copy", "copy_all"])
            with gr.Row():
                user_in = gr.Textbox(placeholder="Message (Enter to send)", show_label=False, scale=5, elem_id="chat-input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            with gr.Row():
                halt = gr.Button("■ Stop", variant="stop", elem_id="chat-stop")
                regen = gr.Button("↻ Regenerate", elem_id="chat-regenerate")
                run_code = gr.Button("▶ Run code block as tool call", elem_id="chat-run-code")
                sample5 = gr.Button("Ask 5 times", elem_id="chat-sample")
                clear = gr.Button("Clear", elem_id="chat-clear")
            status = gr.Markdown(elem_id="chat-status")
            samples = gr.Markdown(elem_id="chat-samples")
            with gr.Accordion("Tokens: the whole context as the model sees it", open=False):
                show_tokens = gr.Button("Show tokens", size="sm", elem_id="chat-show-tokens")
                tokens = gr.HTML("", css_template=TOKENS_CSS, elem_id="chat-tokens")
            with gr.Accordion("Send to labeling (sign in on the Labeling tab first)", open=False):
                gr.Markdown("**As an SFT demo**: the conversation (thinking and tool calls included) becomes your draft "
                            "under Labeling → Write demos, to edit and submit. **As a ranking item** (operators): the "
                            "last user prompt gets 4 candidates sampled from the model above, to rank under Labeling → Rank.")
                with gr.Row():
                    to_demo = gr.Button("Send as SFT demo", elem_id="chat-to-demo")
                    to_rank = gr.Button("Send prompt as ranking item", elem_id="chat-to-rank")
                label_info = gr.Markdown(elem_id="chat-label-info")

    def params_of(temperature, top_p, max_tokens, seed, freq=0.0, pres=0.0, rep=1.0) -> SamplingParams:
        seed = (seed or "").strip()
        if seed and not seed.lstrip("-").isdigit():
            raise ValueError(f"seed must be a whole number, not {seed!r}")
        return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens),
                              seed=int(seed) if seed else None, **penalty_values(freq, pres, rep)).validate()

    async def respond(conv_now, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_,
                      rep_, prefix="", lead_in="", request=None):
        """Stream one assistant turn after conv_now (ending with a user message)."""
        shown, idx = display(conv_now)
        if tool_names or prefix:  # tools run code and read the documents: a signed-in learner (backend.auth)
            try:
                check(pg, "learner", request)
            except AccessDenied as e:
                why = "log in (top of this tab)" if e.status == 401 else e.message
                yield shown, conv_now, idx, f"⚠ Tools need a signed-in user: {why}, or untick the tools.", gr.skip()
                return
        try:
            p = params_of(temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_)
            if not name:
                raise ValueError("no chat model is registered")
            cancel = threading.Event()
            events = await asyncio.to_thread(cs.turn_events, pg, name, system_text, conv_now, p, list(tool_names or []),
                                             int(calls), cancel, prefix, lead_in)
        except ValueError as e:
            yield shown, conv_now, idx, f"⚠ {html.escape(str(e))}", gr.skip()
            return
        parts: list[dict] = []
        result = None
        # Text the preset wrote (a lead-in after a forced call's output) is marked, so it is never taken for the
        # model's own answer; the tool loop streams it as text right after the forced call's tool_end.
        scripted_left = ""
        last = 0.0
        try:
            async for ev in aiterate(events, cancel):
                if ev.type == "done":
                    result = ev.result
                    continue
                if ev.type == "tool_end" and ev.step.get("forced") and lead_in:
                    scripted_left = lead_in
                take = ev.type == "text" and scripted_left and scripted_left.startswith(ev.text)
                if take:
                    scripted_left = scripted_left[len(ev.text):]
                add_part(parts, ev, scripted=bool(take))
                # A redraw per token kept the page too busy to take a click on ■ Stop on a fast model: text is
                # redrawn at most every STREAM_EVERY_S, tool steps at once.
                if ev.type == "text" and time.monotonic() - last < STREAM_EVERY_S:
                    continue
                last = time.monotonic()
                shown, idx = display(conv_now, parts)
                yield shown, conv_now, idx, f"{RUNNING} generating…" if ev.type != "tool_start" else f"{RUNNING} running {ev.step['tool']}…", gr.skip()
        except ValueError as e:
            yield shown, conv_now, idx, f"⚠ {html.escape(str(e))}", gr.skip()
            return
        if result is None:  # stopped
            return
        msg = {**result.message, "_view": parts}
        new = conv_now + [msg]
        shown, idx = display(new)
        used = f"{result.completion_tokens} tokens, {len(result.steps)} tool call(s)"
        yield shown, new, idx, f"done · {name} · {result.finish_reason} · {used}", tokens_html(pg, name, system_text, new)

    outs = [bot, conv, where, status, tokens]
    common = [model, system, tools, max_calls, temperature, top_p, max_tokens, seed, *penalties]

    @door(pg, "inference")
    async def on_send(text, conv_now, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_,
                      request: gr.Request):
        if not (text or "").strip():
            shown, idx = display(conv_now)
            yield shown, conv_now, idx, "Write a message first.", gr.skip(), text
            return
        c = conv_now + [{"role": "user", "content": text}]
        async for out in respond(c, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_,
                                 request=request):
            yield (*out, "")

    @door(pg, "inference")
    async def on_regenerate(conv_now, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_,
                            request: gr.Request):
        c = list(conv_now)
        while c and c[-1]["role"] == "assistant":
            c.pop()
        if not c:
            shown, idx = display(conv_now)
            yield shown, conv_now, idx, "Nothing to regenerate.", gr.skip()
            return
        async for out in respond(c, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_,
                                 request=request):
            yield out

    @door(pg, "inference")
    async def on_run_code(conv_now, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_,
                          request: gr.Request):
        code = cs.last_code_block(conv_now[-1]["content"]) if conv_now and conv_now[-1]["role"] == "assistant" else None
        if code is None:
            shown, idx = display(conv_now)
            yield shown, conv_now, idx, "The last answer has no ``` code block to run.", gr.skip()
            return
        c = conv_now[:-1]
        tools_now = sorted(set(tool_names or []) | {"python"})
        async for out in respond(c, name, system_text, tools_now, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_,
                                 prefix=cs.python_call(code), lead_in=cs.PYTHON_LEAD_IN, request=request):
            yield out

    @door(pg, "inference")
    async def on_edit(conv_now, idx, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_,
                      pres_, rep_, ev: gr.EditData, request: gr.Request):
        rest = (name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_)
        i = idx[ev.index] if isinstance(ev.index, int) and ev.index < len(idx) else None
        if i is None or conv_now[i]["role"] != "user":
            shown, w = display(conv_now)
            yield shown, conv_now, w, "Only your own messages can be edited.", gr.skip()
            return
        c = conv_now[:i] + [{"role": "user", "content": ev.value if isinstance(ev.value, str) else str(ev.value)}]
        async for out in respond(c, *rest, request=request):
            yield out

    @public
    def on_demo(title):
        d = cs.DEMO_BY_TITLE.get(title)
        if d is None:
            return (gr.skip(),) * 8
        return (f"**What to notice.** {d.note}", d.system, cs.SYSTEM_PRESETS[d.system], d.tools, d.temperature,
                d.max_tokens, d.user, d.repetition_penalty)

    @door(pg, "inference")
    async def on_run_demo(title, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_,
                          rep_, request: gr.Request):
        d = cs.DEMO_BY_TITLE.get(title)
        if d is None:
            yield [], [], [], "Pick a preset first.", gr.skip(), gr.skip()
            return
        c = [{"role": "user", "content": d.user}]
        if d.samples > 1:
            shown, idx = display(c)
            yield shown, c, idx, f"{RUNNING} sampling {d.samples} answers…", gr.skip(), ""
            text = await asyncio.to_thread(sample_text, name, system_text, c, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_, d.samples)
            yield shown, c, idx, "done", gr.skip(), text
            return
        async for out in respond(c, name, system_text, tool_names, calls, temperature, top_p, max_tokens_, seed_, freq_, pres_,
                                 rep_, prefix=d.prefix, lead_in=d.lead_in, request=request):
            yield (*out, "")

    def sample_text(name, system_text, c, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_, n) -> str:
        try:
            answers = cs.sample_answers(pg, name, system_text, c, params_of(temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_), n)
        except ValueError as e:
            return f"⚠ {html.escape(str(e))}"
        return "**The same question, sampled {} times:**\n\n".format(n) + "\n\n".join(
            f"{i + 1}. {_md(a.strip()) or '(empty)'}" for i, a in enumerate(answers))

    @door(pg, "inference")
    async def on_sample(conv_now, name, system_text, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_):
        c = list(conv_now)
        while c and c[-1]["role"] == "assistant":
            c.pop()
        if not c:
            return "Send a message first; this samples the answer to the last one 5 times."
        return await asyncio.to_thread(sample_text, name, system_text, c, temperature, top_p, max_tokens_, seed_, freq_, pres_, rep_, 5)

    @door(pg, "annotator")
    def on_demo_send(conv_now, system_text, request: gr.Request):
        try:
            user = request_user(pg, request, "annotator")
            d = cs.send_demo(pg, user, system_text, conv_now)
        except ValueError as e:
            return f"⚠ {html.escape(str(e))}"
        return f"Saved as SFT demo #{d['demo_id']} (draft). Open it under Labeling → Write demos → My demonstrations."

    @door(pg, "operator")
    def on_rank_send(conv_now, name, system_text, temperature, request: gr.Request):
        try:
            user = request_user(pg, request, "operator")
            s = cs.send_ranking(pg, user, name, system_text, conv_now, temperature=float(temperature) or 1.0)
        except ValueError as e:
            return f"⚠ {html.escape(str(e))}"
        return f"Ranking set #{s['id']} “{html.escape(s['name'])}” created with {s['k']} candidates. Rank it under Labeling → Rank."

    sent = send.click(on_send, [user_in, conv, *common], [*outs, user_in])
    submitted = user_in.submit(on_send, [user_in, conv, *common], [*outs, user_in])
    regenerated = regen.click(on_regenerate, [conv, *common], outs)
    retried = bot.retry(on_regenerate, [conv, *common], outs)
    ran = run_code.click(on_run_code, [conv, *common], outs)
    edited = bot.edit(on_edit, [conv, where, *common], outs)
    demoed = run_demo.click(on_run_demo, [demo, *common], [*outs, samples])
    wire_stop(halt, [sent, submitted, regenerated, retried, ran, edited, demoed], status, STOPPED)
    demo.change(on_demo, [demo], [demo_note, preset, system, tools, temperature, max_tokens, user_in, penalties[2]])
    preset.input(public(lambda k: cs.SYSTEM_PRESETS[k]), [preset], [system])
    clear.click(public(lambda: ([], [], [], "", "", "")), None, [bot, conv, where, status, samples, tokens])
    sample5.click(on_sample, [conv, model, system, temperature, top_p, max_tokens, seed, *penalties], [samples])
    show_tokens.click(public(lambda m, s, c: tokens_html(pg, m, s, c)), [model, system, conv], [tokens])
    to_demo.click(on_demo_send, [conv, system], [label_info])
    to_rank.click(on_rank_send, [conv, model, system, temperature], [label_info])
    refresh.click(public(lambda: gr.update(choices=cs.chat_models(pg.registry))), None, model)
    return {"preset": demo}  # what the Start-here tour sets (ui.tour)
