"""The measurements of a report card, each a function of (the model's engine, the config) -> one row.

Every answer comes from the engine the app serves with (backend.serving.model_pool: its scheduler, or the remote
server of a remote model), greedy (temperature 0), so a card is repeatable and two cards compare.
Each row is {"key", "label", "unit", "value" (None: n/a), "n", "detail", "note"?, "samples", "seconds"}.

  problems      held-out verifiable problems (backend/datasets/verifiable.py: apples, count, spell; the GRPO
                trainer's held-out seed), under each of the Practice tab's prompts (plain, think), the better
                one counting (a thinking model is graded as it was trained); graded by Problem.check (the answer
                must be stated, as the GRPO reward wants), the other prompt and the lenient count in the detail
  tool_calls    held-out tool questions (backend/datasets/tool_use.py split "heldout", every kind but identity)
  tool_answers  through the real tool loop (backend.tool_loop.run_turn, python sandbox and search index),
                scored as backend/bench/tool_sft.py scores them: a call the loop accepts; the right answer
  idk           questions nobody can answer (backend/evals/unknowns.jsonl: private, future, fictional):
                the share of answers that say so ("I don't know", "no information", "fictional"...)
  identity      held-out identity phrasings ("Who are you?"): the share of answers that say what the model is:
                Playground Assistant (what the bundled identity conversations teach), SmolLM or Hugging Face
                (its base model and maker); the detail counts each name
  pelican       the newest registered reward model's mean score of answers to the RLHF held-out prompts
                (backend/train/rlhf.py), and how many mention pelicans (the annotators' hidden rule); n/a
                without a reward model
  bpb           bits per byte of the held-out slice of the python-docs corpus (the pretraining validation
                split: its last 5%), from prompt log-probs; n/a for remote models (no log-probs here)
  lm_eval/...   optional (lm_eval_tasks): tasks of EleutherAI's lm-evaluation-harness run through the app's
                own /v1 (backend/lm_eval_run.py), one row per task and metric, so the numbers compare with
                published ones; needs the server running and the harness installed (else the row says so)
"""
from __future__ import annotations

import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from backend.serving.sampling import SamplingParams

MAX_LIMIT = 256
PROBLEM_KINDS = ("apples", "count", "spell")
PROBLEM_SEED = 1337 + 99991     # the GRPO trainer's held-out problems (seed + 99991, default seed 1337)
TOOL_SEED = 1                   # any seed: the held-out split shares no key with training
TEXT_CHARS = 1000               # characters of held-out text per scored window
VAL_FRACTION = 0.05             # the pretraining default: the corpus's last 5% is its validation split
UNKNOWNS = Path(__file__).with_name("unknowns.jsonl")  # questions nobody can answer (private, future, made up)

ROWS = [("problems", "Verifiable problems: held-out accuracy", "fraction"),
        ("tool_calls", "Tool questions: well-formed calls", "fraction"),
        ("tool_answers", "Tool questions: correct answers", "fraction"),
        ("idk", "Unknown-answer questions: says it doesn't know", "fraction"),
        ("identity", "Identity questions: says what it is", "fraction"),
        ("pelican", "Pelican prompts: reward-model score", "score"),
        ("bpb", "Held-out text: bits per byte (lower is better)", "bits/byte")]
LABELS = {k: label for k, label, _ in ROWS}


class Stopped(Exception):
    """The run was cancelled between two rows or mid-row: no card is stored."""


@dataclass
class EvalConfig:
    model: str = ""                 # the registered model to grade
    limit: int = 16                 # questions per row (at most: some sets are smaller), text windows for bpb
    max_tokens: int = 128           # generated tokens per answer (a tool turn: all its segments)
    reward_model: str = ""          # for the pelican row; "": the newest registered reward model
    parallel: int = 4               # tool turns in flight at once (the scheduler batches them)
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks (limit documents each)
    lm_eval_url: str = ""           # the server whose /v1 the harness calls; "": this app's own host and port
    lm_eval_include: str = ""       # a folder of your own task YAMLs (offline tasks over local JSONL)
    name: str | None = None         # the job's name (default eval-<model>-j<id>)

    def validate(self) -> "EvalConfig":
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model: name the registered model to grade")
        if not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit: an integer from 1 to {MAX_LIMIT}, got {self.limit!r}")
        if not isinstance(self.max_tokens, int) or not 8 <= self.max_tokens <= 1024:
            raise ValueError(f"max_tokens: an integer from 8 to 1024, got {self.max_tokens!r}")
        if not isinstance(self.parallel, int) or not 1 <= self.parallel <= 16:
            raise ValueError(f"parallel: an integer from 1 to 16, got {self.parallel!r}")
        return self


# -- helpers -----------------------------------------------------------------------------------------
def greedy(engine, max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=engine.default_stop_ids())


def answers(engine, conversations: list[list[dict]], max_tokens: int, cancel) -> list[str]:
    """Greedy answers to conversations, all in one batch through the engine's scheduler."""
    prompts = [engine.chat_prompt(c) for c in conversations]
    room = min(max_tokens, engine.context_length - max(len(p) for p in prompts))
    if room < 1:
        raise ValueError(f"the prompts do not fit {engine.name}'s context of {engine.context_length} tokens")
    comps = engine.complete_batch(prompts, greedy(engine, room), cancel=cancel)
    check(cancel)
    return [c.text for c in comps]


def check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Stopped("the report card was stopped; nothing is stored")


def row(key: str, value, n: int, detail: str, samples: list | None = None, note: str | None = None) -> dict:
    out = {"key": key, "label": LABELS[key], "unit": next(u for k, _, u in ROWS if k == key),
           "value": None if value is None else round(float(value), 4), "n": n, "detail": detail,
           "samples": (samples or [])[:3]}
    if note:
        out["note"] = note
    return out


def na(key: str, why: str) -> dict:
    return row(key, None, 0, why, note=why)


def share(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def by_kind(kinds: list[str], oks: list[bool]) -> str:
    """'apples 1/6, count 0/5' from each question's kind and whether it was right."""
    return ", ".join(f"{k} {sum(ok for x, ok in zip(kinds, oks) if x == k)}/{kinds.count(k)}" for k in sorted(set(kinds)))


# -- the rows ----------------------------------------------------------------------------------------
def problems_row(pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    """Asked under both of the Practice tab's prompts, plain and think (R1-Zero's, which a thinking model was
    trained under and a plain one was not): the row is the prompt that suits the model better, the detail
    gives both."""
    from backend.datasets.verifiable import problems
    from backend.practice import TEMPLATES, system_prompt
    probs = problems(cfg.limit, seed=PROBLEM_SEED, kinds=PROBLEM_KINDS)
    tried = {}
    for template in TEMPLATES:
        texts = answers(engine, [[{"role": "system", "content": system_prompt(template)},
                                  {"role": "user", "content": p.question}] for p in probs], cfg.max_tokens, cancel)
        tried[template] = texts, [p.check(t) for p, t in zip(probs, texts)]
    best = max(TEMPLATES, key=lambda t: sum(tried[t][1]))  # the first (plain) on a tie
    texts, right = tried[best]
    lenient = [p.check(t, lenient=True) for p, t in zip(probs, texts)]
    others = ", ".join(f"{t} prompt {sum(r)}/{len(r)}" for t, (_, r) in tried.items() if t != best)
    detail = (f"{sum(right)}/{len(right)} right under the {best} prompt ({by_kind([p.kind for p in probs], right)}; "
              f"{others}); {sum(lenient)} if the last number or word counts")
    samples = [{"q": p.question, "a": t, "ok": r} for p, t, r in zip(probs, texts, right)]
    return [row("problems", share(right), len(right), detail, samples)]


def tool_rows(pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    from backend.bench.tool_sft import called_tool, correct, wellformed
    from backend.datasets.tool_use import KINDS, examples, search_docs
    from backend.tool_loop import Tools, collect_turn, run_turn
    held = examples(cfg.limit, seed=TOOL_SEED, split="heldout", mix={k: 1.0 for k in KINDS if k != "identity"})
    tools, docs = Tools.from_playground(pg), dict(search_docs())

    def turn(ex):
        check(cancel)
        params = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens)
        return collect_turn(run_turn(engine, ex.row["messages"][:-1], params, tools, cancel=cancel))

    with ThreadPoolExecutor(cfg.parallel, thread_name_prefix="eval-tools") as pool:
        turns = list(pool.map(turn, held))
    check(cancel)
    formed, rights, tool_ok = [], [], []
    for ex, r in zip(held, turns):
        segs = r.message.get("segments") or []
        formed.append(wellformed(segs))
        tool_ok.append(called_tool(segs) == ex.tool)
        rights.append(correct(ex, r.message["content"], docs.get(ex.expect)))
    samples = [{"q": ex.question, "a": json.dumps(r.message.get("segments") or r.message["content"])[:600], "ok": ok}
               for ex, r, ok in zip(held, turns, rights)]
    n, kinds = len(held), by_kind([ex.kind for ex in held], rights)
    return [row("tool_calls", share(formed), n,
                f"{sum(formed)}/{n} made a call the tool loop runs; right tool {sum(tool_ok)}/{n}", samples),
            row("tool_answers", share(rights), n, f"{sum(rights)}/{n} right ({kinds})", samples)]


# "I don't know", and the other ways of saying so: no information, cannot know, it does not exist.
IDK = re.compile(r"\b(i\s+(?:do\s+not|don'?t|really\s+don'?t)\s+know|i'?m\s+not\s+sure|i\s+am\s+not\s+sure|"
                 r"not\s+(?:aware|familiar)|no\s+(?:information|data|record|knowledge|way\s+(?:of|to)\s+know)|"
                 r"(?:do\s+not|don'?t|doesn'?t|does\s+not)\s+have\s+(?:any\s+)?(?:information|access|data|knowledge)|"
                 r"(?:can\s*not|can'?t|unable\s+to|not\s+able\s+to)\s+"
                 r"(?:know|tell|determine|find|provide|answer|say|access|predict)|"
                 r"(?:does\s+not|doesn'?t|do\s+not|don'?t)\s+(?:seem\s+to\s+)?exist|fictional|not\s+a\s+real|"
                 r"unknown\s+to\s+me|impossible\s+to\s+(?:know|say|tell|predict))", re.I)


def says_idk(text: str) -> bool:
    return IDK.search(text.replace("\u2019", "'")) is not None


def unknown_questions() -> list[str]:
    return [json.loads(line)["question"] for line in UNKNOWNS.read_text("utf-8").splitlines() if line.strip()]


def idk_row(pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    qs = unknown_questions()[:cfg.limit]
    texts = answers(engine, [[{"role": "user", "content": q}] for q in qs], cfg.max_tokens, cancel)
    idk = [says_idk(t) for t in texts]
    samples = [{"q": q, "a": t, "ok": ok} for q, t, ok in zip(qs, texts, idk)]
    return [row("idk", share(idk), len(qs), f"{sum(idk)}/{len(qs)} say they don't know (or that it does not exist)",
                samples)]


SELF_NAMES = ("Playground Assistant", "SmolLM", "Hugging Face")


def identity_row(pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    from backend.datasets.tool_use import IDENTITY_Q, split_of
    qs = [q for q in IDENTITY_Q if split_of("identity:" + q) == "heldout"][:cfg.limit]
    texts = answers(engine, [[{"role": "user", "content": q}] for q in qs], min(cfg.max_tokens, 64), cancel)
    named = [[n for n in SELF_NAMES if n.lower() in t.lower()] for t in texts]
    counts = ", ".join(f"{n} {sum(n in x for x in named)}" for n in SELF_NAMES)
    samples = [{"q": q, "a": t, "ok": bool(x)} for q, t, x in zip(qs, texts, named)]
    return [row("identity", share([bool(x) for x in named]), len(qs),
                f"{sum(map(bool, named))}/{len(qs)} say what it is ({counts})", samples)]


def newest_reward_model(pg) -> str | None:
    from backend.practice import reward_models
    names = reward_models(pg.registry)
    if not names:
        return None
    specs = {s.name: s for s in pg.registry.list()}
    return max(names, key=lambda n: (specs[n].path.stat().st_mtime if specs[n].path else 0, n))


def pelican_row(pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    from backend.datasets.preferences import mentions_pelican
    from backend.practice import reward_scores
    from backend.train.rlhf import HELD_OUT_PROMPTS
    rm = cfg.reward_model or newest_reward_model(pg)
    if rm is None:
        return [na("pelican", "n/a: no reward model is registered (train one with a reward job)")]
    prompts = HELD_OUT_PROMPTS[:cfg.limit]
    texts = answers(engine, [[{"role": "user", "content": p}] for p in prompts], min(cfg.max_tokens, 48), cancel)
    scores = reward_scores(pg, rm, prompts, texts)
    pel = [mentions_pelican(t) for t in texts]
    samples = [{"q": p, "a": t, "score": round(s, 4)} for p, t, s in zip(prompts, texts, scores)]
    return [row("pelican", sum(scores) / len(scores), len(prompts),
                f"mean score by {rm}; {sum(pel)}/{len(pel)} answers mention pelicans", samples)]


def heldout_text() -> str:
    """The held-out slice of the offline corpus: python-docs past the pretraining split (its last 5%)."""
    from backend.corpora import load_corpus
    from backend.train.data import split_text
    return split_text(load_corpus("python-docs"), VAL_FRACTION)[1]


def text_windows(n: int) -> list[str]:
    text, out, at = heldout_text(), [], 0
    while len(out) < n and at < len(text):
        cut = text.rfind(" ", at, at + TEXT_CHARS) if at + TEXT_CHARS < len(text) else len(text)
        cut = cut if cut > at else min(len(text), at + TEXT_CHARS)
        out.append(text[at:cut])
        at = cut
    return out


def bpb_row(pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    from backend.serving.remote_engine import RemoteUnsupported
    nats, nbytes, windows = 0.0, 0, text_windows(cfg.limit)
    try:
        for w in windows:
            check(cancel)
            ids = engine.enc.encode_ordinary(w)[:engine.context_length - 1]  # a prompt must leave room
            lps = engine.prompt_logprobs(ids)
            nats -= sum(lp for lp, _ in lps[1:])  # the first token has no context: neither scored nor counted
            nbytes += sum(len(engine.token_bytes(t)) for t in ids[1:])
    except RemoteUnsupported as e:
        return [na("bpb", f"n/a: {e}")]
    return [row("bpb", nats / math.log(2) / nbytes, len(windows),
                f"{len(windows)} windows, {nbytes:,} bytes of held-out python-docs")]


CHAT_ROWS = [(problems_row, ["problems"]), (tool_rows, ["tool_calls", "tool_answers"]), (idk_row, ["idk"]),
             (identity_row, ["identity"]), (pelican_row, ["pelican"])]
CHAT_KEYS = [k for _, keys in CHAT_ROWS for k in keys]


def guarded(fn, keys: list[str], pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    """A row the model cannot take (its context is too short for the prompts, say) is n/a with the reason;
    the other rows are still measured."""
    try:
        return fn(pg, engine, cfg, cancel)
    except ValueError as e:
        return [na(k, f"n/a: {e}") for k in keys]


def check_tokenizer(pg, engine, url: str) -> None:
    """The harness tokenizes through the server's /tokenize without naming a model (as with vLLM, one model per
    server), so the server's default model must share the graded model's tokenizer."""
    import httpx
    default = httpx.get(f"{url}/readyz", timeout=30).json().get("default_model")
    if default != engine.name and (default not in pg.registry.names()
                                   or pg.registry.get(default).tokenizer != engine.spec.tokenizer):
        raise ValueError(f"the harness tokenizes with the server's default model {default!r}, whose tokenizer is "
                         f"not {engine.name}'s ({engine.spec.tokenizer}): start that server with --model {engine.name}")


def lm_eval_rows(pg, engine, cfg: EvalConfig, cancel) -> list[dict]:
    """One row per (task, metric) of the harness's results; a harness that is missing or fails is one n/a row."""
    from backend.lm_eval_run import run_tasks
    url = cfg.lm_eval_url or f"http://{pg.cfg.host}:{pg.cfg.port}"

    def extra(key: str, label: str, value, n: int, detail: str) -> dict:
        out = {"key": key, "label": label, "unit": "score", "value": None if value is None else round(float(value), 4),
               "n": n, "detail": detail, "samples": []}
        return out | ({"note": detail} if value is None else {})

    try:
        check_tokenizer(pg, engine, url)
        res = run_tasks(url, cfg.model, list(cfg.lm_eval_tasks), cfg.lm_eval_include or None, limit=cfg.limit)
    except Exception as e:  # noqa: BLE001 - not installed, server down, unknown task: the other rows stand
        return [extra(f"lm_eval/{'+'.join(cfg.lm_eval_tasks)}", f"lm-eval {', '.join(cfg.lm_eval_tasks)}", None, 0,
                      f"n/a: {type(e).__name__}: {e}"[:300])]
    check(cancel)
    rows = []
    for task, metrics in res["results"].items():
        n = int((res.get("n-samples") or {}).get(task, {}).get("effective", 0))
        for name, value in metrics.items():
            metric, _, flt = name.partition(",")
            if (metric.endswith("_stderr") or metric == "sample_len" or isinstance(value, bool)
                    or not isinstance(value, (int, float))):
                continue
            err = metrics.get(f"{metric}_stderr,{flt}")
            rows.append(extra(f"lm_eval/{task}/{metric}", f"lm-eval {task}: {metric}", value, n,
                              f"{n} documents through {url}/v1" + (f", stderr {err:.3f}" if isinstance(err, float) else "")))
    return rows


def measure(pg, engine, cfg: EvalConfig, cancel: threading.Event | None = None, on_row=lambda row: None) -> list[dict]:
    """Every row of the card, in ROWS order (chat rows are n/a for a base model)."""
    out = []

    def add(rows: list[dict], t0: float) -> None:
        for r in rows:
            r["seconds"] = round(time.perf_counter() - t0, 2)
            out.append(r)
            on_row(r)

    if engine.spec.chat_format:
        for fn, keys in CHAT_ROWS:
            check(cancel)
            t0 = time.perf_counter()
            add(guarded(fn, keys, pg, engine, cfg, cancel), t0)
    else:
        add([na(k, "n/a: a base model (no chat format): it continues text") for k in CHAT_KEYS], time.perf_counter())
    check(cancel)
    t0 = time.perf_counter()
    add(guarded(bpb_row, ["bpb"], pg, engine, cfg, cancel), t0)
    if cfg.lm_eval_tasks:
        check(cancel)
        t0 = time.perf_counter()
        add(lm_eval_rows(pg, engine, cfg, cancel), t0)
    return out


def format_value(r: dict) -> str:
    if r.get("value") is None:
        return "n/a"
    if r["unit"] == "fraction":
        return f"{100 * r['value']:.1f}%"
    return f"{r['value']:.3f}"
