"""Generate tab: inference is sampling, made visible.

Pick a model, type a prompt (raw text: a base model continues documents), set temperature / top-k / top-p /
seed, and generate. Every generated token is shaded by the probability the model gave it; click one to see
the alternatives it considered, click an alternative to branch from there. Step mode adds one token at a
time and shows the whole next-token distribution before and after temperature/top-k/top-p, and where the
coin flip landed. Score a text (log-probs, perplexity), and measure regurgitation of a model trained here.

Layout, HTML rendering and wiring only: backend.completion does the work (the same service as
/api/completion), through the engine and backend.serving.sampling.filtered_probs.
"""
from __future__ import annotations

import asyncio
import html
import threading
import time

import gradio as gr

from backend import completion as svc
from backend.serving.engine import aiterate
from backend.models import model_names
from backend.presets_completion import BASE_MODEL_NOTE, get_preset, presets
from backend.serving.sampling import SamplingParams
from ui.fields import RUNNING, penalty_values, repetition_controls, wire_stop
from ui.login import door, public
from ui.model_lists import model_dropdown

EXAMPLE = "The three most useful things to know about transformers are"
STREAM_EVERY_S = 0.08   # re-render the token view at most this often while streaming

# Event delegation: the template re-renders inside `element`, the listener on it stays.
TOKENS_JS = """
element.addEventListener('click', (e) => {
  const t = e.target.closest('[data-i]');
  if (t) trigger('click', {index: parseInt(t.dataset.i)});
});
"""
ALTS_JS = """
element.addEventListener('click', (e) => {
  const t = e.target.closest('[data-alt]');
  if (t) trigger('click', {token_id: parseInt(t.dataset.alt)});
});
"""
CSS = """
.pg-tokens {white-space: pre-wrap; font-family: var(--font-mono); line-height: 1.9; font-size: 0.95em}
.pg-tokens .pg-prompt {opacity: .55}
.pg-nl {opacity: .45}
.pg-tok {cursor: pointer; border-radius: 3px; padding: 1px 0; box-shadow: inset 0 0 0 1px rgba(0,0,0,.08)}
.pg-tok:hover {outline: 2px solid #4a6cf7}
.pg-tok.pg-sel {outline: 2px solid #1d3bd1}
.pg-alt {cursor: pointer; margin: 2px; padding: 2px 8px; border: 1px solid #999; border-radius: 4px;
         font-family: var(--font-mono); background: transparent}
.pg-alt.pg-chosen {border: 2px solid #1d3bd1}
.pg-bars td {padding: 1px 6px; font-family: var(--font-mono); font-size: .9em}
.pg-bar {height: 11px; border-radius: 2px}
"""


# -- rendering (numbers only go into attributes; every text is escaped) --------------------------
def _shade(p: float | None) -> str:
    """Background for a token of probability p: red (unlikely) through yellow to green (likely)."""
    if p is None:
        return "background: transparent"
    return f"background: hsla({120 * max(0.0, min(1.0, p)):.0f}, 85%, 62%, 0.55)"


def _visible(text: str) -> str:
    """A token label where spaces and newlines can be seen."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def _pct(p: float) -> str:
    return f"{100 * p:.3g}%"


LEGEND = ('<div style="font-size:.85em;opacity:.8;margin-top:.4em">shade = probability the model gave the token '
          '(temperature 1): <span style="' + _shade(0.02) + '">&nbsp;2%&nbsp;</span> '
          '<span style="' + _shade(0.3) + '">&nbsp;30%&nbsp;</span> <span style="' + _shade(0.95) + '">&nbsp;95%&nbsp;</span>'
          ' · click a token for its alternatives</div>')


def _token_markup(text: str) -> str:
    """Escaped token text; a newline gets a visible mark so a newline token can be seen and clicked."""
    return html.escape(text).replace("\n", '<span class="pg-nl">↵</span>\n') if text else "∅"


def tokens_html(state: dict) -> str:
    if not state.get("tokens") and not state.get("prompt_text"):
        return '<div class="pg-tokens"><i>The completion appears here, one shaded token at a time.</i></div>'
    parts = [f'<span class="pg-prompt">{html.escape(state.get("prompt_text", ""))}</span>']
    sel = state.get("selected")
    for i, t in enumerate(state.get("tokens", [])):
        cls = "pg-tok pg-sel" if i == sel else "pg-tok"
        parts.append(f'<span class="{cls}" data-i="{i}" style="{_shade(t["prob"])}" '
                     f'title="p = {_pct(t["prob"])}">{_token_markup(t["text"])}</span>')
    return '<div class="pg-tokens" id="gen-token-view">' + "".join(parts) + "</div>" + LEGEND


def alternatives_html(state: dict) -> str:
    sel = state.get("selected")
    toks = state.get("tokens", [])
    if sel is None or not 0 <= sel < len(toks):
        return "<div><i>Click a generated token to see the alternatives the model considered at that point.</i></div>"
    t = toks[sel]
    buttons = []
    for a in t["top"]:
        cls = "pg-alt pg-chosen" if a["id"] == t["id"] else "pg-alt"
        buttons.append(f'<button class="{cls}" data-alt="{a["id"]}" style="{_shade(a["prob"])}">'
                       f'{html.escape(_visible(a["text"]))} <b>{_pct(a["prob"])}</b></button>')
    listed = {a["id"] for a in t["top"]}
    chosen_note = "" if t["id"] in listed else (f' (the sampled token {html.escape(_visible(t["text"]))} had '
                                                f'{_pct(t["prob"])}, outside the top {len(t["top"])})')
    return (f'<div id="gen-alternatives"><div>Token {sel + 1} was <b>{html.escape(_visible(t["text"]))}</b> '
            f'with probability {_pct(t["prob"])}{chosen_note}. Its top alternatives (click one to branch: the text '
            f'up to here + that token, then generation continues):</div><div>' + "".join(buttons) + "</div></div>")


def distribution_html(dist: dict | None) -> str:
    if not dist:
        return ("<div><i>Press <b>Step</b> to add one token: the next-token distribution appears here, before and after "
                "temperature / top-k / top-p, with the coin flip that picked the token.</i></div>")
    rows = dist["tokens"]
    scale = max(max(t["raw"] for t in rows), max(t["filtered"] for t in rows)) or 1.0
    sampled = dist["sampled"]["id"]
    body = []
    for t in rows:
        mark = " ◀ picked" if t["id"] == sampled else ""
        row_attr = ' class="pg-picked" style="font-weight:bold"' if mark else ""
        body.append(
            f'<tr{row_attr}>'
            f'<td>{html.escape(_visible(t["text"]))}</td>'
            f'<td style="width:36%"><div class="pg-bar" style="width:{100 * t["raw"] / scale:.2f}%;background:#9aa4b5"></div></td>'
            f'<td>{_pct(t["raw"])}</td>'
            f'<td style="width:36%"><div class="pg-bar" style="width:{100 * t["filtered"] / scale:.2f}%;background:#3b6ef5"></div></td>'
            f'<td>{_pct(t["filtered"])}{mark}</td></tr>')
    # The coin: u in [0, 1) lands in one slice of the filtered probabilities stacked in falling order.
    segs, colors = [], ["#3b6ef5", "#f59f3b", "#3bbf6e", "#c95ad6", "#e0c341", "#5ac8d6"]
    for j, t in enumerate(x for x in rows if x["filtered"] > 0):
        segs.append(f'<div title="{html.escape(_visible(t["text"]))}" style="width:{100 * t["filtered"]:.3f}%;'
                    f'background:{colors[j % len(colors)]};height:100%"></div>')
    coin = dist["coin"]
    s = dist["sampled"]
    shaping = (f'temperature {dist["temperature"]:g}, top-k {dist["top_k"] or "off"}, top-p {dist["top_p"]:g}: '
               f'{dist["kept"]:,} of {dist["vocab_size"]:,} tokens can still be picked')
    return (
        f'<div id="gen-distribution"><div>{shaping}</div>'
        f'<table class="pg-bars"><tr><th>token</th><th colspan=2>model (raw, temperature 1)</th>'
        f'<th colspan=2>after temperature / top-k / top-p</th></tr>{"".join(body)}</table>'
        f'<div style="margin-top:.5em">The coin flip: u = <b id="gen-coin">{coin["u"]:.4f}</b> (seed {dist["seed"]}) '
        f'landed in [{coin["low"]:.4f}, {coin["high"]:.4f}), the slice of '
        f'<b>{html.escape(_visible(s["text"]))}</b> (rank {s["rank"] + 1}, probability {_pct(s["filtered"])} after shaping).</div>'
        f'<div style="position:relative;display:flex;height:16px;border:1px solid #888;margin:.3em 0">{"".join(segs)}'
        f'<div style="position:absolute;left:{100 * coin["u"]:.3f}%;top:-4px;bottom:-4px;width:2px;background:#000"></div></div>'
        f'</div>')


def score_html(score: dict) -> str:
    parts = []
    for t in score["tokens"]:
        tip = "no context: not scored" if t["logprob"] is None else (
            f'p = {_pct(t["prob"])}; log p = {t["logprob"]:.3f}; model expected: '
            + ", ".join(f'{_visible(a["text"])} {_pct(a["prob"])}' for a in t["top"]))
        parts.append(f'<span class="pg-tok" style="{_shade(t["prob"])}" title="{html.escape(tip)}">'
                     f'{html.escape(t["text"])}</span>')
    return (f'<div id="gen-score"><div><b>perplexity {score["perplexity"]:.2f}</b> · {score["scored_tokens"]} tokens scored · '
            f'total log-prob {score["total_logprob"]:.2f} · mean negative log-prob {score["mean_nll"]:.3f} nats '
            f'(perplexity = e^mean: how many equally likely tokens the model was torn between, on average; '
            f'the first token has no context and is not scored)</div>'
            f'<div class="pg-tokens">{"".join(parts)}</div>{LEGEND.replace(" · click a token for its alternatives", " · hover for details")}</div>')


def regurgitation_html(report: dict) -> str:
    L = report["longest"]
    out = [f'<div id="gen-regurgitation"><div><b>Longest span copied verbatim from the training text: {L["tokens"]} tokens '
           f'({L["chars"]} characters)</b> over {len(report["samples"])} samples of {html.escape(report["model"])} '
           f'(temperature {report["temperature"]:g}; the training split has {report["train_tokens"]:,} tokens). '
           f'A few tokens happen by chance; dozens mean memorised text.</div>']
    for s in report["samples"]:
        comp, span = s["completion"], s["span"]["text"]
        at = comp.find(span) if span else -1
        shown = (html.escape(comp[:at]) + f'<mark>{html.escape(span)}</mark>' + html.escape(comp[at + len(span):])
                 if at >= 0 else html.escape(comp))
        truth = ("" if s["true_continuation"] is None else
                 f'<div style="opacity:.7">real continuation: {html.escape(s["true_continuation"])}</div>')
        out.append(f'<div style="margin:.6em 0;white-space:pre-wrap;font-family:var(--font-mono)">'
                   f'<span style="opacity:.55">{html.escape(s["prompt"])}</span>{shown}'
                   f'<div>copied run: {s["span"]["tokens"]} tokens</div>{truth}</div>')
    return "".join(out) + "</div>"


def preset_markdown(name: str | None) -> str:
    if not name:
        return ""
    p = get_preset(name)
    return f"**Notice:** {p.notice}\n\n**135M vs the lecture's 405B:** {p.shortfall}"


def _model_choices(pg) -> list[tuple[str, str]]:
    """Every model that generates (a reward model only scores), labelled with what it is."""
    out = []
    for s in pg.registry.list():
        if s.role == "reward":
            continue
        if s.kind == "bundled":
            label = f"{s.name} (bundled, instruct model)"
        elif s.lineage.get("kind") == "pretrain":
            label = f"{s.name} (base model pretrained here)"
        else:
            label = f"{s.name} ({s.kind}{', chat' if s.chat_format else ', base'})"
        out.append((label, s.name))
    return out


def _pretrained(pg) -> list[str]:
    return [s.name for s in pg.registry.list() if s.lineage.get("kind") == "pretrain"]


def _seed(text) -> int | None:
    text = str(text or "").strip()
    if not text:
        return None
    if not text.lstrip("-").isdigit():
        raise ValueError(f"seed must be a whole number, not {text!r}")
    return int(text)


def _params(temperature, top_p, top_k, max_tokens, seed, stop, freq=0.0, pres=0.0, rep=1.0) -> SamplingParams:
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          max_tokens=int(max_tokens), seed=_seed(seed),
                          stop=[s for s in (stop or "").splitlines() if s], **penalty_values(freq, pres, rep)).validate()


def _prompt_ids(engine, mode: str, text: str) -> list[int]:
    if mode == "chat":
        if not text:
            raise ValueError("prompt is empty")
        return engine.chat_prompt([{"role": "user", "content": text}])
    return svc.encode_prompt(engine, text)


STOPPED = "⏹ Stopped: the tokens so far stay; Generate starts again."


def _err(e: Exception) -> str:
    return f"⚠ {html.escape(str(e))}"


# -- the tab -------------------------------------------------------------------------------------
def build(pg) -> None:
    names = model_names(pg.registry, "generate")
    default = pg.cfg.default_model if pg.cfg.default_model in names else names[0]

    gr.Markdown("**Inference is sampling.** The model gives a probability to every token of its vocabulary; one is "
                "picked by a (biased) coin flip, appended, and the loop repeats. Generate, then click any token to see "
                "what else it could have said. " + BASE_MODEL_NOTE)
    if not pg.cfg.open_inference:  # this server lets only signed-in users generate
        gr.Markdown("This server lets only signed-in users generate: sign in at the top of the page.")
    with gr.Row():
        model = model_dropdown(lambda: _model_choices(pg), value=default, label="Model", scale=3, elem_id="gen-model")
        mode = gr.Radio(["completion", "chat"], value="completion", label="Prompt as", scale=2,
                        info="completion = raw text (base-model demos); chat wraps it as one user message")
        refresh = gr.Button("↻ models", scale=0, size="sm")
    with gr.Row():
        preset = gr.Dropdown([p.name for p in presets()], value=None, label="Deep Dive examples (DEMOS 5-8)",
                             scale=2, elem_id="gen-preset")
        preset_info = gr.Markdown(elem_id="gen-preset-info")
    prompt = gr.Textbox(label="Prompt", value=EXAMPLE, lines=4, elem_id="gen-prompt")
    with gr.Row():
        temperature = gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature (0 = greedy)", elem_id="gen-temperature")
        top_p = gr.Slider(0.01, 1, value=0.95, step=0.01, label="Top-p", elem_id="gen-top-p")
        top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", elem_id="gen-top-k")
        max_tokens = gr.Slider(1, 4096, value=128, step=1, label="Max new tokens", elem_id="gen-max-tokens")
    with gr.Row():
        seed = gr.Textbox(label="Seed", placeholder="empty = random; a number reproduces the sample", elem_id="gen-seed")
        stop = gr.Textbox(label="Stop strings (one per line)", lines=1, elem_id="gen-stop-strings")
        stream = gr.Checkbox(True, label="Stream tokens as they come", elem_id="gen-stream")
    with gr.Accordion("Repetition controls", open=False):
        with gr.Row():
            penalties = repetition_controls("gen")
    with gr.Row():
        run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        resample = gr.Button("Resample (new seed)", elem_id="gen-resample")
        greedy = gr.Button("Greedy (temperature 0)", elem_id="gen-greedy")
        step_btn = gr.Button("Step: one token", elem_id="gen-step")
        halt = gr.Button("Stop", variant="stop", elem_id="gen-stop")
    status = gr.Markdown(elem_id="gen-status")
    view = gr.HTML(tokens_html({}), js_on_load=TOKENS_JS, css_template=CSS, elem_id="gen-tokens")
    alts = gr.HTML(alternatives_html({}), js_on_load=ALTS_JS, css_template=CSS, elem_id="gen-alts")
    with gr.Accordion("Step mode: the next-token distribution and the coin flip", open=True):
        dist_view = gr.HTML(distribution_html(None), js_on_load=None, css_template=CSS, elem_id="gen-dist")
    output = gr.Textbox(label="Completion (plain text)", lines=4, interactive=False, elem_id="gen-output")
    state = gr.State({})

    with gr.Accordion("Score a text: log-probs and perplexity under the model", open=False):
        score_text = gr.Textbox(label="Text", lines=3, value="The quick brown fox jumps over the lazy dog.",
                                elem_id="gen-score-text")
        score_btn = gr.Button("Score", elem_id="gen-score-run")
        score_view = gr.HTML(js_on_load=None, css_template=CSS, elem_id="gen-score-view")

    with gr.Accordion("Regurgitation: does a model trained here recite its training text?", open=False):
        gr.Markdown("For a base model pretrained in the Training tab: prompt it with the openings of passages from its "
                    "own training split (or your prompt), sample, and find the longest run copied token for token "
                    "from the training text (`backend/train/regurgitation.py`).")
        with gr.Row():
            reg_model = model_dropdown(lambda: _pretrained(pg), value=None, label="Model pretrained here", scale=3,
                                    elem_id="gen-reg-model")
            reg_samples = gr.Slider(1, 16, value=4, step=1, label="Samples")
            reg_tokens = gr.Slider(8, 256, value=64, step=1, label="New tokens each")
            reg_temp = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature")
        reg_prompt = gr.Textbox(label="Prompt (empty = openings of training passages)", lines=2)
        reg_btn = gr.Button("Measure regurgitation", elem_id="gen-reg-run")
        reg_view = gr.HTML(js_on_load=None, elem_id="gen-reg-view")

    # -- handlers ----------------------------------------------------------------------------------
    async def _engine(name):
        return await asyncio.to_thread(pg.engines.get, name)  # may load the model the first time

    async def _stream(engine, tokens_iter, st, cancel, streaming, stop):
        """Consume a token stream into st, yielding (view, alts, output, status, state) as it grows."""
        last = 0.0
        finish = "length"
        async for t in aiterate(tokens_iter, cancel):
            if "finish_reason" in t:
                finish = t["finish_reason"]
                continue
            st["tokens"].append(t)
            # long outputs re-render less often: the whole token view is sent each time
            if streaming and time.monotonic() - last > STREAM_EVERY_S * (1 + len(st["tokens"]) / 256):
                last = time.monotonic()
                yield (tokens_html(st), gr.skip(), engine.enc.decode([t["id"] for t in st["tokens"]]),
                       f"{RUNNING} generating…", st)
        text = svc.completion_text(engine, st["tokens"], stop)
        note = svc.empty_answer_note(engine, st["tokens"], finish, raw=st.get("mode") != "chat")
        yield (tokens_html(st), alternatives_html(st), text,
               f"done · {engine.name} · {len(st['tokens'])} tokens · stopped by {finish}"
               + (f" · seed {st['seed']}" if st.get("seed") is not None else "") + (f"\n\n💡 {note}" if note else ""),
               st)

    @door(pg, "inference")
    async def generate(name, mode, text, temperature, top_p, top_k, max_tokens, seed, stop, freq, pres, rep_,
                       streaming):
        try:
            engine = await _engine(name)
            params = _params(temperature, top_p, top_k, max_tokens, seed, stop, freq, pres, rep_)
            ids = _prompt_ids(engine, mode, text or "")
            cancel = threading.Event()
            it = svc.stream_tokens(engine, ids, params, cancel=cancel)
        except (ValueError, ImportError) as e:
            yield gr.skip(), gr.skip(), gr.skip(), _err(e), gr.skip()
            return
        st = {"model": name, "mode": mode, "prompt": text, "prompt_ids": ids, "prompt_text": engine.enc.decode(ids),
              "tokens": [], "selected": None, "seed": params.seed, "params": [temperature, top_p, top_k, max_tokens, seed, stop]}
        yield tokens_html(st), alternatives_html(st), "", f"{RUNNING} generating…", st
        try:
            async for out in _stream(engine, it, st, cancel, streaming, params.stop):
                yield out
        except ValueError as e:
            yield tokens_html(st), gr.skip(), gr.skip(), _err(e), st

    @public
    def select_token(st, evt: gr.EventData):
        st = dict(st or {})
        i = getattr(evt, "_data", {}) or {}
        i = i.get("index") if isinstance(i, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(st.get("tokens", [])):
            return gr.skip(), gr.skip(), gr.skip()
        st["selected"] = i
        return tokens_html(st), alternatives_html(st), st

    @door(pg, "inference")
    async def branch(st, temperature, top_p, top_k, max_tokens, seed, stop, freq, pres, rep_, streaming,
                     evt: gr.EventData):
        data = getattr(evt, "_data", {}) or {}
        token_id = data.get("token_id") if isinstance(data, dict) else None
        st = dict(st or {})
        sel = st.get("selected")
        if not isinstance(token_id, int) or sel is None or not st.get("tokens"):
            yield gr.skip(), gr.skip(), gr.skip(), "click a generated token first, then one of its alternatives", gr.skip()
            return
        try:
            engine = await _engine(st["model"])
            # the branch keeps the completion's length: max_tokens counts the tokens before the branch point
            params = _params(temperature, top_p, top_k, max(1, int(max_tokens) - sel), seed, stop, freq, pres, rep_)
            prefix = st["prompt_ids"] + [t["id"] for t in st["tokens"][:sel]]
            cancel = threading.Event()
            it = svc.stream_continue_from(engine, prefix, token_id, params, cancel=cancel)
        except (ValueError, ImportError) as e:
            yield gr.skip(), gr.skip(), gr.skip(), _err(e), gr.skip()
            return
        st["tokens"] = st["tokens"][:sel]
        st["seed"] = params.seed
        st["selected"] = sel  # keep the branch point selected: its alternatives now show the chosen token
        yield tokens_html(st), gr.skip(), gr.skip(), f"branching at token {sel + 1}…", st
        try:
            async for out in _stream(engine, it, st, cancel, streaming, params.stop):
                yield out
        except ValueError as e:
            yield tokens_html(st), gr.skip(), gr.skip(), _err(e), st

    @door(pg, "inference")
    async def step(st, name, mode, text, temperature, top_p, top_k, seed):
        try:
            engine = await _engine(name)
            params = _params(temperature, top_p, top_k, 1, seed, "")
            st = dict(st or {})
            if st.get("model") != name or st.get("prompt") != text or st.get("mode") != mode or "prompt_ids" not in st:
                ids = _prompt_ids(engine, mode, text or "")
                st = {"model": name, "mode": mode, "prompt": text, "prompt_ids": ids,
                      "prompt_text": engine.enc.decode(ids), "tokens": [], "selected": None, "seed": None}
            ids = st["prompt_ids"] + [t["id"] for t in st["tokens"]]
            # a seed makes the whole stepped sequence reproducible: token n uses seed + n
            step_seed = None if params.seed is None else params.seed + len(st["tokens"])
            out = await asyncio.to_thread(svc.step, engine, ids, params, step_seed)
        except (ValueError, ImportError) as e:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), _err(e), gr.skip()
        st["tokens"] = st["tokens"] + [out["token"]]
        st["selected"] = len(st["tokens"]) - 1
        text_out = engine.enc.decode([t["id"] for t in st["tokens"]])
        return (tokens_html(st), alternatives_html(st), distribution_html(out), text_out,
                f"step {len(st['tokens'])} · picked {html.escape(_visible(out['token']['text']))} · {engine.name}", st)

    @door(pg, "inference")
    async def score(name, text):
        try:
            engine = await _engine(name)
            return score_html(await asyncio.to_thread(svc.score_text, engine, text or ""))
        except (ValueError, ImportError) as e:
            return f"<div>{_err(e)}</div>"

    @door(pg, "inference")
    async def regurgitate(name, n, tokens, temp, reg_prompt_text):
        if not name:
            return "<div>⚠ pick a model pretrained here (train one in the Training tab, then ↻)</div>"
        from backend.train.regurgitation import measure_for_model
        try:
            report = await asyncio.to_thread(measure_for_model, pg.cfg, name, n_samples=int(n),
                                             max_new_tokens=int(tokens), temperature=float(temp),
                                             prompt=(reg_prompt_text or None))
        except (ValueError, ImportError) as e:
            return f"<div>{_err(e)}</div>"
        return regurgitation_html(report)

    @public
    def apply_preset(name):
        if not name:
            return (gr.skip(),) * 8
        p = get_preset(name)
        return (p.prompt, p.temperature, p.top_p, p.top_k, p.max_tokens, "" if p.seed is None else str(p.seed),
                "\n".join(p.stop), preset_markdown(name))

    knobs = [temperature, top_p, top_k, max_tokens, seed, stop, *penalties]
    gen_inputs = [model, mode, prompt, *knobs, stream]
    gen_outputs = [view, alts, output, status, state]
    events = [
        run.click(generate, gen_inputs, gen_outputs),
        prompt.submit(generate, gen_inputs, gen_outputs),
        resample.click(public(lambda: str(svc.new_seed())), None, seed).then(generate, gen_inputs, gen_outputs),
        greedy.click(public(lambda: 0), None, temperature).then(generate, gen_inputs, gen_outputs),
        alts.click(branch, [state, *knobs, stream], gen_outputs),
    ]
    wire_stop(halt, events, status, STOPPED)
    view.click(select_token, state, [view, alts, state])
    step_btn.click(step, [state, model, mode, prompt, temperature, top_p, top_k, seed],
                   [view, alts, dist_view, output, status, state])
    preset.change(apply_preset, preset, [prompt, temperature, top_p, top_k, max_tokens, seed, stop, preset_info])
    score_btn.click(score, [model, score_text], score_view)
    reg_btn.click(regurgitate, [reg_model, reg_samples, reg_tokens, reg_temp, reg_prompt], reg_view)

    @public
    def refresh_models():
        return gr.update(choices=_model_choices(pg)), gr.update(choices=_pretrained(pg))

    refresh.click(refresh_models, None, [model, reg_model])
    return {"preset": preset}  # what the Start-here tour sets (ui.tour)
